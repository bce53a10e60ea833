//! heterogeneous-swarm: `fit` searches, with particle-swarm optimisation, for
//! a directed acyclic graph over the pool's members (who reads whose
//! answer), scoring each graph by its accuracy on the dev examples; `run`
//! executes the best graph level by level. See README.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::is_correct;
use tessera_sdk::pso::Swarm;
use tessera_sdk::rand::Rng;
use tessera_sdk::*;

struct HeterogeneousSwarm;

/// Version of the persisted [`FitState`].
const STATE_VERSION: u8 = 1;

/// The most generations one `fit` may plan for: the manifest's `host_calls`
/// budget less room for `list-models`.
const FIT_MAX_CALLS: usize = 1000;

/// The most tokens one `fit` may plan for (the manifest's `tokens` budget
/// less a margin).
const FIT_MAX_TOKENS_TOTAL: usize = 60_000;

/// Longest stretch of one predecessor's answer a member reads, in
/// characters; longer answers are cut (and marked).
const SHOWN_CHARS: usize = 1200;

/// A decoded collaboration graph over pool members, in execution order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Graph {
    /// Member ids of the nodes, in topological (execution) order.
    nodes: Vec<String>,
    /// For each node, the indices (into `nodes`) of the nodes it reads.
    preds: Vec<Vec<usize>>,
    /// Index (into `nodes`) of the node whose answer is the output; the
    /// graph's only sink.
    output: usize,
}

/// What `fit` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FitState {
    graph: Graph,
    /// Dev accuracy of `graph`.
    fitness: f64,
    /// Dev examples it was measured on.
    dev_size: u32,
    /// The best particle's position (the n x n matrix, row-major) and the
    /// member order of its rows.
    members: Vec<String>,
    matrix: Vec<f64>,
}

impl Graph {
    /// Level of each node: 0 for nodes that read nobody, else one more than
    /// the deepest node they read.
    fn node_levels(&self) -> Vec<usize> {
        let mut lv = vec![0usize; self.nodes.len()];
        for i in 0..self.nodes.len() {
            lv[i] = self.preds[i].iter().map(|&p| lv[p] + 1).max().unwrap_or(0);
        }
        lv
    }

    /// Node indices grouped by level, shallowest first.
    fn levels(&self) -> Vec<Vec<usize>> {
        let lv = self.node_levels();
        let depth = lv.iter().copied().max().map_or(0, |d| d + 1);
        (0..depth)
            .map(|d| (0..self.nodes.len()).filter(|&i| lv[i] == d).collect())
            .collect()
    }

    fn edges(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (j, ps) in self.preds.iter().enumerate() {
            for &i in ps {
                out.push(format!("{}->{}", self.nodes[i], self.nodes[j]));
            }
        }
        out
    }

    fn describe_levels(&self) -> String {
        self.levels()
            .iter()
            .map(|l| l.iter().map(|&i| self.nodes[i].as_str()).collect::<Vec<_>>().join(", "))
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Whether the graph is well formed: predecessors come earlier (so the
    /// order is topological) and the output is a node.
    fn is_valid(&self) -> bool {
        self.nodes.len() == self.preds.len()
            && self.output < self.nodes.len()
            && self.preds.iter().enumerate().all(|(j, ps)| ps.iter().all(|&i| i < j))
    }
}

/// Decodes a particle's position (an n x n matrix over `members`, row-major,
/// entries in [0, 1]) into a graph:
/// 1. the diagonal is each member's priority: members are ordered by it,
///    highest first (ties: pool order);
/// 2. an edge i -> j is kept when i comes before j in that order and
///    `x[i][j] > 0.5` (so the graph is acyclic by construction);
/// 3. the last member in the order is the output;
/// 4. only the output and its ancestors are kept: other members could not
///    influence the answer, so they are not called. The output is therefore
///    the graph's only sink.
fn decode(x: &[f64], members: &[String]) -> Graph {
    let n = members.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[b * n + b].total_cmp(&x[a * n + a]).then(a.cmp(&b)));
    let Some(&out) = order.last() else {
        return Graph {
            nodes: vec![],
            preds: vec![],
            output: 0,
        };
    };
    // Walk back from the output to collect its ancestors.
    let pos: Vec<usize> = {
        let mut p = vec![0; n];
        for (k, &m) in order.iter().enumerate() {
            p[m] = k;
        }
        p
    };
    let edge = |i: usize, j: usize| pos[i] < pos[j] && x[i * n + j] > 0.5;
    let mut keep = vec![false; n];
    keep[out] = true;
    for &j in order.iter().rev() {
        if keep[j] {
            for i in (0..n).filter(|&i| edge(i, j)) {
                keep[i] = true;
            }
        }
    }
    let kept: Vec<usize> = order.iter().copied().filter(|&m| keep[m]).collect();
    let index = |m: usize| kept.iter().position(|&k| k == m).unwrap_or(0);
    Graph {
        nodes: kept.iter().map(|&m| members[m].clone()).collect(),
        preds: kept
            .iter()
            .map(|&j| kept.iter().copied().filter(|&i| edge(i, j)).map(index).collect())
            .collect(),
        output: kept.len() - 1,
    }
}

/// The graph used without fit state: a chain through every member in
/// reverse pool order, so that the first member (operators list pools
/// best-first) reads everyone's chain of answers and gives the output.
fn default_chain(members: &[String]) -> Graph {
    let nodes: Vec<String> = members.iter().rev().cloned().collect();
    let preds = (0..nodes.len())
        .map(|j| if j == 0 { vec![] } else { vec![j - 1] })
        .collect();
    Graph {
        output: nodes.len().saturating_sub(1),
        nodes,
        preds,
    }
}

/// `text` cut to [`SHOWN_CHARS`] characters on a character boundary.
fn shown(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{} [...]", &t[..cut]),
        None => t.to_string(),
    }
}

/// What a node is asked: the original input when it reads nobody, else the
/// input with its predecessors' answers put before the last user turn (or
/// the raw prompt), so the question and its instructions come last.
fn node_input(input: &Input, answers: &[&str]) -> Input {
    if answers.is_empty() {
        return input.clone();
    }
    let mut pre = String::from("Other assistants answered the question below (they may be wrong):\n");
    for (k, a) in answers.iter().enumerate() {
        pre.push_str(&format!("\nAssistant {}:\n{}\n", k + 1, shown(a)));
    }
    pre.push_str("\nUse them to give your own best answer.\n\nQuestion:");
    match input {
        Input::Prompt(p) => Input::Prompt(format!("{pre}\n{p}")),
        Input::Chat(msgs) => {
            let mut msgs = msgs.clone();
            match msgs.iter_mut().rev().find(|m| m.role == "user") {
                Some(m) => m.content = format!("{pre}\n{}", m.content),
                None => msgs.push(Message {
                    role: "user".into(),
                    content: pre,
                }),
            }
            Input::Chat(msgs)
        }
    }
}

/// A cache key for a greedy generation: the member and the exact input.
fn cache_key(model: &str, input: &Input) -> String {
    let mut k = format!("{model}\u{1}");
    match input {
        Input::Prompt(p) => {
            k.push_str("prompt\u{1}");
            k.push_str(p);
        }
        Input::Chat(msgs) => {
            for m in msgs {
                k.push_str(&m.role);
                k.push('\u{1}');
                k.push_str(&m.content);
                k.push('\u{2}');
            }
        }
    }
    k
}

/// Search hyperparameters, validated.
struct Search {
    population: usize,
    swarm: Swarm,
    seed: u64,
    fit_max_tokens: u32,
}

fn search_settings(cfg: &Config) -> Result<Search, Error> {
    let population: usize = cfg.parse("population", 5)?;
    if !(1..=64).contains(&population) {
        return Err(Error::InvalidParams(format!(
            "config `population` = {population}: use 1..=64"
        )));
    }
    let fit_max_tokens: u32 = cfg.parse("fit_max_tokens", 32)?;
    if !(1..=4096).contains(&fit_max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `fit_max_tokens` = {fit_max_tokens}: use 1..=4096"
        )));
    }
    // Adjacency weights live in [0, 1]; the reference's constants.
    let swarm = Swarm {
        bounds: Some((0.0, 1.0)),
        ..Swarm::default()
    }
    .configured(cfg, 64)?;
    Ok(Search {
        population,
        swarm,
        seed: cfg.parse("seed", 0)?,
        fit_max_tokens,
    })
}

fn run_max_tokens(cfg: &Config) -> Result<u32, Error> {
    let max_tokens: u32 = cfg.parse("max_tokens", 128)?;
    if !(1..=4096).contains(&max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `max_tokens` = {max_tokens}: use 1..=4096"
        )));
    }
    Ok(max_tokens)
}

/// Dev accuracy of `graph`: the graph runs greedily on every dev example,
/// level by level, with one `fan-out` per level covering all examples.
/// Generations already made for the same member and the same input are
/// reused from `cache` (greedy decoding makes that exact), so only new
/// inputs cost a call.
fn fitness(
    graph: &Graph,
    dev: &[Example],
    max_tokens: u32,
    cache: &mut BTreeMap<String, String>,
    calls: &mut usize,
) -> f64 {
    if dev.is_empty() || graph.nodes.is_empty() {
        return 0.0;
    }
    let params = GenParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        seed: Some(0),
        ..Default::default()
    };
    // answers[e][node]
    let mut answers: Vec<Vec<String>> = vec![vec![String::new(); graph.nodes.len()]; dev.len()];
    for level in graph.levels() {
        let mut pending: Vec<(usize, usize, String)> = Vec::new(); // (example, node, key)
        let mut new_keys: Vec<String> = Vec::new(); // one per job
        let mut jobs = Vec::new();
        for (e, ex) in dev.iter().enumerate() {
            for &node in &level {
                let reads: Vec<&str> = graph.preds[node].iter().map(|&p| answers[e][p].as_str()).collect();
                let input = node_input(&ex.input, &reads);
                let key = cache_key(&graph.nodes[node], &input);
                if let Some(hit) = cache.get(&key) {
                    answers[e][node] = hit.clone();
                    continue;
                }
                if !new_keys.contains(&key) {
                    jobs.push(Job {
                        model: graph.nodes[node].clone(),
                        input,
                        params: params.clone(),
                    });
                    new_keys.push(key.clone());
                }
                pending.push((e, node, key));
            }
        }
        if !jobs.is_empty() {
            *calls += jobs.len();
            for (key, r) in new_keys.into_iter().zip(fan_out(&jobs)) {
                // A failed call reads as an empty (wrong) answer and is not cached.
                if let Ok(g) = r {
                    cache.insert(key, g.text);
                }
            }
        }
        for (e, node, key) in pending {
            answers[e][node] = cache.get(&key).cloned().unwrap_or_default();
        }
    }
    let right = dev
        .iter()
        .enumerate()
        .filter(|(e, ex)| is_correct(&answers[*e][graph.output], ex))
        .count();
    right as f64 / dev.len() as f64
}

impl Strategy for HeterogeneousSwarm {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let max_tokens = run_max_tokens(&cfg)?;
        search_settings(&cfg)?;
        let members: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        if members.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let fitted: Option<FitState> = state::load(STATE_VERSION, req.state.as_deref())?;
        let (graph, source) = match fitted {
            Some(f) if !f.graph.is_valid() => (
                default_chain(&members),
                "stored graph is malformed (run fit again): default chain".to_string(),
            ),
            Some(f) => match f.graph.nodes.iter().find(|id| !members.contains(id)) {
                Some(missing) => (
                    default_chain(&members),
                    format!("stored graph uses {missing}, which is not granted: default chain"),
                ),
                None => (
                    f.graph,
                    format!(
                        "fitted graph (dev accuracy {:.2} on {} examples)",
                        f.fitness, f.dev_size
                    ),
                ),
            },
            None => (
                default_chain(&members),
                "no fit state: default chain in reverse pool order".to_string(),
            ),
        };
        let edges = graph.edges();
        trace(
            None,
            "graph",
            format!(
                "{source}; nodes: {}; edges: {}; levels: {}; output: {}",
                graph.nodes.join(", "),
                if edges.is_empty() {
                    "none".to_string()
                } else {
                    edges.join(", ")
                },
                graph.describe_levels(),
                graph.nodes[graph.output]
            ),
        );
        let seed = req.params.seed.unwrap_or(0);
        let mut answers: Vec<Option<String>> = vec![None; graph.nodes.len()];
        for (d, level) in graph.levels().into_iter().enumerate() {
            // One fan-out per level: members of a level read only earlier levels.
            let jobs: Vec<Job> = level
                .iter()
                .map(|&node| {
                    let reads: Vec<&str> = graph.preds[node]
                        .iter()
                        .filter_map(|&p| answers[p].as_deref())
                        .collect();
                    let pool_index = members.iter().position(|m| *m == graph.nodes[node]).unwrap_or(0);
                    Job {
                        model: graph.nodes[node].clone(),
                        input: node_input(&req.input, &reads),
                        params: GenParams {
                            max_tokens: Some(max_tokens),
                            seed: Some(seed.wrapping_add(pool_index as u64)),
                            ..req.params.clone()
                        },
                    }
                })
                .collect();
            for (&node, r) in level.iter().zip(fan_out(&jobs)) {
                let id = &graph.nodes[node];
                let read: Vec<&str> = graph.preds[node].iter().map(|&p| graph.nodes[p].as_str()).collect();
                let role = if node == graph.output { "output" } else { "node" };
                let what = if read.is_empty() {
                    "answered the question".to_string()
                } else {
                    format!("answered after reading {}", read.join(", "))
                };
                match r {
                    Ok(g) => {
                        trace(Some(id), role, format!("level {d}: {what}"));
                        answers[node] = Some(g.text);
                    }
                    Err(e) => trace(Some(id), role, format!("level {d}: failed ({e})")),
                }
            }
        }
        let (text, answered_by) = match answers[graph.output].clone() {
            Some(t) => (t, graph.nodes[graph.output].clone()),
            None => {
                // The output failed: the deepest node that answered stands in.
                let (i, t) = answers
                    .iter()
                    .enumerate()
                    .rev()
                    .find_map(|(i, a)| a.clone().map(|t| (i, t)))
                    .ok_or_else(|| Error::ModuleFailed("no member of the graph produced an answer".into()))?;
                trace(
                    Some(&graph.nodes[i]),
                    "output",
                    "the output member failed; this answer stands in",
                );
                (t, graph.nodes[i].clone())
            }
        };
        Ok(Response {
            text,
            annotations: vec![
                ("graph".into(), source),
                ("nodes".into(), graph.nodes.join(", ")),
                (
                    "edges".into(),
                    if edges.is_empty() {
                        "none".into()
                    } else {
                        edges.join(", ")
                    },
                ),
                ("levels".into(), graph.describe_levels()),
                ("output".into(), answered_by),
            ],
        })
    }

    /// Particle-swarm search over adjacency matrices; the best graph by dev
    /// accuracy is kept.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        let s = search_settings(&config)?;
        run_max_tokens(&config)?;
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let members: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        let n = members.len();
        if n == 0 {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let worst_calls = s.population * s.swarm.rounds * dev.len() * n;
        if worst_calls > FIT_MAX_CALLS || worst_calls * s.fit_max_tokens as usize > FIT_MAX_TOKENS_TOTAL {
            return Err(Error::InvalidParams(format!(
                "config `population` x `iterations` = {} x {} over {} dev examples and {n} members plans up to {worst_calls} generations of {} tokens; keep it within {FIT_MAX_CALLS} generations and {FIT_MAX_TOKENS_TOTAL} tokens (fewer dev examples, or lower `population`, `iterations` or `fit_max_tokens`)",
                s.population, s.swarm.rounds, dev.len(), s.fit_max_tokens
            )));
        }
        let d = n * n;
        let mut rng = Rng::new(s.seed);
        let x: Vec<Vec<f64>> = (0..s.population).map(|_| (0..d).map(|_| rng.f64()).collect()).collect();
        let v: Vec<Vec<f64>> = (0..s.population)
            .map(|_| (0..d).map(|_| rng.range(-0.1, 0.1)).collect())
            .collect();
        let mut cache = BTreeMap::new();
        let calls = std::cell::Cell::new(0usize);
        let found = s.swarm.search(
            &mut rng,
            x,
            v,
            |_, _, position| {
                let mut c = calls.get();
                let f = fitness(&decode(position, &members), &dev, s.fit_max_tokens, &mut cache, &mut c);
                calls.set(c);
                Ok(f)
            },
            |round, seen, best| {
                let shown: Vec<String> = seen.iter().map(|f| format!("{f:.2}")).collect();
                trace(
                    None,
                    "fit",
                    format!(
                        "round {round}: particle fitness {}; best so far {best:.2}; {} generations so far",
                        shown.join(", "),
                        calls.get()
                    ),
                );
            },
        )?;
        let (best_x, best_f) = (found.position, found.fitness);
        let graph = decode(&best_x, &members);
        trace(
            None,
            "fit",
            format!(
                "best graph: dev accuracy {best_f:.2}; nodes {}; edges {}; levels {}",
                graph.nodes.join(", "),
                graph.edges().join(", "),
                graph.describe_levels()
            ),
        );
        let st = FitState {
            graph,
            fitness: best_f,
            dev_size: dev.len() as u32,
            members,
            matrix: best_x,
        };
        state::save(STATE_VERSION, &st).map(Some)
    }
}

export_strategy!(HeterogeneousSwarm);

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn decoding_orders_by_the_diagonal_and_keeps_only_ancestors_of_the_output() {
        // Priorities: m1 (0.9) > m0 (0.5) > m2 (0.1); output m2.
        // Edges over 0.5 that respect the order: m1->m0, m0->m2.
        // m1->m2 is 0.4 (dropped); m2->m0 goes backwards (dropped).
        #[rustfmt::skip]
        let x = [
            0.5, 0.0, 0.9,
            0.7, 0.9, 0.4,
            0.0, 0.0, 0.1,
        ];
        let g = decode(&x, &ids(3));
        assert_eq!(g.nodes, vec!["m1", "m0", "m2"]);
        assert_eq!(g.preds, vec![vec![], vec![0], vec![1]]);
        assert_eq!(g.output, 2);
        assert!(g.is_valid());
        assert_eq!(g.levels(), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(g.edges(), vec!["m1->m0", "m0->m2"]);
    }

    #[test]
    fn members_that_cannot_reach_the_output_are_dropped() {
        // Order m0, m1, m2 (diagonal); only m0->m2 is an edge: m1 is dropped.
        #[rustfmt::skip]
        let x = [
            0.9, 0.2, 0.8,
            0.0, 0.5, 0.1,
            0.0, 0.0, 0.1,
        ];
        let g = decode(&x, &ids(3));
        assert_eq!(g.nodes, vec!["m0", "m2"]);
        assert_eq!(g.preds, vec![vec![], vec![0]]);
        // No edges at all: just the output.
        let g = decode(&[0.0; 9], &ids(3));
        assert_eq!(g.nodes, vec!["m2"]);
        assert_eq!(g.levels(), vec![vec![0]]);
    }

    #[test]
    fn a_diamond_has_three_levels_with_two_members_in_the_middle() {
        #[rustfmt::skip]
        let x = [
            0.9, 0.8, 0.8, 0.0,
            0.0, 0.7, 0.0, 0.9,
            0.0, 0.0, 0.6, 0.9,
            0.0, 0.0, 0.0, 0.1,
        ];
        let g = decode(&x, &ids(4));
        assert_eq!(g.levels(), vec![vec![0], vec![1, 2], vec![3]]);
    }

    #[test]
    fn default_chain_ends_at_the_first_member() {
        let g = default_chain(&ids(3));
        assert_eq!(g.nodes, vec!["m2", "m1", "m0"]);
        assert_eq!(g.preds, vec![vec![], vec![0], vec![1]]);
        assert_eq!(g.output, 2);
    }

    #[test]
    fn node_input_puts_answers_before_the_question() {
        let q = user("Q?");
        assert_eq!(cache_key("m", &node_input(&q, &[])), cache_key("m", &q));
        match node_input(&q, &["x", "y"]) {
            Input::Chat(m) => {
                assert!(m[0].content.contains("Assistant 2:\ny"));
                assert!(m[0].content.ends_with("Question:\nQ?"));
            }
            other => panic!("{other:?}"),
        }
    }
}

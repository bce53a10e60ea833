//! graph-router: `fit` builds a bipartite graph of dev questions and members
//! (an edge where the member answered the question correctly), embeds the
//! questions, the members' descriptions and a task description, and trains a
//! one-layer message-passing network that scores (question, member) pairs;
//! `run` embeds the question, scores every member, the best one answers.
//! See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{evaluate, ranking};
use tessera_sdk::embedding::{embed_all, pick_embedder};
use tessera_sdk::rand::Rng;
use tessera_sdk::*;

struct GraphRouter;

/// Format version of [`Fitted`]; bump when its shape changes.
const STATE_VERSION: u8 = 1;
/// Adam's moment decay rates and epsilon (the usual values).
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// What `run` needs of the trained network: the query side (encoder and the
/// task's message, folded into one bias) and the finished member nodes.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    embedder: String,
    /// Members scored, in pool order at fit time.
    members: Vec<String>,
    hidden: usize,
    dim: usize,
    /// Query encoder `Q`, `hidden x dim`, row-major.
    query_weights: Vec<f32>,
    /// `T·task + e`: the task node's message to every query node plus bias.
    query_bias: Vec<f32>,
    /// Member node states after message passing, `hidden` each.
    member_nodes: Vec<Vec<f32>>,
    /// Scoring layer: weights over the hidden units and one bias per member.
    score_weights: Vec<f32>,
    score_bias: Vec<f32>,
    /// Members by dev accuracy, best first.
    ranking: Vec<String>,
    /// Training loss before and after.
    loss: (f32, f32),
}

struct Hyper {
    hidden: usize,
    lr: f32,
    epochs: u32,
    seed: u64,
    task: Option<String>,
    dev_max_tokens: u32,
    embedder: Option<String>,
}

fn hyper(cfg: &Config) -> Result<Hyper, Error> {
    let hidden: usize = cfg.parse("hidden", 8)?;
    if !(1..=64).contains(&hidden) {
        return Err(Error::InvalidParams(format!("config `hidden` = {hidden}: use 1..=64")));
    }
    let lr: f32 = cfg.parse("lr", 0.01)?;
    if !lr.is_finite() || lr <= 0.0 || lr > 1.0 {
        return Err(Error::InvalidParams(format!(
            "config `lr` = {lr}: use a value in (0, 1]"
        )));
    }
    let epochs: u32 = cfg.parse("epochs", 500)?;
    if !(1..=5000).contains(&epochs) {
        return Err(Error::InvalidParams(format!(
            "config `epochs` = {epochs}: use 1..=5000"
        )));
    }
    let seed: u64 = cfg.parse("seed", 0)?;
    let dev_max_tokens: u32 = cfg.parse("dev_max_tokens", 16)?;
    if !(1..=1024).contains(&dev_max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `dev_max_tokens` = {dev_max_tokens}: use 1..=1024"
        )));
    }
    let nonempty = |k: &str| cfg.get(k).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    Ok(Hyper {
        hidden,
        lr,
        epochs,
        seed,
        task: nonempty("task"),
        dev_max_tokens,
        embedder: nonempty("embedder"),
    })
}

/// `tanh(M x + bias)` for a row-major `rows x x.len()` matrix.
fn layer(m: &[f32], x: &[f32], bias: &[f32]) -> Vec<f32> {
    bias.iter()
        .enumerate()
        .map(|(r, b)| {
            let row = &m[r * x.len()..(r + 1) * x.len()];
            (row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b).tanh()
        })
        .collect()
}

/// `M x` for a row-major matrix with `rows` rows.
fn matvec(m: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            m[r * x.len()..(r + 1) * x.len()]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// Score of a query node `u` against member node `h`: `w · (u ⊙ h) + b`.
fn pair_score(w: &[f32], u: &[f32], h: &[f32], b: f32) -> f32 {
    w.iter().zip(u).zip(h).map(|((w, u), h)| w * u * h).sum::<f32>() + b
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The trainable parameters, one flat vector (for Adam) with named slices.
struct Net {
    hidden: usize,
    dim: usize,
    members: usize,
    p: Vec<f32>,
}

impl Net {
    // Layout: Q (h*d), T (h*d), e (h), A (h*d), B (h*d), c (h), w (h), b (n).
    fn len(h: usize, d: usize, n: usize) -> usize {
        4 * h * d + 3 * h + n
    }
    fn q(&self) -> std::ops::Range<usize> {
        0..self.hidden * self.dim
    }
    fn t(&self) -> std::ops::Range<usize> {
        let s = self.hidden * self.dim;
        s..2 * s
    }
    fn e(&self) -> std::ops::Range<usize> {
        let s = 2 * self.hidden * self.dim;
        s..s + self.hidden
    }
    fn a(&self) -> std::ops::Range<usize> {
        let s = 2 * self.hidden * self.dim + self.hidden;
        s..s + self.hidden * self.dim
    }
    fn b(&self) -> std::ops::Range<usize> {
        let s = 3 * self.hidden * self.dim + self.hidden;
        s..s + self.hidden * self.dim
    }
    fn c(&self) -> std::ops::Range<usize> {
        let s = 4 * self.hidden * self.dim + self.hidden;
        s..s + self.hidden
    }
    fn w(&self) -> std::ops::Range<usize> {
        let s = 4 * self.hidden * self.dim + 2 * self.hidden;
        s..s + self.hidden
    }
    fn bias(&self) -> std::ops::Range<usize> {
        let s = 4 * self.hidden * self.dim + 3 * self.hidden;
        s..s + self.members
    }

    fn new(hidden: usize, dim: usize, members: usize, seed: u64) -> Net {
        let mut net = Net {
            hidden,
            dim,
            members,
            p: vec![0.0; Net::len(hidden, dim, members)],
        };
        let mut rng = Rng::new(seed);
        let in_scale = 1.0 / (dim as f64).sqrt();
        for r in [net.q(), net.t(), net.a(), net.b()] {
            for x in &mut net.p[r] {
                *x = (rng.normal() * in_scale) as f32;
            }
        }
        let w_scale = 1.0 / (hidden as f64).sqrt();
        let w = net.w();
        for x in &mut net.p[w] {
            *x = (rng.normal() * w_scale) as f32;
        }
        net
    }

    /// The task's message plus bias: `T·task + e`.
    fn query_bias(&self, task: &[f32]) -> Vec<f32> {
        let tt = matvec(&self.p[self.t()], task, self.hidden);
        tt.iter().zip(&self.p[self.e()]).map(|(a, b)| a + b).collect()
    }

    /// Member nodes after one round of message passing:
    /// `tanh(A·description + B·mean(solved queries) + c)`.
    fn member_nodes(&self, desc: &[Vec<f32>], agg: &[Vec<f32>]) -> Vec<Vec<f32>> {
        desc.iter()
            .zip(agg)
            .map(|(d, a)| {
                let x = matvec(&self.p[self.a()], d, self.hidden);
                let y = matvec(&self.p[self.b()], a, self.hidden);
                x.iter()
                    .zip(&y)
                    .zip(&self.p[self.c()])
                    .map(|((x, y), c)| (x + y + c).tanh())
                    .collect()
            })
            .collect()
    }
}

/// The graph `fit` trains on.
struct Graph<'a> {
    queries: &'a [Vec<f32>],
    descriptions: &'a [Vec<f32>],
    task: &'a [f32],
    /// `edges[i][j]`: member `j` answered query `i` correctly.
    edges: &'a [Vec<bool>],
}

/// Mean embedding of the queries each member solved (zero when none).
fn aggregate(g: &Graph) -> Vec<Vec<f32>> {
    let dim = g.task.len();
    (0..g.descriptions.len())
        .map(|j| {
            let mut sum = vec![0f32; dim];
            let mut k = 0;
            for (x, e) in g.queries.iter().zip(g.edges) {
                if e[j] {
                    k += 1;
                    for (s, v) in sum.iter_mut().zip(x) {
                        *s += v;
                    }
                }
            }
            if k > 0 {
                for s in &mut sum {
                    *s /= k as f32;
                }
            }
            sum
        })
        .collect()
}

/// Mean binary cross-entropy of every (query, member) edge, and its
/// gradient with respect to every parameter.
fn loss_and_grad(net: &Net, g: &Graph, agg: &[Vec<f32>]) -> (f32, Vec<f32>) {
    let (h, d, n) = (net.hidden, net.dim, net.members);
    let mut grad = vec![0f32; net.p.len()];
    let qb = net.query_bias(g.task);
    let us: Vec<Vec<f32>> = g.queries.iter().map(|x| layer(&net.p[net.q()], x, &qb)).collect();
    let hs = net.member_nodes(g.descriptions, agg);
    let w = &net.p[net.w()];
    let bias = &net.p[net.bias()];
    let scale = 1.0 / (g.queries.len() * n).max(1) as f32;
    let mut loss = 0f32;
    let mut dh = vec![vec![0f32; h]; n];
    let mut dqb = vec![0f32; h];
    let (q0, w0, b0) = (net.q().start, net.w().start, net.bias().start);
    for (i, u) in us.iter().enumerate() {
        let mut du = vec![0f32; h];
        for j in 0..n {
            let s = pair_score(w, u, &hs[j], bias[j]);
            let y = if g.edges[i][j] { 1.0 } else { 0.0 };
            let p = sigmoid(s);
            loss -= scale * (y * p.max(1e-7).ln() + (1.0 - y) * (1.0 - p).max(1e-7).ln());
            let gs = scale * (p - y);
            grad[b0 + j] += gs;
            for k in 0..h {
                grad[w0 + k] += gs * u[k] * hs[j][k];
                du[k] += gs * w[k] * hs[j][k];
                dh[j][k] += gs * w[k] * u[k];
            }
        }
        // Back through tanh into Q and the query bias.
        for k in 0..h {
            let dpre = du[k] * (1.0 - u[k] * u[k]);
            if dpre == 0.0 {
                continue;
            }
            dqb[k] += dpre;
            let row = &mut grad[q0 + k * d..q0 + (k + 1) * d];
            for (gq, xv) in row.iter_mut().zip(&g.queries[i]) {
                *gq += dpre * xv;
            }
        }
    }
    let (t0, e0) = (net.t().start, net.e().start);
    for k in 0..h {
        grad[e0 + k] += dqb[k];
        for (gt, tv) in grad[t0 + k * d..t0 + (k + 1) * d].iter_mut().zip(g.task) {
            *gt += dqb[k] * tv;
        }
    }
    let (a0, bb0, c0) = (net.a().start, net.b().start, net.c().start);
    for j in 0..n {
        for k in 0..h {
            let dpre = dh[j][k] * (1.0 - hs[j][k] * hs[j][k]);
            grad[c0 + k] += dpre;
            for (ga, dv) in grad[a0 + k * d..a0 + (k + 1) * d].iter_mut().zip(&g.descriptions[j]) {
                *ga += dpre * dv;
            }
            for (gb, av) in grad[bb0 + k * d..bb0 + (k + 1) * d].iter_mut().zip(&agg[j]) {
                *gb += dpre * av;
            }
        }
    }
    (loss, grad)
}

/// Full-batch Adam for `epochs` steps; returns the loss before and after.
fn train(net: &mut Net, g: &Graph, h: &Hyper) -> (f32, f32) {
    let agg = aggregate(g);
    let mut m = vec![0f32; net.p.len()];
    let mut v = vec![0f32; net.p.len()];
    let mut first = None;
    for t in 1..=h.epochs {
        let (loss, grad) = loss_and_grad(net, g, &agg);
        first.get_or_insert(loss);
        let c1 = 1.0 - BETA1.powi(t as i32);
        let c2 = 1.0 - BETA2.powi(t as i32);
        for (((p, gr), m), v) in net.p.iter_mut().zip(&grad).zip(&mut m).zip(&mut v) {
            *m = BETA1 * *m + (1.0 - BETA1) * gr;
            *v = BETA2 * *v + (1.0 - BETA2) * gr * gr;
            *p -= h.lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
        }
    }
    let last = loss_and_grad(net, g, &agg).0;
    (first.unwrap_or(last), last)
}

struct Route {
    member: usize,
    how: &'static str,
    scores: Vec<(String, f32)>,
}

fn route(req: &Request, pool: &[ModelInfo], gens: &[ModelInfo], h: &Hyper) -> Result<Route, Error> {
    let fallback = |why: String| {
        trace(
            Some(&gens[0].id),
            "router",
            format!("{why}: falling back to the first generative member {}", gens[0].id),
        );
        Route {
            member: 0,
            how: "fallback",
            scores: Vec::new(),
        }
    };
    let Some(f) = state::load::<Fitted>(STATE_VERSION, req.state.as_deref())? else {
        return Ok(fallback("no fit state (run fit to train the graph)".into()));
    };
    if let Some(id) = h.embedder.as_deref() {
        if id != f.embedder {
            return Err(Error::InvalidParams(format!(
                "config `embedder` = `{id}` differs from the one the graph was fitted with ({}); run fit again",
                f.embedder
            )));
        }
    }
    if !pool.iter().any(|m| m.id == f.embedder) {
        return Ok(fallback(format!("the fitted embedder {} is not granted", f.embedder)));
    }
    let sound = f.query_weights.len() == f.hidden * f.dim
        && f.query_bias.len() == f.hidden
        && f.score_weights.len() == f.hidden
        && f.score_bias.len() == f.members.len()
        && f.member_nodes.len() == f.members.len()
        && f.member_nodes.iter().all(|m| m.len() == f.hidden);
    if !sound {
        return Ok(fallback("the stored graph is malformed".into()));
    }
    let x = match embed(&f.embedder, &[question(&req.input)]) {
        Ok(mut v) if v.len() == 1 && v[0].len() == f.dim => v.remove(0),
        Ok(_) => return Ok(fallback(format!("{} returned an unusable embedding", f.embedder))),
        Err(e) => return Ok(fallback(format!("embedding the question failed ({e})"))),
    };
    let u = layer(&f.query_weights, &x, &f.query_bias);
    // Score the fitted members that are still granted.
    let scores: Vec<(usize, String, f32)> = f
        .members
        .iter()
        .enumerate()
        .filter_map(|(j, id)| {
            let i = gens.iter().position(|m| &m.id == id)?;
            Some((
                i,
                id.clone(),
                pair_score(&f.score_weights, &u, &f.member_nodes[j], f.score_bias[j]),
            ))
        })
        .collect();
    let Some(best) = scores.iter().fold(None::<&(usize, String, f32)>, |b, s| match b {
        Some(b) if b.2 >= s.2 => Some(b),
        _ => Some(s),
    }) else {
        return Ok(fallback("no member the graph knows is granted".into()));
    };
    let shown: Vec<String> = scores.iter().map(|s| format!("{}={:.4}", s.1, s.2)).collect();
    trace(
        Some(&f.embedder),
        "router",
        format!(
            "graph scores for the question's embedding: {}; chose {} (highest)",
            shown.join(", "),
            best.1
        ),
    );
    Ok(Route {
        member: best.0,
        how: "graph",
        scores: scores.iter().map(|s| (s.1.clone(), s.2)).collect(),
    })
}

impl Strategy for GraphRouter {
    fn run(req: Request) -> Result<Response, Error> {
        let h = hyper(&Config::from_pairs(req.config.clone()))?;
        let pool = models();
        let gens: Vec<ModelInfo> = pool
            .iter()
            .filter(|m| m.capabilities.iter().any(|c| c == "generate"))
            .cloned()
            .collect();
        if gens.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let r = route(&req, &pool, &gens, &h)?;
        let chosen = &gens[r.member];
        let params = GenParams {
            seed: Some(req.params.seed.unwrap_or(0)),
            ..req.params.clone()
        };
        let answer = generate(&chosen.id, &req.input, &params)?;
        trace(
            Some(&chosen.id),
            "answerer",
            format!("answered ({} tokens)", answer.usage.completion_tokens),
        );
        let mut annotations = vec![
            ("routed_to".to_string(), chosen.id.clone()),
            ("router".to_string(), r.how.to_string()),
        ];
        if !r.scores.is_empty() {
            let s: Vec<String> = r.scores.iter().map(|(m, s)| format!("{m}={s:.4}")).collect();
            annotations.push(("scores".into(), s.join("; ")));
        }
        Ok(Response {
            text: answer.text,
            annotations,
        })
    }

    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        let h = hyper(&config)?;
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let pool = models();
        let gens: Vec<ModelInfo> = pool
            .iter()
            .filter(|m| m.capabilities.iter().any(|c| c == "generate"))
            .cloned()
            .collect();
        if gens.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let embedder = pick_embedder(&pool, h.embedder.as_deref(), "graph-router")?;
        let scores = evaluate(&dev, &gens, h.dev_max_tokens);
        let edges: Vec<Vec<bool>> = (0..dev.len())
            .map(|i| {
                scores
                    .iter()
                    .map(|s| s.correct.get(i).copied().unwrap_or(false))
                    .collect()
            })
            .collect();
        // One embedding pass: the questions, then each member's description,
        // then the task.
        let task = h.task.clone().unwrap_or_else(|| question(&dev[0].input));
        let mut texts: Vec<String> = dev.iter().map(|e| question(&e.input)).collect();
        texts.extend(gens.iter().map(|m| {
            if m.description.trim().is_empty() {
                m.id.clone()
            } else {
                m.description.clone()
            }
        }));
        texts.push(task);
        let mut emb = embed_all(&embedder.id, &texts)?;
        let task_emb = emb.pop().unwrap_or_default();
        let descriptions = emb.split_off(dev.len());
        let queries = emb;
        let dim = task_emb.len();
        let graph = Graph {
            queries: &queries,
            descriptions: &descriptions,
            task: &task_emb,
            edges: &edges,
        };
        let mut net = Net::new(h.hidden, dim, gens.len(), h.seed);
        let loss = train(&mut net, &graph, &h);
        let agg = aggregate(&graph);
        let fitted = Fitted {
            embedder: embedder.id.clone(),
            members: gens.iter().map(|m| m.id.clone()).collect(),
            hidden: h.hidden,
            dim,
            query_weights: net.p[net.q()].to_vec(),
            query_bias: net.query_bias(&task_emb),
            member_nodes: net.member_nodes(&descriptions, &agg),
            score_weights: net.p[net.w()].to_vec(),
            score_bias: net.p[net.bias()].to_vec(),
            ranking: ranking(&scores),
            loss,
        };
        let n_edges: usize = edges.iter().map(|e| e.iter().filter(|x| **x).count()).sum();
        trace(
            Some(&embedder.id),
            "fit",
            format!(
                "graph of {} queries, {} members, {n_edges} correct-answer edges; {} epochs of Adam (lr {}, hidden {}): loss {:.4} -> {:.4}",
                dev.len(),
                gens.len(),
                h.epochs,
                h.lr,
                h.hidden,
                loss.0,
                loss.1
            ),
        );
        state::save(STATE_VERSION, &fitted).map(Some)
    }
}

export_strategy!(GraphRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(epochs: u32) -> Hyper {
        Hyper {
            hidden: 4,
            lr: 0.05,
            epochs,
            seed: 1,
            task: None,
            dev_max_tokens: 1,
            embedder: None,
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let queries = vec![vec![0.6, 0.8, 0.0], vec![0.0, 0.6, 0.8], vec![0.8, 0.0, 0.6]];
        let descriptions = vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]];
        let task = vec![0.0, 1.0, 0.0];
        let edges = vec![vec![true, false], vec![false, true], vec![true, true]];
        let g = Graph {
            queries: &queries,
            descriptions: &descriptions,
            task: &task,
            edges: &edges,
        };
        let agg = aggregate(&g);
        let mut net = Net::new(4, 3, 2, 3);
        let (_, grad) = loss_and_grad(&net, &g, &agg);
        for i in (0..net.p.len()).step_by(5) {
            let orig = net.p[i];
            net.p[i] = orig + 1e-3;
            let up = loss_and_grad(&net, &g, &agg).0;
            net.p[i] = orig - 1e-3;
            let down = loss_and_grad(&net, &g, &agg).0;
            net.p[i] = orig;
            let numeric = (up - down) / 2e-3;
            assert!((numeric - grad[i]).abs() < 2e-3, "param {i}: {numeric} vs {}", grad[i]);
        }
    }

    #[test]
    fn training_lowers_the_loss_and_ranks_the_solver_first() {
        let queries = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0], vec![0.1, 0.9]];
        let descriptions = vec![vec![0.7, 0.7], vec![0.7, -0.7]];
        let task = vec![0.5, 0.5];
        let edges = vec![
            vec![true, false],
            vec![true, false],
            vec![false, true],
            vec![false, true],
        ];
        let g = Graph {
            queries: &queries,
            descriptions: &descriptions,
            task: &task,
            edges: &edges,
        };
        let mut net = Net::new(4, 2, 2, 1);
        let (before, after) = train(&mut net, &g, &hyper(300));
        assert!(after < before * 0.5, "{before} -> {after}");
        let qb = net.query_bias(&task);
        let hs = net.member_nodes(&descriptions, &aggregate(&g));
        let w = &net.p[net.w()];
        let b = &net.p[net.bias()];
        for (x, e) in queries.iter().zip(&edges) {
            let u = layer(&net.p[net.q()], x, &qb);
            let s0 = pair_score(w, &u, &hs[0], b[0]);
            let s1 = pair_score(w, &u, &hs[1], b[1]);
            assert_eq!(s0 > s1, e[0]);
        }
    }
}

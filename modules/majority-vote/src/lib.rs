//! majority-vote: sample several answers across the pool, extract the final
//! answer from each, and return the most common one (self-consistency when
//! the pool has one member). See README.md.

use tessera_sdk::answer::{extract, normalize, vote};
use tessera_sdk::*;

struct MajorityVote;

/// Dev accuracy per member, as `fit` persists it: one `id<TAB>correct<TAB>total`
/// line per member.
fn parse_state(state: &[u8]) -> Vec<(String, u32, u32)> {
    String::from_utf8_lossy(state)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?.to_string(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Tie-break rank of each member: by dev accuracy when `fit` ran, else by
/// pool order (operators list pools best-first).
fn ranks(voters: &[ModelInfo], state: Option<&[u8]>) -> Vec<usize> {
    let acc = state.map(parse_state).unwrap_or_default();
    let score = |id: &str| {
        acc.iter()
            .find(|(m, _, _)| m == id)
            .map(|(_, c, t)| *c as f64 / (*t).max(1) as f64)
            .unwrap_or(-1.0)
    };
    let mut order: Vec<usize> = (0..voters.len()).collect();
    order.sort_by(|&a, &b| score(&voters[b].id).total_cmp(&score(&voters[a].id)).then(a.cmp(&b)));
    let mut rank = vec![0; voters.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    rank
}

impl Strategy for MajorityVote {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let k: u32 = cfg.parse("k", 5)?;
        if k == 0 || k > 64 {
            return Err(Error::InvalidParams(format!("k = {k}: use 1..=64 samples")));
        }
        let temperature: f32 = cfg.parse("temperature", req.params.temperature.unwrap_or(0.7))?;
        let top_p: f32 = cfg.parse("top_p", req.params.top_p.unwrap_or(0.9))?;
        let max_tokens: u32 = cfg.parse("max_tokens", req.params.max_tokens.unwrap_or(128))?;
        let seed = req.params.seed.unwrap_or(0);
        let voters = generators();
        if voters.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        // Round-robin the k samples over the members; each sample has its own
        // seed so that one member's samples differ but the run is repeatable.
        let jobs: Vec<Job> = (0..k as usize)
            .map(|i| Job {
                model: voters[i % voters.len()].id.clone(),
                input: req.input.clone(),
                params: GenParams {
                    max_tokens: Some(max_tokens),
                    temperature: Some(temperature),
                    top_p: Some(top_p),
                    top_k: req.params.top_k,
                    seed: Some(seed.wrapping_add(i as u64)),
                    stop: req.params.stop.clone(),
                },
            })
            .collect();
        let rank = ranks(&voters, req.state.as_deref());
        if let Some(state) = &req.state {
            let acc = parse_state(state);
            let shown: Vec<String> = acc.iter().map(|(m, c, t)| format!("{m} {c}/{t}")).collect();
            trace(None, "tie-break", format!("dev ranking from fit: {}", shown.join(", ")));
        }
        let results = fan_out(&jobs);
        let mut texts = Vec::new();
        let mut answers = Vec::new();
        let mut priority = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(g) => {
                    let a = extract(&g.text);
                    trace(Some(&g.model), "voter", format!("sample {i}: answered `{a}`"));
                    texts.push(g.text);
                    answers.push(a);
                    priority.push(rank[i % voters.len()]);
                }
                Err(e) => trace(Some(&jobs[i].model), "voter", format!("sample {i} failed: {e}")),
            }
        }
        let tally =
            vote(&answers, &priority).ok_or_else(|| Error::ModuleFailed("no sample produced an answer".into()))?;
        let agreement = tally.votes as f64 / answers.len().max(1) as f64;
        trace(
            None,
            "aggregator",
            format!("`{}` won with {}/{} votes", tally.answer, tally.votes, answers.len()),
        );
        let counts = tally
            .counts
            .iter()
            .map(|(a, n)| format!("{a}={n}"))
            .collect::<Vec<_>>()
            .join("; ");
        Ok(Response {
            text: texts[tally.winner].clone(),
            annotations: vec![
                ("answer".into(), tally.answer.clone()),
                ("agreement".into(), format!("{agreement:.2}")),
                ("votes".into(), format!("{}/{}", tally.votes, answers.len())),
                ("counts".into(), counts),
            ],
        })
    }

    /// Measures each member's greedy accuracy on the dev examples; `run`
    /// breaks ties in favour of the more accurate member.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        let max_tokens: u32 = config.parse("max_tokens", 128)?;
        let voters = generators();
        let mut state = String::new();
        for m in &voters {
            let jobs: Vec<Job> = dev
                .iter()
                .map(|e| Job {
                    model: m.id.clone(),
                    input: e.input.clone(),
                    params: GenParams {
                        max_tokens: Some(max_tokens),
                        temperature: Some(0.0),
                        ..Default::default()
                    },
                })
                .collect();
            let correct = fan_out(&jobs)
                .iter()
                .zip(&dev)
                .filter(|(r, e)| matches!(r, Ok(g) if normalize(&extract(&g.text)) == normalize(&e.answer)))
                .count();
            trace(
                Some(&m.id),
                "fit",
                format!("{correct}/{} dev answers correct", dev.len()),
            );
            state.push_str(&format!("{}\t{}\t{}\n", m.id, correct, dev.len()));
        }
        Ok(Some(state.into_bytes()))
    }
}

export_strategy!(MajorityVote);

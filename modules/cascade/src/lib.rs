//! cascade: members are tried cheapest first; each one's confidence on the
//! request decides whether its answer is kept or the request escalates to
//! the next; the last member always answers. `fit` picks the threshold that
//! maximises dev accuracy at the lowest cost. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::is_correct;
use tessera_sdk::*;

struct Cascade;

/// Format version of [`Fitted`]; bump when its shape changes.
const STATE_VERSION: u8 = 1;
/// A threshold no confidence reaches: every member escalates to the last.
const NEVER: f64 = 1.01;

/// What `fit` chose.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    threshold: f64,
    /// The cascade order the threshold was fitted for.
    order: Vec<String>,
    /// Dev items used, and the cascade's dev accuracy at `threshold`.
    items: u32,
    accuracy: f64,
    /// Mean parameters consulted per dev item at `threshold`.
    mean_cost: f64,
}

/// Where the threshold comes from: a number, or `auto` (fit's, else the
/// fallback).
enum Threshold {
    Fixed(f64),
    Auto,
}

struct Hyper {
    threshold: Threshold,
    fallback_threshold: f64,
    order: Vec<String>,
    top_k: u32,
    dev_max_tokens: u32,
    fit_max_items: usize,
}

fn threshold_value(key: &str, v: &str) -> Result<f64, Error> {
    match v.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && (0.0..=NEVER).contains(&t) => Ok(t),
        _ => Err(Error::InvalidParams(format!(
            "config `{key}` = `{v}`: use a number in [0, {NEVER}] ({NEVER}: always escalate)"
        ))),
    }
}

fn hyper(cfg: &Config) -> Result<Hyper, Error> {
    let threshold = match cfg.get("threshold").map(str::trim) {
        None | Some("") | Some("auto") => Threshold::Auto,
        Some(v) => Threshold::Fixed(threshold_value("threshold", v)?),
    };
    let fallback_threshold = threshold_value("fallback_threshold", cfg.get("fallback_threshold").unwrap_or("0.5"))?;
    let order = cfg
        .get("order")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let top_k: u32 = cfg.parse("top_k", 20)?;
    if !(1..=1000).contains(&top_k) {
        return Err(Error::InvalidParams(format!("config `top_k` = {top_k}: use 1..=1000")));
    }
    let dev_max_tokens: u32 = cfg.parse("dev_max_tokens", 16)?;
    if !(1..=1024).contains(&dev_max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `dev_max_tokens` = {dev_max_tokens}: use 1..=1024"
        )));
    }
    let fit_max_items: usize = cfg.parse("fit_max_items", 200)?;
    if fit_max_items == 0 {
        return Err(Error::InvalidParams("config `fit_max_items` = 0: use 1 or more".into()));
    }
    Ok(Hyper {
        threshold,
        fallback_threshold,
        order,
        top_k,
        dev_max_tokens,
        fit_max_items,
    })
}

/// The cascade: the configured order, else generative members by parameter
/// count, smallest first (pool order breaks ties).
fn cascade_order(pool: &[ModelInfo], h: &Hyper) -> Result<Vec<ModelInfo>, Error> {
    let gens: Vec<&ModelInfo> = pool
        .iter()
        .filter(|m| m.capabilities.iter().any(|c| c == "generate"))
        .collect();
    if gens.is_empty() {
        return Err(Error::ModuleFailed("no generative member was granted".into()));
    }
    if h.order.is_empty() {
        let mut order: Vec<ModelInfo> = gens.into_iter().cloned().collect();
        order.sort_by_key(|m| m.parameters);
        return Ok(order);
    }
    let mut order = Vec::new();
    for id in &h.order {
        let m = gens.iter().find(|m| &m.id == id).ok_or_else(|| {
            Error::InvalidParams(format!(
                "config `order` names `{id}`, which is not a granted generative member"
            ))
        })?;
        if order.iter().any(|o: &ModelInfo| &o.id == id) {
            return Err(Error::InvalidParams(format!("config `order` names `{id}` twice")));
        }
        order.push((*m).clone());
    }
    Ok(order)
}

/// The option letters of a multiple-choice question: consecutive lines that
/// start `A)`, `B)`, ... (at least two), else none.
fn option_letters(q: &str) -> Vec<char> {
    let mut letters = Vec::new();
    for line in q.lines() {
        let mut cs = line.trim_start().chars();
        if let (Some(c), Some(')')) = (cs.next(), cs.next()) {
            if c == (b'A' + letters.len().min(25) as u8) as char {
                letters.push(c);
            }
        }
    }
    if letters.len() >= 2 {
        letters
    } else {
        Vec::new()
    }
}

/// Confidence from the next-token distribution: the letters' probabilities
/// renormalised among themselves (a softmax over the letters' log-probs),
/// the largest share. A letter outside the top-k gets the smallest top-k
/// probability, an upper bound on its true mass; no letter at all is 0.
fn letter_confidence(top: &[TokenLogprob], letters: &[char]) -> f64 {
    let mut mass = vec![0f64; letters.len()];
    let mut seen = vec![false; letters.len()];
    for t in top {
        let s = t.text.trim().trim_start_matches(['▁', 'Ġ', '(']);
        let mut cs = s.chars();
        if let (Some(c), None) = (cs.next(), cs.next()) {
            if let Some(i) = letters.iter().position(|l| *l == c) {
                mass[i] += t.logprob.exp();
                seen[i] = true;
            }
        }
    }
    let found: f64 = mass.iter().sum();
    if found <= 0.0 {
        return 0.0;
    }
    let floor = top.iter().map(|t| t.logprob).fold(f64::INFINITY, f64::min).exp();
    let unseen = seen.iter().filter(|s| !**s).count() as f64 * floor;
    mass.iter().copied().fold(0.0, f64::max) / (found + unseen)
}

/// Confidence in a free-text answer: the geometric-mean token probability,
/// `exp(logprob / tokens)`, from `score`. An empty answer is 0.
fn text_confidence(model: &str, input: &Input, text: &str) -> Result<f64, Error> {
    if text.trim().is_empty() {
        return Ok(0.0);
    }
    let s = score(model, input, &[text.to_string()])?;
    match s.first() {
        Some(s) if s.tokens > 0 => Ok((s.logprob / s.tokens as f64).exp()),
        _ => Ok(0.0),
    }
}

/// One member's confidence on a request, for `run`: MCQ by next-token
/// letter probabilities (no answer written yet), otherwise by scoring its
/// greedy answer (which is returned to be reused).
fn confidence(
    m: &ModelInfo,
    input: &Input,
    letters: &[char],
    h: &Hyper,
    greedy: &GenParams,
) -> Result<(f64, Option<String>), Error> {
    if letters.is_empty() {
        let g = generate(&m.id, input, greedy)?;
        let c = text_confidence(&m.id, input, &g.text)?;
        Ok((c, Some(g.text)))
    } else {
        let top = next_token(&m.id, input, h.top_k)?;
        Ok((letter_confidence(&top, letters), None))
    }
}

impl Strategy for Cascade {
    fn run(req: Request) -> Result<Response, Error> {
        let h = hyper(&Config::from_pairs(req.config.clone()))?;
        let order = cascade_order(&models(), &h)?;
        let fitted = state::load::<Fitted>(STATE_VERSION, req.state.as_deref())?;
        let (threshold, source) = match (&h.threshold, &fitted) {
            (Threshold::Fixed(t), _) => (*t, "config"),
            (Threshold::Auto, Some(f)) => (f.threshold, "fit"),
            (Threshold::Auto, None) => (h.fallback_threshold, "fallback"),
        };
        let letters = option_letters(&question(&req.input));
        let seed = req.params.seed.unwrap_or(0);
        let params = GenParams {
            seed: Some(seed),
            ..req.params.clone()
        };
        let greedy = GenParams {
            temperature: Some(0.0),
            ..params.clone()
        };
        let kind = if letters.is_empty() {
            "mean token probability of the greedy answer"
        } else {
            "option-letter probability"
        };
        let mut confidences = Vec::new();
        let mut answer = None;
        for (k, m) in order.iter().enumerate() {
            if k + 1 == order.len() {
                trace(
                    Some(&m.id),
                    "tier",
                    format!("tier {}: last member, answers without a confidence check", k + 1),
                );
                break;
            }
            match confidence(m, &req.input, &letters, &h, &greedy) {
                Ok((c, text)) => {
                    confidences.push(format!("{}={c:.3}", m.id));
                    let accept = c >= threshold;
                    trace(
                        Some(&m.id),
                        "tier",
                        format!(
                            "tier {}: {kind} {c:.3} {} threshold {threshold:.3}: {}",
                            k + 1,
                            if accept { ">=" } else { "<" },
                            if accept { "accept" } else { "escalate" }
                        ),
                    );
                    if accept {
                        answer = Some((k, c, text));
                        break;
                    }
                }
                Err(e) => {
                    confidences.push(format!("{}=failed", m.id));
                    trace(
                        Some(&m.id),
                        "tier",
                        format!("tier {}: confidence failed ({e}): escalate", k + 1),
                    );
                }
            }
        }
        let (k, conf, text) = match answer {
            Some((k, c, Some(text))) => (k, Some(c), text),
            Some((k, c, None)) => (k, Some(c), generate(&order[k].id, &req.input, &params)?.text),
            None => {
                let k = order.len() - 1;
                (k, None, generate(&order[k].id, &req.input, &params)?.text)
            }
        };
        let who = &order[k].id;
        trace(
            Some(who),
            "answerer",
            format!("answered after {k} escalation{}", if k == 1 { "" } else { "s" }),
        );
        Ok(Response {
            text,
            annotations: vec![
                ("answered_by".into(), who.clone()),
                (
                    "confidence".into(),
                    conf.map_or_else(|| "unchecked".to_string(), |c| format!("{c:.3}")),
                ),
                ("escalations".into(), k.to_string()),
                ("threshold".into(), format!("{threshold:.3}")),
                ("threshold_source".into(), source.into()),
                (
                    "order".into(),
                    order.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(","),
                ),
                ("confidences".into(), confidences.join("; ")),
            ],
        })
    }

    /// Greedy answers of every member to the dev items (one fan-out), each
    /// non-last member's confidence on each item, then a sweep over every
    /// candidate threshold.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        let h = hyper(&config)?;
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let order = cascade_order(&models(), &h)?;
        let dev = &dev[..dev.len().min(h.fit_max_items)];
        let n = order.len();
        let greedy = GenParams {
            max_tokens: Some(h.dev_max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        };
        let jobs: Vec<Job> = order
            .iter()
            .flat_map(|m| {
                dev.iter().map(|e| Job {
                    model: m.id.clone(),
                    input: e.input.clone(),
                    params: greedy.clone(),
                })
            })
            .collect();
        let results = fan_out(&jobs);
        let mut failures = 0;
        // correct[k][i], conf[k][i] for member k (conf of the last is unused).
        let mut correct = vec![vec![false; dev.len()]; n];
        let mut conf = vec![vec![0f64; dev.len()]; n];
        for (k, m) in order.iter().enumerate() {
            for (i, e) in dev.iter().enumerate() {
                let Ok(g) = &results[k * dev.len() + i] else {
                    failures += 1;
                    continue;
                };
                correct[k][i] = is_correct(&g.text, e);
                if k + 1 == n {
                    continue;
                }
                let letters = option_letters(&question(&e.input));
                let c = if letters.is_empty() {
                    text_confidence(&m.id, &e.input, &g.text)
                } else {
                    next_token(&m.id, &e.input, h.top_k).map(|top| letter_confidence(&top, &letters))
                };
                match c {
                    Ok(c) => conf[k][i] = c,
                    Err(_) => failures += 1,
                }
            }
        }
        // Candidate thresholds: 0 (the cheapest always answers), every
        // observed confidence, and NEVER (the last always answers).
        let mut candidates: Vec<f64> = conf[..n - 1].iter().flatten().copied().collect();
        candidates.push(0.0);
        candidates.push(NEVER);
        candidates.sort_by(f64::total_cmp);
        candidates.dedup();
        let simulate = |t: f64| -> (usize, u64) {
            let mut right = 0;
            let mut cost = 0u64;
            for i in 0..dev.len() {
                for k in 0..n {
                    cost += order[k].parameters;
                    if k + 1 == n || conf[k][i] >= t {
                        right += correct[k][i] as usize;
                        break;
                    }
                }
            }
            (right, cost)
        };
        let mut best = (0.0, 0usize, u64::MAX);
        for &t in &candidates {
            let (right, cost) = simulate(t);
            // Most correct, then cheapest, then the lowest threshold.
            if right > best.1 || (right == best.1 && cost < best.2) {
                best = (t, right, cost);
            }
        }
        let accuracy = best.1 as f64 / dev.len() as f64;
        let singles: Vec<String> = order
            .iter()
            .zip(&correct)
            .map(|(m, c)| format!("{} {}/{}", m.id, c.iter().filter(|x| **x).count(), dev.len()))
            .collect();
        trace(
            None,
            "fit",
            format!(
                "threshold {:.3} over {} candidates: cascade {}/{} correct on dev (members alone: {}); {failures} failed calls",
                best.0,
                candidates.len(),
                best.1,
                dev.len(),
                singles.join(", ")
            ),
        );
        let fitted = Fitted {
            threshold: best.0,
            order: order.iter().map(|m| m.id.clone()).collect(),
            items: dev.len() as u32,
            accuracy,
            mean_cost: best.2 as f64 / dev.len() as f64,
        };
        state::save(STATE_VERSION, &fitted).map(Some)
    }
}

export_strategy!(Cascade);

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(text: &str, p: f64) -> TokenLogprob {
        TokenLogprob {
            token: 0,
            text: text.into(),
            logprob: p.ln(),
        }
    }

    #[test]
    fn finds_option_letters() {
        assert_eq!(option_letters("Q?\nA) x\nB) y\nC) z\nAnswer."), vec!['A', 'B', 'C']);
        assert!(option_letters("A) only one").is_empty());
        assert!(option_letters("What is 2+2?").is_empty());
    }

    #[test]
    fn letter_confidence_renormalises_over_letters() {
        let letters = ['A', 'B', 'C', 'D'];
        // B dominates; C and D are unseen and get the floor (0.1).
        let top = [tok("B", 0.6), tok(" A", 0.2), tok("The", 0.1)];
        let c = letter_confidence(&top, &letters);
        assert!((c - 0.6 / (0.8 + 0.2)).abs() < 1e-9, "{c}");
        assert_eq!(letter_confidence(&[tok("The", 0.9)], &letters), 0.0);
    }
}

//! trained-router: `fit` labels every dev question with the member that
//! answered it correctly (best dev rank first), embeds the questions with the
//! pool's embedding member and trains a softmax-regression classifier over
//! the embeddings; `run` embeds the question, the classifier picks a member,
//! that member answers. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{evaluate, ranking};
use tessera_sdk::embedding::{embed_all, pick_embedder};
use tessera_sdk::*;

struct TrainedRouter;

/// Format version of [`Fitted`]; bump when its shape changes.
const STATE_VERSION: u8 = 1;

/// What `fit` learns and `run` uses.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    /// The embedding member the classifier was trained on.
    embedder: String,
    /// The classes: generative members, in pool order at fit time.
    members: Vec<String>,
    /// One weight row per member, `dim` wide.
    weights: Vec<Vec<f32>>,
    /// One bias per member.
    bias: Vec<f32>,
    /// Members by dev accuracy, best first (the fallback order).
    ranking: Vec<String>,
    /// Dev accuracy per member, same order as `members`.
    accuracy: Vec<f64>,
    /// Dev examples labelled with each member, same order as `members`.
    labels: Vec<u32>,
    /// Share of dev examples whose label the trained classifier reproduces.
    train_accuracy: f64,
}

/// The hyperparameters, validated.
struct Hyper {
    epochs: u32,
    lr: f32,
    l2: f32,
    dev_max_tokens: u32,
    embedder: Option<String>,
}

fn hyper(cfg: &Config) -> Result<Hyper, Error> {
    let epochs: u32 = cfg.parse("epochs", 300)?;
    if !(1..=5000).contains(&epochs) {
        return Err(Error::InvalidParams(format!(
            "config `epochs` = {epochs}: use 1..=5000"
        )));
    }
    let lr: f32 = cfg.parse("lr", 0.5)?;
    if !lr.is_finite() || lr <= 0.0 || lr > 10.0 {
        return Err(Error::InvalidParams(format!(
            "config `lr` = {lr}: use a value in (0, 10]"
        )));
    }
    let l2: f32 = cfg.parse("l2", 0.001)?;
    if !l2.is_finite() || !(0.0..=1.0).contains(&l2) {
        return Err(Error::InvalidParams(format!(
            "config `l2` = {l2}: use a value in [0, 1]"
        )));
    }
    let dev_max_tokens: u32 = cfg.parse("dev_max_tokens", 16)?;
    if !(1..=1024).contains(&dev_max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `dev_max_tokens` = {dev_max_tokens}: use 1..=1024"
        )));
    }
    let embedder = cfg
        .get("embedder")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    Ok(Hyper {
        epochs,
        lr,
        l2,
        dev_max_tokens,
        embedder,
    })
}

/// Softmax of the classifier's logits for `x`.
fn predict(weights: &[Vec<f32>], bias: &[f32], x: &[f32]) -> Vec<f32> {
    let logits: Vec<f32> = weights
        .iter()
        .zip(bias)
        .map(|(w, b)| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b)
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Multinomial logistic regression by full-batch gradient descent from zero
/// weights (so the result depends on the data only): `epochs` steps of size
/// `lr` on the mean cross-entropy plus `l2 / 2 * |W|^2`.
fn train(x: &[Vec<f32>], y: &[usize], classes: usize, h: &Hyper) -> (Vec<Vec<f32>>, Vec<f32>) {
    let dim = x.first().map_or(0, Vec::len);
    let mut w = vec![vec![0f32; dim]; classes];
    let mut b = vec![0f32; classes];
    let n = x.len().max(1) as f32;
    for _ in 0..h.epochs {
        let mut gw = vec![vec![0f32; dim]; classes];
        let mut gb = vec![0f32; classes];
        for (xi, &yi) in x.iter().zip(y) {
            let p = predict(&w, &b, xi);
            for c in 0..classes {
                let g = p[c] - if c == yi { 1.0 } else { 0.0 };
                gb[c] += g;
                for (gwk, xk) in gw[c].iter_mut().zip(xi) {
                    *gwk += g * xk;
                }
            }
        }
        for c in 0..classes {
            for (wk, gk) in w[c].iter_mut().zip(&gw[c]) {
                *wk -= h.lr * (gk / n + h.l2 * *wk);
            }
            b[c] -= h.lr * gb[c] / n;
        }
    }
    (w, b)
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// The route `run` takes: a member index into `gens`, how it was chosen, and
/// the classifier's probability for it when the classifier chose.
struct Route {
    member: usize,
    how: &'static str,
    probability: Option<f32>,
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
            probability: None,
        }
    };
    let Some(fitted) = state::load::<Fitted>(STATE_VERSION, req.state.as_deref())? else {
        return Ok(fallback("no fit state (run fit to train the classifier)".into()));
    };
    // The classifier only makes sense over the embedder it was trained on.
    let embedder = match h.embedder.as_deref() {
        Some(id) if id != fitted.embedder => {
            return Err(Error::InvalidParams(format!(
                "config `embedder` = `{id}` differs from the one the classifier was fitted with ({}); run fit again",
                fitted.embedder
            )))
        }
        _ => fitted.embedder.clone(),
    };
    if !pool.iter().any(|m| m.id == embedder) {
        return Ok(fallback(format!("the fitted embedder {embedder} is not granted")));
    }
    let q = question(&req.input);
    let x = match embed(&embedder, &[q]) {
        Ok(mut v) if v.len() == 1 => v.remove(0),
        Ok(_) => return Ok(fallback(format!("{embedder} returned no embedding"))),
        Err(e) => return Ok(fallback(format!("embedding the question failed ({e})"))),
    };
    if fitted.weights.iter().any(|w| w.len() != x.len()) || fitted.bias.len() != fitted.weights.len() {
        return Ok(fallback(
            "the stored classifier does not match the embedding width".into(),
        ));
    }
    let p = predict(&fitted.weights, &fitted.bias, &x);
    // Best class whose member is still granted.
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let shown: Vec<String> = order
        .iter()
        .map(|&c| format!("{}={:.3}", fitted.members.get(c).map_or("?", String::as_str), p[c]))
        .collect();
    for &c in &order {
        let Some(id) = fitted.members.get(c) else { continue };
        if let Some(i) = gens.iter().position(|m| &m.id == id) {
            trace(
                Some(&embedder),
                "router",
                format!(
                    "softmax classifier over the question's embedding chose {id} (probabilities: {})",
                    shown.join(", ")
                ),
            );
            return Ok(Route {
                member: i,
                how: "classifier",
                probability: Some(p[c]),
            });
        }
    }
    Ok(fallback("no member the classifier knows is granted".into()))
}

impl Strategy for TrainedRouter {
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
        if let Some(p) = r.probability {
            annotations.push(("route_probability".into(), format!("{p:.3}")));
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
        let embedder = pick_embedder(&pool, h.embedder.as_deref(), "trained-router")?;
        // Label: among the members that answered correctly, the one with the
        // best dev accuracy; when none did, the best member overall.
        let scores = evaluate(&dev, &gens, h.dev_max_tokens);
        let rank = ranking(&scores);
        let rank_of = |i: usize| rank.iter().position(|id| *id == gens[i].id).unwrap_or(usize::MAX);
        let best = (0..gens.len()).min_by_key(|&i| rank_of(i)).unwrap_or(0);
        let labels: Vec<usize> = (0..dev.len())
            .map(|e| {
                (0..gens.len())
                    .filter(|&i| scores[i].correct.get(e).copied().unwrap_or(false))
                    .min_by_key(|&i| rank_of(i))
                    .unwrap_or(best)
            })
            .collect();
        let questions: Vec<String> = dev.iter().map(|e| question(&e.input)).collect();
        let x = embed_all(&embedder.id, &questions)?;
        let (weights, bias) = train(&x, &labels, gens.len(), &h);
        let reproduced = x
            .iter()
            .zip(&labels)
            .filter(|(xi, y)| argmax(&predict(&weights, &bias, xi)) == **y)
            .count();
        let mut counts = vec![0u32; gens.len()];
        for &l in &labels {
            counts[l] += 1;
        }
        let fitted = Fitted {
            embedder: embedder.id.clone(),
            members: gens.iter().map(|m| m.id.clone()).collect(),
            weights,
            bias,
            ranking: rank,
            accuracy: scores.iter().map(|s| s.accuracy()).collect(),
            labels: counts,
            train_accuracy: reproduced as f64 / dev.len() as f64,
        };
        let spread: Vec<String> = fitted
            .members
            .iter()
            .zip(&fitted.labels)
            .map(|(m, c)| format!("{m}={c}"))
            .collect();
        trace(
            Some(&embedder.id),
            "fit",
            format!(
                "softmax classifier trained on {} embedded dev questions ({} epochs, lr {}); labels: {}; reproduces {reproduced}/{} labels",
                dev.len(),
                h.epochs,
                h.lr,
                spread.join(", "),
                dev.len()
            ),
        );
        state::save(STATE_VERSION, &fitted).map(Some)
    }
}

export_strategy!(TrainedRouter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_separates_two_clusters() {
        let x = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0], vec![0.1, 0.9]];
        let y = vec![0, 0, 1, 1];
        let h = Hyper {
            epochs: 200,
            lr: 0.5,
            l2: 0.0,
            dev_max_tokens: 1,
            embedder: None,
        };
        let (w, b) = train(&x, &y, 2, &h);
        for (xi, yi) in x.iter().zip(&y) {
            assert_eq!(argmax(&predict(&w, &b, xi)), *yi);
        }
        // Deterministic: same data, same weights.
        assert_eq!(train(&x, &y, 2, &h), (w, b));
    }
}

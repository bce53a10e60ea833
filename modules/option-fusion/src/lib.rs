//! option-fusion: answer a multiple-choice question by pooling every
//! member's likelihood of each option's text; `fit` searches the members'
//! weights on dev. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::{choice, letter};
use tessera_sdk::dev::pick_list;
use tessera_sdk::mcq::{self, Question};
use tessera_sdk::pso::Swarm;
use tessera_sdk::rand::Rng;
use tessera_sdk::*;

struct OptionFusion;

/// State format version.
const STATE: u8 = 1;

/// What `fit` keeps: one weight per member, found on dev.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    models: Vec<String>,
    weights: Vec<f64>,
    /// Each member's own dev accuracy (same order).
    member_accuracy: Vec<f64>,
    /// The fused dev accuracy with `weights`.
    dev_accuracy: f64,
    dev_size: usize,
}

/// The granted members that can score, or those config `models` lists.
fn scorers(cfg: &Config) -> Result<Vec<ModelInfo>, Error> {
    let pool: Vec<ModelInfo> = models()
        .into_iter()
        .filter(|m| m.capabilities.iter().any(|c| c == "score"))
        .collect();
    let picked = pick_list(cfg, "models", &pool)?;
    if picked.is_empty() {
        return Err(Error::ModuleFailed(
            "option-fusion needs members that can score; none was granted".into(),
        ));
    }
    Ok(picked)
}

/// One member's per-byte log-likelihood of every option of `q`.
fn option_scores(member: &str, q: &Question) -> Result<Vec<f64>, Error> {
    let scored = score(
        member,
        &Input::Prompt(mcq::prompt(&q.text)),
        &mcq::continuations(&q.options),
    )?;
    if scored.len() != q.options.len() {
        return Err(Error::ModuleFailed(format!(
            "{member} scored {} continuations for {} options",
            scored.len(),
            q.options.len()
        )));
    }
    Ok(scored
        .iter()
        .zip(&q.options)
        .map(|(s, o)| mcq::per_byte(s.logprob, o))
        .collect())
}

/// The weighted mean of the members' option scores (a weighted
/// log-linear pool: the product of the members' option likelihoods, each
/// raised to its weight). Members without scores (their call failed) and
/// members of weight 0 are left out; `None` when nobody is left.
fn fuse(scores: &[Option<Vec<f64>>], weights: &[f64]) -> Option<Vec<f64>> {
    let n = scores.iter().flatten().map(Vec::len).next()?;
    let mut total = vec![0.0; n];
    let mut mass = 0.0;
    for (s, &w) in scores.iter().zip(weights) {
        let Some(s) = s else { continue };
        if w <= 0.0 || s.len() != n {
            continue;
        }
        for (t, x) in total.iter_mut().zip(s) {
            *t += w * x;
        }
        mass += w;
    }
    (mass > 0.0).then(|| total.into_iter().map(|t| t / mass).collect())
}

/// Fused dev accuracy of `weights` over the scored dev set.
fn accuracy(table: &[(Vec<Option<Vec<f64>>>, usize)], weights: &[f64]) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    let right = table
        .iter()
        .filter(|(scores, gold)| fuse(scores, weights).and_then(|f| mcq::pick(&f)) == Some(*gold))
        .count();
    right as f64 / table.len() as f64
}

/// Config `weights`: one number >= 0 per member, not all 0.
fn configured_weights(cfg: &Config, members: &[ModelInfo]) -> Result<Option<Vec<f64>>, Error> {
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let what = format!("member ({})", ids.join(", "));
    let Some(w) = cfg.numbers("weights", members.len(), &what)? else {
        return Ok(None);
    };
    if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().all(|x| *x == 0.0) {
        let raw = cfg.get("weights").unwrap_or_default();
        return Err(config::invalid(
            "weights",
            raw,
            "weights must be finite, >= 0 and not all 0",
        ));
    }
    Ok(Some(w))
}

/// The question and options of a dev example: its `choices`, and its text
/// parsed from the prompt (the whole prompt when it does not parse).
fn dev_question(e: &Example) -> Question {
    let prompt = question(&e.input);
    let text = mcq::parse(&prompt).map(|q| q.text).unwrap_or(prompt);
    Question {
        text,
        options: e.choices.clone(),
    }
}

impl Strategy for OptionFusion {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let prompt = question(&req.input);
        let q = mcq::parse(&prompt).ok_or_else(|| {
            Error::Unsupported(
                "option-fusion answers multiple-choice prompts: the question, then one option per line \
                 labelled `A) `, `B) `, ... in order; this prompt has no such options"
                    .into(),
            )
        })?;
        let members = scorers(&cfg)?;
        let fitted: Option<Fitted> = state::load(STATE, req.state.as_deref())?;
        let (weights, from) = match configured_weights(&cfg, &members)? {
            Some(w) => (w, "config"),
            None => match &fitted {
                Some(f) => {
                    let w: Vec<f64> = members
                        .iter()
                        .map(|m| f.models.iter().position(|id| *id == m.id).map_or(0.0, |i| f.weights[i]))
                        .collect();
                    if w.iter().any(|x| *x > 0.0) {
                        (w, "fit")
                    } else {
                        (vec![1.0; members.len()], "uniform (fit named none of these members)")
                    }
                }
                None => (vec![1.0; members.len()], "uniform"),
            },
        };
        let mut scores: Vec<Option<Vec<f64>>> = Vec::with_capacity(members.len());
        let mut picks = Vec::new();
        for (m, &w) in members.iter().zip(&weights) {
            if w <= 0.0 {
                scores.push(None);
                continue;
            }
            match option_scores(&m.id, &q) {
                Ok(s) => {
                    let p = mcq::pick(&s).unwrap_or(0);
                    trace(
                        Some(&m.id),
                        "scorer",
                        format!("weight {w:.3}; picks {} ({:.3} nats/byte)", letter(p), s[p]),
                    );
                    picks.push((m.id.clone(), p));
                    scores.push(Some(s));
                }
                Err(e) => {
                    trace(Some(&m.id), "scorer", format!("failed: {e}"));
                    scores.push(None);
                }
            }
        }
        let fused =
            fuse(&scores, &weights).ok_or_else(|| Error::ModuleFailed("no member could score the options".into()))?;
        let pick = mcq::pick(&fused).ok_or_else(|| Error::ModuleFailed("the fused scores are not numbers".into()))?;
        let agree = picks.iter().filter(|(_, p)| *p == pick).count();
        trace(
            None,
            "fusion",
            format!(
                "weights from {from}; {} wins, {agree}/{} members pick it alone",
                letter(pick),
                picks.len()
            ),
        );
        let show = |v: &[f64]| {
            v.iter()
                .enumerate()
                .map(|(i, x)| format!("{}={x:.4}", letter(i)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        Ok(Response {
            text: format!("{}) {}", letter(pick), q.options[pick]),
            annotations: vec![
                ("answer".into(), letter(pick).to_string()),
                ("option".into(), q.options[pick].clone()),
                ("fused".into(), show(&fused)),
                (
                    "picks".into(),
                    picks
                        .iter()
                        .map(|(m, p)| format!("{m}={}", letter(*p)))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                (
                    "weights".into(),
                    members
                        .iter()
                        .zip(&weights)
                        .map(|(m, w)| format!("{}={w:.3}", m.id))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                ("weights_from".into(), from.to_string()),
                (
                    "agreement".into(),
                    format!("{:.2}", agree as f64 / picks.len().max(1) as f64),
                ),
            ],
        })
    }

    /// Scores every dev option with every member once, then searches the
    /// weights by particle swarm on those scores (no further host calls).
    /// Uniform weights and each member alone are starting particles, and
    /// ties keep the earlier, so the fit is never worse on dev than the
    /// unweighted pool or the best single member.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        let members = scorers(&cfg)?;
        let mut table = Vec::new();
        for (i, e) in dev.iter().enumerate() {
            if e.choices.len() < 2 {
                continue;
            }
            let Some(gold) = choice(&e.answer, &e.choices) else {
                trace(
                    None,
                    "fit",
                    format!("dev example {i}: answer `{}` names no option; skipped", e.answer),
                );
                continue;
            };
            let q = dev_question(e);
            let scores: Vec<Option<Vec<f64>>> = members
                .iter()
                .map(|m| match option_scores(&m.id, &q) {
                    Ok(s) => Some(s),
                    Err(err) => {
                        trace(Some(&m.id), "fit", format!("dev example {i} failed: {err}"));
                        None
                    }
                })
                .collect();
            table.push((scores, gold));
        }
        if table.is_empty() {
            return Err(Error::InvalidParams(
                "option-fusion fits on multiple-choice dev examples (with choices and a gold option); none given"
                    .into(),
            ));
        }
        let d = members.len();
        let member_accuracy: Vec<f64> = (0..d)
            .map(|m| {
                let mut one = vec![0.0; d];
                one[m] = 1.0;
                let a = accuracy(&table, &one);
                trace(
                    Some(&members[m].id),
                    "fit",
                    format!("alone: {:.3} on {} dev items", a, table.len()),
                );
                a
            })
            .collect();
        let population: usize = cfg.parse_within("population", 8, 1..=64, "use 1..=64 particles")?;
        let swarm = Swarm {
            bounds: Some((0.0, 1.0)),
            rounds: 10,
            ..Swarm::default()
        }
        .configured(&cfg, 100)?;
        let mut rng = Rng::new(cfg.parse("seed", 0u64)?);
        let mut start = vec![vec![1.0; d]];
        for m in 0..d {
            let mut one = vec![0.0; d];
            one[m] = 1.0;
            start.push(one);
        }
        while start.len() < population.max(d + 1) {
            start.push((0..d).map(|_| rng.f64()).collect());
        }
        let velocity = start
            .iter()
            .map(|_| (0..d).map(|_| rng.range(-0.2, 0.2)).collect())
            .collect();
        let found = swarm.search(
            &mut rng,
            start,
            velocity,
            |_, _, w| {
                Ok(if w.iter().all(|x| *x <= 0.0) {
                    0.0
                } else {
                    accuracy(&table, w)
                })
            },
            |round, _, best| trace(None, "fit", format!("round {round}: best fused dev accuracy {best:.3}")),
        )?;
        let fitted = Fitted {
            models: members.iter().map(|m| m.id.clone()).collect(),
            weights: found.position,
            member_accuracy,
            dev_accuracy: found.fitness,
            dev_size: table.len(),
        };
        trace(
            None,
            "fit",
            format!(
                "weights {}; fused dev accuracy {:.3} (best member alone {:.3})",
                fitted
                    .models
                    .iter()
                    .zip(&fitted.weights)
                    .map(|(m, w)| format!("{m}={w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                fitted.dev_accuracy,
                fitted.member_accuracy.iter().cloned().fold(0.0, f64::max)
            ),
        );
        state::save(STATE, &fitted).map(Some)
    }
}

export_strategy!(OptionFusion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuses_by_weighted_mean_and_skips_the_missing() {
        let s = vec![Some(vec![-1.0, -3.0]), None, Some(vec![-3.0, -1.0])];
        assert_eq!(fuse(&s, &[1.0, 1.0, 1.0]), Some(vec![-2.0, -2.0]));
        assert_eq!(fuse(&s, &[3.0, 1.0, 1.0]), Some(vec![-1.5, -2.5]));
        assert_eq!(fuse(&s, &[0.0, 1.0, 0.0]), None);
        assert_eq!(fuse(&[None], &[1.0]), None);
    }

    #[test]
    fn dev_accuracy_counts_fused_picks() {
        // Member 0 is right on item 0, member 1 on item 1; together (equal
        // weights) item 1 goes to member 1's stronger preference.
        let table = vec![
            (vec![Some(vec![-1.0, -1.2]), Some(vec![-1.1, -1.0])], 0),
            (vec![Some(vec![-1.0, -1.2]), Some(vec![-3.0, -1.0])], 1),
        ];
        assert_eq!(accuracy(&table, &[1.0, 0.0]), 0.5);
        assert_eq!(accuracy(&table, &[0.0, 1.0]), 0.5);
        assert_eq!(accuracy(&table, &[1.0, 1.0]), 1.0);
    }
}

//! option-fusion: answer a multiple-choice question by pooling every
//! member's likelihood of each option's text, optionally calibrated against
//! how likely each option is as an answer at all; `fit` searches the
//! members' weights (and calibration strengths) on dev. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::{choice, letter};
use tessera_sdk::dev::pick_list;
use tessera_sdk::mcq::{self, Question};
use tessera_sdk::pso::Swarm;
use tessera_sdk::rand::Rng;
use tessera_sdk::*;

struct OptionFusion;

/// State format version (2: calibration strengths added).
const STATE: u8 = 2;

/// What `fit` keeps: one weight and one calibration strength per member,
/// found on dev.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    models: Vec<String>,
    weights: Vec<f64>,
    /// Calibration strength per member (same order), 0 = none.
    strengths: Vec<f64>,
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

/// How option scores are calibrated against the domain premise
/// ([`mcq::DOMAIN_PROMPT`]), config `calibrate`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Calibrate {
    /// Raw per-byte likelihoods (the default; the harness's `--mcq option`).
    Off,
    /// The same strength for every member.
    Fixed(f64),
    /// A strength per member, searched by `fit` with the weights.
    Fit,
}

impl Calibrate {
    fn from_config(cfg: &Config) -> Result<Self, Error> {
        let raw = cfg.get("calibrate").map(str::trim).unwrap_or("");
        match raw {
            "" | "none" => Ok(Calibrate::Off),
            "fit" => Ok(Calibrate::Fit),
            v => match v.parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => Ok(if x == 0.0 { Calibrate::Off } else { Calibrate::Fixed(x) }),
                _ => Err(config::invalid(
                    "calibrate",
                    v,
                    "use `none`, `fit` or one strength in [0, 1] for every member",
                )),
            },
        }
    }

    /// Whether scores after the domain premise are needed.
    fn needs_premise(self) -> bool {
        self != Calibrate::Off
    }
}

/// One member's per-byte scores of a question's options: after the
/// question, and after the domain premise alone when calibration asks.
#[derive(Debug, Clone)]
struct MemberScores {
    cond: Vec<f64>,
    premise: Option<Vec<f64>>,
}

impl MemberScores {
    /// Per option, `cond - strength * premise`: at strength 1 the pointwise
    /// mutual information of option and question (per byte), at 0 the raw
    /// likelihood. Without premise scores, the raw likelihood.
    fn calibrated(&self, strength: f64) -> Vec<f64> {
        match &self.premise {
            Some(p) if strength > 0.0 => self.cond.iter().zip(p).map(|(c, p)| c - strength * p).collect(),
            _ => self.cond.clone(),
        }
    }
}

/// One member's scores of every option of `q`; with `premise`, also after
/// [`mcq::DOMAIN_PROMPT`].
fn option_scores(member: &str, q: &Question, premise: bool) -> Result<MemberScores, Error> {
    let cond = per_byte_scores(member, &mcq::prompt(&q.text), q)?;
    let premise = if premise {
        Some(per_byte_scores(member, mcq::DOMAIN_PROMPT, q)?)
    } else {
        None
    };
    Ok(MemberScores { cond, premise })
}

/// One member's per-byte log-likelihood of every option of `q` after `prompt`.
fn per_byte_scores(member: &str, prompt: &str, q: &Question) -> Result<Vec<f64>, Error> {
    let scored = score(
        member,
        &Input::Prompt(prompt.to_string()),
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

/// Every member's calibrated scores of one question (`None` where its
/// call failed).
fn calibrated(scores: &[Option<MemberScores>], strengths: &[f64]) -> Vec<Option<Vec<f64>>> {
    scores
        .iter()
        .zip(strengths)
        .map(|(s, &k)| s.as_ref().map(|s| s.calibrated(k)))
        .collect()
}

/// A scored dev set: every member's scores of each item, and its gold option.
type Table = [(Vec<Option<MemberScores>>, usize)];

/// Fused dev accuracy of `weights` and calibration `strengths` over the
/// scored dev set.
fn accuracy(table: &Table, weights: &[f64], strengths: &[f64]) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    let right = table
        .iter()
        .filter(|(scores, gold)| {
            fuse(&calibrated(scores, strengths), weights).and_then(|f| mcq::pick(&f)) == Some(*gold)
        })
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

/// What `fit` maximises, config `objective`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Objective {
    /// Dev accuracy, by particle swarm (the default).
    Accuracy,
    /// The dev likelihood of the gold options under a softmax of the fused
    /// scores, with an L2 penalty (`l2`), by projected gradient descent.
    Likelihood,
}

impl Objective {
    fn from_config(cfg: &Config) -> Result<Self, Error> {
        match cfg.get("objective").map(str::trim).unwrap_or("") {
            "" | "accuracy" => Ok(Objective::Accuracy),
            "likelihood" => Ok(Objective::Likelihood),
            v => Err(config::invalid("objective", v, "use `accuracy` or `likelihood`")),
        }
    }
}

/// One dev item as the likelihood fit sees it: per member (`None` where its
/// call failed) the option scores the weight multiplies and, with a fitted
/// calibration, the premise scores its strength multiplies.
struct Features {
    scaled: Vec<Option<Vec<f64>>>,
    premise: Vec<Option<Vec<f64>>>,
    gold: usize,
    options: usize,
}

/// Mean negative log-likelihood of the gold options (plus the L2 penalty)
/// at `theta` = weights, then (when `fit_premise`) premise coefficients,
/// and its gradient.
fn nll(items: &[Features], theta: &[f64], d: usize, fit_premise: bool, l2: f64) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; theta.len()];
    let mut total = 0.0;
    for it in items {
        let mut z = vec![0.0; it.options];
        for m in 0..d {
            if let Some(a) = &it.scaled[m] {
                for (zo, x) in z.iter_mut().zip(a) {
                    *zo += theta[m] * x;
                }
            }
            if fit_premise {
                if let Some(b) = &it.premise[m] {
                    for (zo, x) in z.iter_mut().zip(b) {
                        *zo -= theta[d + m] * x;
                    }
                }
            }
        }
        let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|x| (x - top).exp()).sum();
        let log_norm = top + sum.ln();
        total += log_norm - z[it.gold];
        // d(nll)/dz_o = p_o - [o == gold].
        let resid: Vec<f64> = z
            .iter()
            .enumerate()
            .map(|(o, x)| (x - log_norm).exp() - if o == it.gold { 1.0 } else { 0.0 })
            .collect();
        for m in 0..d {
            if let Some(a) = &it.scaled[m] {
                grad[m] += resid.iter().zip(a).map(|(r, x)| r * x).sum::<f64>();
            }
            if fit_premise {
                if let Some(b) = &it.premise[m] {
                    grad[d + m] -= resid.iter().zip(b).map(|(r, x)| r * x).sum::<f64>();
                }
            }
        }
    }
    let n = items.len().max(1) as f64;
    let penalty: f64 = theta.iter().map(|t| t * t).sum::<f64>() * l2 / 2.0;
    for (g, t) in grad.iter_mut().zip(theta) {
        *g = *g / n + l2 * t;
    }
    (total / n + penalty, grad)
}

/// Weights >= 0, and premise coefficients between 0 and their member's
/// weight (a calibration strength in [0, 1]).
fn project(theta: &mut [f64], d: usize, fit_premise: bool) {
    for m in 0..d {
        theta[m] = theta[m].max(0.0);
        if fit_premise {
            theta[d + m] = theta[d + m].clamp(0.0, theta[m]);
        }
    }
}

/// Weights and strengths by penalised maximum likelihood on the scored dev
/// set: projected gradient descent with a step that grows after a success
/// and halves after a failure, from uniform weights without calibration.
/// Returns (weights, strengths, start and end objective, steps taken).
fn fit_likelihood(table: &Table, mode: Calibrate, l2: f64, iterations: usize) -> (Vec<f64>, Vec<f64>, f64, f64, usize) {
    let d = table.first().map_or(0, |(s, _)| s.len());
    let fixed = match mode {
        Calibrate::Fixed(k) => k,
        _ => 0.0,
    };
    let fit_premise = mode == Calibrate::Fit;
    let items: Vec<Features> = table
        .iter()
        .map(|(scores, gold)| Features {
            scaled: scores.iter().map(|s| s.as_ref().map(|s| s.calibrated(fixed))).collect(),
            premise: scores
                .iter()
                .map(|s| s.as_ref().and_then(|s| s.premise.clone()))
                .collect(),
            gold: *gold,
            options: scores.iter().flatten().map(|s| s.cond.len()).next().unwrap_or(0),
        })
        .filter(|f| f.options > f.gold)
        .collect();
    let mut theta = vec![0.0; if fit_premise { 2 * d } else { d }];
    theta[..d].iter_mut().for_each(|w| *w = 1.0);
    let (start, mut grad) = nll(&items, &theta, d, fit_premise, l2);
    let mut value = start;
    let mut step = 1.0;
    let mut steps = 0;
    for _ in 0..iterations {
        let mut moved = false;
        for _ in 0..30 {
            let mut next: Vec<f64> = theta.iter().zip(&grad).map(|(t, g)| t - step * g).collect();
            project(&mut next, d, fit_premise);
            let (v, g) = nll(&items, &next, d, fit_premise, l2);
            if v < value {
                moved = value - v > 1e-10;
                theta = next;
                value = v;
                grad = g;
                step *= 1.5;
                break;
            }
            step /= 2.0;
        }
        if !moved {
            break;
        }
        steps += 1;
    }
    let weights = theta[..d].to_vec();
    let strengths = (0..d)
        .map(|m| match mode {
            Calibrate::Off => 0.0,
            Calibrate::Fixed(k) => k,
            Calibrate::Fit if weights[m] > 0.0 => theta[d + m] / weights[m],
            Calibrate::Fit => 0.0,
        })
        .collect();
    (weights, strengths, start, value, steps)
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
        let mode = Calibrate::from_config(&cfg)?;
        let fitted: Option<Fitted> = state::load(STATE, req.state.as_deref())?;
        // What fit found for each member of this request (0 for a member
        // it did not see).
        let fitted_of = |f: &Fitted, values: &[f64]| -> Vec<f64> {
            members
                .iter()
                .map(|m| {
                    f.models
                        .iter()
                        .position(|id| *id == m.id)
                        .and_then(|i| values.get(i).copied())
                        .unwrap_or(0.0)
                })
                .collect()
        };
        let (strengths, strengths_from) = match (mode, &fitted) {
            (Calibrate::Off, _) => (vec![0.0; members.len()], "none"),
            (Calibrate::Fixed(k), _) => (vec![k; members.len()], "config"),
            (Calibrate::Fit, Some(f)) => (fitted_of(f, &f.strengths), "fit"),
            (Calibrate::Fit, None) => (vec![0.0; members.len()], "none (not fitted)"),
        };
        let (weights, from) = match configured_weights(&cfg, &members)? {
            Some(w) => (w, "config"),
            None => match &fitted {
                Some(f) => {
                    let w = fitted_of(f, &f.weights);
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
        for ((m, &w), &k) in members.iter().zip(&weights).zip(&strengths) {
            if w <= 0.0 {
                scores.push(None);
                continue;
            }
            match option_scores(&m.id, &q, k > 0.0) {
                Ok(s) => {
                    let s = s.calibrated(k);
                    let p = mcq::pick(&s).unwrap_or(0);
                    trace(
                        Some(&m.id),
                        "scorer",
                        format!(
                            "weight {w:.3}, calibration {k:.3}; picks {} ({:.3} nats/byte)",
                            letter(p),
                            s[p]
                        ),
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
                    per_member(members.iter().map(|m| &m.id), &weights, "; "),
                ),
                ("weights_from".into(), from.to_string()),
                (
                    "calibration".into(),
                    per_member(members.iter().map(|m| &m.id), &strengths, "; "),
                ),
                ("calibration_from".into(), strengths_from.to_string()),
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
        let mode = Calibrate::from_config(&cfg)?;
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
            let scores: Vec<Option<MemberScores>> = members
                .iter()
                .map(|m| match option_scores(&m.id, &q, mode.needs_premise()) {
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
        let fixed = match mode {
            Calibrate::Fixed(k) => k,
            _ => 0.0,
        };
        let one_hot = |m: usize| {
            let mut one = vec![0.0; d];
            one[m] = 1.0;
            one
        };
        let member_accuracy: Vec<f64> = (0..d)
            .map(|m| {
                let a = accuracy(&table, &one_hot(m), &vec![fixed; d]);
                let calibrated = if mode == Calibrate::Fit {
                    format!("; fully calibrated {:.3}", accuracy(&table, &one_hot(m), &vec![1.0; d]))
                } else {
                    String::new()
                };
                trace(
                    Some(&members[m].id),
                    "fit",
                    format!("alone: {a:.3} on {} dev items{calibrated}", table.len()),
                );
                a
            })
            .collect();
        // A particle is the weights, then (when fit searches them) one
        // calibration strength per member.
        let searched = if mode == Calibrate::Fit { 2 * d } else { d };
        let split = |x: &[f64]| -> (Vec<f64>, Vec<f64>) {
            let weights = x[..d].to_vec();
            let strengths = if mode == Calibrate::Fit {
                x[d..].to_vec()
            } else {
                vec![fixed; d]
            };
            (weights, strengths)
        };
        let objective = Objective::from_config(&cfg)?;
        if objective == Objective::Likelihood {
            let l2: f64 = cfg.parse("l2", 0.01)?;
            if !(l2.is_finite() && l2 >= 0.0) {
                return Err(config::invalid("l2", l2, "use a penalty >= 0"));
            }
            let most: usize = cfg.parse_within("steps", 500, 1..=10_000, "use 1..=10000 steps")?;
            let (weights, strengths, start, end, steps) = fit_likelihood(&table, mode, l2, most);
            trace(
                None,
                "fit",
                format!("likelihood: mean loss {start:.4} -> {end:.4} in {steps} steps (l2 {l2})"),
            );
            let dev_accuracy = if weights.iter().any(|w| *w > 0.0) {
                accuracy(&table, &weights, &strengths)
            } else {
                0.0
            };
            return save_fit(&members, weights, strengths, member_accuracy, dev_accuracy, table.len());
        }
        let population: usize = cfg.parse_within("population", 8, 1..=64, "use 1..=64 particles")?;
        let swarm = Swarm {
            bounds: Some((0.0, 1.0)),
            rounds: 10,
            ..Swarm::default()
        }
        .configured(&cfg, 100)?;
        let mut rng = Rng::new(cfg.parse("seed", 0u64)?);
        // Uniform weights and each member alone start the search, raw
        // first and then fully calibrated, so that ties keep the simpler.
        let levels: &[f64] = if mode == Calibrate::Fit { &[0.0, 1.0] } else { &[0.0] };
        let mut start = Vec::new();
        for &k in levels {
            let strengths = if mode == Calibrate::Fit { vec![k; d] } else { Vec::new() };
            start.push([vec![1.0; d], strengths.clone()].concat());
            for m in 0..d {
                start.push([one_hot(m), strengths.clone()].concat());
            }
        }
        while start.len() < population {
            start.push((0..searched).map(|_| rng.f64()).collect());
        }
        let velocity = start
            .iter()
            .map(|_| (0..searched).map(|_| rng.range(-0.2, 0.2)).collect())
            .collect();
        let found = swarm.search(
            &mut rng,
            start,
            velocity,
            |_, _, x| {
                let (w, k) = split(x);
                Ok(if w.iter().all(|x| *x <= 0.0) {
                    0.0
                } else {
                    accuracy(&table, &w, &k)
                })
            },
            |round, _, best| trace(None, "fit", format!("round {round}: best fused dev accuracy {best:.3}")),
        )?;
        let (weights, strengths) = split(&found.position);
        save_fit(
            &members,
            weights,
            strengths,
            member_accuracy,
            found.fitness,
            table.len(),
        )
    }
}

/// `id=value` per member (three decimals), joined by `sep`: how weights and
/// strengths are shown in annotations and traces.
fn per_member<'a>(ids: impl IntoIterator<Item = &'a String>, values: &[f64], sep: &str) -> String {
    ids.into_iter()
        .zip(values)
        .map(|(m, v)| format!("{m}={v:.3}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// Traces what `fit` found and encodes it as the strategy's state.
fn save_fit(
    members: &[ModelInfo],
    weights: Vec<f64>,
    strengths: Vec<f64>,
    member_accuracy: Vec<f64>,
    dev_accuracy: f64,
    dev_size: usize,
) -> Result<Option<Vec<u8>>, Error> {
    let fitted = Fitted {
        models: members.iter().map(|m| m.id.clone()).collect(),
        weights,
        strengths,
        member_accuracy,
        dev_accuracy,
        dev_size,
    };
    let show = |values: &[f64]| per_member(&fitted.models, values, ", ");
    trace(
        None,
        "fit",
        format!(
            "weights {}; calibration {}; fused dev accuracy {:.3} (best member alone {:.3})",
            show(&fitted.weights),
            show(&fitted.strengths),
            fitted.dev_accuracy,
            fitted.member_accuracy.iter().cloned().fold(0.0, f64::max)
        ),
    );
    state::save(STATE, &fitted).map(Some)
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

    /// Raw scores only (no premise), as the uncalibrated fit keeps them.
    fn raw(cond: Vec<f64>) -> Option<MemberScores> {
        Some(MemberScores { cond, premise: None })
    }

    #[test]
    fn dev_accuracy_counts_fused_picks() {
        // Member 0 is right on item 0, member 1 on item 1; together (equal
        // weights) item 1 goes to member 1's stronger preference.
        let table = vec![
            (vec![raw(vec![-1.0, -1.2]), raw(vec![-1.1, -1.0])], 0),
            (vec![raw(vec![-1.0, -1.2]), raw(vec![-3.0, -1.0])], 1),
        ];
        let none = [0.0, 0.0];
        assert_eq!(accuracy(&table, &[1.0, 0.0], &none), 0.5);
        assert_eq!(accuracy(&table, &[0.0, 1.0], &none), 0.5);
        assert_eq!(accuracy(&table, &[1.0, 1.0], &none), 1.0);
    }

    #[test]
    fn calibration_subtracts_the_premise_by_strength() {
        // "yes" is likelier than "no" after any question; after this one
        // only by less than after the bare premise, so calibrated it loses.
        let s = MemberScores {
            cond: vec![-0.5, -0.7],
            premise: Some(vec![-0.2, -0.8]),
        };
        assert_eq!(mcq::pick(&s.calibrated(0.0)), Some(0));
        assert_eq!(s.calibrated(0.0), vec![-0.5, -0.7]);
        assert_eq!(mcq::pick(&s.calibrated(1.0)), Some(1));
        let half = s.calibrated(0.5);
        assert!((half[0] - -0.4).abs() < 1e-12 && (half[1] - -0.3).abs() < 1e-12);
        // Without premise scores a strength changes nothing.
        let r = raw(vec![-0.5, -0.7]).unwrap();
        assert_eq!(r.calibrated(1.0), vec![-0.5, -0.7]);
        let table = vec![(vec![Some(s)], 1)];
        assert_eq!(accuracy(&table, &[1.0], &[0.0]), 0.0);
        assert_eq!(accuracy(&table, &[1.0], &[1.0]), 1.0);
    }

    #[test]
    fn the_likelihood_gradient_matches_finite_differences() {
        let items = vec![
            Features {
                scaled: vec![Some(vec![-0.4, -0.9, -0.7]), Some(vec![-1.0, -0.2, -0.5])],
                premise: vec![Some(vec![-0.1, -0.8, -0.3]), None],
                gold: 1,
                options: 3,
            },
            Features {
                scaled: vec![None, Some(vec![-0.3, -0.6])],
                premise: vec![None, Some(vec![-0.2, -0.9])],
                gold: 0,
                options: 2,
            },
        ];
        let theta = [0.7, 1.3, 0.2, 0.4];
        let (v, g) = nll(&items, &theta, 2, true, 0.05);
        for i in 0..theta.len() {
            let mut up = theta;
            up[i] += 1e-6;
            let (vu, _) = nll(&items, &up, 2, true, 0.05);
            assert!(
                ((vu - v) / 1e-6 - g[i]).abs() < 1e-4,
                "coordinate {i}: {} vs {}",
                (vu - v) / 1e-6,
                g[i]
            );
        }
    }

    #[test]
    fn the_likelihood_fit_weights_the_informative_member_and_calibrates_a_biased_one() {
        // Member 0 prefers the gold option on three items of five and
        // option 2 otherwise; member 1 always prefers option 0 raw, but
        // its preference for the gold option shows once its premise
        // scores (a bias towards option 0) are taken out.
        let mut table = Vec::new();
        for i in 0..40 {
            let gold = i % 3;
            let mut mostly = vec![-1.0; 3];
            mostly[if i % 5 < 3 { gold } else { 2 }] = -0.6;
            let premise = vec![-0.3, -1.0, -1.0];
            let mut biased = premise.clone();
            biased[gold] += 0.3;
            table.push((
                vec![
                    Some(MemberScores {
                        cond: mostly,
                        premise: Some(vec![-1.0; 3]),
                    }),
                    Some(MemberScores {
                        cond: biased,
                        premise: Some(premise),
                    }),
                ],
                gold,
            ));
        }
        assert!(accuracy(&table, &[0.0, 1.0], &[0.0, 0.0]) < 0.5);
        let (w, k, start, end, steps) = fit_likelihood(&table, Calibrate::Off, 0.01, 500);
        assert!(end < start && steps > 0, "{start} -> {end}");
        assert!(w[0] > w[1], "raw, member 0 is the better one: {w:?}");
        assert_eq!(k, vec![0.0, 0.0]);
        let (w, k, _, end_cal, _) = fit_likelihood(&table, Calibrate::Fit, 0.01, 500);
        assert!(end_cal < end, "calibration fits better: {end_cal} vs {end}");
        assert!(
            w.iter().all(|x| *x >= 0.0) && k.iter().all(|x| (0.0..=1.0).contains(x)),
            "{w:?} {k:?}"
        );
        assert!(
            k[1] > 0.5 && w[1] > w[0],
            "the biased member is calibrated and trusted: {w:?} {k:?}"
        );
        assert_eq!(accuracy(&table, &w, &k), 1.0);
    }

    #[test]
    fn calibrate_config_reads_none_fit_and_a_strength() {
        let cfg = |v: &str| Config::from_pairs(vec![("calibrate".into(), v.into())]);
        assert_eq!(Calibrate::from_config(&Config::default()).unwrap(), Calibrate::Off);
        assert_eq!(Calibrate::from_config(&cfg("none")).unwrap(), Calibrate::Off);
        assert_eq!(Calibrate::from_config(&cfg("0")).unwrap(), Calibrate::Off);
        assert_eq!(Calibrate::from_config(&cfg(" fit ")).unwrap(), Calibrate::Fit);
        assert_eq!(Calibrate::from_config(&cfg("0.5")).unwrap(), Calibrate::Fixed(0.5));
        for bad in ["2", "-0.1", "pmi", "NaN"] {
            let e = Calibrate::from_config(&cfg(bad)).unwrap_err().to_string();
            assert!(e.contains("calibrate") && e.contains("fit"), "{bad}: {e}");
        }
    }
}

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
                    members
                        .iter()
                        .zip(&weights)
                        .map(|(m, w)| format!("{}={w:.3}", m.id))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                ("weights_from".into(), from.to_string()),
                (
                    "calibration".into(),
                    members
                        .iter()
                        .zip(&strengths)
                        .map(|(m, k)| format!("{}={k:.3}", m.id))
                        .collect::<Vec<_>>()
                        .join("; "),
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
        let fitted = Fitted {
            models: members.iter().map(|m| m.id.clone()).collect(),
            weights,
            strengths,
            member_accuracy,
            dev_accuracy: found.fitness,
            dev_size: table.len(),
        };
        let show = |values: &[f64]| {
            fitted
                .models
                .iter()
                .zip(values)
                .map(|(m, w)| format!("{m}={w:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
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

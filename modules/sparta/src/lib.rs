//! sparta: alignment by combat. In `fit`, members of the tribe duel on dev
//! prompts in pairs matched by reputation; every other member judges both
//! answers, its score weighted by its own reputation; reputations move as
//! Elo ratings do; each decided duel is a (winner, loser) preference pair,
//! and the trainees are DPO-trained on the pairs. After the last round the
//! trained member with the best dev accuracy is kept by name, and test
//! requests cost one call to it. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{evaluate, pick_list};
use tessera_sdk::rand::Rng;
use tessera_sdk::training::{self, is_trained, trainable, Params, Preference};
use tessera_sdk::*;

struct Sparta;

/// State format version.
const STATE: u8 = 1;
/// Every member's reputation at the start of a fit (Elo's usual origin).
const START_RATING: f64 = 1000.0;
/// Elo's step size: the most a rating moves in one duel.
const ELO_K: f64 = 32.0;
/// The score a judge gives when its verdict cannot be read (the reference
/// implementation's rule: an unparsable judgement is neutral).
const NEUTRAL: f64 = 5.0;

/// What `fit` learned: who answers, and the tribe's final reputations.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fitted {
    /// The member that answers test requests: the kept trained member, or
    /// an untrained one when nothing could be trained or kept.
    answerer: String,
    /// The pool member it was trained from (itself when untrained).
    base: String,
    /// Whether `answerer` is a trained member.
    trained: bool,
    /// Final reputation per tribe member (pool ids), best first.
    ratings: Vec<(String, f64)>,
    /// What fit did, for the trace.
    summary: String,
}

/// How judges give their verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Judging {
    /// The expected score under the judge's next-token distribution over
    /// the numbers 1..=10 (no ties, no unreadable replies from small models).
    Logprob,
    /// The reference's way: the judge writes `{"score": N}`; unreadable is 5.
    Generate,
}

/// Settings shared by `run` and `fit`.
#[derive(Debug, Clone)]
struct Settings {
    /// New tokens per duel answer (and per dev answer when ranking).
    answer_tokens: u32,
    /// Sampling temperature of duel answers.
    temperature: f32,
    judging: Judging,
    seed: u64,
}

impl Settings {
    fn read(cfg: &Config, seed: u64) -> Result<Settings, Error> {
        let judging = match cfg.get("judge").map(str::trim).unwrap_or("logprob") {
            "logprob" => Judging::Logprob,
            "generate" => Judging::Generate,
            other => return Err(config::invalid("judge", other, "use `logprob` or `generate`")),
        };
        Ok(Settings {
            answer_tokens: cfg.parse_within("answer_tokens", 64u32, 1..=1024, "use 1..=1024 tokens")?,
            temperature: cfg.parse_within("temperature", 0.7f32, 0.0..=2.0, "use a temperature in 0..=2")?,
            judging,
            seed: cfg.parse("seed", seed)?,
        })
    }
}

/// The training settings `fit` reads.
#[derive(Debug, Clone)]
struct Plan {
    iterations: u32,
    fit_max_items: usize,
    explore: f64,
    nearest: usize,
    tie_margin: f64,
    epochs: u32,
    max_steps: u32,
    batch: u32,
    lr: f64,
    beta: f64,
    keep: bool,
}

impl Plan {
    fn read(cfg: &Config) -> Result<Plan, Error> {
        Ok(Plan {
            iterations: cfg.parse_within("iterations", 3u32, 1..=10, "use 1..=10 rounds of duels and training")?,
            fit_max_items: cfg.parse_within("fit_max_items", 16usize, 1..=500, "use 1..=500 dev prompts")?,
            explore: cfg.parse_within("explore", 0.2, 0.0..=1.0, "use a probability in 0..=1")?,
            nearest: cfg.parse_within("nearest", 3usize, 1..=16, "use 1..=16 closest rivals")?,
            tie_margin: cfg.parse_within("tie_margin", 0.1, 0.0..=9.0, "use a score gap in 0..=9")?,
            epochs: cfg.parse_within("epochs", 1u32, 1..=10, "use 1..=10 passes over the pairs")?,
            max_steps: cfg.parse_within("max_steps", 2u32, 1..=400, "use 1..=400 optimizer steps per run")?,
            batch: cfg.parse_within("batch", 4u32, 1..=16, "use 1..=16 pairs per step")?,
            lr: cfg.parse_within("lr", 1e-4, 1e-7..=1e-2, "use a learning rate in 1e-7..=1e-2")?,
            beta: cfg.parse_within("beta", 0.1, 0.001..=10.0, "use a DPO beta in 0.001..=10")?,
            keep: cfg.parse("keep", true)?,
        })
    }

    /// The part of the plan that changes what a fit trains, for the kept
    /// member's name.
    fn line(&self, s: &Settings) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}/{}/{}/{}/{}/{}/{}/{:?}/{}",
            self.iterations,
            self.fit_max_items,
            self.explore,
            self.nearest,
            self.tie_margin,
            self.epochs,
            self.max_steps,
            self.batch,
            self.lr,
            self.beta,
            s.answer_tokens,
            s.temperature,
            s.judging,
            s.seed
        )
    }
}

/// The tribe: config `models`, else every granted contribution that
/// generates. Duels need two members and a third to judge them.
fn tribe(cfg: &Config) -> Result<Vec<ModelInfo>, Error> {
    let pool: Vec<ModelInfo> = generators().into_iter().filter(|m| !is_trained(m)).collect();
    let picked = pick_list(cfg, "models", &pool)?;
    if picked.len() < 3 {
        return Err(Error::InvalidParams(format!(
            "sparta needs at least three generative members (two duel, the others judge); {} granted or listed in `models`",
            picked.len()
        )));
    }
    Ok(picked)
}

/// The members that are DPO-trained: config `trainees` (`all` for every
/// trainable tribe member), else the smallest trainable one (one DPO run
/// of a 0.5B member per round does not fit a 600 s request on 2 cores).
fn trainees(cfg: &Config, tribe: &[ModelInfo]) -> Result<Vec<ModelInfo>, Error> {
    let can: Vec<ModelInfo> = tribe.iter().filter(|m| trainable(m)).cloned().collect();
    let picked = match cfg.get("trainees").map(str::trim).filter(|s| !s.is_empty()) {
        Some("all") => can,
        Some(_) => {
            let listed = pick_list(cfg, "trainees", tribe)?;
            if let Some(m) = listed.iter().find(|m| !trainable(m)) {
                return Err(config::invalid(
                    "trainees",
                    &m.id,
                    "only llama and qwen2 members can be trained: list those, or `all`",
                ));
            }
            listed
        }
        None => can.into_iter().min_by_key(|m| m.parameters).into_iter().collect(),
    };
    if picked.is_empty() {
        return Err(Error::InvalidParams(
            "sparta trains llama or qwen2 members and the tribe has none: set `models` or `trainees`".into(),
        ));
    }
    Ok(picked)
}

/// Elo's expected score of a player rated `a` against one rated `b`.
fn expected(a: f64, b: f64) -> f64 {
    1.0 / (1.0 + 10f64.powf((b - a) / 400.0))
}

/// Both ratings after a duel in which the first player scored `s` (1 win,
/// 0 loss, 0.5 tie).
fn elo(a: f64, b: f64, s: f64) -> (f64, f64) {
    let e = expected(a, b);
    (a + ELO_K * (s - e), b + ELO_K * ((1.0 - s) - (1.0 - e)))
}

/// The rival of member `a`: with probability `explore` any other member,
/// else one of the `nearest` others closest to it in rating (uniformly).
fn rival(a: usize, ratings: &[f64], explore: f64, nearest: usize, rng: &mut Rng) -> usize {
    let mut others: Vec<usize> = (0..ratings.len()).filter(|&i| i != a).collect();
    if rng.f64() >= explore {
        others.sort_by(|&i, &j| {
            (ratings[i] - ratings[a])
                .abs()
                .total_cmp(&(ratings[j] - ratings[a]).abs())
        });
        others.truncate(nearest.max(1));
    }
    others[rng.below(others.len())]
}

/// The judges' combined score: each judge's score weighted by its rating's
/// share of the judges' total.
fn weighted(scores: &[(f64, f64)]) -> f64 {
    let total: f64 = scores.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return NEUTRAL;
    }
    scores.iter().map(|(s, w)| s * w).sum::<f64>() / total
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

/// The judge's prompt for the `logprob` verdict: plain text ending where
/// the score is written, so base and instruction-tuned judges alike put
/// the number next.
fn judge_prompt(question: &str, answer: &str) -> Input {
    Input::Prompt(format!(
        "Question:\n{}\n\nAnswer:\n{}\n\nA careful grader rates how well the answer answers the question, \
         from 1 (wrong or useless) to 10 (correct and complete).\nScore (1-10):",
        clip(question.trim(), 2000),
        clip(answer.trim(), 1500)
    ))
}

/// The judge's request for the `generate` verdict (the reference's shape).
fn judge_chat(question: &str, answer: &str) -> Input {
    user(format!(
        "Rate how well the answer below answers the question, on a scale of 1 (wrong or useless) to 10 \
         (correct and complete).\n\nQuestion:\n{}\n\nAnswer:\n{}\n\nReply with JSON only: {{\"score\": N}}",
        clip(question.trim(), 2000),
        clip(answer.trim(), 1500)
    ))
}

/// A number 1..=10 in a written verdict: the one after `score` if there is
/// one, else the first in the reply.
fn read_score(reply: &str) -> Option<f64> {
    let lower = reply.to_ascii_lowercase();
    let from = lower.find("score").map_or(0, |i| i + 5);
    let numbers = |s: &str| -> Option<f64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|t| !t.is_empty())
            .filter_map(|t| t.parse::<u32>().ok())
            .find(|n| (1..=10).contains(n))
            .map(f64::from)
    };
    numbers(&lower[from..]).or_else(|| numbers(&lower))
}

/// The expected score under a next-token distribution: the tokens that
/// read as a number 1..=10, renormalised. `None` when none does.
fn expected_score(top: &[TokenLogprob]) -> Option<f64> {
    let (mut mass, mut sum) = (0.0, 0.0);
    for t in top {
        if let Ok(n) = t.text.trim().parse::<u32>() {
            if (1..=10).contains(&n) {
                let p = t.logprob.exp();
                mass += p;
                sum += p * f64::from(n);
            }
        }
    }
    (mass > 0.0).then(|| sum / mass)
}

/// One judge's score of one answer, and whether it could be read.
fn judge(judge: &str, question: &str, answer: &str, s: &Settings) -> (f64, bool) {
    let verdict = match s.judging {
        Judging::Logprob => next_token(judge, &judge_prompt(question, answer), 20)
            .ok()
            .and_then(|top| expected_score(&top)),
        Judging::Generate => {
            let params = GenParams {
                max_tokens: Some(12),
                temperature: Some(0.0),
                ..Default::default()
            };
            generate(judge, &judge_chat(question, answer), &params)
                .ok()
                .and_then(|g| read_score(&g.text))
        }
    };
    match verdict {
        Some(v) => (v, true),
        None => (NEUTRAL, false),
    }
}

/// One tribe member during a fit: its pool id, the id that answers for it
/// now (a trained member after its first training), its reputation.
struct Warrior {
    base: ModelInfo,
    current: String,
    rating: f64,
    trainee: bool,
}

/// What one round of duels produced.
#[derive(Default)]
struct Round {
    pairs: Vec<Preference>,
    decided: usize,
    ties: usize,
    failed: usize,
    unread: usize,
    verdicts: usize,
}

/// One round: every dev prompt is one duel. Member `i % n` challenges a
/// rival matched by rating; both answer (sampled, one `fan-out`); every
/// other member judges both answers; the rating-weighted scores decide;
/// ratings move after each duel.
fn duel_round(dev: &[Example], tribe: &mut [Warrior], plan: &Plan, s: &Settings, rng: &mut Rng, round: u32) -> Round {
    let mut out = Round::default();
    for (n, e) in dev.iter().enumerate() {
        let a = n % tribe.len();
        let ratings: Vec<f64> = tribe.iter().map(|w| w.rating).collect();
        let b = rival(a, &ratings, plan.explore, plan.nearest, rng);
        let seed = s.seed.wrapping_add(u64::from(round) << 32 | (n as u64) << 1);
        let job = |w: &Warrior, k: u64| Job {
            model: w.current.clone(),
            input: e.input.clone(),
            params: GenParams {
                max_tokens: Some(s.answer_tokens),
                temperature: Some(s.temperature),
                seed: Some(seed + k),
                ..Default::default()
            },
        };
        let answers = fan_out(&[job(&tribe[a], 0), job(&tribe[b], 1)]);
        let (Some(Ok(ga)), Some(Ok(gb))) = (answers.first(), answers.get(1)) else {
            out.failed += 1;
            continue;
        };
        let q = question(&e.input);
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for (_, w) in tribe.iter().enumerate().filter(|(j, _)| *j != a && *j != b) {
            let (va, ra) = judge(&w.current, &q, &ga.text, s);
            let (vb, rb) = judge(&w.current, &q, &gb.text, s);
            out.verdicts += 2;
            out.unread += usize::from(!ra) + usize::from(!rb);
            sa.push((va, w.rating));
            sb.push((vb, w.rating));
        }
        let (score_a, score_b) = (weighted(&sa), weighted(&sb));
        let result = if (score_a - score_b).abs() <= plan.tie_margin || ga.text.trim() == gb.text.trim() {
            out.ties += 1;
            0.5
        } else {
            out.decided += 1;
            let (chosen, rejected) = if score_a > score_b {
                (&ga.text, &gb.text)
            } else {
                (&gb.text, &ga.text)
            };
            out.pairs.push(Preference {
                input: e.input.clone(),
                chosen: chosen.clone(),
                rejected: rejected.clone(),
            });
            if score_a > score_b {
                1.0
            } else {
                0.0
            }
        };
        let (ra, rb) = elo(tribe[a].rating, tribe[b].rating, result);
        tribe[a].rating = ra;
        tribe[b].rating = rb;
    }
    out
}

/// The kept member's name: the module, then a hash of the dev items, the
/// tribe, the trainees and the plan, so a re-fit on the same data finds
/// its own earlier member instead of training a twin.
fn kept_name(dev: &[Example], tribe: &[String], trainees: &[String], line: &str) -> String {
    let questions: Vec<String> = dev.iter().map(|e| question(&e.input)).collect();
    let parts = questions
        .iter()
        .zip(dev)
        .flat_map(|(q, e)| [q.as_bytes(), e.answer.as_bytes()])
        .chain(tribe.iter().map(|s| s.as_bytes()))
        .chain([b"|".as_slice()])
        .chain(trainees.iter().map(|s| s.as_bytes()))
        .chain([line.as_bytes()]);
    format!("sparta-{:016x}", state::fingerprint(parts))
}

/// Ratings as `id 1012` pairs, best first.
fn standings(tribe: &[Warrior]) -> Vec<(String, f64)> {
    let mut r: Vec<(String, f64)> = tribe.iter().map(|w| (w.base.id.clone(), w.rating)).collect();
    r.sort_by(|a, b| b.1.total_cmp(&a.1));
    r
}

fn describe(ratings: &[(String, f64)]) -> String {
    ratings
        .iter()
        .map(|(id, r)| format!("{id} {r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Trains every trainee by DPO on all pairs so far, each from its pool
/// weights (the previous round's member is released first: a continued
/// LoRA would need its f32 parent held beside it, past the request's
/// memory for a 0.5B member). Returns a note per run.
fn train_round(
    tribe: &mut [Warrior],
    pairs: &[Preference],
    plan: &Plan,
    s: &Settings,
    round: u32,
) -> Result<Vec<String>, Error> {
    let mut notes = Vec::new();
    let steps =
        ((pairs.len() as u64 * u64::from(plan.epochs)).div_ceil(u64::from(plan.batch)) as u32).clamp(1, plan.max_steps);
    for w in tribe.iter_mut().filter(|w| w.trainee) {
        if w.current != w.base.id {
            training::release(&w.current)?;
            w.current = w.base.id.clone();
        }
        let mut params = Params::steps(steps);
        params.batch = Some(plan.batch);
        params.lr = Some(plan.lr);
        params.beta = Some(plan.beta);
        params.max_len = Some(384);
        params.seed = Some(s.seed.wrapping_add(u64::from(round)));
        let report = training::dpo(&w.base.id, pairs.to_vec(), params)?;
        notes.push(format!(
            "DPO `{}` on {} pairs: {} steps, loss {:.4} -> {:.4}, {} ms",
            w.base.id,
            pairs.len(),
            report.steps,
            report.first_loss,
            report.last_loss,
            report.millis
        ));
        w.current = report.model;
    }
    Ok(notes)
}

/// The member that answers an unfitted request: the largest trainee (the
/// member sparta would have trained and picked from).
fn unfitted_answerer(cfg: &Config) -> Result<String, Error> {
    let t = tribe(cfg)?;
    let picked = trainees(cfg, &t)?;
    picked
        .into_iter()
        .max_by_key(|m| m.parameters)
        .map(|m| m.id)
        .ok_or_else(|| Error::ModuleFailed("no trainee".into()))
}

impl Strategy for Sparta {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let settings = Settings::read(&cfg, req.params.seed.unwrap_or(0))?;
        let fitted: Option<Fitted> = state::load(STATE, req.state.as_deref())?;
        let granted: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        let (answerer, trained, base) = match &fitted {
            Some(f) if granted.contains(&f.answerer) => (f.answerer.clone(), f.trained, f.base.clone()),
            Some(f) => {
                trace(
                    None,
                    "fit",
                    format!(
                        "the fitted member `{}` is not granted (not kept on this host?): its base `{}` answers",
                        f.answerer, f.base
                    ),
                );
                if granted.contains(&f.base) {
                    (f.base.clone(), false, f.base.clone())
                } else {
                    let id = unfitted_answerer(&cfg)?;
                    (id.clone(), false, id)
                }
            }
            None => {
                let id = unfitted_answerer(&cfg)?;
                trace(
                    Some(&id),
                    "fit",
                    "not fitted: the largest trainee answers untrained (run `fit` to duel, train and pick)",
                );
                (id.clone(), false, id)
            }
        };
        if let Some(f) = &fitted {
            trace(None, "fit", f.summary.clone());
        }
        let mut params = req.params.clone();
        if params.max_tokens.is_none() {
            params.max_tokens = Some(settings.answer_tokens);
        }
        if params.seed.is_none() {
            params.seed = Some(settings.seed);
        }
        let g = generate(&answerer, &req.input, &params)?;
        trace(
            Some(&answerer),
            "answerer",
            format!(
                "{} member answers alone (one call)",
                if trained { "the best trained" } else { "an untrained" }
            ),
        );
        let mut annotations = vec![
            ("answerer".to_string(), answerer.clone()),
            ("base".to_string(), base),
            ("trained".to_string(), trained.to_string()),
        ];
        if let Some(f) = &fitted {
            annotations.push(("ratings".to_string(), describe(&f.ratings)));
        }
        Ok(Response {
            text: g.text,
            annotations,
        })
    }

    /// `iterations` rounds of duels on the dev prompts, each followed by
    /// DPO of the trainees on every pair so far; then the trained members
    /// answer the dev items, and the best one is kept by name.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let settings = Settings::read(&cfg, 0)?;
        let plan = Plan::read(&cfg)?;
        let dev = &dev[..dev.len().min(plan.fit_max_items)];
        let members = tribe(&cfg)?;
        let chosen = trainees(&cfg, &members)?;
        let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        let trainee_ids: Vec<String> = chosen.iter().map(|m| m.id.clone()).collect();
        let name = kept_name(dev, &ids, &trainee_ids, &plan.line(&settings));
        let save = |f: Fitted| {
            trace(None, "fit", f.summary.clone());
            state::save(STATE, &f).map(Some)
        };
        if generators().iter().any(|m| m.id == name) {
            return save(Fitted {
                answerer: name.clone(),
                base: trainee_ids[0].clone(),
                trained: true,
                ratings: Vec::new(),
                summary: format!("reusing `{name}`, kept by an earlier identical fit"),
            });
        }
        let mut tribe: Vec<Warrior> = members
            .into_iter()
            .map(|m| Warrior {
                trainee: trainee_ids.contains(&m.id),
                current: m.id.clone(),
                base: m,
                rating: START_RATING,
            })
            .collect();
        let mut rng = Rng::new(settings.seed ^ 0x005b_a77a);
        let mut pairs: Vec<Preference> = Vec::new();
        let mut log = Vec::new();
        for round in 0..plan.iterations {
            let r = duel_round(dev, &mut tribe, &plan, &settings, &mut rng, round);
            pairs.extend(r.pairs);
            let mut note = format!(
                "round {}: {} duels, {} decided, {} ties, {} failed; {}/{} verdicts unreadable (scored {NEUTRAL}); ratings {}",
                round + 1,
                dev.len(),
                r.decided,
                r.ties,
                r.failed,
                r.unread,
                r.verdicts,
                describe(&standings(&tribe))
            );
            if pairs.is_empty() {
                note.push_str("; no preference pair yet, nothing to train");
            } else {
                for n in train_round(&mut tribe, &pairs, &plan, &settings, round)? {
                    note.push_str("; ");
                    note.push_str(&n);
                }
            }
            trace(None, "round", note.clone());
            log.push(note);
        }
        let ratings = standings(&tribe);
        let candidates: Vec<&Warrior> = tribe.iter().filter(|w| w.current != w.base.id).collect();
        if candidates.is_empty() {
            // No duel was ever decided: the best-rated trainee answers.
            let best = tribe
                .iter()
                .filter(|w| w.trainee)
                .max_by(|a, b| a.rating.total_cmp(&b.rating))
                .map(|w| w.base.id.clone())
                .unwrap_or_else(|| trainee_ids[0].clone());
            return save(Fitted {
                answerer: best.clone(),
                base: best.clone(),
                trained: false,
                summary: format!(
                    "{} rounds, no decided duel, nothing trained: the best-rated trainee `{best}` answers; ratings {}",
                    plan.iterations,
                    describe(&ratings)
                ),
                ratings,
            });
        }
        // The best adapter on dev: greedy answers graded as every method's fit does.
        let probes: Vec<ModelInfo> = candidates
            .iter()
            .map(|w| ModelInfo {
                id: w.current.clone(),
                ..w.base.clone()
            })
            .collect();
        let scores = evaluate(dev, &probes, settings.answer_tokens);
        let best = candidates
            .iter()
            .zip(&scores)
            .max_by(|(wa, sa), (wb, sb)| {
                sa.accuracy()
                    .total_cmp(&sb.accuracy())
                    .then(wa.rating.total_cmp(&wb.rating))
            })
            .map(|(w, s)| (w.current.clone(), w.base.id.clone(), s.accuracy()))
            .ok_or_else(|| Error::ModuleFailed("no trained candidate".into()))?;
        let (best_id, best_base, best_acc) = best;
        let picked_note = format!(
            "{} rounds on {} dev prompts, {} preference pairs; ratings {}; best of {} trained members on dev: from `{best_base}`, {:.1}% right",
            plan.iterations,
            dev.len(),
            pairs.len(),
            describe(&ratings),
            candidates.len(),
            100.0 * best_acc
        );
        if !plan.keep {
            return save(Fitted {
                answerer: best_base.clone(),
                base: best_base,
                trained: false,
                ratings,
                summary: format!(
                    "{picked_note}; keep=false: the trained member goes with this request, its base answers"
                ),
            });
        }
        match training::keep(&best_id, &name) {
            Ok(()) => save(Fitted {
                answerer: name.clone(),
                base: best_base,
                trained: true,
                ratings,
                summary: format!("{picked_note}; kept as `{name}`"),
            }),
            Err(e) => save(Fitted {
                answerer: best_base.clone(),
                base: best_base,
                trained: false,
                ratings,
                summary: format!("{picked_note}; could not keep it ({e:?}): its untrained base answers"),
            }),
        }
    }
}

export_strategy!(Sparta);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elo_moves_ratings_toward_the_result_and_conserves_their_sum() {
        let (a, b) = elo(1000.0, 1000.0, 1.0);
        assert_eq!((a, b), (1016.0, 984.0));
        let (a, b) = elo(1200.0, 1000.0, 0.5);
        assert!(a < 1200.0 && b > 1000.0, "a tie costs the favourite");
        assert!((a + b - 2200.0).abs() < 1e-9);
    }

    #[test]
    fn rivals_are_near_in_rating_unless_exploring() {
        let ratings = [1000.0, 1005.0, 1400.0, 600.0, 990.0];
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let r = rival(0, &ratings, 0.0, 2, &mut rng);
            assert!(r == 1 || r == 4, "{r}");
        }
        let seen: std::collections::BTreeSet<usize> = (0..400).map(|_| rival(0, &ratings, 1.0, 2, &mut rng)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
    }

    #[test]
    fn verdicts_are_read_from_json_text_and_token_distributions() {
        assert_eq!(read_score("{\"score\": 7}"), Some(7.0));
        assert_eq!(read_score("I give it 3/10. Score: 8"), Some(8.0));
        assert_eq!(read_score("Score: 42, or 6"), Some(6.0));
        assert_eq!(read_score("no idea"), None);
        let t = |text: &str, p: f64| TokenLogprob {
            token: 0,
            text: text.into(),
            logprob: p.ln(),
        };
        let e = expected_score(&[t(" 8", 0.3), t(" the", 0.4), t("2", 0.1), t(" 11", 0.2)]).unwrap();
        assert!((e - 6.5).abs() < 1e-9, "{e}");
        assert_eq!(expected_score(&[t(" the", 1.0)]), None);
    }

    #[test]
    fn judges_count_by_reputation() {
        assert!((weighted(&[(10.0, 1000.0), (0.0, 3000.0)]) - 2.5).abs() < 1e-9);
        assert_eq!(weighted(&[]), NEUTRAL);
    }

    #[test]
    fn the_kept_name_changes_with_the_data_and_the_plan() {
        let e = |a: &str| Example {
            input: user("q"),
            answer: a.into(),
            choices: Vec::new(),
        };
        let t = ["a".to_string(), "b".to_string(), "c".to_string()];
        let n = kept_name(&[e("1")], &t, &t[..1], "x");
        assert_eq!(n, kept_name(&[e("1")], &t, &t[..1], "x"));
        assert_ne!(n, kept_name(&[e("2")], &t, &t[..1], "x"));
        assert_ne!(n, kept_name(&[e("1")], &t, &t[..1], "y"));
        assert!(n.starts_with("sparta-") && n.len() == 23, "{n}");
    }
}

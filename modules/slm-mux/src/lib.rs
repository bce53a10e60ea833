//! slm-mux: every member samples `k` answers; the member whose own samples
//! agree most (its self-consistency) answers with its majority, and ties go
//! to the member with the better dev accuracy from `fit`, then to the
//! member listed first. See README.md.

use tessera_sdk::answer::{choice, extract, is_correct, letter, vote};
use tessera_sdk::dev::{describe, pick_list, MemberScore};
use tessera_sdk::*;

struct SlmMux;

/// State format version (`fit` saves one [`MemberScore`] per member).
const STATE: u8 = 1;

/// The sampling settings of one multiplexing round, shared by `run` and
/// `fit`.
#[derive(Debug, Clone)]
struct Settings {
    /// Samples per member.
    k: u32,
    temperature: f32,
    top_p: f32,
    max_tokens: u32,
    top_k: Option<u32>,
    stop: Vec<String>,
    /// Sample `j` of every member uses seed `seed + j`.
    seed: u64,
}

impl Settings {
    /// Reads `k`, `temperature`, `top_p`, `max_tokens` and `seed` (with
    /// `seed` as the default seed), range-checked.
    fn read(cfg: &Config, seed: u64) -> Result<Settings, Error> {
        let k = cfg.parse_within("k", 3u32, 1..=32, "use 1..=32 samples per member")?;
        let s = cfg.sampling(Sampling {
            max_tokens: 128,
            temperature: 0.7,
            top_p: 1.0,
        })?;
        if s.temperature <= 0.0 {
            return Err(config::invalid(
                "temperature",
                s.temperature,
                "SLM-MUX measures how often a member's samples agree, which needs sampling: use a temperature above 0 (up to 2)",
            ));
        }
        // `Config::for_request` carries the request's `top_k` as this key.
        let top_k = match cfg.get("top_k") {
            None => None,
            Some(_) => Some(cfg.parse_within("top_k", 0u32, 1..=1000, "use 1..=1000 tokens")?),
        };
        Ok(Settings {
            k,
            temperature: s.temperature,
            top_p: s.top_p,
            max_tokens: s.max_tokens,
            top_k,
            stop: Vec::new(),
            seed: cfg.parse("seed", seed)?,
        })
    }
}

/// What one member's `k` samples came to.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    /// The member's id.
    model: String,
    /// Its most frequent answer (an option letter, or a normalised short
    /// answer); `None` when no sample gave one.
    answer: Option<String>,
    /// Samples that gave that answer.
    votes: usize,
    /// Samples asked for (`k`): the denominator of the confidence, so a
    /// failed or unreadable sample counts as disagreeing.
    asked: usize,
    /// The first sample with the majority answer (the reply if it wins).
    text: Option<String>,
    /// Every sample's answer, in seed order (`-` for none, `!` for a failed
    /// call), for the trace.
    answers: Vec<String>,
}

impl Outcome {
    /// The share of the member's samples that agree with its majority.
    fn confidence(&self) -> f64 {
        self.votes as f64 / self.asked.max(1) as f64
    }
}

/// The answer a sample gives: for a multiple-choice question the letter of
/// the option it picks, else its extracted short answer (normalised by
/// [`vote`]). `None` when it gives none.
fn sample_answer(text: &str, options: Option<&[String]>) -> Option<String> {
    match options {
        Some(o) => choice(text, o).map(|i| letter(i).to_string()),
        None => {
            let a = extract(text);
            (!a.trim().is_empty()).then_some(a)
        }
    }
}

/// At most 40 characters of an answer, for trace notes.
fn short(a: &str) -> String {
    match a.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &a[..cut]),
        None => a.to_string(),
    }
}

/// Plurality over one member's sample answers: (answer, votes, index of
/// its first sample). Multiple choice counts letters exactly (the SDK's
/// normaliser would read the letter `A` as an article); free text goes
/// through [`vote`], which normalises SQuAD-style and lets a sentence vote
/// for the bare answer it ends with. Ties keep the answer seen first.
fn majority(answers: &[Option<String>], mcq: bool) -> Option<(String, usize, usize)> {
    if mcq {
        let mut counts: Vec<(String, usize, usize)> = Vec::new();
        for (i, a) in answers.iter().enumerate() {
            let Some(a) = a else { continue };
            match counts.iter_mut().find(|c| c.0 == *a) {
                Some(c) => c.1 += 1,
                None => counts.push((a.clone(), 1, i)),
            }
        }
        // Stable sort: equal counts keep first-seen order.
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        return counts.into_iter().next();
    }
    // `vote` indexes into what it is given: keep a map back to the samples.
    let (index, given): (Vec<usize>, Vec<String>) = answers
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.clone().map(|a| (i, a)))
        .unzip();
    let tally = vote(&given, &[])?;
    Some((tally.answer, tally.votes, *index.get(tally.winner)?))
}

/// One multiplexing round: every member in `members` samples `k` answers
/// to `input` in one `fan-out` (sample `j` with seed `seed + j`), and each
/// member's samples are tallied. `options` are the question's options when
/// it is multiple choice.
fn sample_all(input: &Input, options: Option<&[String]>, members: &[ModelInfo], s: &Settings) -> Vec<Outcome> {
    let k = s.k as usize;
    let mut jobs = Vec::with_capacity(members.len() * k);
    for m in members {
        for j in 0..k {
            jobs.push(Job {
                model: m.id.clone(),
                input: input.clone(),
                params: GenParams {
                    max_tokens: Some(s.max_tokens),
                    temperature: Some(s.temperature),
                    top_p: Some(s.top_p),
                    top_k: s.top_k,
                    seed: Some(s.seed.wrapping_add(j as u64)),
                    stop: s.stop.clone(),
                },
            });
        }
    }
    let mut results = fan_out(&jobs).into_iter();
    members
        .iter()
        .map(|m| {
            let mut texts = Vec::with_capacity(k);
            let mut answers = Vec::with_capacity(k);
            let mut shown = Vec::with_capacity(k);
            for _ in 0..k {
                match results.next() {
                    Some(Ok(g)) => {
                        let a = sample_answer(&g.text, options);
                        shown.push(a.as_deref().map_or_else(|| "-".into(), short));
                        answers.push(a);
                        texts.push(Some(g.text));
                    }
                    // A failed call (or a short result list) is a sample
                    // that agrees with nothing.
                    Some(Err(_)) | None => {
                        shown.push("!".into());
                        answers.push(None);
                        texts.push(None);
                    }
                }
            }
            let top = majority(&answers, options.is_some());
            let (answer, votes, text) = match top {
                Some((a, v, i)) => (Some(a), v, texts.get(i).cloned().flatten()),
                None => (None, 0, None),
            };
            Outcome {
                model: m.id.clone(),
                answer,
                votes,
                asked: k,
                text,
                answers: shown,
            }
        })
        .collect()
}

/// How the winner was decided among the most confident members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TieBreak {
    /// One member alone had the highest confidence.
    None,
    /// Several did; the one with the best dev accuracy from `fit` won.
    DevAccuracy,
    /// Several did with the same dev accuracy (or no `fit`): the one
    /// listed first won.
    MemberOrder,
}

impl TieBreak {
    fn name(self) -> &'static str {
        match self {
            TieBreak::None => "none",
            TieBreak::DevAccuracy => "dev accuracy",
            TieBreak::MemberOrder => "member order",
        }
    }
}

/// The index of the winning outcome: the highest confidence among members
/// with an answer, then the best dev accuracy (`accuracy`, `None` ranks
/// below any measured one), then the earliest. `None` when no member
/// answered.
fn decide(outcomes: &[Outcome], accuracy: &[Option<f64>]) -> Option<(usize, TieBreak)> {
    let answered: Vec<usize> = (0..outcomes.len()).filter(|&i| outcomes[i].answer.is_some()).collect();
    let best_votes = answered.iter().map(|&i| outcomes[i].votes).max()?;
    let top: Vec<usize> = answered
        .into_iter()
        .filter(|&i| outcomes[i].votes == best_votes)
        .collect();
    let acc = |i: usize| accuracy.get(i).copied().flatten().unwrap_or(-1.0);
    let mut winner = *top.first()?;
    for &i in &top[1..] {
        if acc(i) > acc(winner) {
            winner = i;
        }
    }
    let why = if top.len() == 1 {
        TieBreak::None
    } else if top.iter().any(|&i| acc(i) != acc(winner)) {
        TieBreak::DevAccuracy
    } else {
        TieBreak::MemberOrder
    };
    Some((winner, why))
}

/// The options of a multiple-choice prompt, if it is one.
fn options_of(input: &Input) -> Option<Vec<String>> {
    tessera_sdk::mcq::parse(&question(input)).map(|q| q.options)
}

/// `id=value` pairs, `; `-separated, for annotations.
fn pairs<'a>(items: impl IntoIterator<Item = (&'a str, String)>) -> String {
    items
        .into_iter()
        .map(|(id, v)| format!("{id}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The generative members to multiplex: config `models`, else every granted
/// one.
fn members(cfg: &Config) -> Result<Vec<ModelInfo>, Error> {
    let picked = pick_list(cfg, "models", &generators())?;
    if picked.is_empty() {
        return Err(Error::ModuleFailed(
            "slm-mux needs generative members; none was granted".into(),
        ));
    }
    Ok(picked)
}

impl Strategy for SlmMux {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let mut settings = Settings::read(&cfg, req.params.seed.unwrap_or(0))?;
        settings.stop = req.params.stop.clone();
        let members = members(&cfg)?;
        let fitted: Option<Vec<MemberScore>> = state::load(STATE, req.state.as_deref())?;
        let accuracy: Vec<Option<f64>> = members
            .iter()
            .map(|m| {
                fitted
                    .as_ref()
                    .and_then(|f| f.iter().find(|s| s.model == m.id))
                    .map(MemberScore::accuracy)
            })
            .collect();
        let options = options_of(&req.input);
        let outcomes = sample_all(&req.input, options.as_deref(), &members, &settings);
        for o in &outcomes {
            let majority = match &o.answer {
                Some(a) => format!("majority `{a}`"),
                None => "no answer".to_string(),
            };
            trace(
                Some(&o.model),
                "member",
                format!(
                    "{} samples [{}]: {majority}, confidence {}/{} = {:.3}",
                    o.asked,
                    o.answers.join(", "),
                    o.votes,
                    o.asked,
                    o.confidence()
                ),
            );
        }
        let (w, why) = decide(&outcomes, &accuracy)
            .ok_or_else(|| Error::ModuleFailed("no member's samples gave an answer".into()))?;
        let win = &outcomes[w];
        let answer = win.answer.clone().unwrap_or_default();
        let text = win.text.clone().unwrap_or_else(|| answer.clone());
        let dev_note = match &fitted {
            Some(f) => format!("; dev ranking from fit: {}", describe(f)),
            None => String::new(),
        };
        trace(
            None,
            "decision",
            format!(
                "{} answers `{answer}` with confidence {:.3} (tie-break: {}){dev_note}",
                win.model,
                win.confidence(),
                why.name()
            ),
        );
        let mut annotations = vec![
            ("chosen".to_string(), win.model.clone()),
            ("answer".to_string(), answer),
            ("confidence".to_string(), format!("{:.3}", win.confidence())),
            ("votes".to_string(), format!("{}/{}", win.votes, win.asked)),
            (
                "confidences".to_string(),
                pairs(
                    outcomes
                        .iter()
                        .map(|o| (o.model.as_str(), format!("{:.3}", o.confidence()))),
                ),
            ),
            (
                "answers".to_string(),
                pairs(
                    outcomes
                        .iter()
                        .map(|o| (o.model.as_str(), o.answer.clone().unwrap_or_else(|| "-".into()))),
                ),
            ),
            ("k".to_string(), settings.k.to_string()),
            ("tie_break".to_string(), why.name().to_string()),
        ];
        if fitted.is_some() {
            annotations.push((
                "dev_accuracy".to_string(),
                pairs(
                    members
                        .iter()
                        .zip(&accuracy)
                        .map(|(m, a)| (m.id.as_str(), a.map_or("-".to_string(), |a| format!("{a:.3}")))),
                ),
            ));
        }
        Ok(Response { text, annotations })
    }

    /// Runs the same round on each dev example (up to `fit_max_items`) and
    /// keeps, per member, whether its majority answer was right; `run`
    /// breaks confidence ties by that accuracy.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let settings = Settings::read(&cfg, 0)?;
        let limit: usize = cfg.parse_within("fit_max_items", 40, 1..=1000, "use 1..=1000 dev items")?;
        let members = members(&cfg)?;
        if dev.len() > limit {
            trace(
                None,
                "fit",
                format!(
                    "{} dev items given; the first {limit} are used (fit_max_items)",
                    dev.len()
                ),
            );
        }
        let mut scores: Vec<MemberScore> = members
            .iter()
            .map(|m| MemberScore {
                model: m.id.clone(),
                correct: Vec::new(),
            })
            .collect();
        for (i, e) in dev.iter().take(limit).enumerate() {
            let options = if e.choices.len() >= 2 {
                Some(e.choices.clone())
            } else {
                options_of(&e.input)
            };
            let outcomes = sample_all(&e.input, options.as_deref(), &members, &settings);
            let mut notes = Vec::with_capacity(outcomes.len());
            for (s, o) in scores.iter_mut().zip(&outcomes) {
                let right = o.text.as_deref().is_some_and(|t| is_correct(t, e));
                s.correct.push(right);
                notes.push(format!(
                    "{} `{}` {}/{}{}",
                    o.model,
                    o.answer.as_deref().unwrap_or("-"),
                    o.votes,
                    o.asked,
                    if right { " right" } else { "" }
                ));
            }
            trace(
                None,
                "fit",
                format!("dev item {i} (gold `{}`): {}", e.answer, notes.join(", ")),
            );
        }
        trace(
            None,
            "fit",
            format!("dev accuracy of each member's majority: {}", describe(&scores)),
        );
        state::save(STATE, &scores).map(Some)
    }
}

export_strategy!(SlmMux);

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(model: &str, answer: Option<&str>, votes: usize) -> Outcome {
        Outcome {
            model: model.into(),
            answer: answer.map(str::to_string),
            votes,
            asked: 3,
            text: answer.map(str::to_string),
            answers: vec![],
        }
    }

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| (!s.is_empty()).then(|| s.to_string())).collect()
    }

    #[test]
    fn majority_counts_letters_exactly_and_keeps_the_first_of_ties() {
        assert_eq!(majority(&some(&["B", "A", "A"]), true), Some(("A".into(), 2, 1)));
        assert_eq!(majority(&some(&["B", "A", ""]), true), Some(("B".into(), 1, 0)));
        assert_eq!(majority(&some(&["", ""]), true), None);
    }

    #[test]
    fn free_text_majority_normalises_and_maps_back_to_the_sample() {
        let a = some(&["", "The capital is Paris", "paris.", "Lyon"]);
        assert_eq!(majority(&a, false), Some(("paris".into(), 2, 1)));
    }

    #[test]
    fn the_most_confident_member_wins_then_dev_accuracy_then_order() {
        let o = vec![
            outcome("a", Some("x"), 2),
            outcome("b", Some("y"), 3),
            outcome("c", Some("z"), 3),
        ];
        assert_eq!(decide(&o, &[]), Some((1, TieBreak::MemberOrder)));
        assert_eq!(
            decide(&o, &[Some(1.0), Some(0.2), Some(0.5)]),
            Some((2, TieBreak::DevAccuracy))
        );
        assert_eq!(
            decide(&o, &[None, Some(0.5), Some(0.5)]),
            Some((1, TieBreak::MemberOrder))
        );
        let alone = vec![outcome("a", Some("x"), 1), outcome("b", None, 0)];
        assert_eq!(decide(&alone, &[None, Some(1.0)]), Some((0, TieBreak::None)));
        assert_eq!(decide(&[outcome("a", None, 0)], &[]), None);
    }
}

//! Teaches a member, then answers with it: the training capability in one
//! screen.
//!
//! The lessons come in the request's config (`lessons`, one per line):
//! - `objective = sft`: `question => answer`, learned as targets;
//! - `objective = dpo`: `question => chosen | rejected`, learned as
//!   preferences against the untrained member;
//! - `objective = grpo`: `question` only; the module samples `samples`
//!   answers per question from the base (temperature 1) and rewards those
//!   that contain `reward_word` with 1, the rest with 0.
//!
//! `base` names the member to train (default: the first granted llama or
//! qwen2 generator), `steps`, `batch`, `lr` and `rank` tune the run, and `keep_as`
//! asks the host to keep the trained member by name (the operator's
//! `keep_trained` decides). The answer comes from the trained member; the
//! annotations carry the run's report.

use tessera_sdk::training::{self, Params, Preference, Sample, SampleGroup, SftExample};
use tessera_sdk::*;

struct Teach;

fn ask(q: &str) -> Input {
    Input::Chat(vec![chat::message("user", q)])
}

/// The lessons, one per non-empty line.
fn lessons(config: &Config) -> Result<Vec<String>, Error> {
    let text = config
        .get("lessons")
        .ok_or_else(|| config::invalid("lessons", "(unset)", "give one lesson per line"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn split2<'a>(line: &'a str, sep: &str, key: &str) -> Result<(&'a str, &'a str), Error> {
    line.split_once(sep)
        .map(|(a, b)| (a.trim(), b.trim()))
        .ok_or_else(|| config::invalid(key, line, &format!("expected `{sep}` in the lesson")))
}

fn objective(config: &Config, base: &str, params: &GenParams) -> Result<(training::Objective, String), Error> {
    let kind = config.get("objective").unwrap_or("sft");
    let lines = lessons(config)?;
    match kind {
        "sft" => {
            let mut v = Vec::new();
            for l in &lines {
                let (q, a) = split2(l, "=>", "lessons")?;
                v.push(SftExample {
                    input: ask(q),
                    target: a.to_string(),
                });
            }
            Ok((training::Objective::Sft(v), String::new()))
        }
        "dpo" => {
            let mut v = Vec::new();
            for l in &lines {
                let (q, rest) = split2(l, "=>", "lessons")?;
                let (chosen, rejected) = split2(rest, "|", "lessons")?;
                v.push(Preference {
                    input: ask(q),
                    chosen: chosen.to_string(),
                    rejected: rejected.to_string(),
                });
            }
            Ok((training::Objective::Dpo(v), String::new()))
        }
        "grpo" => {
            let word = config
                .get("reward_word")
                .ok_or_else(|| config::invalid("reward_word", "(unset)", "GRPO needs a word to reward"))?
                .to_lowercase();
            let k: u32 = config.parse_within("samples", 4, 2..=16, "use 2 to 16 samples per question")?;
            let mut groups = Vec::new();
            let (mut rewarded, mut total) = (0u32, 0u32);
            for (i, q) in lines.iter().enumerate() {
                let mut samples = Vec::new();
                for j in 0..k {
                    let p = GenParams {
                        temperature: Some(1.0),
                        seed: Some(u64::from(j) + 1000 * i as u64),
                        max_tokens: Some(params.max_tokens.unwrap_or(24).min(48)),
                        top_p: params.top_p,
                        top_k: params.top_k,
                        stop: params.stop.clone(),
                    };
                    let g = generate(base, &ask(q), &p)?;
                    let reward = if g.text.to_lowercase().contains(&word) {
                        1.0
                    } else {
                        0.0
                    };
                    rewarded += reward as u32;
                    total += 1;
                    samples.push(Sample { text: g.text, reward });
                }
                groups.push(SampleGroup { input: ask(q), samples });
            }
            Ok((training::Objective::Grpo(groups), format!("{rewarded}/{total}")))
        }
        other => Err(config::invalid("objective", other, "use sft, dpo or grpo")),
    }
}

impl Strategy for Teach {
    fn run(req: Request) -> Result<Response, Error> {
        let config = Config::for_request(&req);
        let base = match config.get("base") {
            Some(b) => b.to_string(),
            None => generators()
                .into_iter()
                .find(|m| m.architecture == "llama" || m.architecture == "qwen2")
                .map(|m| m.id)
                .ok_or_else(|| Error::ModuleFailed("no granted llama or qwen2 member to train".into()))?,
        };
        let mut params = Params::steps(config.parse_within("steps", 12, 1..=1000, "use 1 to 1000 steps")?);
        if config.get("lr").is_some() {
            params.lr = Some(config.parse_within("lr", 5e-4, 1e-6..=1e-1, "use a learning rate in [1e-6, 0.1]")?);
        }
        if config.get("batch").is_some() {
            params.batch = Some(config.parse_within("batch", 4, 1..=64, "use 1 to 64 items per step")?);
        }
        if config.get("rank").is_some() {
            params.lora_rank = Some(config.parse_within("rank", 8, 1..=64, "use a LoRA rank of 1 to 64")?);
        }
        params.seed = Some(config.parse("seed", 0u64)?);
        let (objective, rewarded) = objective(&config, &base, &req.params)?;
        let report = training::train(&base, &objective, params)?;
        trace(
            Some(&report.model),
            "trainee",
            format!(
                "{base}: {} steps, {} tokens, loss {:.4} -> {:.4}",
                report.steps, report.tokens, report.first_loss, report.last_loss
            ),
        );
        let mut annotations = vec![
            ("trained_model".to_string(), report.model.clone()),
            ("steps".into(), report.steps.to_string()),
            ("tokens".into(), report.tokens.to_string()),
            ("first_loss".into(), format!("{:.6}", report.first_loss)),
            ("last_loss".into(), format!("{:.6}", report.last_loss)),
            ("millis".into(), report.millis.to_string()),
        ];
        if !rewarded.is_empty() {
            annotations.push(("rewarded".into(), rewarded));
        }
        if let Some(name) = config.get("keep_as") {
            let kept = match training::keep(&report.model, name) {
                Ok(()) => "kept".to_string(),
                Err(e) => format!("{e:?}"),
            };
            annotations.push(("keep".into(), kept));
        }
        let g = generate(&report.model, &req.input, &req.params)?;
        Ok(Response {
            text: g.text,
            annotations,
        })
    }
}

export_strategy!(Teach);

//! agglm: learned aggregation. Every solver member answers once; an
//! aggregator member reads the question and all the answers and writes the
//! final one. `fit` trains the aggregator with GRPO on dev sets whose
//! majority is wrong (balanced with easy ones), rewarding an aggregation
//! whose answer is right, and keeps it by name so that test requests cost
//! one call per member plus one aggregation. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::{answer_of, is_correct, plurality as majority};
use tessera_sdk::dev::pick_list;
use tessera_sdk::training::{self, is_trained, trainable, Params, Sample, SampleGroup};
use tessera_sdk::*;

struct AggLm;

/// State format version.
const STATE: u8 = 1;

/// What `fit` learned: who aggregates and over whose answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fitted {
    /// The aggregator to call: the kept trained member, or the base when
    /// nothing could be trained or kept.
    aggregator: String,
    /// The member it was trained from.
    base: String,
    /// Whether `aggregator` is a trained member.
    trained: bool,
    /// The solvers, in the order their answers are shown to the aggregator
    /// (the order it was trained on).
    solvers: Vec<String>,
    /// What fit did, for the trace.
    summary: String,
}

/// Settings shared by `run` and `fit`.
#[derive(Debug, Clone)]
struct Settings {
    /// New tokens per solver answer.
    solve_tokens: u32,
    /// New tokens per aggregation.
    aggregate_tokens: u32,
    seed: u64,
}

impl Settings {
    fn read(cfg: &Config, seed: u64) -> Result<Settings, Error> {
        Ok(Settings {
            solve_tokens: cfg.parse_within("solve_tokens", 96u32, 1..=1024, "use 1..=1024 tokens")?,
            aggregate_tokens: cfg.parse_within("aggregate_tokens", 96u32, 1..=1024, "use 1..=1024 tokens")?,
            seed: cfg.parse("seed", seed)?,
        })
    }
}

/// The solvers: config `models`, else every granted contribution that
/// generates.
fn solvers(cfg: &Config) -> Result<Vec<ModelInfo>, Error> {
    let pool: Vec<ModelInfo> = generators().into_iter().filter(|m| !is_trained(m)).collect();
    let picked = pick_list(cfg, "models", &pool)?;
    if picked.is_empty() {
        return Err(Error::ModuleFailed(
            "agglm needs generative members; none was granted".into(),
        ));
    }
    Ok(picked)
}

/// The aggregator's base: config `aggregator`, else the smallest granted
/// llama or qwen2 member (training cost grows with size).
fn aggregator_base(cfg: &Config) -> Result<ModelInfo, Error> {
    let pool: Vec<ModelInfo> = generators().into_iter().filter(|m| !is_trained(m)).collect();
    match cfg.get("aggregator").map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => pool
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .ok_or_else(|| config::invalid("aggregator", id, "not a granted generative member")),
        None => pool
            .iter()
            .filter(|m| trainable(m))
            .min_by_key(|m| m.parameters)
            .cloned()
            .ok_or_else(|| {
                Error::ModuleFailed(
                    "agglm trains a llama or qwen2 aggregator and none was granted: set `aggregator`".into(),
                )
            }),
    }
}

/// One answer per solver (greedy, one `fan-out`); a failed call is `None`.
fn solve(input: &Input, solvers: &[String], s: &Settings) -> Vec<Option<String>> {
    let jobs: Vec<Job> = solvers
        .iter()
        .map(|m| Job {
            model: m.clone(),
            input: input.clone(),
            params: GenParams {
                max_tokens: Some(s.solve_tokens),
                temperature: Some(0.0),
                top_p: None,
                top_k: None,
                seed: Some(s.seed),
                stop: Vec::new(),
            },
        })
        .collect();
    fan_out(&jobs).into_iter().map(|r| r.ok().map(|g| g.text)).collect()
}

/// The options of a multiple-choice prompt, if it is one.
fn options_of(input: &Input) -> Option<Vec<String>> {
    tessera_sdk::mcq::parse(&question(input)).map(|q| q.options)
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

/// The aggregation prompt: the question, each solution in solver order,
/// and the instruction. A failed solver is shown as such, so the layout
/// the aggregator was trained on never shifts.
fn aggregation_input(input: &Input, solutions: &[Option<String>], mcq: bool) -> Input {
    let mut s = format!(
        "Question:\n{}\n\nHere are {} candidate solutions from different assistants.\n",
        question(input).trim(),
        solutions.len()
    );
    for (i, t) in solutions.iter().enumerate() {
        let body = t.as_deref().map(|t| clip(t.trim(), 1200)).unwrap_or("(no answer)");
        s.push_str(&format!("\nSolution {}:\n{}\n", i + 1, body));
    }
    s.push_str(
        "\nThe majority can be wrong. Check the solutions against the question and give the correct final answer.",
    );
    if mcq {
        s.push_str(" Answer with the letter of the correct option.");
    }
    user(s)
}

/// The kept aggregator's name: the module, then a hash of the dev items,
/// the solvers, the base and the settings, so a re-fit on the same data
/// finds its own earlier member instead of training a twin.
fn kept_name(dev: &[Example], solvers: &[String], base: &str, cfg_line: &str) -> String {
    let questions: Vec<String> = dev.iter().map(|e| question(&e.input)).collect();
    let parts = questions
        .iter()
        .zip(dev)
        .flat_map(|(q, e)| [q.as_bytes(), e.answer.as_bytes()])
        .chain(solvers.iter().map(|s| s.as_bytes()))
        .chain([base.as_bytes(), cfg_line.as_bytes()]);
    format!("agglm-{:016x}", state::fingerprint(parts))
}

/// One dev set: the item, its solutions, and whether their majority is right.
struct DevSet<'a> {
    example: &'a Example,
    solutions: Vec<Option<String>>,
    majority_right: bool,
}

impl Strategy for AggLm {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let settings = Settings::read(&cfg, req.params.seed.unwrap_or(0))?;
        let fitted: Option<Fitted> = state::load(STATE, req.state.as_deref())?;
        let granted: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        // The solvers fit trained on, where still granted; else today's.
        let (solver_ids, aggregator, trained) = match &fitted {
            Some(f) if granted.contains(&f.aggregator) => {
                let s: Vec<String> = f.solvers.iter().filter(|s| granted.contains(s)).cloned().collect();
                if s.is_empty() {
                    (
                        solvers(&cfg)?.into_iter().map(|m| m.id).collect(),
                        f.aggregator.clone(),
                        f.trained,
                    )
                } else {
                    (s, f.aggregator.clone(), f.trained)
                }
            }
            Some(f) => {
                trace(
                    None,
                    "fit",
                    format!(
                        "the fitted aggregator `{}` is not granted (not kept on this host?): the untrained base aggregates",
                        f.aggregator
                    ),
                );
                (
                    solvers(&cfg)?.into_iter().map(|m| m.id).collect(),
                    aggregator_base(&cfg)?.id,
                    false,
                )
            }
            None => (
                solvers(&cfg)?.into_iter().map(|m| m.id).collect(),
                aggregator_base(&cfg)?.id,
                false,
            ),
        };
        if let Some(f) = &fitted {
            trace(None, "fit", f.summary.clone());
        }
        let options = options_of(&req.input);
        let solutions = solve(&req.input, &solver_ids, &settings);
        for (m, t) in solver_ids.iter().zip(&solutions) {
            let shown = t
                .as_deref()
                .and_then(|t| answer_of(t, options.as_deref()))
                .unwrap_or_else(|| "-".into());
            trace(Some(m), "solver", format!("answers `{}`", clip(&shown, 40)));
        }
        let majority = majority(&solutions, options.as_deref());
        let params = GenParams {
            max_tokens: Some(settings.aggregate_tokens),
            temperature: Some(0.0),
            top_p: None,
            top_k: None,
            seed: Some(settings.seed),
            stop: req.params.stop.clone(),
        };
        let agg_input = aggregation_input(&req.input, &solutions, options.is_some());
        let aggregated = generate(&aggregator, &agg_input, &params).map(|g| g.text);
        let agg_answer = aggregated.as_ref().ok().and_then(|t| answer_of(t, options.as_deref()));
        // An aggregation without a readable answer falls back to the
        // solvers' majority: the method never answers worse than "nothing".
        let (text, source) = match (&aggregated, &agg_answer) {
            (Ok(t), Some(_)) => (t.clone(), "aggregator"),
            _ => match &majority {
                Some((_, i)) => (
                    solutions[*i].clone().unwrap_or_default(),
                    "majority (aggregation unreadable)",
                ),
                None => {
                    return Err(Error::ModuleFailed(
                        "no solver and no aggregation gave an answer".into(),
                    ))
                }
            },
        };
        trace(
            Some(&aggregator),
            "aggregator",
            format!(
                "{} aggregator answers `{}`; solvers' majority `{}`; reply from the {source}",
                if trained { "trained" } else { "untrained" },
                agg_answer.as_deref().unwrap_or("-"),
                majority.as_ref().map_or("-", |m| m.0.as_str())
            ),
        );
        let annotations = vec![
            ("aggregator".to_string(), aggregator.clone()),
            ("trained".to_string(), trained.to_string()),
            ("answer".to_string(), agg_answer.unwrap_or_default()),
            ("majority".to_string(), majority.map(|m| m.0).unwrap_or_default()),
            ("source".to_string(), source.to_string()),
            ("solvers".to_string(), solver_ids.join(",")),
        ];
        Ok(Response { text, annotations })
    }

    /// Solves the dev items, picks the sets whose majority is wrong plus as
    /// many easy ones (`easy_ratio`), samples `group` aggregations of each
    /// from the aggregator, rewards the right ones, trains it by GRPO and
    /// keeps it by name.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let settings = Settings::read(&cfg, 0)?;
        let limit: usize = cfg.parse_within("fit_max_items", 24, 1..=512, "use 1..=512 dev items")?;
        let group: u32 = cfg.parse_within("group", 4u32, 2..=16, "use 2..=16 aggregations per set")?;
        let steps: u32 = cfg.parse_within("steps", 8u32, 1..=400, "use 1..=400 optimizer steps")?;
        let batch: u32 = cfg.parse_within("batch", 2u32, 1..=16, "use 1..=16 groups per step")?;
        let lr: f64 = cfg.parse_within("lr", 2e-4, 1e-7..=1e-2, "use a learning rate in 1e-7..=1e-2")?;
        let temperature: f32 = cfg.parse_within(
            "sample_temperature",
            1.0f32,
            0.05..=2.0,
            "use a temperature in 0.05..=2",
        )?;
        let easy_ratio: f64 = cfg.parse_within("easy_ratio", 1.0, 0.0..=8.0, "use 0..=8 easy sets per hard one")?;
        let keep_it = cfg.parse("keep", true)?;
        let dev = &dev[..dev.len().min(limit)];
        let solver_ids: Vec<String> = solvers(&cfg)?.into_iter().map(|m| m.id).collect();
        let base = aggregator_base(&cfg)?;
        let cfg_line = format!(
            "{}/{}/{group}/{steps}/{batch}/{lr}/{temperature}/{easy_ratio}/{}",
            settings.solve_tokens, settings.aggregate_tokens, settings.seed
        );
        let name = kept_name(dev, &solver_ids, &base.id, &cfg_line);
        let done = |aggregator: String, trained: bool, summary: String| {
            trace(None, "fit", summary.clone());
            state::save(
                STATE,
                &Fitted {
                    aggregator,
                    base: base.id.clone(),
                    trained,
                    solvers: solver_ids.clone(),
                    summary,
                },
            )
            .map(Some)
        };
        // A member this fit kept before (same data, same settings) is reused.
        if generators().iter().any(|m| m.id == name) {
            return done(
                name.clone(),
                true,
                format!("reusing `{name}`, kept by an earlier identical fit"),
            );
        }
        // 1. Solve every dev item once per solver.
        let sets: Vec<DevSet> = dev
            .iter()
            .map(|e| {
                let solutions = solve(&e.input, &solver_ids, &settings);
                let opts = options_of(&e.input);
                let majority_right = majority(&solutions, opts.as_deref())
                    .and_then(|(_, i)| solutions[i].clone())
                    .is_some_and(|t| is_correct(&t, e));
                DevSet {
                    example: e,
                    solutions,
                    majority_right,
                }
            })
            .collect();
        // 2. Hard sets (majority wrong), balanced with easy ones.
        let hard: Vec<&DevSet> = sets.iter().filter(|s| !s.majority_right).collect();
        let easy_n = ((hard.len() as f64) * easy_ratio).round() as usize;
        let easy: Vec<&DevSet> = sets.iter().filter(|s| s.majority_right).take(easy_n).collect();
        let chosen: Vec<&DevSet> = hard.iter().chain(easy.iter()).copied().collect();
        let picked_note = format!(
            "{} dev sets: {} with a wrong majority, {} easy kept of {}",
            sets.len(),
            hard.len(),
            easy.len(),
            sets.len() - hard.len()
        );
        if chosen.is_empty() {
            return done(
                base.id.clone(),
                false,
                format!("{picked_note}; nothing to train on: the untrained base aggregates"),
            );
        }
        // 3. Sample aggregations from the base and reward the right ones.
        let mut groups = Vec::new();
        let (mut right, mut total) = (0usize, 0usize);
        for (n, set) in chosen.iter().enumerate() {
            let input = aggregation_input(&set.example.input, &set.solutions, !set.example.choices.is_empty());
            let jobs: Vec<Job> = (0..group)
                .map(|j| Job {
                    model: base.id.clone(),
                    input: input.clone(),
                    params: GenParams {
                        max_tokens: Some(settings.aggregate_tokens),
                        temperature: Some(temperature),
                        top_p: None,
                        top_k: None,
                        seed: Some(settings.seed.wrapping_add((n as u64) << 8 | u64::from(j))),
                        stop: Vec::new(),
                    },
                })
                .collect();
            let samples: Vec<Sample> = fan_out(&jobs)
                .into_iter()
                .filter_map(|r| r.ok())
                .map(|g| {
                    let reward = if is_correct(&g.text, set.example) { 1.0 } else { 0.0 };
                    Sample { text: g.text, reward }
                })
                .collect();
            right += samples.iter().filter(|s| s.reward > 0.5).count();
            total += samples.len();
            // All right or all wrong: no advantage to learn from.
            let mixed = samples.iter().any(|s| s.reward > 0.5) && samples.iter().any(|s| s.reward < 0.5);
            if mixed {
                groups.push(SampleGroup { input, samples });
            }
        }
        let sampled_note = format!(
            "{picked_note}; {right}/{total} sampled aggregations right, {} of {} sets mixed",
            groups.len(),
            chosen.len()
        );
        if groups.is_empty() {
            return done(
                base.id.clone(),
                false,
                format!("{sampled_note}: no set had both right and wrong aggregations, nothing to learn; the untrained base aggregates"),
            );
        }
        // 4. GRPO, then keep the aggregator for the test requests.
        let mut params = Params::steps(steps);
        params.batch = Some(batch);
        params.lr = Some(lr);
        params.max_len = Some(768);
        params.seed = Some(settings.seed);
        let report = training::grpo(&base.id, groups, params)?;
        let trained_note = format!(
            "{sampled_note}; GRPO on `{}`: {} steps, {} tokens, surrogate loss {:.4} -> {:.4}, {} ms",
            base.id, report.steps, report.tokens, report.first_loss, report.last_loss, report.millis
        );
        if !keep_it {
            return done(
                base.id.clone(),
                false,
                format!(
                    "{trained_note}; keep=false: the trained aggregator goes with this request, the base aggregates"
                ),
            );
        }
        match training::keep(&report.model, &name) {
            Ok(()) => done(name.clone(), true, format!("{trained_note}; kept as `{name}`")),
            Err(e) => done(
                base.id.clone(),
                false,
                format!("{trained_note}; could not keep it ({e:?}): the untrained base aggregates"),
            ),
        }
    }
}

export_strategy!(AggLm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregation_prompt_shows_every_solver_in_order() {
        let input = user("Which colour is the sky?\nA) red\nB) blue\nC) green");
        let Input::Chat(m) = aggregation_input(&input, &[Some("B".into()), None], true) else {
            panic!("a chat");
        };
        let t = &m[0].content;
        assert!(
            t.contains("Solution 1:\nB") && t.contains("Solution 2:\n(no answer)"),
            "{t}"
        );
        assert!(t.ends_with("letter of the correct option."), "{t}");
    }

    #[test]
    fn the_kept_name_is_a_plain_name_that_changes_with_the_data() {
        let e = |a: &str| Example {
            input: user("q"),
            answer: a.into(),
            choices: Vec::new(),
        };
        let a = kept_name(&[e("1")], &["m".into()], "b", "x");
        let b = kept_name(&[e("2")], &["m".into()], "b", "x");
        assert_ne!(a, b);
        assert_eq!(a, kept_name(&[e("1")], &["m".into()], "b", "x"));
        assert!(a.starts_with("agglm-") && a.len() == 22, "{a}");
    }
}

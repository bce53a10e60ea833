//! multiagent-finetune: a society of agents, each a generator and a
//! critic. Generators answer; for a few rounds each critic reads the
//! others' answers and updates its agent's; the last round's plurality is
//! the answer. `fit` debates on the dev items, takes the final plurality as
//! the label, and fine-tunes every agent's generator on its own first
//! answers that agree with the label and its critic on its own final
//! responses that do, so the agents specialise on their own data. See
//! README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer::{answer_of, is_correct, plurality};
use tessera_sdk::dev::pick_list;
use tessera_sdk::training::{self, is_trained, trainable, Params, SftExample};
use tessera_sdk::*;

struct MultiagentFinetune;

/// State format version.
const STATE: u8 = 1;

/// One agent: the members that play its two roles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Agent {
    /// The member it was made from.
    base: String,
    /// Answers first (a kept fine-tuned member, or the base).
    generator: String,
    /// Updates the agent's answer in the debate rounds.
    critic: String,
}

/// What `fit` learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fitted {
    agents: Vec<Agent>,
    /// What fit did, for the trace.
    summary: String,
}

/// Settings shared by `run` and `fit`.
#[derive(Debug, Clone)]
struct Settings {
    rounds: u32,
    max_tokens: u32,
    temperature: f32,
    seed: u64,
}

impl Settings {
    fn read(cfg: &Config, seed: u64) -> Result<Settings, Error> {
        Ok(Settings {
            rounds: cfg.parse_within("rounds", 1u32, 1..=4, "use 1..=4 debate rounds")?,
            max_tokens: cfg.parse_within("max_tokens", 96u32, 1..=1024, "use 1..=1024 tokens")?,
            temperature: cfg.parse_within("temperature", 0.7f32, 0.0..=2.0, "use a temperature in 0..=2")?,
            seed: cfg.parse("seed", seed)?,
        })
    }

    /// Agent `i`'s decoding in round `r`: its own seed, so copies of one
    /// base answer differently.
    fn params(&self, round: u32, agent: usize, stop: &[String]) -> GenParams {
        GenParams {
            max_tokens: Some(self.max_tokens),
            temperature: Some(self.temperature),
            top_p: None,
            top_k: None,
            seed: Some(self.seed.wrapping_add(u64::from(round) << 16 | agent as u64)),
            stop: stop.to_vec(),
        }
    }
}

/// The agents' bases: config `models` (trainable contributions), each
/// `copies` times. At least two agents make a debate.
fn bases(cfg: &Config) -> Result<Vec<String>, Error> {
    let pool: Vec<ModelInfo> = generators()
        .into_iter()
        .filter(|m| !is_trained(m) && trainable(m))
        .collect();
    let picked = pick_list(cfg, "models", &pool)?;
    let copies: usize = cfg.parse_within("copies", 1usize, 1..=8, "use 1..=8 agents per base")?;
    let out: Vec<String> = picked
        .iter()
        .flat_map(|m| std::iter::repeat_n(m.id.clone(), copies))
        .collect();
    if out.len() < 2 {
        return Err(Error::InvalidParams(format!(
            "multiagent-finetune needs at least two agents and has {} (granted llama or qwen2 members x `copies`): \
             grant more members or set copies=2 or more",
            out.len()
        )));
    }
    Ok(out)
}

/// The critic's prompt in a debate round: the question, the agent's own
/// previous answer and the other agents' ones.
fn critic_input(input: &Input, own: Option<&str>, others: &[Option<&str>]) -> Input {
    let mut s = format!(
        "Question:\n{}\n\nYour previous answer:\n{}\n",
        question(input).trim(),
        own.unwrap_or("(none)").trim()
    );
    s.push_str("\nOther agents answered:\n");
    for (i, o) in others.iter().enumerate() {
        s.push_str(&format!("[agent {}] {}\n", i + 1, o.unwrap_or("(no answer)").trim()));
    }
    s.push_str("\nUsing their answers as extra advice, check yours and give an updated answer.");
    if options_of(input).is_some() {
        s.push_str(" Answer with the letter of the correct option.");
    }
    user(s)
}

fn options_of(input: &Input) -> Option<Vec<String>> {
    tessera_sdk::mcq::parse(&question(input)).map(|q| q.options)
}

/// One debate: `rounds[0]` the generators' answers, `rounds[r]` the
/// critics' updates, each with the critic prompt it answered (`None` for a
/// failed call).
struct Debate {
    answers: Vec<Vec<Option<String>>>,
    prompts: Vec<Vec<Input>>,
}

fn debate(input: &Input, agents: &[Agent], s: &Settings, stop: &[String]) -> Debate {
    let jobs: Vec<Job> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| Job {
            model: a.generator.clone(),
            input: input.clone(),
            params: s.params(0, i, stop),
        })
        .collect();
    let first: Vec<Option<String>> = fan_out(&jobs).into_iter().map(|r| r.ok().map(|g| g.text)).collect();
    let mut answers = vec![first];
    let mut prompts = vec![vec![input.clone(); agents.len()]];
    for round in 1..=s.rounds {
        let last = &answers[answers.len() - 1];
        let inputs: Vec<Input> = (0..agents.len())
            .map(|i| {
                let others: Vec<Option<&str>> = (0..agents.len())
                    .filter(|j| *j != i)
                    .map(|j| last[j].as_deref())
                    .collect();
                critic_input(input, last[i].as_deref(), &others)
            })
            .collect();
        let jobs: Vec<Job> = agents
            .iter()
            .zip(&inputs)
            .enumerate()
            .map(|(i, (a, p))| Job {
                model: a.critic.clone(),
                input: p.clone(),
                params: s.params(round, i, stop),
            })
            .collect();
        let next: Vec<Option<String>> = fan_out(&jobs).into_iter().map(|r| r.ok().map(|g| g.text)).collect();
        answers.push(next);
        prompts.push(inputs);
    }
    Debate { answers, prompts }
}

/// Agents of the bases, each playing both roles with its base.
fn base_agents(bases: &[String]) -> Vec<Agent> {
    bases
        .iter()
        .map(|b| Agent {
            base: b.clone(),
            generator: b.clone(),
            critic: b.clone(),
        })
        .collect()
}

/// Trains `base` on `data` and keeps it as `name`; the member to use and a
/// note. Without data, or when the operator keeps nothing, the base.
fn tune(base: &str, data: Vec<SftExample>, name: &str, params: &Params1) -> Result<(String, String), Error> {
    if data.is_empty() {
        return Ok((base.to_string(), "no agreeing example: stays the base".into()));
    }
    let n = data.len();
    let mut p = Params::steps(params.steps);
    p.batch = Some(params.batch);
    p.lr = Some(params.lr);
    p.max_len = Some(512);
    let report = training::sft(base, data, p)?;
    let note = format!(
        "{n} examples, {} steps, loss {:.3} -> {:.3}",
        report.steps, report.first_loss, report.last_loss
    );
    match training::keep(&report.model, name) {
        // The kept member is served under its name; the request's own
        // handle is let go at once, so that the next role's run does not
        // count this one against the request's memory.
        Ok(()) => {
            let _ = training::release(&report.model);
            Ok((name.to_string(), format!("{note}, kept as `{name}`")))
        }
        Err(e) => {
            let _ = training::release(&report.model);
            Ok((base.to_string(), format!("{note}, not kept ({e:?}): stays the base")))
        }
    }
}

/// The optimiser settings of `fit`'s runs.
struct Params1 {
    steps: u32,
    batch: u32,
    lr: f64,
}

impl Strategy for MultiagentFinetune {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let settings = Settings::read(&cfg, req.params.seed.unwrap_or(0))?;
        let fitted: Option<Fitted> = state::load(STATE, req.state.as_deref())?;
        let granted: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        let agents = match &fitted {
            Some(f)
                if f.agents
                    .iter()
                    .all(|a| granted.contains(&a.generator) && granted.contains(&a.critic)) =>
            {
                trace(None, "fit", f.summary.clone());
                f.agents.clone()
            }
            Some(_) => {
                trace(
                    None,
                    "fit",
                    "the fitted agents are not all granted (not kept on this host?): the bases debate",
                );
                base_agents(&bases(&cfg)?)
            }
            None => base_agents(&bases(&cfg)?),
        };
        let options = options_of(&req.input);
        let d = debate(&req.input, &agents, &settings, &req.params.stop);
        for (r, round) in d.answers.iter().enumerate() {
            let shown: Vec<String> = round
                .iter()
                .map(|t| {
                    t.as_deref()
                        .and_then(|t| answer_of(t, options.as_deref()))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            let role = if r == 0 { "generators" } else { "critics" };
            trace(None, role, format!("round {r}: [{}]", shown.join(", ")));
        }
        let last = &d.answers[d.answers.len() - 1];
        let (answer, at) = plurality(last, options.as_deref())
            .or_else(|| plurality(&d.answers[0], options.as_deref()))
            .ok_or_else(|| Error::ModuleFailed("no agent gave an answer".into()))?;
        let text = last
            .get(at)
            .cloned()
            .flatten()
            .or_else(|| d.answers[0].get(at).cloned().flatten())
            .unwrap_or_else(|| answer.clone());
        let tuned = agents
            .iter()
            .filter(|a| a.generator != a.base || a.critic != a.base)
            .count();
        Ok(Response {
            text,
            annotations: vec![
                ("answer".into(), answer),
                ("agents".into(), agents.len().to_string()),
                ("tuned_agents".into(), tuned.to_string()),
                ("rounds".into(), settings.rounds.to_string()),
                (
                    "generators".into(),
                    agents
                        .iter()
                        .map(|a| a.generator.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                (
                    "critics".into(),
                    agents.iter().map(|a| a.critic.as_str()).collect::<Vec<_>>().join(","),
                ),
            ],
        })
    }

    /// Debates on the dev items with the bases, labels each by its final
    /// plurality (or the reference with `label=gold`), and fine-tunes each
    /// agent's generator and critic on its own agreeing outputs.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let settings = Settings::read(&cfg, 0)?;
        let limit: usize = cfg.parse_within("fit_max_items", 16, 1..=512, "use 1..=512 dev items")?;
        let train = Params1 {
            steps: cfg.parse_within("steps", 4u32, 1..=400, "use 1..=400 optimizer steps")?,
            batch: cfg.parse_within("batch", 4u32, 1..=16, "use 1..=16 examples per step")?,
            lr: cfg.parse_within("lr", 5e-4, 1e-7..=1e-2, "use a learning rate in 1e-7..=1e-2")?,
        };
        let gold = match cfg.get("label").unwrap_or("majority") {
            "majority" => false,
            "gold" => true,
            other => {
                return Err(config::invalid(
                    "label",
                    other,
                    "use `majority` (the paper's) or `gold`",
                ))
            }
        };
        let dev = &dev[..dev.len().min(limit)];
        let bases = bases(&cfg)?;
        let agents = base_agents(&bases);
        let cfg_line = format!(
            "{}/{}/{}/{}/{}/{}/{}/{gold}",
            settings.rounds,
            settings.max_tokens,
            settings.temperature,
            settings.seed,
            train.steps,
            train.batch,
            train.lr
        );
        let questions: Vec<String> = dev.iter().map(|e| question(&e.input)).collect();
        let parts = questions
            .iter()
            .zip(dev)
            .flat_map(|(q, e)| [q.as_bytes(), e.answer.as_bytes()])
            .chain(bases.iter().map(|b| b.as_bytes()))
            .chain([cfg_line.as_bytes()]);
        let tag = format!("maft-{:016x}", state::fingerprint(parts));
        let name = |i: usize, role: &str| format!("{tag}-{i}-{role}");
        let save = |agents: Vec<Agent>, summary: String| {
            trace(None, "fit", summary.clone());
            state::save(STATE, &Fitted { agents, summary }).map(Some)
        };
        // An identical earlier fit kept its members: reuse them.
        let granted: Vec<String> = generators().into_iter().map(|m| m.id).collect();
        if (0..bases.len()).all(|i| granted.contains(&name(i, "gen")) && granted.contains(&name(i, "crit"))) {
            let reused = bases
                .iter()
                .enumerate()
                .map(|(i, b)| Agent {
                    base: b.clone(),
                    generator: name(i, "gen"),
                    critic: name(i, "crit"),
                })
                .collect();
            return save(reused, format!("reusing `{tag}-*`, kept by an earlier identical fit"));
        }
        // 1. Debate on dev with the bases; label by the final plurality.
        let n = agents.len();
        let mut gen_data: Vec<Vec<SftExample>> = vec![Vec::new(); n];
        let mut crit_data: Vec<Vec<SftExample>> = vec![Vec::new(); n];
        let mut label_right = 0usize;
        for e in dev {
            let opts = options_of(&e.input);
            let d = debate(&e.input, &agents, &settings, &[]);
            let last = d.answers.len() - 1;
            let label = if gold {
                None
            } else {
                match plurality(&d.answers[last], opts.as_deref()) {
                    Some((a, i)) => {
                        if d.answers[last][i].as_deref().is_some_and(|t| is_correct(t, e)) {
                            label_right += 1;
                        }
                        Some(a)
                    }
                    None => continue,
                }
            };
            let agrees = |t: &str| match &label {
                Some(l) => answer_of(t, opts.as_deref()).is_some_and(|a| {
                    if opts.is_some() {
                        a == *l
                    } else {
                        tessera_sdk::answer::normalize(&a) == *l
                    }
                }),
                None => is_correct(t, e),
            };
            for i in 0..n {
                if let Some(t) = d.answers[0][i].as_deref().filter(|t| agrees(t)) {
                    gen_data[i].push(SftExample {
                        input: e.input.clone(),
                        target: t.to_string(),
                    });
                }
                if let Some(t) = d.answers[last][i].as_deref().filter(|t| agrees(t)) {
                    crit_data[i].push(SftExample {
                        input: d.prompts[last][i].clone(),
                        target: t.to_string(),
                    });
                }
            }
        }
        let label_note = if gold {
            format!("{} dev items labelled by their references", dev.len())
        } else {
            format!(
                "{} dev items labelled by the final plurality ({label_right} of them right)",
                dev.len()
            )
        };
        // 2. Fine-tune each agent's two roles on its own agreeing outputs.
        let mut tuned = Vec::with_capacity(n);
        let mut notes = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            let (g, gn) = tune(&a.base, std::mem::take(&mut gen_data[i]), &name(i, "gen"), &train)?;
            let (c, cn) = tune(&a.base, std::mem::take(&mut crit_data[i]), &name(i, "crit"), &train)?;
            notes.push(format!("agent {i} ({}): generator {gn}; critic {cn}", a.base));
            tuned.push(Agent {
                base: a.base.clone(),
                generator: g,
                critic: c,
            });
        }
        save(tuned, format!("{label_note}; {}", notes.join("; ")))
    }
}

export_strategy!(MultiagentFinetune);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critic_sees_its_own_answer_and_every_other_one() {
        let input = user("Which colour is the sky?\nA) red\nB) blue");
        let Input::Chat(m) = critic_input(&input, Some("B"), &[Some("A"), None]) else {
            panic!("a chat");
        };
        let t = &m[0].content;
        assert!(t.contains("Your previous answer:\nB"), "{t}");
        assert!(t.contains("[agent 1] A\n[agent 2] (no answer)"), "{t}");
        assert!(t.ends_with("letter of the correct option."), "{t}");
    }

    #[test]
    fn copies_of_one_base_get_their_own_seeds() {
        let s = Settings {
            rounds: 1,
            max_tokens: 8,
            temperature: 0.7,
            seed: 5,
        };
        assert_ne!(s.params(0, 0, &[]).seed, s.params(0, 1, &[]).seed);
        assert_ne!(s.params(0, 0, &[]).seed, s.params(1, 0, &[]).seed);
    }
}

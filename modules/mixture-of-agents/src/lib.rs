//! mixture-of-agents: layers of proposers, each layer after the first
//! reading the previous layer's answers and synthesising its own; an
//! aggregator writes the final answer from the last layer. See README.md.

use tessera_sdk::chat::{append_to_last_user, base_chat, shown};
use tessera_sdk::dev::{fit_scores, pick_list, pick_one, MemberScore};
use tessera_sdk::*;

struct MixtureOfAgents;

/// Format version of the persisted `fit` state (the members' dev scores).
const STATE_VERSION: u8 = 1;

/// Base models without a chat template see a chat as `role: content` lines;
/// stopping at the next `user:` line keeps them from writing the next turn
/// themselves. Instruction-tuned members never produce it.
const PLAIN_TURN_STOP: &str = "\nuser:";

/// The hyperparameters of one request.
struct Settings {
    layers: u32,
    sampling: Sampling,
}

fn settings(cfg: &Config) -> Result<Settings, Error> {
    let layers: u32 = cfg.parse_within("layers", 2, 1..=8, "use 1..=8 proposer layers")?;
    let sampling = cfg.sampling(Sampling {
        max_tokens: 128,
        temperature: 0.7,
        top_p: 0.9,
    })?;
    Ok(Settings { layers, sampling })
}

/// The aggregate-and-synthesise instruction over the previous layer's
/// answers, numbered (the writers stay anonymous to the reader).
fn synthesis(answers: &[(String, String)]) -> String {
    let mut s = String::from("Answers from other assistants:\n");
    for (i, (_, a)) in answers.iter().enumerate() {
        s.push_str(&format!("{}. {}\n", i + 1, shown(a)));
    }
    s.push_str(
        "\nSome of them may be wrong. Judge them critically and write one accurate answer of your own. Reply with the answer.",
    );
    s
}

/// A distinct, repeatable seed per layer and member.
fn seed_for(base: u64, layer: u32, slot: usize) -> u64 {
    base.wrapping_add(u64::from(layer) * 1_000 + slot as u64)
}

fn gen_params(s: &Settings, req: &Request, seed: u64) -> GenParams {
    let mut stop = req.params.stop.clone();
    if !stop.iter().any(|x| x == PLAIN_TURN_STOP) {
        stop.push(PLAIN_TURN_STOP.into());
    }
    GenParams {
        max_tokens: Some(s.sampling.max_tokens),
        temperature: Some(s.sampling.temperature),
        top_p: Some(s.sampling.top_p),
        top_k: req.params.top_k,
        seed: Some(seed),
        stop,
    }
}

fn ids(answers: &[(String, String)]) -> String {
    answers.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>().join(", ")
}

impl Strategy for MixtureOfAgents {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let s = settings(&cfg)?;
        let scores: Option<Vec<MemberScore>> = state::load(STATE_VERSION, req.state.as_deref())?;
        let base = base_chat(&req.input)?;
        let pool = generators();
        if pool.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let proposers = pick_list(&cfg, "proposers", &pool)?;
        let (i, chosen_by) = pick_one(&cfg, "aggregator", &pool, scores.as_deref())?;
        let aggregator = pool[i].clone();
        let seed = req.params.seed.unwrap_or(0);

        // `(member, answer)` of the latest layer that produced any.
        let mut previous: Vec<(String, String)> = Vec::new();
        for layer in 1..=s.layers {
            let input = if layer == 1 {
                Input::Chat(base.clone())
            } else {
                Input::Chat(append_to_last_user(&base, &synthesis(&previous)))
            };
            let jobs: Vec<Job> = proposers
                .iter()
                .enumerate()
                .map(|(i, m)| Job {
                    model: m.id.clone(),
                    input: input.clone(),
                    params: gen_params(&s, &req, seed_for(seed, layer, i)),
                })
                .collect();
            // One fan-out per layer: the proposers run in parallel.
            let read = if layer == 1 {
                "the question".to_string()
            } else {
                format!("the layer-{} answers of {}", layer - 1, ids(&previous))
            };
            let mut current = Vec::with_capacity(jobs.len());
            for (m, result) in proposers.iter().zip(fan_out(&jobs)) {
                match result {
                    Ok(g) => {
                        trace(
                            Some(&m.id),
                            "proposer",
                            format!("layer {layer} (read {read}): {}", shown(&g.text)),
                        );
                        current.push((m.id.clone(), g.text.trim().to_string()));
                    }
                    Err(e) => trace(Some(&m.id), "proposer", format!("layer {layer} failed: {e}")),
                }
            }
            if current.is_empty() {
                if previous.is_empty() {
                    return Err(Error::ModuleFailed("no proposer answered in layer 1".into()));
                }
                trace(
                    None,
                    "proposer",
                    format!("layer {layer}: no proposer answered; keeping layer {}", layer - 1),
                );
            } else {
                previous = current;
            }
        }

        let chat = append_to_last_user(&base, &synthesis(&previous));
        let params = gen_params(&s, &req, seed_for(seed, s.layers + 1, 0));
        // The aggregator writes the answer as a streaming caller reads it
        // (`output`); its text is returned as generated, so the answer
        // begins with what was streamed.
        let (text, aggregated) = match output::generate_streamed(&aggregator.id, &Input::Chat(chat), &params) {
            Ok(g) => {
                trace(
                    Some(&aggregator.id),
                    "aggregator",
                    format!(
                        "chosen by {chosen_by}; synthesised the answers of {}: {}",
                        ids(&previous),
                        shown(&g.text)
                    ),
                );
                (g.text, true)
            }
            Err(e) => {
                // Fall back to the aggregator's own last answer, else the
                // first one of the last layer.
                let (id, a) = previous
                    .iter()
                    .find(|(id, _)| *id == aggregator.id)
                    .or_else(|| previous.first())
                    .cloned()
                    .unwrap_or_default();
                trace(
                    Some(&aggregator.id),
                    "aggregator",
                    format!("aggregation failed ({e}); returning the last-layer answer of {id}"),
                );
                (a, false)
            }
        };
        Ok(Response {
            text,
            annotations: vec![
                ("layers".into(), s.layers.to_string()),
                (
                    "proposers".into(),
                    proposers.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(","),
                ),
                ("aggregator".into(), aggregator.id.clone()),
                ("aggregator_chosen_by".into(), chosen_by),
                ("aggregated".into(), aggregated.to_string()),
            ],
        })
    }

    /// Scores every generative member on the dev examples (greedy); `run`
    /// lets the best one aggregate.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        fit_scores(&dev, &config, STATE_VERSION)
    }
}

export_strategy!(MixtureOfAgents);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesis_numbers_the_answers_without_names() {
        let s = synthesis(&[("a".into(), " Paris ".into()), ("b".into(), String::new())]);
        assert!(s.contains("1. Paris\n") && s.contains("2. (no answer)\n"), "{s}");
        assert!(!s.contains("[a]"));
    }
}

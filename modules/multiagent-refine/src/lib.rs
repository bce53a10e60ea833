//! multiagent-refine: every member answers, then for a few rounds every
//! member reads the others' latest answers and refines its own; a summariser
//! writes the final answer from the last round. See README.md.
//!
//! Each member keeps one growing chat: round `r` appends a user turn with the
//! others' round `r - 1` answers to the chat that already holds the member's
//! own earlier answers, so its own previous answer is never repeated in the
//! prompt and the earlier turns stay a reusable prefix for the host.

use tessera_sdk::chat::{append_to_last_user, base_chat, message, shown};
use tessera_sdk::dev::{fit_scores, pick_list, pick_one, MemberScore};
use tessera_sdk::*;

struct MultiagentRefine;

/// Format version of the persisted `fit` state (the members' dev scores).
const STATE_VERSION: u8 = 1;

/// Base models without a chat template see a chat as `role: content` lines;
/// stopping at the next `user:` line keeps them from writing the next turn
/// themselves. Instruction-tuned members never produce it.
const PLAIN_TURN_STOP: &str = "\nuser:";

/// The hyperparameters of one request.
struct Settings {
    rounds: u32,
    sampling: Sampling,
}

fn settings(cfg: &Config) -> Result<Settings, Error> {
    let rounds: u32 = cfg.parse_within("rounds", 2, 1..=8, "use 1..=8 rounds (1 = answer once, then summarise)")?;
    let sampling = cfg.sampling(Sampling {
        max_tokens: 128,
        temperature: 0.7,
        top_p: 0.9,
    })?;
    Ok(Settings { rounds, sampling })
}

/// `[member] answer` lines.
fn tagged(answers: &[(&str, &str)]) -> String {
    answers.iter().map(|(id, a)| format!("[{id}] {}\n", shown(a))).collect()
}

/// The user turn of a refinement round: the other members' previous answers
/// (the member's own is already in its chat).
fn refine_turn(others: &[(&str, &str)]) -> String {
    if others.is_empty() {
        return "Check your answer above and improve it. Reply with your refined answer.".into();
    }
    format!(
        "Other agents answered the same question:\n{}\nUse their answers to check and improve yours. Reply with your refined answer.",
        tagged(others)
    )
}

/// The summariser's instruction, with every member's final answer.
fn summary_turn(finals: &[(&str, &str)]) -> String {
    format!(
        "Final answers of the agents:\n{}\nCombine them into the single best answer to the question. Reply with the final answer.",
        tagged(finals)
    )
}

/// A distinct, repeatable seed per round and member.
fn seed_for(base: u64, round: u32, slot: usize) -> u64 {
    base.wrapping_add(u64::from(round) * 1_000 + slot as u64)
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

/// Where the debate stands: each member's own conversation and latest
/// answer, by member index; `None` = the member failed in round 0 and takes
/// no further part.
struct Debate {
    chats: Vec<Vec<Message>>,
    answers: Vec<Option<String>>,
}

impl Debate {
    /// Before round 0: every chat is the question, nobody has answered.
    fn new(base: &[Message], n: usize) -> Self {
        Debate {
            chats: vec![base.to_vec(); n],
            answers: vec![None; n],
        }
    }

    /// `(member, latest answer)` of every member still in the debate.
    fn finals<'a>(&'a self, members: &'a [ModelInfo]) -> Vec<(&'a str, &'a str)> {
        members
            .iter()
            .zip(&self.answers)
            .filter_map(|(m, a)| a.as_deref().map(|a| (m.id.as_str(), a)))
            .collect()
    }

    /// The same, without member `i`'s own answer: what `i` is shown in a
    /// refinement round (its own answer is already in its chat).
    fn others<'a>(&'a self, members: &'a [ModelInfo], i: usize) -> Vec<(&'a str, &'a str)> {
        (0..members.len())
            .filter(|&j| j != i)
            .filter_map(|j| self.answers[j].as_deref().map(|a| (members[j].id.as_str(), a)))
            .collect()
    }

    /// Members that failed in round 0, for the `dropped` annotation.
    fn dropped<'a>(&self, members: &'a [ModelInfo]) -> Vec<&'a str> {
        members
            .iter()
            .zip(&self.answers)
            .filter(|(_, a)| a.is_none())
            .map(|(m, _)| m.id.as_str())
            .collect()
    }
}

/// The jobs of one round, and for each job the member's index and the user
/// turn it was given (empty in round 0, where the chat is the question).
/// In a refinement round a member's job is its own chat plus a turn with the
/// others' latest answers; members dropped in round 0 get no job.
fn round_jobs(
    req: &Request,
    s: &Settings,
    members: &[ModelInfo],
    seed: u64,
    round: u32,
    debate: &Debate,
) -> (Vec<Job>, Vec<(usize, String)>) {
    let mut jobs = Vec::with_capacity(members.len());
    let mut asked = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        let mut chat = debate.chats[i].clone();
        let mut turn = String::new();
        if round > 0 {
            if debate.answers[i].is_none() {
                continue;
            }
            turn = refine_turn(&debate.others(members, i));
            chat.push(message("user", turn.clone()));
        }
        jobs.push(Job {
            model: m.id.clone(),
            input: Input::Chat(chat),
            params: gen_params(s, req, seed_for(seed, round, i)),
        });
        asked.push((i, turn));
    }
    (jobs, asked)
}

/// Plays one round: all its jobs in one fan-out, so the members run in
/// parallel. An answer becomes the member's latest and is appended to its
/// chat (with the turn that asked for it). A member that fails in round 0 is
/// dropped from the debate; one that fails later keeps its previous answer
/// and chat. Fails only when nobody answered round 0.
fn play_round(
    req: &Request,
    s: &Settings,
    members: &[ModelInfo],
    seed: u64,
    round: u32,
    debate: &mut Debate,
) -> Result<(), Error> {
    let (jobs, asked) = round_jobs(req, s, members, seed, round, debate);
    let results = fan_out(&jobs);
    let role = if round == 0 { "proposer" } else { "refiner" };
    for (((i, turn), result), job) in asked.into_iter().zip(results).zip(jobs) {
        let id = members[i].id.as_str();
        match result {
            Ok(g) => {
                let note = if round == 0 {
                    format!("round 0 answer: {}", shown(&g.text))
                } else {
                    format!("round {round} answer: {}\nprompt: {turn}", shown(&g.text))
                };
                trace(Some(id), role, note);
                if let Input::Chat(mut chat) = job.input {
                    chat.push(message("assistant", g.text.trim()));
                    debate.chats[i] = chat;
                }
                debate.answers[i] = Some(g.text.trim().to_string());
            }
            Err(e) if round == 0 => {
                trace(Some(id), role, format!("round 0 failed ({e}); dropped from the debate"));
            }
            Err(e) => {
                trace(
                    Some(id),
                    role,
                    format!("round {round} failed ({e}); keeps its previous answer"),
                );
            }
        }
    }
    if debate.answers.iter().all(Option::is_none) {
        return Err(Error::ModuleFailed("no member answered in round 0".into()));
    }
    Ok(())
}

/// The summariser writes the final answer from every member's last answer;
/// returns it and whether it is a summary. A summariser that took part
/// continues its own chat (its earlier turns are a shared prefix); any other
/// member gets the question with the answers appended. If the call fails,
/// the summariser's own last answer is returned, else the first member's:
/// a debated answer is better than none.
fn summarise(
    base: &[Message],
    members: &[ModelInfo],
    debate: &Debate,
    summarizer: &ModelInfo,
    chosen_by: &str,
    params: &GenParams,
) -> (String, bool) {
    let finals = debate.finals(members);
    let turn = summary_turn(&finals);
    let own = members
        .iter()
        .position(|m| m.id == summarizer.id)
        .filter(|&i| debate.answers[i].is_some());
    let chat = match own {
        Some(i) => {
            let mut c = debate.chats[i].clone();
            c.push(message("user", turn));
            c
        }
        None => append_to_last_user(base, &turn),
    };
    match generate(&summarizer.id, &Input::Chat(chat), params) {
        Ok(g) => {
            trace(
                Some(&summarizer.id),
                "summarizer",
                format!(
                    "chosen by {chosen_by}; summarised {} answers: {}",
                    finals.len(),
                    shown(&g.text)
                ),
            );
            (g.text.trim().to_string(), true)
        }
        Err(e) => {
            let (id, a) = own
                .and_then(|i| finals.iter().find(|(id, _)| *id == members[i].id))
                .or_else(|| finals.first())
                .copied()
                .unwrap_or(("", ""));
            trace(
                Some(&summarizer.id),
                "summarizer",
                format!("summary failed ({e}); returning the last answer of {id}"),
            );
            (a.to_string(), false)
        }
    }
}

impl Strategy for MultiagentRefine {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let s = settings(&cfg)?;
        let scores: Option<Vec<MemberScore>> = state::load(STATE_VERSION, req.state.as_deref())?;
        let base = base_chat(&req.input)?;
        let pool = generators();
        if pool.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let members = pick_list(&cfg, "members", &pool)?;
        let (i, chosen_by) = pick_one(&cfg, "summarizer", &pool, scores.as_deref())?;
        let summarizer = pool[i].clone();
        let seed = req.params.seed.unwrap_or(0);

        // Round 0: every member answers. Every later round: each member
        // refines its own answer from the others'.
        let mut debate = Debate::new(&base, members.len());
        for round in 0..s.rounds {
            play_round(&req, &s, &members, seed, round, &mut debate)?;
        }

        // The summariser writes the final answer from the last round.
        let summary_params = gen_params(&s, &req, seed_for(seed, s.rounds, 0));
        let (text, summarized) = summarise(&base, &members, &debate, &summarizer, &chosen_by, &summary_params);

        let mut annotations = vec![
            ("rounds".to_string(), s.rounds.to_string()),
            (
                "members".to_string(),
                members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(","),
            ),
            ("summarizer".to_string(), summarizer.id.clone()),
            ("summarizer_chosen_by".to_string(), chosen_by),
            ("summarized".to_string(), summarized.to_string()),
        ];
        let dropped = debate.dropped(&members);
        if !dropped.is_empty() {
            annotations.push(("dropped".into(), dropped.join(",")));
        }
        Ok(Response { text, annotations })
    }

    /// Scores every generative member on the dev examples (greedy); `run`
    /// lets the best one summarise.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        fit_scores(&dev, &config, STATE_VERSION)
    }
}

export_strategy!(MultiagentRefine);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refine_turn_tags_every_other_answer() {
        let t = refine_turn(&[("a", " Paris "), ("b", "")]);
        assert!(t.contains("[a] Paris\n") && t.contains("[b] (no answer)\n"), "{t}");
        assert!(refine_turn(&[]).contains("improve"));
    }

    #[test]
    fn appends_to_the_last_user_turn() {
        let c = vec![message("user", "q")];
        let out = append_to_last_user(&c, "more");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].content, "q\n\nmore");
        let c = vec![message("user", "q"), message("assistant", "a")];
        assert_eq!(append_to_last_user(&c, "more").len(), 3);
    }
}

//! switch-generation: the answer is written in short segments; before each
//! segment a selector member reads the question and the segments so far
//! (tagged by author) and names the member that writes the next one. See
//! README.md.
//!
//! Continuing text another member started: the guest cannot render a
//! member's own chat template, so by default (`continuation = raw`) every
//! writer after the first gets the host's plain chat format written out as a
//! raw prompt (`role: content` lines, then `assistant: ` and the answer so
//! far) and simply continues the text. The alternative (`continuation =
//! chat`) gives an instruction-tuned writer the answer so far as its own
//! assistant turn plus a user turn asking it to go on; the small chat models
//! of the default pool restart the answer instead of continuing it, so it is
//! not the default. Base members (no chat template) always continue raw.

use tessera_sdk::chat::{base_chat, message};
use tessera_sdk::config::invalid;
use tessera_sdk::dev::{fit_scores, pick_one, MemberScore};
use tessera_sdk::*;

struct SwitchGeneration;

/// Format version of the persisted `fit` state (the members' dev scores).
const STATE_VERSION: u8 = 1;

/// Base models see a chat as `role: content` lines; stopping at the next
/// `user:` line keeps them from writing the next turn themselves.
const PLAIN_TURN_STOP: &str = "\nuser:";

/// What the host appends to the card of a member without a chat template.
const PLAIN_FORMAT_MARK: &str = "plain completion format";

const CONTINUE: &str = "Continue your answer from exactly where it stops. Do not repeat any of it.";

/// How a writer continues text it did not start.
#[derive(Clone, Copy, PartialEq)]
enum Continuation {
    /// A raw prompt in the plain `role: content` format ending in the text.
    Raw,
    /// A chat with the text as the assistant's turn and a request to go on.
    Chat,
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    /// The selector names each segment's writer.
    Select,
    /// Writers take turns in pool order; no selector.
    Alternate,
}

/// The hyperparameters of one request.
struct Settings {
    patch_size: u32,
    max_segments: u32,
    temperature: f32,
    top_p: f32,
    selector_max_tokens: u32,
    policy: Policy,
    continuation: Continuation,
}

fn settings(cfg: &Config) -> Result<Settings, Error> {
    let patch_size: u32 = cfg.parse_within("patch_size", 25, 1..=512, "use 1..=512 tokens per segment")?;
    let max_segments: u32 = cfg.parse_within("max_segments", 8, 1..=64, "use 1..=64 segments")?;
    let (temperature, top_p) = cfg.temperature_top_p(0.7, 0.9)?;
    let selector_max_tokens: u32 = cfg.parse_within("selector_max_tokens", 8, 1..=64, "use 1..=64 tokens")?;
    let policy = match cfg.get("policy").unwrap_or("select").trim() {
        "select" => Policy::Select,
        "alternate" => Policy::Alternate,
        other => return Err(invalid("policy", other, "use `select` or `alternate`")),
    };
    let continuation = match cfg.get("continuation").unwrap_or("raw").trim() {
        "raw" => Continuation::Raw,
        "chat" => Continuation::Chat,
        other => return Err(invalid("continuation", other, "use `raw` or `chat`")),
    };
    Ok(Settings {
        continuation,
        patch_size,
        max_segments,
        temperature,
        top_p,
        selector_max_tokens,
        policy,
    })
}

/// Whether the member has no chat template (the host renders chats for it
/// in the plain `role: content` format).
fn is_plain(m: &ModelInfo) -> bool {
    m.description.contains(PLAIN_FORMAT_MARK)
}

/// What the writer of the next segment is given, and how it was built.
fn continuation(base: &[Message], so_far: &str, writer: &ModelInfo, mode: Continuation) -> (Input, &'static str) {
    if so_far.is_empty() {
        return (Input::Chat(base.to_vec()), "start");
    }
    if mode == Continuation::Raw || is_plain(writer) {
        // The host's plain chat format, written out, ending in the answer so
        // far: every member simply continues the text.
        let mut p = String::new();
        for m in base {
            p.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        p.push_str("assistant: ");
        p.push_str(so_far);
        return (Input::Prompt(p), "raw continuation");
    }
    let mut chat = base.to_vec();
    chat.push(message("assistant", so_far));
    chat.push(message("user", CONTINUE));
    (Input::Chat(chat), "asked to continue")
}

/// Appends a segment, adding the space a fresh turn leaves out between two
/// words or after punctuation (a raw continuation keeps its own spacing).
fn join(so_far: &mut String, segment: &str, raw: bool) {
    if so_far.is_empty() {
        so_far.push_str(segment.trim_start());
        return;
    }
    let seg = if raw { segment } else { segment.trim_start() };
    let last = so_far.chars().last().unwrap_or(' ');
    let first = seg.chars().next().unwrap_or(' ');
    let word_end = last.is_alphanumeric() || ".,;:!?)".contains(last);
    let word_start = first.is_alphanumeric() || first == '(';
    if !raw && word_end && word_start {
        so_far.push(' ');
    }
    so_far.push_str(seg);
}

/// The selector's prompt: the question, the segments so far tagged by their
/// writer's number, and the numbered writers.
fn selector_prompt(question: &str, writers: &[ModelInfo], segments: &[(usize, String)]) -> String {
    let mut s = format!("Question: {question}\n\nAnswer so far, by writer:\n");
    if segments.is_empty() {
        s.push_str("(nothing yet)\n");
    }
    for (w, text) in segments {
        s.push_str(&format!("[writer {}] {}\n", w + 1, text.trim()));
    }
    s.push_str("\nWriters:\n");
    for (i, m) in writers.iter().enumerate() {
        s.push_str(&format!("{}. {}: {}\n", i + 1, m.id, m.description));
    }
    s.push_str("\nWhich writer should write the next part of the answer? Reply with the writer's number only.");
    s
}

/// The writer a selector reply names: the first number that is a valid
/// writer number, else the one writer whose id the reply mentions.
fn parse_choice(reply: &str, writers: &[ModelInfo]) -> Option<usize> {
    let by_number = reply
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty() && s.len() < 4)
        .filter_map(|s| s.parse::<usize>().ok())
        .find(|&i| i >= 1 && i <= writers.len())
        .map(|i| i - 1);
    if by_number.is_some() {
        return by_number;
    }
    let lower = reply.to_lowercase();
    let mut named = writers
        .iter()
        .enumerate()
        .filter(|(_, m)| lower.contains(&m.id.to_lowercase()))
        .map(|(i, _)| i);
    match (named.next(), named.next()) {
        (Some(i), None) => Some(i),
        _ => None,
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::StopSequence => "stop-sequence",
    }
}

/// The answer being written, and how it came about.
struct Draft {
    /// The segments joined (see [`join`]).
    text: String,
    /// Every segment with its writer's index, in order.
    segments: Vec<(usize, String)>,
    /// Segments whose writer the selector did not name validly, so that
    /// round-robin chose instead.
    fallbacks: u32,
    /// Why writing ended: a writer's finish reason, `writer-failed`, or
    /// `max_segments` when every segment ran to `patch_size`.
    stopped: &'static str,
}

/// The writer of segment `k` under `policy = select`: the selector reads the
/// question and the segments so far and names one. A reply that names no
/// valid writer, or a failed call, falls back to round-robin (`k % n`) and
/// counts in `draft.fallbacks`, so that every segment still gets a writer.
fn select_writer(
    selector: &str,
    question: &str,
    writers: &[ModelInfo],
    k: usize,
    s: &Settings,
    draft: &mut Draft,
) -> usize {
    let ask = selector_prompt(question, writers, &draft.segments);
    let round_robin = k % writers.len();
    let params = GenParams {
        max_tokens: Some(s.selector_max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    };
    match generate(selector, &user(ask), &params) {
        Ok(g) => match parse_choice(&g.text, writers) {
            Some(i) => {
                trace(
                    Some(selector),
                    "selector",
                    format!("segment {k}: replied `{}`: chose {}", g.text.trim(), writers[i].id),
                );
                i
            }
            None => {
                draft.fallbacks += 1;
                trace(
                    Some(selector),
                    "selector",
                    format!(
                        "segment {k}: replied `{}`: no valid writer; fallback to round-robin: {}",
                        g.text.trim(),
                        writers[round_robin].id
                    ),
                );
                round_robin
            }
        },
        Err(e) => {
            draft.fallbacks += 1;
            trace(
                Some(selector),
                "selector",
                format!(
                    "segment {k}: selector call failed ({e}); fallback to round-robin: {}",
                    writers[round_robin].id
                ),
            );
            round_robin
        }
    }
}

/// The sampling of writer calls: `patch_size` tokens of the configured
/// sampling, a distinct seed per segment, and a stop at the next `user:`
/// line for base members (see [`PLAIN_TURN_STOP`]).
fn writer_params(s: &Settings, req: &Request, k: usize) -> GenParams {
    let mut stop = req.params.stop.clone();
    if !stop.iter().any(|x| x == PLAIN_TURN_STOP) {
        stop.push(PLAIN_TURN_STOP.into());
    }
    GenParams {
        max_tokens: Some(s.patch_size),
        temperature: Some(s.temperature),
        top_p: Some(s.top_p),
        top_k: req.params.top_k,
        seed: Some(req.params.seed.unwrap_or(0).wrapping_add(k as u64)),
        stop,
    }
}

/// Writer `writer` writes segment `k`, continuing the draft (see
/// [`continuation`]). Returns why writing ends, or `None` when the segment
/// was cut at `patch_size` and the answer goes on. A failed writer ends the
/// answer with what is there; it fails the request only when nothing has
/// been written yet.
fn write_segment(
    base: &[Message],
    writers: &[ModelInfo],
    writer: usize,
    k: usize,
    s: &Settings,
    req: &Request,
    draft: &mut Draft,
) -> Result<Option<&'static str>, Error> {
    let w = &writers[writer];
    let (input, mode) = continuation(base, &draft.text, w, s.continuation);
    match generate(&w.id, &input, &writer_params(s, req, k)) {
        Ok(g) => {
            let finish = finish_name(g.finish);
            trace(
                Some(&w.id),
                "writer",
                format!("segment {k} ({mode}, {finish}): {}", g.text),
            );
            join(&mut draft.text, &g.text, matches!(input, Input::Prompt(_)));
            draft.segments.push((writer, g.text));
            Ok((g.finish != FinishReason::Length).then_some(finish))
        }
        Err(e) => {
            trace(Some(&w.id), "writer", format!("segment {k} failed: {e}"));
            if draft.segments.is_empty() {
                return Err(e);
            }
            Ok(Some("writer-failed"))
        }
    }
}

impl Strategy for SwitchGeneration {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let s = settings(&cfg)?;
        let scores: Option<Vec<MemberScore>> = state::load(STATE_VERSION, req.state.as_deref())?;
        let base = base_chat(&req.input)?;
        let writers = generators();
        if writers.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let (selector, chosen_by) = pick_one(&cfg, "selector", &writers, scores.as_deref())?;
        let question = question(&req.input);

        // Segment by segment: pick a writer, it continues the draft, until a
        // writer ends the answer or `max_segments` is reached.
        let mut draft = Draft {
            text: String::new(),
            segments: Vec::new(),
            fallbacks: 0,
            stopped: "max_segments",
        };
        for k in 0..s.max_segments as usize {
            let writer = match s.policy {
                Policy::Alternate => k % writers.len(),
                Policy::Select => select_writer(&writers[selector].id, &question, &writers, k, &s, &mut draft),
            };
            if let Some(why) = write_segment(&base, &writers, writer, k, &s, &req, &mut draft)? {
                draft.stopped = why;
                break;
            }
        }

        let authors: Vec<&str> = draft.segments.iter().map(|(w, _)| writers[*w].id.as_str()).collect();
        let mut annotations = vec![
            (
                "policy".to_string(),
                match s.policy {
                    Policy::Select => "select",
                    Policy::Alternate => "alternate",
                }
                .to_string(),
            ),
            ("authors".to_string(), authors.join(",")),
            ("segments".to_string(), draft.segments.len().to_string()),
            ("stopped".to_string(), draft.stopped.to_string()),
        ];
        if s.policy == Policy::Select {
            annotations.push(("selector".into(), writers[selector].id.clone()));
            annotations.push(("selector_chosen_by".into(), chosen_by));
            annotations.push(("fallbacks".into(), draft.fallbacks.to_string()));
        }
        Ok(Response {
            text: draft.text.trim().to_string(),
            annotations,
        })
    }

    /// Scores every generative member on the dev examples (greedy); `run`
    /// lets the best one select.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        fit_scores(&dev, &config, STATE_VERSION)
    }
}

export_strategy!(SwitchGeneration);

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> ModelInfo {
        ModelInfo {
            id: id.into(),
            contributor: String::new(),
            description: String::new(),
            domains: vec![],
            architecture: String::new(),
            parameters: 0,
            context_length: 0,
            license: String::new(),
            capabilities: vec![],
        }
    }

    #[test]
    fn selector_replies_parse_numbers_then_names() {
        let w = [member("smol"), member("qwen"), member("gemma")];
        assert_eq!(parse_choice("2", &w), Some(1));
        assert_eq!(parse_choice("Writer 3.", &w), Some(2));
        assert_eq!(parse_choice("7, no: 1", &w), Some(0));
        assert_eq!(parse_choice("let qwen write", &w), Some(1));
        assert_eq!(parse_choice("smol or qwen", &w), None);
        assert_eq!(parse_choice("nobody", &w), None);
    }

    #[test]
    fn join_spaces_fresh_turns_but_not_raw_continuations() {
        let mut s = String::new();
        join(&mut s, " Paris is", false);
        join(&mut s, "the capital.", false);
        assert_eq!(s, "Paris is the capital.");
        join(&mut s, "It", false);
        assert_eq!(s, "Paris is the capital. It");
        join(&mut s, "s river", true);
        assert_eq!(s, "Paris is the capital. Its river");
    }
}

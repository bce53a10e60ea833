//! A contributor's training data: JSONL, one example per line.
//!
//! Two shapes are accepted, and a file may mix them:
//! - `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}`
//!   with roles `system`, `user` and `assistant` and at least one assistant
//!   turn;
//! - `{"prompt": "...", "completion": "..."}`, which is the one-turn chat
//!   `user: prompt` / `assistant: completion`.
//!
//! Every problem is reported with its line number, and the whole file is
//! checked before training starts, so a typo on line 9,000 does not surface
//! an hour into a run.
//!
//! Examples are rendered through the base model's own chat template (or the
//! plain format of a base model without one) and only the assistant's tokens
//! are trained: the model learns to answer, not to predict the questions.

use std::path::Path;

use serde_json::Value;

use super::ContributeError;
use crate::backends::gguf::template::ChatFormat;
use crate::backends::gguf::tokenizer::GgufTokenizer;
use crate::inference::Message;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids of the whole rendered conversation.
    pub ids: Vec<u32>,
    /// `trained[i]`: whether token `i` is one the model learns to produce
    /// (an assistant token).
    pub trained: Vec<bool>,
}

impl Example {
    /// How many tokens carry loss (targets).
    pub fn targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|t| **t).count()
    }
}

fn bad(path: &Path, line: usize, message: impl Into<String>) -> ContributeError {
    ContributeError::Data {
        file: path.display().to_string(),
        line,
        message: message.into(),
    }
}

/// Reads and validates a JSONL file into conversations, each with its
/// 1-based line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Vec<Message>)>, ContributeError> {
    let text = std::fs::read_to_string(path).map_err(|e| ContributeError::Io(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(path, n, format!("not valid JSON: {e}")))?;
        let Some(obj) = v.as_object() else {
            return Err(bad(
                path,
                n,
                "expected a JSON object with `messages`, or `prompt` and `completion`",
            ));
        };
        let conv = if let Some(msgs) = obj.get("messages") {
            if let Some(extra) = obj.keys().find(|k| *k != "messages") {
                return Err(bad(path, n, format!("unexpected key `{extra}` next to `messages`")));
            }
            let Some(list) = msgs.as_array() else {
                return Err(bad(
                    path,
                    n,
                    "`messages` must be a list of {\"role\", \"content\"} objects",
                ));
            };
            let mut conv = Vec::new();
            for (j, m) in list.iter().enumerate() {
                let role = m["role"].as_str().unwrap_or("");
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(bad(
                        path,
                        n,
                        format!(
                            "message {}: role must be `system`, `user` or `assistant`, got {}",
                            j + 1,
                            m["role"]
                        ),
                    ));
                }
                let Some(content) = m["content"].as_str() else {
                    return Err(bad(path, n, format!("message {}: `content` must be a string", j + 1)));
                };
                if content.trim().is_empty() {
                    return Err(bad(path, n, format!("message {}: `content` is empty", j + 1)));
                }
                conv.push(Message {
                    role: role.into(),
                    content: content.into(),
                });
            }
            if !conv.iter().any(|m| m.role == "assistant") {
                return Err(bad(
                    path,
                    n,
                    "no `assistant` message: there is nothing to learn from this example",
                ));
            }
            conv
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            if let Some(extra) = obj.keys().find(|k| *k != "prompt" && *k != "completion") {
                return Err(bad(
                    path,
                    n,
                    format!("unexpected key `{extra}` next to `prompt`/`completion`"),
                ));
            }
            let field = |k: &str| -> Result<String, ContributeError> {
                match obj.get(k).and_then(Value::as_str) {
                    Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
                    _ => Err(bad(path, n, format!("`{k}` must be a non-empty string"))),
                }
            };
            vec![
                Message::user(field("prompt")?),
                Message::assistant(field("completion")?),
            ]
        } else {
            return Err(bad(
                path,
                n,
                "expected `messages`, or `prompt` and `completion` (see `tessera contribute train --help`)",
            ));
        };
        out.push((n, conv));
    }
    if out.is_empty() {
        return Err(bad(path, 0, "the file has no examples"));
    }
    Ok(out)
}

fn encode(tok: &GgufTokenizer, text: &str) -> Result<Vec<u32>, String> {
    tok.tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| e.to_string())
}

/// Renders and tokenizes one conversation, marking the assistant's tokens.
/// Tokens past `max_len` are cut; an example with no assistant token left
/// is an error (raise `--max-len`).
pub fn tokenize(tok: &GgufTokenizer, chat: &ChatFormat, conv: &[Message], max_len: usize) -> Result<Example, String> {
    let bos: Vec<u32> = match (&tok.bos, !chat.is_template() && tok.add_bos) {
        (Some((id, _)), true) => vec![*id],
        _ => Vec::new(),
    };
    let mut ids = bos.clone();
    ids.extend(encode(tok, &chat.render_with(conv, false).map_err(|e| e.to_string())?)?);
    let mut trained = vec![false; ids.len()];
    for (i, m) in conv.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        // The assistant's tokens are those between the render that ends
        // with the prompt for this turn and the render that includes it
        // (so its end-of-turn marker is learned too).
        let start = bos.len() + encode(tok, &chat.render_with(&conv[..i], true).map_err(|e| e.to_string())?)?.len();
        let end = bos.len() + encode(tok, &chat.render_with(&conv[..=i], false).map_err(|e| e.to_string())?)?.len();
        for t in trained.iter_mut().take(end.min(ids.len())).skip(start) {
            *t = true;
        }
    }
    ids.truncate(max_len);
    trained.truncate(max_len);
    let ex = Example { ids, trained };
    if ex.targets() == 0 {
        return Err(format!(
            "no assistant token falls within the first {max_len} tokens: raise --max-len or shorten the example"
        ));
    }
    Ok(ex)
}

/// Tokenizes `input` answered by `target`, marking only the target's
/// tokens (for a chat: the assistant turn the template renders for it, with
/// its end-of-turn marker; for a raw prompt: the target's tokens right
/// after the prompt's, as the members score a continuation). Tokens past
/// `max_len` are cut; an item with no target token left is an error.
pub fn tokenize_answer(
    tok: &GgufTokenizer,
    chat: &ChatFormat,
    input: &crate::inference::Input,
    target: &str,
    max_len: usize,
) -> Result<Example, String> {
    use crate::inference::Input;
    let (mut ids, start) = match input {
        Input::Chat(msgs) => {
            let bos: Vec<u32> = match (&tok.bos, !chat.is_template() && tok.add_bos) {
                (Some((id, _)), true) => vec![*id],
                _ => Vec::new(),
            };
            let mut conv = msgs.clone();
            conv.push(Message::assistant(target.to_string()));
            let prompt = encode(tok, &chat.render_with(msgs, true).map_err(|e| e.to_string())?)?;
            let mut ids = bos.clone();
            ids.extend(encode(
                tok,
                &chat.render_with(&conv, false).map_err(|e| e.to_string())?,
            )?);
            (ids, bos.len() + prompt.len())
        }
        Input::Prompt(p) => {
            let mut ids: Vec<u32> = match (&tok.bos, tok.add_bos) {
                (Some((id, _)), true) => vec![*id],
                _ => Vec::new(),
            };
            ids.extend(encode(tok, p)?);
            let start = ids.len();
            ids.extend(encode(tok, target)?);
            (ids, start)
        }
    };
    let mut trained: Vec<bool> = (0..ids.len()).map(|i| i >= start).collect();
    ids.truncate(max_len);
    trained.truncate(max_len);
    let ex = Example { ids, trained };
    if ex.targets() == 0 {
        return Err(format!(
            "no token of the answer falls within the first {max_len} tokens: raise max-len or shorten the input"
        ));
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file, removed when the guard drops.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(text: &str) -> (Scratch, std::path::PathBuf) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tessera-data-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, text).unwrap();
        (Scratch(dir), p)
    }

    #[test]
    fn both_shapes_are_read() {
        let (_d, p) = write(
            "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n\n{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n",
        );
        let convs = read_jsonl(&p).unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!(convs[0].1[1].content, "4");
        assert_eq!((convs[1].0, convs[1].1.len()), (3, 3));
    }

    #[test]
    fn errors_name_the_line_and_problem() {
        let cases = [
            ("{\"prompt\": \"a\", \"completion\": \"b\"}\n{oops", 2, "not valid JSON"),
            ("{\"prompt\": \"a\"}", 1, "`completion` must be a non-empty string"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}",
                1,
                "no `assistant` message",
            ),
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"a\"}]}",
                1,
                "role must be",
            ),
            ("{\"text\": \"a\"}", 1, "expected `messages`"),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\", \"x\": 1}",
                1,
                "unexpected key `x`",
            ),
            ("[1]", 1, "expected a JSON object"),
        ];
        for (text, line, want) in cases {
            let (_d, p) = write(text);
            let err = read_jsonl(&p).unwrap_err();
            match &err {
                ContributeError::Data { line: l, message, .. } => {
                    assert_eq!(*l, line, "{text}: {err}");
                    assert!(message.contains(want), "{text}: {err}");
                }
                other => panic!("{text}: {other}"),
            }
            assert!(err.to_string().contains(&format!("d.jsonl:{line}")), "{err}");
        }
        let (_d, p) = write("\n\n");
        assert!(read_jsonl(&p).unwrap_err().to_string().contains("no examples"));
    }

    #[test]
    fn only_assistant_tokens_are_trained() {
        // A word-level tokenizer makes the token boundaries visible.
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let words = ["user", "assistant", ":", "hi", "there", "how", "are", "you", "[UNK]"];
        let vocab = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        let tok = GgufTokenizer {
            tokenizer,
            bos: None,
            eos: None,
            add_bos: false,
            end_of_turn: vec![],
        };
        let conv = vec![
            Message::user("hi"),
            Message::assistant("there"),
            Message::user("how are"),
            Message::assistant("you"),
        ];
        let ex = tokenize(&tok, &ChatFormat::Plain, &conv, 64).unwrap();
        // user : hi assistant : there user : how are assistant : you
        assert_eq!(ex.ids, vec![0, 2, 3, 1, 2, 4, 0, 2, 5, 6, 1, 2, 7]);
        let trained: Vec<usize> = (0..ex.ids.len()).filter(|i| ex.trained[*i]).collect();
        assert_eq!(trained, vec![5, 12]);
        assert_eq!(ex.targets(), 2);
        let err = tokenize(&tok, &ChatFormat::Plain, &conv, 3).unwrap_err();
        assert!(err.contains("--max-len"), "{err}");
    }
}

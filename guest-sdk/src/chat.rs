//! Building chats for members: the request as turns, context appended to
//! the user's turn, answers shown in prompts.

use crate::{Error, Input, Message};

/// A chat turn.
pub fn message(role: &str, content: impl Into<String>) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// The request as a chat; a raw prompt becomes one user turn. A chat
/// without a user turn is refused (there is no question to work on).
pub fn base_chat(input: &Input) -> Result<Vec<Message>, Error> {
    let msgs = match input {
        Input::Chat(m) => m.clone(),
        Input::Prompt(p) => vec![message("user", p.clone())],
    };
    if !msgs.iter().any(|m| m.role == "user") {
        return Err(Error::InvalidParams("the request has no user turn".into()));
    }
    Ok(msgs)
}

/// `chat` with `extra` added to its last user turn (or as a new user turn
/// when the chat does not end with one). The question stays first, so
/// prompts built this way share it as a prefix (and its KV cache).
pub fn append_to_last_user(chat: &[Message], extra: &str) -> Vec<Message> {
    let mut out = chat.to_vec();
    match out.last_mut() {
        Some(last) if last.role == "user" => {
            last.content.push_str("\n\n");
            last.content.push_str(extra);
        }
        _ => out.push(message("user", extra)),
    }
    out
}

/// An answer as shown to another member: trimmed, `(no answer)` if empty.
pub fn shown(answer: &str) -> &str {
    let t = answer.trim();
    if t.is_empty() {
        "(no answer)"
    } else {
        t
    }
}

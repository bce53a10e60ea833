//! The server's request bodies: what any client on the network sends to
//! `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/tessera/score` and `/v1/tessera/modules`, parsed and validated as
//! the handlers do before anything is admitted or queued.
//!
//! Oracle: no panic and bounded allocation; every refusal is the caller's
//! fault (a 4xx with a message), never a server error; an accepted body
//! holds to the input rule.

use axum::body::Bytes;

use crate::inference::Input;
use crate::server::chat::Ask;
use crate::server::error::ApiError;
use crate::server::{openai, parse};

fn client_fault(e: &ApiError) {
    assert!(
        e.status.is_client_error(),
        "a body was refused as a server fault: {} {}",
        e.status,
        e.message
    );
    assert!(!e.message.is_empty(), "a refusal without a message");
}

fn judged<T>(r: Result<T, ApiError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            client_fault(&e);
            None
        }
    }
}

/// The first byte picks the route; the rest is the body.
pub fn check(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    match route % 5 {
        0 => {
            let ask = parse::<openai::ChatRequest>(&body)
                .and_then(|req| Ask::new(true, req.model.clone(), Input::Chat(req.messages()?), &req.sampling));
            if let Some(ask) = judged(ask) {
                assert!(ask.input.check_size(0).is_ok());
            }
        }
        1 => {
            let ask = parse::<openai::CompletionRequest>(&body)
                .and_then(|req| Ask::new(false, req.model.clone(), Input::Prompt(req.prompt()?), &req.sampling));
            judged(ask);
        }
        2 => {
            judged(parse::<openai::EmbeddingRequest>(&body).and_then(|r| r.texts()));
        }
        3 => {
            judged(parse::<crate::server::score::ScoreRequest>(&body).and_then(|r| r.input()));
        }
        _ => {
            judged(parse::<crate::server::modules::Upload>(&body).map(|u| u.decode()));
        }
    }
}

/// Seeds: one well-formed body per route.
pub fn seeds() -> Vec<Vec<u8>> {
    let bodies = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"user","content":[{"type":"text","text":"x"}]}],"max_tokens":4,"temperature":0.5,"stop":["\n"],"stream":true,"stream_options":{"include_usage":true},"tessera":{"k":"3"}}"#,
        r#"{"model":"m","prompt":["a","b"],"max_tokens":2,"seed":7,"top_p":0.9}"#,
        r#"{"model":"e","input":["one","two"]}"#,
        r#"{"model":"m","prompt":"Q: 2+2?","continuations":[" 4"," 5"]}"#,
        r#"{"wasm_base64":"AGFzbQ0AAQA=","manifest":"name = \"x\"","signature":"00"}"#,
    ];
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| [&[i as u8][..], b.as_bytes()].concat())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_and_their_truncations_are_judged() {
        for s in super::seeds() {
            for cut in 1..=s.len() {
                super::check(&s[..cut]);
            }
        }
    }
}

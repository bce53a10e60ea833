//! `POST /v1/tessera/score`: a member's log-likelihood of continuations.
//!
//! The OpenAI API has no portable way to ask for the likelihood of a given
//! text (legacy `echo` + `logprobs` is gone from most servers), yet
//! likelihood is what scoring strategies, `cascade`'s confidence and the
//! harness's `--mcq option` need. This extension serves it, so a member on
//! another Tessera node can be a full pool member: the remote backend calls
//! it for `score` when the member's pool entry declares the capability.
//!
//! Request: `{"model": id, "prompt": "..."}` or `{"model": id, "messages":
//! [...]}` (a chat, formatted with the member's template), plus
//! `"continuations": ["...", ...]`. Answer: `{"model": id, "scores":
//! [{"logprob": sum of natural-log token probabilities, "tokens": n,
//! "prompt_tokens": p, "cached_tokens": c}, ...]}` in continuation order,
//! and `usage`: the prompt's tokens once plus every continuation's, which
//! is also what the tenant's daily token quota is charged. Keys,
//! allow-lists, quotas and the request timeout apply as for the other
//! endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{parse, resolve, ApiError, AppState, Caller, Target};
use crate::inference::{CallCtx, Input, Message};

/// Continuations one request may score.
pub const MAX_CONTINUATIONS: usize = 64;
/// Bytes of prompt and continuations together (the input rule's limit).
pub const MAX_BYTES: usize = crate::inference::MAX_INPUT_BYTES;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    /// The member.
    pub model: String,
    /// A raw prompt (or `messages`).
    #[serde(default)]
    pub prompt: Option<String>,
    /// A chat (or `prompt`).
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    /// The texts to score after the prompt.
    pub continuations: Vec<String>,
}

impl ScoreRequest {
    pub(crate) fn input(self) -> Result<(String, Input, Vec<String>), ApiError> {
        let input = match (self.prompt, self.messages) {
            (Some(p), None) => Input::Prompt(p),
            (None, Some(m)) if !m.is_empty() => Input::Chat(m),
            (None, Some(_)) => return Err(ApiError::invalid("messages", "`messages` is empty")),
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "give exactly one of `prompt` (text) or `messages` (a chat)",
                ))
            }
        };
        let n = self.continuations.len();
        if n == 0 || n > MAX_CONTINUATIONS {
            return Err(ApiError::invalid(
                "continuations",
                &format!("{n} continuations: send 1..={MAX_CONTINUATIONS} per request"),
            ));
        }
        // The input rule of every face, continuations included.
        input
            .check_with(&self.continuations)
            .map_err(|e| ApiError::invalid("continuations", &e.to_string()))?;
        Ok((self.model, input, self.continuations))
    }
}

/// The handler.
pub(crate) async fn score(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let work = async {
        let req: ScoreRequest = parse(&body)?;
        let (model, input, continuations) = req.input()?;
        let tenant = caller.0.clone();
        let policy = AppState::policy_of(&tenant);
        let Target::Member(id) = resolve(&st, &caller, &policy, &model, crate::inference::Capability::Score).await?
        else {
            return Err(ApiError::invalid("model", "systems do not score: use a member"));
        };
        let deadline = st.deadline();
        let _admitted = st.admit(&tenant, deadline).await?;
        let ctx = CallCtx::new(deadline, CallCtx::next_requester());
        let bytes = input.counted_bytes() + continuations.iter().map(String::len).sum::<usize>();
        let call = st.rt.models().score(ctx, &id, input, continuations);
        let scores = st.until_cut(&tenant, deadline, bytes, call).await?;
        // The prompt is read once for every continuation, and charged once
        // with them: scoring a long prompt is a long prompt's work.
        let prompt = scores.first().map_or(0, |s| u64::from(s.prompt_tokens));
        let tokens: u64 = prompt + scores.iter().map(|s| u64::from(s.tokens)).sum::<u64>();
        st.charge(&tenant, tokens);
        Ok(Json(json!({
            "object": "tessera.scores",
            "model": id,
            "scores": scores,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        })))
    };
    match work.await {
        Ok(j) => j.into_response(),
        Err(e) => e.into_response(),
    }
}

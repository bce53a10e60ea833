//! The OpenAI wire format: what clients send and what they expect back.
//!
//! Requests are parsed leniently (clients send many optional fields this
//! server does not use; they are ignored) but strictly where a field would
//! change the answer and is not supported (`n > 1`, `logprobs`, token-id
//! prompts): those are refused by name rather than silently dropped.
//! Tessera's additions ride in extension fields: `tessera` in a request
//! (strategy hyperparameters, sent by the `openai` client as
//! `extra_body={"tessera": {...}}`) and `provenance` in a response.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::inference::{GenParams, Message};

use super::ApiError;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The decoding fields chat and completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// Most new tokens (legacy name).
    pub max_tokens: Option<u32>,
    /// Most new tokens (current name).
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k (an extension many servers accept).
    pub top_k: Option<u32>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop sequences.
    pub stop: Option<Stop>,
    /// Number of choices; only 1 is supported.
    pub n: Option<u32>,
    /// Token log-probabilities are not returned by this server.
    pub logprobs: Option<Value>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Strategy hyperparameters (Tessera extension).
    #[serde(default)]
    pub tessera: BTreeMap<String, Value>,
}

impl Sampling {
    /// The host's decoding parameters, or a 400 naming the field.
    pub fn params(&self) -> Result<GenParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                "only n = 1 is supported: send one request per choice",
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        {
            return Err(ApiError::invalid(
                "logprobs",
                "this server does not return token log-probabilities: leave `logprobs` unset",
            ));
        }
        let params = GenParams {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
        };
        params
            .validate()
            .map_err(|e| ApiError::invalid("params", &e.to_string()))?;
        Ok(params)
    }

    /// The `tessera` hyperparameters as the strings modules take.
    pub fn config(&self) -> BTreeMap<String, String> {
        self.tessera
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// A pool member or a system.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Decoding and streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One message; `content` is a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant`.
    pub role: String,
    /// The text, or parts of which only `text` parts are supported.
    #[serde(default)]
    pub content: Value,
}

impl ChatRequest {
    /// The host's chat turns.
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` is empty: send at least one user message",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    other => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].role"),
                            &format!("role `{other}` is not supported: use system, developer, user or assistant"),
                        ))
                    }
                };
                let content = match &m.content {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Array(parts) => {
                        let mut text = String::new();
                        for p in parts {
                            match (
                                p.get("type").and_then(Value::as_str),
                                p.get("text").and_then(Value::as_str),
                            ) {
                                (Some("text"), Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        &format!("messages[{i}].content"),
                                        "only text content parts are supported (no images or audio)",
                                    ))
                                }
                            }
                        }
                        text
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content"),
                            "content must be a string or a list of text parts",
                        ))
                    }
                };
                Ok(Message {
                    role: role.into(),
                    content,
                })
            })
            .collect()
    }
}

/// `prompt` of a completion: one string or a list holding one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One prompt.
    One(String),
    /// Several prompts, or token ids (refused).
    Many(Vec<Value>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A pool member or a system.
    pub model: String,
    /// The prompt.
    pub prompt: PromptField,
    /// Decoding and streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Echoing the prompt back is not supported.
    #[serde(default)]
    pub echo: bool,
}

impl CompletionRequest {
    /// The one prompt, or a 400.
    pub fn prompt(&self) -> Result<String, ApiError> {
        if self.echo {
            return Err(ApiError::invalid("echo", "`echo` is not supported: leave it unset"));
        }
        match &self.prompt {
            PromptField::One(s) => Ok(s.clone()),
            PromptField::Many(v) if v.len() == 1 => v[0].as_str().map(str::to_string).ok_or_else(|| {
                ApiError::invalid("prompt", "token-id prompts are not supported: send the prompt as text")
            }),
            PromptField::Many(_) => Err(ApiError::invalid(
                "prompt",
                "send one prompt per request (batches of prompts are not supported)",
            )),
        }
    }
}

/// `input` of an embeddings request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several texts (or token ids, refused).
    Many(Vec<Value>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// An embedding member.
    pub model: String,
    /// The texts.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32, what the `openai`
    /// Python client asks for unless told otherwise).
    pub encoding_format: Option<String>,
    /// Output dimensions cannot be chosen.
    pub dimensions: Option<u32>,
}

impl EmbeddingRequest {
    /// The texts, or a 400.
    pub fn texts(&self) -> Result<Vec<String>, ApiError> {
        let texts = match &self.input {
            EmbeddingInput::One(s) => vec![s.clone()],
            EmbeddingInput::Many(v) => v
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("input", "token-id inputs are not supported: send the texts as strings")
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        if texts.is_empty() {
            return Err(ApiError::invalid("input", "`input` is empty: send at least one text"));
        }
        if texts.len() > 256 {
            return Err(ApiError::invalid(
                "input",
                "at most 256 texts per request: split the batch",
            ));
        }
        Ok(texts)
    }
}

/// A finished chat completion (`chat`) or text completion, as a JSON body.
pub fn completion(
    chat: bool,
    id: &str,
    created: u64,
    model: &str,
    done: (&str, &str),
    usage: Value,
    provenance: Value,
) -> Value {
    let (text, finish) = done;
    let (object, choice) = if chat {
        (
            "chat.completion",
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish, "logprobs": null }),
        )
    } else {
        (
            "text_completion",
            json!({ "index": 0, "text": text, "finish_reason": finish, "logprobs": null }),
        )
    };
    json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
        "provenance": provenance,
    })
}

/// OpenAI's `usage` object; `cached` prompt tokens (read from the members'
/// prefix caches) go where OpenAI puts its own, in `prompt_tokens_details`.
/// `billed_tokens` is what the request took from its tenant's daily token
/// quota: `total_tokens`, plus the tokens a system's module trained on at
/// their weight ([`crate::request::TRAIN_TOKEN_WEIGHT`]) and the module's
/// own time ([`crate::request::UsageReport::charged`]), which OpenAI's
/// fields have no place for; without it a tenant could not reconcile its
/// answers with its quota.
pub fn usage(prompt: u64, completion: u64, cached: u64, billed: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
        "billed_tokens": billed,
    })
}

/// One streamed chunk of a chat (`delta`) or a completion (`text`).
pub fn chunk(
    chat: bool,
    id: &str,
    created: u64,
    model: &str,
    piece: Option<&str>,
    role: bool,
    finish: Option<&str>,
) -> Value {
    if chat {
        let mut delta = serde_json::Map::new();
        if role {
            delta.insert("role".into(), "assistant".into());
        }
        if let Some(p) = piece {
            delta.insert("content".into(), p.into());
        }
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
        })
    } else {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "text": piece.unwrap_or(""), "finish_reason": finish, "logprobs": null }],
        })
    }
}

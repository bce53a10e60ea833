//! Remote members: a model served elsewhere behind an OpenAI-compatible API
//! (another `tessera serve`, vLLM, llama.cpp's server, a hosted endpoint).
//!
//! A remote member generates (`/chat/completions` for chats,
//! `/completions` for raw prompts) and, when its config says so, embeds
//! (`/embeddings`) and scores. The OpenAI API has no portable way to ask
//! for the likelihood of a given text, so `score` depends on the server at
//! the other end, declared as the member's `engine`:
//!
//! - `tessera` (the default): another Tessera node's
//!   `POST /v1/tessera/score` ([`crate::server::score`]);
//! - `llama.cpp`: llama.cpp's server has no prompt log-probabilities, so
//!   each continuation token is forced: the prompt's token ids and the
//!   continuation so far go to `/completion` for one token, with that
//!   token's logit biased to win and `n_probs` reporting its log-probability
//!   before the bias; the server's prompt cache keeps each step to about one
//!   token of work. Texts become token ids through the server's own
//!   `/tokenize` (and chats through its `/apply-template`), so the ids are
//!   the ones the model was trained with;
//! - `vllm`: vLLM's prompt log-probabilities. The prompt (through vLLM's
//!   `/tokenize`, chats with the model's template and the generation
//!   prompt) and each continuation become token ids; one `/v1/completions`
//!   call per continuation sends their concatenation as ids with
//!   `prompt_logprobs: 0`, and the continuation's log-probability is the
//!   sum over its positions (vLLM's prefix cache shares the prompt's work);
//! - `openai`: any other OpenAI-compatible server, which cannot score.
//!
//! Declare `capabilities = ["generate", "score"]` for a member whose engine
//! scores. `next-token` is never remote. The card
//! lists only what the member can do and strategies see `unsupported` for
//! the rest, as with any member.
//!
//! The network fails in ways a local model does not, so every call is
//! bounded three ways:
//!
//! - **Timeouts**: each attempt gets `timeout_ms`, and never more than the
//!   request's own deadline leaves.
//! - **Retries**: connection errors, timeouts, 5xx and 429 are retried up to
//!   `retries` times with doubling back-off (200 ms, 400 ms, ... capped at
//!   2 s; a 429's `Retry-After` is honoured when the deadline allows). A 4xx
//!   is the caller's fault and is not retried.
//! - **Circuit breaker**: after `breaker_failures` calls in a row fail
//!   (retries exhausted), the member fails fast for `breaker_cooldown_ms`
//!   instead of making every request wait out its timeouts; then one call is
//!   let through, and a success closes the circuit.
//!
//! Unlike local members, which decode one request at a time on their worker
//! thread, a remote member's calls run concurrently: the server at the other
//! end does its own scheduling.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::inference::{
    CallCtx, Capability, FinishReason, GenParams, Generation, InferenceError, Input, Scored, Usage,
};

fn default_timeout_ms() -> u64 {
    120_000
}
fn default_retries() -> u32 {
    2
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_cooldown_ms() -> u64 {
    30_000
}
fn default_context() -> u32 {
    4096
}
fn default_caps() -> Vec<Capability> {
    vec![Capability::Generate]
}

/// `[member.remote]` of a pool declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URL of the API, up to and including `/v1`.
    pub url: String,
    /// The model name at the other end.
    pub model: String,
    /// Environment variable holding the API key, if the server needs one
    /// (keys never go in pool files).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Longest one attempt may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a failed attempt.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failed calls in a row that open the circuit.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit fails fast.
    #[serde(default = "default_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Context window to put on the card.
    #[serde(default = "default_context")]
    pub context_length: u32,
    /// Parameter count to put on the card, if known.
    #[serde(default)]
    pub parameters: u64,
    /// What it can do: `generate`, `embed`, `score` (where the engine
    /// scores).
    #[serde(default = "default_caps")]
    pub capabilities: Vec<Capability>,
    /// The server at the other end, for what the OpenAI API leaves out
    /// (scoring).
    #[serde(default)]
    pub engine: Engine,
}

/// The kind of server a remote member runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Engine {
    /// Another `tessera serve`: scores through `/v1/tessera/score`.
    #[default]
    #[serde(rename = "tessera")]
    Tessera,
    /// llama.cpp's server: scores by forced decoding of token ids.
    #[serde(rename = "llama.cpp", alias = "llamacpp")]
    LlamaCpp,
    /// vLLM's OpenAI server: scores from prompt log-probabilities.
    #[serde(rename = "vllm")]
    Vllm,
    /// Any other OpenAI-compatible server: generates and embeds only.
    #[serde(rename = "openai")]
    OpenAi,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Tessera => "tessera",
            Engine::LlamaCpp => "llama.cpp",
            Engine::Vllm => "vllm",
            Engine::OpenAi => "openai",
        })
    }
}

/// Why a remote member cannot be set up. All but the last are the
/// operator's to fix in the pool file or the environment.
#[derive(Debug, thiserror::Error)]
pub enum RemoteSetupError {
    /// The URL is not HTTP(S).
    #[error("remote url `{0}` must start with http:// or https://")]
    Url(String),
    /// A capability a remote member cannot have.
    #[error(
        "remote capability `{0}`: a remote member can `generate`, `embed` and (on another Tessera node) `score` only"
    )]
    Capability(Capability),
    /// A timeout that would fail every call.
    #[error("remote timeout_ms 0 would fail every call: use 1000 or more")]
    ZeroTimeout,
    /// `score` declared for an engine that cannot score.
    #[error(
        "remote engine `{0}` cannot score: drop `score` from the capabilities, or declare the engine that serves it (`tessera`, `llama.cpp`, `vllm`)"
    )]
    CannotScore(Engine),
    /// The API key's variable is not set.
    #[error("remote member needs its API key in the environment variable `{0}`, which is not set")]
    MissingKey(String),
    /// The HTTP client cannot be built (TLS set-up on this machine).
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl RemoteConfig {
    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), RemoteSetupError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(RemoteSetupError::Url(self.url.clone()));
        }
        if let Some(c) = self.capabilities.iter().find(|c| **c == Capability::NextToken) {
            return Err(RemoteSetupError::Capability(*c));
        }
        if self.timeout_ms == 0 {
            return Err(RemoteSetupError::ZeroTimeout);
        }
        if self.engine == Engine::OpenAi && self.capabilities.contains(&Capability::Score) {
            return Err(RemoteSetupError::CannotScore(self.engine));
        }
        Ok(())
    }
}

struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
    last_error: String,
}

/// One remote member.
pub struct RemoteMember {
    id: String,
    cfg: RemoteConfig,
    key: Option<String>,
    client: reqwest::Client,
    circuit: Mutex<Circuit>,
}

/// Why one attempt failed, and whether another may succeed.
struct Attempt {
    error: InferenceError,
    retry: bool,
    wait: Option<Duration>,
}

impl RemoteMember {
    /// A member for `cfg`. The key is read from the environment now, so a
    /// missing variable is reported at load, naming it.
    pub fn new(id: &str, cfg: RemoteConfig) -> Result<Self, RemoteSetupError> {
        cfg.validate()?;
        let key = match &cfg.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| RemoteSetupError::MissingKey(var.clone()))?),
            None => None,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
            .build()
            .map_err(RemoteSetupError::Client)?;
        Ok(RemoteMember {
            id: id.to_string(),
            cfg,
            key,
            client,
            circuit: Mutex::new(Circuit {
                failures: 0,
                open_until: None,
                last_error: String::new(),
            }),
        })
    }

    /// The member's configuration.
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// `path` under the API's base URL; a `path` that starts with `/` is
    /// under the server's root instead (the base without its `/v1`), where
    /// llama.cpp serves its own routes.
    fn endpoint(&self, path: &str) -> String {
        let base = self.cfg.url.trim_end_matches('/');
        match path.strip_prefix('/') {
            Some(rooted) => format!("{}/{rooted}", base.strip_suffix("/v1").unwrap_or(base)),
            None => format!("{base}/{path}"),
        }
    }

    fn circuit_check(&self) -> Result<(), InferenceError> {
        let c = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = c.open_until {
            if let Some(left) = until.checked_duration_since(Instant::now()) {
                return Err(InferenceError::Failed(format!(
                    "remote member `{}` at {} failed {} calls in a row (last: {}); failing fast for {} s more",
                    self.id,
                    self.cfg.url,
                    c.failures,
                    c.last_error,
                    left.as_secs().max(1)
                )));
            }
        }
        Ok(())
    }

    fn circuit_record(&self, result: Result<(), &InferenceError>) {
        let mut c = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                c.failures = 0;
                c.open_until = None;
            }
            // The caller's own mistakes say nothing about the server's health.
            Err(InferenceError::InvalidParams(_)) | Err(InferenceError::Unsupported(_)) => {}
            Err(e) => {
                c.failures += 1;
                c.last_error = e.to_string();
                if c.failures >= self.cfg.breaker_failures.max(1) {
                    c.open_until = Some(Instant::now() + Duration::from_millis(self.cfg.breaker_cooldown_ms));
                }
            }
        }
    }

    async fn attempt(&self, path: &str, body: &Value, deadline: Instant) -> Result<Value, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Attempt {
                error: InferenceError::Deadline,
                retry: false,
                wait: None,
            });
        }
        let mut req = self
            .client
            .post(self.endpoint(path))
            .timeout(left.min(Duration::from_millis(self.cfg.timeout_ms)))
            .json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| Attempt {
            error: InferenceError::Failed(format!(
                "remote member `{}` at {}: {}",
                self.id,
                self.cfg.url,
                if e.is_timeout() {
                    format!(
                        "no answer within {} ms",
                        left.min(Duration::from_millis(self.cfg.timeout_ms)).as_millis()
                    )
                } else if e.is_connect() {
                    "cannot connect".to_string()
                } else {
                    e.to_string()
                }
            )),
            retry: true,
            wait: None,
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.map_err(|e| Attempt {
            error: InferenceError::Failed(format!("remote member `{}`: reading the answer: {e}", self.id)),
            retry: true,
            wait: None,
        })?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| Attempt {
                error: InferenceError::Failed(format!("remote member `{}`: the answer is not JSON: {e}", self.id)),
                retry: false,
                wait: None,
            });
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        let what = format!("remote member `{}` answered {}: {message}", self.id, status.as_u16());
        Err(match status.as_u16() {
            400 | 422 => Attempt {
                error: InferenceError::InvalidParams(what),
                retry: false,
                wait: None,
            },
            429 => Attempt {
                error: InferenceError::Failed(what),
                retry: true,
                wait: retry_after,
            },
            s if s >= 500 => Attempt {
                error: InferenceError::Failed(what),
                retry: true,
                wait: retry_after,
            },
            _ => Attempt {
                error: InferenceError::Failed(what),
                retry: false,
                wait: None,
            },
        })
    }

    /// POSTs `body` to `path` under the timeout, retry and breaker rules.
    async fn call(&self, path: &str, body: Value, ctx: CallCtx) -> Result<Value, InferenceError> {
        self.circuit_check()?;
        let mut backoff = Duration::from_millis(200);
        let mut tries = 0;
        let result = loop {
            match self.attempt(path, &body, ctx.deadline).await {
                Ok(v) => break Ok(v),
                Err(a) => {
                    let wait = a.wait.unwrap_or(backoff);
                    let in_time = Instant::now() + wait < ctx.deadline;
                    if !a.retry || tries >= self.cfg.retries || !in_time {
                        break Err(a.error);
                    }
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        self.circuit_record(result.as_ref().map(|_| ()));
        result
    }

    /// One generation.
    pub async fn generate(&self, ctx: CallCtx, input: Input, params: GenParams) -> Result<Generation, InferenceError> {
        params.validate()?;
        let mut body = json!({ "model": self.cfg.model, "stream": false });
        let path = match input {
            Input::Chat(messages) => {
                body["messages"] = json!(messages);
                "chat/completions"
            }
            Input::Prompt(p) => {
                body["prompt"] = json!(p);
                "completions"
            }
        };
        if let Some(m) = params.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(t) = params.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = params.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(k) = params.top_k {
            body["top_k"] = json!(k);
        }
        if let Some(s) = params.seed {
            body["seed"] = json!(s);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        let v = self.call(path, body, ctx).await?;
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .ok_or_else(|| InferenceError::Failed(format!("remote member `{}`: the answer has no text", self.id)))?
            .to_string();
        let finish = match choice["finish_reason"].as_str() {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Eos,
        };
        Ok(Generation {
            model: self.id.clone(),
            text,
            finish,
            usage: Usage {
                prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
                // The OpenAI shape (vLLM and Tessera fill it; others leave it out).
                cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as u32,
            },
        })
    }

    /// Log-likelihood of each continuation after `prompt`, as the member's
    /// engine serves it (see the module docs).
    pub async fn score(
        &self,
        ctx: CallCtx,
        prompt: Input,
        continuations: Vec<String>,
    ) -> Result<Vec<Scored>, InferenceError> {
        match self.cfg.engine {
            Engine::Tessera => self.score_on_tessera(ctx, prompt, continuations).await,
            Engine::LlamaCpp => self.score_on_llama_cpp(ctx, prompt, continuations).await,
            Engine::Vllm => self.score_on_vllm(ctx, prompt, continuations).await,
            Engine::OpenAi => Err(InferenceError::Unsupported(format!(
                "remote member `{}` runs on an OpenAI-compatible server that cannot score",
                self.id
            ))),
        }
    }

    /// A llama.cpp server's token ids for `text`.
    async fn llama_cpp_tokens(&self, ctx: CallCtx, text: &str, add_special: bool) -> Result<Vec<u32>, InferenceError> {
        let v = self
            .call("/tokenize", json!({ "content": text, "add_special": add_special }), ctx)
            .await?;
        serde_json::from_value(v["tokens"].clone()).map_err(|_| self.malformed("/tokenize", "no `tokens` list of ids"))
    }

    /// The far end answered `route` without `what` its declared engine
    /// gives: most likely the member's `engine` is not the server's.
    fn malformed(&self, route: &str, what: &str) -> InferenceError {
        InferenceError::Failed(format!(
            "remote member `{}`: {route} at {} answered without what a {} server gives ({what}): is the engine `{}`?",
            self.id, self.cfg.url, self.cfg.engine, self.cfg.engine
        ))
    }

    /// Scores by forced decoding on llama.cpp's server (module docs).
    async fn score_on_llama_cpp(
        &self,
        ctx: CallCtx,
        prompt: Input,
        continuations: Vec<String>,
    ) -> Result<Vec<Scored>, InferenceError> {
        let prompt_ids = match &prompt {
            Input::Prompt(p) => self.llama_cpp_tokens(ctx, p, true).await?,
            Input::Chat(m) => {
                if m.is_empty() {
                    return Err(InferenceError::InvalidParams(
                        "the chat has no messages: send at least one user turn".into(),
                    ));
                }
                let v = self.call("/apply-template", json!({ "messages": m }), ctx).await?;
                let text = v["prompt"]
                    .as_str()
                    .ok_or_else(|| self.malformed("/apply-template", "no `prompt` text"))?;
                // The template writes its own BOS, as a local member's does.
                self.llama_cpp_tokens(ctx, text, false).await?
            }
        };
        if prompt_ids.is_empty() {
            return Err(InferenceError::InvalidParams("the prompt is empty".into()));
        }
        let mut out = Vec::with_capacity(continuations.len());
        for cont in &continuations {
            let ids = self.llama_cpp_tokens(ctx, cont, false).await?;
            if ids.is_empty() {
                return Err(InferenceError::InvalidParams(
                    "an empty continuation has no likelihood: give each choice some text".into(),
                ));
            }
            let mut context = prompt_ids.clone();
            let mut logprob = 0.0;
            let mut cached = 0u32;
            for (i, &id) in ids.iter().enumerate() {
                let body = json!({
                    "prompt": context,
                    "n_predict": 1,
                    "n_probs": 1,
                    "temperature": 0,
                    "cache_prompt": true,
                    // Forces `id`; `n_probs` reports log-probabilities from
                    // the logits before any bias or sampler.
                    "logit_bias": [[id, 1000]],
                });
                let v = self.call("/completion", body, ctx).await?;
                let first = &v["completion_probabilities"][0];
                let (got, lp) = (first["id"].as_u64(), first["logprob"].as_f64());
                match (got, lp) {
                    (Some(g), Some(lp)) if g == u64::from(id) && lp.is_finite() => logprob += lp,
                    _ => {
                        return Err(self.malformed(
                            "/completion",
                            "`completion_probabilities` with the forced token's `logprob`",
                        ))
                    }
                }
                if i == 0 {
                    cached = v["timings"]["cache_n"].as_u64().unwrap_or(0) as u32;
                }
                context.push(id);
            }
            out.push(Scored {
                logprob,
                tokens: ids.len() as u32,
                prompt_tokens: prompt_ids.len() as u32,
                cached_tokens: cached,
            });
        }
        Ok(out)
    }

    /// vLLM's token ids for a text (`add_special`: the tokenizer's BOS and
    /// the like) or a chat (its template, with the generation prompt).
    async fn vllm_tokens(&self, ctx: CallCtx, input: Input, add_special: bool) -> Result<Vec<u32>, InferenceError> {
        let body = match input {
            Input::Prompt(p) => {
                json!({ "model": self.cfg.model, "prompt": p, "add_special_tokens": add_special })
            }
            Input::Chat(m) => json!({
                "model": self.cfg.model, "messages": m,
                "add_generation_prompt": true, "add_special_tokens": false,
            }),
        };
        let v = self.call("/tokenize", body, ctx).await?;
        serde_json::from_value(v["tokens"].clone()).map_err(|_| self.malformed("/tokenize", "a `tokens` list of ids"))
    }

    /// Scores from vLLM's prompt log-probabilities (module docs).
    async fn score_on_vllm(
        &self,
        ctx: CallCtx,
        prompt: Input,
        continuations: Vec<String>,
    ) -> Result<Vec<Scored>, InferenceError> {
        if matches!(&prompt, Input::Chat(m) if m.is_empty()) {
            return Err(InferenceError::InvalidParams(
                "the chat has no messages: send at least one user turn".into(),
            ));
        }
        let prompt_ids = self.vllm_tokens(ctx, prompt, true).await?;
        if prompt_ids.is_empty() {
            return Err(InferenceError::InvalidParams("the prompt is empty".into()));
        }
        let mut out = Vec::with_capacity(continuations.len());
        for cont in continuations {
            let ids = self.vllm_tokens(ctx, Input::Prompt(cont), false).await?;
            if ids.is_empty() {
                return Err(InferenceError::InvalidParams(
                    "an empty continuation has no likelihood: give each choice some text".into(),
                ));
            }
            let all: Vec<u32> = prompt_ids.iter().chain(&ids).copied().collect();
            let body = json!({
                "model": self.cfg.model, "prompt": all, "max_tokens": 1,
                "temperature": 0, "prompt_logprobs": 0,
            });
            let v = self.call("completions", body, ctx).await?;
            let lps = v["choices"][0]["prompt_logprobs"]
                .as_array()
                .filter(|a| a.len() == all.len())
                .ok_or_else(|| self.malformed("/v1/completions", "`prompt_logprobs`, one entry per prompt token"))?;
            let mut logprob = 0.0;
            for (entry, id) in lps[prompt_ids.len()..].iter().zip(&ids) {
                match entry[id.to_string()]["logprob"].as_f64() {
                    Some(lp) if lp.is_finite() => logprob += lp,
                    _ => {
                        return Err(self.malformed(
                            "/v1/completions",
                            "each continuation token's `logprob` in `prompt_logprobs`",
                        ))
                    }
                }
            }
            out.push(Scored {
                logprob,
                tokens: ids.len() as u32,
                prompt_tokens: prompt_ids.len() as u32,
                cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as u32,
            });
        }
        Ok(out)
    }

    /// Scores on another Tessera node's `/v1/tessera/score`.
    async fn score_on_tessera(
        &self,
        ctx: CallCtx,
        prompt: Input,
        continuations: Vec<String>,
    ) -> Result<Vec<Scored>, InferenceError> {
        let n = continuations.len();
        // What an older node that reports no prompt tokens is charged: a
        // quarter of the prompt's bytes, as for a silent embedder.
        let silent = u32::try_from(crate::inference::tokens_for_bytes(prompt.counted_bytes())).unwrap_or(u32::MAX);
        let mut body = json!({ "model": self.cfg.model, "continuations": continuations });
        match prompt {
            Input::Prompt(p) => body["prompt"] = json!(p),
            Input::Chat(m) => body["messages"] = json!(m),
        }
        let v = self.call("tessera/score", body, ctx).await?;
        let bad = || {
            InferenceError::Failed(format!(
                "remote member `{}`: malformed scores (is {} a Tessera node? only those serve `score`)",
                self.id, self.cfg.url
            ))
        };
        let mut scores: Vec<Scored> = serde_json::from_value(v["scores"].clone()).map_err(|_| bad())?;
        if scores.len() != n {
            return Err(bad());
        }
        if scores.iter().all(|s| s.prompt_tokens == 0) {
            scores.iter_mut().for_each(|s| s.prompt_tokens = silent);
        }
        Ok(scores)
    }

    /// Embeddings, in input order, with the tokens the remote reports
    /// (OpenAI's `usage.prompt_tokens`; where it reports none, a quarter of
    /// the bytes, rounded up, so that a silent remote is not free).
    pub async fn embed(&self, ctx: CallCtx, texts: Vec<String>) -> Result<crate::inference::Embedded, InferenceError> {
        let bytes: usize = texts.iter().map(String::len).sum();
        let n = texts.len();
        let body = json!({ "model": self.cfg.model, "input": texts, "encoding_format": "float" });
        let v = self.call("embeddings", body, ctx).await?;
        let bad = || InferenceError::Failed(format!("remote member `{}`: malformed embeddings answer", self.id));
        let mut out = vec![Vec::new(); n];
        for item in v["data"].as_array().ok_or_else(bad)? {
            let i = item["index"].as_u64().ok_or_else(bad)? as usize;
            let vec: Vec<f32> = item["embedding"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            *out.get_mut(i).ok_or_else(bad)? = vec;
        }
        if out.iter().any(Vec::is_empty) {
            return Err(bad());
        }
        let tokens = v["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap_or(crate::inference::tokens_for_bytes(bytes));
        Ok(crate::inference::Embedded { vectors: out, tokens })
    }
}

//! The host's own vocabulary for inference, and the one trait through which
//! the sandbox reaches models.
//!
//! These types deliberately mirror the WIT contract but do not depend on it:
//! the pool and its backends know nothing of WebAssembly, and the sandbox
//! knows models only through [`Models`]. Either side can be tested without
//! the other (the sandbox's unit tests use a scripted `Models`; the pool's
//! tests drive real models without any guest).

pub mod memo;
pub mod train;
pub mod weights;

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A `user` turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// An `assistant` turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// What a model is asked: a chat, rendered with the member's chat template,
/// or a raw prompt fed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Chat turns; the member's template turns them into a prompt.
    Chat(Vec<Message>),
    /// A raw prompt.
    Prompt(String),
}

/// Largest input one model call takes, counted by [`Input::counted_bytes`].
/// Every face (a module's host call, an HTTP request to a member, the score
/// route, a pipeline stage) is held to it, and the pool checks it again
/// before queuing, so an oversized input never reaches a worker, where
/// tokenizing it would hold up every other request on that member.
pub const MAX_INPUT_BYTES: usize = 256 << 10;
/// What each chat turn counts on top of its text: the chat template wraps
/// every turn in markers (`<|im_start|>user\n ... <|im_end|>\n`), so a chat
/// of many empty turns is not free.
pub const TURN_OVERHEAD_BYTES: usize = 32;
/// Most turns in one chat.
pub const MAX_TURNS: usize = 2048;
/// Most stop sequences in one call.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes (matched against the text every step).
pub const MAX_STOP_BYTES: usize = 256;
/// Smallest positive temperature: below it the scaled logits overflow, so
/// sampling would fail; 0 asks for greedy decoding.
pub const MIN_TEMPERATURE: f32 = 0.01;

impl Input {
    /// The size the input rule counts: the text of a prompt, or of every
    /// turn (role and content) plus [`TURN_OVERHEAD_BYTES`] per turn.
    pub fn counted_bytes(&self) -> usize {
        match self {
            Input::Prompt(p) => p.len(),
            Input::Chat(m) => m
                .iter()
                .map(|m| m.role.len() + m.content.len() + TURN_OVERHEAD_BYTES)
                .sum(),
        }
    }

    /// The input rule for an input that travels with `texts` (score
    /// continuations): their bytes count with it.
    pub fn check_with(&self, texts: &[String]) -> Result<(), InferenceError> {
        self.check_size(texts.iter().map(String::len).sum())
    }

    /// The input rule for texts sent on their own (an `embed` call).
    pub fn check_texts(texts: &[String]) -> Result<(), InferenceError> {
        Input::Prompt(String::new()).check_with(texts)
    }

    /// The input rule: at most [`MAX_TURNS`] turns and, with `extra` bytes
    /// that travel with it (score continuations), at most
    /// [`MAX_INPUT_BYTES`]. Checked without tokenizing, so it is cheap
    /// whatever the caller sent.
    pub fn check_size(&self, extra: usize) -> Result<(), InferenceError> {
        if let Input::Chat(m) = self {
            if m.len() > MAX_TURNS {
                return Err(InferenceError::InvalidParams(format!(
                    "the chat has {} turns; a model call takes at most {MAX_TURNS}: shorten the conversation",
                    m.len()
                )));
            }
        }
        let n = self.counted_bytes().saturating_add(extra);
        if n > MAX_INPUT_BYTES {
            return Err(InferenceError::InvalidParams(format!(
                "the input is {n} bytes (chat turns count {TURN_OVERHEAD_BYTES} bytes each for their template); \
                 a model call takes at most {MAX_INPUT_BYTES}: shorten or split it"
            )));
        }
        Ok(())
    }
}

/// Decoding parameters; `None` means the member's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    /// Most new tokens for this call.
    pub max_tokens: Option<u32>,
    /// 0 or `None`: greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<u32>,
    /// Sampling seed; same seed, same text.
    pub seed: Option<u64>,
    /// Stop before the first occurrence of any of these.
    #[serde(default)]
    pub stop: Vec<String>,
}

/// The default number of new tokens when a call does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

impl GenParams {
    /// Checks ranges; the message names the parameter and the valid range.
    pub fn validate(&self) -> Result<(), InferenceError> {
        if let Some(t) = self.temperature {
            if !t.is_finite() || !(0.0..=10.0).contains(&t) || (t > 0.0 && t < MIN_TEMPERATURE) {
                return Err(InferenceError::InvalidParams(format!(
                    "temperature {t} is out of range: use 0 (greedy) or a value in [{MIN_TEMPERATURE}, 10]"
                )));
            }
        }
        if let Some(p) = self.top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return Err(InferenceError::InvalidParams(format!(
                    "top_p {p} is out of range: use a value in (0, 1]"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(InferenceError::InvalidParams(
                "top_k 0 keeps no token: use 1 or more, or leave it unset".into(),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(InferenceError::InvalidParams(
                "max_tokens 0 asks for nothing: use 1 or more".into(),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(InferenceError::InvalidParams(format!(
                "{} stop sequences; at most {MAX_STOP_SEQUENCES} are allowed: drop some",
                self.stop.len()
            )));
        }
        if let Some(s) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(InferenceError::InvalidParams(format!(
                "a stop sequence of {} bytes; each may be at most {MAX_STOP_BYTES}: shorten it",
                s.len()
            )));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(InferenceError::InvalidParams(
                "an empty stop sequence would stop at once: remove it".into(),
            ));
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn token.
    Eos,
    /// Token limit reached.
    Length,
    /// A stop sequence appeared (not included in the text).
    StopSequence,
}

/// Tokens consumed by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Of the prompt's tokens, those whose keys and values came from the
    /// member's prefix cache instead of being computed.
    #[serde(default)]
    pub cached_tokens: u32,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The member that wrote it.
    pub model: String,
    /// The generated text.
    pub text: String,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
}

/// The tokens charged for `bytes` of input whose real count is unknown (a
/// call cut before it reported usage, a remote that reports none): a
/// quarter of the bytes, rounded up, about one token per English word
/// piece.
pub fn tokens_for_bytes(bytes: usize) -> u64 {
    bytes.div_ceil(4) as u64
}

/// Log-likelihood of one continuation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Sum of natural-log token probabilities.
    pub logprob: f64,
    /// Number of continuation tokens.
    pub tokens: u32,
    /// Prompt tokens the call read, cached ones included (the same for
    /// every continuation of one call: they share the prompt). Usage and
    /// tenants' token quotas count these as well as `tokens`: a long prompt
    /// scored against a one-token continuation is a long prompt's work.
    /// 0 from a remote node that does not report it.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Prompt tokens the call read from the member's prefix cache (the
    /// same for every continuation of one call: they share the prompt).
    #[serde(default)]
    pub cached_tokens: u32,
}

/// One candidate next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Token id in the member's vocabulary.
    pub token: u32,
    /// The token's text.
    pub text: String,
    /// Natural-log probability.
    pub logprob: f64,
    /// Prompt tokens the call read (the same for every candidate of one
    /// call), which usage counts.
    #[serde(default)]
    pub prompt_tokens: u32,
}

/// What a member can be asked to do: the calls of the `models` interface
/// that run on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Write text (`generate`, chat completions).
    Generate,
    /// Log-likelihood of continuations (`score`).
    Score,
    /// The next token's distribution (`next-token`).
    NextToken,
    /// Sentence embeddings (`embed`).
    Embed,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 4] = [
        Capability::Generate,
        Capability::Score,
        Capability::NextToken,
        Capability::Embed,
    ];

    /// The name cards, the contract and the API use.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Generate => "generate",
            Capability::Score => "score",
            Capability::NextToken => "next-token",
            Capability::Embed => "embed",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability name that is not one of [`Capability::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability `{0}`: use generate, score, next-token or embed")]
pub struct UnknownCapability(pub String);

impl std::str::FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

/// A pool member as its contributor card describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Unique id within the pool.
    pub id: String,
    /// Who contributed it.
    pub contributor: String,
    /// What it is good at, in a sentence or two (routers read this).
    pub description: String,
    /// Domain tags, e.g. `general`, `code`.
    pub domains: Vec<String>,
    /// Model architecture, e.g. `llama`.
    pub architecture: String,
    /// Parameter count.
    pub parameters: u64,
    /// Context window in tokens.
    pub context_length: u32,
    /// License of the weights.
    pub license: String,
    /// What it can be asked to do.
    pub capabilities: Vec<Capability>,
}

impl ModelCard {
    /// Whether the member can be asked to `c`.
    pub fn can(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }

    /// Its capabilities' names, joined by `sep`.
    pub fn capability_names(&self, sep: &str) -> String {
        self.capabilities.iter().map(|c| c.name()).collect::<Vec<_>>().join(sep)
    }
}

/// Why an inference call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum InferenceError {
    /// No member with this id.
    #[error("unknown model `{0}`: `tessera pool list` shows the members")]
    UnknownModel(String),
    /// A parameter is out of range.
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// The backend failed.
    #[error("inference failed: {0}")]
    Failed(String),
    /// The member cannot do this kind of call.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The call's deadline passed before it finished.
    #[error("deadline passed before the model finished")]
    Deadline,
    /// The call's deadline passed while it waited in its member's queue:
    /// it never ran, so, unlike a [`Self::Deadline`] cut, it costs its
    /// caller nothing.
    #[error("deadline passed while the call waited for its member")]
    Expired,
}

/// Per-call context the sandbox hands down: when to give up, and on whose
/// behalf the call runs.
#[derive(Debug, Clone, Copy)]
pub struct CallCtx {
    /// The request's wall-clock deadline; backends stop queued work,
    /// prefill and decoding past it.
    pub deadline: Instant,
    /// The request this call belongs to (0: anonymous). A member's worker
    /// shares its time between requests by this id, so one request's
    /// fan-out of many calls cannot hold a member for everyone else.
    pub requester: u64,
}

impl CallCtx {
    /// A call on behalf of request `requester` that gives up at `deadline`.
    pub fn new(deadline: Instant, requester: u64) -> Self {
        CallCtx { deadline, requester }
    }

    /// A fresh requester id, unique in this process.
    pub fn next_requester() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a streaming generation sends its text; `false` back means "stop".
pub type TextSink = Box<dyn FnMut(&str) -> bool + Send + 'static>;

/// A sink that stops its generation at `deadline`, or once `cancel` is
/// raised, raising `stopped`, and otherwise passes each piece on to `next`.
/// A generation stopped this way comes back with its usage, so its caller
/// can charge it; one cut off by its own deadline reports none. The server
/// and the sandbox both stop generations at a request's deadline with it.
pub fn stop_at(
    deadline: Instant,
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    mut next: Option<TextSink>,
) -> TextSink {
    use std::sync::atomic::Ordering;
    Box::new(move |piece: &str| {
        if Instant::now() >= deadline || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            stopped.store(true, Ordering::Relaxed);
            return false;
        }
        next.as_mut().is_none_or(|s| s(piece))
    })
}

/// The pool as the sandbox sees it. Implemented by [`crate::pool::Pool`] and
/// by test doubles. Every method returns a future that does not borrow
/// `self`, so the caller can await many at once (that is how fan-out gets
/// host-side parallelism).
pub trait Models: Send + Sync + 'static {
    /// Every member's card.
    fn cards(&self) -> Vec<ModelCard>;
    /// One generation.
    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>>;
    /// One generation whose text is handed to `sink` piece by piece as it
    /// is decoded (`sink` returns `false` to stop early). The default sends
    /// the whole text once, at the end: right for doubles and for backends
    /// that cannot stream.
    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        mut sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let call = self.generate(ctx, model, input, params);
        Box::pin(async move {
            let g = call.await?;
            sink(&g.text);
            Ok(g)
        })
    }
    /// Log-likelihood of each continuation after `prompt`.
    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>>;
    /// The `top_k` most likely next tokens after `prompt`.
    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>>;
    /// L2-normalised sentence embeddings, with the tokens read.
    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Embedded, InferenceError>>;
    /// Each member's prefix-cache counters, for those that have one (the
    /// server's `/metrics`). Doubles and wrappers without members of their
    /// own have none.
    fn prefix_stats(&self) -> Vec<(String, crate::backends::gguf::prefix::PrefixSnapshot)> {
        Vec::new()
    }
}

/// Sentence embeddings, one per text in order, with the number of tokens
/// the embedder read (what usage and billing count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embedded {
    /// One L2-normalised vector per text.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read, by the embedder's own tokenizer (special tokens
    /// included).
    pub tokens: u64,
}

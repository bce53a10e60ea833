//! Backends: the code that actually runs a model. Each backend is driven by
//! one pool worker thread and knows nothing of WebAssembly or policy.
//!
//! - [`gguf`]: quantized GGUF files (llama, qwen2) through candle.
//! - [`bert`]: sentence embeddings from a Hugging Face BERT directory.
//! - [`remote`]: a model behind an OpenAI-compatible HTTP API.
//! - [`webgpu`]: the llama family on any GPU wgpu reaches (Vulkan, Metal,
//!   DX12), or on llvmpipe where there is none.
//!
//! [`device`] says where the local ones run (CPU by default, CUDA with the
//! `cuda` feature).

pub mod bert;
pub mod device;
pub mod gguf;
pub mod remote;
pub mod webgpu;

use std::path::{Path, PathBuf};

use crate::inference::{CallCtx, GenParams, Generation, InferenceError, Input, Scored, TokenLogprob};

/// Why a model file or folder could not be loaded (or exported): it cannot
/// be read, it is not a model this backend runs, or its weights do not
/// load onto the device. The pool reports it per member and keeps going.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or folder cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The content is not a model this backend runs: a missing key or
    /// tensor, an unsupported architecture, a malformed tokenizer or chat
    /// template. The text names the file and what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The weights were read but do not load (a truncated tensor, a device
    /// out of memory).
    #[error("{path}: loading the weights: {source}")]
    Weights {
        /// The file, as shown.
        path: String,
        /// What the tensor library said.
        #[source]
        source: candle_core::Error,
    },
}

impl LoadError {
    /// [`LoadError::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The backends' internal helpers say what is wrong with a file as text;
/// at the boundary that text is an [`LoadError::Invalid`].
impl From<String> for LoadError {
    fn from(message: String) -> Self {
        LoadError::Invalid(message)
    }
}

/// One loaded member, whatever runs it.
pub enum Backend {
    /// A generative GGUF model.
    Gguf(Box<gguf::GgufModel>),
    /// A sentence-embedding model.
    Bert(Box<bert::BertEmbedder>),
}

impl Backend {
    fn unsupported(&self, what: &str) -> InferenceError {
        let kind = match self {
            Backend::Gguf(_) => "a generative model",
            Backend::Bert(_) => "an embedding model",
        };
        InferenceError::Unsupported(format!(
            "{kind} cannot `{what}`: pick a member whose card lists `{what}`"
        ))
    }

    /// See [`gguf::GgufModel::generate`].
    pub fn generate(&mut self, ctx: CallCtx, input: &Input, params: &GenParams) -> Result<Generation, InferenceError> {
        match self {
            Backend::Gguf(m) => m.generate(ctx, input, params),
            _ => Err(self.unsupported("generate")),
        }
    }

    /// See [`gguf::GgufModel::generate_streaming`].
    pub fn generate_streaming(
        &mut self,
        ctx: CallCtx,
        input: &Input,
        params: &GenParams,
        sink: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        match self {
            Backend::Gguf(m) => m.generate_streaming(ctx, input, params, Some(sink)),
            _ => Err(self.unsupported("generate")),
        }
    }

    /// Puts a generation into the member's continuous batch; see
    /// [`gguf::GgufModel::admit`]. A member that cannot generate hands it
    /// back with its error.
    pub fn admit<'s, T>(
        &mut self,
        engine: &mut gguf::decode::Engine<'s, T>,
        req: gguf::decode::GenRequest<'s>,
        tag: T,
    ) -> Result<(), gguf::decode::Done<T>> {
        match self {
            Backend::Gguf(m) => m.admit(engine, req, tag),
            _ => Err((tag, Err(self.unsupported("generate")))),
        }
    }

    /// One step of the member's continuous batch; see
    /// [`gguf::GgufModel::step_engine`].
    pub fn step<T>(&mut self, engine: &mut gguf::decode::Engine<'_, T>) -> Vec<gguf::decode::Done<T>> {
        match self {
            Backend::Gguf(m) => m.step_engine(engine),
            _ => engine
                .drain()
                .into_iter()
                .map(|t| {
                    (
                        t,
                        Err(InferenceError::Unsupported("this member cannot generate".into())),
                    )
                })
                .collect(),
        }
    }

    /// See [`gguf::GgufModel::score`].
    pub fn score(&mut self, ctx: CallCtx, prompt: &Input, conts: &[String]) -> Result<Vec<Scored>, InferenceError> {
        match self {
            Backend::Gguf(m) => m.score(ctx, prompt, conts),
            _ => Err(self.unsupported("score")),
        }
    }

    /// See [`gguf::GgufModel::next_token`].
    pub fn next_token(&mut self, ctx: CallCtx, prompt: &Input, k: u32) -> Result<Vec<TokenLogprob>, InferenceError> {
        match self {
            Backend::Gguf(m) => m.next_token(ctx, prompt, k),
            _ => Err(self.unsupported("next-token")),
        }
    }

    /// See [`bert::BertEmbedder::embed`].
    pub fn embed(&mut self, ctx: CallCtx, texts: &[String]) -> Result<crate::inference::Embedded, InferenceError> {
        match self {
            Backend::Bert(m) => m.embed(ctx, texts),
            _ => Err(self.unsupported("embed")),
        }
    }
}

/// The message of a caught panic (a backend's, or a library's under it).
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

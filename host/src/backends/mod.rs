//! Backends: the code that actually runs a model. Each backend is driven by
//! one pool worker thread and knows nothing of WebAssembly or policy.
//!
//! - [`gguf`]: quantized GGUF files (llama, qwen2) through candle.
//! - [`bert`]: sentence embeddings from a Hugging Face BERT directory.
//! - [`remote`]: a model behind an OpenAI-compatible HTTP API.
//!
//! [`device`] says where the local ones run (CPU by default, CUDA with the
//! `cuda` feature).

pub mod bert;
pub mod device;
pub mod gguf;
pub mod remote;

use crate::inference::{CallCtx, GenParams, Generation, InferenceError, Input, Scored, TokenLogprob};

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

    /// Whether queued generations are decoded together (see
    /// [`gguf::decode`]).
    pub fn batches(&self) -> bool {
        matches!(self, Backend::Gguf(m) if m.batches())
    }

    /// Runs several generations, together where the model can; results in
    /// order. See [`gguf::GgufModel::generate_batch`].
    #[allow(clippy::type_complexity)]
    pub fn generate_batch(
        &mut self,
        jobs: Vec<(
            CallCtx,
            &Input,
            &GenParams,
            Option<&mut (dyn FnMut(&str) -> bool + Send)>,
        )>,
    ) -> Vec<Result<Generation, InferenceError>> {
        match self {
            Backend::Gguf(m) => m.generate_batch(
                jobs.into_iter()
                    .map(|(ctx, input, params, sink)| gguf::decode::GenJob {
                        ctx,
                        input,
                        params,
                        sink: sink.map(|s| s as &mut dyn FnMut(&str) -> bool),
                    })
                    .collect(),
            ),
            _ => {
                let e = self.unsupported("generate");
                jobs.iter().map(|_| Err(e.clone())).collect()
            }
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

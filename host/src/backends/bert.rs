//! Sentence embeddings with a BERT encoder from a Hugging Face directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`), mean-pooled over
//! the real tokens and L2-normalised, as sentence-transformers'
//! all-MiniLM-L6-v2 is meant to be used.
//!
//! The packaged tokenizer.json pads every input to 128 tokens; padding is
//! switched off here (each text is encoded on its own), otherwise the mean
//! pool would be dominated by padding and every sentence would embed alike.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use crate::backends::LoadError;
use crate::inference::{CallCtx, InferenceError};

/// Longest input, in tokens, before truncation.
const MAX_TOKENS: usize = 256;

/// A loaded embedding member.
pub struct BertEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    /// Embedding width.
    pub dim: usize,
    /// Parameter count.
    pub parameters: u64,
}

fn failed(e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Failed(e.to_string())
}

impl BertEmbedder {
    /// Loads the directory; the error names the file and the problem.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::io(&cfg_path, e))?;
        let config: Config =
            serde_json::from_str(&cfg_text).map_err(|e| format!("{}: not a BERT config: {e}", cfg_path.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| format!("{}: cannot load tokenizer: {e}", tok_path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| format!("{}: {e}", tok_path.display()))?;
        let weights = dir.join("model.safetensors");
        let device = device.clone();
        // SAFETY: the file is memory-mapped read-only; the pool verified its
        // sha256 before loading and nothing in this process writes to it.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| format!("{}: {e}", weights.display()))?;
        let model = BertModel::load(vb, &config).map_err(|source| LoadError::Weights {
            path: weights.display().to_string(),
            source,
        })?;
        let parameters = safetensors_param_count(&weights).unwrap_or(0);
        Ok(Self {
            model,
            tokenizer,
            device,
            dim: config.hidden_size,
            parameters,
        })
    }

    /// One L2-normalised vector per text, and the tokens read.
    pub fn embed(&self, ctx: CallCtx, texts: &[String]) -> Result<crate::inference::Embedded, InferenceError> {
        let mut out = Vec::with_capacity(texts.len());
        let mut tokens = 0u64;
        for text in texts {
            if Instant::now() >= ctx.deadline {
                return Err(InferenceError::Deadline);
            }
            let enc = self.tokenizer.encode(text.as_str(), true).map_err(failed)?;
            tokens += enc.get_ids().len() as u64;
            let ids = Tensor::new(enc.get_ids(), &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(failed)?;
            let types = ids.zeros_like().map_err(failed)?;
            let hidden = self.model.forward(&ids, &types, None).map_err(failed)?;
            let pooled = hidden.mean(1).and_then(|t| t.squeeze(0)).map_err(failed)?;
            let mut v = pooled.to_vec1::<f32>().map_err(failed)?;
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
            out.push(v);
        }
        Ok(crate::inference::Embedded { vectors: out, tokens })
    }
}

fn safetensors_param_count(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len) as usize;
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let total = v
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| {
            t.get("shape")?
                .as_array()
                .map(|s| s.iter().filter_map(|d| d.as_u64()).product::<u64>())
        })
        .sum();
    Some(total)
}

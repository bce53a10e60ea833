//! The contributor kit: fine-tune a small base model on your own data and
//! put the result in a pool.
//!
//! Participation means many people each training a small model on what
//! they know. This module is the whole path for one contributor, on a CPU:
//!
//! 1. [`data`]: a JSONL file of chats or prompt/completion pairs, validated
//!    line by line before anything runs.
//! 2. [`model`]: the base (a pool member, dequantized from its GGUF into a
//!    Hugging Face folder once, or any llama/qwen2 folder) as a trainable
//!    f32 model, with LoRA adapters or every weight trainable.
//! 3. [`train`]: AdamW ([`optim`]) with warm-up and cosine decay, gradient
//!    accumulation and clipping; a fixed seed gives the same weights; a
//!    checkpoint every N steps (and on interruption) that `--resume`
//!    continues bit for bit.
//! 4. [`output`]: a model folder the pool loads directly (`backend = "hf"`:
//!    `model.safetensors` with LoRA merged in, `config.json`, the tokenizer),
//!    a contributor card with the weights' sha256 (`contributor.toml`), the
//!    loss curve (`loss.svg`) and the per-step log (`train-log.jsonl`);
//!    [`add_to_pool`] appends it to a pool file.
//!
//! Modules train too (the WIT's `training` interface): [`session`] runs
//! SFT, DPO or GRPO in memory within a request's budgets, and
//! [`PoolTrainer`] serves the trained member for the rest of the request.

pub mod data;
pub mod model;
pub mod optim;
pub mod output;
pub mod session;
pub mod train;
pub mod trainer;
pub mod trunk;

use std::path::{Path, PathBuf};

pub use output::{add_to_pool, add_to_pool_as};
pub use train::{train, StepStats, TrainOptions, TrainReport};
pub use trainer::{PoolTrainer, KEPT_DIR};

/// Why contributing failed. Each names the file or option and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ContributeError {
    /// A problem in the training data, at a line (0 = the whole file).
    #[error("{file}:{line}: {message}")]
    Data {
        /// The data file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The base model cannot be used.
    #[error("base model: {0}")]
    Base(String),
    /// An option is out of range or contradicts another.
    #[error("invalid option: {0}")]
    Options(String),
    /// A checkpoint exists but does not fit this run, or is damaged.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Reading or writing files failed.
    #[error("{0}")]
    Io(String),
    /// The numerical work failed.
    #[error("training failed: {0}")]
    Train(String),
}

impl From<candle_core::Error> for ContributeError {
    fn from(e: candle_core::Error) -> Self {
        ContributeError::Train(e.to_string())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash leaves the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ContributeError> {
    crate::files::write_atomic(path, bytes, crate::files::Durability::Durable)
        .map_err(|e| ContributeError::Io(format!("{}: {e}", path.display())))
}

/// The GGUF file of `base` when it is a llama-family GGUF pool member
/// (present on disk): what a top-layers fine-tune runs its frozen trunk
/// on ([`trunk`]). `None` for folders and other members, whose trunk runs
/// in the f32 model.
pub fn base_gguf(pool: &crate::pool::PoolConfig, models: &Path, base: &str) -> Option<PathBuf> {
    let m = pool.members.iter().find(|m| m.id == base)?;
    let path = models.join(&m.path);
    (matches!(m.backend, crate::pool::BackendKind::Gguf) && path.is_file()).then_some(path)
}

/// Finds the folder to train from. `base` is a folder holding a Hugging
/// Face model, or the id of a pool member: an `hf` member's folder, or a
/// GGUF member (llama, qwen2) dequantized once into `cache/<id>-<sha>`
/// and reused after. Returns the folder and the name for the card.
pub fn base_folder(
    pool: &crate::pool::PoolConfig,
    models: &Path,
    cache: &Path,
    base: &str,
) -> Result<(PathBuf, String), ContributeError> {
    let as_dir = Path::new(base);
    if as_dir.join("config.json").is_file() {
        return Ok((as_dir.to_path_buf(), base.to_string()));
    }
    let Some(m) = pool.members.iter().find(|m| m.id == base) else {
        let ids: Vec<&str> = pool.members.iter().map(|m| m.id.as_str()).collect();
        return Err(ContributeError::Base(format!(
            "`{base}` is neither a model folder (with config.json) nor a pool member ({})",
            ids.join(", ")
        )));
    };
    match m.backend {
        crate::pool::BackendKind::Hf => Ok((models.join(&m.path), base.to_string())),
        crate::pool::BackendKind::Gguf => {
            let short = m.sha256.get(..12).unwrap_or(&m.sha256);
            let dir = cache.join(format!("{base}-{short}"));
            if !dir.join("config.json").is_file() {
                let src = models.join(&m.path);
                if !src.is_file() {
                    return Err(ContributeError::Base(format!(
                        "{} is missing: run `tessera pool fetch` first",
                        src.display()
                    )));
                }
                // Export next to the final place and rename, so a
                // half-written export is never taken for a base; the
                // temporary name is per process, so two exports at once
                // do not collide and the first rename wins.
                let tmp = cache.join(format!(".{base}-{short}.{}.tmp", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                crate::backends::gguf::hf::export(&src, &tmp).map_err(|e| ContributeError::Base(e.to_string()))?;
                if let Err(e) = std::fs::rename(&tmp, &dir) {
                    let _ = std::fs::remove_dir_all(&tmp);
                    if !dir.join("config.json").is_file() {
                        return Err(ContributeError::Io(format!("{}: {e}", dir.display())));
                    }
                }
            }
            Ok((dir, base.to_string()))
        }
        other => Err(ContributeError::Base(format!(
            "member `{base}` ({other:?}) cannot be fine-tuned: use a llama or qwen2 GGUF member or a model folder"
        ))),
    }
}

//! The `training` capability as the sandbox sees it: fine-tuning a member
//! on what a module supplies, for the rest of a request, and keeping the
//! result beyond it.
//!
//! As for merging ([`super::weights`]), this is vocabulary and a trait only.
//! The sandbox checks grants and budgets and converts the WIT types into
//! these; the numerical work (LoRA on f32 weights, the three objectives)
//! is [`crate::contribute::session`], and [`crate::contribute::PoolTrainer`]
//! implements [`Trainer`] over a declared pool. Tests may bring their own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::weights::{KeepRefused, Merged, Named};
use super::Input;

/// One supervised example: learn to answer `input` with `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftItem {
    /// What the member is asked.
    pub input: Input,
    /// The answer it learns.
    pub target: String,
}

/// One preference: for `input`, `chosen` is better than `rejected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    /// What the member is asked.
    pub input: Input,
    /// The better answer.
    pub chosen: String,
    /// The worse answer.
    pub rejected: String,
}

/// Samples for one input, each with the module's reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleGroup {
    /// What the member was asked.
    pub input: Input,
    /// `(text, reward)` per sample.
    pub samples: Vec<(String, f64)>,
}

/// What a training run learns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Objective {
    /// Supervised fine-tuning on the targets.
    Sft(Vec<SftItem>),
    /// Direct preference optimisation (Rafailov et al., 2023) against the
    /// starting weights.
    Dpo(Vec<Preference>),
    /// Group-relative policy optimisation (Shao et al., 2024) with a
    /// clipped, length-normalised sequence likelihood ratio.
    Grpo(Vec<SampleGroup>),
}

impl Objective {
    /// The objective's name, as the WIT and the provenance say it.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Sft(_) => "sft",
            Objective::Dpo(_) => "dpo",
            Objective::Grpo(_) => "grpo",
        }
    }

    /// Items (examples, pairs or groups).
    pub fn len(&self) -> usize {
        match self {
            Objective::Sft(v) => v.len(),
            Objective::Dpo(v) => v.len(),
            Objective::Grpo(v) => v.len(),
        }
    }

    /// Whether there is nothing to learn from.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of text the objective carries (what the host bounds before
    /// tokenizing anything).
    pub fn text_bytes(&self) -> usize {
        let input = |i: &Input| i.counted_bytes();
        match self {
            Objective::Sft(v) => v.iter().map(|e| input(&e.input) + e.target.len()).sum(),
            Objective::Dpo(v) => v
                .iter()
                .map(|p| input(&p.input) + p.chosen.len() + p.rejected.len())
                .sum(),
            Objective::Grpo(v) => v
                .iter()
                .map(|g| input(&g.input) + g.samples.iter().map(|s| s.0.len()).sum::<usize>())
                .sum(),
        }
    }
}

/// How to train; `None` is the host's default (see the WIT).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    /// Optimizer steps.
    pub steps: u32,
    /// Items per step.
    pub batch: Option<u32>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// LoRA rank.
    pub lora_rank: Option<u32>,
    /// Longest item in tokens.
    pub max_len: Option<u32>,
    /// Data order and initialisation.
    pub seed: Option<u64>,
    /// DPO's beta.
    pub beta: Option<f64>,
    /// GRPO's clip range.
    pub clip_range: Option<f64>,
}

/// What the request has left for this run: the run stops between steps
/// when one is spent, when `deadline` passes or when `cancel` is set (the
/// request ended).
#[derive(Debug, Clone)]
pub struct TrainLimits {
    /// Tokens the run may put through the model.
    pub tokens: u64,
    /// Wall time the run may take.
    pub time: Duration,
    /// The request's deadline.
    pub deadline: Instant,
    /// Set when the request is gone.
    pub cancel: Arc<AtomicBool>,
    /// Tokens put through the model so far, added as each pass finishes:
    /// what the request is charged whatever the run's outcome (a run that
    /// fails or is stopped has done that work too).
    pub spent: Arc<AtomicU64>,
}

/// Why a run stopped before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainStop {
    /// The request's training tokens ran out.
    Tokens,
    /// The request's training time ran out.
    Time,
    /// The request's deadline passed, or it was cancelled.
    Deadline,
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Steps taken.
    pub steps: u32,
    /// Tokens through the model, reference passes included.
    pub tokens: u64,
    /// Loss at the first step.
    pub first_loss: f64,
    /// Loss at the last step.
    pub last_loss: f64,
    /// Wall time, in milliseconds.
    pub millis: u64,
}

/// A trained member's folder on disk, removed when the last handle drops
/// (the request that trained it ended and nobody kept it).
#[derive(Debug)]
pub struct TrainedFolder {
    path: PathBuf,
    keep: AtomicBool,
}

impl TrainedFolder {
    /// Takes ownership of `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            keep: AtomicBool::new(false),
        }
    }

    /// Where the folder is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the folder on disk when this handle drops (it was moved or
    /// kept under a name).
    pub fn persist(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TrainedFolder {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A trained member: its id and what serves it (as for a merge), its
/// folder, and what the run did.
#[derive(Clone)]
pub struct Trained {
    /// The member, as [`super::weights::Overlay`] routes it.
    pub member: Merged,
    /// Its weights on disk (a later run may train it further).
    pub folder: Arc<TrainedFolder>,
    /// The run's figures.
    pub outcome: TrainOutcome,
}

/// What a run starts from.
#[derive(Clone)]
pub enum TrainBase {
    /// A pool member (or one kept by name), by id.
    Member(String),
    /// A member trained earlier in this request.
    Trained(Arc<TrainedFolder>),
}

/// Why a run made no member, split by whose fault it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainFailed {
    /// The data, the parameters or the base do not fit (the module gets
    /// `invalid-params`).
    #[error("{0}")]
    Invalid(String),
    /// A budget of the request ran out mid-run (the request ends, as for
    /// every budget).
    #[error("training stopped: {0:?}")]
    Stopped(TrainStop),
    /// The host failed (a disk, a worker): the module gets
    /// `inference-failed`.
    #[error("{0}")]
    Host(String),
}

/// Trains members on demand.
pub trait Trainer: Send + Sync + 'static {
    /// Trains a copy of `base` on `objective` per `params`, within `limits`;
    /// `id` is the id the new member answers to.
    fn train(
        &self,
        id: String,
        base: TrainBase,
        objective: Objective,
        params: TrainParams,
        limits: TrainLimits,
    ) -> BoxFuture<'static, Result<Trained, TrainFailed>>;

    /// Keeps `trained` beyond its request as pool member `name`, on behalf
    /// of module `owner`. The caller has checked that `name` is not a pool
    /// member. The default refuses.
    fn keep(&self, name: &str, trained: &Trained, owner: &str) -> Result<(), KeepRefused> {
        let _ = (name, trained, owner);
        Err(KeepRefused::NotAllowed(
            "this host does not keep trained members".into(),
        ))
    }

    /// The members kept so far, oldest first.
    fn kept(&self) -> Vec<Named> {
        Vec::new()
    }
}

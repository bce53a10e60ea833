//! The model folder: the on-disk format that training, merging and the
//! pool share.
//!
//! A model folder is a Hugging Face directory the pool loads with
//! `backend = "hf"` (`model.safetensors`, `config.json`, the tokenizer),
//! or a LoRA adapter folder naming its base, plus a contributor card,
//! `contributor.toml`, saying who made the weights, their sha256 and how
//! they were made: trained ([`TrainingFacts`], written by
//! [`crate::contribute`]) or merged ([`MergeFacts`], written by
//! [`crate::merge`]). The format lives here, below both writers, so that
//! neither imports the other to read what the other wrote.

use serde::{Deserialize, Serialize};

use crate::inference::weights::MergeSpec;
use crate::pool::CardConfig;

/// File name of the weights inside a model folder.
pub const WEIGHTS: &str = "model.safetensors";
/// File name of the contributor card inside a model folder.
pub const CARD: &str = "contributor.toml";

/// How a model was trained: written on its card so others can judge it and
/// redo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingFacts {
    /// The base model.
    pub base: String,
    /// The data file as given.
    pub data: String,
    /// Its sha256.
    pub data_sha256: String,
    /// Examples in it.
    pub examples: usize,
    /// LoRA or full, with settings.
    pub method: TrainMethod,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step (batch x accumulation).
    pub examples_per_step: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Loss of the first and the last step.
    pub first_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Numbers trained.
    pub trainable_params: usize,
    /// LoRA on the last this many layers only, over a frozen trunk
    /// (`--top-layers`; absent when every layer was adapted).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub top_layers: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// `contributor.toml`: what `tessera contribute add` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContributorFile {
    /// Suggested member id.
    pub id: String,
    /// sha256 of [`WEIGHTS`] (of `adapter.safetensors` in an adapter folder).
    pub sha256: String,
    /// The human card.
    pub card: CardConfig,
    /// How the weights were trained (`tessera contribute train`).
    #[serde(default)]
    pub training: Option<TrainingFacts>,
    /// How the weights were merged (`tessera merge`).
    #[serde(default)]
    pub merge: Option<MergeFacts>,
}

/// How the model is trained.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainMethod {
    /// Low-rank adapters on `targets` (names from [`crate::contribute::model::LORA_TARGETS`]).
    Lora {
        /// Rank `r`.
        rank: usize,
        /// Scale numerator: the update is `(alpha / rank) B A`.
        alpha: f64,
        /// Projections that get adapters.
        targets: Vec<String>,
    },
    /// Every weight is trained.
    Full,
}

/// How a merged model was made: written on its card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeFacts {
    /// The spec.
    #[serde(flatten)]
    pub spec: MergeSpec,
    /// The models, as named by the caller.
    pub models: Vec<String>,
    /// The base, if the method has one.
    pub base: Option<String>,
}

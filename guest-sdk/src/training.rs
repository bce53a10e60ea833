//! Training members from a strategy: supervised fine-tuning, DPO and GRPO
//! on data the module supplies, each returning a member that every
//! `models` call accepts for the rest of the request.
//!
//! The host does the numerical work (LoRA on every projection, AdamW,
//! cosine decay) and bounds it: a manifest asks for `train_runs`,
//! `train_steps`, `train_tokens` and `train_ms`, and the operator's policy
//! grants at most its own maxima. A run that asks for more steps than
//! remain, or that spends the tokens or time mid-run, ends the request
//! (`budget-exhausted`), so a module plans its steps from its budget rather
//! than probing. Training belongs in `fit` where it can: a trained member
//! lives only for the request, unless the operator lets modules
//! [`keep`] one by name.
//!
//! ```ignore
//! use tessera_sdk::training::{self, Params, SftExample};
//! let report = training::sft(
//!     "smollm2-135m",
//!     vec![SftExample { input: tessera_sdk::Input::Prompt("2+2?".into()), target: "4".into() }],
//!     Params::steps(20),
//! )?;
//! let g = tessera_sdk::generate(&report.model, &input, &params)?;
//! ```

use crate::bindings::strategy::tessera::collab::training as host;
pub use crate::bindings::strategy::tessera::collab::training::{
    Objective, Preference, Sample, SampleGroup, SftExample, TrainParams, TrainReport,
};
use crate::Error;

/// Whether a member is one trained by a module rather than a contribution:
/// the host cards trained members (request-scoped or kept) as "trained on
/// request". Methods that combine the pool's contributions leave them out
/// by default (an aggregator kept by an earlier fit is not a solver).
pub fn is_trained(m: &crate::ModelInfo) -> bool {
    m.contributor.starts_with("trained on request")
}

/// Whether [`train`] accepts `m` as a base (llama and qwen2 members).
pub fn trainable(m: &crate::ModelInfo) -> bool {
    matches!(m.architecture.as_str(), "llama" | "qwen2")
}

/// [`TrainParams`] with the host's defaults for everything but the steps.
pub struct Params;

impl Params {
    /// `n` optimizer steps, every other field the host's default.
    pub fn steps(n: u32) -> TrainParams {
        TrainParams {
            steps: n,
            batch: None,
            lr: None,
            lora_rank: None,
            max_len: None,
            seed: None,
            beta: None,
            clip_range: None,
        }
    }
}

/// Trains a copy of `base` on `objective`; the report names the new member.
pub fn train(base: &str, objective: &Objective, params: TrainParams) -> Result<TrainReport, Error> {
    host::train(base, objective, params)
}

/// Supervised fine-tuning of `base` on `examples` (loss on the targets only).
pub fn sft(base: &str, examples: Vec<SftExample>, params: TrainParams) -> Result<TrainReport, Error> {
    train(base, &Objective::Sft(examples), params)
}

/// DPO of `base` on `pairs`, against `base` itself as the reference.
pub fn dpo(base: &str, pairs: Vec<Preference>, params: TrainParams) -> Result<TrainReport, Error> {
    train(base, &Objective::Dpo(pairs), params)
}

/// One GRPO run of `base` on `groups` of samples it generated, with the
/// module's rewards (advantages are relative within each group, so a group
/// whose samples all earned the same reward teaches nothing).
pub fn grpo(base: &str, groups: Vec<SampleGroup>, params: TrainParams) -> Result<TrainReport, Error> {
    train(base, &Objective::Grpo(groups), params)
}

/// This request is done with trained member `model`: its weights are freed.
pub fn release(model: &str) -> Result<(), Error> {
    host::release(model)
}

/// Keeps trained member `model` beyond the request as pool member `name`,
/// where the operator allows it (`unsupported` otherwise).
pub fn keep(model: &str, name: &str) -> Result<(), Error> {
    host::keep(model, name)
}

//! Training runs that modules ask for (`training.train`): LoRA on a base's
//! f32 weights, in memory, on one of three objectives, within the
//! request's budgets.
//!
//! The file-based path ([`super::train`]) serves contributors: data on
//! disk, checkpoints, resumption. A module's run is short and owned by one
//! request, so it keeps everything in memory and stops between steps when
//! the request's training tokens or time run out, its deadline passes or
//! it is cancelled. The three objectives share the model, the optimizer
//! (AdamW, cosine decay to a tenth, gradient clipping at 1) and the data
//! order (a seeded permutation per epoch, [`super::train::step_examples`]):
//!
//! - **SFT**: mean negative log-likelihood of the targets' tokens.
//! - **DPO** (Rafailov et al., 2023, "Direct Preference Optimization"): for
//!   each pair, `z = beta ((log p(chosen) - log p0(chosen)) -
//!   (log p(rejected) - log p0(rejected)))` with `p0` the starting weights (computed once,
//!   before the first step), and the loss is `softplus(-z)`, the negative
//!   log-sigmoid of the implicit reward margin.
//! - **GRPO** (Shao et al., 2024, "DeepSeekMath"): within each group, a
//!   sample's advantage is `(reward - mean) / (std + 1e-6)`; the loss is the
//!   PPO-clipped surrogate `-min(r A, clip(r, 1-e, 1+e) A)` averaged over
//!   samples, with one ratio per sample from its mean token log-likelihood
//!   against the starting weights (a sequence-level ratio, as GSPO, Zheng et
//!   al., 2025, argues for; with one step it is exactly 1 and the gradient
//!   is the plain policy gradient). No KL term: the runs are short and start
//!   from the member itself. Groups whose rewards are all equal carry no
//!   signal and are dropped.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use super::data::{self, Example};
use super::model::{TrainModel, LORA_TARGETS};
use super::optim::{self, AdamW, AdamWConfig};
use super::train::{micro_batch, step_examples, text_format, StepStats, TrainOptions, TrainReport};
use super::{output, ContributeError};
use crate::inference::train::{Objective, TrainFailed, TrainLimits, TrainOutcome, TrainParams, TrainStop};
use crate::model_folder::TrainMethod;

/// Most optimizer steps one run may ask for (the request's `train-steps`
/// bounds the sum).
pub const MAX_STEPS: u32 = 10_000;
/// Most items (examples, pairs or groups) in one run.
pub const MAX_ITEMS: usize = 4_096;
/// Most samples in one GRPO group.
pub const MAX_GROUP: usize = 64;
/// Most text, in bytes, one run's objective may carry.
pub const MAX_TEXT_BYTES: usize = 8 << 20;
/// Longest item, in tokens.
pub const MAX_LEN: u32 = 1_024;

/// A run's settings, checked and with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Items per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// LoRA rank (alpha is twice the rank).
    pub rank: usize,
    /// Longest item in tokens.
    pub max_len: usize,
    /// Seed.
    pub seed: u64,
    /// DPO's beta.
    pub beta: f64,
    /// GRPO's clip range.
    pub clip_range: f64,
}

impl SessionConfig {
    /// `params` for `objective`, checked; the error says which value is
    /// wrong and what range it takes.
    pub fn new(params: &TrainParams, objective: &Objective) -> Result<Self, String> {
        if params.steps == 0 || params.steps > MAX_STEPS {
            return Err(format!("steps {} is out of range: use 1..={MAX_STEPS}", params.steps));
        }
        let default_batch = if matches!(objective, Objective::Grpo(_)) { 1 } else { 4 };
        let batch = params.batch.unwrap_or(default_batch);
        if !(1..=16).contains(&batch) {
            return Err(format!("batch {batch} is out of range: use 1..=16"));
        }
        let default_lr = if matches!(objective, Objective::Dpo(_)) {
            1e-4
        } else {
            5e-4
        };
        let lr = params.lr.unwrap_or(default_lr);
        if !(lr > 0.0 && lr < 0.1) {
            return Err(format!("lr {lr} is out of range: use a value in (0, 0.1), e.g. 5e-4"));
        }
        let rank = params.lora_rank.unwrap_or(8);
        if !(1..=64).contains(&rank) {
            return Err(format!("lora-rank {rank} is out of range: use 1..=64"));
        }
        let max_len = params.max_len.unwrap_or(256);
        if !(8..=MAX_LEN).contains(&max_len) {
            return Err(format!("max-len {max_len} is out of range: use 8..={MAX_LEN}"));
        }
        let beta = params.beta.unwrap_or(0.1);
        if !(beta > 0.0 && beta <= 10.0) {
            return Err(format!("beta {beta} is out of range: use a value in (0, 10]"));
        }
        let clip_range = params.clip_range.unwrap_or(0.2);
        if !(clip_range > 0.0 && clip_range < 1.0) {
            return Err(format!(
                "clip-range {clip_range} is out of range: use a value in (0, 1)"
            ));
        }
        Ok(Self {
            steps: u64::from(params.steps),
            batch: batch as usize,
            lr,
            rank: rank as usize,
            max_len: max_len as usize,
            seed: params.seed.unwrap_or(0),
            beta,
            clip_range,
        })
    }
}

/// Checks the objective's shape before anything is tokenized: sizes, and
/// rewards that are numbers.
pub fn check_objective(objective: &Objective) -> Result<(), String> {
    if objective.is_empty() {
        return Err(format!(
            "the {} objective has no items: nothing to learn from",
            objective.name()
        ));
    }
    if objective.len() > MAX_ITEMS {
        return Err(format!(
            "{} items in one run; the limit is {MAX_ITEMS}: train on fewer",
            objective.len()
        ));
    }
    let bytes = objective.text_bytes();
    if bytes > MAX_TEXT_BYTES {
        return Err(format!(
            "the objective carries {} KiB of text; the limit is {} KiB: train on fewer or shorter items",
            bytes >> 10,
            MAX_TEXT_BYTES >> 10
        ));
    }
    // Each item is one model input, held to the rule every model call
    // keeps: a single huge item is refused before anything is tokenized.
    let items: Vec<(&crate::inference::Input, usize)> = match objective {
        Objective::Sft(v) => v.iter().map(|e| (&e.input, e.target.len())).collect(),
        Objective::Dpo(v) => v
            .iter()
            .map(|p| (&p.input, p.chosen.len().max(p.rejected.len())))
            .collect(),
        Objective::Grpo(v) => v
            .iter()
            .map(|g| (&g.input, g.samples.iter().map(|s| s.0.len()).max().unwrap_or(0)))
            .collect(),
    };
    for (i, (input, answer)) in items.into_iter().enumerate() {
        input
            .check_size(answer)
            .map_err(|e| format!("item {} of the {} objective: {e}", i + 1, objective.name()))?;
    }
    if let Objective::Grpo(groups) = objective {
        for (i, g) in groups.iter().enumerate() {
            if g.samples.len() < 2 || g.samples.len() > MAX_GROUP {
                return Err(format!(
                    "group {} has {} samples: GRPO compares 2..={MAX_GROUP} samples of one input",
                    i + 1,
                    g.samples.len()
                ));
            }
            if g.samples.iter().any(|s| !s.1.is_finite()) {
                return Err(format!("group {}: every reward must be a finite number", i + 1));
            }
        }
    }
    Ok(())
}

/// A run's data, tokenized, with what each objective precomputes.
enum Prepared {
    Sft(Vec<Example>),
    /// (chosen, rejected, reference margin log p0(c) - log p0(r)).
    Dpo(Vec<(Example, Example, f64)>),
    /// Per kept group: (sample, advantage, starting mean token log-prob).
    Grpo(Vec<Vec<(Example, f64, f64)>>),
}

impl Prepared {
    fn len(&self) -> usize {
        match self {
            Prepared::Sft(v) => v.len(),
            Prepared::Dpo(v) => v.len(),
            Prepared::Grpo(v) => v.len(),
        }
    }
}

/// What stops a run between steps.
struct Guard<'a> {
    limits: &'a TrainLimits,
    started: Instant,
    tokens: u64,
}

impl Guard<'_> {
    /// Whether `next` more tokens may run now.
    fn admit(&self, next: u64) -> Result<(), TrainStop> {
        if self.limits.cancel.load(std::sync::atomic::Ordering::SeqCst) || Instant::now() >= self.limits.deadline {
            return Err(TrainStop::Deadline);
        }
        if self.started.elapsed() >= self.limits.time {
            return Err(TrainStop::Time);
        }
        if self.tokens + next > self.limits.tokens {
            return Err(TrainStop::Tokens);
        }
        Ok(())
    }
}

impl Guard<'_> {
    /// Counts `n` tokens that went through the model, here and in the
    /// limits' shared count.
    fn spend(&mut self, n: u64) {
        self.tokens += n;
        self.limits.spent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

fn rows_tokens(rows: &[&Example]) -> u64 {
    rows.iter().map(|e| e.ids.len().saturating_sub(1) as u64).sum()
}

/// Per-row log-likelihoods of `rows` under `model`, without gradients,
/// a micro-batch at a time ([`MICRO_TOKENS`]: a forward pass holds its
/// whole graph until the result is detached, so eight long rows at once
/// would cost what eight training rows do).
fn reference(model: &TrainModel, rows: &[&Example], guard: &mut Guard) -> Result<Vec<f64>, TrainFailed> {
    let mut out = Vec::with_capacity(rows.len());
    let units: Vec<(usize, usize)> = rows.iter().map(|e| (1, e.ids.len().saturating_sub(1).max(1))).collect();
    for group in micro_batches(&units) {
        let chunk: Vec<&Example> = group.iter().map(|i| rows[*i]).collect();
        let chunk = chunk.as_slice();
        guard.admit(rows_tokens(chunk)).map_err(TrainFailed::Stopped)?;
        let (inputs, targets, mask, n) = micro_batch(chunk, model.device()).map_err(host)?;
        let lp = model.row_logprobs(&inputs, &targets, &mask).map_err(host)?.detach();
        guard.spend(n as u64);
        out.extend(lp.to_vec1::<f32>().map_err(host)?.into_iter().map(f64::from));
    }
    Ok(out)
}

fn host(e: impl std::fmt::Display) -> TrainFailed {
    TrainFailed::Host(format!("training failed: {e}"))
}

fn tokenize(objective: &Objective, base_dir: &Path, max_len: usize) -> Result<Vec<Vec<Example>>, TrainFailed> {
    let (tok, chat) = text_format(base_dir).map_err(|e| TrainFailed::Host(e.to_string()))?;
    let one = |i: usize, input: &crate::inference::Input, text: &str| {
        data::tokenize_answer(&tok, &chat, input, text, max_len)
            .map_err(|e| TrainFailed::Invalid(format!("item {}: {e}", i + 1)))
    };
    match objective {
        Objective::Sft(v) => v
            .iter()
            .enumerate()
            .map(|(i, e)| Ok(vec![one(i, &e.input, &e.target)?]))
            .collect(),
        Objective::Dpo(v) => v
            .iter()
            .enumerate()
            .map(|(i, p)| Ok(vec![one(i, &p.input, &p.chosen)?, one(i, &p.input, &p.rejected)?]))
            .collect(),
        Objective::Grpo(v) => v
            .iter()
            .enumerate()
            .map(|(i, g)| g.samples.iter().map(|(t, _)| one(i, &g.input, t)).collect())
            .collect(),
    }
}

fn prepare(
    objective: &Objective,
    items: Vec<Vec<Example>>,
    model: &TrainModel,
    guard: &mut Guard,
) -> Result<Prepared, TrainFailed> {
    match objective {
        Objective::Sft(_) => Ok(Prepared::Sft(items.into_iter().flatten().collect())),
        Objective::Dpo(_) => {
            let rows: Vec<&Example> = items.iter().flatten().collect();
            let lp = reference(model, &rows, guard)?;
            let mut out = Vec::with_capacity(items.len());
            for (i, mut pair) in items.into_iter().enumerate() {
                let (Some(r), Some(c)) = (pair.pop(), pair.pop()) else {
                    continue;
                };
                out.push((c, r, lp[2 * i] - lp[2 * i + 1]));
            }
            Ok(Prepared::Dpo(out))
        }
        Objective::Grpo(groups) => {
            let mut out = Vec::new();
            for (g, rows) in groups.iter().zip(items) {
                let rewards: Vec<f64> = g.samples.iter().map(|s| s.1).collect();
                let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
                let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rewards.len() as f64).sqrt();
                if std < 1e-9 {
                    continue;
                }
                let refs: Vec<&Example> = rows.iter().collect();
                let lp = reference(model, &refs, guard)?;
                let kept = rows
                    .into_iter()
                    .zip(rewards)
                    .zip(lp)
                    .map(|((e, r), lp)| {
                        let n = e.targets().max(1) as f64;
                        (e, (r - mean) / (std + 1e-6), lp / n)
                    })
                    .collect();
                out.push(kept);
            }
            if out.is_empty() {
                return Err(TrainFailed::Invalid(
                    "every group's rewards are equal: GRPO learns from differences within a group, so \
                     sample more or reward more finely"
                        .into(),
                ));
            }
            Ok(Prepared::Grpo(out))
        }
    }
}

/// `softplus(x) = log(1 + e^x)`, stable for large `|x|`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    x.relu()? + tail
}

/// Padded tokens one forward/backward pass may hold. A step's items are
/// split into micro-batches of at most this many (at least one unit each)
/// and their gradients summed, so a step's peak memory is one
/// micro-batch's graph, whatever `batch` and the samples per group are:
/// without it, eight 700-token GRPO samples in one pass took 17 GB for
/// SmolLM2-135M and the kernel killed the host. One row of `max_len` 1,024
/// is the floor (attention's backward keeps L x L per head and layer:
/// about 4.5 GB for SmolLM2 at 1,024).
const MICRO_TOKENS: usize = 1024;

/// The picked items as units (an SFT row, a DPO pair, a GRPO sample),
/// grouped into micro-batches by padded size ([`MICRO_TOKENS`]).
fn micro_batches(units: &[(usize, usize)]) -> Vec<Vec<usize>> {
    // `units` holds (rows in the unit, longest row's tokens).
    let mut out: Vec<Vec<usize>> = Vec::new();
    let (mut rows, mut longest) = (0usize, 0usize);
    for (i, &(r, len)) in units.iter().enumerate() {
        let l = longest.max(len);
        match out.last_mut() {
            Some(cur) if (rows + r) * l <= MICRO_TOKENS => {
                cur.push(i);
                rows += r;
                longest = l;
            }
            _ => {
                out.push(vec![i]);
                rows = r;
                longest = len;
            }
        }
    }
    out
}

/// One micro-batch's share of a step's loss (the shares of a step's
/// micro-batches sum to its loss, so their gradients sum to its gradient),
/// and the tokens it ran. `units` index into the step's units (see
/// [`step_units`]); each objective normalises by the whole step's count.
fn micro_loss(
    prepared: &Prepared,
    picked: &[usize],
    units: &[usize],
    model: &TrainModel,
    cfg: &SessionConfig,
) -> candle_core::Result<(Tensor, usize)> {
    let dev = model.device();
    match prepared {
        Prepared::Sft(items) => {
            let all: usize = picked.iter().map(|i| items[*i].targets()).sum();
            let rows: Vec<&Example> = units.iter().map(|u| &items[picked[*u]]).collect();
            let (inputs, t, mask, n) = micro_batch(&rows, dev)?;
            let loss = (model.nll_sum(&inputs, &t, &mask, None)? / all.max(1) as f64)?;
            Ok((loss, n))
        }
        Prepared::Dpo(pairs) => {
            let chosen: Vec<&(Example, Example, f64)> = units.iter().map(|u| &pairs[picked[*u]]).collect();
            let rows: Vec<&Example> = chosen.iter().flat_map(|p| [&p.0, &p.1]).collect();
            let (inputs, t, mask, n) = micro_batch(&rows, dev)?;
            let lp = model.row_logprobs(&inputs, &t, &mask)?.reshape((chosen.len(), 2))?;
            let margin = (lp.narrow(1, 0, 1)? - lp.narrow(1, 1, 1)?)?.squeeze(1)?;
            let reference: Vec<f32> = chosen.iter().map(|p| p.2 as f32).collect();
            let reference = Tensor::from_vec(reference, chosen.len(), dev)?;
            let z = ((margin - reference)? * cfg.beta)?;
            Ok(((softplus(&z.neg()?)?.sum_all()? / picked.len() as f64)?, n))
        }
        Prepared::Grpo(groups) => {
            let flat: Vec<&(Example, f64, f64)> = picked.iter().flat_map(|i| groups[*i].iter()).collect();
            let samples: Vec<&(Example, f64, f64)> = units.iter().map(|u| flat[*u]).collect();
            let rows: Vec<&Example> = samples.iter().map(|s| &s.0).collect();
            let (inputs, t, mask, n) = micro_batch(&rows, dev)?;
            let lp = model.row_logprobs(&inputs, &t, &mask)?;
            let lens: Vec<f32> = samples.iter().map(|s| s.0.targets().max(1) as f32).collect();
            let old: Vec<f32> = samples.iter().map(|s| s.2 as f32).collect();
            let adv: Vec<f32> = samples.iter().map(|s| s.1 as f32).collect();
            let m = samples.len();
            let lens = Tensor::from_vec(lens, m, dev)?;
            let old = Tensor::from_vec(old, m, dev)?;
            let adv = Tensor::from_vec(adv, m, dev)?;
            let ratio = ((lp / lens)? - old)?.exp()?;
            let clipped = ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)?;
            let surrogate = (ratio * &adv)?.minimum(&(clipped * &adv)?)?;
            Ok(((surrogate.sum_all()? / flat.len() as f64)?.neg()?, n))
        }
    }
}

/// The step's units, each as (rows, longest row's tokens).
fn step_units(prepared: &Prepared, picked: &[usize]) -> Vec<(usize, usize)> {
    let len = |e: &Example| e.ids.len().saturating_sub(1).max(1);
    match prepared {
        Prepared::Sft(items) => picked.iter().map(|i| (1, len(&items[*i]))).collect(),
        Prepared::Dpo(pairs) => picked
            .iter()
            .map(|i| (2, len(&pairs[*i].0).max(len(&pairs[*i].1))))
            .collect(),
        Prepared::Grpo(groups) => picked
            .iter()
            .flat_map(|i| groups[*i].iter().map(|s| (1, len(&s.0))))
            .collect(),
    }
}

/// One optimizer step's loss and gradients, accumulated over its
/// micro-batches; and the tokens it ran. The guard is asked before each
/// micro-batch (the step's tokens were admitted before it began) and
/// counts each one's tokens as it ends: one step can hold a million
/// tokens (16 GRPO groups of 64 samples of 1,024), many minutes on a CPU,
/// so a deadline, a cancellation or the time budget stops it within one
/// micro-batch rather than after the step.
fn step_grads(
    prepared: &Prepared,
    picked: &[usize],
    model: &TrainModel,
    params: &std::collections::BTreeMap<String, candle_core::Var>,
    cfg: &SessionConfig,
    guard: &mut Guard,
) -> Result<(f64, std::collections::HashMap<String, Tensor>, usize), TrainFailed> {
    let mut grads: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    let (mut value, mut tokens) = (0.0f64, 0usize);
    for units in micro_batches(&step_units(prepared, picked)) {
        guard.admit(0).map_err(TrainFailed::Stopped)?;
        let (loss, n) = micro_loss(prepared, picked, &units, model, cfg).map_err(host)?;
        value += f64::from(loss.to_scalar::<f32>().map_err(host)?);
        tokens += n;
        let store = loss.backward().map_err(host)?;
        guard.spend(n as u64);
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                let sum = match grads.remove(name) {
                    Some(acc) => (acc + g).map_err(host)?,
                    None => g,
                };
                grads.insert(name.clone(), sum);
            }
        }
    }
    Ok((value, grads, tokens))
}

/// What [`run`] needs besides the objective.
pub struct RunSpec<'a> {
    /// The base's Hugging Face folder.
    pub base_dir: &'a Path,
    /// How the card names the base.
    pub base_name: &'a str,
    /// Where the trained folder goes (created; must not exist).
    pub out: &'a Path,
    /// The card of the trained member.
    pub card: crate::pool::CardConfig,
}

/// Trains per `cfg` within `limits` and writes the trained model folder
/// (merged f32 weights, the card, the loss curve) to `spec.out`.
pub fn run(
    spec: &RunSpec,
    objective: &Objective,
    cfg: &SessionConfig,
    limits: &TrainLimits,
) -> Result<TrainOutcome, TrainFailed> {
    crate::alloc::keep_freed_memory();
    let mut guard = Guard {
        limits,
        started: Instant::now(),
        tokens: 0,
    };
    guard.admit(0).map_err(TrainFailed::Stopped)?;
    let items = tokenize(objective, spec.base_dir, cfg.max_len)?;
    let method = TrainMethod::Lora {
        rank: cfg.rank,
        alpha: 2.0 * cfg.rank as f64,
        targets: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
    };
    let device = candle_core::Device::Cpu;
    let model = TrainModel::load(spec.base_dir, &method, 0, cfg.seed, &device).map_err(TrainFailed::Invalid)?;
    let prepared = prepare(objective, items, &model, &mut guard)?;
    let params = model.trainable().clone();
    let mut opt = AdamW::new(AdamWConfig::default(), &params).map_err(host)?;
    let mut log: Vec<StepStats> = Vec::new();
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        let picked = step_examples(prepared.len(), cfg.batch, step, cfg.seed);
        let next = match &prepared {
            Prepared::Sft(v) => rows_tokens(&picked.iter().map(|i| &v[*i]).collect::<Vec<_>>()),
            Prepared::Dpo(v) => picked.iter().map(|i| rows_tokens(&[&v[*i].0, &v[*i].1])).sum(),
            Prepared::Grpo(v) => picked
                .iter()
                .map(|i| rows_tokens(&v[*i].iter().map(|s| &s.0).collect::<Vec<_>>()))
                .sum(),
        };
        guard.admit(next).map_err(TrainFailed::Stopped)?;
        let (value, mut grads, tokens) = step_grads(&prepared, &picked, &model, &params, cfg, &mut guard)?;
        if !value.is_finite() {
            return Err(TrainFailed::Invalid(format!(
                "the loss became {value} at step {}: lower lr",
                step + 1
            )));
        }
        let grad_norm = optim::clip(&mut grads, 1.0).map_err(host)?;
        let lr = optim::schedule(step, cfg.steps, 0, cfg.lr, 0.1);
        opt.apply(&params, &grads, lr).map_err(host)?;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        log.push(StepStats {
            step: step + 1,
            total: cfg.steps,
            loss: value,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
        });
    }
    write(spec, objective, cfg, &model, &log, method)?;
    crate::alloc::return_freed_memory();
    Ok(TrainOutcome {
        steps: log.len() as u32,
        tokens: guard.tokens,
        first_loss: log.first().map_or(f64::NAN, |s| s.loss),
        last_loss: log.last().map_or(f64::NAN, |s| s.loss),
        millis: guard.started.elapsed().as_millis() as u64,
    })
}

fn write(
    spec: &RunSpec,
    objective: &Objective,
    cfg: &SessionConfig,
    model: &TrainModel,
    log: &[StepStats],
    method: TrainMethod,
) -> Result<(), TrainFailed> {
    use sha2::{Digest, Sha256};
    let data = serde_json::to_vec(objective).unwrap_or_default();
    let data_sha = hex::encode(Sha256::digest(&data));
    let mut opts = TrainOptions::new(
        spec.base_dir.to_path_buf(),
        spec.base_name.to_string(),
        format!(
            "{} items from a module ({} objective)",
            objective.len(),
            objective.name()
        )
        .into(),
        spec.out.to_path_buf(),
        method,
    );
    opts.steps = cfg.steps;
    opts.batch = cfg.batch;
    opts.lr = cfg.lr;
    opts.max_len = cfg.max_len;
    opts.seed = cfg.seed;
    opts.card = spec.card.clone();
    let report = TrainReport {
        steps_done: log.len() as u64,
        interrupted: false,
        log: log.to_vec(),
        trainable_params: model.trainable_count(),
        examples: objective.len(),
        model_sha256: None,
    };
    std::fs::create_dir_all(spec.out).map_err(|e| TrainFailed::Host(format!("{}: {e}", spec.out.display())))?;
    output::write_model(&opts, model, &report, &data_sha).map_err(|e| match e {
        ContributeError::Io(m) => TrainFailed::Host(m),
        other => TrainFailed::Host(other.to_string()),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::train::{Preference, SampleGroup, SftItem};
    use crate::inference::Input;

    fn sft(n: usize) -> Objective {
        Objective::Sft(
            (0..n)
                .map(|i| SftItem {
                    input: Input::Prompt(format!("q{i}")),
                    target: "a".into(),
                })
                .collect(),
        )
    }

    #[test]
    fn params_get_defaults_per_objective_and_ranges_are_checked() {
        let p = TrainParams {
            steps: 3,
            ..Default::default()
        };
        let c = SessionConfig::new(&p, &sft(1)).unwrap();
        assert_eq!((c.batch, c.lr, c.rank, c.max_len), (4, 5e-4, 8, 256));
        let dpo = Objective::Dpo(vec![Preference {
            input: Input::Prompt("q".into()),
            chosen: "a".into(),
            rejected: "b".into(),
        }]);
        assert_eq!(SessionConfig::new(&p, &dpo).unwrap().lr, 1e-4);
        for (bad, word) in [
            (TrainParams { steps: 0, ..p.clone() }, "steps"),
            (
                TrainParams {
                    batch: Some(99),
                    ..p.clone()
                },
                "batch",
            ),
            (
                TrainParams {
                    lr: Some(2.0),
                    ..p.clone()
                },
                "lr",
            ),
            (
                TrainParams {
                    lora_rank: Some(0),
                    ..p.clone()
                },
                "lora-rank",
            ),
            (
                TrainParams {
                    max_len: Some(5000),
                    ..p.clone()
                },
                "max-len",
            ),
            (
                TrainParams {
                    beta: Some(-1.0),
                    ..p.clone()
                },
                "beta",
            ),
            (
                TrainParams {
                    clip_range: Some(1.5),
                    ..p.clone()
                },
                "clip-range",
            ),
        ] {
            let e = SessionConfig::new(&bad, &sft(1)).unwrap_err();
            assert!(e.starts_with(word), "{e}");
        }
    }

    #[test]
    fn objectives_are_bounded_before_tokenizing() {
        assert!(check_objective(&sft(0)).unwrap_err().contains("no items"));
        assert!(check_objective(&sft(MAX_ITEMS + 1)).unwrap_err().contains("limit"));
        let big = Objective::Sft(vec![SftItem {
            input: Input::Prompt("x".repeat(MAX_TEXT_BYTES)),
            target: "a".into(),
        }]);
        assert!(check_objective(&big).unwrap_err().contains("KiB"));
        let group = |samples: Vec<(String, f64)>| {
            Objective::Grpo(vec![SampleGroup {
                input: Input::Prompt("q".into()),
                samples,
            }])
        };
        assert!(check_objective(&group(vec![("a".into(), 1.0)])).is_err());
        assert!(check_objective(&group(vec![("a".into(), 1.0), ("b".into(), f64::NAN)])).is_err());
        assert!(check_objective(&group(vec![("a".into(), 1.0), ("b".into(), 0.0)])).is_ok());
    }

    #[test]
    fn micro_batches_bound_padded_tokens_and_keep_every_unit_in_order() {
        // (rows, longest row): SFT rows, a DPO pair, one row over the bound.
        let units = [(1, 300), (1, 300), (1, 300), (2, 200), (1, 2000), (1, 10), (1, 10)];
        let mb = micro_batches(&units);
        assert_eq!(mb, vec![vec![0, 1, 2], vec![3], vec![4], vec![5, 6]]);
        for b in &mb {
            let rows: usize = b.iter().map(|i| units[*i].0).sum();
            let longest = b.iter().map(|i| units[*i].1).max().unwrap();
            assert!(b.len() == 1 || rows * longest <= MICRO_TOKENS, "{b:?}");
        }
        assert!(micro_batches(&[]).is_empty());
    }

    #[test]
    fn softplus_is_stable_and_right() {
        let x = Tensor::new(&[-100f32, -1.0, 0.0, 1.0, 100.0], &candle_core::Device::Cpu).unwrap();
        let y = softplus(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = [0.0f32, 0.313_261_7, std::f32::consts::LN_2, 1.313_261_7, 100.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }
}

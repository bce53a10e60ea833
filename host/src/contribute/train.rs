//! The training loop, its checkpoints and resumption.
//!
//! Determinism: the data order of every epoch is a permutation drawn from
//! `seed` and the epoch number, so the examples of step `s` are a function
//! of `s` alone; LoRA's initial `A` comes from `seed`; candle's CPU kernels
//! reduce in a fixed order. A checkpoint holds the trained tensors, AdamW's
//! moments and the step, so a resumed run computes exactly what the
//! uninterrupted run would have (the contributor tests check bit equality).

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{self, Example};
use super::model::{TrainModel, LORA_TARGETS};
use super::optim::{self, AdamW, AdamWConfig};
use super::{output, write_atomic, ContributeError};
use crate::backends::gguf::hf;
use crate::backends::gguf::template::ChatFormat;
use crate::model_folder::TrainMethod;

/// Everything that decides what a run computes (and so must match for
/// `--resume`), plus where it writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Hugging Face folder of the base model.
    pub base_dir: PathBuf,
    /// How the base is named on the card (a member id or the folder).
    pub base_name: String,
    /// The JSONL data file.
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// LoRA or full fine-tuning.
    pub method: TrainMethod,
    /// Optimizer steps in total.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Longest example in tokens (longer ones are cut).
    pub max_len: usize,
    /// Seed for data order and initialisation.
    pub seed: u64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    /// Adapt only the last this many layers (0 = every layer). LoRA only.
    #[serde(default)]
    pub top_layers: usize,
    /// With `top_layers`, the base's GGUF file, whose quantized weights
    /// run the frozen layers below ([`super::trunk`]); `None` runs them in
    /// the f32 model.
    #[serde(default)]
    pub trunk_gguf: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0 = only on interruption).
    #[serde(skip)]
    pub checkpoint_every: u64,
    /// Continue from the checkpoint in `out`.
    #[serde(skip)]
    pub resume: bool,
    /// Write the LoRA adapter apart from the base (`adapter.safetensors`,
    /// a few MB) instead of merged weights; see
    /// [`crate::backends::gguf::adapter`]. LoRA only.
    #[serde(skip)]
    pub adapter: bool,
    /// The contributor card to write (an empty `source` is filled in).
    #[serde(skip)]
    pub card: crate::pool::CardConfig,
    /// Where to train (the CPU unless the caller says otherwise).
    #[serde(skip)]
    pub device: crate::backends::device::DeviceSpec,
}

impl TrainOptions {
    /// Options with the usual defaults for `method`: LoRA (r 8, alpha 16,
    /// q/v projections) at 2e-4, full fine-tuning at 2e-5; batch 4, one
    /// epoch's worth of steps is set by [`train`] when `steps` is 0.
    pub fn new(base_dir: PathBuf, base_name: String, data: PathBuf, out: PathBuf, method: TrainMethod) -> Self {
        let lr = match method {
            TrainMethod::Lora { .. } => 2e-4,
            TrainMethod::Full => 2e-5,
        };
        Self {
            base_dir,
            base_name,
            data,
            out,
            method,
            steps: 0,
            batch: 4,
            accumulate: 1,
            lr,
            warmup: 0,
            min_lr_ratio: 0.1,
            max_len: 512,
            seed: 0,
            adamw: AdamWConfig::default(),
            clip: 1.0,
            top_layers: 0,
            trunk_gguf: None,
            checkpoint_every: 50,
            resume: false,
            adapter: false,
            card: crate::pool::CardConfig::default(),
            device: crate::backends::device::DeviceSpec::Cpu,
        }
    }

    fn check(&self) -> Result<(), ContributeError> {
        let bad = |m: String| Err(ContributeError::Options(m));
        if self.batch == 0 || self.accumulate == 0 {
            return bad("--batch and --accumulate must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!(
                "--lr {} is out of range: use a value in (0, 1), e.g. 2e-4 for LoRA",
                self.lr
            ));
        }
        if self.max_len < 8 {
            return bad(format!(
                "--max-len {} is too short: use at least 8 tokens",
                self.max_len
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("--min-lr-ratio must be in [0, 1]".into());
        }
        if let TrainMethod::Lora { rank, targets, alpha } = &self.method {
            if *rank == 0 || *rank > 256 {
                return bad(format!("--lora-rank {rank} is out of range: use 1..=256"));
            }
            if *alpha <= 0.0 {
                return bad("--lora-alpha must be positive".into());
            }
            if targets.is_empty() {
                return bad(format!(
                    "--lora-targets is empty: name some of {}",
                    LORA_TARGETS.join(", ")
                ));
            }
            if let Some(t) = targets.iter().find(|t| !LORA_TARGETS.contains(&t.as_str())) {
                return bad(format!(
                    "--lora-targets: `{t}` is not a projection (use {})",
                    LORA_TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// One optimizer step's figures, for progress display and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based step number.
    pub step: u64,
    /// Steps in the run.
    pub total: u64,
    /// Mean loss per trained token in this step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens run through the model in this step (inputs, padding excluded).
    pub tokens: usize,
    /// Tokens per second, forward + backward, this step.
    pub tokens_per_s: f64,
}

/// What a finished (or interrupted) run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Steps completed, counting those before a resume.
    pub steps_done: u64,
    /// Whether the run stopped before `steps` (a checkpoint was written).
    pub interrupted: bool,
    /// Every step's figures, from step 1.
    pub log: Vec<StepStats>,
    /// Numbers trained.
    pub trainable_params: usize,
    /// Examples in the data.
    pub examples: usize,
    /// The model folder's weights checksum, once finished.
    pub model_sha256: Option<String>,
}

/// What a checkpoint's `state.json` holds.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    fingerprint: String,
    log: Vec<StepStats>,
}

const CHECKPOINT_DIR: &str = "checkpoint";

fn io(path: &Path, e: impl std::fmt::Display) -> ContributeError {
    ContributeError::Io(format!("{}: {e}", path.display()))
}

/// sha256 of the data file and the options that decide the result.
fn fingerprint(opts: &TrainOptions, data_sha: &str) -> String {
    let mut h = Sha256::new();
    h.update(
        serde_json::to_string(&(
            opts.base_dir.display().to_string(),
            &opts.method,
            opts.steps,
            opts.batch,
            opts.accumulate,
            opts.lr,
            opts.warmup,
            opts.min_lr_ratio,
            opts.max_len,
            opts.seed,
            opts.adamw,
            opts.clip,
        ))
        .unwrap_or_default(),
    );
    // Added after checkpoints existed: runs that do not use them keep the
    // fingerprint they had.
    if opts.top_layers > 0 {
        h.update(format!("top-layers {} trunk {:?}", opts.top_layers, opts.trunk_gguf));
    }
    h.update(data_sha);
    hex::encode(h.finalize())
}

/// The examples of 0-based step `step`: positions `step * per_step ..` of
/// the endless stream of epochs, each epoch a seeded permutation.
pub(crate) fn step_examples(n: usize, per_step: usize, step: u64, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for j in 0..per_step as u64 {
        let k = step * per_step as u64 + j;
        let epoch = k / n as u64;
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
            cached = Some((epoch, order));
        }
        if let Some((_, order)) = &cached {
            out.push(order[(k % n as u64) as usize]);
        }
    }
    out
}

/// A padded micro-batch: inputs, next-token targets, loss mask.
pub(crate) fn micro_batch(
    examples: &[&Example],
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor, Vec<f32>, usize)> {
    let len = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1).max(1);
    let b = examples.len();
    let mut inputs = vec![0u32; b * len];
    let mut targets = vec![0u32; b * len];
    let mut mask = vec![0f32; b * len];
    let mut tokens = 0;
    for (r, e) in examples.iter().enumerate() {
        let n = e.ids.len() - 1;
        tokens += n;
        for t in 0..n {
            inputs[r * len + t] = e.ids[t];
            targets[r * len + t] = e.ids[t + 1];
            mask[r * len + t] = if e.trained[t + 1] { 1.0 } else { 0.0 };
        }
    }
    Ok((
        Tensor::from_vec(inputs, (b, len), device)?,
        Tensor::from_vec(targets, (b, len), device)?,
        mask,
        tokens,
    ))
}

fn save_checkpoint(
    out: &Path,
    params: &BTreeMap<String, Var>,
    opt: &AdamW,
    state: &CheckpointState,
) -> Result<(), ContributeError> {
    let dir = out.join(CHECKPOINT_DIR);
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in params {
        tensors.insert(format!("param/{name}"), v.as_tensor().clone());
    }
    for (name, (m, v)) in &opt.moments {
        tensors.insert(format!("m/{name}"), m.clone());
        tensors.insert(format!("v/{name}"), v.clone());
    }
    candle_core::safetensors::save(&tensors, tmp.join("tensors.safetensors"))?;
    let text = serde_json::to_vec_pretty(state).map_err(|e| ContributeError::Io(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), text).map_err(|e| io(&tmp, e))?;
    // Swap the whole folder: the old checkpoint stays valid until the new
    // one is complete.
    let old = out.join(format!("{CHECKPOINT_DIR}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(&dir, &old).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(
    out: &Path,
    params: &BTreeMap<String, Var>,
    opt: &mut AdamW,
    fingerprint: &str,
) -> Result<Option<CheckpointState>, ContributeError> {
    let dir = out.join(CHECKPOINT_DIR);
    // A crash between the two renames of `save_checkpoint` leaves only
    // the previous checkpoint, under `.old`.
    let dir = if dir.exists() {
        dir
    } else {
        out.join(format!("{CHECKPOINT_DIR}.old"))
    };
    if !dir.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| io(&dir, e))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| ContributeError::Checkpoint(format!("{}/state.json is damaged: {e}", dir.display())))?;
    if state.fingerprint != fingerprint {
        return Err(ContributeError::Checkpoint(format!(
            "{} was made with other data or options: resume with the same command, or use another --out",
            dir.display()
        )));
    }
    // Onto the device the parameters live on (the CPU, or a GPU with `cuda`).
    let device = params
        .values()
        .next()
        .map_or(candle_core::Device::Cpu, |v| v.device().clone());
    let tensors = candle_core::safetensors::load(dir.join("tensors.safetensors"), &device)
        .map_err(|e| ContributeError::Checkpoint(format!("{}/tensors.safetensors: {e}", dir.display())))?;
    let missing = |k: &str| ContributeError::Checkpoint(format!("{}: tensor `{k}` is missing", dir.display()));
    for (name, v) in params {
        let k = format!("param/{name}");
        v.set(tensors.get(&k).ok_or_else(|| missing(&k))?)?;
    }
    for (name, (m, v)) in opt.moments.iter_mut() {
        let (km, kv) = (format!("m/{name}"), format!("v/{name}"));
        *m = tensors.get(&km).ok_or_else(|| missing(&km))?.clone();
        *v = tensors.get(&kv).ok_or_else(|| missing(&kv))?.clone();
    }
    opt.step = state.step;
    Ok(Some(state))
}

/// The base's tokenizer and chat format (its template, or the plain
/// format of a base model without one).
pub(crate) fn text_format(
    base_dir: &Path,
) -> Result<(crate::backends::gguf::tokenizer::GgufTokenizer, ChatFormat), ContributeError> {
    let (tok, template) = hf::read_tokenizer(base_dir).map_err(|e| ContributeError::Base(e.to_string()))?;
    let chat = match template {
        Some(src) => ChatFormat::from_template(
            &src,
            tok.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            tok.eos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
        )
        .map_err(|e| ContributeError::Base(e.to_string()))?,
        None => ChatFormat::Plain,
    };
    Ok((tok, chat))
}

/// Trains per `opts`. `on_step` sees every step and may stop the run
/// (`ControlFlow::Break`): a checkpoint is then written and the report says
/// `interrupted`. When all steps are done the model folder is written.
pub fn train(
    mut opts: TrainOptions,
    mut on_step: impl FnMut(&StepStats) -> ControlFlow<()>,
) -> Result<TrainReport, ContributeError> {
    crate::alloc::keep_freed_memory();
    let examples_raw = data::read_jsonl(&opts.data)?;
    let data_sha = crate::files::sha256_file(&opts.data).map_err(|e| io(&opts.data, e))?;
    let (tok, chat) = text_format(&opts.base_dir)?;
    let mut examples = Vec::with_capacity(examples_raw.len());
    for (line, conv) in &examples_raw {
        let ex = data::tokenize(&tok, &chat, conv, opts.max_len).map_err(|message| ContributeError::Data {
            file: opts.data.display().to_string(),
            line: *line,
            message,
        })?;
        examples.push(ex);
    }
    let per_step = opts.batch * opts.accumulate;
    if opts.steps == 0 {
        opts.steps = examples.len().div_ceil(per_step) as u64;
    }
    opts.check()?;
    let fp = fingerprint(&opts, &data_sha);

    let out = opts.out.clone();
    let has_checkpoint = out.join(CHECKPOINT_DIR).exists() || out.join(format!("{CHECKPOINT_DIR}.old")).exists();
    if has_checkpoint && !opts.resume {
        return Err(ContributeError::Checkpoint(format!(
            "{} holds an unfinished run: pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    if opts.adapter && !matches!(opts.method, TrainMethod::Lora { .. }) {
        return Err(ContributeError::Options(
            "--adapter keeps the LoRA adapter apart from the base: it needs LoRA training (drop --full)".into(),
        ));
    }
    let trained = [crate::model_folder::WEIGHTS, crate::backends::gguf::adapter::ADAPTER];
    if !has_checkpoint && trained.iter().any(|f| out.join(f).exists()) {
        return Err(ContributeError::Options(format!(
            "{} already holds a trained model: choose another --out (or delete it)",
            out.display()
        )));
    }
    std::fs::create_dir_all(&out).map_err(|e| io(&out, e))?;

    let device = opts.device.open().map_err(|e| ContributeError::Base(e.to_string()))?;
    let model = TrainModel::load(&opts.base_dir, &opts.method, opts.top_layers, opts.seed, &device)
        .map_err(ContributeError::Base)?;
    let trunk = match (&opts.trunk_gguf, model.first_trained_layer()) {
        (Some(gguf), first) if first > 0 && device.is_cpu() => {
            let mut trunk = super::trunk::Trunk::load(gguf, first, opts.max_len + 1).map_err(ContributeError::Base)?;
            trunk.share_prefix(&examples)?;
            Some(trunk)
        }
        _ => None,
    };
    let params = model.trainable().clone();
    let mut opt = AdamW::new(opts.adamw, &params)?;
    let mut log: Vec<StepStats> = Vec::new();
    let mut start = 0;
    if opts.resume {
        if let Some(state) = load_checkpoint(&out, &params, &mut opt, &fp)? {
            start = state.step;
            log = state.log;
        }
    }

    let mut interrupted = false;
    let mut step = start;
    while step < opts.steps {
        let t0 = Instant::now();
        let picked = step_examples(examples.len(), per_step, step, opts.seed);
        let exs: Vec<&Example> = picked.iter().map(|i| &examples[*i]).collect();
        let total_targets: usize = exs.iter().map(|e| e.targets()).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0f64;
        let mut tokens = 0;
        for chunk in exs.chunks(opts.batch) {
            let (inputs, targets, mask, n) = micro_batch(chunk, model.device())?;
            tokens += n;
            let hidden = match &trunk {
                Some(tr) => Some(tr.hidden(chunk, inputs.dim(1)?)?),
                None => None,
            };
            let nll = model.nll_sum(&inputs, &targets, &mask, hidden.as_ref())?;
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let store = (nll / total_targets.max(1) as f64)?.backward()?;
            for (name, var) in &params {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.detach();
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        let grad_norm = optim::clip(&mut grads, opts.clip)?;
        let lr = optim::schedule(step, opts.steps, opts.warmup, opts.lr, opts.min_lr_ratio);
        opt.apply(&params, &grads, lr)?;
        step += 1;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let stats = StepStats {
            step,
            total: opts.steps,
            loss: loss_sum / total_targets.max(1) as f64,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
        };
        let flow = on_step(&stats);
        log.push(stats);
        let stop = flow.is_break() && step < opts.steps;
        let due = opts.checkpoint_every > 0 && step % opts.checkpoint_every == 0 && step < opts.steps;
        if stop || due {
            let state = CheckpointState {
                step,
                fingerprint: fp.clone(),
                log: log.clone(),
            };
            save_checkpoint(&out, &params, &opt, &state)?;
        }
        if stop {
            interrupted = true;
            break;
        }
    }

    let mut report = TrainReport {
        steps_done: step,
        interrupted,
        log,
        trainable_params: model.trainable_count(),
        examples: examples.len(),
        model_sha256: None,
    };
    if !interrupted {
        let sha = output::write_model(&opts, &model, &report, &data_sha)?;
        report.model_sha256 = Some(sha);
        for name in [CHECKPOINT_DIR.to_string(), format!("{CHECKPOINT_DIR}.old")] {
            let _ = std::fs::remove_dir_all(out.join(name));
        }
    }
    let log_text: String = report
        .log
        .iter()
        .filter_map(|s| serde_json::to_string(s).ok())
        .map(|l| l + "\n")
        .collect();
    write_atomic(&out.join("train-log.jsonl"), log_text.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_examples_cover_each_epoch_once_and_depend_only_on_the_step() {
        let n = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|s| step_examples(n, 2, s, 7)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(step_examples(n, 3, 4, 7), step_examples(n, 3, 4, 7));
        assert_ne!(step_examples(n, 10, 0, 7), step_examples(n, 10, 0, 8));
        // Steps that straddle an epoch boundary take from both epochs.
        assert_eq!(step_examples(n, 4, 2, 7).len(), 4);
    }
}

//! `tessera contribute`: train a model on your data, add it to a pool.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera::contribute::{self, TrainOptions};
use tessera::model_folder::TrainMethod;
use tessera::pool::CardConfig;
use tessera::{Error, Paths};

use crate::{load_setup, Setup};

#[derive(Subcommand)]
pub(crate) enum ContributeCommand {
    /// Fine-tune a base model on a JSONL file (chats or prompt/completion
    /// pairs) and write a model folder the pool loads, with its card.
    /// Ctrl-C stops after the current step and writes a checkpoint;
    /// `--resume` continues it.
    Train(Box<TrainArgs>),
    /// Write a training slice (JSONL prompt/completion pairs) from the
    /// fetched data, never from an evaluated item: mmlu-stem,
    /// mmlu-humanities, mmlu-social-sciences, mmlu-other, nq-open,
    /// arithmetic, hellaswag.
    Data {
        /// The slice.
        #[arg(long)]
        slice: String,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
        /// At most this many examples (a fixed shuffle picks them).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Add a trained model folder to a pool file (created from the default
    /// pool if missing), after checking its weights against its card.
    Add {
        /// The pool file to extend.
        #[arg(long)]
        pool: PathBuf,
        /// The folder `contribute train` wrote.
        #[arg(long)]
        model: PathBuf,
        /// Member id (default: the card's, i.e. the folder's name).
        #[arg(long)]
        id: Option<String>,
        /// Re-encode the weights when the pool loads the member: `q8_0`
        /// (8-bit, the format the fast CPU kernels run; a folder's f16/f32
        /// weights otherwise run on slower dense kernels).
        #[arg(long, value_parser = parse_quantize)]
        quantize: Option<tessera::pool::Quantize>,
    },
}

fn parse_quantize(s: &str) -> Result<tessera::pool::Quantize, String> {
    match s {
        "q8_0" => Ok(tessera::pool::Quantize::Q8_0),
        other => Err(format!(
            "`{other}` is not a format members are re-encoded to (use q8_0)"
        )),
    }
}

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Pool member id (llama or qwen2) or a Hugging Face model folder.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    base: String,
    /// Training data: JSONL, one `{"messages": [...]}` or
    /// `{"prompt": ..., "completion": ...}` per line.
    #[arg(long)]
    data: PathBuf,
    /// Output folder (model, card, loss curve, checkpoints).
    #[arg(long)]
    out: PathBuf,
    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// Keep the LoRA adapter apart (a few MB, loaded over the base) instead
    /// of writing merged weights (540 MB for SmolLM2-135M).
    #[arg(long)]
    adapter: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Projections that get LoRA adapters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Adapt only the last N layers (0: every layer). The layers below
    /// are frozen whole and, for a GGUF pool member, run on its quantized
    /// weights with the inference kernels (QLoRA-style), which is several
    /// times faster: no gradient flows below the adapted layers.
    #[arg(long, default_value_t = 0)]
    top_layers: usize,
    /// Optimizer steps (default: one pass over the data).
    #[arg(long, default_value_t = 0)]
    steps: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Peak learning rate (default: 2e-4 with LoRA, 2e-5 full).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps (default: 10% of the steps).
    #[arg(long)]
    warmup: Option<u64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Seed: same seed, data and options give the same weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Continue the unfinished run in --out.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    card: CardArgs,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    setup: Setup,
}

/// The contributor card of a trained or merged model.
#[derive(Args)]
pub(crate) struct CardArgs {
    /// Who contributes the model.
    #[arg(long, default_value = "anonymous")]
    contributor: String,
    /// What the model is good at (routers read this).
    #[arg(long)]
    description: Option<String>,
    /// Domain tags, comma-separated.
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// License of the weights (default: that of what it was made from).
    #[arg(long)]
    license: Option<String>,
}

impl CardArgs {
    /// The card, with `description` and `license` defaulted.
    fn card(&self, description: String, license: &str) -> CardConfig {
        CardConfig {
            contributor: self.contributor.clone(),
            description: self.description.clone().unwrap_or(description),
            domains: self.domains.clone(),
            license: self.license.clone().unwrap_or_else(|| license.to_string()),
            source: String::new(),
        }
    }
}

/// Set by SIGINT/SIGTERM: stop after the current step.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The first Ctrl-C asks for a clean stop; the handler then resets, so a
/// second one kills the process as usual.
fn catch_stop_signals() {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe; the sigaction struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

fn train(args: TrainArgs) -> Result<String, Error> {
    let (pool, _) = load_setup(&args.setup)?;
    let paths = Paths::from_env();
    let cache = paths.models.join("bases");
    std::fs::create_dir_all(&cache).map_err(|e| Error::config(format!("{}: {e}", cache.display())))?;
    let (base_dir, base_name) =
        contribute::base_folder(&pool, &paths.models, &cache, &args.base).map_err(|e| Error::config(e.to_string()))?;
    let method = if args.full {
        TrainMethod::Full
    } else {
        TrainMethod::Lora {
            rank: args.lora_rank,
            alpha: args.lora_alpha,
            targets: args.lora_targets.clone(),
        }
    };
    let mut opts = TrainOptions::new(base_dir, base_name.clone(), args.data.clone(), args.out.clone(), method);
    opts.device = crate::options().pool.device;
    opts.top_layers = args.top_layers;
    if args.top_layers > 0 {
        opts.trunk_gguf = contribute::base_gguf(&pool, &paths.models, &args.base);
    }
    opts.steps = args.steps;
    opts.batch = args.batch;
    opts.accumulate = args.accumulate;
    if let Some(lr) = args.lr {
        opts.lr = lr;
    }
    opts.adamw.weight_decay = args.weight_decay;
    opts.max_len = args.max_len;
    opts.seed = args.seed;
    opts.checkpoint_every = args.checkpoint_every;
    opts.resume = args.resume;
    opts.adapter = args.adapter;
    opts.warmup = match args.warmup {
        Some(w) => w,
        // 10% of the run; the step count is known once the data is read,
        // so an explicit --steps is needed to size it here.
        None => args.steps / 10,
    };
    opts.card = args.card.card(
        format!("{base_name} fine-tuned on {}", args.data.display()),
        "same as the base model",
    );
    catch_stop_signals();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let report = contribute::train(opts, |s| {
        bar.set_length(s.total);
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.3}  {:.0} tok/s", s.loss, s.tokens_per_s));
        if STOP.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .map_err(|e| Error::config(e.to_string()))?;
    bar.finish_and_clear();
    let first = report.log.first().map(|s| s.loss).unwrap_or(f64::NAN);
    let last = report.log.last().map(|s| s.loss).unwrap_or(f64::NAN);
    if report.interrupted {
        return Ok(format!(
            "stopped after step {} of {}; checkpoint in {}: continue with the same command and --resume",
            report.steps_done,
            report.log.last().map(|s| s.total).unwrap_or(0),
            args.out.display()
        ));
    }
    Ok(format!(
        "trained {} ({} params trained, {} examples, {} steps): loss {first:.3} -> {last:.3}\n\
         wrote {} (sha256 {}); add it to a pool with\n  tessera contribute add --pool POOL.toml --model {}",
        base_name,
        report.trainable_params,
        report.examples,
        report.steps_done,
        args.out.display(),
        report.model_sha256.unwrap_or_default(),
        args.out.display()
    ))
}

/// Runs a `contribute` subcommand.
pub(crate) fn contribute(cmd: ContributeCommand) -> Result<String, Error> {
    match cmd {
        ContributeCommand::Train(args) => train(*args),
        ContributeCommand::Data { slice, out, limit } => {
            let pairs = tessera::tasks::training::slice(&Paths::from_env(), &slice, limit)
                .map_err(|e| Error::config(e.to_string()))?;
            let text: String = pairs
                .iter()
                .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
                .collect();
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::config(format!("{}: {e}", dir.display())))?;
            }
            let tmp = out.with_extension("jsonl.tmp");
            std::fs::write(&tmp, text)
                .and_then(|_| std::fs::rename(&tmp, &out))
                .map_err(|e| Error::config(format!("{}: {e}", out.display())))?;
            Ok(format!(
                "wrote {} examples of `{slice}` to {}",
                pairs.len(),
                out.display()
            ))
        }
        ContributeCommand::Add {
            pool,
            model,
            id,
            quantize,
        } => {
            let id = contribute::add_to_pool_as(&pool, &model, id.as_deref(), quantize)
                .map_err(|e| Error::config(e.to_string()))?;
            Ok(format!("added `{id}` to {}", pool.display()))
        }
    }
}

#[derive(Args)]
pub(crate) struct MergeArgs {
    /// linear, task_arithmetic, ties, dare, dare_ties, slerp or expo.
    #[arg(long)]
    method: String,
    /// A model to merge: pool member id or model folder (repeat; the order
    /// matches --weights; slerp goes from the first to the second).
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// The common base (task vectors are model - base); for expo, the
    /// weaker model to extrapolate away from.
    #[arg(long)]
    base: Option<String>,
    /// One weight per model, comma-separated (default 1 each).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// ties / dare / dare_ties: share of each task vector kept.
    #[arg(long, default_value_t = 0.5)]
    density: f64,
    /// slerp: interpolation point, 0 = first model, 1 = second.
    #[arg(long, default_value_t = 0.5)]
    t: f64,
    /// expo: extrapolation strength.
    #[arg(long, default_value_t = 0.3)]
    alpha: f64,
    /// Scale of the merged task vector.
    #[arg(long, default_value_t = 1.0)]
    lambda: f64,
    /// Seed of DARE's random drops.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    card: CardArgs,
    #[command(flatten)]
    setup: Setup,
}

/// `tessera merge`.
pub(crate) fn merge(args: MergeArgs) -> Result<String, Error> {
    use tessera::merge::{self, MergeSpec, Method as M};
    let method = match args.method.as_str() {
        "linear" => M::Linear,
        "task_arithmetic" => M::TaskArithmetic,
        "ties" => M::Ties { density: args.density },
        "dare" => M::Dare { density: args.density },
        "dare_ties" => M::DareTies { density: args.density },
        "slerp" => M::Slerp { t: args.t },
        "expo" => M::Expo { alpha: args.alpha },
        other => {
            return Err(Error::config(format!(
                "unknown merge method `{other}`: use linear, task_arithmetic, ties, dare, dare_ties, slerp or expo"
            )))
        }
    };
    let (pool, _) = load_setup(&args.setup)?;
    let paths = Paths::from_env();
    let cache = paths.models.join("bases");
    std::fs::create_dir_all(&cache).map_err(|e| Error::config(format!("{}: {e}", cache.display())))?;
    let resolve = |name: &str| {
        contribute::base_folder(&pool, &paths.models, &cache, name)
            .map(|(dir, _)| dir)
            .map_err(|e| Error::config(e.to_string()))
    };
    let mut dirs = Vec::new();
    for m in &args.models {
        dirs.push(resolve(m)?);
    }
    let base = match &args.base {
        Some(b) => Some(resolve(b)?),
        None => None,
    };
    let mut names = args.models.clone();
    names.extend(args.base.clone());
    let spec = MergeSpec {
        method,
        weights: args.weights.clone(),
        lambda: args.lambda,
        seed: args.seed,
    };
    let card = args.card.card(
        format!("{} merge of {}", args.method, args.models.join(", ")),
        "same as the merged models",
    );
    let compute = merge::compute::shared(crate::options().merge_device).map_err(|e| Error::config(e.to_string()))?;
    let report = merge::merge_on(compute.as_ref(), &dirs, base.as_deref(), &names, &spec, card, &args.out)
        .map_err(|e| Error::config(e.to_string()))?;
    Ok(format!(
        "merged {} ({} tensors, {} parameters, on {}) into {} (sha256 {}); add it to a pool with\n  tessera contribute add --pool POOL.toml --model {}",
        args.models.join(" + "),
        report.tensors,
        report.parameters,
        report.device,
        args.out.display(),
        report.sha256,
        args.out.display()
    ))
}

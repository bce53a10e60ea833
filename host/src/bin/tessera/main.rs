//! `tessera`: the command-line face of the runtime.

mod contribute;
mod service;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tessera::inference::{GenParams, Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{Error, Paths, RunRequest, Runtime, RuntimeOptions};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Run collaboration strategies over a pool of contributed models, sandboxed"
)]
struct Cli {
    /// CPU threads for inference, shared by every member's worker (default:
    /// all cores). Members take turns on one thread pool, so the budget holds
    /// however many members run at once.
    #[arg(long, global = true, env = "TESSERA_THREADS")]
    threads: Option<usize>,
    /// Where local members run and contributors train: `cpu` (default),
    /// `cuda` or `cuda:N` (needs a build with `--features cuda`), or `wgpu`
    /// (llama-family members on any GPU wgpu reaches; inference only).
    #[arg(long, global = true, env = "TESSERA_DEVICE")]
    device: Option<String>,
    /// Where weight merges compute: `auto` (default: a hardware GPU through
    /// wgpu when there is one, else the CPU), `cpu`, or `gpu` (any wgpu
    /// adapter, software ones such as llvmpipe included).
    #[arg(long, global = true, env = "TESSERA_MERGE_DEVICE")]
    merge_device: Option<String>,
    /// Generations a member decodes together at most (1: no batching).
    #[arg(long, global = true, env = "TESSERA_MAX_BATCH")]
    max_batch: Option<usize>,
    /// MiB of prompt keys and values each member keeps for reuse across
    /// requests (its prefix cache; 0 turns it off). Default 256.
    #[arg(long, global = true, env = "TESSERA_PREFIX_CACHE_MB")]
    prefix_cache_mb: Option<usize>,
    /// MiB of KV cache the generations running together on one member may
    /// reserve (each its prompt plus max_tokens); a generation past it
    /// waits for room, one past it alone is refused. Default 1024.
    #[arg(long, global = true, env = "TESSERA_KV_BUDGET_MB")]
    kv_budget_mb: Option<usize>,
    /// Merged members kept loaded for reuse (about 540 MB each for a 135M model).
    #[arg(long, global = true, env = "TESSERA_MERGE_KEEP")]
    merge_keep: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt through a strategy module.
    Run(RunArgs),
    /// Inspect the model pool.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// The installed collaboration strategies.
    Strategies {
        #[command(subcommand)]
        command: StrategiesCommand,
    },
    /// Fit a strategy on a task's dev items and store the state it keeps,
    /// which `tessera run` and `tessera serve` then hand it.
    Fit(FitArgs),
    /// Compare every member, the best single member, the monolith and
    /// strategies on real tasks; write JSON + Markdown reports with plots.
    Eval(EvalArgs),
    /// Evaluation tasks and their data.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Serve members and systems over an OpenAI-compatible HTTP API.
    Serve(service::ServeArgs),
    /// The module registry: publish, list, show, remove; publisher keys.
    Modules {
        #[command(subcommand)]
        command: service::ModulesCommand,
    },
    /// API keys and per-tenant limits for `serve`.
    Tenants {
        #[command(subcommand)]
        command: service::TenantsCommand,
    },
    /// Merge models that share a base into one (linear soup, task
    /// arithmetic, TIES, DARE, DARE-TIES, SLERP, ExPO); the folder it writes
    /// joins a pool with `contribute add`.
    Merge(Box<contribute::MergeArgs>),
    /// The contributor kit: fine-tune a model on your data, add it to a pool.
    Contribute {
        #[command(subcommand)]
        command: contribute::ContributeCommand,
    },
}

#[derive(Args)]
struct FitArgs {
    /// Installed module name (e.g. `option-fusion`) or path to a `.wasm`.
    #[arg(long)]
    strategy: String,
    /// The task whose dev split it is fitted on (see `tessera tasks list`).
    #[arg(long)]
    task: String,
    /// Dev items to fit on: the first N of the task's dev split, the items
    /// `tessera eval --dev-limit N` fits on.
    #[arg(long, default_value_t = 50)]
    dev_limit: usize,
    /// Module setting KEY=VALUE for the fit (repeatable).
    #[arg(long)]
    set: Vec<String>,
    #[command(flatten)]
    setup: Setup,
}

#[derive(Args)]
struct EvalArgs {
    /// Tasks, comma-separated (see `tessera tasks list`).
    #[arg(long, value_delimiter = ',', default_value = "arc-easy")]
    tasks: Vec<String>,
    /// Strategy modules, comma-separated (installed names or paths). One
    /// module may run under several settings in one report: label each run
    /// `MODULE@LABEL` (its system is `strategy:MODULE@LABEL`) and give it
    /// its own settings with `--set LABEL.KEY=VALUE`.
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Test items per task (default: the whole test split).
    #[arg(long)]
    limit: Option<usize>,
    /// Test items for one task, overriding --limit: `TASK=N` (repeatable),
    /// e.g. `--task-limit gsm8k=6` when long answers make a task costly.
    #[arg(long = "task-limit", value_name = "TASK=N")]
    task_limit: Vec<String>,
    /// Test items left out at the start of every task's test split, before
    /// --limit applies: `--skip 400 --limit 200` tests items 401-600, which
    /// no choice made on an earlier run's items 1-400 saw.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// --skip for one task, overriding it: `TASK=N` (repeatable).
    #[arg(long = "task-skip", value_name = "TASK=N")]
    task_skip: Vec<String>,
    /// Also report `dev-chosen`: per task, whichever of best-single and the
    /// strategies scores best on dev items it was not fitted on, by K-fold
    /// cross-validation (K fits per strategy and task), so the system
    /// compared with the references is chosen without the test items.
    #[arg(long, value_name = "K", default_value_t = 0)]
    select_folds: usize,
    /// Dev items per task (best-member choice and strategies' fit).
    #[arg(long, default_value_t = 20)]
    dev_limit: usize,
    /// How single members answer multiple choice: `generate` (parse the
    /// letter of a reply), `loglik` (most likely option letter) or
    /// `option` (most likely option text per byte: no letter bias).
    #[arg(long, default_value = "generate")]
    mcq: String,
    /// New tokens per answer (default by metric: choice 16, F1 32, exact 256).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Seed for every strategy request.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Items in flight at once per system [default: the members' batch
    /// capacity, `--max-batch`, so that every member's running batch can
    /// fill].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Hyperparameter, `KEY=VALUE` for every strategy or `LABEL.KEY=VALUE`
    /// for one (its `@label`, or its module's name when it has none),
    /// which wins over a shared KEY (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Where to write report.json, report.md and the plots.
    #[arg(long, default_value = "eval-report")]
    out: PathBuf,
    /// Run nothing: read a `report.json` (or `report.json.gz`) written
    /// earlier and render its `report.md` and plots again into --out (after
    /// a change to the report's layout, or to restore deleted files). Every
    /// other option is ignored.
    #[arg(long, value_name = "REPORT_JSON")]
    from_report: Option<PathBuf>,
    /// Also run every strategy over sub-pools of size 1..N (accuracy vs pool
    /// size, with each sub-pool's diversity).
    #[arg(long)]
    scaling: bool,
    /// Sub-pools per size for --scaling (all of them when there are fewer).
    #[arg(long, default_value_t = 3)]
    subsets_per_size: usize,
    /// Also run every strategy over equal-size sub-pools that draw on one,
    /// two or more architectures (base lineages): --subsets-per-size of each
    /// level, for every size where two levels occur.
    #[arg(long)]
    diversity: bool,
    /// Hold this member out of the pool as the monolith to beat: it answers
    /// alone, and strategies and `best-single` never see it (e.g.
    /// `--pool large --monolith qwen2.5-coder-1.5b-instruct`). Default: the
    /// member with the most parameters, left in the pool.
    #[arg(long)]
    monolith: Option<String>,
    /// Recompute everything instead of reading the result cache.
    #[arg(long)]
    no_cache: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Print the report JSON instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    setup: Setup,
}

#[derive(Subcommand)]
enum StrategiesCommand {
    /// List installed modules with their world and description.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Download, verify and extract the evaluation data (idempotent).
    Fetch,
    /// List the tasks, their domain, metric and split sizes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Download, assemble and verify every member's files (idempotent, resumable).
    Fetch {
        #[command(flatten)]
        setup: Setup,
        /// No progress bars (for logs).
        #[arg(long)]
        quiet: bool,
    },
    /// List the pool's members and their contributor cards.
    List {
        #[command(flatten)]
        setup: Setup,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a GGUF member (llama or qwen2) out as a Hugging Face directory
    /// (f16 safetensors, config.json, tokenizer.json, tokenizer_config.json),
    /// e.g. to fine-tune it; `backend = "hf"` loads such a directory.
    Export {
        #[command(flatten)]
        setup: Setup,
        /// The member's id.
        #[arg(long)]
        member: String,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a synthetic model: a GGUF file of a real architecture and
    /// shape with seeded random weights and a working tokenizer, to measure
    /// speed and backend agreement where real weights cannot travel.
    Synth {
        #[command(flatten)]
        setup: Setup,
        /// A named shape (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b,
        /// gemma3-270m, tiny-llama, tiny-qwen2, tiny-gemma3) or the id of a
        /// GGUF member of the pool, whose metadata and tensor shapes are
        /// copied.
        #[arg(long)]
        like: String,
        /// Weight type of the matrices: q8_0, q4_k or f16.
        #[arg(long, default_value = "q8_0")]
        quant: String,
        /// Seed of the weights (the same seed writes the same file).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub(crate) struct Setup {
    /// Pool declaration (TOML file), or the name of a built-in pool:
    /// `default` (the default) or `large` (the default plus the 1.5B
    /// monolith).
    #[arg(long, env = "TESSERA_POOL")]
    pool: Option<PathBuf>,
    /// Operator policy (TOML); default: built-in limits, every member allowed.
    #[arg(long, env = "TESSERA_POLICY")]
    policy: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Installed module name (e.g. `majority-vote`) or path to a `.wasm`.
    #[arg(long, required_unless_present = "pipeline", conflicts_with = "pipeline")]
    strategy: Option<String>,
    /// A pipeline declaration (TOML: router -> members -> judge ->
    /// aggregator) to run instead of a strategy.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// The user's prompt.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Most new tokens per model call.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Top-k sampling.
    #[arg(long)]
    top_k: Option<u32>,
    /// Sampling seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Hyperparameter for the strategy, `key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print a JSON object (text, annotations, provenance, usage) or, on
    /// failure, `{"error": {"kind", "message"}}`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    setup: Setup,
}

pub(crate) fn load_setup(setup: &Setup) -> Result<(PoolConfig, Policy), Error> {
    let named = setup
        .pool
        .as_ref()
        .filter(|p| !p.exists())
        .and_then(|p| p.to_str())
        .and_then(PoolConfig::named);
    let pool = match (&setup.pool, named) {
        (_, Some(cfg)) => cfg.map_err(|e| Error::config(e.to_string()))?,
        (Some(p), None) if !p.exists() => {
            return Err(Error::config(format!(
                "pool file {} does not exist (a file path, or one of the built-in pools: {})",
                p.display(),
                tessera::pool::NAMED_POOLS.join(", ")
            )))
        }
        (Some(p), None) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| Error::config(format!("pool file {}: {e}", p.display())))?;
            PoolConfig::from_toml(&text).map_err(|e| Error::config(format!("{}: {e}", p.display())))?
        }
        (None, None) => PoolConfig::default_pool(),
    };
    let policy = match &setup.policy {
        Some(p) => Policy::from_file(p)?,
        None => Policy::default(),
    };
    Ok((pool, policy))
}

/// The runtime options of this invocation, read once from the flags (and
/// their environment variables) in `main`: the only place the environment
/// configures anything.
static OPTIONS: std::sync::OnceLock<RuntimeOptions> = std::sync::OnceLock::new();

pub(crate) fn options() -> RuntimeOptions {
    OPTIONS.get().cloned().unwrap_or_default()
}

pub(crate) fn runtime(setup: &Setup) -> Result<Runtime, Error> {
    let (pool, policy) = load_setup(setup)?;
    let rt = Runtime::with_options(Paths::from_env(), &pool, policy, options())?;
    for f in rt.pool_failures() {
        eprintln!("warning: {f}");
    }
    Ok(rt)
}

fn fail(json: bool, e: &Error) -> ExitCode {
    if json {
        let v = serde_json::json!({ "error": { "kind": e.kind(), "message": e.to_string() } });
        println!("{v}");
    } else {
        eprintln!("error [{}]: {}", e.kind(), tessera::request::printable(&e.to_string()));
    }
    ExitCode::FAILURE
}

/// `--set KEY=VALUE` arguments as module settings.
fn settings(set: &[String]) -> Result<BTreeMap<String, String>, Error> {
    let mut config = BTreeMap::new();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::config(format!("--set `{kv}` is not KEY=VALUE")))?;
        config.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(config)
}

/// `tessera fit`: the one place an operator fits a module for serving (an
/// evaluation fits each strategy for its own answers and stores nothing).
async fn fit(args: FitArgs) -> Result<String, Error> {
    let config = settings(&args.set)?;
    let rt = runtime(&args.setup)?;
    let module = rt.load_module(&args.strategy)?;
    let task = tessera::tasks::Task::load(rt.paths(), &args.task).map_err(|e| Error::config(e.to_string()))?;
    let dev: Vec<tessera::sandbox::Example> = task.dev().iter().take(args.dev_limit).map(|i| i.example()).collect();
    if dev.is_empty() {
        return Err(Error::config(format!(
            "--task {}: no dev items to fit on (--dev-limit {}); give a task with a dev split and a limit above 0",
            args.task, args.dev_limit
        )));
    }
    let n = dev.len();
    let name = &module.manifest.name;
    if !rt.fit(&module, dev, config).await? {
        return Ok(format!(
            "fitted `{name}` on {n} dev items of {}: it keeps no state, so its runs are unchanged",
            args.task
        ));
    }
    let bytes = rt.stored_state(&module).map(|s| s.len()).unwrap_or(0);
    Ok(format!(
        "fitted `{name}` on {n} dev items of {}: its state ({bytes} bytes) is stored under {} \
         (by the module's sha256), and `tessera run` and `tessera serve` hand it to the module",
        args.task,
        rt.paths().state.display()
    ))
}

async fn run(args: RunArgs) -> Result<String, Error> {
    let config = settings(&args.set)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message {
            role: "system".into(),
            content: s.clone(),
        });
    }
    messages.push(Message::user(args.prompt.clone()));
    let params = GenParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: Vec::new(),
    };
    let rt = runtime(&args.setup)?;
    if rt
        .cards()
        .iter()
        .all(|c| !c.can(tessera::inference::Capability::Generate))
    {
        return Err(Error::config(
            "no generative member loaded: run `make setup` to fetch the default pool",
        ));
    }
    let req = RunRequest {
        input: Input::Chat(messages),
        params,
        config,
    };
    let out = match (&args.pipeline, &args.strategy) {
        (Some(path), _) => {
            let cfg = tessera::pipeline::PipelineConfig::from_file(path)?;
            let p = rt.load_pipeline(cfg)?;
            rt.run_pipeline(&p, req).await?
        }
        (None, Some(strategy)) => {
            let module = rt.load_module(strategy)?;
            rt.run(&module, req).await?
        }
        (None, None) => return Err(Error::config("give --strategy NAME or --pipeline FILE.toml")),
    };
    if args.json {
        Ok(serde_json::to_string_pretty(&out).map_err(|e| Error::config(e.to_string()))?)
    } else {
        let mut s = out.text.trim().to_string();
        for (k, v) in &out.annotations {
            s.push_str(&format!("\n  [{k}: {v}]"));
        }
        if !out.attribution.is_empty() {
            let who: Vec<String> = out
                .attribution
                .iter()
                .map(|a| format!("{} {:.0}%", a.member, a.share * 100.0))
                .collect();
            s.push_str(&format!("\n  [wording from: {}]", who.join(", ")));
        }
        Ok(s)
    }
}

fn pool_list(setup: &Setup, json: bool) -> Result<String, Error> {
    let rt = runtime(setup)?;
    let cards = rt.cards();
    if json {
        return serde_json::to_string_pretty(&cards).map_err(|e| Error::config(e.to_string()));
    }
    let mut s = format!(
        "{:<28} {:<6} {:>7} {:>6}  {:<26} {}\n",
        "ID", "ARCH", "PARAMS", "CTX", "CAPABILITIES", "CONTRIBUTOR / LICENSE"
    );
    for c in &cards {
        s.push_str(&format!(
            "{:<28} {:<6} {:>6.0}M {:>6}  {:<26} {} / {}\n    {}\n",
            c.id,
            c.architecture,
            c.parameters as f64 / 1e6,
            c.context_length,
            c.capability_names(","),
            c.contributor,
            c.license,
            c.description
        ));
    }
    Ok(s.trim_end().to_string())
}

fn pool_export(setup: &Setup, member: &str, out: &std::path::Path) -> Result<String, Error> {
    let (pool, _) = load_setup(setup)?;
    let m = pool
        .members
        .iter()
        .find(|m| m.id == member)
        .ok_or_else(|| Error::config(format!("no member `{member}` in the pool (`tessera pool list`)")))?;
    if m.backend != tessera::pool::BackendKind::Gguf {
        return Err(Error::config(format!(
            "member `{member}` is not a GGUF member: only those can be exported"
        )));
    }
    let path = Paths::from_env().models.join(&m.path);
    tessera::backends::gguf::hf::export(&path, out).map_err(|e| Error::config(e.to_string()))?;
    Ok(format!("exported {member} to {}", out.display()))
}

fn pool_synth(setup: &Setup, like: &str, quant: &str, seed: u64, out: &std::path::Path) -> Result<String, Error> {
    use tessera::pool::synth;
    let quant: synth::Quant = quant.parse().map_err(Error::config)?;
    let written = match synth::named(like) {
        Some(shape) => synth::synthesize(shape, like, quant, seed, out),
        None => {
            let (pool, _) = load_setup(setup)?;
            let Some(m) = pool.members.iter().find(|m| m.id == like) else {
                let names: Vec<&str> = synth::NAMED.iter().map(|(n, _)| *n).collect();
                return Err(Error::config(format!(
                    "`{like}` is neither a named shape ({}) nor a member of the pool (`tessera pool list`)",
                    names.join(", ")
                )));
            };
            if m.backend != tessera::pool::BackendKind::Gguf {
                return Err(Error::config(format!(
                    "member `{like}` is not a GGUF member: name a GGUF member or a named shape"
                )));
            }
            let path = Paths::from_env().models.join(&m.path);
            synth::synthesize_like(&path, quant, seed, out)
        }
    }
    .map_err(Error::config)?;
    let fallback = match written.fallbacks {
        0 => String::new(),
        n => format!(", {n} matrices in Q8_0 (rows not a whole number of blocks)"),
    };
    Ok(format!(
        "wrote {} ({}, {:.1}M parameters, {} tensors, {:.1} MB, seed {seed}{fallback})",
        out.display(),
        written.arch,
        written.parameters as f64 / 1e6,
        written.tensors,
        written.bytes as f64 / 1e6
    ))
}

fn pool_fetch(setup: &Setup, quiet: bool) -> Result<String, Error> {
    let (pool, _) = load_setup(setup)?;
    let paths = Paths::from_env();
    let show = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for (id, r) in tessera::pool::fetch::fetch_pool(&pool, &paths.models, &paths.wheels, show) {
        match r {
            Ok(tessera::pool::fetch::Fetched::AlreadyPresent) => lines.push(format!("ok   {id} (verified)")),
            Ok(tessera::pool::fetch::Fetched::Installed) => lines.push(format!("got  {id} (verified)")),
            Ok(tessera::pool::fetch::Fetched::Remote) => lines.push(format!("--   {id} (remote: nothing to fetch)")),
            Err(e) => {
                lines.push(format!("FAIL {id}: {e}"));
                failed.push(id);
            }
        }
        if !quiet {
            eprintln!("{}", lines.last().map(String::as_str).unwrap_or(""));
        }
    }
    if !failed.is_empty() {
        return Err(Error::config(format!(
            "{} member(s) could not be fetched: {}",
            failed.len(),
            failed.join(", ")
        )));
    }
    Ok(format!(
        "{} members verified in {}",
        lines.len(),
        paths.models.display()
    ))
}

fn strategies_list(json: bool) -> Result<String, Error> {
    let mods = tessera::installed_modules(&Paths::from_env());
    if json {
        return serde_json::to_string_pretty(&mods).map_err(|e| Error::config(e.to_string()));
    }
    if mods.is_empty() {
        return Ok(format!(
            "no modules installed in {} (run `make setup`)",
            Paths::from_env().modules.display()
        ));
    }
    let mut s = format!("{:<22} {:<10} {}\n", "NAME", "WORLD", "DESCRIPTION");
    for m in &mods {
        match &m.manifest {
            Ok(man) => s.push_str(&format!(
                "{:<22} {:<10} {}\n",
                m.name,
                man.world.name(),
                man.description
            )),
            Err(e) => s.push_str(&format!("{:<22} {:<10} BROKEN MANIFEST: {e}\n", m.name, "?")),
        }
    }
    Ok(s.trim_end().to_string())
}

/// `tessera eval --from-report`: the report's Markdown and plots from its
/// JSON, nothing run.
fn rerender(path: &std::path::Path, out: &std::path::Path) -> Result<String, Error> {
    let raw = std::fs::read(path).map_err(|e| Error::config(format!("--from-report {}: {e}", path.display())))?;
    // A large report is kept gzipped (`report.json.gz`).
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut s)
            .map_err(|e| Error::config(format!("--from-report {}: not gzipped JSON ({e})", path.display())))?;
        s
    } else {
        String::from_utf8(raw)
            .map_err(|e| Error::config(format!("--from-report {}: not UTF-8 ({e})", path.display())))?
    };
    let report: tessera::eval::Report = serde_json::from_str(&text).map_err(|e| {
        Error::config(format!(
            "--from-report {}: not a report.json of this version ({e}); run the eval again to write one",
            path.display()
        ))
    })?;
    let command = report
        .command
        .clone()
        .unwrap_or_else(|| "(the command was not recorded in this report.json)".into());
    let written = tessera::eval::report::write(&report, out, &command).map_err(|e| Error::internal(e.to_string()))?;
    Ok(format!(
        "{}\nwrote {}",
        tessera::eval::report::table(&report).trim_end(),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Parses the `TASK=N` values of a per-task option (`--task-limit`,
/// `--task-skip`); a task outside `--tasks` is refused, not ignored.
fn per_task_counts(
    flag: &str,
    values: &[String],
    tasks: &[String],
    example: &str,
) -> Result<std::collections::BTreeMap<String, usize>, Error> {
    let mut out = std::collections::BTreeMap::new();
    for kv in values {
        let parsed = kv
            .split_once('=')
            .and_then(|(t, n)| Some((t.trim().to_string(), n.trim().parse::<usize>().ok()?)));
        match parsed {
            Some((t, n)) if tasks.contains(&t) => {
                out.insert(t, n);
            }
            Some((t, _)) => {
                return Err(Error::config(format!(
                    "{flag} {kv}: `{t}` is not among --tasks ({})",
                    tasks.join(",")
                )))
            }
            None => return Err(Error::config(format!("{flag} {kv}: write TASK=N, e.g. {example}"))),
        }
    }
    Ok(out)
}

async fn eval(args: EvalArgs) -> Result<String, Error> {
    if let Some(path) = &args.from_report {
        return rerender(path, &args.out);
    }
    let mcq = match args.mcq.as_str() {
        "generate" => tessera::eval::McqMode::Generate,
        "loglik" => tessera::eval::McqMode::Loglik,
        "option" => tessera::eval::McqMode::Option,
        other => {
            return Err(Error::config(format!(
            "--mcq `{other}`: use `generate`, `loglik` (score the option letters) or `option` (score the option texts)"
        )))
        }
    };
    let strategy_config = settings(&args.set)?;
    let mut rt = runtime(&args.setup)?;
    let cache = std::sync::Arc::new(if args.no_cache {
        tessera::eval::cache::Cache::disabled()
    } else {
        tessera::eval::cache::Cache::open(&rt.paths().data.join("..").join("eval-cache.sqlite"))
            .map_err(|e| Error::internal(format!("{e} (or run with --no-cache)")))?
    });
    // Strategies ask what the members were already asked alone (or what
    // another strategy asked): scores and greedy or seeded generations are
    // deterministic, so they are answered from memory (200,000 results:
    // tens of MB at most), and from the cache after an interruption.
    let fingerprints = rt
        .cards()
        .iter()
        .filter_map(|c| Some((c.id.clone(), rt.fingerprint(&c.id)?.to_string())))
        .collect();
    let store = tessera::eval::cache::PersistedCalls::new(cache.clone(), fingerprints);
    let memo = rt.memoize_calls(200_000, Some(std::sync::Arc::new(store)));
    let task_limits = per_task_counts("--task-limit", &args.task_limit, &args.tasks, "gsm8k=6")?;
    let task_skips = per_task_counts("--task-skip", &args.task_skip, &args.tasks, "hellaswag=200")?;
    if args.select_folds == 1 {
        return Err(Error::config(
            "--select-folds 1: cross-validation needs at least 2 folds (5 is usual); 0 turns `dev-chosen` off",
        ));
    }
    let cfg = tessera::eval::EvalConfig {
        tasks: args.tasks.clone(),
        strategies: args.strategies.clone(),
        limit: args.limit,
        task_limits,
        skip: args.skip,
        task_skips,
        dev_limit: args.dev_limit,
        mcq,
        max_tokens: args.max_tokens,
        seed: args.seed,
        concurrency: args.concurrency.unwrap_or(options().pool.max_batch),
        strategy_config,
        scaling: args.scaling,
        subsets_per_size: args.subsets_per_size,
        diversity: args.diversity,
        monolith: args.monolith.clone(),
        select_folds: args.select_folds,
        progress: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let mut report = tessera::eval::run(&rt, cfg, &cache).await?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    report.command = Some(command.clone());
    let written =
        tessera::eval::report::write(&report, &args.out, &command).map_err(|e| Error::internal(e.to_string()))?;
    if args.json {
        return serde_json::to_string_pretty(&report).map_err(|e| Error::config(e.to_string()));
    }
    let (hits, misses) = memo.counts();
    Ok(format!(
        "{}\nscore and deterministic generate calls answered from memory: {hits} of {}\nwrote {}",
        tessera::eval::report::table(&report).trim_end(),
        hits + misses,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn tasks_fetch() -> Result<String, Error> {
    let paths = Paths::from_env();
    let got = tessera::tasks::fetch(&paths).map_err(|e| Error::config(e.to_string()))?;
    let mut out = format!(
        "evaluation data {} in {}",
        if got.fetched {
            "fetched and verified"
        } else {
            "already present"
        },
        paths.data.display()
    );
    for (task, why) in &got.unavailable {
        out.push_str(&format!(
            "\nwarning: `{task}` is not available ({why}); every other task is ready, and `{task}` \
             reports its data missing until `tessera tasks fetch` can download it"
        ));
    }
    Ok(out)
}

fn tasks_list(json: bool) -> Result<String, Error> {
    let paths = Paths::from_env();
    let mut rows = Vec::new();
    for info in tessera::tasks::TASKS {
        let sizes = tessera::tasks::Task::load(&paths, info.name).map(|t| (t.dev().len(), t.test().len()));
        rows.push((info, sizes));
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(info, sizes)| {
                let mut v = serde_json::to_value(info).unwrap_or_default();
                match sizes {
                    Ok((d, t)) => {
                        v["dev"] = (*d).into();
                        v["test"] = (*t).into();
                    }
                    Err(e) => v["error"] = e.to_string().into(),
                }
                v
            })
            .collect();
        return serde_json::to_string_pretty(&v).map_err(|e| Error::config(e.to_string()));
    }
    let mut s = format!(
        "{:<14} {:<10} {:<12} {:>5} {:>6}  {}\n",
        "TASK", "DOMAIN", "METRIC", "DEV", "TEST", "SOURCE"
    );
    for (info, sizes) in rows {
        let (d, t) = match sizes {
            Ok((d, t)) => (d.to_string(), t.to_string()),
            Err(_) => ("-".into(), "-".into()),
        };
        s.push_str(&format!(
            "{:<14} {:<10} {:<12} {:>5} {:>6}  {}\n",
            info.name,
            info.domain,
            serde_json::to_value(info.metric)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            d,
            t,
            info.description
        ));
    }
    Ok(s.trim_end().to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            return fail(
                false,
                &Error::config("--threads 0 leaves nothing to run on: use 1 or more"),
            );
        }
        // candle sizes its (global, shared) thread pool from this variable;
        // it must be set before the first model loads.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let mut options = RuntimeOptions::default();
    if let Some(spec) = &cli.device {
        // Checked and opened now, so a wrong device fails before any work.
        let opened = tessera::backends::device::DeviceSpec::parse(spec).and_then(|d| d.open().map(|_| d));
        match opened {
            Ok(d) => options = options.device(d),
            Err(e) => return fail(false, &Error::config(e.to_string())),
        }
    }
    if let Some(n) = cli.max_batch {
        options = options.max_batch(n);
    }
    if let Some(mb) = cli.prefix_cache_mb {
        options = options.prefix_cache(mb.saturating_mul(1 << 20));
    }
    if let Some(mb) = cli.kv_budget_mb {
        options = options.kv_budget(mb.saturating_mul(1 << 20));
    }
    if let Some(n) = cli.merge_keep {
        options = options.merge_keep(n);
    }
    // Mesa's Vulkan drivers (which wgpu may probe for merges) print
    // "XDG_RUNTIME_DIR is invalid" on headless machines where it is unset;
    // a private directory of our own keeps that noise out of the output.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join(format!("tessera-runtime-{}", unsafe { libc::getuid() }));
        if std::fs::create_dir_all(&dir).is_ok() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
    if let Some(choice) = &cli.merge_device {
        // Parsed now so a typo fails before any work; the backend itself
        // opens at the first merge (opening a GPU costs time).
        match tessera::merge::compute::Choice::parse(choice) {
            Ok(c) => options = options.merge_device(c),
            Err(e) => return fail(false, &Error::config(e.to_string())),
        }
    }
    let _ = OPTIONS.set(options);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(false, &Error::internal(format!("cannot start the async runtime: {e}"))),
    };
    let (json, result) = match cli.command {
        Command::Run(args) => {
            let json = args.json;
            (json, rt.block_on(run(args)))
        }
        Command::Pool {
            command: PoolCommand::List { setup, json },
        } => (json, pool_list(&setup, json)),
        Command::Pool {
            command: PoolCommand::Fetch { setup, quiet },
        } => (false, pool_fetch(&setup, quiet)),
        Command::Pool {
            command: PoolCommand::Export { setup, member, out },
        } => (false, pool_export(&setup, &member, &out)),
        Command::Pool {
            command:
                PoolCommand::Synth {
                    setup,
                    like,
                    quant,
                    seed,
                    out,
                },
        } => (false, pool_synth(&setup, &like, &quant, seed, &out)),
        Command::Fit(args) => (false, rt.block_on(fit(args))),
        Command::Eval(args) => {
            let json = args.json;
            (json, rt.block_on(eval(args)))
        }
        Command::Strategies {
            command: StrategiesCommand::List { json },
        } => (json, strategies_list(json)),
        Command::Tasks {
            command: TasksCommand::Fetch,
        } => (false, tasks_fetch()),
        Command::Tasks {
            command: TasksCommand::List { json },
        } => (json, tasks_list(json)),
        Command::Serve(args) => (false, rt.block_on(service::serve(args))),
        Command::Modules { command } => (false, service::modules(command)),
        Command::Tenants { command } => (false, service::tenants(command)),
        Command::Contribute { command } => (false, contribute::contribute(command)),
        Command::Merge(args) => (false, contribute::merge(*args)),
    };
    match result {
        Ok(s) => {
            // Module text reaches the terminal here: no escape codes.
            println!("{}", tessera::request::printable(&s));
            ExitCode::SUCCESS
        }
        Err(e) => fail(json, &e),
    }
}

//! The pool of contributed models.
//!
//! A pool is declared in TOML ([`PoolConfig`]): each member has an id, a
//! contributor card and a backend with the file it loads from and that file's
//! sha256. [`Pool::load`] verifies and loads every member on its own worker
//! thread; a member that fails to load is reported by name and the rest of
//! the pool still serves.
//!
//! Concurrency: one worker thread per member owns that member's backend and
//! takes jobs from a queue (`pool/worker.rs`). Jobs for different members run in
//! parallel; a member's generations run as one continuous batch that
//! sequences join and leave between steps, and its other calls run between
//! those steps, fairly between requests. There is no global inference lock.

pub mod fetch;
pub mod synth;
mod worker;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::backends::gguf::prefix::{PrefixSnapshot, PrefixStats};
use crate::backends::panic_message;
use crate::backends::remote::{RemoteConfig, RemoteMember};
use crate::backends::{bert::BertEmbedder, gguf::GgufModel, Backend};
use crate::inference::{
    CallCtx, Capability, Embedded, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink,
    TokenLogprob,
};
use worker::{GenerateJob, Job};

/// The default pool's declaration, embedded in the binary.
pub const DEFAULT_POOL_TOML: &str = include_str!("default-pool.toml");

/// The members the `large` named pool adds to the default one (the
/// monolith). Kept as a separate file so the two pools share one default.
const LARGE_EXTRA_TOML: &str = include_str!("large-extra.toml");

/// The pools a `--pool` argument may name instead of a file.
pub const NAMED_POOLS: &[&str] = &["default", "large"];

/// A pool declaration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The members, in the order they are listed.
    #[serde(rename = "member")]
    pub members: Vec<MemberConfig>,
}

/// Which backend runs a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A GGUF file run by candle.
    Gguf,
    /// A BERT sentence embedder (Hugging Face directory).
    Bert,
    /// A Hugging Face directory (`config.json`, safetensors, `tokenizer.json`)
    /// of a llama-family model; `sha256` covers `sha256_file` inside it.
    Hf,
    /// A model behind an OpenAI-compatible HTTP API (`[member.remote]`).
    Openai,
}

/// One member's declaration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Unique id within the pool.
    pub id: String,
    /// Which backend runs it.
    pub backend: BackendKind,
    /// File (GGUF) or directory (BERT), relative to the models directory
    /// (empty for remote members).
    #[serde(default)]
    pub path: PathBuf,
    /// Expected sha256 of the file, or of `sha256_file` inside a directory
    /// (empty for remote members).
    #[serde(default)]
    pub sha256: String,
    /// For directory members: which file inside it the sha256 covers.
    #[serde(default)]
    pub sha256_file: Option<String>,
    /// Who made it and what it is for.
    pub card: CardConfig,
    /// Where `tessera pool fetch` gets its files.
    #[serde(default)]
    pub fetch: Option<fetch::FetchSpec>,
    /// For `backend = "openai"`: where and how to reach it.
    #[serde(default)]
    pub remote: Option<RemoteConfig>,
    /// For `backend = "hf"`: re-encode the weight matrices at load
    /// (`"q8_0"`: 8-bit blocks of 32, the format the VNNI kernels run), so
    /// a folder of f16/f32 weights answers at the speed of a quantized
    /// member. Absent: matrices keep their precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantize>,
}

/// A weight format an `hf` member may be re-encoded to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantize {
    /// 8-bit integers in blocks of 32 with an f16 scale each.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl Quantize {
    /// The name a pool file spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Q8_0 => "q8_0",
        }
    }
}

/// The human part of a contributor card; the technical part (architecture,
/// size, context) is read from the model file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    /// Who contributed it.
    pub contributor: String,
    /// What it is good at (routers read this).
    pub description: String,
    /// Domain tags.
    #[serde(default)]
    pub domains: Vec<String>,
    /// License of the weights.
    pub license: String,
    /// Where the weights came from.
    #[serde(default)]
    pub source: String,
}

impl PoolConfig {
    /// Parses a pool declaration; the error names the problem.
    pub fn from_toml(text: &str) -> Result<Self, PoolError> {
        let cfg: PoolConfig = toml::from_str(text).map_err(|e| PoolError::Config(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for m in &cfg.members {
            if !seen.insert(m.id.as_str()) {
                return Err(PoolError::Config(format!(
                    "member id `{}` appears twice: ids must be unique",
                    m.id
                )));
            }
            let remote = m.backend == BackendKind::Openai;
            if remote != m.remote.is_some() {
                return Err(PoolError::Config(format!(
                    "member `{}`: `[member.remote]` goes with `backend = \"openai\"` and only with it",
                    m.id
                )));
            }
            if m.quantize.is_some() && m.backend != BackendKind::Hf {
                return Err(PoolError::Config(format!(
                    "member `{}`: `quantize` re-encodes a Hugging Face folder (`backend = \"hf\"`); drop it here",
                    m.id
                )));
            }
            if !remote && (m.path.as_os_str().is_empty() || m.sha256.is_empty()) {
                return Err(PoolError::Config(format!(
                    "member `{}`: a local member needs `path` and `sha256`",
                    m.id
                )));
            }
        }
        Ok(cfg)
    }

    /// A named pool built into the binary (see [`NAMED_POOLS`]): `default`,
    /// or `large` (the default pool plus Qwen2.5-Coder-1.5B-Instruct, the
    /// monolith to beat). `None` for any other name.
    pub fn named(name: &str) -> Option<Result<Self, PoolError>> {
        match name {
            "default" => Some(Self::from_toml(DEFAULT_POOL_TOML)),
            // Arrays of tables concatenate: the extra members follow the default ones.
            "large" => Some(Self::from_toml(&format!("{DEFAULT_POOL_TOML}\n{LARGE_EXTRA_TOML}"))),
            _ => None,
        }
    }

    /// The embedded default pool.
    pub fn default_pool() -> Self {
        // The embedded file is part of the binary and covered by a unit test.
        Self::from_toml(DEFAULT_POOL_TOML).unwrap_or(PoolConfig { members: Vec::new() })
    }
}

/// Why a pool or member could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// The declaration itself is wrong.
    #[error("pool declaration: {0}")]
    Config(String),
    /// A member's file is missing.
    #[error("member `{id}`: {path} is missing: run `make setup` to fetch the default pool")]
    Missing {
        /// Member id.
        id: String,
        /// The missing path.
        path: String,
    },
    /// A member's file does not match its declared sha256.
    #[error("member `{id}`: {path} has sha256 {actual}, expected {expected}: the file is damaged or not the declared one; delete it and fetch again")]
    Checksum {
        /// Member id.
        id: String,
        /// The file.
        path: String,
        /// Declared hash.
        expected: String,
        /// Hash found.
        actual: String,
    },
    /// The file is there but does not load.
    #[error("member `{id}`: {message}")]
    Load {
        /// Member id.
        id: String,
        /// What went wrong, naming the file.
        message: String,
    },
}

impl PoolError {
    /// The member concerned, if the error is about one.
    pub fn member(&self) -> Option<&str> {
        match self {
            PoolError::Config(_) => None,
            PoolError::Missing { id, .. } | PoolError::Checksum { id, .. } | PoolError::Load { id, .. } => Some(id),
        }
    }
}

/// A member's worker: a thread owning the backend, fed through a queue; or,
/// for a remote member, the client that calls it (concurrently).
struct Worker {
    card: ModelCard,
    exec: Exec,
    /// A local GGUF member's prefix-cache counters.
    prefix: Option<Arc<PrefixStats>>,
}

enum Exec {
    Local(mpsc::Sender<Job>),
    Remote(Arc<RemoteMember>),
}

impl Worker {
    /// Queues `f` and resolves with its result. Jobs whose deadline passed
    /// while they waited are dropped without running.
    fn call<T: Send + 'static>(
        &self,
        ctx: CallCtx,
        f: impl FnOnce(&mut Backend) -> Result<T, InferenceError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, InferenceError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Run(
            ctx.requester,
            Box::new(move |backend: &mut Backend| {
                if tx.is_closed() {
                    return;
                }
                let result = if Instant::now() >= ctx.deadline {
                    Err(InferenceError::Expired)
                } else {
                    // A panic inside a backend must not kill the worker.
                    std::panic::catch_unwind(AssertUnwindSafe(|| f(backend))).unwrap_or_else(|p| {
                        Err(InferenceError::Failed(format!(
                            "backend panicked: {}",
                            panic_message(p)
                        )))
                    })
                };
                let _ = tx.send(result);
            }),
        );
        let sent = match &self.exec {
            Exec::Local(queue) => queue.send(job).map_err(|_| ()),
            // Remote members are called directly (see `Pool::remote`); a job
            // for one is a capability it does not have.
            Exec::Remote(_) => {
                let what = "a remote member can only `generate` and `embed`: pick a local member for this call";
                return Box::pin(async move { Err(InferenceError::Unsupported(what.into())) });
            }
        };
        Box::pin(async move {
            sent.map_err(|_| InferenceError::Failed("the member's worker has stopped".into()))?;
            rx.await
                .map_err(|_| InferenceError::Failed("the member's worker dropped the job".into()))?
        })
    }
}

/// A loaded pool. Cheap to share (`Arc<Pool>`); dropping the last handle
/// stops the workers.
pub struct Pool {
    workers: BTreeMap<String, Worker>,
    order: Vec<String>,
    max_batch: Arc<std::sync::atomic::AtomicUsize>,
}

/// Generations a member decodes together at most, unless
/// [`PoolOptions::max_batch`] or [`Pool::set_max_batch`] says otherwise.
pub const DEFAULT_MAX_BATCH: usize = 8;

/// How a pool runs, as a value (built like wasmtime's `Config`): the CLI
/// fills it from its flags and environment, an embedder from wherever it
/// likes; the library reads no environment variable for it.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Where local members load: the CPU by default.
    pub device: crate::backends::device::DeviceSpec,
    /// Generations a member decodes together at most (1: no batching).
    pub max_batch: usize,
    /// Bytes of prompt keys and values each local member keeps for reuse
    /// across requests (0: no prefix cache; see
    /// [`crate::backends::gguf::prefix`]).
    pub prefix_cache_bytes: usize,
    /// Bytes of KV cache the generations running together on one local
    /// member may reserve (see [`crate::backends::gguf::decode`]).
    pub kv_budget_bytes: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            device: crate::backends::device::DeviceSpec::Cpu,
            max_batch: DEFAULT_MAX_BATCH,
            prefix_cache_bytes: crate::backends::gguf::DEFAULT_PREFIX_CACHE_BYTES,
            kv_budget_bytes: crate::backends::gguf::DEFAULT_KV_BUDGET_BYTES,
        }
    }
}

impl PoolOptions {
    /// Members load on `device`.
    pub fn device(mut self, device: crate::backends::device::DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// Members decode at most `n` queued generations together (at least 1).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Each local member's prefix cache holds at most `bytes` (0: none).
    pub fn prefix_cache(mut self, bytes: usize) -> Self {
        self.prefix_cache_bytes = bytes;
        self
    }

    /// Each local member's running generations reserve at most `bytes` of
    /// KV cache together.
    pub fn kv_budget(mut self, bytes: usize) -> Self {
        self.kv_budget_bytes = bytes;
        self
    }
}

/// What loading a pool produced: the pool, plus every member that failed.
pub struct Loaded {
    /// The members that loaded.
    pub pool: Arc<Pool>,
    /// The members that did not, each with a reason naming the file.
    pub failures: Vec<PoolError>,
}

/// Where [`verify`] remembers the digests of files it has checked (see
/// [`crate::files::sha256_file_remembered`]).
pub(super) fn verified_memo(models_dir: &Path) -> PathBuf {
    models_dir.join(".verified")
}

/// Checks a member's weights against its declared digest; `models_dir`
/// holds the memo of files verified before, so an unchanged file is not
/// read again.
fn verify(m: &MemberConfig, full: &Path, models_dir: &Path) -> Result<(), PoolError> {
    let hashed = match &m.sha256_file {
        Some(inner) => full.join(inner),
        None => full.to_path_buf(),
    };
    if !hashed.exists() {
        return Err(PoolError::Missing {
            id: m.id.clone(),
            path: hashed.display().to_string(),
        });
    }
    let actual =
        crate::files::sha256_file_remembered(&hashed, &verified_memo(models_dir)).map_err(|e| PoolError::Load {
            id: m.id.clone(),
            message: format!("{}: cannot read: {e}", hashed.display()),
        })?;
    if !actual.eq_ignore_ascii_case(&m.sha256) {
        return Err(PoolError::Checksum {
            id: m.id.clone(),
            path: hashed.display().to_string(),
            expected: m.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// The memory bounds a local member loads with.
#[derive(Debug, Clone, Copy)]
struct MemberMemory {
    prefix_cache_bytes: usize,
    kv_budget_bytes: usize,
    /// GGUF members go to the wgpu device (`--device wgpu`).
    wgpu: bool,
}

fn load_member(
    m: &MemberConfig,
    models_dir: &Path,
    device: &Result<candle_core::Device, crate::backends::device::DeviceError>,
    memory: MemberMemory,
) -> Result<(Backend, ModelCard), PoolError> {
    let full = models_dir.join(&m.path);
    verify(m, &full, models_dir)?;
    let load_err = |e: &dyn std::fmt::Display| PoolError::Load {
        id: m.id.clone(),
        message: e.to_string(),
    };
    let mut card = ModelCard {
        id: m.id.clone(),
        contributor: m.card.contributor.clone(),
        description: m.card.description.clone(),
        domains: m.card.domains.clone(),
        architecture: String::new(),
        parameters: 0,
        context_length: 0,
        license: m.card.license.clone(),
        capabilities: Vec::new(),
    };
    let backend = match m.backend {
        BackendKind::Gguf | BackendKind::Hf => {
            let device = device.as_ref().map_err(|e| load_err(e))?;
            let mut model = if m.backend == BackendKind::Hf {
                GgufModel::load_hf_as(&m.id, &full, m.quantize, device)
            } else if memory.wgpu {
                GgufModel::load_wgpu(&m.id, &full)
            } else {
                GgufModel::load(&m.id, &full, device)
            }
            .map_err(|e| load_err(&e))?;
            model.set_prefix_cache(memory.prefix_cache_bytes);
            model.set_kv_budget(memory.kv_budget_bytes);
            let f = model.facts();
            card.architecture = f.architecture.clone();
            card.parameters = f.parameters;
            card.context_length = f.context_length;
            card.capabilities = vec![Capability::Generate, Capability::Score, Capability::NextToken];
            if !f.has_chat_template {
                card.description
                    .push_str(" (base model: no chat template, chats use a plain completion format)");
            }
            Backend::Gguf(Box::new(model))
        }
        BackendKind::Bert => {
            let device = device.as_ref().map_err(|e| load_err(e))?;
            let model = BertEmbedder::load(&full, device).map_err(|e| load_err(&e))?;
            card.architecture = "bert".into();
            card.parameters = model.parameters;
            card.context_length = 256;
            card.capabilities = vec![Capability::Embed];
            Backend::Bert(Box::new(model))
        }
        BackendKind::Openai => {
            // Remote members are set up by `remote_member`, never here.
            return Err(load_err(&"a remote member has no file to load"));
        }
    };
    Ok((backend, card))
}

/// A remote member and its card (from the declaration: nothing is fetched
/// at load, so an unreachable server does not stop the pool from starting).
fn remote_member(m: &MemberConfig, r: RemoteConfig) -> Result<(ModelCard, Arc<RemoteMember>), PoolError> {
    let member = RemoteMember::new(&m.id, r.clone()).map_err(|e| PoolError::Load {
        id: m.id.clone(),
        message: e.to_string(),
    })?;
    let card = ModelCard {
        id: m.id.clone(),
        contributor: m.card.contributor.clone(),
        description: m.card.description.clone(),
        domains: m.card.domains.clone(),
        architecture: format!("remote ({} at {})", r.model, r.url),
        parameters: r.parameters,
        context_length: r.context_length,
        license: m.card.license.clone(),
        capabilities: r.capabilities.clone(),
    };
    Ok((card, Arc::new(member)))
}

/// What a local member's worker reports once loaded: its card and, for a
/// GGUF member, its prefix-cache counters.
type Ready = (ModelCard, Option<Arc<PrefixStats>>);

/// A member whose loading has started ([`Pool::load_with`]): a local one's
/// worker thread (if it could be started), the channel its card or load
/// error comes back on, and its job queue; or a remote one, already set up.
enum Pending {
    Local(
        /// The member's id, for a failure that happens before it reports.
        String,
        std::io::Result<std::thread::JoinHandle<()>>,
        mpsc::Receiver<Result<Ready, PoolError>>,
        mpsc::Sender<Job>,
    ),
    Remote(Result<(ModelCard, Arc<RemoteMember>), PoolError>),
}

/// Starts local member `m`'s worker thread and returns without waiting: the
/// thread loads the backend with `load`, reports the card (or the error,
/// and stops) on the ready channel, then serves the member's queue until
/// the pool is dropped.
fn spawn_local(
    m: MemberConfig,
    load: impl FnOnce(&MemberConfig) -> Result<(Backend, ModelCard), PoolError> + Send + 'static,
    max_batch: Arc<std::sync::atomic::AtomicUsize>,
) -> Pending {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Ready, PoolError>>();
    let (queue, jobs) = mpsc::channel::<Job>();
    let name = format!("tessera-model-{}", m.id);
    let id = m.id.clone();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        // A loader that panics (a model file malformed in a way no check
        // caught) fails this member, by name and with the panic's message,
        // instead of an anonymous "worker died".
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&m))).unwrap_or_else(|p| {
            Err(PoolError::Load {
                id: m.id.clone(),
                message: format!("the loader panicked: {}", panic_message(p)),
            })
        });
        let backend = match loaded {
            Ok((b, card)) => {
                let prefix = match &b {
                    Backend::Gguf(g) => Some(g.prefix_stats()),
                    _ => None,
                };
                let _ = ready_tx.send(Ok((card, prefix)));
                b
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        worker::serve(backend, jobs, max_batch);
    });
    Pending::Local(id, spawned, ready_rx, queue)
}

/// The pool as [`Pool::load_with`] assembles it: the members that serve, in
/// declaration order, and those that failed.
#[derive(Default)]
struct Assembly {
    workers: BTreeMap<String, Worker>,
    order: Vec<String>,
    failures: Vec<PoolError>,
}

impl Assembly {
    /// Adds a member that is ready to serve.
    fn serve(&mut self, card: ModelCard, exec: Exec, prefix: Option<Arc<PrefixStats>>) {
        self.order.push(card.id.clone());
        self.workers.insert(card.id.clone(), Worker { card, exec, prefix });
    }

    /// Waits until `p` has loaded (or failed to), then adds it to the
    /// members or to the failures.
    fn settle(&mut self, p: Pending) {
        let (id, spawned, ready, queue) = match p {
            Pending::Local(id, s, r, q) => (id, s, r, q),
            Pending::Remote(Ok((card, member))) => return self.serve(card, Exec::Remote(member), None),
            Pending::Remote(Err(e)) => return self.failures.push(e),
        };
        if let Err(e) = spawned {
            self.failures.push(PoolError::Load {
                id,
                message: format!("cannot start worker: {e}"),
            });
            return;
        }
        match ready.recv() {
            Ok(Ok((card, prefix))) => self.serve(card, Exec::Local(queue), prefix),
            Ok(Err(e)) => self.failures.push(e),
            Err(_) => self.failures.push(PoolError::Load {
                id,
                message: "a worker died while loading".into(),
            }),
        }
    }
}

impl Pool {
    /// Verifies and loads every member with the default [`PoolOptions`]
    /// (the CPU, batches of [`DEFAULT_MAX_BATCH`]).
    pub fn load(config: &PoolConfig, models_dir: &Path) -> Loaded {
        Self::load_with(config, models_dir, &PoolOptions::default())
    }

    /// Verifies and loads every member, each on its own worker thread (so
    /// members load in parallel), as `options` say. Members that fail are
    /// returned in [`Loaded::failures`]; the rest serve.
    pub fn load_with(config: &PoolConfig, models_dir: &Path, options: &PoolOptions) -> Loaded {
        let max_batch = Arc::new(std::sync::atomic::AtomicUsize::new(options.max_batch.max(1)));
        // Opened once for every member (a device that cannot be opened
        // fails each local member with the reason).
        let device = options.device.open();
        // Every member starts loading before any is waited for.
        let mut pending = Vec::new();
        for m in config.members.clone() {
            let p = match &m.remote {
                Some(r) => Pending::Remote(remote_member(&m, r.clone())),
                None => {
                    let dir = models_dir.to_path_buf();
                    let device = device.clone();
                    let memory = MemberMemory {
                        prefix_cache_bytes: options.prefix_cache_bytes,
                        kv_budget_bytes: options.kv_budget_bytes,
                        wgpu: options.device == crate::backends::device::DeviceSpec::Wgpu,
                    };
                    spawn_local(m, move |m| load_member(m, &dir, &device, memory), max_batch.clone())
                }
            };
            pending.push(p);
        }
        let mut assembly = Assembly::default();
        for p in pending {
            assembly.settle(p);
        }
        Loaded {
            pool: Arc::new(Pool {
                workers: assembly.workers,
                order: assembly.order,
                max_batch,
            }),
            failures: assembly.failures,
        }
    }

    /// Sets how many queued generations a member may decode together
    /// (1 turns batching off); takes effect from the next batch.
    pub fn set_max_batch(&self, n: usize) {
        self.max_batch.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Member ids in declaration order.
    pub fn ids(&self) -> &[String] {
        &self.order
    }

    /// Queues a generation on a local member's worker, where it may be
    /// decoded in a batch with others.
    fn queue_generation(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        sink: Option<TextSink>,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let queue = match self.worker(model).map(|w| &w.exec) {
            Ok(Exec::Local(q)) => q.clone(),
            Ok(Exec::Remote(_)) => {
                return Box::pin(async { Err(InferenceError::Failed("remote members are called directly".into())) })
            }
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = queue.send(Job::Generate(GenerateJob {
            ctx,
            input,
            params,
            sink,
            reply,
        }));
        Box::pin(async move {
            sent.map_err(|_| InferenceError::Failed("the member's worker has stopped".into()))?;
            rx.await
                .map_err(|_| InferenceError::Failed("the member's worker dropped the job".into()))?
        })
    }

    fn remote(&self, id: &str) -> Option<Arc<RemoteMember>> {
        match &self.workers.get(id)?.exec {
            Exec::Remote(r) => Some(r.clone()),
            Exec::Local(_) => None,
        }
    }

    fn worker(&self, id: &str) -> Result<&Worker, InferenceError> {
        self.workers
            .get(id)
            .ok_or_else(|| InferenceError::UnknownModel(id.to_string()))
    }

    fn dispatch<T: Send + 'static>(
        &self,
        ctx: CallCtx,
        id: &str,
        f: impl FnOnce(&mut Backend) -> Result<T, InferenceError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, InferenceError>> {
        match self.worker(id) {
            Ok(w) => w.call(ctx, f),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// The pool's own check of every generation before it is queued, whatever
/// face it came from: the input rule and the parameter ranges, both cheap.
fn admissible(input: &Input, extra: usize, params: &GenParams) -> Result<(), InferenceError> {
    input.check_size(extra)?;
    params.validate()
}

impl Models for Pool {
    fn cards(&self) -> Vec<ModelCard> {
        self.order
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.card.clone())
            .collect()
    }

    /// Every local GGUF member's counters, in declaration order.
    fn prefix_stats(&self) -> Vec<(String, PrefixSnapshot)> {
        self.order
            .iter()
            .filter_map(|id| {
                let s = self.workers.get(id)?.prefix.as_ref()?;
                Some((id.clone(), s.snapshot()))
            })
            .collect()
    }

    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        if let Err(e) = admissible(&input, 0, &params) {
            return Box::pin(async move { Err(e) });
        }
        if let Some(r) = self.remote(model) {
            return Box::pin(async move { r.generate(ctx, input, params).await });
        }
        self.queue_generation(ctx, model, input, params, None)
    }

    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        if let Err(e) = admissible(&input, 0, &params) {
            return Box::pin(async move { Err(e) });
        }
        if let Some(r) = self.remote(model) {
            let mut sink = sink;
            return Box::pin(async move {
                let g = r.generate(ctx, input, params).await?;
                sink(&g.text);
                Ok(g)
            });
        }
        self.queue_generation(ctx, model, input, params, Some(sink))
    }

    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        if let Err(e) = prompt.check_with(&continuations) {
            return Box::pin(async move { Err(e) });
        }
        if let Some(r) = self.remote(model) {
            if !r.config().capabilities.contains(&Capability::Score) {
                let what = format!(
                    "remote member `{model}` is not declared to `score` (only another Tessera node can: add \"score\" to its capabilities)"
                );
                return Box::pin(async move { Err(InferenceError::Unsupported(what)) });
            }
            return Box::pin(async move { r.score(ctx, prompt, continuations).await });
        }
        self.dispatch(ctx, model, move |b| b.score(ctx, &prompt, &continuations))
    }

    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        if let Err(e) = prompt.check_size(0) {
            return Box::pin(async move { Err(e) });
        }
        self.dispatch(ctx, model, move |b| b.next_token(ctx, &prompt, top_k))
    }

    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        if let Err(e) = Input::check_texts(&texts) {
            return Box::pin(async move { Err(e) });
        }
        if let Some(r) = self.remote(model) {
            if !r.config().capabilities.contains(&Capability::Embed) {
                let what = format!("remote member `{model}` is not declared to `embed`");
                return Box::pin(async move { Err(InferenceError::Unsupported(what)) });
            }
            return Box::pin(async move { r.embed(ctx, texts).await });
        }
        self.dispatch(ctx, model, move |b| b.embed(ctx, &texts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pool_parses() {
        let cfg = PoolConfig::from_toml(DEFAULT_POOL_TOML).unwrap();
        assert!(cfg.members.iter().any(|m| m.backend == BackendKind::Gguf));
    }

    #[test]
    fn the_large_pool_is_the_default_plus_the_monolith() {
        let default = PoolConfig::named("default").unwrap().unwrap();
        let large = PoolConfig::named("large").unwrap().unwrap();
        assert_eq!(large.members.len(), default.members.len() + 1);
        let extra = large.members.last().unwrap();
        assert_eq!(extra.id, "qwen2.5-coder-1.5b-instruct");
        let fetch = extra.fetch.as_ref().unwrap();
        assert_eq!(fetch.packages.len(), 22);
        assert_eq!(fetch.files[0].from.len(), 22);
        assert!(fetch.files[0].from[21].ends_with("part22.bin"));
        assert!(PoolConfig::named("huge").is_none());
    }

    #[test]
    fn a_loader_that_panics_fails_its_member_by_name() {
        let cfg = PoolConfig::from_toml("[[member]]\nid='brittle'\nbackend='gguf'\npath='x.gguf'\nsha256='00'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n").unwrap();
        let m = cfg.members[0].clone();
        let max_batch = Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let pending = spawn_local(m, |_| panic!("a tensor of -1 rows"), max_batch);
        let mut assembly = Assembly::default();
        assembly.settle(pending);
        assert!(assembly.order.is_empty());
        let msg = assembly.failures[0].to_string();
        assert!(msg.contains("brittle") && msg.contains("a tensor of -1 rows"), "{msg}");
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let one = "[[member]]\nid='a'\nbackend='gguf'\npath='x'\nsha256='0'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n";
        let err = PoolConfig::from_toml(&format!("{one}{one}")).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }

    #[test]
    fn missing_file_names_the_fix_and_pool_still_loads() {
        let cfg = PoolConfig::from_toml("[[member]]\nid='ghost'\nbackend='gguf'\npath='nope.gguf'\nsha256='00'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n").unwrap();
        let loaded = Pool::load(&cfg, Path::new("/nonexistent"));
        assert!(loaded.pool.ids().is_empty());
        let msg = loaded.failures[0].to_string();
        assert!(msg.contains("ghost") && msg.contains("make setup"), "{msg}");
    }

    #[test]
    fn wrong_checksum_is_named() {
        let dir = std::env::temp_dir().join(format!("tessera-pool-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.gguf"), b"not a model").unwrap();
        let cfg = PoolConfig::from_toml("[[member]]\nid='bad'\nbackend='gguf'\npath='bad.gguf'\nsha256='00'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n").unwrap();
        let loaded = Pool::load(&cfg, &dir);
        let msg = loaded.failures[0].to_string();
        assert!(msg.contains("sha256") && msg.contains("bad.gguf"), "{msg}");
    }
}

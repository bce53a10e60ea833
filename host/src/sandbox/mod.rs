//! The sandbox: where untrusted collaboration modules run.
//!
//! - One [`wasmtime::Engine`] with epoch interruption, fuel and a capped wasm
//!   stack; a ticker thread advances the epoch every [`TICK`].
//! - Each module is compiled once: the precompiled artifact is cached on disk
//!   under the sha256 of the `.wasm` and the engine's compatibility hash, and
//!   its imports are resolved once into an `InstancePre`.
//! - Every request gets a **fresh store and instance**: fresh WASI context
//!   with nothing granted (no files, no env, no sockets, stdout discarded,
//!   stderr captured up to 64 KiB for error reports), its own memory cap, fuel,
//!   deadline and resource-table cap. Nothing leaks between requests.
//! - Model access goes through [`crate::inference::Models`] only.
//!
//! Whatever a module does (loop, allocate, recurse, trap, flood the resource
//! table, call what it was not granted) ends *that* request with a typed
//! [`crate::Error`] naming the limit; the host keeps serving.

pub(crate) mod convert;
mod host;
pub mod output;
mod training;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::WasiCtxBuilder;

use crate::bindings::{aggregator, judge, router, strategy, types as w};
use crate::inference::{Input, Models};
use crate::policy::{Grant, Manifest, World};
use crate::request::{ProvenanceEvent, UsageReport};
use crate::Error;
pub use host::{RequestState, QUOTA_BUDGET};

/// How long past its deadline a run may take before it is cut off
/// whatever it is doing: past the time a model call stopped at the deadline
/// has to come back with its usage (twice [`host::STOP_GRACE`]).
const OVERRUN: Duration = Duration::from_millis(500);

/// How often the epoch advances; the deadline is checked at this grain.
pub const TICK: Duration = Duration::from_millis(5);

/// Ends when a run has been past its deadline, or its client gone, for
/// three ticks in a row with none of its host calls awaited
/// ([`host::RequestState::host_calls`]). A guest computing then would have
/// been stopped by the epoch within a tick, and a host call ends on its
/// own and reports its usage; what is left is a guest waiting on its own,
/// such as a WASI sleep, which nothing else would end before [`OVERRUN`]
/// (or, for a client that left, before the deadline). Such a run held its
/// place for that long, and is charged for it ([`UsageReport::held_ms`]).
async fn stuck_past(deadline: Instant, cancel: Option<Arc<AtomicBool>>, host_calls: Arc<host::HostCalls>) {
    // Before the deadline, only a client leaving counts.
    tokio::select! {
        () = tokio::time::sleep_until(deadline.into()) => {}
        () = host::left(cancel) => {}
    }
    let mut idle = 0;
    while idle < 3 {
        tokio::time::sleep(TICK).await;
        if host_calls.active() == 0 {
            idle += 1;
        } else {
            idle = 0;
        }
    }
}

/// Ends when a run under its caller's quota has held its place, with no
/// host call under way, for longer than what its quota has left pays for
/// ([`crate::request::HELD_MS_PER_CHARGED_TOKEN`]), counting what its
/// members were charged when last checked (`members_charged`, brought up
/// to date before every model call and every epoch tick). A module that
/// computes is stopped by the epoch callback; one waiting on its own,
/// such as in a WASI sleep, runs no wasm for the epoch to stop, and would
/// otherwise pass its quota by what it held until its deadline. Never
/// ends without a quota.
async fn held_past_quota(
    limit: Option<u64>,
    started: Instant,
    calls: Arc<host::HostCalls>,
    members_charged: Arc<std::sync::atomic::AtomicU64>,
) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(TICK).await;
        if calls.active() > 0 {
            continue;
        }
        let held = host::held_ms_since(started, &calls) / crate::request::HELD_MS_PER_CHARGED_TOKEN;
        if members_charged.load(Ordering::Relaxed).saturating_add(held) >= limit {
            return;
        }
    }
}

/// Fuel burned between the writes of a run's fuel back to its store (see
/// [`Sandbox`]'s store set-up): a charged token's worth.
const FUEL_TANK: u64 = crate::request::FUEL_PER_CHARGED_TOKEN;

/// Wasm stack cap for every module.
pub const MAX_WASM_STACK: usize = 512 << 10;
/// Requests that can hold a live instance at the same time.
pub const MAX_CONCURRENT_INSTANCES: u32 = 256;
pub use crate::policy::MAX_MEMORY_BYTES;
/// Bytes at the start of each pooled linear memory kept resident between
/// requests. Our guests link with a 128 KiB stack (see .cargo/config.toml),
/// so this covers their stack, data and first heap pages.
const KEEP_RESIDENT: usize = 320 << 10;
/// Bytes of stderr kept from a module for error reports.
const STDERR_CAPTURE: usize = 64 << 10;

/// A module compiled, linked and ready to instantiate.
pub struct Module {
    /// Its manifest.
    pub manifest: Manifest,
    /// sha256 of the `.wasm`.
    pub sha256: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Whether it imports the `output` interface (WIT 0.1.2): a strategy
    /// that can stream its answer as it writes it. A server tells its
    /// streaming callers in advance whether tokens or one final chunk come.
    pub streams: bool,
    pre: WorldPre,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.manifest.name)
            .field("world", &self.manifest.world)
            .field("sha256", &self.sha256)
            .field("path", &self.path)
            .finish()
    }
}

/// The pre-linked instance of a module. Router, judge and aggregator modules
/// are validated against their world at load; invoking them is the pipeline's
/// job (host-side composition), which builds on this.
enum WorldPre {
    Strategy(strategy::StrategyPre<RequestState>),
    Router(router::RouterPre<RequestState>),
    Judge(judge::JudgePre<RequestState>),
    Aggregator(aggregator::AggregatorPre<RequestState>),
}

/// The result of one sandboxed call: the value and everything the host
/// recorded while producing it.
pub struct Invocation<T> {
    /// What the export returned, or the typed error that ended the call.
    pub result: Result<T, Error>,
    /// Host calls and module trace steps, in order.
    pub provenance: Vec<ProvenanceEvent>,
    /// What was consumed.
    pub usage: UsageReport,
    /// What members generated for the call, `(member, text)`, in order:
    /// the host's record for attributing the answer
    /// ([`crate::attribution`]).
    pub generated: Vec<(String, String)>,
}

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The engine, the linker and the on-disk component cache.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<RequestState>,
    cache_dir: PathBuf,
    /// Serves `weights.merge`; without one the call is `unsupported`.
    merger: Option<Arc<dyn crate::inference::weights::Merger>>,
    /// Serves `training.train`; without one the call is `unsupported`.
    trainer: Option<Arc<dyn crate::inference::train::Trainer>>,
    _ticker: Ticker,
}

fn wasm_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Sandbox {
    /// Builds the engine and starts the epoch ticker. `cache_dir` holds
    /// precompiled components.
    pub fn new(cache_dir: &Path) -> Result<Self, Error> {
        let mut cfg = Config::new();
        // Instances come from pre-reserved slots instead of fresh mmaps: this
        // roughly halves the cost of a fresh instance per request. The totals
        // bound how many requests can be in flight at once.
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(MAX_CONCURRENT_INSTANCES)
            .total_core_instances(MAX_CONCURRENT_INSTANCES * 16)
            .total_memories(MAX_CONCURRENT_INSTANCES * 2)
            .total_tables(MAX_CONCURRENT_INSTANCES * 8)
            .total_stacks(MAX_CONCURRENT_INSTANCES)
            .max_memory_size(MAX_MEMORY_BYTES)
            // Reset the first pages of each memory, table and fiber stack with
            // memset instead of handing them back to the kernel: the next
            // request then takes no page faults and forces no TLB shootdowns
            // on the pages every request touches.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(128 << 10);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .async_stack_size(MAX_WASM_STACK + (1 << 20));
        let engine = Engine::new(&cfg).map_err(|e| Error::config(format!("wasm engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| Error::config(wasm_err(e)))?;
        strategy::Strategy::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| Error::config(wasm_err(e)))?;

        let stop = Arc::new(AtomicBool::new(false));
        let (weak_engine, flag) = (engine.weak(), stop.clone());
        std::thread::Builder::new()
            .name("tessera-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match weak_engine.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| Error::config(format!("cannot start the epoch ticker: {e}")))?;
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| Error::config(format!("cache directory {}: {e}", cache_dir.display())))?;
        Ok(Sandbox {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            merger: None,
            trainer: None,
            _ticker: Ticker { stop },
        })
    }

    /// The merger, if this host merges.
    pub fn merger(&self) -> Option<&Arc<dyn crate::inference::weights::Merger>> {
        self.merger.as_ref()
    }

    /// Lets modules granted `merges` create merged members through `merger`.
    pub fn set_merger(&mut self, merger: Arc<dyn crate::inference::weights::Merger>) {
        self.merger = Some(merger);
    }

    /// The trainer, if this host trains.
    pub fn trainer(&self) -> Option<&Arc<dyn crate::inference::train::Trainer>> {
        self.trainer.as_ref()
    }

    /// Lets modules granted `train-runs` train members through `trainer`.
    pub fn set_trainer(&mut self, trainer: Arc<dyn crate::inference::train::Trainer>) {
        self.trainer = Some(trainer);
    }

    /// The engine (for benches and tools).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles (or loads from cache) the component at `path`, checks that it
    /// implements `manifest.world`, and resolves its imports once.
    pub fn load(&self, path: &Path, manifest: Manifest) -> Result<Module, Error> {
        let invalid = |message: String| Error::InvalidModule {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
        if !is_component(&bytes) {
            return Err(invalid(if is_core_module(&bytes) {
                "this is a core wasm module, not a component: build it with `cargo build --target wasm32-wasip2`".into()
            } else {
                "not a WebAssembly component".into()
            }));
        }
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let component = self.component(&bytes, &sha256).map_err(invalid)?;
        let streams = component
            .component_type()
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("tessera:collab/output@"));
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("imports something Tessera does not provide: {e:#}")))?;
        let world_err = |e: wasmtime::Error| {
            invalid(format!(
                "does not implement the `{:?}` world its manifest declares: {e:#}",
                manifest.world
            ))
        };
        let pre = match manifest.world {
            World::Strategy => WorldPre::Strategy(strategy::StrategyPre::new(pre).map_err(world_err)?),
            World::Router => WorldPre::Router(router::RouterPre::new(pre).map_err(world_err)?),
            World::Judge => WorldPre::Judge(judge::JudgePre::new(pre).map_err(world_err)?),
            World::Aggregator => WorldPre::Aggregator(aggregator::AggregatorPre::new(pre).map_err(world_err)?),
        };
        Ok(Module {
            manifest,
            sha256,
            path: path.to_path_buf(),
            streams,
            pre,
        })
    }

    fn component(&self, bytes: &[u8], sha256: &str) -> Result<Component, String> {
        let engine = &self.engine;
        precompiled(
            engine,
            &self.cache_dir,
            sha256,
            || engine.precompile_component(bytes),
            // SAFETY: `precompiled` hands these only this engine's own
            // `precompile_component` output, or a file it stored from it.
            |path| unsafe { Component::deserialize_file(engine, path) },
            |artifact| unsafe { Component::deserialize(engine, artifact) },
        )
    }

    fn store(
        &self,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        cancel: Option<Arc<AtomicBool>>,
        output: Option<Arc<std::sync::Mutex<output::Streamed>>>,
    ) -> Result<Store<RequestState>, Error> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        // Nothing is granted: no preopened directories, no environment, no
        // arguments, no network, stdin closed, stdout discarded.
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(grant.resources as usize);
        let deadline = Instant::now() + grant.deadline;
        let fuel = grant.fuel;
        let mut state = RequestState::new(wasi, table, stderr, models, grant, deadline);
        state.merger = self.merger.clone();
        state.trainer = self.trainer.clone();
        state.cancel = cancel;
        if let Some(o) = output {
            state.output = o;
        }
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.set_fuel(fuel).map_err(|e| Error::config(wasm_err(e)))?;
        // Compiled wasm keeps the fuel it burns in a register and writes it
        // back to the store only at calls and returns, so a module stopped
        // inside a loop (at its deadline, at its caller's quota) would look
        // as if it had burned almost nothing. Yielding every `FUEL_TANK`
        // writes it back that often: fuel read during and after a run is
        // exact to one tank, at the cost of a yield per few milliseconds of
        // pure computing (strategies of the library burn less than a tank
        // per request, so they never yield for it).
        store
            .fuel_async_yield_interval(Some(FUEL_TANK))
            .map_err(|e| Error::config(wasm_err(e)))?;
        // Check the wall clock every tick; yield to the executor in between so
        // a spinning module never starves other requests on this thread.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let cancelled = ctx.data().cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
            if cancelled || Instant::now() >= ctx.data().deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            // The module's own computing is charged to its caller's quota
            // too (`FUEL_PER_CHARGED_TOKEN`): brought up to date every tick,
            // so a module that only computes stops within a tick of the
            // quota, and the quota check before each model call sees it.
            if let Some(limit) = ctx.data().grant.charge_limit {
                let burned = fuel.saturating_sub(ctx.get_fuel().unwrap_or(0));
                let state = ctx.data_mut();
                state.usage.fuel = burned;
                state.bring_held_up_to_date();
                if state.usage.charged() >= limit {
                    let _ = state.violate(Error::budget(host::QUOTA_BUDGET, limit));
                    return Ok(UpdateDeadline::Interrupt);
                }
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    /// Runs `f` against a fresh instance under `grant`, and turns whatever
    /// happened into an [`Invocation`].
    async fn invoke<T, F>(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        cancel: Option<Arc<AtomicBool>>,
        output: Option<Arc<std::sync::Mutex<output::Streamed>>>,
        f: F,
    ) -> Invocation<T>
    where
        F: for<'a> FnOnce(
            &'a WorldPre,
            &'a mut Store<RequestState>,
        ) -> futures::future::BoxFuture<'a, wasmtime::Result<Result<T, w::Error>>>,
    {
        let started = Instant::now();
        let mut store = match self.store(models, grant.clone(), cancel, output) {
            Ok(s) => s,
            Err(e) => {
                return Invocation {
                    result: Err(e),
                    provenance: Vec::new(),
                    usage: UsageReport::default(),
                    generated: Vec::new(),
                }
            }
        };
        let deadline = store.data().deadline;
        let (cancel, host_calls) = (store.data().cancel.clone(), store.data().host_calls.clone());
        let held_watch = held_past_quota(
            grant.charge_limit,
            store.data().started,
            host_calls.clone(),
            store.data().members_charged.clone(),
        );
        // The epoch callback stops wasm and host calls carry their own
        // timeouts; a guest in a wait of its own (a WASI sleep) is cut once
        // it is past its deadline or its client has left, or once the place
        // it held passes its caller's quota, and this outer timeout bounds
        // anything else.
        let mut past_quota = false;
        let outcome = tokio::select! {
            biased;
            r = tokio::time::timeout_at((deadline + OVERRUN).into(), f(&module.pre, &mut store)) => r.ok(),
            () = stuck_past(deadline, cancel, host_calls) => None,
            () = held_watch => {
                past_quota = true;
                None
            }
        };
        let fuel_left = store.get_fuel().unwrap_or(0);
        let state = store.data_mut();
        let mut usage = std::mem::take(&mut state.usage);
        usage.fuel = grant.fuel.saturating_sub(fuel_left);
        usage.wall_ms = started.elapsed().as_millis() as u64;
        usage.held_ms = state.held_ms();
        let provenance = std::mem::take(&mut state.provenance);
        let generated = std::mem::take(&mut state.generated);
        let result = match outcome {
            None if past_quota => Err(Error::budget(QUOTA_BUDGET, grant.charge_limit.unwrap_or(0))),
            None => Err(Error::Deadline {
                limit_ms: grant.deadline.as_millis() as u64,
            }),
            Some(Ok(Ok(v))) => Ok(v),
            Some(Ok(Err(guest))) => Err(convert::module_error_in(guest)),
            Some(Err(trap)) => Err(classify(trap, state, &grant)),
        };
        let result = result.map_err(|e| match e {
            Error::Deadline { .. } => Error::Deadline {
                limit_ms: grant.deadline.as_millis() as u64,
            },
            other => other,
        });
        Invocation {
            result,
            provenance,
            usage,
            generated,
        }
    }

    /// Runs a `strategy` module's `run` on a fresh instance.
    pub async fn run_strategy(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        request: StrategyRequest,
    ) -> Invocation<(String, BTreeMap<String, String>)> {
        self.run_strategy_streamed(module, models, grant, request, None).await
    }

    /// [`Sandbox::run_strategy`] for a caller that streams: what the module
    /// sends through the `output` interface goes to `sink` as it is sent
    /// (see [`output`]). Streamed or not, the answer the module returns must
    /// begin with everything it sent, or the run fails with
    /// `module-failed`.
    pub async fn run_strategy_streamed(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        request: StrategyRequest,
        sink: Option<crate::inference::TextSink>,
    ) -> Invocation<(String, BTreeMap<String, String>)> {
        if !matches!(module.pre, WorldPre::Strategy(_)) {
            return not_world(module, "strategy");
        }
        let out_cap = grant.output_bytes;
        let req = request.to_wit();
        let cancel = request.cancel.clone();
        let streamed = Arc::new(std::sync::Mutex::new(output::Streamed::new(sink)));
        let inv = self
            .invoke(
                module,
                models,
                grant,
                cancel,
                Some(streamed.clone()),
                move |pre, store| {
                    Box::pin(async move {
                        let WorldPre::Strategy(pre) = pre else {
                            unreachable!("checked above")
                        };
                        let inst = pre.instantiate_async(&mut *store).await?;
                        inst.call_run(&mut *store, &req).await
                    })
                },
            )
            .await;
        let sent = streamed.lock().unwrap_or_else(|e| e.into_inner()).text.clone();
        let result = inv
            .result
            .and_then(|r| within_output_cap(r, out_cap))
            .and_then(|(text, annotations)| output::begins_with_streamed(&text, &sent).map(|_| (text, annotations)));
        Invocation {
            result,
            provenance: inv.provenance,
            usage: inv.usage,
            generated: inv.generated,
        }
    }

    /// Runs a `router` module: member ids, best first, chosen from `members`.
    pub async fn run_router(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        request: StrategyRequest,
        members: Vec<crate::inference::ModelCard>,
    ) -> Invocation<Vec<String>> {
        if !matches!(module.pre, WorldPre::Router(_)) {
            return not_world(module, "router");
        }
        let req = request.to_wit();
        let cancel = request.cancel.clone();
        let members: Vec<w::ModelInfo> = members.into_iter().map(convert::card_out).collect();
        self.invoke(module, models, grant, cancel, None, move |pre, store| {
            Box::pin(async move {
                let WorldPre::Router(pre) = pre else {
                    unreachable!("checked above")
                };
                let inst = pre.instantiate_async(&mut *store).await?;
                inst.call_route(&mut *store, &req, &members).await
            })
        })
        .await
    }

    /// Runs a `judge` module: one score per candidate, higher is better.
    pub async fn run_judge(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        request: StrategyRequest,
        candidates: Vec<(String, String)>,
    ) -> Invocation<Vec<f64>> {
        if !matches!(module.pre, WorldPre::Judge(_)) {
            return not_world(module, "judge");
        }
        let req = request.to_wit();
        let cancel = request.cancel.clone();
        let cands: Vec<w::Candidate> = candidates
            .into_iter()
            .map(|(model, text)| w::Candidate { model, text })
            .collect();
        self.invoke(module, models, grant, cancel, None, move |pre, store| {
            Box::pin(async move {
                let WorldPre::Judge(pre) = pre else {
                    unreachable!("checked above")
                };
                let inst = pre.instantiate_async(&mut *store).await?;
                inst.call_judge(&mut *store, &req, &cands).await
            })
        })
        .await
    }

    /// Runs an `aggregator` module: candidates in, one answer out.
    pub async fn run_aggregator(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        request: StrategyRequest,
        candidates: Vec<(String, String)>,
    ) -> Invocation<(String, BTreeMap<String, String>)> {
        if !matches!(module.pre, WorldPre::Aggregator(_)) {
            return not_world(module, "aggregator");
        }
        let out_cap = grant.output_bytes;
        let req = request.to_wit();
        let cancel = request.cancel.clone();
        let cands: Vec<w::Candidate> = candidates
            .into_iter()
            .map(|(model, text)| w::Candidate { model, text })
            .collect();
        let inv = self
            .invoke(module, models, grant, cancel, None, move |pre, store| {
                Box::pin(async move {
                    let WorldPre::Aggregator(pre) = pre else {
                        unreachable!("checked above")
                    };
                    let inst = pre.instantiate_async(&mut *store).await?;
                    inst.call_aggregate(&mut *store, &req, &cands).await
                })
            })
            .await;
        let result = inv.result.and_then(|r| within_output_cap(r, out_cap));
        Invocation {
            result,
            provenance: inv.provenance,
            usage: inv.usage,
            generated: inv.generated,
        }
    }

    /// Runs a `strategy` module's `fit` on a fresh instance.
    pub async fn fit_strategy(
        &self,
        module: &Module,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        dev: Vec<Example>,
        config: BTreeMap<String, String>,
    ) -> Invocation<Option<Vec<u8>>> {
        if !matches!(module.pre, WorldPre::Strategy(_)) {
            return not_world(module, "strategy");
        }
        let cancel = None;
        let dev: Vec<w::Example> = dev
            .into_iter()
            .map(|e| w::Example {
                input: convert::input_out(&e.input),
                answer: e.answer,
                choices: e.choices,
            })
            .collect();
        let config: Vec<(String, String)> = config.into_iter().collect();
        self.invoke(module, models, grant, cancel, None, move |pre, store| {
            Box::pin(async move {
                let WorldPre::Strategy(pre) = pre else {
                    unreachable!("checked above")
                };
                let inst = pre.instantiate_async(&mut *store).await?;
                inst.call_fit(&mut *store, &dev, &config).await
            })
        })
        .await
    }
}

/// A module's response as text and annotations, or the output-size error
/// when together they exceed the grant's cap (strategies and aggregators
/// answer the caller directly, so both are held to it).
fn within_output_cap(r: w::Response, cap: u64) -> Result<(String, BTreeMap<String, String>), Error> {
    let size = r.text.len() as u64
        + r.annotations
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
    if size > cap {
        return Err(Error::budget("output-size", cap));
    }
    Ok((r.text, r.annotations.into_iter().collect()))
}

/// A wasm binary (whose sha256 is `sha256`) compiled for `engine`: loaded
/// by `load_file` from `cache_dir` when an artifact is there, else compiled
/// by `precompile`, stored there and loaded by `load`.
///
/// The artifact's name binds it to the source's sha256 and to `engine`'s
/// compatibility hash, and it is written atomically (a torn artifact must
/// never be deserialized); it is a cache, so there is no fsync, and a
/// failed write only costs a compile later. `load_file` and `load`, which
/// deserialize without checking, so see only `engine`'s own `precompile`
/// output.
pub(crate) fn precompiled<T>(
    engine: &Engine,
    cache_dir: &Path,
    sha256: &str,
    precompile: impl FnOnce() -> wasmtime::Result<Vec<u8>>,
    load_file: impl FnOnce(&Path) -> wasmtime::Result<T>,
    load: impl FnOnce(&[u8]) -> wasmtime::Result<T>,
) -> Result<T, String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let cached = cache_dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
    if cached.exists() {
        if let Ok(t) = load_file(&cached) {
            return Ok(t);
        }
    }
    let artifact = precompile().map_err(|e| format!("does not compile: {e:#}"))?;
    let _ = crate::files::write_atomic(&cached, &artifact, crate::files::Durability::Cache);
    load(&artifact).map_err(|e| format!("does not load: {e:#}"))
}

/// The binary preamble: `\0asm`, then a version and a layer. Layer 0 is a core
/// module, layer 1 a component.
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn not_world<T>(module: &Module, world: &str) -> Invocation<T> {
    Invocation {
        result: Err(Error::InvalidModule {
            path: module.path.display().to_string(),
            message: format!(
                "is a {:?} module; this call needs a `{world}` module",
                module.manifest.world
            ),
        }),
        provenance: Vec::new(),
        usage: UsageReport::default(),
        generated: Vec::new(),
    }
}

/// Turns a wasmtime error into the typed cause.
fn classify(err: wasmtime::Error, state: &mut RequestState, grant: &Grant) -> Error {
    if let Some(v) = state.violation.take() {
        return v;
    }
    let stderr = String::from_utf8_lossy(&state.stderr.contents()).trim().to_string();
    if let Some(trap) = err.downcast_ref::<Trap>() {
        match trap {
            Trap::OutOfFuel => return Error::Fuel { limit: grant.fuel },
            Trap::Interrupt => {
                return Error::Deadline {
                    limit_ms: grant.deadline.as_millis() as u64,
                }
            }
            Trap::StackOverflow => {
                return Error::Stack {
                    limit: MAX_WASM_STACK as u64,
                }
            }
            _ => {}
        }
    }
    // A guest's own stack lives in linear memory and grows down from its
    // top; running off address 0 wraps to the very end of the 32-bit space.
    // A fault there is stack exhaustion, not a stray pointer.
    if faulted_just_below_zero(&err) {
        return Error::Stack { limit: 0 };
    }
    if let Some(wasmtime::component::ResourceTableError::Full) =
        err.downcast_ref::<wasmtime::component::ResourceTableError>()
    {
        return Error::budget("resources", grant.resources as u64);
    }
    let mut message = format!("{err:#}");
    if !stderr.is_empty() {
        message.push_str("; module stderr: ");
        message.push_str(&stderr);
    }
    Error::Trap { message }
}

/// Whether the trap's fault address lies within 64 KiB below 2^32.
fn faulted_just_below_zero(err: &wasmtime::Error) -> bool {
    let text = format!("{err:#}");
    text.split("wasm address 0x")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .is_some_and(|addr| (0xffff_0000..=0xffff_ffff).contains(&addr))
}

/// A request as a strategy sees it.
#[derive(Debug, Clone)]
pub struct StrategyRequest {
    /// The question.
    pub input: Input,
    /// Decoding defaults.
    pub params: crate::inference::GenParams,
    /// Hyperparameters (manifest defaults overlaid with the caller's).
    pub config: BTreeMap<String, String>,
    /// Persisted `fit` state, if any.
    pub state: Option<Vec<u8>>,
    /// Set by the caller when nobody waits for the answer any more (an HTTP
    /// client that went away): the module is stopped at its next epoch
    /// tick, as at its deadline, and its usage so far is reported.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl StrategyRequest {
    fn to_wit(&self) -> w::Request {
        w::Request {
            input: convert::input_out(&self.input),
            params: convert::params_out(&self.params),
            config: self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            state: self.state.clone(),
        }
    }
}

/// Dev examples are plain data of the request vocabulary; re-exported here
/// where `fit` takes them.
pub use crate::request::Example;

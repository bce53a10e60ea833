//! [`Runtime`]: the sandbox, the pool and the policy wired together once.
//! Every face (the CLI today; the server and the eval harness later) calls
//! this and nothing below it.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::inference::{ModelCard, Models};
use crate::policy::{Manifest, Policy};
use crate::pool::{Pool, PoolConfig, PoolError};
use crate::request::{ProvenanceEvent, RunOutcome, RunRequest};
use crate::sandbox::{Example, Module, Sandbox, StrategyRequest};
use crate::Error;

/// Where Tessera keeps its files. Everything lives under one home directory
/// (`$TESSERA_HOME`, default `~/.cache/tessera`), outside any git checkout.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Model files of the pool.
    pub models: PathBuf,
    /// Installed modules (`NAME.wasm` + `NAME.toml`).
    pub modules: PathBuf,
    /// Precompiled components.
    pub components: PathBuf,
    /// Persisted `fit` state, one file per module sha256.
    pub state: PathBuf,
    /// Downloaded packages, kept so that fetching can resume.
    pub wheels: PathBuf,
    /// Evaluation data extracted from its packages (`tessera tasks fetch`).
    pub data: PathBuf,
    /// Published modules, tenants and their usage (`tessera serve`).
    pub registry: PathBuf,
}

impl Paths {
    /// The layout under `home`.
    pub fn under(home: &Path) -> Self {
        Paths {
            models: home.join("models"),
            modules: home.join("modules"),
            components: home.join("components"),
            state: home.join("state"),
            wheels: home.join("wheels"),
            data: home.join("data"),
            registry: home.join("registry"),
        }
    }

    /// `$TESSERA_HOME`, else `~/.cache/tessera`.
    pub fn from_env() -> Self {
        let home = std::env::var_os("TESSERA_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            base.join(".cache").join("tessera")
        });
        Self::under(&home)
    }
}

/// One installed module, as `tessera strategies list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstalledModule {
    /// The name it is run by.
    pub name: String,
    /// Its manifest, or why the manifest could not be read.
    pub manifest: Result<Manifest, crate::files::FileError>,
}

/// The modules installed in `paths.modules` (`NAME.wasm` with `NAME.toml`),
/// sorted by name. Subfolders (test and bench modules) are not listed.
pub fn installed_modules(paths: &Paths) -> Vec<InstalledModule> {
    let Ok(dir) = std::fs::read_dir(&paths.modules) else {
        return Vec::new();
    };
    let mut out: Vec<InstalledModule> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_string();
            Some(InstalledModule {
                name,
                manifest: Manifest::from_file(&p.with_extension("toml")),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// How a runtime runs, as a value built like wasmtime's `Config`: where
/// members load and merges compute, how members batch, how many merged
/// members stay loaded for reuse. The CLI fills it from its flags (and
/// their environment variables, through clap); the library reads no
/// environment for it, so one process can run two runtimes differently.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// How the pool loads and batches.
    pub pool: crate::pool::PoolOptions,
    /// Where weight merges compute.
    pub merge_device: crate::merge::compute::Choice,
    /// Merged members kept loaded for reuse (about 540 MB each for a 135M
    /// model in f32).
    pub merge_keep: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            pool: crate::pool::PoolOptions::default(),
            merge_device: crate::merge::compute::Choice::Auto,
            merge_keep: 2,
        }
    }
}

impl RuntimeOptions {
    /// Members load on `device`.
    pub fn device(mut self, device: crate::backends::device::DeviceSpec) -> Self {
        self.pool.device = device;
        self
    }

    /// Members decode at most `n` queued generations together.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.pool.max_batch = n.max(1);
        self
    }

    /// Each local member keeps at most `bytes` of prompt keys and values
    /// for reuse across requests (0: no prefix cache).
    pub fn prefix_cache(mut self, bytes: usize) -> Self {
        self.pool.prefix_cache_bytes = bytes;
        self
    }

    /// The generations running together on one local member reserve at
    /// most `bytes` of KV cache.
    pub fn kv_budget(mut self, bytes: usize) -> Self {
        self.pool.kv_budget_bytes = bytes;
        self
    }

    /// Merges compute on `choice`.
    pub fn merge_device(mut self, choice: crate::merge::compute::Choice) -> Self {
        self.merge_device = choice;
        self
    }

    /// Keep up to `n` merged members loaded for reuse (at least 1).
    pub fn merge_keep(mut self, n: usize) -> Self {
        self.merge_keep = n.max(1);
        self
    }
}

/// What a caller that bills controls of one run ([`Runtime::run_metered`]);
/// every part is optional, and the default is a run bounded by its grant
/// alone.
#[derive(Default)]
pub struct Metering {
    /// Once set, stops the module as at its deadline (the caller went away).
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Where what the module streams through the `output` interface goes as
    /// it is sent ([`crate::sandbox::output`]); the outcome's text begins
    /// with all of it.
    pub output: Option<crate::inference::TextSink>,
    /// The caller's deadline (a server's request timeout): it binds the
    /// module and every model call it makes when the module's own
    /// wall-clock budget would go on longer, so the run stops by itself,
    /// reports what it used, and nothing of it outlives the request. Ending
    /// there is an [`Error::Deadline`] whose limit is the time that was left.
    pub deadline: Option<std::time::Instant>,
    /// The most the run may be charged ([`crate::UsageReport::charged`]):
    /// a tenant's tokens left today. A call that would pass it ends the run
    /// with `budget exhausted: tenant-tokens`
    /// ([`crate::sandbox::QUOTA_BUDGET`]); a generation is cut to what is
    /// left after its input.
    pub charge_limit: Option<u64>,
    /// The `fit` state the module receives, in place of the one stored for
    /// it: `Some(None)` runs it as unfitted. The evaluation harness answers
    /// with the state of its own fit this way, so that another fit of the
    /// same module in this process (another evaluation, a variant with other
    /// settings) cannot change the state it answers with between its fit
    /// and its answers.
    pub state: Option<Option<Vec<u8>>>,
}

/// The runtime: one per process.
pub struct Runtime {
    sandbox: Sandbox,
    models: Arc<dyn Models>,
    /// The loaded members' ids (grants are computed from them and from the
    /// merged members kept by name, which join later).
    pool_ids: Vec<String>,
    policy: Policy,
    paths: Paths,
    pool_failures: Vec<PoolError>,
    /// `fit` state by module sha256, read from disk once.
    states: Mutex<HashMap<String, Option<Arc<Vec<u8>>>>>,
    /// What pins each declared member's weights (see
    /// [`Runtime::fingerprint`]).
    fingerprints: HashMap<String, String>,
}

impl Runtime {
    /// Loads `pool` from `paths.models` and builds the sandbox. Members that
    /// fail to load are kept in [`Runtime::pool_failures`]; the rest serve.
    pub fn new(paths: Paths, pool: &PoolConfig, policy: Policy) -> Result<Self, Error> {
        Self::with_options(paths, pool, policy, RuntimeOptions::default())
    }

    /// [`Runtime::new`] as `options` say.
    pub fn with_options(
        paths: Paths,
        pool: &PoolConfig,
        policy: Policy,
        options: RuntimeOptions,
    ) -> Result<Self, Error> {
        let loaded = Pool::load_with(pool, &paths.models, &options.pool);
        let models_dir = paths.models.clone();
        let state_dir = paths.state.clone();
        let mut rt = Self::with_models(paths, loaded.pool, policy, loaded.failures)?;
        rt.fingerprints = pool
            .members
            .iter()
            .filter(|m| !m.sha256.is_empty())
            .map(|m| {
                let quantized = m.quantize.map(|q| format!("+{}", q.name())).unwrap_or_default();
                (m.id.clone(), format!("{}{quantized}", m.sha256))
            })
            .collect();
        let named = rt.policy.keep_merged as usize;
        let merger = crate::merge::PoolMerger::new(pool.clone(), models_dir.clone(), options.merge_keep, named)
            .on(options.merge_device, options.pool.clone());
        rt.sandbox.set_merger(Arc::new(merger));
        let trainer = crate::contribute::PoolTrainer::new(
            pool.clone(),
            models_dir,
            &state_dir,
            rt.policy.keep_trained as usize,
            options.pool.clone(),
        );
        rt.sandbox.set_trainer(Arc::new(trainer));
        Ok(rt)
    }

    /// A runtime over any [`Models`] (tests use doubles).
    pub fn with_models(
        paths: Paths,
        models: Arc<dyn Models>,
        policy: Policy,
        pool_failures: Vec<PoolError>,
    ) -> Result<Self, Error> {
        let sandbox = Sandbox::new(&paths.components)?;
        let pool_ids = models.cards().into_iter().map(|c| c.id).collect();
        Ok(Runtime {
            sandbox,
            models,
            pool_ids,
            states: Mutex::new(HashMap::new()),
            fingerprints: HashMap::new(),
            policy,
            paths,
            pool_failures,
        })
    }

    /// Serves modules' `weights.merge` with `merger` (the runtime over the
    /// default pool merges with a [`crate::merge::PoolMerger`]; embedders
    /// and tests may bring their own).
    pub fn set_merger(&mut self, merger: Arc<dyn crate::merge::Merger>) {
        self.sandbox.set_merger(merger);
    }

    /// Serves modules' `training.train` with `trainer` (the runtime over the
    /// default pool trains with a [`crate::contribute::PoolTrainer`]).
    pub fn set_trainer(&mut self, trainer: Arc<dyn crate::inference::train::Trainer>) {
        self.sandbox.set_trainer(trainer);
    }

    /// Members that did not load, with reasons.
    pub fn pool_failures(&self) -> &[PoolError] {
        &self.pool_failures
    }

    /// The pool's cards.
    pub fn cards(&self) -> Vec<ModelCard> {
        self.models_arc().cards()
    }

    /// The ids of the members that generate, in pool order.
    pub fn generator_ids(&self) -> Vec<String> {
        self.cards()
            .into_iter()
            .filter(|c| c.can(crate::inference::Capability::Generate))
            .map(|c| c.id)
            .collect()
    }

    /// What pins member `id`'s weights: the sha256 its declaration checks
    /// (plus the re-encoding it is loaded with, if any). A result cache
    /// keys on it, so a member retrained under the same id is never
    /// answered with its predecessor's results. `None` for members that
    /// declare no digest (remote ones) and for runtimes over doubles.
    pub fn fingerprint(&self, id: &str) -> Option<&str> {
        self.fingerprints.get(id).map(String::as_str)
    }

    /// From now on, answers a repeated `score` call (same member, prompt
    /// and continuations) and a repeated deterministic generation (greedy
    /// or seeded) from memory, keeping up to `capacity` results; see
    /// [`crate::inference::memo`]. Evaluation turns this on: every strategy
    /// that consults the members then reuses what the members were already
    /// asked. With a `store`, results also outlive the process (an
    /// interrupted evaluation resumes without asking again). Returns the
    /// memo, for its hit counts.
    pub fn memoize_calls(
        &mut self,
        capacity: usize,
        store: Option<Arc<dyn crate::inference::memo::CallStore>>,
    ) -> Arc<crate::inference::memo::CallMemo> {
        let mut memo = crate::inference::memo::CallMemo::new(self.models.clone(), capacity);
        if let Some(store) = store {
            memo = memo.with_store(store);
        }
        let memo = Arc::new(memo);
        self.models = memo.clone();
        memo
    }

    /// The pool as the sandbox sees it (for tests, benches and native
    /// baselines).
    pub fn models(&self) -> Arc<dyn Models> {
        self.models_arc()
    }

    /// Where this runtime keeps its files.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The sandbox (for benches).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Loads a module by installed name (`majority-vote`) or by path to a
    /// `.wasm` whose manifest sits beside it (`x.wasm` + `x.toml`).
    pub fn load_module(&self, spec: &str) -> Result<Arc<Module>, Error> {
        let wasm = if spec.ends_with(".wasm") || spec.contains('/') {
            PathBuf::from(spec)
        } else {
            self.paths.modules.join(format!("{spec}.wasm"))
        };
        if !wasm.exists() {
            return Err(Error::config(format!(
                "no module `{spec}` at {}: give a path to a .wasm, or run `make setup` to install the standard modules",
                wasm.display()
            )));
        }
        let manifest_path = wasm.with_extension("toml");
        let manifest = Manifest::from_file(&manifest_path).map_err(|e| {
            Error::config(format!(
                "module manifest: {e} (every .wasm needs a manifest NAME.toml beside it)"
            ))
        })?;
        self.sandbox.load(&wasm, manifest).map(Arc::new)
    }

    fn pool_ids(&self) -> Vec<String> {
        let mut ids = self.pool_ids.clone();
        ids.extend(self.kept().into_iter().map(|n| n.name));
        ids
    }

    /// Merged and trained members kept by name (`weights.keep`,
    /// `training.keep`), oldest first within each.
    pub fn kept(&self) -> Vec<crate::merge::Named> {
        let mut kept = self.sandbox.merger().map(|m| m.kept()).unwrap_or_default();
        kept.extend(self.sandbox.trainer().map(|t| t.kept()).unwrap_or_default());
        kept
    }

    fn narrowed_grant(&self, module: &Module, members: Option<&[String]>) -> crate::policy::Grant {
        self.narrowed(self.policy.grant(&module.manifest, &self.pool_ids()), module, members)
    }

    /// `g` with its members narrowed to `members` (a sub-pool), keeping the
    /// embedder and the module's own kept members.
    fn narrowed(
        &self,
        mut g: crate::policy::Grant,
        module: &Module,
        members: Option<&[String]>,
    ) -> crate::policy::Grant {
        if let Some(keep) = members {
            // The embedder is infrastructure, not a contributor: sub-pools
            // keep it so that embedding-based methods still work.
            let cards = self.cards();
            let is_embedder = |id: &str| {
                cards
                    .iter()
                    .any(|c| c.id == id && !c.can(crate::inference::Capability::Generate))
            };
            // And so are the members this module trained and kept: its
            // own artifacts (an aggregator fitted on dev), not contributors.
            let own: Vec<String> = self
                .kept()
                .into_iter()
                .filter(|k| k.owner.as_deref() == Some(module.manifest.name.as_str()))
                .map(|k| k.name)
                .collect();
            g.models
                .retain(|m| keep.contains(m) || is_embedder(m) || own.contains(m));
        }
        g
    }

    pub(crate) fn member_ids(&self) -> Vec<String> {
        self.pool_ids()
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the operator's global allow-list admits member `id`.
    pub(crate) fn policy_allows(&self, id: &str) -> bool {
        self.policy.models.iter().any(|m| m == "*" || m == id)
    }

    pub(crate) fn models_arc(&self) -> Arc<dyn Models> {
        let kept = self.kept();
        if kept.is_empty() {
            self.models.clone()
        } else {
            Arc::new(crate::merge::Overlay::with_kept(self.models.clone(), kept))
        }
    }

    /// The module's persisted `fit` state, cached after the first read.
    fn state(&self, module: &Module) -> Option<Arc<Vec<u8>>> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .entry(module.sha256.clone())
            .or_insert_with(|| {
                std::fs::read(self.state_path(module))
                    .ok()
                    // A file over the limit (written by hand, or by an older
                    // version) is not handed to the module.
                    .filter(|b| b.len() <= crate::policy::MAX_STATE_BYTES)
                    .map(Arc::new)
            })
            .clone()
    }

    fn state_path(&self, module: &Module) -> PathBuf {
        self.paths.state.join(format!("{}.state", module.sha256))
    }

    /// Answers `req` with `module` on a fresh sandboxed instance.
    pub async fn run(&self, module: &Module, req: RunRequest) -> Result<RunOutcome, Error> {
        self.run_with_members(module, req, None).await
    }

    /// [`Runtime::run`] with the module's grant narrowed to `members` (the
    /// policy still applies): how a sub-pool is evaluated without loading a
    /// second pool.
    pub async fn run_with_members(
        &self,
        module: &Module,
        req: RunRequest,
        members: Option<&[String]>,
    ) -> Result<RunOutcome, Error> {
        self.run_metered(module, req, members, Metering::default()).await.0
    }

    /// Whose generated text reached `answer` ([`crate::attribution`]), with
    /// each member's contributor from its card.
    pub(crate) fn attribute(
        &self,
        answer: &str,
        question: &str,
        generated: &[(String, String)],
    ) -> Vec<crate::attribution::Attribution> {
        let cards = self.models_arc().cards();
        let contributor = |m: &str| cards.iter().find(|c| c.id == m).map(|c| c.contributor.clone());
        crate::attribution::attribute(answer, question, generated, contributor)
    }

    /// [`Runtime::run_with_members`] for a face that bills its caller: the
    /// usage comes back whether or not the run succeeded (a module that
    /// fails after generating thousands of tokens used them), and the
    /// caller's [`Metering`] bounds the run.
    pub async fn run_metered(
        &self,
        module: &Module,
        req: RunRequest,
        members: Option<&[String]>,
        metering: Metering,
    ) -> (Result<RunOutcome, Error>, crate::UsageReport) {
        if let Err(e) = req.params.validate().and_then(|_| req.input.check_size(0)) {
            return (Err(e.into()), crate::UsageReport::default());
        }
        let Metering {
            cancel,
            output,
            deadline,
            charge_limit,
            state: given_state,
        } = metering;
        let mut grant = self.narrowed_grant(module, members);
        if let Some(d) = deadline {
            grant.deadline = grant
                .deadline
                .min(d.saturating_duration_since(std::time::Instant::now()));
        }
        grant.charge_limit = charge_limit;
        let grant = Arc::new(grant);
        let mut config: BTreeMap<String, String> = module.manifest.config.clone();
        config.extend(req.config);
        let state = match given_state {
            Some(given) => given,
            None => self.state(module).map(|s| s.as_ref().clone()),
        };
        let question = crate::attribution::input_text(&req.input);
        let sreq = StrategyRequest {
            input: req.input,
            params: req.params,
            config,
            state,
            cancel,
        };
        let inv = self
            .sandbox
            .run_strategy_streamed(module, self.models_arc(), grant, sreq, output)
            .await;
        let usage = inv.usage.clone();
        let generated = inv.generated;
        let out = inv.result.map(|(text, annotations)| {
            let attribution = self.attribute(&text, &question, &generated);
            RunOutcome {
                text,
                annotations,
                provenance: inv.provenance,
                usage: inv.usage,
                attribution,
            }
        });
        (out, usage)
    }

    /// Runs the module's `fit` on `dev` and persists the returned state
    /// (atomically), so later `run`s receive it.
    pub async fn fit(
        &self,
        module: &Module,
        dev: Vec<Example>,
        config: BTreeMap<String, String>,
    ) -> Result<bool, Error> {
        self.fit_with_members(module, dev, config, None).await
    }

    /// [`Runtime::fit`] with the grant narrowed to `members`.
    pub async fn fit_with_members(
        &self,
        module: &Module,
        dev: Vec<Example>,
        config: BTreeMap<String, String>,
        members: Option<&[String]>,
    ) -> Result<bool, Error> {
        self.fit_traced(module, dev, config, members).await.0
    }

    /// [`Runtime::fit_with_members`], also returning what the module did
    /// during `fit` (its host calls and trace steps, in order): a search
    /// that merges, measures and releases candidates shows each step.
    pub async fn fit_traced(
        &self,
        module: &Module,
        dev: Vec<Example>,
        config: BTreeMap<String, String>,
        members: Option<&[String]>,
    ) -> (Result<bool, Error>, Vec<ProvenanceEvent>) {
        let (state, steps) = self.fit_state(module, dev, config, members).await;
        let fitted = match state {
            Err(e) => Err(e),
            Ok(None) => Ok(false),
            Ok(Some(bytes)) => self.install_state(module, Some(bytes)).map(|_| true),
        };
        (fitted, steps)
    }

    /// Runs the module's `fit` like [`Runtime::fit_traced`] and returns the
    /// state it produced instead of storing it: the caller hands it to the
    /// runs it means it for ([`Metering::state`]). The state is held to the
    /// same size limit as a stored one.
    pub async fn fit_state(
        &self,
        module: &Module,
        dev: Vec<Example>,
        config: BTreeMap<String, String>,
        members: Option<&[String]>,
    ) -> (Result<Option<Vec<u8>>, Error>, Vec<ProvenanceEvent>) {
        // A fit has its own grant (the manifest's `fit_budgets`, capped by
        // the policy's `fit_maxima`): it runs over the whole dev set.
        let fit_grant = self.policy.fit_grant(&module.manifest, &self.pool_ids());
        let grant = Arc::new(self.narrowed(fit_grant, module, members));
        let mut cfg = module.manifest.config.clone();
        cfg.extend(config);
        let inv = self
            .sandbox
            .fit_strategy(module, self.models_arc(), grant, dev, cfg)
            .await;
        let state = inv.result.and_then(|s| s.map(within_state_limit).transpose());
        (state, inv.provenance)
    }

    /// The module's current `fit` state, as `run` would receive it.
    pub fn stored_state(&self, module: &Module) -> Option<Vec<u8>> {
        self.state(module).map(|s| s.as_ref().clone())
    }

    /// Replaces the module's `fit` state (e.g. with one cached from an
    /// earlier fit on the same dev set); `None` removes it. Written
    /// atomically: a crash leaves the old state or the new one.
    pub fn install_state(&self, module: &Module, bytes: Option<Vec<u8>>) -> Result<(), Error> {
        let path = self.state_path(module);
        match &bytes {
            Some(b) => {
                // Persisted and handed to every later run: bounded on its own.
                within_state_limit(b)?;
                std::fs::create_dir_all(&self.paths.state)
                    .map_err(|e| Error::internal(format!("state directory {}: {e}", self.paths.state.display())))?;
                crate::files::write_atomic(&path, b, crate::files::Durability::Durable)
                    .map_err(|e| Error::internal(format!("saving state to {}: {e}", path.display())))?;
            }
            None => {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .map_err(|e| Error::internal(format!("removing state {}: {e}", path.display())))?;
                }
            }
        }
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.insert(module.sha256.clone(), bytes.map(Arc::new));
        Ok(())
    }
}

/// `state` if it is within [`crate::policy::MAX_STATE_BYTES`], the limit on
/// a `fit` state whether it is stored or handed to runs directly.
fn within_state_limit<S: AsRef<[u8]>>(state: S) -> Result<S, Error> {
    if state.as_ref().len() > crate::policy::MAX_STATE_BYTES {
        return Err(Error::budget("state-bytes", crate::policy::MAX_STATE_BYTES as u64));
    }
    Ok(state)
}

//! Trained members for modules: the host side of the `training` import.
//!
//! A module supplies the data and the objective; [`PoolTrainer`] resolves
//! the base to a weight folder (a GGUF member dequantized once into
//! `bases/`, as merging does, or a member trained earlier in the request),
//! runs [`super::session::run`] on a blocking thread, loads the written
//! folder as a one-member pool on its own worker, and hands back a
//! [`Trained`] that the request's overlay serves under a fresh id.
//!
//! One run at a time, host-wide: a run holds the base in f32 plus its
//! activations and optimizer state (about 1.5 GB for SmolLM2-135M), so two
//! at once would double what the operator sized for. A waiting run's
//! request keeps its deadline. The trained folder lives under
//! `models/trained/ID.PID` and is removed with the last handle, unless the
//! operator lets modules keep trained members (`keep_trained`): a kept one
//! stays, and joins the pool every later request sees.
//!
//! Kept members outlive the process: `keep` hard-links the trained folder's
//! files into `kept-trained/NAME` under the runtime's state directory, beside
//! the persisted `fit` states that name them (a copy where links fail), with a
//! `kept.toml` that declares the member, built under a temporary name and
//! renamed into place, so a crash never leaves half a member. A trainer
//! that may keep members loads those folders when it starts, so a strategy
//! fitted yesterday (its state names its kept member) answers today. An
//! operator forgets one by removing its folder.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::session::{self, RunSpec, SessionConfig};
use crate::inference::train::{
    Objective, TrainBase, TrainFailed, TrainLimits, TrainParams, Trained, TrainedFolder, Trainer,
};
use crate::inference::weights::{KeepRefused, Merged, Named};
use crate::inference::Models;
use crate::model_folder::WEIGHTS;
use crate::pool::{BackendKind, CardConfig, MemberConfig, Pool, PoolConfig, PoolOptions};

/// The [`Trainer`] over a declared pool.
#[derive(Clone)]
pub struct PoolTrainer(Arc<Inner>);

struct Inner {
    config: PoolConfig,
    models_dir: PathBuf,
    bases: PathBuf,
    scratch: PathBuf,
    /// Where kept members persist (`STATE/kept-trained`).
    store: PathBuf,
    /// How many trained members may be kept by name (`keep_trained`).
    max_named: usize,
    /// Kept members, with their folders.
    named: Mutex<Vec<(Named, Arc<TrainedFolder>)>>,
    /// Held while a run computes: one run at a time bounds memory.
    gate: Arc<tokio::sync::Mutex<()>>,
    pool_options: PoolOptions,
}

impl PoolTrainer {
    /// A trainer for `config`'s members under `models_dir`, keeping up to
    /// `max_named` trained members by name when modules ask.
    /// Kept members persist under `state_dir`; those kept in earlier runs
    /// are loaded (at most `max_named`, in name order; none when
    /// `max_named` is 0).
    pub fn new(
        config: PoolConfig,
        models_dir: PathBuf,
        state_dir: &std::path::Path,
        max_named: usize,
        pool_options: PoolOptions,
    ) -> Self {
        crate::merge::sweep_stale(&models_dir.join("trained"));
        let store = state_dir.join(KEPT_DIR);
        let inner = Inner {
            bases: models_dir.join("bases"),
            scratch: models_dir.join("trained"),
            store,
            config,
            models_dir,
            max_named,
            named: Mutex::new(Vec::new()),
            gate: Arc::new(tokio::sync::Mutex::new(())),
            pool_options,
        };
        let persisted = inner.load_persisted();
        if let Ok(mut named) = inner.named.lock() {
            *named = persisted;
        }
        PoolTrainer(Arc::new(inner))
    }
}

/// The folder under the state directory where kept members persist.
pub const KEPT_DIR: &str = "kept-trained";

/// The declaration inside a kept member's folder.
const KEPT_DECL: &str = "kept.toml";

/// What `kept.toml` holds: the member as the pool loads it.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptDecl {
    /// The module that kept it.
    #[serde(default)]
    owner: Option<String>,
    member: MemberConfig,
}

impl Inner {
    /// The members kept by earlier runs, loaded from [`KEPT_DIR`]. A folder
    /// that does not load is skipped with a warning (and left for the
    /// operator); leftovers of an interrupted keep (`.NAME.partial`) are
    /// removed.
    fn load_persisted(&self) -> Vec<(Named, Arc<TrainedFolder>)> {
        let mut out = Vec::new();
        if self.max_named == 0 {
            return out;
        }
        let Ok(entries) = std::fs::read_dir(&self.store) else {
            return out;
        };
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if name.starts_with('.') {
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            if out.len() >= self.max_named {
                tracing::warn!(
                    name,
                    "kept member not loaded: policy `keep_trained` allows {}",
                    self.max_named
                );
                continue;
            }
            match self.load_one(&dir) {
                Ok(named) => {
                    let folder = Arc::new(TrainedFolder::new(dir.clone()));
                    folder.persist();
                    out.push((named, folder));
                }
                Err(e) => tracing::warn!(path = %dir.display(), "kept member not loaded: {e}"),
            }
        }
        out
    }

    /// Loads one kept member's folder.
    fn load_one(&self, dir: &std::path::Path) -> Result<Named, String> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !crate::policy::is_plain_name(&name) {
            return Err(format!("`{name}` is not a member name"));
        }
        let text = std::fs::read_to_string(dir.join(KEPT_DECL)).map_err(|e| format!("{KEPT_DECL}: {e}"))?;
        let mut decl: KeptDecl = toml::from_str(&text).map_err(|e| format!("{KEPT_DECL}: {e}"))?;
        // The folder may have moved with the models directory.
        decl.member.path = dir.to_path_buf();
        let id = decl.member.id.clone();
        let loaded = Pool::load_with(
            &PoolConfig {
                members: vec![decl.member.clone()],
            },
            &self.models_dir,
            &self.pool_options,
        );
        if let Some(e) = loaded.failures.first() {
            return Err(e.to_string());
        }
        Ok(Named {
            name,
            id,
            models: loaded.pool as Arc<dyn Models>,
            owner: decl.owner,
        })
    }

    /// Makes `STATE/kept-trained/NAME` from `trained`'s folder: its files
    /// hard-linked (copied where that fails) and its declaration written
    /// into a hidden folder, then renamed into place in one step.
    fn persist(&self, name: &str, trained: &Trained, owner: &str) -> Result<PathBuf, String> {
        let io = |what: &std::path::Path, e: std::io::Error| format!("{}: {e}", what.display());
        std::fs::create_dir_all(&self.store).map_err(|e| io(&self.store, e))?;
        let target = self.store.join(name);
        if target.exists() {
            return Err(format!(
                "{} already exists: remove it to forget that member, or choose another name",
                target.display()
            ));
        }
        let partial = self.store.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
        let result = (|| {
            let src = trained.folder.path();
            for entry in std::fs::read_dir(src).map_err(|e| io(src, e))? {
                let entry = entry.map_err(|e| io(src, e))?;
                if !entry.file_type().map_err(|e| io(&entry.path(), e))?.is_file() {
                    continue;
                }
                let to = partial.join(entry.file_name());
                if std::fs::hard_link(entry.path(), &to).is_err() {
                    std::fs::copy(entry.path(), &to).map_err(|e| io(&to, e))?;
                }
            }
            // The weights' hash is taken from the copy: what loads later is
            // what was verified now.
            let sha256 = crate::files::sha256_file(&partial.join(WEIGHTS)).map_err(|e| io(&partial, e))?;
            let decl = KeptDecl {
                owner: Some(owner.to_string()),
                member: MemberConfig {
                    id: trained.member.id.clone(),
                    backend: BackendKind::Hf,
                    // Where it lies is read from the folder when it loads.
                    path: PathBuf::from(name),
                    sha256,
                    sha256_file: Some(WEIGHTS.into()),
                    card: CardConfig {
                        contributor: "trained on request, kept by a module".into(),
                        description: format!("trained member kept as `{name}`"),
                        domains: Vec::new(),
                        license: "same as the base".into(),
                        source: String::new(),
                    },
                    fetch: None,
                    remote: None,
                    quantize: None,
                },
            };
            let text = toml::to_string(&decl).map_err(|e| e.to_string())?;
            crate::files::write_atomic(
                &partial.join(KEPT_DECL),
                text.as_bytes(),
                crate::files::Durability::Durable,
            )
            .map_err(|e| io(&partial, e))?;
            std::fs::rename(&partial, &target).map_err(|e| io(&target, e))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        Ok(target)
    }

    /// The folder to train from, and how the card names it.
    fn resolve(&self, base: &TrainBase) -> Result<(PathBuf, String), TrainFailed> {
        match base {
            TrainBase::Trained(folder) => Ok((folder.path().to_path_buf(), "a member trained in this request".into())),
            TrainBase::Member(id) => {
                if let Ok(named) = self.named.lock() {
                    if let Some((_, f)) = named.iter().find(|(n, _)| &n.name == id) {
                        return Ok((f.path().to_path_buf(), id.clone()));
                    }
                }
                std::fs::create_dir_all(&self.bases)
                    .map_err(|e| TrainFailed::Host(format!("{}: {e}", self.bases.display())))?;
                super::base_folder(&self.config, &self.models_dir, &self.bases, id).map_err(|e| match e {
                    super::ContributeError::Io(m) => TrainFailed::Host(format!("member `{id}`: {m}")),
                    other => TrainFailed::Invalid(format!("member `{id}`: {other}")),
                })
            }
        }
    }

    /// Runs one training job and loads its result.
    fn build(
        &self,
        id: &str,
        base: &TrainBase,
        objective: &Objective,
        cfg: &SessionConfig,
        limits: &TrainLimits,
    ) -> Result<Trained, TrainFailed> {
        let (base_dir, base_name) = self.resolve(base)?;
        std::fs::create_dir_all(&self.scratch)
            .map_err(|e| TrainFailed::Host(format!("{}: {e}", self.scratch.display())))?;
        let out = self.scratch.join(format!("{id}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        // From here on the folder is the handle's: any early return removes it.
        let folder = Arc::new(TrainedFolder::new(out.clone()));
        let card = CardConfig {
            contributor: "trained on request".into(),
            description: format!("{base_name} after {} on {} items", objective.name(), objective.len()),
            domains: Vec::new(),
            license: "same as the base".into(),
            source: String::new(),
        };
        let spec = RunSpec {
            base_dir: &base_dir,
            base_name: &base_name,
            out: &out,
            card: card.clone(),
        };
        let outcome = session::run(&spec, objective, cfg, limits)?;
        let sha256 = crate::files::sha256_file(&out.join(WEIGHTS))
            .map_err(|e| TrainFailed::Host(format!("{}: {e}", out.display())))?;
        let member = MemberConfig {
            id: id.to_string(),
            backend: BackendKind::Hf,
            path: out.clone(),
            sha256,
            sha256_file: Some(WEIGHTS.into()),
            card,
            fetch: None,
            remote: None,
            quantize: None,
        };
        let loaded = Pool::load_with(
            &PoolConfig { members: vec![member] },
            &self.models_dir,
            &self.pool_options,
        );
        if let Some(e) = loaded.failures.first() {
            return Err(TrainFailed::Host(format!("the trained model does not load: {e}")));
        }
        let bytes = std::fs::metadata(out.join(WEIGHTS)).map(|m| m.len()).unwrap_or(0);
        crate::alloc::return_freed_memory();
        Ok(Trained {
            member: Merged {
                id: id.to_string(),
                models: loaded.pool as Arc<dyn Models>,
                bytes,
            },
            folder,
            outcome,
        })
    }
}

impl Trainer for PoolTrainer {
    fn train(
        &self,
        id: String,
        base: TrainBase,
        objective: Objective,
        params: TrainParams,
        limits: TrainLimits,
    ) -> BoxFuture<'static, Result<Trained, TrainFailed>> {
        let inner = self.0.clone();
        Box::pin(async move {
            session::check_objective(&objective).map_err(TrainFailed::Invalid)?;
            let cfg = SessionConfig::new(&params, &objective).map_err(TrainFailed::Invalid)?;
            // The gate travels into the blocking job: a request that gives
            // up while its run computes does not let the next run start
            // until this one has noticed (between steps) and returned.
            let gate = inner.gate.clone().lock_owned().await;
            let job = inner.clone();
            tokio::task::spawn_blocking(move || {
                let _gate = gate;
                job.build(&id, &base, &objective, &cfg, &limits)
            })
            .await
            .map_err(|e| TrainFailed::Host(format!("the training task failed: {e}")))?
        })
    }

    fn keep(&self, name: &str, trained: &Trained, owner: &str) -> Result<(), KeepRefused> {
        let mut named = self
            .0
            .named
            .lock()
            .map_err(|_| KeepRefused::Invalid("the kept members' list is poisoned".into()))?;
        KeepRefused::check("trained", "keep_trained", self.0.max_named, name, &named)?;
        // The request keeps its own folder (removed when it ends); the kept
        // member's is its persisted copy, which a later run trains from.
        let path = self
            .0
            .persist(name, trained, owner)
            .map_err(|e| KeepRefused::Host(format!("the trained member could not be kept: {e}")))?;
        let folder = Arc::new(TrainedFolder::new(path));
        folder.persist();
        named.push((
            Named {
                name: name.to_string(),
                id: trained.member.id.clone(),
                models: trained.member.models.clone(),
                owner: Some(owner.to_string()),
            },
            folder,
        ));
        tracing::info!(name, id = %trained.member.id, "trained member kept by name");
        Ok(())
    }

    fn kept(&self) -> Vec<Named> {
        self.0
            .named
            .lock()
            .map(|n| n.iter().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default()
    }
}

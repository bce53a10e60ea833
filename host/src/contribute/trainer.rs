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
    pub fn new(config: PoolConfig, models_dir: PathBuf, max_named: usize, pool_options: PoolOptions) -> Self {
        crate::merge::sweep_stale(&models_dir.join("trained"));
        PoolTrainer(Arc::new(Inner {
            bases: models_dir.join("bases"),
            scratch: models_dir.join("trained"),
            config,
            models_dir,
            max_named,
            named: Mutex::new(Vec::new()),
            gate: Arc::new(tokio::sync::Mutex::new(())),
            pool_options,
        }))
    }
}

impl Inner {
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

    fn keep(&self, name: &str, trained: &Trained) -> Result<(), KeepRefused> {
        let mut named = self
            .0
            .named
            .lock()
            .map_err(|_| KeepRefused::Invalid("the kept members' list is poisoned".into()))?;
        KeepRefused::check("trained", "keep_trained", self.0.max_named, name, &named)?;
        // The request's handle and the kept one share the folder, so it
        // lives while either does; a kept member can be trained further.
        named.push((
            Named {
                name: name.to_string(),
                id: trained.member.id.clone(),
                models: trained.member.models.clone(),
            },
            trained.folder.clone(),
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

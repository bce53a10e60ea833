//! Merged members for modules: the host side of the `weights` import.
//!
//! A module asks for a merge recipe; the host merges the members' weights
//! (with [`super::merge`]), loads the result as a one-member pool on its own
//! worker thread, and lets the module call it by id for the rest of the
//! request through an [`super::Overlay`] of the pool. The capability sits behind
//! the [`Merger`] trait so that the sandbox does not care where weights come
//! from (and tests can swap it).
//!
//! Memory is bounded: merges run one at a time, and at most `keep` merged
//! members stay loaded (least recently used first out), shared by every
//! request that asks for the same recipe; a member evicted while a request
//! still uses it lives until that request ends. With SmolLM2-135M a merged
//! member holds about 540 MB (f32).
//!
//! Where the operator allows it (policy `keep_merged`, a count), a module
//! may keep a merged member beyond its request under a name
//! ([`Merger::keep`]); kept members join the pool every later request sees
//! (through [`super::Overlay::with_kept`]) and stay loaded until the process ends,
//! so the count bounds their memory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{merge_until, KeepRefused, MergeError, MergeFailed, MergeSpec, Merged, Merger, Named};
use crate::inference::Models;
use crate::model_folder::WEIGHTS;
use crate::pool::{BackendKind, CardConfig, MemberConfig, Pool, PoolConfig};

struct Kept {
    key: String,
    id: String,
    pool: Arc<Pool>,
    bytes: u64,
    /// The merged folder, held while the recipe is kept loaded so that
    /// [`Merger::keep`] can move it under a name (kept members can then be
    /// merged in turn); removed when the recipe is evicted.
    dir: Option<PathBuf>,
}

/// The [`Merger`] over a declared pool: members are resolved to weight
/// folders as `tessera merge` does (GGUF members dequantized once into
/// `bases`), merged into `scratch`, loaded, and the folder removed.
#[derive(Clone)]
pub struct PoolMerger(Arc<Inner>);

struct Inner {
    config: PoolConfig,
    models_dir: PathBuf,
    bases: PathBuf,
    scratch: PathBuf,
    keep: usize,
    kept: Mutex<VecDeque<Kept>>,
    /// How many members may be kept by name (the operator's `keep_merged`).
    max_named: usize,
    /// Kept members and their folders.
    named: Mutex<Vec<(Named, PathBuf)>>,
    /// Held while merging: one merge at a time bounds memory.
    gate: Mutex<()>,
    /// Waited for before a merge's blocking task starts, and held by it
    /// until it ends. A request that is dropped while it waits here (its
    /// deadline passed, its client left) leaves the queue; one waiting on
    /// `gate` inside a blocking task would merge for nobody later, so
    /// requests that end early could pile up merges that outlive them.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Merges given up between tensors because their request ended.
    cancelled: AtomicUsize,
    /// Where merges compute, and how merged members load.
    compute: super::compute::Choice,
    pool_options: crate::pool::PoolOptions,
}

/// Raises its flag when dropped: held by a merge's future, so that the
/// blocking merge learns that nobody waits for it any more.
struct RaiseOnDrop(Arc<AtomicBool>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl PoolMerger {
    /// How many merges stopped between tensors because the request that
    /// asked for them ended first (its deadline, its client gone).
    pub fn merges_cancelled(&self) -> usize {
        self.0.cancelled.load(Ordering::Relaxed)
    }

    /// A merger for `config`'s members under `models_dir`; keeps up to
    /// `keep` merged members loaded for reuse, and up to `max_named` kept
    /// by name when modules ask ([`Merger::keep`]).
    pub fn new(config: PoolConfig, models_dir: PathBuf, keep: usize, max_named: usize) -> Self {
        // Folders a crashed process left behind (`NAME.PID` of a PID that
        // is gone) hold hundreds of MB each and nothing else removes them.
        for dir in [models_dir.join("merged"), models_dir.join("kept")] {
            sweep_stale(&dir);
        }
        PoolMerger(Arc::new(Inner {
            bases: models_dir.join("bases"),
            scratch: models_dir.join("merged"),
            config,
            models_dir,
            keep: keep.max(1),
            kept: Mutex::new(VecDeque::new()),
            max_named,
            named: Mutex::new(Vec::new()),
            gate: Mutex::new(()),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            cancelled: AtomicUsize::new(0),
            compute: super::compute::Choice::Auto,
            pool_options: crate::pool::PoolOptions::default(),
        }))
    }

    /// Merges compute on `compute` and merged members load as `pool`
    /// says (call before sharing the merger).
    pub fn on(mut self, compute: super::compute::Choice, pool: crate::pool::PoolOptions) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.compute = compute;
            inner.pool_options = pool;
        }
        self
    }
}

impl Inner {
    fn lookup(&self, key: &str) -> Option<(String, Arc<Pool>, u64)> {
        let mut kept = self.kept.lock().ok()?;
        let i = kept.iter().position(|k| k.key == key)?;
        let k = kept.remove(i)?;
        let out = (k.id.clone(), k.pool.clone(), k.bytes);
        kept.push_front(k);
        Some(out)
    }

    fn build(
        &self,
        key: String,
        id: String,
        models: Vec<String>,
        base: Option<String>,
        spec: MergeSpec,
        stop: &dyn Fn() -> bool,
    ) -> Result<(Arc<Pool>, u64), MergeFailed> {
        let host = |what: &Path, e: std::io::Error| MergeFailed::Host(format!("{}: {e}", what.display()));
        let _gate = self
            .gate
            .lock()
            .map_err(|_| MergeFailed::Host("a previous merge panicked".to_string()))?;
        if let Some((_, pool, bytes)) = self.lookup(&key) {
            return Ok((pool, bytes));
        }
        std::fs::create_dir_all(&self.bases).map_err(|e| host(&self.bases, e))?;
        std::fs::create_dir_all(&self.scratch).map_err(|e| host(&self.scratch, e))?;
        let named: Vec<(String, PathBuf)> = self
            .named
            .lock()
            .map(|n| n.iter().map(|(k, d)| (k.name.clone(), d.clone())).collect())
            .unwrap_or_default();
        let resolve = |m: &str| {
            if let Some((_, dir)) = named.iter().find(|(n, _)| n == m) {
                return Ok(dir.clone());
            }
            crate::contribute::base_folder(&self.config, &self.models_dir, &self.bases, m)
                .map(|(dir, _)| dir)
                .map_err(|e| match e {
                    crate::contribute::ContributeError::Io(message) => {
                        MergeFailed::Host(format!("member `{m}`: {message}"))
                    }
                    other => MergeFailed::Invalid(format!("member `{m}`: {other}")),
                })
        };
        let dirs = models.iter().map(|m| resolve(m)).collect::<Result<Vec<_>, _>>()?;
        let base_dir = base.as_deref().map(resolve).transpose()?;
        let mut names = models.clone();
        names.extend(base.clone());
        let card = CardConfig {
            contributor: "merged on request".into(),
            description: format!("{} merge of {}", spec.method.name(), models.join(", ")),
            domains: Vec::new(),
            license: "same as the merged members".into(),
            source: String::new(),
        };
        let out = self.scratch.join(format!("{id}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let result = (|| {
            let compute = super::compute::shared(self.compute).map_err(|e| MergeFailed::Host(e.to_string()))?;
            let report = merge_until(
                compute.as_ref(),
                &dirs,
                base_dir.as_deref(),
                &names,
                &spec,
                card.clone(),
                &out,
                stop,
            )
            .map_err(|e| match e {
                MergeError::Io(_) => MergeFailed::Host(e.to_string()),
                MergeError::Cancelled => {
                    self.cancelled.fetch_add(1, Ordering::Relaxed);
                    MergeFailed::Host(e.to_string())
                }
                _ => MergeFailed::Invalid(e.to_string()),
            })?;
            let member = MemberConfig {
                id: id.clone(),
                backend: BackendKind::Hf,
                path: out.clone(),
                sha256: report.sha256,
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
            match loaded.failures.first() {
                Some(e) => Err(MergeFailed::Host(format!("the merged model does not load: {e}"))),
                None => Ok(loaded.pool),
            }
        })();
        // The weights are in memory now; the folder stays while the recipe
        // is kept (for `keep`), and the merge's working buffers go back.
        crate::alloc::return_freed_memory();
        let pool = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&out);
                return Err(e);
            }
        };
        // The merged weights are loaded as written (f32), so the file's size
        // is their size in memory.
        let bytes = std::fs::metadata(out.join(WEIGHTS)).map(|m| m.len()).unwrap_or(0);
        if let Ok(mut kept) = self.kept.lock() {
            kept.push_front(Kept {
                key,
                id,
                pool: pool.clone(),
                bytes,
                dir: Some(out),
            });
            let held = self.keep.min(kept.len());
            for gone in kept.drain(held..) {
                if let Some(d) = gone.dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&out);
        }
        Ok((pool, bytes))
    }
}

impl Drop for Inner {
    /// Kept and held merge folders live as long as the process's merger.
    fn drop(&mut self) {
        if let Ok(kept) = self.kept.get_mut() {
            for k in kept.drain(..) {
                if let Some(d) = k.dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
        if let Ok(named) = self.named.get_mut() {
            for (_, d) in named.drain(..) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// Removes the `NAME.PID` folders under `dir` whose process is no longer
/// running. Returns how many it removed.
pub fn sweep_stale(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let pid = path
            .extension()
            .and_then(|x| x.to_str())
            .and_then(|x| x.split('.').next())
            .and_then(|x| x.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let alive = pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed a merge folder a stopped process left behind");
            removed += 1;
        }
    }
    removed
}

/// The id of a recipe: the same recipe always gets the same id.
fn recipe_id(key: &str) -> String {
    let h = hex::encode(Sha256::digest(key.as_bytes()));
    format!("merged-{}", &h[..12])
}

impl Merger for PoolMerger {
    fn merge(
        &self,
        models: Vec<String>,
        base: Option<String>,
        spec: MergeSpec,
    ) -> BoxFuture<'static, Result<Merged, MergeFailed>> {
        let key = serde_json::to_string(&(&models, &base, &spec)).unwrap_or_default();
        let id = recipe_id(&key);
        if let Some((id, pool, bytes)) = self.0.lookup(&key) {
            let models = pool as Arc<dyn Models>;
            return Box::pin(async move { Ok(Merged { id, models, bytes }) });
        }
        let inner = self.0.clone();
        Box::pin(async move {
            // Dropping this future (the request ended) raises the flag,
            // which the blocking merge reads between tensors.
            let abandoned = Arc::new(AtomicBool::new(false));
            let _raise = RaiseOnDrop(abandoned.clone());
            let turn = inner.turn.clone().lock_owned().await;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                let stop = || abandoned.load(Ordering::Relaxed);
                inner
                    .build(key, id.clone(), models, base, spec, &stop)
                    .map(|(p, bytes)| Merged {
                        id,
                        models: p as Arc<dyn Models>,
                        bytes,
                    })
            })
            .await
            .map_err(|e| MergeFailed::Host(format!("the merge task failed: {e}")))?
        })
    }

    fn keep(&self, name: &str, id: &str, served: Arc<dyn Models>) -> Result<(), KeepRefused> {
        let mut named = self
            .0
            .named
            .lock()
            .map_err(|_| KeepRefused::Invalid("the kept members' list is poisoned".into()))?;
        KeepRefused::check("merged", "keep_merged", self.0.max_named, name, &named)?;
        // The folder moves under the name, so the kept member can be an
        // ingredient of later merges.
        let held = self
            .0
            .kept
            .lock()
            .ok()
            .and_then(|mut k| k.iter_mut().find(|k| k.id == id).and_then(|k| k.dir.take()));
        let Some(held) = held else {
            return Err(KeepRefused::Invalid(format!(
                "`{id}` is no longer held by the merger (evicted or already kept): merge it again, then keep it"
            )));
        };
        let dir = self
            .0
            .models_dir
            .join("kept")
            .join(format!("{name}.{}", std::process::id()));
        let moved = dir
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::rename(&held, &dir));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir_all(&held);
            return Err(KeepRefused::Invalid(format!(
                "cannot keep `{name}`: {}: {e}",
                dir.display()
            )));
        }
        named.push((
            Named {
                name: name.to_string(),
                id: id.to_string(),
                models: served,
                owner: None,
            },
            dir,
        ));
        tracing::info!(name, id, "merged member kept by name");
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

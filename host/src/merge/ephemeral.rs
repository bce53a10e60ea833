//! Merged members for modules: the host side of the `weights` import.
//!
//! A module asks for a merge recipe; the host merges the members' weights
//! (with [`super::merge`]), loads the result as a one-member pool on its own
//! worker thread, and lets the module call it by id for the rest of the
//! request through an [`Overlay`] of the pool. The capability sits behind
//! the [`Merger`] trait so that the sandbox does not care where weights come
//! from (and tests can swap it).
//!
//! Memory is bounded: merges run one at a time, and at most `keep` merged
//! members stay loaded (least recently used first out), shared by every
//! request that asks for the same recipe; a member evicted while a request
//! still uses it lives until that request ends. With SmolLM2-135M a merged
//! member holds about 540 MB (f32).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{merge, MergeSpec};
use crate::contribute::output::WEIGHTS;
use crate::inference::{
    CallCtx, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink, TokenLogprob,
};
use crate::pool::{BackendKind, CardConfig, MemberConfig, Pool, PoolConfig};

/// A merged member's id and the [`Models`] that serve it.
pub type Merged = (String, Arc<dyn Models>);

/// Creates merged members on demand.
pub trait Merger: Send + Sync + 'static {
    /// Merges `models` (over `base`) per `spec`; returns the new member's id
    /// and a [`Models`] that serves it. The error says what is wrong, for
    /// the module.
    fn merge(
        &self,
        models: Vec<String>,
        base: Option<String>,
        spec: MergeSpec,
    ) -> BoxFuture<'static, Result<Merged, String>>;
}

struct Kept {
    key: String,
    id: String,
    pool: Arc<Pool>,
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
    /// Held while merging: one merge at a time bounds memory.
    gate: Mutex<()>,
}

impl PoolMerger {
    /// A merger for `config`'s members under `models_dir`; keeps up to
    /// `keep` merged members loaded.
    pub fn new(config: PoolConfig, models_dir: PathBuf, keep: usize) -> Self {
        PoolMerger(Arc::new(Inner {
            bases: models_dir.join("bases"),
            scratch: models_dir.join("merged"),
            config,
            models_dir,
            keep: keep.max(1),
            kept: Mutex::new(VecDeque::new()),
            gate: Mutex::new(()),
        }))
    }
}

impl Inner {
    fn lookup(&self, key: &str) -> Option<(String, Arc<Pool>)> {
        let mut kept = self.kept.lock().ok()?;
        let i = kept.iter().position(|k| k.key == key)?;
        let k = kept.remove(i)?;
        let out = (k.id.clone(), k.pool.clone());
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
    ) -> Result<Arc<Pool>, String> {
        let _gate = self.gate.lock().map_err(|_| "a previous merge panicked".to_string())?;
        if let Some((_, pool)) = self.lookup(&key) {
            return Ok(pool);
        }
        std::fs::create_dir_all(&self.bases).map_err(|e| format!("{}: {e}", self.bases.display()))?;
        std::fs::create_dir_all(&self.scratch).map_err(|e| format!("{}: {e}", self.scratch.display()))?;
        let resolve = |m: &str| {
            crate::contribute::base_folder(&self.config, &self.models_dir, &self.bases, m)
                .map(|(dir, _)| dir)
                .map_err(|e| format!("member `{m}`: {e}"))
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
            let report =
                merge(&dirs, base_dir.as_deref(), &names, &spec, card.clone(), &out).map_err(|e| e.to_string())?;
            let member = MemberConfig {
                id: id.clone(),
                backend: BackendKind::Hf,
                path: out.clone(),
                sha256: report.sha256,
                sha256_file: Some(WEIGHTS.into()),
                card,
                fetch: None,
                remote: None,
            };
            let loaded = Pool::load(&PoolConfig { members: vec![member] }, &self.models_dir);
            match loaded.failures.first() {
                Some(e) => Err(format!("the merged model does not load: {e}")),
                None => Ok(loaded.pool),
            }
        })();
        // The weights are in memory now (or the merge failed): the folder
        // is not needed either way, nor the merge's working buffers.
        let _ = std::fs::remove_dir_all(&out);
        crate::alloc::return_freed_memory();
        let pool = result?;
        if let Ok(mut kept) = self.kept.lock() {
            kept.push_front(Kept {
                key,
                id,
                pool: pool.clone(),
            });
            kept.truncate(self.keep);
        }
        Ok(pool)
    }
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
    ) -> BoxFuture<'static, Result<Merged, String>> {
        let key = serde_json::to_string(&(&models, &base, &spec)).unwrap_or_default();
        let id = recipe_id(&key);
        if let Some((id, pool)) = self.0.lookup(&key) {
            return Box::pin(async move { Ok((id, pool as Arc<dyn Models>)) });
        }
        let inner = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                inner
                    .build(key, id.clone(), models, base, spec)
                    .map(|p| (id, p as Arc<dyn Models>))
            })
            .await
            .map_err(|e| format!("the merge task failed: {e}"))?
        })
    }
}

/// The pool as one request sees it after merging: the pool's members plus
/// the request's merged members, each call routed by member id.
pub struct Overlay {
    base: Arc<dyn Models>,
    extra: Vec<(String, Arc<dyn Models>)>,
}

impl Overlay {
    /// `base` with the merged members `extra` (id, serving models).
    pub fn new(base: Arc<dyn Models>, extra: Vec<(String, Arc<dyn Models>)>) -> Self {
        Self { base, extra }
    }

    fn route(&self, id: &str) -> &Arc<dyn Models> {
        self.extra
            .iter()
            .find(|(x, _)| x == id)
            .map(|(_, m)| m)
            .unwrap_or(&self.base)
    }
}

impl Models for Overlay {
    fn cards(&self) -> Vec<ModelCard> {
        let mut cards = self.base.cards();
        for (id, m) in &self.extra {
            cards.extend(m.cards().into_iter().filter(|c| &c.id == id));
        }
        cards
    }

    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        self.route(model).generate(ctx, model, input, params)
    }

    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        self.route(model).generate_stream(ctx, model, input, params, sink)
    }

    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        self.route(model).score(ctx, model, prompt, continuations)
    }

    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        self.route(model).next_token(ctx, model, prompt, top_k)
    }

    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, InferenceError>> {
        self.route(model).embed(ctx, model, texts)
    }
}

//! The `weights` capability as the sandbox sees it: merging members into a
//! new one for the rest of a request, and keeping one beyond it.
//!
//! Like [`super::Models`], this is vocabulary and a trait only; the
//! isolation layer depends on it and on nothing that merges. The merging
//! itself ([`crate::merge`]: reading weights, the methods, loading the
//! result on a worker) implements [`Merger`] elsewhere, so the sandbox does
//! not compile against training, the registry or model files, and tests can
//! bring a merger of their own.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{
    CallCtx, Embedded, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink, TokenLogprob,
};

/// A merge method and its own parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// Weighted average of the models (a "soup"); no base.
    Linear,
    /// `base + sum w_i (model_i - base)`.
    TaskArithmetic,
    /// TIES: trim each delta to `density`, elect signs, disjoint mean.
    Ties {
        /// Share of each delta kept, by magnitude, in (0, 1].
        density: f64,
    },
    /// DARE: drop delta entries with probability `1 - density`, rescale,
    /// then task arithmetic.
    Dare {
        /// Keep probability, in (0, 1].
        density: f64,
    },
    /// DARE's drop, then TIES's sign election.
    DareTies {
        /// Keep probability, in (0, 1].
        density: f64,
    },
    /// Spherical interpolation between exactly two models.
    Slerp {
        /// 0 = the first model, 1 = the second.
        t: f64,
    },
    /// ExPO: `model + alpha (model - base)`, one model, the base being the
    /// weaker model to move away from.
    Expo {
        /// Extrapolation strength (> 0).
        alpha: f64,
    },
}

impl Method {
    /// Whether the method needs a base model (task vectors or a source).
    pub fn needs_base(&self) -> bool {
        !matches!(self, Method::Linear | Method::Slerp { .. })
    }

    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties { .. } => "ties",
            Method::Dare { .. } => "dare",
            Method::DareTies { .. } => "dare_ties",
            Method::Slerp { .. } => "slerp",
            Method::Expo { .. } => "expo",
        }
    }
}

/// What to merge and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeSpec {
    /// The method.
    #[serde(flatten)]
    pub method: Method,
    /// One weight per model (default: 1 each; linear divides by the sum).
    pub weights: Option<Vec<f64>>,
    /// Scale of the merged delta for the task-vector methods.
    pub lambda: f64,
    /// Seed of DARE's drops.
    pub seed: u64,
}

impl MergeSpec {
    /// `method` with default weights, lambda 1, seed 0.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            weights: None,
            lambda: 1.0,
            seed: 0,
        }
    }
}

/// A merged member: its id, the [`Models`] that serve it, and the memory
/// its weights take (what a request's `merge_memory_mib` counts).
#[derive(Clone)]
pub struct Merged {
    /// The id `models` calls serve it under.
    pub id: String,
    /// What serves it.
    pub models: Arc<dyn Models>,
    /// Bytes of its weights in memory.
    pub bytes: u64,
}

/// A merged member kept beyond its request under a name.
#[derive(Clone)]
pub struct Named {
    /// The name later requests call it by.
    pub name: String,
    /// The id it was merged as (what `models` serves it under).
    pub id: String,
    /// What serves it.
    pub models: Arc<dyn Models>,
    /// The module that kept it, for trained members: a sub-pool that
    /// module runs on still includes it (it is the module's own artifact,
    /// not another contribution). `None` for merged members.
    pub owner: Option<String>,
}

/// Why [`Merger::keep`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepRefused {
    /// The operator does not allow kept members (module gets `unsupported`).
    NotAllowed(String),
    /// The name or the count is wrong (module gets `invalid-params`).
    Invalid(String),
    /// The host could not keep it (a disk): the module gets
    /// `inference-failed`, the operator has to act.
    Host(String),
}

impl KeepRefused {
    /// Whether one more member may be kept as `name`, next to `kept`, when
    /// the operator allows `max` (`policy_key` is the policy setting, `what`
    /// the kind of member): the checks merged and trained members share.
    pub fn check<T>(
        what: &str,
        policy_key: &str,
        max: usize,
        name: &str,
        kept: &[(Named, T)],
    ) -> Result<(), KeepRefused> {
        if max == 0 {
            return Err(KeepRefused::NotAllowed(format!(
                "the operator does not let modules keep {what} members (policy `{policy_key}` is 0)"
            )));
        }
        if !crate::policy::is_plain_name(name) {
            return Err(KeepRefused::Invalid(format!(
                "`{name}` cannot name a member: use 1-64 lowercase letters, digits, `-`, `_` or `.`, not starting with `.`"
            )));
        }
        if kept.iter().any(|(n, _)| n.name == name) {
            return Err(KeepRefused::Invalid(format!(
                "`{name}` is already a kept member: choose another name"
            )));
        }
        if kept.len() >= max {
            let names: Vec<&str> = kept.iter().map(|(n, _)| n.name.as_str()).collect();
            return Err(KeepRefused::Invalid(format!(
                "the operator allows {max} kept {what} member(s) and {} are kept ({})",
                kept.len(),
                names.join(", ")
            )));
        }
        Ok(())
    }
}

/// Why a merge was not made, split by whose fault it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeFailed {
    /// What was asked cannot be merged: an unknown or incompatible member,
    /// a spec that does not fit the method. The module's to fix (it gets
    /// `invalid-params`).
    #[error("{0}")]
    Invalid(String),
    /// The host failed while merging: a disk, a device, a worker that
    /// stopped. The module gets `inference-failed`; the operator has to act.
    #[error("{0}")]
    Host(String),
}

/// Creates merged members on demand.
pub trait Merger: Send + Sync + 'static {
    /// Merges `models` (over `base`) per `spec`; returns the new member's id
    /// and a [`Models`] that serves it. The error says what is wrong and
    /// whose fault it is.
    fn merge(
        &self,
        models: Vec<String>,
        base: Option<String>,
        spec: MergeSpec,
    ) -> BoxFuture<'static, Result<Merged, MergeFailed>>;

    /// Keeps merged member `id` (served by `served`) beyond the request as
    /// `name`. The caller has checked that `name` is not a pool member.
    /// The default refuses: a merger keeps nothing unless it says so.
    fn keep(&self, name: &str, id: &str, served: Arc<dyn Models>) -> Result<(), KeepRefused> {
        let _ = (name, id, served);
        Err(KeepRefused::NotAllowed("this host does not keep merged members".into()))
    }

    /// The members kept so far, oldest first.
    fn kept(&self) -> Vec<Named> {
        Vec::new()
    }
}

/// The pool as one request sees it after merging: the pool's members plus
/// the request's merged members, each call routed by member id.
pub struct Overlay {
    base: Arc<dyn Models>,
    /// Shown id, the id the serving models know it by, the serving models.
    extra: Vec<(String, String, Arc<dyn Models>)>,
}

impl Overlay {
    /// `base` with the merged members `extra` (id, serving models).
    pub fn new(base: Arc<dyn Models>, extra: Vec<(String, Arc<dyn Models>)>) -> Self {
        let extra = extra.into_iter().map(|(id, m)| (id.clone(), id, m)).collect();
        Self { base, extra }
    }

    /// `base` with the members kept by name, each answering to its name.
    pub fn with_kept(base: Arc<dyn Models>, kept: Vec<Named>) -> Self {
        let extra = kept.into_iter().map(|n| (n.name, n.id, n.models)).collect();
        Self { base, extra }
    }

    /// The models serving `id`, and the id they know it by.
    fn route<'a>(&'a self, id: &'a str) -> (&'a Arc<dyn Models>, &'a str) {
        self.extra
            .iter()
            .find(|(x, _, _)| x == id)
            .map(|(_, inner, m)| (m, inner.as_str()))
            .unwrap_or((&self.base, id))
    }
}

impl Models for Overlay {
    fn prefix_stats(&self) -> Vec<(String, crate::backends::gguf::prefix::PrefixSnapshot)> {
        self.base.prefix_stats()
    }

    fn cards(&self) -> Vec<ModelCard> {
        let mut cards = self.base.cards();
        for (shown, inner, m) in &self.extra {
            cards.extend(m.cards().into_iter().filter(|c| &c.id == inner).map(|mut c| {
                c.id = shown.clone();
                c
            }));
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
        let (m, id) = self.route(model);
        m.generate(ctx, id, input, params)
    }

    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let (m, id) = self.route(model);
        m.generate_stream(ctx, id, input, params, sink)
    }

    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        let (m, id) = self.route(model);
        m.score(ctx, id, prompt, continuations)
    }

    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        let (m, id) = self.route(model);
        m.next_token(ctx, id, prompt, top_k)
    }

    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        let (m, id) = self.route(model);
        m.embed(ctx, id, texts)
    }
}

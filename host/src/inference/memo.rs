//! Remembering `score` results across requests (and, with a
//! [`ScoreStore`], across runs).
//!
//! Scoring is a pure function of (member, prompt, continuations): no
//! sampling, no seed. An evaluation asks the same question many times over:
//! each member alone, then every strategy that consults the members, then
//! every sub-pool of a scaling run. [`ScoreMemo`] sits in front of the pool
//! and answers a repeated `score` from memory, so a likelihood-based
//! strategy evaluated after the members costs almost nothing. Generation is
//! passed through untouched: its result depends on sampling parameters and
//! seeds that strategies vary on purpose, and its cost is dominated by
//! decoding, which a cache of finished texts (the harness's own SQLite
//! cache) already covers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{
    CallCtx, Embedded, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink, TokenLogprob,
};

type Key = [u8; 32];

/// Somewhere remembered scores outlive the process: the evaluation's result
/// cache implements it, so a resumed run reuses the scores an interrupted
/// one computed. Consulted after a miss in memory, written after every
/// score computed. A store decides which members it keeps (one whose
/// weights nothing pins should not be kept: its scores may change under
/// the same id).
pub trait ScoreStore: Send + Sync {
    /// The scores stored for `model` under `key` (hex sha256 of the call).
    fn load(&self, model: &str, key: &str) -> Option<Vec<Scored>>;
    /// Stores `scores`; a failure to write is the store's to log, never the
    /// caller's to handle (the scores were computed and are returned).
    fn save(&self, model: &str, key: &str, scores: &[Scored]);
}

/// A [`Models`] that remembers the last `capacity` successful `score`
/// results of the members below it (oldest forgotten first). Failures are
/// never remembered, so a call that timed out is tried again.
pub struct ScoreMemo {
    inner: Arc<dyn Models>,
    capacity: usize,
    // Shared with the futures of calls in flight, which store their result.
    entries: Arc<Mutex<Entries>>,
    store: Option<Arc<dyn ScoreStore>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Vec<Scored>>,
    order: VecDeque<Key>,
}

impl ScoreMemo {
    /// Wraps `inner`, remembering up to `capacity` score results (about a
    /// hundred bytes each plus the continuations' count of numbers).
    pub fn new(inner: Arc<dyn Models>, capacity: usize) -> Self {
        ScoreMemo {
            inner,
            capacity,
            entries: Arc::new(Mutex::new(Entries::default())),
            store: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Also keeps every computed score in `store`, and looks there before
    /// asking the members.
    pub fn with_store(mut self, store: Arc<dyn ScoreStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// (answered from memory or the store, passed to the members) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn key(model: &str, prompt: &Input, continuations: &[String]) -> Key {
        let mut h = Sha256::new();
        // Lengths first, so no two different calls concatenate alike.
        h.update((model.len() as u64).to_le_bytes());
        h.update(model.as_bytes());
        let p = serde_json::to_vec(prompt).unwrap_or_default();
        h.update((p.len() as u64).to_le_bytes());
        h.update(&p);
        for c in continuations {
            h.update((c.len() as u64).to_le_bytes());
            h.update(c.as_bytes());
        }
        h.finalize().into()
    }

    fn lookup(&self, key: &Key) -> Option<Vec<Scored>> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.map.get(key).cloned()
    }
}

fn remember(entries: &Mutex<Entries>, capacity: usize, key: Key, value: Vec<Scored>) {
    if capacity == 0 {
        return;
    }
    let mut e = entries.lock().unwrap_or_else(|p| p.into_inner());
    if e.map.insert(key, value).is_none() {
        e.order.push_back(key);
    }
    while e.order.len() > capacity {
        if let Some(old) = e.order.pop_front() {
            e.map.remove(&old);
        }
    }
}

impl Models for ScoreMemo {
    fn cards(&self) -> Vec<ModelCard> {
        self.inner.cards()
    }

    fn prefix_stats(&self) -> Vec<(String, crate::backends::gguf::prefix::PrefixSnapshot)> {
        self.inner.prefix_stats()
    }

    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        self.inner.generate(ctx, model, input, params)
    }

    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        self.inner.generate_stream(ctx, model, input, params, sink)
    }

    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        let key = Self::key(model, &prompt, &continuations);
        if let Some(hit) = self.lookup(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async move { Ok(hit) });
        }
        let hex = hex::encode(key);
        if let Some(hit) = self.store.as_ref().and_then(|s| s.load(model, &hex)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            remember(&self.entries, self.capacity, key, hit.clone());
            return Box::pin(async move { Ok(hit) });
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let call = self.inner.score(ctx, model, prompt, continuations);
        let capacity = self.capacity;
        let entries = self.entries.clone();
        let store = self.store.clone();
        let model = model.to_string();
        Box::pin(async move {
            let out = call.await?;
            remember(&entries, capacity, key, out.clone());
            if let Some(s) = store {
                s.save(&model, &hex, &out);
            }
            Ok(out)
        })
    }

    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        self.inner.next_token(ctx, model, prompt, top_k)
    }

    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        self.inner.embed(ctx, model, texts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Scores every continuation by its length and counts the calls; fails
    /// for member `broken`.
    struct Counting(AtomicU64);

    impl Models for Counting {
        fn cards(&self) -> Vec<ModelCard> {
            Vec::new()
        }
        fn generate(
            &self,
            _: CallCtx,
            _: &str,
            _: Input,
            _: GenParams,
        ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
            Box::pin(async { Err(InferenceError::Unsupported("generate".into())) })
        }
        fn score(
            &self,
            _: CallCtx,
            model: &str,
            _: Input,
            continuations: Vec<String>,
        ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            let broken = model == "broken";
            Box::pin(async move {
                if broken {
                    return Err(InferenceError::Failed("down".into()));
                }
                Ok(continuations
                    .iter()
                    .map(|c| Scored {
                        logprob: -(c.len() as f64),
                        tokens: 1,
                        cached_tokens: 0,
                    })
                    .collect())
            })
        }
        fn next_token(
            &self,
            _: CallCtx,
            _: &str,
            _: Input,
            _: u32,
        ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn embed(&self, _: CallCtx, _: &str, _: Vec<String>) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
            Box::pin(async { Ok(Embedded::default()) })
        }
    }

    fn ctx() -> CallCtx {
        CallCtx {
            deadline: Instant::now() + Duration::from_secs(5),
            requester: 0,
        }
    }

    /// A store in a map, counting what it is asked.
    #[derive(Default)]
    struct MapStore(Mutex<HashMap<String, Vec<Scored>>>);

    impl ScoreStore for MapStore {
        fn load(&self, model: &str, key: &str) -> Option<Vec<Scored>> {
            self.0.lock().unwrap().get(&format!("{model}/{key}")).cloned()
        }
        fn save(&self, model: &str, key: &str, scores: &[Scored]) {
            self.0.lock().unwrap().insert(format!("{model}/{key}"), scores.to_vec());
        }
    }

    #[tokio::test]
    async fn a_store_outlives_the_memo_that_filled_it() {
        let inner = Arc::new(Counting(AtomicU64::new(0)));
        let store = Arc::new(MapStore::default());
        let p = || Input::Prompt("Q?".into());
        let c = || vec![" yes".to_string(), " no".to_string()];
        let first = ScoreMemo::new(inner.clone(), 10).with_store(store.clone());
        let a = first.score(ctx(), "m", p(), c()).await.unwrap();
        assert!(first.score(ctx(), "broken", p(), c()).await.is_err());
        assert_eq!(store.0.lock().unwrap().len(), 1, "failures are not stored");
        // A new memo (a new process) over the same store asks no member.
        let second = ScoreMemo::new(inner.clone(), 10).with_store(store.clone());
        let b = second.score(ctx(), "m", p(), c()).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(inner.0.load(Ordering::Relaxed), 2);
        assert_eq!(second.counts(), (1, 0));
        // ... and remembers what it read, without asking the store again.
        store.0.lock().unwrap().clear();
        second.score(ctx(), "m", p(), c()).await.unwrap();
        assert_eq!(inner.0.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn repeats_are_answered_from_memory_and_failures_are_not_kept() {
        let inner = Arc::new(Counting(AtomicU64::new(0)));
        let memo = ScoreMemo::new(inner.clone(), 2);
        let p = || Input::Prompt("Q?".into());
        let c = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let a = memo.score(ctx(), "m", p(), c(&[" yes", " no"])).await.unwrap();
        let b = memo.score(ctx(), "m", p(), c(&[" yes", " no"])).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(inner.0.load(Ordering::Relaxed), 1);
        // Another member, prompt or continuation list is another call.
        memo.score(ctx(), "n", p(), c(&[" yes", " no"])).await.unwrap();
        memo.score(ctx(), "m", p(), c(&[" yes no"])).await.unwrap();
        assert_eq!(inner.0.load(Ordering::Relaxed), 3);
        assert_eq!(memo.counts(), (1, 3));
        // Capacity 2: the first entry was forgotten.
        memo.score(ctx(), "m", p(), c(&[" yes", " no"])).await.unwrap();
        assert_eq!(inner.0.load(Ordering::Relaxed), 4);
        // A failure is tried again next time.
        assert!(memo.score(ctx(), "broken", p(), c(&["x"])).await.is_err());
        assert!(memo.score(ctx(), "broken", p(), c(&["x"])).await.is_err());
        assert_eq!(inner.0.load(Ordering::Relaxed), 6);
    }
}

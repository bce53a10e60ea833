//! Remembering model calls across requests (and, with a [`CallStore`],
//! across runs).
//!
//! An evaluation asks the same question many times over: each member alone,
//! then every strategy that consults the members, then every sub-pool of a
//! scaling run. [`CallMemo`] sits in front of the pool and answers a repeated
//! call from memory:
//!
//! - `score` is a pure function of (member, prompt, continuations), so every
//!   score is remembered; a likelihood-based strategy evaluated after the
//!   members costs almost nothing.
//! - `generate` is remembered only when it is deterministic: greedy
//!   (temperature unset or 0) or sampled with a seed ("same seed, same
//!   text", [`GenParams::seed`]). Strategies that start by asking every
//!   member the question (voting, ranking, fusing, mixture-of-agents) then
//!   share those first answers. An unseeded sample is always passed through,
//!   since drawing it again is the point of asking again.
//!
//! Streamed generations are remembered as `generate`'s are (a remembered one
//! is streamed whole), unless their sink stopped them early. Next-token
//! queries and embeddings pass through.
//! Counts, token usage and provenance are those of the remembered call, so
//! budgets hold as if it ran again; only the time is saved.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{
    CallCtx, Embedded, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink, TokenLogprob,
};

type Key = [u8; 32];

/// Somewhere remembered calls outlive the process: the evaluation's result
/// cache implements it, so a resumed run reuses what an interrupted one
/// computed. Consulted after a miss in memory, written after every call
/// computed. A store decides which members it keeps (one whose weights
/// nothing pins should not be kept: its results may change under the same
/// id). A failure to write is the store's to log, never the caller's to
/// handle (the result was computed and is returned).
pub trait CallStore: Send + Sync {
    /// The scores stored for `model` under `key` (hex sha256 of the call).
    fn load(&self, model: &str, key: &str) -> Option<Vec<Scored>>;
    /// Stores `scores`.
    fn save(&self, model: &str, key: &str, scores: &[Scored]);
    /// The generation stored for `model` under `key`.
    fn load_generation(&self, model: &str, key: &str) -> Option<Generation>;
    /// Stores a deterministic generation.
    fn save_generation(&self, model: &str, key: &str, generation: &Generation);
}

/// A remembered result.
#[derive(Clone)]
enum Value {
    Scores(Vec<Scored>),
    Generation(Generation),
}

/// A [`Models`] that remembers the last `capacity` successful `score`
/// results and deterministic generations of the members below it (oldest
/// forgotten first). Failures are never remembered, so a call that timed
/// out is tried again.
pub struct CallMemo {
    inner: Arc<dyn Models>,
    capacity: usize,
    // Shared with the futures of calls in flight, which store their result.
    entries: Arc<Mutex<Entries>>,
    store: Option<Arc<dyn CallStore>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Value>,
    order: VecDeque<Key>,
}

impl CallMemo {
    /// Wraps `inner`, remembering up to `capacity` results (a score result
    /// is about a hundred bytes plus the continuations' count of numbers; a
    /// generation, its text).
    pub fn new(inner: Arc<dyn Models>, capacity: usize) -> Self {
        CallMemo {
            inner,
            capacity,
            entries: Arc::new(Mutex::new(Entries::default())),
            store: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Also keeps every computed result in `store`, and looks there before
    /// asking the members.
    pub fn with_store(mut self, store: Arc<dyn CallStore>) -> Self {
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

    /// The key of a deterministic generation; `None` for an unseeded sample.
    fn generation_key(model: &str, input: &Input, params: &GenParams) -> Option<Key> {
        let greedy = params.temperature.is_none_or(|t| t == 0.0);
        if !greedy && params.seed.is_none() {
            return None;
        }
        let mut h = Sha256::new();
        h.update(b"generate\0");
        h.update((model.len() as u64).to_le_bytes());
        h.update(model.as_bytes());
        for part in [serde_json::to_vec(input), serde_json::to_vec(params)] {
            let p = part.unwrap_or_default();
            h.update((p.len() as u64).to_le_bytes());
            h.update(&p);
        }
        Some(h.finalize().into())
    }

    /// The generation remembered under `key`: from memory, else from the
    /// store (and then kept in memory). Counts a hit, or a miss when there
    /// is none.
    fn remembered(&self, key: Key, model: &str) -> Option<Generation> {
        let hit = match self.lookup(&key) {
            Some(Value::Generation(hit)) => Some(hit),
            _ => {
                let stored = self
                    .store
                    .as_ref()
                    .and_then(|s| s.load_generation(model, &hex::encode(key)));
                if let Some(hit) = &stored {
                    remember(&self.entries, self.capacity, key, Value::Generation(hit.clone()));
                }
                stored
            }
        };
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// What keeps a generation computed for `key`: in memory, and in the
    /// store when there is one.
    fn keeper(&self, key: Key, model: &str) -> impl FnOnce(&Generation) + Send + 'static {
        let (capacity, entries, store) = (self.capacity, self.entries.clone(), self.store.clone());
        let model = model.to_string();
        move |out: &Generation| {
            remember(&entries, capacity, key, Value::Generation(out.clone()));
            if let Some(s) = store {
                s.save_generation(&model, &hex::encode(key), out);
            }
        }
    }

    fn lookup(&self, key: &Key) -> Option<Value> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.map.get(key).cloned()
    }
}

fn remember(entries: &Mutex<Entries>, capacity: usize, key: Key, value: Value) {
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

impl Models for CallMemo {
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
        let Some(key) = Self::generation_key(model, &input, &params) else {
            return self.inner.generate(ctx, model, input, params);
        };
        if let Some(hit) = self.remembered(key, model) {
            return Box::pin(async move { Ok(hit) });
        }
        let keep = self.keeper(key, model);
        let call = self.inner.generate(ctx, model, input, params);
        Box::pin(async move {
            let out = call.await?;
            keep(&out);
            Ok(out)
        })
    }

    /// As [`Self::generate`], streamed: a remembered generation is handed
    /// to `sink` whole. A computed one is remembered only if it ran to its
    /// end: one its sink stopped (a caller gone or past its deadline) is
    /// not the answer to the call.
    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        mut sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let Some(key) = Self::generation_key(model, &input, &params) else {
            return self.inner.generate_stream(ctx, model, input, params, sink);
        };
        if let Some(hit) = self.remembered(key, model) {
            return Box::pin(async move {
                if !hit.text.is_empty() {
                    sink(&hit.text);
                }
                Ok(hit)
            });
        }
        let keep = self.keeper(key, model);
        let stopped = Arc::new(AtomicBool::new(false));
        let noted = stopped.clone();
        let sink: TextSink = Box::new(move |piece: &str| {
            let go = sink(piece);
            if !go {
                noted.store(true, Ordering::Relaxed);
            }
            go
        });
        let call = self.inner.generate_stream(ctx, model, input, params, sink);
        Box::pin(async move {
            let out = call.await?;
            if !stopped.load(Ordering::Relaxed) {
                keep(&out);
            }
            Ok(out)
        })
    }

    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        let key = Self::key(model, &prompt, &continuations);
        if let Some(Value::Scores(hit)) = self.lookup(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async move { Ok(hit) });
        }
        let hex = hex::encode(key);
        if let Some(hit) = self.store.as_ref().and_then(|s| s.load(model, &hex)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            remember(&self.entries, self.capacity, key, Value::Scores(hit.clone()));
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
            remember(&entries, capacity, key, Value::Scores(out.clone()));
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

    /// Scores every continuation by its length, writes the call's number as
    /// its text, and counts the calls; fails for member `broken`.
    struct Counting(AtomicU64);

    impl Models for Counting {
        fn cards(&self) -> Vec<ModelCard> {
            Vec::new()
        }
        fn generate(
            &self,
            _: CallCtx,
            model: &str,
            _: Input,
            _: GenParams,
        ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            let model = model.to_string();
            Box::pin(async move {
                if model == "broken" {
                    return Err(InferenceError::Failed("down".into()));
                }
                Ok(Generation {
                    model,
                    text: format!("call {n}"),
                    finish: crate::inference::FinishReason::Eos,
                    usage: Default::default(),
                })
            })
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
                        prompt_tokens: 1,
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

    /// A store in maps.
    #[derive(Default)]
    struct MapStore(Mutex<HashMap<String, Vec<Scored>>>, Mutex<HashMap<String, Generation>>);

    impl CallStore for MapStore {
        fn load(&self, model: &str, key: &str) -> Option<Vec<Scored>> {
            self.0.lock().unwrap().get(&format!("{model}/{key}")).cloned()
        }
        fn save(&self, model: &str, key: &str, scores: &[Scored]) {
            self.0.lock().unwrap().insert(format!("{model}/{key}"), scores.to_vec());
        }
        fn load_generation(&self, model: &str, key: &str) -> Option<Generation> {
            self.1.lock().unwrap().get(&format!("{model}/{key}")).cloned()
        }
        fn save_generation(&self, model: &str, key: &str, g: &Generation) {
            self.1.lock().unwrap().insert(format!("{model}/{key}"), g.clone());
        }
    }

    #[tokio::test]
    async fn deterministic_generations_are_remembered_and_unseeded_samples_are_not() {
        let inner = Arc::new(Counting(AtomicU64::new(0)));
        let store = Arc::new(MapStore::default());
        let memo = CallMemo::new(inner.clone(), 10).with_store(store.clone());
        let q = || Input::Prompt("Q?".into());
        let greedy = GenParams::default();
        let seeded = GenParams {
            temperature: Some(0.8),
            seed: Some(7),
            ..GenParams::default()
        };
        let sampled = GenParams {
            temperature: Some(0.8),
            ..GenParams::default()
        };
        let text = |g: Generation| g.text;
        let a = text(memo.generate(ctx(), "m", q(), greedy.clone()).await.unwrap());
        assert_eq!(text(memo.generate(ctx(), "m", q(), greedy.clone()).await.unwrap()), a);
        let b = text(memo.generate(ctx(), "m", q(), seeded.clone()).await.unwrap());
        assert_ne!(a, b, "other parameters are another call");
        assert_eq!(text(memo.generate(ctx(), "m", q(), seeded.clone()).await.unwrap()), b);
        let c = text(memo.generate(ctx(), "m", q(), sampled.clone()).await.unwrap());
        let d = text(memo.generate(ctx(), "m", q(), sampled.clone()).await.unwrap());
        assert_ne!(c, d, "an unseeded sample is drawn again");
        assert!(memo.generate(ctx(), "broken", q(), greedy.clone()).await.is_err());
        assert_eq!(inner.0.load(Ordering::Relaxed), 5);
        assert_eq!(memo.counts(), (2, 3));
        assert_eq!(
            store.1.lock().unwrap().len(),
            2,
            "the two deterministic ones, no failure"
        );
        // A new process over the same store writes the same text unasked.
        let again = CallMemo::new(inner.clone(), 10).with_store(store.clone());
        assert_eq!(text(again.generate(ctx(), "m", q(), greedy).await.unwrap()), a);
        assert_eq!(inner.0.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn streamed_generations_are_remembered_unless_their_sink_stopped_them() {
        let inner = Arc::new(Counting(AtomicU64::new(0)));
        let store = Arc::new(MapStore::default());
        let memo = CallMemo::new(inner.clone(), 10).with_store(store.clone());
        let q = || Input::Prompt("Q?".into());
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = |go: bool| -> TextSink {
            let seen = seen.clone();
            Box::new(move |p: &str| {
                seen.lock().unwrap().push(p.to_string());
                go
            })
        };
        // A stopped one is not the call's answer: asked again, it runs again.
        let a = memo
            .generate_stream(ctx(), "m", q(), GenParams::default(), sink(false))
            .await
            .unwrap();
        let b = memo
            .generate_stream(ctx(), "m", q(), GenParams::default(), sink(true))
            .await
            .unwrap();
        assert_ne!(a.text, b.text);
        assert_eq!(inner.0.load(Ordering::Relaxed), 2);
        // The finished one is remembered, streamed whole from memory, and
        // shared with the unstreamed call.
        let c = memo
            .generate_stream(ctx(), "m", q(), GenParams::default(), sink(true))
            .await
            .unwrap();
        let d = memo.generate(ctx(), "m", q(), GenParams::default()).await.unwrap();
        assert_eq!((c.text.as_str(), d.text.as_str()), (b.text.as_str(), b.text.as_str()));
        assert_eq!(inner.0.load(Ordering::Relaxed), 2);
        assert_eq!(*seen.lock().unwrap(), vec![a.text, b.text.clone(), b.text]);
        assert_eq!(store.1.lock().unwrap().len(), 1);
        assert_eq!(memo.counts(), (2, 2));
    }

    #[tokio::test]
    async fn a_store_outlives_the_memo_that_filled_it() {
        let inner = Arc::new(Counting(AtomicU64::new(0)));
        let store = Arc::new(MapStore::default());
        let p = || Input::Prompt("Q?".into());
        let c = || vec![" yes".to_string(), " no".to_string()];
        let first = CallMemo::new(inner.clone(), 10).with_store(store.clone());
        let a = first.score(ctx(), "m", p(), c()).await.unwrap();
        assert!(first.score(ctx(), "broken", p(), c()).await.is_err());
        assert_eq!(store.0.lock().unwrap().len(), 1, "failures are not stored");
        // A new memo (a new process) over the same store asks no member.
        let second = CallMemo::new(inner.clone(), 10).with_store(store.clone());
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
        let memo = CallMemo::new(inner.clone(), 2);
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

//! What the host's fan-out buys a text-level method (criterion). Figures:
//! benches/RESULTS.md. Run with `make bench`.
//!
//! `multiagent_refine/{fan_out,one_at_a_time}`: the standard
//! `multiagent-refine` module (3 members, 2 rounds, 16 tokens per answer,
//! greedy, same question) on the real default pool. `fan_out` is the host as
//! shipped: the jobs of one fan-out call run on their members at the same
//! time. `one_at_a_time` puts the same pool behind a gate that admits one
//! model call at a time, which is what a host without parallel fan-out
//! costs. The module, its calls and its answers are identical in both.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::future::BoxFuture;
use tessera::inference::{
    CallCtx, Embedded, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TokenLogprob,
};
use tessera::policy::Policy;
use tessera::pool::{Pool, PoolConfig};
use tessera::{Paths, RunRequest, Runtime};

/// The real pool behind a one-call-at-a-time gate.
struct OneAtATime {
    inner: Arc<dyn Models>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Models for OneAtATime {
    fn cards(&self) -> Vec<ModelCard> {
        self.inner.cards()
    }
    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let fut = self.inner.generate(ctx, model, input, params);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _turn = gate.lock().await;
            fut.await
        })
    }
    fn score(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        let fut = self.inner.score(ctx, model, prompt, continuations);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _turn = gate.lock().await;
            fut.await
        })
    }
    fn next_token(
        &self,
        ctx: CallCtx,
        model: &str,
        prompt: Input,
        top_k: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        let fut = self.inner.next_token(ctx, model, prompt, top_k);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _turn = gate.lock().await;
            fut.await
        })
    }
    fn embed(
        &self,
        ctx: CallCtx,
        model: &str,
        texts: Vec<String>,
    ) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        let fut = self.inner.embed(ctx, model, texts);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _turn = gate.lock().await;
            fut.await
        })
    }
}

fn request() -> RunRequest {
    let mut req =
        RunRequest::chat("Which gas do plants take in from the air to make food? Answer in one short sentence.");
    req.params.max_tokens = Some(16);
    req.params.seed = Some(1);
    req.config.insert("rounds".into(), "2".into());
    req.config.insert("temperature".into(), "0".into());
    req
}

fn bench(c: &mut Criterion) {
    let paths = Paths::from_env();
    let loaded = Pool::load(&PoolConfig::default_pool(), &paths.models);
    assert!(loaded.failures.is_empty(), "run `make setup` first");
    let pool: Arc<dyn Models> = loaded.pool;
    let shipped = Runtime::with_models(paths.clone(), pool.clone(), Policy::default(), vec![]).expect("runtime");
    let gated = Runtime::with_models(
        paths,
        Arc::new(OneAtATime {
            inner: pool,
            gate: Arc::new(tokio::sync::Mutex::new(())),
        }),
        Policy::default(),
        vec![],
    )
    .expect("runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let m1 = shipped.load_module("multiagent-refine").expect("run `make setup`");
    let m2 = gated.load_module("multiagent-refine").expect("run `make setup`");
    // Same answers either way: the gate changes timing only.
    let a = rt.block_on(shipped.run(&m1, request())).expect("runs");
    let b = rt.block_on(gated.run(&m2, request())).expect("runs");
    assert_eq!(a.text, b.text, "the gate must not change the answer");

    let mut g = c.benchmark_group("multiagent_refine");
    g.sample_size(10).measurement_time(Duration::from_secs(60));
    g.bench_function("fan_out", |b| {
        b.iter(|| rt.block_on(shipped.run(&m1, request())).expect("runs"))
    });
    g.bench_function("one_at_a_time", |b| {
        b.iter(|| rt.block_on(gated.run(&m2, request())).expect("runs"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

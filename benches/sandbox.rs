//! Sandbox benchmarks (criterion). Figures and how to read them:
//! benches/RESULTS.md. Run with `make bench`.
//!
//! - `instantiate_run/trivial`: fresh store + instance from the `InstancePre`,
//!   `run` of a strategy that makes no host call, drop. Goal p50 < 20 us.
//! - `host_call/list_models_x100`: the same with 100 host calls that need no
//!   inference; (this - trivial) / 100 is one host-call round trip.
//! - `instantiate_run/{python,javascript}` and
//!   `host_call/{python,javascript}_list_models_x100`: the same two with the
//!   module's Python twin (componentize-py) and JavaScript twin
//!   (componentize-js), each interpreter pre-initialised in the component's
//!   snapshot. Goal: start-up under 5 ms.
//! - `majority_vote/{native,sandbox}`: identical majority-vote logic (k = 3,
//!   same seeds, round-robin over the real pool) written natively against the pool vs running
//!   as the sandboxed module. Goal: sandbox overhead < 1% of the request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures::future::BoxFuture;
use tessera::inference::{
    CallCtx, Embedded, GenParams, Generation, InferenceError, Input, Message, ModelCard, Models, Scored, TokenLogprob,
};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{Paths, RunRequest, Runtime};
use tessera_sdk::answer::{extract, vote};

/// A pool double that answers instantly: isolates sandbox cost.
struct Instant0;

impl Models for Instant0 {
    fn cards(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: "stub".into(),
            contributor: "bench".into(),
            description: "answers instantly".into(),
            domains: vec![],
            architecture: "none".into(),
            parameters: 0,
            context_length: 0,
            license: "n/a".into(),
            capabilities: vec![tessera::inference::Capability::Generate],
        }]
    }
    fn generate(
        &self,
        _: CallCtx,
        m: &str,
        _: Input,
        _: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let m = m.to_string();
        Box::pin(async move {
            Ok(Generation {
                model: m,
                text: "ok".into(),
                finish: tessera::inference::FinishReason::Eos,
                usage: Default::default(),
            })
        })
    }
    fn score(
        &self,
        _: CallCtx,
        _: &str,
        _: Input,
        _: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn next_token(
        &self,
        _: CallCtx,
        _: &str,
        _: Input,
        _: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn embed(&self, _: CallCtx, _: &str, _: Vec<String>) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        Box::pin(async { Ok(Embedded::default()) })
    }
}

fn ping_path(name: &str) -> String {
    Paths::from_env()
        .modules
        .join("bench")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

fn sandbox_overhead(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let rt = Runtime::with_models(Paths::from_env(), Arc::new(Instant0), Policy::default(), vec![]).expect("runtime");
    let ping = rt
        .load_module(&ping_path("ping"))
        .expect("bench module installed by `make setup`");
    let ping_py = rt
        .load_module(&ping_path("ping-py"))
        .expect("Python bench module installed by `make setup`");
    let ping_js = rt
        .load_module(&ping_path("ping-js"))
        .expect("JavaScript bench module installed by `make setup`");
    let req = |calls: u32| {
        let mut r = RunRequest::chat("x");
        r.config.insert("calls".into(), calls.to_string());
        r
    };
    let mut g = c.benchmark_group("sandbox");
    g.bench_function("instantiate_run/trivial", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping, req(0))).expect("runs"))
    });
    g.bench_function("host_call/list_models_x100", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping, req(100))).expect("runs"))
    });
    g.bench_function("instantiate_run/python", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping_py, req(0))).expect("runs"))
    });
    g.bench_function("host_call/python_list_models_x100", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping_py, req(100))).expect("runs"))
    });
    g.bench_function("instantiate_run/javascript", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping_js, req(0))).expect("runs"))
    });
    g.bench_function("host_call/javascript_list_models_x100", |b| {
        b.iter(|| tokio.block_on(rt.run(&ping_js, req(100))).expect("runs"))
    });
    g.finish();
}

/// Majority vote written natively against the pool: the baseline the
/// sandboxed module is compared with. Same jobs, same seeds, same helpers.
async fn native_majority_vote(models: &Arc<dyn Models>, members: &[String], q: &str, k: usize) -> String {
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(300),
        requester: 0,
    };
    let futs = (0..k).map(|i| {
        let params = GenParams {
            max_tokens: Some(16),
            temperature: Some(0.7),
            top_p: Some(0.9),
            seed: Some(7 + i as u64),
            ..Default::default()
        };
        // Round-robin over the generative members, as the module does.
        models.generate(
            ctx,
            &members[i % members.len()],
            Input::Chat(vec![Message::user(q)]),
            params,
        )
    });
    let gens: Vec<Generation> = futures::future::join_all(futs)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let answers: Vec<String> = gens.iter().map(|g| extract(&g.text)).collect();
    let t = vote(&answers, &[]).expect("some answer");
    gens[t.winner].text.clone()
}

fn majority_vote_native_vs_sandbox(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let rt = Runtime::new(Paths::from_env(), &PoolConfig::default_pool(), Policy::default()).expect("runtime");
    let mv = rt
        .load_module("majority-vote")
        .expect("majority-vote installed by `make setup`");
    let q = "What is the capital of France? Answer with one word.";
    let models = rt.models();
    let members = rt.generator_ids();
    let mut req = RunRequest::chat(q);
    req.params.seed = Some(7);
    req.config = BTreeMap::from([("k".into(), "3".into()), ("max_tokens".into(), "16".into())]);
    let mut g = c.benchmark_group("majority_vote");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("native", |b| {
        b.iter(|| tokio.block_on(native_majority_vote(&models, &members, q, 3)))
    });
    g.bench_function("sandbox", |b| {
        b.iter(|| tokio.block_on(rt.run(&mv, req.clone())).expect("runs"))
    });
    g.finish();
}

criterion_group!(benches, sandbox_overhead, majority_vote_native_vs_sandbox);
criterion_main!(benches);

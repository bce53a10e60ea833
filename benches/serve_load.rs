//! Load and isolation figures for `tessera serve` (a load generator, not a
//! criterion bench: what matters is latency percentiles under concurrency).
//! Figures: benches/RESULTS.md. Run with `make bench` or
//! `cargo bench -p tessera --profile dev --bench serve_load`.
//!
//! Everything runs over loopback against an in-process server on the real
//! default pool, bounded in count:
//!
//! 1. **Load**: `CLIENTS` concurrent clients each send `PER_CLIENT` chat
//!    requests (16 new tokens, greedy) round-robin over the three chat
//!    members. Throughput, p50/p99 latency and errors, run twice in one
//!    process: each member decoding one generation at a time, and decoding
//!    the generations queued for it together (as shipped).
//! 2. **Isolation**: a benign tenant sends `BENIGN` short requests one after
//!    another, first alone, then while a hostile tenant hammers the server
//!    with published hostile modules (an infinite loop and a memory bomb)
//!    from `HAMMERS` concurrent loops. Run twice: with the quarantine
//!    breaker as shipped, and with it disabled, to show what it buys.
//! 3. **Attacks** (issue 18): the same benign tenant while a hostile one
//!    cycles through the attacks an outside test found: fan-outs of long
//!    prompts to the benign tenant's own member under a 3 s deadline, a
//!    provenance flood, 50 MB bodies without a key, oversized member chats,
//!    a chat of 100,000 empty turns, 50 MB stop strings and clients that
//!    disconnect from long generations.
//! 4. **Composed** (`-- composed`, issue 19): a majority vote over the three
//!    generative members (the `majority-vote` system, k = 3, 16 greedy
//!    tokens) on `COMPOSED` ARC-Easy test prompts from `COMPOSED_CLIENTS`
//!    concurrent clients over HTTP, then one client alone, against the same
//!    vote as a sequential Python pipeline on llama-cpp-python
//!    (`benches/pipeline_peer.py`, run when LLAMA_CPP_PYTHON names its
//!    interpreter) over the same files and prompts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera::policy::Policy;
use tessera::pool::{Pool, PoolConfig};
use tessera::registry::tenants::TenantPolicy;
use tessera::registry::Registry;
use tessera::server::{self, AppState, ServeConfig};
use tessera::{Paths, Runtime};

const CLIENTS: usize = 8;
const INFLIGHT: usize = 8;
const PER_CLIENT: usize = 6;
const BENIGN: usize = 40;
const HAMMERS: usize = 4;
const COMPOSED: usize = 20;
const COMPOSED_CLIENTS: usize = 4;
const MEMBERS: [&str; 3] = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    (percentile(&ms, 50.0), percentile(&ms, 99.0))
}

async fn chat(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> (u16, f64) {
    let body = json!({ "model": model, "messages": [{ "role": "user", "content": prompt }],
                       "max_tokens": max_tokens, "temperature": 0 });
    post_chat(client, base, key, &body).await
}

/// Posts one chat body with `key`; its status (0: no answer) and latency
/// in ms, the answer read whole.
async fn post_chat(client: &reqwest::Client, base: &str, key: &str, body: &serde_json::Value) -> (u16, f64) {
    let started = Instant::now();
    let status = match client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
    {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s
        }
        Err(_) => 0,
    };
    (status, started.elapsed().as_secs_f64() * 1000.0)
}

struct Served {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(rt: Arc<Runtime>, registry: Arc<Registry>, cfg: ServeConfig) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let state = Arc::new(AppState::new(rt, registry, cfg).expect("server state"));
    tokio::spawn(server::serve(state, listener, async {
        let _ = rx.await;
    }));
    Served { base, stop }
}

async fn benign_run(client: &reqwest::Client, base: &str, key: &str) -> (Vec<f64>, usize) {
    let mut ms = Vec::new();
    let mut errors = 0;
    for i in 0..BENIGN {
        let (status, t) = chat(
            client,
            base,
            key,
            MEMBERS[0],
            &format!("Give one word for the number {i}."),
            8,
        )
        .await;
        if status == 200 {
            ms.push(t);
        } else {
            errors += 1;
        }
    }
    (ms, errors)
}

/// One request of a hostile loop: `(client, base, key, loop, n)` to the
/// label it is counted under and its status.
type Shot = fn(reqwest::Client, String, String, usize, u64) -> futures::future::BoxFuture<'static, (String, u16)>;

/// The benign tenant's run alone (after a warm-up), then again while
/// `HAMMERS` loops of `shot` run for the hostile tenant; returns both runs'
/// latencies and errors, the hostile statuses by label, and how many
/// hostile requests were sent.
async fn under_fire(
    client: &reqwest::Client,
    base: &str,
    benign: &str,
    hostile: &str,
    shot: Shot,
) -> (
    Vec<f64>,
    usize,
    Vec<f64>,
    usize,
    std::collections::BTreeMap<String, u64>,
    u64,
) {
    let _ = benign_run(client, base, benign).await;
    let (alone, alone_err) = benign_run(client, base, benign).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut hammers = Vec::new();
    for h in 0..HAMMERS {
        let (client, base, key, stop, sent) = (
            client.clone(),
            base.to_string(),
            hostile.to_string(),
            stop.clone(),
            sent.clone(),
        );
        hammers.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<String, u64>::new();
            let mut n = h as u64;
            while !stop.load(Ordering::Relaxed) {
                let (label, status) = shot(client.clone(), base.clone(), key.clone(), h, n).await;
                *codes.entry(label).or_default() += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
                if status == 429 || status == 503 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            codes
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (loaded, loaded_err) = benign_run(client, base, benign).await;
    stop.store(true, Ordering::Relaxed);
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for h in hammers {
        if let Ok(c) = h.await {
            for (k, v) in c {
                *codes.entry(k).or_default() += v;
            }
        }
    }
    (
        alone,
        alone_err,
        loaded,
        loaded_err,
        codes,
        sent.load(Ordering::Relaxed),
    )
}

/// A registry in a scratch folder with the hostile modules `published`
/// (`(source, name)`), an unthrottled benign tenant and a hostile tenant
/// capped at 2 concurrent requests; returns it with both keys.
fn hostile_registry(
    rt: &Runtime,
    tag: &str,
    published: &[(&str, &str)],
) -> (std::path::PathBuf, Arc<Registry>, String, String) {
    let dir = std::env::temp_dir().join(format!("tessera-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registry = Arc::new(Registry::open(&dir).expect("registry"));
    let paths = Paths::from_env();
    for (src, name) in published {
        let wasm = paths.modules.join("hostile").join(format!("{src}.wasm"));
        let text = std::fs::read_to_string(wasm.with_extension("toml")).expect("hostile manifest (make setup)");
        let mut man: toml::Table = toml::from_str(&text).expect("manifest");
        man.insert("name".into(), toml::Value::String(name.to_string()));
        server::publish_checked(
            &registry,
            rt,
            &std::fs::read(&wasm).expect("hostile module"),
            &toml::to_string(&man).expect("toml"),
            None,
        )
        .expect("publish");
    }
    let open = TenantPolicy {
        requests_per_minute: 0,
        tokens_per_day: 0,
        max_concurrent: 0,
        ..TenantPolicy::default()
    };
    let benign = registry.add_tenant("benign", &open).expect("tenant");
    let hostile = registry
        .add_tenant(
            "hostile",
            &TenantPolicy {
                max_concurrent: 2,
                ..open.clone()
            },
        )
        .expect("tenant");
    (dir, registry, benign, hostile)
}

async fn isolation(rt: Arc<Runtime>, quarantine_after: u32, label: &str) {
    let (dir, registry, benign, hostile) = hostile_registry(
        &rt,
        &format!("iso-{quarantine_after}"),
        &[("infinite-loop", "spinner"), ("memory-bomb", "bomber")],
    );
    let served = start(
        rt,
        registry,
        ServeConfig {
            quarantine_after,
            ..ServeConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let fire: Shot = |client, base, key, h, _n| {
        Box::pin(async move {
            let model = if h % 2 == 0 { "spinner" } else { "bomber" };
            let (status, _) = chat(&client, &base, &key, model, "x", 4).await;
            (status.to_string(), status)
        })
    };
    let (alone, alone_err, loaded, loaded_err, codes, hostile_sent) =
        under_fire(&client, &served.base, &benign, &hostile, fire).await;
    let _ = served.stop.send(());
    let (a50, a99) = stats(alone);
    let (l50, l99) = stats(loaded);
    println!(
        "isolation [{label}]: benign alone p50 {a50:.0} ms p99 {a99:.0} ms ({alone_err} errors); \
         with {HAMMERS} hostile loops p50 {l50:.0} ms p99 {l99:.0} ms ({loaded_err} errors); \
         p99 ratio {:.2}x; hostile requests {hostile_sent} with statuses {codes:?}",
        l99 / a99,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn load(rt: Arc<Runtime>, label: &str) {
    let dir = std::env::temp_dir().join(format!("tessera-bench-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registry = Arc::new(Registry::open(&dir).expect("registry"));
    let served = start(
        rt,
        registry,
        ServeConfig {
            max_inflight: INFLIGHT,
            ..ServeConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let _ = chat(&client, &served.base, "-", MEMBERS[0], "warm up", 2).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base) = (client.clone(), served.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..PER_CLIENT {
                let model = MEMBERS[(c + i) % MEMBERS.len()];
                out.push(
                    chat(
                        &client,
                        &base,
                        "-",
                        model,
                        &format!("Write a sentence about the number {}.", c * 100 + i),
                        16,
                    )
                    .await,
                );
            }
            out
        }));
    }
    let mut ms = Vec::new();
    let mut errors = 0;
    for t in tasks {
        for (status, t) in t.await.unwrap_or_default() {
            if status == 200 {
                ms.push(t);
            } else {
                errors += 1;
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let n = ms.len();
    let (p50, p99) = stats(ms);
    println!(
        "load [{label}]: {CLIENTS} clients x {PER_CLIENT} chat requests (16 tokens, 3 members, max_inflight {INFLIGHT}): \
         {n} ok, {errors} errors in {wall:.1} s = {:.2} req/s, p50 {p50:.0} ms, p99 {p99:.0} ms",
        n as f64 / wall
    );
    let _ = served.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The attack bodies, serialised once: the load generator shares the two
/// cores with the server, and rebuilding 50 MB bodies per request would
/// measure the client, not the server.
fn attack_bodies() -> Vec<axum::body::Bytes> {
    let msg = |text: String| json!([{ "role": "user", "content": text }]);
    let turns: Vec<_> = (0..100_000).map(|_| json!({ "role": "user", "content": "" })).collect();
    [
        json!({ "model": "prefiller", "messages": msg("x".into()) }),
        json!({ "model": "flooder", "messages": msg("x".into()), "tessera": { "mode": "notes" } }),
        json!(null),
        json!({ "model": MEMBERS[0], "messages": msg("word ".repeat(60_000)) }),
        json!({ "model": MEMBERS[0], "messages": turns }),
        json!({ "model": MEMBERS[0], "messages": msg("hi".into()), "stop": ["s".repeat(50 << 20)] }),
        json!({ "model": MEMBERS[0], "messages": msg("Tell a long story.".into()), "max_tokens": 2000 }),
    ]
    .iter()
    .enumerate()
    .map(|(i, v)| {
        if i == 2 {
            // 50 MB without a key.
            axum::body::Bytes::from(vec![b' '; 50 << 20])
        } else {
            axum::body::Bytes::from(serde_json::to_vec(v).expect("json"))
        }
    })
    .collect()
}

/// One attack of the hostile tenant (attack `n % 7` of [`attack_bodies`]);
/// returns the status (0: no answer, as meant for the client that leaves).
async fn attack(client: &reqwest::Client, base: &str, key: &str, n: u64) -> u16 {
    static BODIES: std::sync::OnceLock<Vec<axum::body::Bytes>> = std::sync::OnceLock::new();
    let bodies = BODIES.get_or_init(attack_bodies);
    let kind = (n % 7) as usize;
    let mut req = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(bodies[kind].clone());
    if kind != 2 {
        req = req.bearer_auth(key);
    }
    if kind == 6 {
        // Leaves after 0.3 s of a 2,000-token answer.
        req = req.timeout(Duration::from_millis(300));
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s
        }
        Err(_) => 0,
    }
}

async fn attacks(rt: Arc<Runtime>) {
    let (dir, registry, benign, hostile) = hostile_registry(
        &rt,
        "attacks",
        &[("long-prefill", "prefiller"), ("provenance-bomb", "flooder")],
    );
    let served = start(rt, registry, ServeConfig::default()).await;
    let client = reqwest::Client::new();
    let fire: Shot = |client, base, key, _h, n| {
        Box::pin(async move {
            let status = attack(&client, &base, &key, n).await;
            (format!("{}:{status}", n % 7), status)
        })
    };
    let (alone, alone_err, loaded, loaded_err, codes, sent) =
        under_fire(&client, &served.base, &benign, &hostile, fire).await;
    let _ = served.stop.send(());
    let (a50, a99) = stats(alone);
    let (l50, l99) = stats(loaded);
    println!(
        "attacks: benign alone p50 {a50:.0} ms p99 {a99:.0} ms ({alone_err} errors); \
         with {HAMMERS} attack loops p50 {l50:.0} ms p99 {l99:.0} ms ({loaded_err} errors); \
         p99 ratio {:.2}x; attack requests {sent} as attack:status {codes:?}",
        l99 / a99,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One composed request: `majority-vote` with one greedy 16-token answer
/// per generative member.
async fn vote(client: &reqwest::Client, base: &str, prompt: &str) -> (u16, f64) {
    let body = json!({ "model": "majority-vote", "messages": [{ "role": "user", "content": prompt }],
                       "max_tokens": 16, "temperature": 0, "tessera": { "k": 3 } });
    post_chat(client, base, "-", &body).await
}

/// `prompts` sent as composed requests by `clients` concurrent clients
/// taking the next prompt from a shared queue: (ok latencies, errors, wall s).
async fn composed_run(
    client: &reqwest::Client,
    base: &str,
    prompts: &[String],
    clients: usize,
) -> (Vec<f64>, usize, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let prompts = Arc::new(prompts.to_vec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, base, next, prompts) = (client.clone(), base.to_string(), next.clone(), prompts.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(prompt) = prompts.get(i) else { break };
                out.push(vote(&client, &base, prompt).await);
            }
            out
        }));
    }
    let (mut ms, mut errors) = (Vec::new(), 0);
    for t in tasks {
        for (status, t) in t.await.unwrap_or_default() {
            if status == 200 {
                ms.push(t);
            } else {
                errors += 1;
            }
        }
    }
    (ms, errors, started.elapsed().as_secs_f64())
}

/// The peer: the same vote as a sequential llama-cpp-python pipeline
/// (`benches/pipeline_peer.py`); its JSON report, or `None` (and why on
/// stderr) where the interpreter or the package is missing.
fn pipeline_peer(paths: &Paths, prompts: &[String]) -> Option<serde_json::Value> {
    let python = std::env::var("LLAMA_CPP_PYTHON").ok()?;
    let models: Vec<_> = PoolConfig::default_pool()
        .members
        .into_iter()
        .filter(|m| m.backend == tessera::pool::BackendKind::Gguf)
        .map(|m| paths.models.join(&m.path))
        .collect();
    let job = std::env::temp_dir().join(format!("tessera-pipeline-peer-{}.json", std::process::id()));
    let spec = json!({ "models": models, "prompts": prompts, "max_tokens": 16, "threads": 2 });
    std::fs::write(&job, serde_json::to_vec(&spec).ok()?).ok()?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/pipeline_peer.py");
    let out = std::process::Command::new(python).arg(script).arg(&job).output();
    let _ = std::fs::remove_file(&job);
    let out = out.ok()?;
    if !out.status.success() {
        eprintln!(
            "pipeline peer skipped: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Tokens of the prompts looked up and of those reused, summed over the
/// members' prefix caches.
fn prefix_tokens(rt: &Runtime) -> (u64, u64) {
    rt.models()
        .prefix_stats()
        .iter()
        .fold((0, 0), |(p, r), (_, s)| (p + s.prompt_tokens, r + s.reused_tokens))
}

/// One composed run on a freshly loaded default pool behind its own
/// server, so that no run finds the prompts of another in its prefix
/// cache (the same 20 prompts twice would otherwise skip the second run's
/// prefills). Prints the run's line; returns its rate.
async fn composed_fresh(paths: &Paths, prompts: &[String], clients: usize) -> f64 {
    let loaded = Pool::load(&PoolConfig::default_pool(), &paths.models);
    assert!(loaded.failures.is_empty(), "run `make setup` first");
    let rt =
        Arc::new(Runtime::with_models(paths.clone(), loaded.pool, Policy::default(), Vec::new()).expect("runtime"));
    let dir = std::env::temp_dir().join(format!("tessera-bench-composed-{}-{clients}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registry = Arc::new(Registry::open(&dir).expect("registry"));
    let served = start(rt.clone(), registry, ServeConfig::default()).await;
    let client = reqwest::Client::new();
    let (status, _) = vote(&client, &served.base, "Say hello.").await;
    assert_eq!(status, 200, "the majority-vote system answers (make setup installs it)");
    let steps = tessera::backends::gguf::decode::batched_steps();
    let prefills = tessera::backends::gguf::decode::batched_prefills();
    let (prompt0, reused0) = prefix_tokens(&rt);
    let (ms, errors, wall) = composed_run(&client, &served.base, prompts, clients).await;
    let (prompt1, reused1) = prefix_tokens(&rt);
    let rate = ms.len() as f64 / wall;
    let (p50, p99) = stats(ms);
    println!(
        "composed [{clients} client{}]: majority-vote over 3 members (k 3, 16 greedy tokens), \
         {} ARC-Easy prompts: {errors} errors in {wall:.1} s = {rate:.2} req/s, p50 {p50:.0} ms, p99 {p99:.0} ms; \
         {} batched decode steps, {} batched prefill steps; prefix cache reused {} of {} prompt tokens",
        if clients == 1 { "" } else { "s" },
        prompts.len(),
        tessera::backends::gguf::decode::batched_steps() - steps,
        tessera::backends::gguf::decode::batched_prefills() - prefills,
        reused1 - reused0,
        prompt1 - prompt0,
    );
    let _ = served.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

async fn composed(paths: &Paths) {
    let task = tessera::tasks::Task::load(paths, "arc-easy").expect("ARC-Easy (make setup fetches the tasks)");
    let prompts: Vec<String> = task.test().iter().take(COMPOSED).map(|i| i.prompt()).collect();
    let rate1 = composed_fresh(paths, &prompts, 1).await;
    let rate = composed_fresh(paths, &prompts, COMPOSED_CLIENTS).await;
    match pipeline_peer(paths, &prompts) {
        Some(peer) => {
            let peer_rate = peer["req_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "composed peer (sequential llama-cpp-python pipeline, same files and prompts): \
                 {peer_rate:.2} req/s, p50 {:.0} ms, p99 {:.0} ms; Tessera {COMPOSED_CLIENTS} clients / peer = {:.2}x, \
                 1 client / peer = {:.2}x",
                peer["p50_ms"].as_f64().unwrap_or(f64::NAN),
                peer["p99_ms"].as_f64().unwrap_or(f64::NAN),
                rate / peer_rate,
                rate1 / peer_rate,
            );
        }
        None => println!("composed peer: not run (set LLAMA_CPP_PYTHON to a venv with llama-cpp-python)"),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let paths = Paths::from_env();
        if std::env::args().any(|a| a == "composed") {
            // `cargo bench ... --bench serve_load -- composed`: only this
            // part, which loads its own pool per run.
            composed(&paths).await;
            return;
        }
        let loaded = Pool::load(&PoolConfig::default_pool(), &paths.models);
        assert!(loaded.failures.is_empty(), "run `make setup` first");
        let pool = loaded.pool.clone();
        let runtime =
            Arc::new(Runtime::with_models(paths.clone(), loaded.pool, Policy::default(), Vec::new()).expect("runtime"));
        if std::env::args().any(|a| a == "attacks") {
            // `cargo bench ... --bench serve_load -- attacks`: only this part.
            attacks(runtime).await;
            return;
        }
        pool.set_max_batch(1);
        load(runtime.clone(), "one generation at a time per member").await;
        pool.set_max_batch(tessera::pool::DEFAULT_MAX_BATCH);
        let before = tessera::backends::gguf::decode::batched_steps();
        load(runtime.clone(), "queued generations decoded together (as shipped)").await;
        println!(
            "  batched decode steps in that run: {}",
            tessera::backends::gguf::decode::batched_steps() - before
        );
        if std::env::args().any(|a| a == "load") {
            // `cargo bench ... --bench serve_load -- load`: the load part only.
            return;
        }
        isolation(runtime.clone(), 3, "quarantine after 3 faults (as shipped)").await;
        isolation(runtime.clone(), u32::MAX, "quarantine off").await;
        attacks(runtime.clone()).await;
        drop((runtime, pool));
        composed(&paths).await;
    });
}

//! The fast tier: what an outside attack found, each class with a
//! regression test, over the scripted double (`double.rs`) instead of the
//! real pool. Everything here runs in seconds and needs no model file; the
//! hostile modules are the compiled ones `make setup` installs.
//!
//! `cargo test --test all hardening` runs just these.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tessera::inference::{GenParams, Input, Message, Models};
use tessera::merge::{MergeSpec, Merged, Merger};
use tessera::policy::Policy;
use tessera::registry::tenants::{day_of, TenantPolicy};
use tessera::registry::Registry;
use tessera::server::{self, AppState, ServeConfig};
use tessera::{Error, RunRequest, Runtime};

use crate::common::{hostile_path, scratch};
use crate::double::{self, Scripted};

fn load(rt: &Runtime, name: &str) -> Arc<tessera::sandbox::Module> {
    rt.load_module(&hostile_path(name).display().to_string())
        .expect("hostile module loads (run `make setup`)")
}

fn with(config: &[(&str, &str)]) -> RunRequest {
    let mut r = RunRequest::chat("go");
    for (k, v) in config {
        r.config.insert(k.to_string(), v.to_string());
    }
    r
}

// ---- 1. provenance -------------------------------------------------------

#[tokio::test]
async fn trace_fields_are_bounded_and_provenance_counts_against_a_budget() {
    let (rt, _) = double::runtime("prov", Policy::default());
    let m = load(&rt, "provenance-bomb");
    // Megabyte roles and member ids are cut; the reply stays small.
    let out = rt.run(&m, with(&[("mode", "role")])).await.expect("bounded steps pass");
    let bytes = serde_json::to_vec(&out.provenance).unwrap().len();
    assert!(bytes < 300 << 10, "provenance of {bytes} bytes");
    for e in &out.provenance {
        if let tessera::ProvenanceEvent::ModuleStep { model, role, .. } = e {
            assert!(
                role.len() <= 67 && model.as_ref().is_some_and(|m| m.len() <= 131),
                "{role}"
            );
        }
    }
    // Unknown members with 20 KB ids: recorded, but clipped.
    let out = rt.run(&m, with(&[("mode", "fanout")])).await.expect("fan-out answers");
    assert!(serde_json::to_vec(&out.provenance).unwrap().len() < 300 << 10);
    // 4,000 notes of 4 KiB: the provenance budget ends the request, typed.
    let err = rt.run(&m, with(&[("mode", "notes")])).await.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, limit } if budget == "provenance-bytes" && *limit == 256 << 10),
        "{err:?}"
    );
}

// ---- 2, 6. the input rule --------------------------------------------------

#[test]
fn the_input_rule_counts_turns_and_their_template() {
    let empty = |n: usize| {
        Input::Chat(
            (0..n)
                .map(|_| Message {
                    role: String::new(),
                    content: String::new(),
                })
                .collect(),
        )
    };
    assert!(empty(100).check_size(0).is_ok());
    // Empty turns are not free: 2,000 of them are 64,000 bytes of template.
    assert_eq!(
        empty(2000).counted_bytes(),
        2000 * tessera::inference::TURN_OVERHEAD_BYTES
    );
    let e = empty(1_000_000).check_size(0).unwrap_err().to_string();
    assert!(e.contains("turns"), "{e}");
    let e = Input::Prompt("x".repeat(300 << 10))
        .check_size(0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 262144"), "{e}");
}

#[tokio::test]
async fn an_oversized_request_input_is_refused_before_any_model_call() {
    let (rt, counts) = double::runtime("input", Policy::default());
    let m = rt.load_module("first-responder").expect("first-responder installed");
    let mut req = RunRequest::chat("x".repeat(300 << 10));
    req.params.max_tokens = Some(2);
    let err = rt.run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params", "{err}");
    assert_eq!(counts.calls.load(Ordering::SeqCst), 0);
}

// ---- 10. partial maxima ----------------------------------------------------

#[test]
fn maxima_a_policy_leaves_out_stay_at_the_builtin_ones() {
    let policy: Policy = toml::from_str("[maxima]\ntokens = 100\n").unwrap();
    let manifest = tessera::policy::Manifest::from_file(&hostile_path("call-flood").with_extension("toml")).unwrap();
    let mut m = manifest.clone();
    m.budgets.host_calls = Some(50_000);
    let g = policy.grant(&m, &[]);
    assert_eq!(g.host_calls, 1_024);
    assert_eq!(g.tokens, 100);
}

// ---- 12. module-reported errors ---------------------------------------------

#[tokio::test]
async fn errors_a_module_returns_are_not_passed_off_as_the_hosts() {
    let (rt, _) = double::runtime("liar", Policy::default());
    let m = load(&rt, "liar");
    for claim in ["deadline", "not-permitted", "budget", "inference-failed", "unsupported"] {
        let err = rt.run(&m, with(&[("claim", claim)])).await.unwrap_err();
        assert!(
            matches!(&err, Error::ModuleFailed { message } if message.contains("reported") && message.contains(claim)),
            "{claim}: {err:?}"
        );
    }
}

// ---- 13. fit state ---------------------------------------------------------

#[tokio::test]
async fn a_fit_state_over_the_limit_is_refused_and_not_persisted() {
    let (rt, _) = double::runtime("statebomb", Policy::default());
    let m = load(&rt, "state-bomb");
    let err = rt.fit(&m, Vec::new(), Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, .. } if budget == "state-bytes"),
        "{err:?}"
    );
    assert!(rt.stored_state(&m).is_none());
    let out = rt.run(&m, RunRequest::chat("go")).await.unwrap();
    assert_eq!(out.text, "state of 0 bytes");
}

#[tokio::test]
async fn a_failed_state_write_is_an_internal_error() {
    let (rt, _) = double::runtime("statewrite", Policy::default());
    let m = rt.load_module("first-responder").unwrap();
    // The state directory is a file: the write fails on the host's side.
    let blocked = rt.paths().state.clone();
    std::fs::remove_dir_all(&blocked).unwrap();
    std::fs::write(&blocked, b"not a directory").unwrap();
    let err = rt.install_state(&m, Some(vec![1, 2, 3])).unwrap_err();
    assert_eq!(err.kind(), "internal", "{err}");
    let api = server::ApiError::from(err);
    assert_eq!(api.status().as_u16(), 500);
}

// ---- 5. merges ---------------------------------------------------------------

/// A merger whose merged members are the double, each said to take 600 MiB;
/// it keeps weak handles to see that nothing outlives the request.
struct FakeMerger {
    live: Mutex<Vec<Weak<dyn Models>>>,
}

impl Merger for FakeMerger {
    fn merge(
        &self,
        _models: Vec<String>,
        _base: Option<String>,
        spec: MergeSpec,
    ) -> BoxFuture<'static, Result<Merged, tessera::merge::MergeFailed>> {
        let models: Arc<dyn Models> = Arc::new(Scripted::new());
        self.live.lock().unwrap().push(Arc::downgrade(&models));
        let id = format!("merged-{}", spec.seed);
        Box::pin(async move {
            Ok(Merged {
                id,
                models,
                bytes: 600 << 20,
            })
        })
    }
}

#[tokio::test]
async fn merged_members_are_bounded_by_memory_and_released_with_the_request() {
    let (mut rt, _) = double::runtime("hoard", Policy::default());
    let merger = Arc::new(FakeMerger {
        live: Mutex::new(Vec::new()),
    });
    rt.set_merger(merger.clone());
    let m = load(&rt, "merge-hoarder");
    let out = rt.run(&m, RunRequest::chat("go")).await.unwrap();
    // 2,048 MiB of merge memory by default: three of 600 MiB, not 64.
    assert_eq!(out.text, "held 3", "{out:?}");
    assert!(out.annotations["refused"].contains("release"), "{out:?}");
    // A member listed a thousand times is refused before it costs anything
    // (and before the budget: the three merges above still fit).
    assert!(out.annotations["repeat"].contains("listed twice"), "{out:?}");
    let alive = merger
        .live
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.strong_count() > 0)
        .count();
    assert_eq!(alive, 0, "merged members outlived their request");
}

#[test]
fn stale_merge_folders_are_swept() {
    let dir = scratch("sweep");
    // PID 1 is always alive; a PID past the kernel's maximum never is.
    std::fs::create_dir_all(dir.join("merged-abc.4194305")).unwrap();
    std::fs::create_dir_all(dir.join("merged-def.1")).unwrap();
    std::fs::create_dir_all(dir.join("plain")).unwrap();
    assert_eq!(tessera::merge::sweep_stale(&dir), 1);
    assert!(!dir.join("merged-abc.4194305").exists());
    assert!(dir.join("merged-def.1").exists() && dir.join("plain").exists());
}

// ---- 14, 15. parameters -------------------------------------------------------

#[test]
fn stop_sequences_and_tiny_temperatures_are_refused_by_name() {
    let many = GenParams {
        stop: (0..17).map(|i| i.to_string()).collect(),
        ..Default::default()
    };
    assert!(many.validate().unwrap_err().to_string().contains("stop sequences"));
    let long = GenParams {
        stop: vec!["s".repeat(257)],
        ..Default::default()
    };
    assert!(long
        .validate()
        .unwrap_err()
        .to_string()
        .contains("stop sequence of 257"));
    let tiny = GenParams {
        temperature: Some(1e-30),
        ..Default::default()
    };
    assert!(tiny.validate().unwrap_err().to_string().contains("temperature"));
}

#[test]
fn wire_messages_show_no_paths_or_backtraces() {
    let m = server::scrub(
        "invalid module /root/.cache/tessera/registry/blobs/ab.wasm: bad\nStack backtrace:\n   0: /rustc/x/core.rs",
    );
    assert_eq!(m, "invalid module ab.wasm: bad");
}

// ---- the server ------------------------------------------------------------------

struct Srv {
    base: String,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The test servers' configuration: short timeouts.
fn srv_cfg() -> ServeConfig {
    ServeConfig {
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(1),
        ..ServeConfig::default()
    }
}

impl Srv {
    async fn start(rt: Arc<Runtime>, registry: Arc<Registry>) -> Self {
        Self::start_with(rt, registry, srv_cfg()).await
    }

    async fn start_with(rt: Arc<Runtime>, registry: Arc<Registry>, cfg: ServeConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(AppState::new(rt, registry, cfg).expect("server state"));
        tokio::spawn(server::serve(state, listener, async {
            let _ = rx.await;
        }));
        Srv {
            base: format!("http://{addr}"),
            addr,
            stop: Some(tx),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn post(url: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("the server answers");
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.unwrap_or(Value::Null))
}

fn chat(model: &str, content: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": content }], "max_tokens": 4 })
}

/// A server over the double with one admin tenant and two plain ones.
async fn keyed(tag: &str) -> (Srv, Arc<Registry>, Arc<double::Counts>, [String; 3]) {
    let (rt, counts) = double::runtime(tag, Policy::default());
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let admin = TenantPolicy {
        admin: true,
        requests_per_minute: 0,
        ..TenantPolicy::default()
    };
    let plain = TenantPolicy {
        requests_per_minute: 0,
        ..TenantPolicy::default()
    };
    let keys = [
        registry.add_tenant("root", &admin).unwrap(),
        registry.add_tenant("alice", &plain).unwrap(),
        registry.add_tenant("bob", &plain).unwrap(),
    ];
    let srv = Srv::start(Arc::new(rt), registry.clone()).await;
    (srv, registry, counts, keys)
}

/// Sends raw HTTP and returns the status line and headers the server
/// answered with, after sending only `sent` bytes of a body announced as
/// `declared`.
fn raw(addr: std::net::SocketAddr, path: &str, key: Option<&str>, declared: usize, sent: usize) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(&vec![b' '; sent]);
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn the_front_door_authenticates_and_caps_bodies_before_reading_them() {
    let (srv, _, counts, keys) = keyed("front").await;
    let addr = srv.addr;
    let key = keys[1].clone();
    let answers = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        // 60 MB announced, a few bytes sent, no key: 401 at once.
        let no_key = raw(addr, "/v1/chat/completions", None, 60 << 20, 16);
        // With a key: 413 from the declared length, in the OpenAI shape.
        let too_big = raw(addr, "/v1/chat/completions", Some(&key), 3 << 20, 16);
        (no_key, too_big, started.elapsed())
    })
    .await
    .unwrap();
    assert!(answers.0.starts_with("HTTP/1.1 401"), "{}", answers.0);
    assert!(answers.1.starts_with("HTTP/1.1 413"), "{}", answers.1);
    assert!(answers.1.contains("body_too_large"), "{}", answers.1);
    assert!(answers.2 < Duration::from_secs(5), "{:?}", answers.2);
    // A method the route does not have: 405 in the OpenAI shape.
    let r = reqwest::Client::new()
        .get(srv.url("/v1/chat/completions"))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    assert_eq!(counts.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let (srv, _, _, _) = keyed("slowloris").await;
    let addr = srv.addr;
    let (answer, took) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).unwrap_or(0);
        (String::from_utf8_lossy(&buf[..n]).into_owned(), started.elapsed())
    })
    .await
    .unwrap();
    // Closed (or answered 408) after the 1 s header timeout, not held open.
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn member_requests_meet_the_input_rule_and_parameter_limits() {
    let (srv, _, counts, keys) = keyed("rule").await;
    let url = srv.url("/v1/chat/completions");
    let k = Some(keys[1].as_str());
    let (status, v) = post(&url, k, &chat("echo", &"x".repeat(300 << 10))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("262144"), "{v}");
    // Many empty turns count their template.
    let turns: Vec<Value> = (0..9000).map(|_| json!({"role": "user", "content": ""})).collect();
    let (status, v) = post(&url, k, &json!({"model": "echo", "messages": turns})).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        &srv.url("/v1/completions"),
        k,
        &json!({"model": "echo", "prompt": "x".repeat(300 << 10)}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let (status, v) = post(
        &url,
        k,
        &json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stop": stops}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        &url,
        k,
        &json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-30}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        counts.calls.load(Ordering::SeqCst),
        0,
        "a refused request reached a member"
    );
    let (status, v) = post(&url, k, &chat("echo", "hello")).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn embedding_usage_is_the_embedders_tokens() {
    let (srv, _, _, keys) = keyed("embed-usage").await;
    let body = json!({"model": "embedder", "input": ["a b c", "hello"]});
    let (status, v) = post(&srv.url("/v1/embeddings"), Some(&keys[1]), &body).await;
    assert_eq!(status, 200, "{v}");
    // The double's embedder reads one token per byte: 5 + 5, not 4 words.
    assert_eq!(v["usage"]["prompt_tokens"], 10, "{v}");
    assert_eq!(v["usage"]["total_tokens"], 10, "{v}");
}

/// A system whose module trains is charged its trained tokens (three
/// times a read token), which OpenAI's usage fields cannot show: the
/// answer's `billed_tokens` says what the tenant's quota was charged.
#[tokio::test]
async fn a_system_that_trains_says_what_it_was_billed() {
    let pool = tessera::pool::PoolConfig {
        members: tessera::pool::PoolConfig::default_pool()
            .members
            .into_iter()
            .filter(|m| m.id == crate::common::SMOL)
            .collect(),
    };
    let mut paths = crate::common::scratch_paths("billed-training");
    paths.registry = scratch("billed-training-registry");
    let rt = Runtime::new(paths, &pool, Policy::default()).unwrap();
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let plain = TenantPolicy {
        requests_per_minute: 0,
        ..TenantPolicy::default()
    };
    let key = registry.add_tenant("carol", &plain).unwrap();
    // Training on a busy 2-core machine takes longer than the other
    // servers' 30 s.
    let cfg = ServeConfig {
        request_timeout: Duration::from_secs(600),
        ..srv_cfg()
    };
    let srv = Srv::start_with(Arc::new(rt), registry.clone(), cfg).await;
    let body = json!({
        "model": "teach",
        "messages": [{"role": "user", "content": "What is the secret word?"}],
        "max_tokens": 4,
        "tessera": {"base": crate::common::SMOL, "steps": 1, "lr": 1e-6,
                    "lessons": "What is the secret word? => The secret word is tessellate."},
    });
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &body).await;
    assert_eq!(status, 200, "{v}");
    let u = &v["usage"];
    let trained = v["provenance"]["usage"]["train_tokens"].as_u64().unwrap_or(0);
    assert!(trained > 0, "{v}");
    let billed = u["billed_tokens"].as_u64().unwrap_or(0);
    assert_eq!(billed, u["total_tokens"].as_u64().unwrap_or(0) + 3 * trained, "{v}");
    let day = day_of(server::now_unix() as i64);
    assert_eq!(registry.tokens_used("carol", day).unwrap(), billed);
}

#[tokio::test]
async fn scoring_charges_the_prompt_with_the_continuations() {
    // A long prompt scored against one-byte continuations used to cost the
    // continuations alone, so a tenant's daily token quota never saw the
    // prompt's work. The double reads one prompt token per byte.
    let (srv, registry, _, keys) = keyed("score-charge").await;
    let day = || day_of(server::now_unix() as i64);
    let body = json!({"model": "echo", "prompt": "x".repeat(3000), "continuations": ["a", "bb"]});
    let (status, v) = post(&srv.url("/v1/tessera/score"), Some(&keys[1]), &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["scores"][0]["prompt_tokens"], 3000, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 3003, "{v}");
    assert_eq!(registry.tokens_used("alice", day()).unwrap(), 3003);
    // A module's score calls are charged the same way, and the answer's
    // usage says what was charged.
    let question = format!("Is this long? {}\nA) yes\nB) no", "y".repeat(3000));
    let body = json!({"model": "option-fusion", "messages": [{"role": "user", "content": question}]});
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&keys[2]), &body).await;
    assert_eq!(status, 200, "{v}");
    let charged = registry.tokens_used("bob", day()).unwrap();
    assert!(charged > 3000, "charged {charged}: {v}");
    assert_eq!(v["usage"]["total_tokens"], charged, "{v}");
}

#[tokio::test]
async fn removing_the_last_tenant_does_not_open_a_running_server() {
    let (rt, _) = double::runtime("lasttenant", Policy::default());
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let key = registry.add_tenant("only", &TenantPolicy::default()).unwrap();
    let srv = Srv::start(Arc::new(rt), registry.clone()).await;
    let url = srv.url("/v1/chat/completions");
    assert_eq!(post(&url, Some(&key), &chat("echo", "hi")).await.0, 200);
    assert!(registry.remove_tenant("only").unwrap());
    assert_eq!(post(&url, None, &chat("echo", "hi")).await.0, 401);
    let r = reqwest::Client::new()
        .get(srv.url("/v1/tessera/modules"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

fn publish(registry: &Registry, rt: &Runtime, hostile: &str, name: &str) {
    let wasm = std::fs::read(hostile_path(hostile)).unwrap();
    let manifest = std::fs::read_to_string(hostile_path(hostile).with_extension("toml"))
        .unwrap()
        .replace(&format!("name = \"hostile-{hostile}\""), &format!("name = \"{name}\""));
    server::publish_checked(registry, rt, &wasm, &manifest, None).expect("publishes");
}

#[tokio::test]
async fn one_tenant_cannot_get_a_system_quarantined_for_the_others() {
    let (rt, _) = double::runtime("quarantine", Policy::default());
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let alice = registry
        .add_tenant(
            "alice",
            &TenantPolicy {
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let bob = registry
        .add_tenant(
            "bob",
            &TenantPolicy {
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let root = registry
        .add_tenant(
            "root",
            &TenantPolicy {
                requests_per_minute: 0,
                admin: true,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    publish(&registry, &rt, "liar", "fragile");
    let srv = Srv::start(Arc::new(rt), registry).await;
    let url = srv.url("/v1/chat/completions");
    let body = json!({"model": "fragile", "messages": [{"role": "user", "content": "hi"}], "tessera": {"claim": "not-permitted"}});
    for _ in 0..3 {
        let (status, v) = post(&url, Some(&alice), &body).await;
        // What the module claims is not the caller's fault: 502, not 403.
        assert_eq!(status, 502, "{v}");
        assert_eq!(v["error"]["code"], "module-failed", "{v}");
    }
    let (status, v) = post(&url, Some(&alice), &body).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "module_quarantined");
    // The listings say so, per key: alice sees the module quarantined for
    // her (in the registry's list and among the models), bob sees it runs,
    // and neither (not admins) sees how many keys are affected.
    let fragile = |key: &str, path: &str| {
        let url = srv.url(path);
        let key = key.to_string();
        async move {
            let v: Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("the server answers")
                .json()
                .await
                .expect("JSON");
            let row = v["data"]
                .as_array()
                .expect("a list")
                .iter()
                .find(|e| e["name"] == "fragile" || e["id"] == "fragile")
                .cloned()
                .expect("fragile is listed");
            row
        }
    };
    let mine = fragile(&alice, "/v1/tessera/modules").await;
    let left = mine["quarantine"]["for_this_key_s"]
        .as_u64()
        .expect("quarantined for alice");
    assert!((1..=30).contains(&left), "{mine}");
    assert!(mine["quarantine"].get("keys").is_none(), "{mine}");
    assert!(mine["budgets"]["deadline_ms"].as_u64().unwrap() > 0, "{mine}");
    // A module that asks nothing for its fit is granted its request's.
    assert_eq!(
        mine["fit_budgets"]["host_calls"], mine["budgets"]["host_calls"],
        "{mine}"
    );
    let listed = fragile(&alice, "/v1/models").await;
    assert!(
        listed["tessera"]["quarantine"]["for_this_key_s"].as_u64().is_some(),
        "{listed}"
    );
    let admin = fragile(&root, "/v1/tessera/modules").await;
    assert_eq!(admin["quarantine"]["keys"], 1, "an admin sees how many keys: {admin}");
    let theirs = fragile(&bob, "/v1/tessera/modules").await;
    assert!(theirs["quarantine"]["for_this_key_s"].is_null(), "{theirs}");
    // Bob still gets the system run.
    let (status, v) = post(&url, Some(&bob), &body).await;
    assert_eq!(status, 502, "{v}");
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_work_and_is_charged_for_it() {
    let (srv, registry, counts, keys) = keyed("disconnect").await;
    let body = json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000});
    // 1,000 tokens at 20 ms would take 20 s; the client leaves after 0.5 s.
    leave_after(&srv.url("/v1/chat/completions"), &keys[1], &body, 500).await;
    wait_for(5, || counts.slow_ended.load(Ordering::SeqCst) > 0).await;
    assert_eq!(counts.slow_ended.load(Ordering::SeqCst), 1, "the generation went on");
    let made = counts.slow_tokens.load(Ordering::SeqCst);
    assert!(made < 200, "{made} tokens after the client left");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let day = day_of(server::now_unix() as i64);
    let charged = registry.tokens_used("alice", day).unwrap();
    assert!(charged >= made, "charged {charged} for {made} tokens");
}

#[tokio::test]
async fn a_client_that_leaves_before_its_first_token_frees_its_place() {
    let (srv, _, counts, keys) = keyed("leavequeued").await;
    // "hold": the member says nothing until its deadline (the server's
    // request timeout, minutes), as a generation queued behind others.
    for stream in [false, true] {
        let body = json!({
            "model": "slow",
            "messages": [{"role": "user", "content": "hold"}],
            "max_tokens": 5,
            "stream": stream,
        });
        let before = counts.slow_dropped.load(Ordering::SeqCst);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let sent = client
            .post(srv.url("/v1/chat/completions"))
            .bearer_auth(&keys[1])
            .json(&body)
            .send()
            .await;
        if stream {
            // The stream's head arrives at once; leave while reading it.
            if let Ok(r) = sent {
                let _ = tokio::time::timeout(Duration::from_millis(300), r.bytes()).await;
            }
        } else {
            assert!(sent.is_err(), "the client was meant to time out");
        }
        let started = Instant::now();
        while counts.slow_dropped.load(Ordering::SeqCst) == before && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            counts.slow_dropped.load(Ordering::SeqCst),
            before + 1,
            "stream {stream}: the waiting generation outlived its client"
        );
    }
    assert_eq!(counts.slow_tokens.load(Ordering::SeqCst), 0, "nothing was generated");
}

#[tokio::test]
async fn a_client_that_leaves_during_a_modules_score_call_pays_for_it() {
    // The double's scorer works on a prompt that says "hold" until its
    // deadline (the server's, minutes away). A score call reads no sink, so
    // it never stops early: before, the run sat in it until the server gave
    // up on the run, and everything the request had used went unbilled.
    let (srv, registry, _, keys) = keyed("scoreleave").await;
    let question = format!("Please hold. {}\nA) yes\nB) no", "y".repeat(4000));
    let body = json!({"model": "option-fusion", "messages": [{"role": "user", "content": question}]});
    // Long enough for the module to reach its score call on a slow machine.
    leave_after(&srv.url("/v1/chat/completions"), &keys[1], &body, 1000).await;
    let used = || {
        registry
            .tokens_used("alice", day_of(server::now_unix() as i64))
            .unwrap()
    };
    wait_for(5, || used() > 0).await;
    let charged = used();
    assert!((1000..2000).contains(&charged), "charged {charged}");
    // The score endpoint left the same way: the handler is dropped, the
    // member's job runs on, and the input's bytes / 4 are charged.
    let body = json!({"model": "echo", "prompt": format!("hold {}", "z".repeat(3995)), "continuations": ["a"]});
    leave_after(&srv.url("/v1/tessera/score"), &keys[1], &body, 1000).await;
    wait_for(5, || used() > charged).await;
    assert_eq!(used() - charged, 1001);
}

/// Posts `body` to `url` as a client that gives up after `ms`, before the
/// server has answered.
async fn leave_after(url: &str, key: &str, body: &Value, ms: u64) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(ms))
        .build()
        .unwrap();
    let sent = client.post(url).bearer_auth(key).json(body).send().await;
    assert!(sent.is_err(), "the client was meant to time out");
}

/// Waits up to `secs` seconds for `done` to hold.
async fn wait_for(secs: u64, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() && started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server over the double whose requests may take `timeout` in all,
/// with one tenant (`alice`, no quotas): its key comes back.
async fn timed(tag: &str, timeout: Duration, max_inflight: usize) -> (Srv, Arc<double::Counts>, Arc<Registry>, String) {
    let (rt, counts) = double::runtime(tag, Policy::default());
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let open = TenantPolicy {
        requests_per_minute: 0,
        ..TenantPolicy::default()
    };
    let key = registry.add_tenant("alice", &open).unwrap();
    let cfg = ServeConfig {
        request_timeout: timeout,
        max_inflight,
        ..srv_cfg()
    };
    (
        Srv::start_with(Arc::new(rt), registry.clone(), cfg).await,
        counts,
        registry,
        key,
    )
}

#[tokio::test]
async fn a_modules_score_call_cut_by_the_deadline_is_charged() {
    // A score call has no sink to stop it and reports no usage when the
    // deadline cuts it, though its member worked until then: it is charged
    // its input's bytes / 4, where before such a request cost nothing.
    let (srv, _, registry, key) = timed("scorecut", Duration::from_secs(1), 4).await;
    let question = format!("Please hold. {}\nA) yes\nB) no", "y".repeat(4000));
    let body = json!({"model": "option-fusion", "messages": [{"role": "user", "content": question}]});
    let used = || {
        registry
            .tokens_used("alice", day_of(server::now_unix() as i64))
            .unwrap()
    };
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let charged = used();
    assert!((1000..2000).contains(&charged), "charged {charged}");
    // The same on the score endpoint: 4,000 bytes held past the timeout.
    let body = json!({"model": "echo", "prompt": format!("hold {}", "z".repeat(3995)), "continuations": ["a"]});
    let (status, v) = post(&srv.url("/v1/tessera/score"), Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let now = used();
    assert_eq!(now - charged, 1001, "charged {now} after {charged}");
    // A call that expired in its member's queue never ran: a timeout, and
    // nothing charged, from the endpoint or from a module.
    let body = json!({"model": "echo", "prompt": format!("expire {}", "z".repeat(3993)), "continuations": ["a"]});
    let (status, v) = post(&srv.url("/v1/tessera/score"), Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let question = format!("Let it expire. {}\nA) yes\nB) no", "y".repeat(4000));
    let body = json!({"model": "option-fusion", "messages": [{"role": "user", "content": question}]});
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let after = used();
    assert_eq!(after, now, "an expired call was charged");
}

#[tokio::test]
async fn the_request_timeout_covers_the_wait_for_a_place() {
    // One place; the first request holds it for about 1 s (50 tokens at
    // 20 ms), the second waits for it and then asks for 20 s of tokens.
    let (srv, counts, registry, key) = timed("waitcounts", Duration::from_secs(2), 1).await;
    let url = srv.url("/v1/chat/completions");
    let first = {
        let (url, key) = (url.clone(), key.clone());
        tokio::spawn(async move {
            let body = json!({"model": "slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50});
            post(&url, Some(&key), &body).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let body = json!({"model": "slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000});
    let started = Instant::now();
    let (status, v) = post(&url, Some(&key), &body).await;
    let took = started.elapsed();
    let (first_status, first_v) = first.await.unwrap();
    assert_eq!(first_status, 200, "{first_v}");
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error", "{v}");
    // Its 2 s began when it arrived, not when it got the place: it decoded
    // for what was left after the first one's second (about 50 tokens), not
    // for a fresh 2 s (about 100), and answered within the limit plus the
    // half second the server gives work to stop by itself.
    let second = counts.slow_tokens.load(Ordering::SeqCst) - 50;
    assert!(
        second < 80,
        "the waiting request decoded {second} tokens: it got a fresh timeout"
    );
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    // The member was stopped at the deadline with what it had used, and
    // that is charged: the tokens of both requests and their prompts.
    let charged = registry
        .tokens_used("alice", day_of(server::now_unix() as i64))
        .unwrap();
    let made = counts.slow_tokens.load(Ordering::SeqCst);
    assert_eq!(charged, made + 2, "charged {charged} for {made} tokens and two prompts");
}

#[tokio::test]
async fn a_system_stops_with_its_model_calls_at_the_request_timeout() {
    // majority-vote fans out to the members; `slow`, asked to "hold", says
    // nothing until its deadline. The module's own budget is 300 s: before
    // this was fixed, the server answered 504 at its timeout and left the
    // module and its calls running, detached and unbilled, for minutes.
    let (srv, counts, registry, key) = timed("systimeout", Duration::from_secs(1), 4).await;
    let url = srv.url("/v1/chat/completions");
    let body = json!({
        "model": "majority-vote",
        "messages": [{"role": "user", "content": "hold"}],
        "max_tokens": 5,
        // Two of the four samples go to `slow` (round robin over echo and slow).
        "tessera": {"k": 4},
    });
    // As many times as the breaker's threshold, and once more: a module
    // stopped by the server's timeout is not quarantined for it.
    for round in 0..4 {
        let ended = || counts.slow_ended.load(Ordering::SeqCst) + counts.slow_dropped.load(Ordering::SeqCst);
        let before = ended();
        let (status, v) = post(&url, Some(&key), &body).await;
        assert_eq!(status, 504, "round {round}: {v}");
        assert_eq!(v["error"]["type"], "timeout_error", "round {round}: {v}");
        let started = Instant::now();
        while ended() < before + 2 && started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            ended(),
            before + 2,
            "round {round}: the module's calls to `slow` outlived the request"
        );
    }
    // The samples `echo` answered before the deadline are charged though
    // the run ended there (3 prompt and 2 completion tokens each, two per
    // round); the held ones, ended in their prompt, report no usage and are
    // charged their input's bytes / 4 (the turn "hold": 4 + 4 bytes plus
    // 32 for its template, so 10 tokens each, two per round).
    let charged = registry
        .tokens_used("alice", day_of(server::now_unix() as i64))
        .unwrap();
    assert_eq!(charged, 4 * 2 * 5 + 4 * 2 * 10);
    // The same held generation asked of the member directly.
    let body = json!({"model": "slow", "messages": [{"role": "user", "content": "hold"}], "max_tokens": 5});
    let (status, v) = post(&url, Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let now = registry
        .tokens_used("alice", day_of(server::now_unix() as i64))
        .unwrap();
    assert_eq!(now - charged, 10);
}

/// A server over the double (state under `tag`) with one tenant, `name`,
/// allowed 100 tokens a day and any number of requests a minute: the
/// server, the double's counters, the registry and the tenant's key.
async fn hundred_token_day(tag: &str, name: &str) -> (Srv, Arc<double::Counts>, Arc<Registry>, String) {
    let (rt, counts) = double::runtime(tag, Policy::default());
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let capped = TenantPolicy {
        requests_per_minute: 0,
        tokens_per_day: 100,
        ..TenantPolicy::default()
    };
    let key = registry.add_tenant(name, &capped).unwrap();
    let srv = Srv::start(Arc::new(rt), registry.clone()).await;
    (srv, counts, registry, key)
}

#[tokio::test]
async fn a_member_chat_stops_where_the_daily_quota_ends() {
    // Admission lets a tenant in while it has any tokens left today; the
    // completion may then take only what is left after the prompt, where
    // before one request with a large max_tokens ran as far past the
    // quota as it asked.
    let (srv, counts, registry, key) = hundred_token_day("quota-cap", "dave").await;
    let url = srv.url("/v1/chat/completions");
    let body = json!({"model": "slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000});
    let (status, v) = post(&url, Some(&key), &body).await;
    assert_eq!(status, 200, "{v}");
    // "go" and its turn's template count about 10 tokens; 90 are left.
    assert_eq!(v["usage"]["completion_tokens"], 90, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(counts.slow_tokens.load(Ordering::SeqCst), 90);
    let used = registry.tokens_used("dave", day_of(server::now_unix() as i64)).unwrap();
    assert!(used <= 100, "charged {used} of a 100-token day");
    // The double charged 1 prompt and 90 completion tokens, so 9 are left:
    // the same prompt no longer fits, and is refused with the quota's 429
    // before it reaches the member.
    let (status, v) = post(&url, Some(&key), &body).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "tokens_per_day", "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("9 tokens"), "{v}");
    assert_eq!(counts.slow_tokens.load(Ordering::SeqCst), 90);
}

#[tokio::test]
async fn a_system_chat_stops_where_the_daily_quota_ends() {
    // A system's calls are not known at admission, which only checks that
    // some tokens are left; before, one majority-vote request with a large
    // max_tokens ran its two `slow` samples to 1,000 tokens each and was
    // charged 2,012 of a 100-token day. Now the module runs metered: each
    // sample may write only what the inputs leave of the day, and a call
    // that would pass it ends the run with the quota's 429, not held
    // against the module.
    let (srv, counts, registry, key) = hundred_token_day("quota-system", "erin").await;
    let url = srv.url("/v1/chat/completions");
    let body = json!({
        "model": "majority-vote",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1000,
        "tessera": {"k": 4},
    });
    let used = || registry.tokens_used("erin", day_of(server::now_unix() as i64)).unwrap();
    let (status, v) = post(&url, Some(&key), &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(used() <= 100, "charged {} of a 100-token day", used());
    assert!(counts.slow_tokens.load(Ordering::SeqCst) < 100);
    // Asked again until the day is spent: the run that would pass it is
    // refused with the quota's code, and the day is never overspent.
    let mut refused = None;
    for _ in 0..6 {
        let (status, v) = post(&url, Some(&key), &body).await;
        assert!(used() <= 100, "charged {} of a 100-token day", used());
        if status == 429 {
            refused = Some(v);
            break;
        }
        assert_eq!(status, 200, "{v}");
    }
    let v = refused.expect("the day's quota ends the requests");
    assert_eq!(v["error"]["code"], "tokens_per_day", "{v}");
}

#[tokio::test]
async fn a_system_that_only_computes_is_charged_and_stopped_at_the_daily_quota() {
    // A module that spins instead of calling members used to cost its
    // tenant nothing: a 100-token day let it run to its 20 s deadline as
    // often as the rate limit allowed. Its fuel is charged now (a token per
    // 10M), so it is stopped where that reaches the day, with the quota's
    // 429, and the day is charged about 100 tokens.
    let mut paths = tessera::Paths::from_env();
    paths.state = scratch("quota-spin-state");
    paths.registry = scratch("quota-spin-registry");
    paths.modules = scratch("quota-spin-modules");
    crate::common::spin_module(&paths.modules, "spin", "fuel=50000000000\ndeadline_ms=20000");
    let rt = Runtime::with_models(paths, Arc::new(Scripted::new()), Policy::default(), Vec::new()).unwrap();
    let registry = Arc::new(Registry::open(&rt.paths().registry).unwrap());
    let day = TenantPolicy {
        requests_per_minute: 0,
        tokens_per_day: 100,
        ..TenantPolicy::default()
    };
    let key = registry.add_tenant("spinner", &day).unwrap();
    let srv = Srv::start(Arc::new(rt), registry.clone()).await;
    let started = Instant::now();
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &chat("spin", "go")).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "tokens_per_day", "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped at the quota, not the deadline"
    );
    // Checked every 5 ms tick: the day is passed by what a tick computes
    // (a few tokens here; room for a ticker a busy machine runs late). To
    // its deadline the spin would have been charged thousands.
    let used = registry
        .tokens_used("spinner", day_of(server::now_unix() as i64))
        .unwrap();
    assert!((100..400).contains(&used), "charged {used} of a 100-token day");
    // The day is spent: the next request is refused at admission.
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &chat("spin", "go")).await;
    assert_eq!(status, 429, "{v}");
}

#[tokio::test]
async fn a_fan_out_given_up_charges_its_ended_calls_what_they_used() {
    // majority-vote fans out four samples; `echo` answers two at once,
    // `slow` holds the other two silently. The client leaves, so the
    // fan-out is given up with the held calls unfinished: those are charged
    // as cut calls (their input's bytes / 4: 10 tokens each), and the two
    // that ended what they reported (3 prompt and 2 completion tokens),
    // where before every call of a given-up fan-out was charged as cut.
    let (srv, counts, registry, key) = timed("fanout-gone", Duration::from_secs(20), 4).await;
    let body = json!({
        "model": "majority-vote",
        "messages": [{"role": "user", "content": "hold"}],
        "max_tokens": 5,
        "tessera": {"k": 4},
    });
    let leaving = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let sent = leaving
        .post(srv.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up first: {sent:?}");
    let used = || {
        registry
            .tokens_used("alice", day_of(server::now_unix() as i64))
            .unwrap()
    };
    let started = Instant::now();
    while used() == 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(used(), 2 * 5 + 2 * 10);
    assert_eq!(
        counts.slow_tokens.load(Ordering::SeqCst),
        0,
        "the held calls generated nothing"
    );
}

#[tokio::test]
async fn a_modules_model_calls_cut_by_the_deadline_are_charged() {
    // majority-vote's sample on `slow` wants 1,000 tokens (20 s); the
    // request may take 1 s. The call is stopped at the deadline and comes
    // back with its usage, which the tenant pays for: before, a call cut by
    // its deadline reported nothing, so such requests were free.
    let (srv, counts, registry, key) = timed("syscharge", Duration::from_secs(1), 4).await;
    let body = json!({
        "model": "majority-vote",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1000,
        "tessera": {"k": 2},
    });
    let (status, v) = post(&srv.url("/v1/chat/completions"), Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    let made = counts.slow_tokens.load(Ordering::SeqCst);
    assert!(made > 0, "slow generated nothing");
    let charged = registry
        .tokens_used("alice", day_of(server::now_unix() as i64))
        .unwrap();
    // `slow`'s tokens and its prompt, plus the other sample's (echo) usage.
    assert!(charged > made, "charged {charged} for {made} tokens");
    assert_eq!(
        counts.slow_dropped.load(Ordering::SeqCst),
        0,
        "the call was dropped, not stopped"
    );
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_token_gets_an_error_status() {
    let (srv, counts, _, key) = timed("streamstatus", Duration::from_secs(1), 4).await;
    let url = srv.url("/v1/chat/completions");
    // Times out before its first token: a 504 with the error body, as
    // without streaming, instead of a 200 whose only event is the error.
    let body =
        json!({"model": "slow", "messages": [{"role": "user", "content": "hold"}], "max_tokens": 5, "stream": true});
    let (status, v) = post(&url, Some(&key), &body).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "deadline", "{v}");
    // A stream that starts is a stream, and ends with [DONE].
    let body =
        json!({"model": "slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3, "stream": true});
    let r = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("\"content\":\"x\"").count(), 3, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(counts.slow_tokens.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_broken_registry_is_the_servers_fault() {
    let (srv, registry, _, keys) = keyed("brokenreg").await;
    let db = registry.dir().join("registry.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("DROP TABLE modules;").unwrap();
    drop(conn);
    let r = reqwest::Client::new()
        .get(srv.url("/v1/tessera/modules"))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "internal", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("registry database"),
        "{v}"
    );
}

// ---- streaming the answer (`output`, WIT 0.1.2) ------------------------------

#[tokio::test]
async fn a_streamed_answer_begins_the_returned_one_and_counts_against_the_output_budget() {
    let (rt, _) = double::runtime("stream", Policy::default());
    let m = load(&rt, "stream-liar");
    assert!(m.streams, "a module importing `output` is known to stream");
    assert!(!load(&rt, "liar").streams, "one that does not, is not");
    // Kept contract: the pieces reach the caller in order as they are sent,
    // and the answer begins with all of them.
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let into = got.clone();
    let sink: tessera::inference::TextSink = Box::new(move |p: &str| {
        into.lock().unwrap().push(p.to_string());
        true
    });
    let (out, _) = rt
        .run_metered(
            &m,
            with(&[("case", "honest")]),
            None,
            tessera::Metering {
                output: Some(sink),
                ..Default::default()
            },
        )
        .await;
    let out = out.expect("an honest stream answers");
    let pieces = got.lock().unwrap().clone();
    assert_eq!(&pieces[..2], ["Par", "is"], "{pieces:?}");
    assert!(pieces.len() >= 3, "the generation was streamed too: {pieces:?}");
    let streamed = pieces.concat();
    assert!(
        out.text.starts_with(&streamed) && out.text.len() > streamed.len(),
        "{streamed:?} begins {:?}",
        out.text
    );
    assert!(
        out.provenance
            .iter()
            .any(|e| matches!(e, tessera::ProvenanceEvent::HostCall { call, .. } if call == "generate-streamed")),
        "the streamed generation is in the provenance"
    );
    // Without a streaming caller the same run gives the same answer.
    let plain = rt
        .run(&m, with(&[("case", "honest")]))
        .await
        .expect("answers unstreamed");
    assert_eq!(plain.text, out.text);
    // Broken contract, streamed or not: the module failed, typed.
    for case in ["mismatch", "generate"] {
        let err = rt.run(&m, with(&[("case", case)])).await.unwrap_err();
        assert!(
            matches!(&err, Error::ModuleFailed { message } if message.contains("does not begin")),
            "{case}: {err:?}"
        );
    }
    // Streaming without end: stopped by the output budget (64 KiB here).
    let err = rt.run(&m, with(&[("case", "flood")])).await.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, limit } if budget == "output-size" && *limit == 65536),
        "{err:?}"
    );
    // Empty and one-byte pieces without end: each write is a host call, so
    // the pieces stop at that budget, long before their bytes would.
    let err = rt.run(&m, with(&[("case", "dribble")])).await.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, .. } if budget == "host-calls"),
        "{err:?}"
    );
}

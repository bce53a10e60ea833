//! `tessera serve` end to end on the real pool: the official `openai`
//! Python client against the real binary; the registry (publish, restart,
//! signatures, kill -9 during a publish); tenants and quotas; a saturated
//! server answering 503 fast; hostile modules answered with typed errors;
//! graceful shutdown; a member whose file is missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::registry::tenants::TenantPolicy;
use tessera::registry::Registry;
use tessera::server::{self, AppState, ServeConfig};
use tessera::{Paths, Runtime};

use crate::common::{hostile_path, runtime_arc, scratch, tessera, MINILM, QWEN, SMOL};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// An in-process server on a free loopback port.
struct TestServer {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tessera::Error>>,
}

impl TestServer {
    async fn start(rt: Arc<Runtime>, registry: Arc<Registry>, cfg: ServeConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(AppState::new(rt, registry, cfg).expect("server state"));
        let task = tokio::spawn(server::serve(state, listener, async {
            let _ = rx.await;
        }));
        TestServer {
            base,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), self.task).await;
    }
}

fn cfg() -> ServeConfig {
    ServeConfig {
        request_timeout: Duration::from_secs(120),
        shutdown_grace: Duration::from_secs(30),
        ..ServeConfig::default()
    }
}

fn chat(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": prompt }], "max_tokens": max_tokens, "temperature": 0 })
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("the server answers");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, v)
}

/// Spawns the real binary; returns it and the address it printed.
fn spawn_serve(registry: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--registry"])
        .arg(registry)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tessera serve starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("tessera: listening on ") {
                    break a.to_string();
                }
            }
            _ => {
                let _ = child.kill();
                panic!("tessera serve exited before listening");
            }
        }
    };
    // Keep draining stdout so the server's last line finds a reader.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

fn terminate(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("tessera serve did not stop within 60 s of SIGTERM");
}

fn python() -> PathBuf {
    let p = std::env::var_os("TESSERA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Paths::from_env().models.parent().unwrap().join("venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run `make setup` (it makes a venv with the `openai` client)",
        p.display()
    );
    p
}

/// A copy of an installed module renamed to `name`, as a contributor would
/// publish it: `(wasm path, manifest path)` in `dir`.
fn renamed(src_wasm: &Path, name: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(src_wasm.with_extension("toml")).unwrap();
    let mut man: toml::Table = toml::from_str(&text).unwrap();
    man.insert("name".into(), toml::Value::String(name.into()));
    let wasm = dir.join(format!("{name}.wasm"));
    let toml_path = dir.join(format!("{name}.toml"));
    std::fs::copy(src_wasm, &wasm).unwrap();
    std::fs::write(&toml_path, toml::to_string(&man).unwrap()).unwrap();
    (wasm, toml_path)
}

fn installed(name: &str) -> PathBuf {
    Paths::from_env().modules.join(format!("{name}.wasm"))
}

#[test]
fn the_official_openai_python_client_works_against_tessera_serve() {
    let dir = scratch("serve-openai");
    let reg = dir.join("registry");
    let (ok, out, err) = tessera(&[
        "tenants",
        "add",
        "app",
        "--rpm",
        "0",
        "--registry",
        reg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let key = out.lines().next().unwrap().trim().to_string();
    assert!(key.starts_with("tsk-"), "{out}");
    let (child, addr) = spawn_serve(&reg, &["--max-inflight", "2"]);
    let status = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai/client_check.py"))
        .env("TESSERA_BASE_URL", format!("{addr}/v1"))
        .env("TESSERA_API_KEY", &key)
        .status()
        .expect("python runs");
    terminate(child);
    assert!(
        status.success(),
        "the openai client checks failed (see their output above)"
    );
}

#[test]
fn publish_serve_restart_remove_through_the_cli() {
    let dir = scratch("serve-registry");
    let reg = dir.join("registry");
    let r = reg.to_str().unwrap();
    let (wasm, _) = renamed(&installed("majority-vote"), "team-vote", &dir);
    let (ok, out, err) = tessera(&["modules", "publish", wasm.to_str().unwrap(), "--registry", r]);
    assert!(ok, "{err}");
    assert!(out.contains("published team-vote"), "{out}");
    // A standard module's name cannot be taken.
    let (clash, _) = renamed(&installed("majority-vote"), "majority-vote", &mkdir(dir.join("clash")));
    let (ok, _, err) = tessera(&["modules", "publish", clash.to_str().unwrap(), "--registry", r]);
    assert!(!ok && err.contains("standard module"), "{err}");
    // Not a component: refused by name, nothing registered.
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    std::fs::copy(dir.join("team-vote.toml"), dir.join("junk.toml")).unwrap();
    let (ok, _, err) = tessera(&["modules", "publish", junk.to_str().unwrap(), "--registry", r]);
    assert!(!ok && err.contains("not a WebAssembly component"), "{err}");

    let (ok, out, _) = tessera(&["modules", "list", "--json", "--registry", r]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Serve it, restart, serve it again.
    for round in 0..2 {
        let (child, addr) = spawn_serve(&reg, &[]);
        let client = reqwest::Client::new();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (status, _, v) = rt.block_on(post(
            &client,
            &format!("{addr}/v1/chat/completions"),
            None,
            &json!({ "model": "team-vote", "messages": [{ "role": "user", "content": "2+2? Answer with a number." }],
                     "max_tokens": 4, "seed": 1, "tessera": { "k": 2 } }),
        ));
        terminate(child);
        assert_eq!(status, 200, "round {round}: {v}");
        assert!(v["provenance"]["annotations"].is_object(), "{v}");
        assert!(v["provenance"]["events"].as_array().unwrap().len() >= 2, "{v}");
    }
    let (ok, out, _) = tessera(&["modules", "show", "team-vote", "--registry", r]);
    assert!(ok && out.contains("\"manifest\""), "{out}");
    let (ok, _, _) = tessera(&["modules", "remove", "team-vote", "--registry", r]);
    assert!(ok);
    let (ok, _, err) = tessera(&["modules", "remove", "team-vote", "--registry", r]);
    assert!(!ok && err.contains("no published module"), "{err}");
    assert_eq!(
        std::fs::read_dir(reg.join("blobs")).unwrap().count(),
        0,
        "the blob went with the row"
    );
}

fn mkdir(p: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn signatures_are_required_once_a_publisher_key_is_trusted() {
    let dir = scratch("serve-signing");
    let reg = dir.join("registry");
    let r = reg.to_str().unwrap();
    let prefix = dir.join("alice");
    let (ok, _, err) = tessera(&["modules", "keygen", "--out", prefix.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = tessera(&[
        "modules",
        "trust",
        dir.join("alice.pub").to_str().unwrap(),
        "--registry",
        r,
    ]);
    assert!(ok && out.contains("1 trusted key"), "{out} {err}");
    let (wasm, _) = renamed(&installed("majority-vote"), "alice-vote", &dir);
    // Unsigned: refused.
    let (ok, _, err) = tessera(&["modules", "publish", wasm.to_str().unwrap(), "--registry", r]);
    assert!(!ok && err.contains("only signed modules"), "{err}");
    // Signed: accepted, and the key is recorded.
    let (ok, _, err) = tessera(&[
        "modules",
        "sign",
        wasm.to_str().unwrap(),
        "--key",
        dir.join("alice.key").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = tessera(&["modules", "publish", wasm.to_str().unwrap(), "--registry", r]);
    assert!(ok && out.contains("signed by"), "{out} {err}");
    // Changed after signing: refused.
    let mut bytes = std::fs::read(&wasm).unwrap();
    bytes.extend_from_slice(&[0, 0]);
    let tampered = dir.join("tampered.wasm");
    std::fs::write(&tampered, &bytes).unwrap();
    std::fs::copy(dir.join("alice-vote.toml"), dir.join("tampered.toml")).unwrap();
    std::fs::copy(format!("{}.sig", wasm.display()), format!("{}.sig", tampered.display())).unwrap();
    let (ok, _, err) = tessera(&["modules", "publish", tampered.to_str().unwrap(), "--registry", r]);
    assert!(!ok && err.contains("does not verify"), "{err}");
    // The signed component under another name and author, with its
    // signature: refused, because the signature covers the manifest too.
    let spoofed = dir.join("spoofed.wasm");
    std::fs::copy(&wasm, &spoofed).unwrap();
    let manifest = std::fs::read_to_string(dir.join("alice-vote.toml"))
        .unwrap()
        .replace("name = \"alice-vote\"", "name = \"spoofed\"");
    std::fs::write(
        dir.join("spoofed.toml"),
        format!("{manifest}\n# republished by mallory\n"),
    )
    .unwrap();
    std::fs::copy(format!("{}.sig", wasm.display()), format!("{}.sig", spoofed.display())).unwrap();
    let (ok, _, err) = tessera(&["modules", "publish", spoofed.to_str().unwrap(), "--registry", r]);
    assert!(!ok && err.contains("does not verify"), "{err}");
}

/// Every listed module has its blob, and the blob hashes to its sha256.
fn assert_consistent(reg_dir: &Path) -> usize {
    let reg = Registry::open(reg_dir).expect("the registry opens after a crash");
    let list = reg.list().unwrap();
    for e in &list {
        let bytes = std::fs::read(reg.blob_path(&e.sha256)).expect("a listed module has its blob");
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), e.sha256);
    }
    list.len()
}

#[test]
fn kill_9_at_any_point_of_a_publish_leaves_the_old_or_the_new_module() {
    let dir = scratch("serve-kill9");
    let reg = dir.join("registry");
    let r = reg.to_str().unwrap();
    // The old state: version A published.
    let (a, _) = renamed(&installed("majority-vote"), "crashy", &dir);
    let (ok, _, err) = tessera(&["modules", "publish", a.to_str().unwrap(), "--registry", r]);
    assert!(ok, "{err}");
    let old_sha = Registry::open(&reg).unwrap().get("crashy").unwrap().unwrap().sha256;
    // The new state: a different component under the same name.
    let bdir = mkdir(dir.join("b"));
    let (b, _) = renamed(&installed("llm-blender"), "crashy", &bdir);
    let mut outcomes = std::collections::BTreeMap::new();
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 400, 800, 1500] {
        let mut child = Command::new(BIN)
            .args(["modules", "publish", b.to_str().unwrap(), "--registry", r])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = Command::new("kill").args(["-9", &child.id().to_string()]).status();
        let _ = child.wait();
        assert_eq!(assert_consistent(&reg), 1, "killed after {delay_ms} ms");
        let sha = Registry::open(&reg).unwrap().get("crashy").unwrap().unwrap().sha256;
        *outcomes.entry(if sha == old_sha { "old" } else { "new" }).or_insert(0) += 1;
        // Back to the old state for the next round.
        if sha != old_sha {
            let (ok, _, err) = tessera(&["modules", "publish", a.to_str().unwrap(), "--registry", r]);
            assert!(ok, "{err}");
        }
    }
    // Whatever the kills hit, a clean publish afterwards works.
    let (ok, _, err) = tessera(&["modules", "publish", b.to_str().unwrap(), "--registry", r]);
    assert!(ok, "{err}");
    assert_eq!(assert_consistent(&reg), 1);
    eprintln!("kill -9 outcomes: {outcomes:?}");
}

#[tokio::test]
async fn tenants_need_keys_and_meet_their_quotas_and_allow_lists() {
    let dir = scratch("serve-tenants");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let narrow = registry
        .add_tenant(
            "narrow",
            &TenantPolicy {
                modules: vec!["first-responder".into()],
                members: vec![SMOL.into()],
                requests_per_minute: 2,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let thrifty = registry
        .add_tenant(
            "thrifty",
            &TenantPolicy {
                // Room for the first prompt (about 10 tokens by its bytes),
                // which spends more (SmolLM2's chat template is ~30 tokens).
                tokens_per_day: 20,
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let srv = TestServer::start(runtime_arc(), registry.clone(), cfg()).await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");

    let (status, _, v) = post(&client, &url, None, &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, _, _) = post(&client, &url, Some("tsk-nope"), &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 401);

    // Allow-lists: members and systems outside them are refused.
    let (status, _, v) = post(&client, &url, Some(&narrow), &chat(QWEN, "hi", 2)).await;
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = post(&client, &url, Some(&narrow), &chat("majority-vote", "hi", 2)).await;
    assert_eq!(status, 403, "{v}");
    // /v1/models shows only what the key may use.
    let models: Value = client
        .get(srv.url("/v1/models"))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![SMOL, "first-responder"], "{models}");

    // Requests per minute: 2 refusals above already counted nothing (they
    // never got past the allow-list); two calls pass, the third is 429.
    for _ in 0..2 {
        let (status, _, v) = post(&client, &url, Some(&narrow), &chat(SMOL, "hi", 2)).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, headers, v) = post(&client, &url, Some(&narrow), &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "requests_per_minute");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // Tokens per day: the first call spends more than 20, the next is 429
    // until midnight UTC, and the count is in the registry (survives restarts).
    let (status, _, v) = post(&client, &url, Some(&thrifty), &chat(SMOL, "hi", 4)).await;
    assert_eq!(status, 200, "{v}");
    let (status, headers, v) = post(&client, &url, Some(&thrifty), &chat(SMOL, "hi", 4)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "tokens_per_day");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry <= 86_400);
    drop(registry);
    srv.stop().await;
}

#[tokio::test]
async fn a_saturated_server_answers_503_at_once_instead_of_queueing_without_bound() {
    let dir = scratch("serve-saturate");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let srv = TestServer::start(
        runtime_arc(),
        registry,
        ServeConfig {
            max_inflight: 1,
            max_queue: 1,
            ..cfg()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = post(
                &client,
                &url,
                None,
                &chat(QWEN, &format!("Write a long story about the number {i}."), 24),
            )
            .await;
            (r.0, r.1, started.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let (status, headers, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert!(took < Duration::from_secs(2), "a 503 must come at once, took {took:?}");
                assert_eq!(headers["retry-after"], "1");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
    srv.stop().await;
}

#[tokio::test]
async fn hostile_published_modules_get_typed_errors_and_the_server_keeps_serving() {
    let dir = scratch("serve-hostile");
    let registry = Arc::new(Registry::open(&dir.join("registry")).unwrap());
    let rt = runtime_arc();
    for (src, name) in [
        ("infinite-loop", "spinner"),
        ("memory-bomb", "bomber"),
        ("trap", "crasher"),
    ] {
        let (wasm, man) = renamed(&hostile_path(src), name, &dir);
        server::publish_checked(
            &registry,
            rt.as_ref(),
            &std::fs::read(wasm).unwrap(),
            &std::fs::read_to_string(man).unwrap(),
            None,
        )
        .unwrap();
    }
    let srv = TestServer::start(rt, registry, cfg()).await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");
    for (name, codes) in [
        ("spinner", &["deadline", "fuel"][..]),
        ("bomber", &["memory"][..]),
        ("crasher", &["trap"][..]),
    ] {
        let (status, _, v) = post(&client, &url, None, &chat(name, "hi", 4)).await;
        assert!(status == 502 || status == 504, "{name}: {status} {v}");
        let code = v["error"]["code"].as_str().unwrap();
        assert!(codes.contains(&code), "{name}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, _, v) = post(&client, &url, None, &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 200, "a member still answers: {v}");
    // Three faults in a row quarantine a module: it is refused without
    // running (no more CPU burnt on it), with a Retry-After.
    for _ in 0..2 {
        let (status, _, _) = post(&client, &url, None, &chat("crasher", "hi", 4)).await;
        assert_eq!(status, 502);
    }
    let started = Instant::now();
    let (status, headers, v) = post(&client, &url, None, &chat("crasher", "hi", 4)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "module_quarantined");
    assert!(started.elapsed() < Duration::from_secs(1));
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    srv.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let dir = scratch("serve-shutdown");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let srv = TestServer::start(runtime_arc(), registry, cfg()).await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");
    let in_flight = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { post(&client, &url, None, &chat(QWEN, "Tell me about the sea.", 24)).await })
    };
    // Stop only once the server has the request: one still on its way when
    // the listener closes is refused, which is not what this test is about.
    // A fixed sleep was not enough on a loaded 2-core CI machine.
    let metrics = srv.url("/metrics");
    let started = Instant::now();
    loop {
        let text = client.get(&metrics).send().await.unwrap().text().await.unwrap();
        if text.contains("tessera_running_requests 1\n") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the request never ran: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = srv.base.clone();
    let stopping = tokio::spawn(srv.stop());
    let (status, _, v) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finishes: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 24);
    stopping.await.unwrap();
    let refused = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat(SMOL, "hi", 2))
        .send()
        .await;
    assert!(refused.is_err(), "after shutdown nothing answers");
}

#[tokio::test]
async fn a_member_whose_file_is_missing_is_unavailable_and_the_rest_serve() {
    let dir = scratch("serve-missing");
    let mut pool = PoolConfig::default_pool();
    pool.members.retain(|m| m.id == SMOL || m.id == MINILM);
    let mut ghost = pool.members[0].clone();
    ghost.id = "ghost".into();
    ghost.path = "nowhere/ghost.gguf".into();
    pool.members.push(ghost);
    let rt = Arc::new(Runtime::new(Paths::from_env(), &pool, Policy::default()).unwrap());
    assert_eq!(rt.pool_failures().len(), 1);
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let srv = TestServer::start(rt, registry, cfg()).await;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(srv.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ghost = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "ghost")
        .expect("listed");
    assert_eq!(ghost["tessera"]["status"], "unavailable", "{ghost}");
    assert!(
        ghost["tessera"]["reason"].as_str().unwrap().contains("missing"),
        "{ghost}"
    );
    let (status, _, v) = post(&client, &srv.url("/v1/chat/completions"), None, &chat("ghost", "hi", 2)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "member_unavailable");
    let (status, _, v) = post(&client, &srv.url("/v1/chat/completions"), None, &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 200, "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn admins_publish_and_remove_over_http_and_others_may_not() {
    use base64::Engine as _;
    let dir = scratch("serve-http-publish");
    let registry = Arc::new(Registry::open(&dir.join("registry")).unwrap());
    let admin = registry
        .add_tenant(
            "ops",
            &TenantPolicy {
                admin: true,
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let user = registry.add_tenant("user", &TenantPolicy::default()).unwrap();
    let srv = TestServer::start(runtime_arc(), registry.clone(), cfg()).await;
    let client = reqwest::Client::new();
    let (wasm, man) = renamed(&installed("first-responder"), "http-responder", &dir);
    let upload = json!({
        "wasm_base64": base64::engine::general_purpose::STANDARD.encode(std::fs::read(&wasm).unwrap()),
        "manifest": std::fs::read_to_string(&man).unwrap(),
    });
    let url = srv.url("/v1/tessera/modules");
    let (status, _, v) = post(&client, &url, Some(&user), &upload).await;
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = post(
        &client,
        &url,
        Some(&admin),
        &json!({ "wasm_base64": "!!", "manifest": "" }),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, _, v) = post(&client, &url, Some(&admin), &upload).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], "http-responder");
    // Served at once, to anyone allowed.
    let (status, _, v) = post(
        &client,
        &srv.url("/v1/chat/completions"),
        Some(&user),
        &chat("http-responder", "Capital of France?", 6),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let del = |key: &str| {
        client
            .delete(srv.url("/v1/tessera/modules/http-responder"))
            .bearer_auth(key.to_string())
            .send()
    };
    assert_eq!(del(&user).await.unwrap().status().as_u16(), 403);
    assert_eq!(del(&admin).await.unwrap().status().as_u16(), 200);
    assert_eq!(del(&admin).await.unwrap().status().as_u16(), 404);
    let (status, _, v) = post(
        &client,
        &srv.url("/v1/chat/completions"),
        Some(&user),
        &chat("http-responder", "hi", 2),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn a_request_past_its_timeout_is_504_and_a_tenants_concurrency_is_capped() {
    let dir = scratch("serve-timeout");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let solo = registry
        .add_tenant(
            "solo",
            &TenantPolicy {
                max_concurrent: 1,
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let srv = TestServer::start(
        runtime_arc(),
        registry,
        ServeConfig {
            request_timeout: Duration::from_secs(2),
            ..cfg()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");
    // A long answer cannot finish in 2 s on this CPU.
    let slow = {
        let (client, url, key) = (client.clone(), url.clone(), solo.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = post(
                &client,
                &url,
                Some(&key),
                &chat(QWEN, "Write a long essay about the sea.", 400),
            )
            .await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile the same tenant's second request is over its concurrency.
    let (status, headers, v) = post(&client, &url, Some(&solo), &chat(SMOL, "hi", 2)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "max_concurrent");
    assert_eq!(headers["retry-after"], "1");
    let ((status, _, v), took) = slow.await.unwrap();
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("2 s limit"), "{v}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The place is given back: the next request is admitted, not refused
    // for concurrency. (On a loaded machine even two tokens can take more
    // than the 2 s limit; that is a 504, which also proves admission.)
    let (status, _, v) = post(&client, &url, Some(&solo), &chat(SMOL, "hi", 2)).await;
    assert!(
        status == 200 || (status == 504 && v["error"]["code"] == "deadline"),
        "{status} {v}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_streamed_request_that_cannot_run_gets_its_status_before_any_stream() {
    let dir = scratch("serve-stream-status");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let srv = TestServer::start(runtime_arc(), registry, cfg()).await;
    let client = reqwest::Client::new();
    let url = srv.url("/v1/chat/completions");
    // About 20,000 tokens: within the input rule, past SmolLM2's context.
    let mut body = chat(SMOL, &"hello ".repeat(20_000), 8);
    body["stream"] = json!(true);
    let r = client.post(&url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    assert_eq!(status, 400, "{v}");
    assert!(kind.starts_with("application/json"), "{kind}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("context"), "{v}");
    // The same member streams a request that fits.
    let mut body = chat(SMOL, "Say hello.", 4);
    body["stream"] = json!(true);
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    srv.stop().await;
}

#[tokio::test]
async fn python_and_javascript_strategies_are_published_and_served_like_rust_ones() {
    let dir = scratch("serve-languages");
    let registry = Arc::new(Registry::open(&dir.join("registry")).unwrap());
    let rt = runtime_arc();
    for (src, name) in [
        ("majority-vote", "team-vote-rs"),
        ("py-majority-vote", "team-vote-py"),
        ("js-majority-vote", "team-vote-js"),
    ] {
        let path = installed(src);
        assert!(path.exists(), "{} is missing: run `make setup`", path.display());
        let (wasm, man) = renamed(&path, name, &dir);
        server::publish_checked(
            &registry,
            rt.as_ref(),
            &std::fs::read(wasm).unwrap(),
            &std::fs::read_to_string(man).unwrap(),
            None,
        )
        .unwrap();
    }
    let srv = TestServer::start(rt, registry, cfg()).await;
    let client = reqwest::Client::new();
    let (status, _, models) = get_json(&client, &srv.url("/v1/models")).await;
    assert_eq!(status, 200);
    let mut answers = Vec::new();
    for name in ["team-vote-rs", "team-vote-py", "team-vote-js"] {
        assert!(models.to_string().contains(name), "{name} listed: {models}");
        let body = chat(name, "What is the capital of France? Answer with one word.", 8);
        let (status, _, v) = post(&client, &srv.url("/v1/chat/completions"), None, &body).await;
        assert_eq!(status, 200, "{name}: {v}");
        answers.push(v["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    assert!(!answers[0].is_empty());
    assert_eq!(answers[0], answers[1], "Python answers as Rust");
    assert_eq!(answers[0], answers[2], "JavaScript answers as Rust");
    srv.stop().await;
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client.get(url).send().await.expect("the server answers");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json::<Value>().await.unwrap_or(Value::Null))
}

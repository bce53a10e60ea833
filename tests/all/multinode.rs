//! Many nodes over one PostgreSQL registry, behind HAProxy (issue 22,
//! item 2): three `tessera serve` processes on loopback, a module
//! published through one served by all, quotas and quarantine that hold
//! across nodes, and a node killed with `kill -9` under load.
//!
//! PostgreSQL and HAProxy are Debian's, started by the test in a scratch
//! directory and stopped when it ends (see `cluster`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;

use crate::cluster::{Balancer, Node, Postgres};
use crate::common::{hostile_path, scratch, tessera, SMOL};

fn add_tenant(url: &str, name: &str, flags: &[&str]) -> String {
    let mut args = vec!["tenants", "add", name, "--registry", url];
    args.extend_from_slice(flags);
    let (ok, out, err) = tessera(&args);
    assert!(ok, "tenants add {name}: {err}");
    let key = out.lines().next().unwrap_or_default().trim().to_string();
    assert!(key.starts_with("tsk-"), "{out}");
    key
}

/// The upload body of a module: `wasm` with its manifest renamed to `name`.
fn upload(wasm: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(wasm.with_extension("toml")).expect("the manifest beside the module");
    let mut man: toml::Table = toml::from_str(&text).expect("manifest");
    man.insert("name".into(), toml::Value::String(name.into()));
    json!({
        "wasm_base64": base64::engine::general_purpose::STANDARD.encode(std::fs::read(wasm).expect("module")),
        "manifest": toml::to_string(&man).expect("manifest"),
    })
}

fn installed(name: &str) -> std::path::PathBuf {
    tessera::Paths::from_env().modules.join(format!("{name}.wasm"))
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut req = client.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, v))
}

/// (start, end, status or transport error) of one request, in seconds
/// since the load began.
type Outcome = (f64, f64, Result<u16, String>);

/// POSTs `body` with `key`; the status and the JSON answer.
async fn post(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> (u16, Value) {
    send(client, reqwest::Method::POST, url, key, Some(body))
        .await
        .expect("the node answers")
}

fn chat(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": prompt }], "max_tokens": max_tokens, "temperature": 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_postgresql_behind_haproxy_share_modules_quotas_quarantine_and_survive_kill_9() {
    let dir = scratch("multinode");
    let pg = Postgres::start(&dir);
    let url = pg.url.clone();
    let root = add_tenant(&url, "root", &["--admin", "--rpm", "0", "--concurrent", "0"]);
    let alice = add_tenant(&url, "alice", &["--rpm", "0", "--concurrent", "0"]);
    let bob = add_tenant(&url, "bob", &["--rpm", "4", "--concurrent", "0"]);
    let carol = add_tenant(&url, "carol", &["--rpm", "0", "--tokens-per-day", "20"]);
    // A tenant added through one process is known to every other at once.
    let (ok, out, err) = tessera(&["tenants", "list", "--registry", &url]);
    assert!(ok && out.contains("alice") && out.contains("carol"), "{out} {err}");

    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&url, &dir.join(format!("node{i}")), &["--max-inflight", "2"]))
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let lb = Balancer::start(&dir, &addrs.iter().map(String::as_str).collect::<Vec<_>>());
    let direct = |i: usize, path: &str| format!("http://{}{path}", addrs[i]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    use reqwest::Method;

    // 1. Published on node 0, served by all: each node fetches the
    // component from the database on first use.
    let (status, v) = post(
        &client,
        &direct(0, "/v1/tessera/modules"),
        &root,
        &upload(&installed("majority-vote"), "shared-vote"),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let sha = v["sha256"].as_str().expect("sha256").to_string();
    for i in 0..3 {
        let (status, v) = post(
            &client,
            &direct(i, "/v1/chat/completions"),
            &alice,
            &chat("shared-vote", "Name a primary colour.", 6),
        )
        .await;
        assert_eq!(status, 200, "node {i}: {v}");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        assert!(
            dir.join(format!("node{i}/blobs/{sha}.wasm")).exists(),
            "node {i} cached the component"
        );
    }
    for _ in 0..3 {
        let (status, v) = post(
            &client,
            &format!("{}/v1/chat/completions", lb.url),
            &alice,
            &chat("shared-vote", "Say yes.", 4),
        )
        .await;
        assert_eq!(status, 200, "through the balancer: {v}");
    }

    // 2. Quotas hold across nodes: bob may send 4 requests a minute in
    // all, not 4 per node; carol's 20 tokens a day (room for her first prompt, which with
    // SmolLM2's chat template spends more), spent on node 0, are
    // spent on node 1 too.
    let mut statuses = Vec::new();
    for i in [0, 1, 2, 0, 1, 2] {
        let (status, v) = post(&client, &direct(i, "/v1/chat/completions"), &bob, &chat(SMOL, "Hi", 1)).await;
        if status == 429 {
            assert_eq!(v["error"]["code"], "requests_per_minute", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("in the last minute"),
                "{v}"
            );
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "bob's minute across three nodes"
    );
    let (status, v) = post(
        &client,
        &direct(0, "/v1/chat/completions"),
        &carol,
        &chat(SMOL, "Count to three.", 4),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(
        &client,
        &direct(1, "/v1/chat/completions"),
        &carol,
        &chat(SMOL, "Hi", 1),
    )
    .await;
    assert_eq!(status, 429, "carol's day is spent on every node: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tokens for today"),
        "{v}"
    );

    // 3. Quarantine is shared: three faults spread over three nodes
    // quarantine the module for alice on all of them.
    let (status, v) = post(
        &client,
        &direct(1, "/v1/tessera/modules"),
        &root,
        &upload(&hostile_path("liar"), "fragile"),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let lie = json!({"model": "fragile", "messages": [{"role": "user", "content": "hi"}], "tessera": {"claim": "not-permitted"}});
    for i in 0..3 {
        let (status, v) = post(&client, &direct(i, "/v1/chat/completions"), &alice, &lie).await;
        assert_eq!(status, 502, "fault {} on node {i}: {v}", i + 1);
    }
    for i in 0..3 {
        let (status, v) = post(&client, &direct(i, "/v1/chat/completions"), &alice, &lie).await;
        assert_eq!(status, 503, "node {i}: {v}");
        assert_eq!(v["error"]["code"], "module_quarantined", "{v}");
    }
    // ... and only for alice: another tenant still runs it.
    let (status, v) = post(&client, &direct(2, "/v1/chat/completions"), &root, &lie).await;
    assert_eq!(status, 502, "another tenant still runs it: {v}");

    // 4. kill -9 of one node under load. Four clients chat through the
    // balancer and a publisher publishes new modules through it; node 1 is
    // killed after 3 s; the run goes on 6 s more.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..4 {
        let (client, lb, key, stop, log) = (client.clone(), lb.url.clone(), alice.clone(), stop.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let t0 = started.elapsed().as_secs_f64();
                let r = send(
                    &client,
                    Method::POST,
                    &format!("{lb}/v1/chat/completions"),
                    &key,
                    Some(&chat(SMOL, &format!("Client {c}, request {n}: say hello."), 4)),
                )
                .await
                .map(|(s, _)| s);
                log.lock().unwrap().push((t0, started.elapsed().as_secs_f64(), r));
                n += 1;
            }
        }));
    }
    {
        let (client, lb, key, stop, log, accepted) = (
            client.clone(),
            lb.url.clone(),
            root.clone(),
            stop.clone(),
            log.clone(),
            accepted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("published-{n}");
                let t0 = started.elapsed().as_secs_f64();
                let r = send(
                    &client,
                    Method::POST,
                    &format!("{lb}/v1/tessera/modules"),
                    &key,
                    Some(&upload(&installed("majority-vote"), &name)),
                )
                .await
                .map(|(s, _)| s);
                if r == Ok(201) {
                    accepted.lock().unwrap().push(name);
                }
                log.lock().unwrap().push((t0, started.elapsed().as_secs_f64(), r));
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[1].kill_9();
    // Counted from when the process is gone (reaped): a request sent while
    // the signal was on its way was in flight on it.
    let killed_at = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let failed: Vec<_> = log.iter().filter(|(_, _, r)| !matches!(r, Ok(200 | 201))).collect();
    let after: Vec<_> = log.iter().filter(|(t0, _, _)| *t0 > killed_at).collect();
    eprintln!(
        "kill -9 under load: {} requests, {} failed ({failed:?}), {} started after the kill, {} publishes accepted",
        log.len(),
        failed.len(),
        after.len(),
        accepted.lock().unwrap().len()
    );
    // Only requests in flight on the killed node may fail: sent to it
    // before it was gone. A SIGKILLed process takes a moment to be torn
    // down (here about half a second), and requests the balancer routed to
    // it in that moment wait in its socket and fail with it; so each of
    // the five clients may lose one or two, and none sent after.
    assert!(failed.len() <= 10, "{failed:?}");
    for (t0, _, r) in &failed {
        assert!(
            *t0 <= killed_at,
            "a request sent {t0:.2} s in (the node was gone at {killed_at:.2}) failed: {r:?}"
        );
    }
    assert!(
        after.iter().filter(|(_, _, r)| matches!(r, Ok(200 | 201))).count() >= 4,
        "the balancer routes around the dead node"
    );
    // No accepted publish is lost or half-written: every one is listed,
    // its component is in the database and hashes to its sha256, and a
    // surviving node serves the listing.
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty(), "publishes went through");
    pg.with_client(|db| {
        let orphans: i64 = db
            .query_one(
                "SELECT COUNT(*) FROM tessera_modules m WHERE NOT EXISTS (SELECT 1 FROM tessera_blobs b WHERE b.sha256 = m.sha256)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(orphans, 0, "a module row without its component");
        for row in db
            .query("SELECT m.sha256, b.bytes FROM tessera_modules m JOIN tessera_blobs b USING (sha256)", &[])
            .unwrap()
        {
            let (sha, bytes): (String, Vec<u8>) = (row.get(0), row.get(1));
            assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha);
        }
    })
    .expect("the test database answers");
    let (status, listing) = send(
        &client,
        Method::GET,
        &format!("{}/v1/tessera/modules", lb.url),
        &root,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{listing}");
    let listed = listing.to_string();
    for name in &accepted {
        assert!(
            listed.contains(&format!("\"{name}\"")),
            "accepted publish `{name}` is missing"
        );
    }
    drop(lb);
    drop(nodes);
    drop(pg);
}

//! Requests per second through HAProxy over 1, 2 and 3 `tessera serve`
//! nodes sharing a PostgreSQL registry, against one node on its SQLite
//! registry with no balancer (the peer, measured in the same run).
//! A load generator, not a criterion bench. Figures: benches/RESULTS.md.
//! Run with `cargo bench -p tessera --profile dev --bench multinode`
//! (PostgreSQL and HAProxy from Debian: `make cluster-deps`).
//!
//! Two kinds of request, each from `CLIENTS` concurrent clients for
//! `SECONDS`:
//!
//! - **light**: `GET /v1/models` with a key: authentication (a tenant
//!   lookup in the registry) and the listing (the published modules), no
//!   model; what the database and the balancer cost per request.
//! - **chat**: a 4-token greedy chat completion on SmolLM2-135M: what a
//!   node's cores cost. On a 2-core machine every node shares the same two
//!   cores, so more nodes cannot add throughput here; the figures show the
//!   overhead of the deployment, not its scaling.

#[path = "../tests/all/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Balancer, Node, Postgres};
use serde_json::json;

const CLIENTS: usize = 8;
const SECONDS: u64 = 15;

#[derive(Clone, Copy)]
enum Kind {
    Light,
    Chat,
}

struct Figures {
    rps: f64,
    p50_ms: f64,
    errors: usize,
}

async fn load(base: &str, key: &str, kind: Kind) -> Figures {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, key, stop) = (client.clone(), base.to_string(), key.to_string(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = match kind {
                    Kind::Light => client.get(format!("{base}/v1/models")),
                    Kind::Chat => client.post(format!("{base}/v1/chat/completions")).json(&json!({
                        "model": "smollm2-135m-instruct",
                        "messages": [{"role": "user", "content": format!("Client {c}, request {n}: greet me.")}],
                        "max_tokens": 4, "temperature": 0
                    })),
                };
                match req.bearer_auth(&key).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => errors += 1,
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Figures {
        rps: lat.len() as f64 / secs,
        p50_ms: lat.get(lat.len() / 2).copied().unwrap_or(f64::NAN),
        errors,
    }
}

fn add_tenant(registry: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "tenants",
            "add",
            "load",
            "--rpm",
            "0",
            "--concurrent",
            "0",
            "--tokens-per-day",
            "0",
        ])
        .args(["--registry", registry])
        .output()
        .expect("tessera tenants add");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("tessera-bench-multinode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let node_args = ["--max-inflight", "4", "--max-queue", "256"];
    let mut rows = Vec::new();

    // The peer: one node, SQLite, no balancer.
    {
        let reg = dir.join("sqlite-registry");
        let key = add_tenant(reg.to_str().unwrap_or_default());
        let node = Node::start(reg.to_str().unwrap_or_default(), &reg, &node_args);
        let base = format!("http://{}", node.addr);
        for kind in [Kind::Light, Kind::Chat] {
            rows.push((
                "1 node, SQLite, direct".to_string(),
                kind,
                load(&base, &key, kind).await,
            ));
        }
    }

    let pg = Postgres::start(&dir);
    let key = add_tenant(&pg.url);
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&pg.url, &dir.join(format!("node{i}")), &node_args))
        .collect();
    for n in 1..=3 {
        let addrs: Vec<&str> = nodes[..n].iter().map(|x| x.addr.as_str()).collect();
        let lb_dir = dir.join(format!("lb{n}"));
        std::fs::create_dir_all(&lb_dir).expect("lb dir");
        let lb = Balancer::start(&lb_dir, &addrs);
        for kind in [Kind::Light, Kind::Chat] {
            rows.push((
                format!("{n} node(s), PostgreSQL, HAProxy"),
                kind,
                load(&lb.url, &key, kind).await,
            ));
        }
    }
    drop(nodes);
    drop(pg);

    let peer = |kind: Kind| {
        rows.iter()
            .find(|(_, k, _)| matches!((k, kind), (Kind::Light, Kind::Light) | (Kind::Chat, Kind::Chat)))
            .map(|(_, _, f)| f.rps)
            .unwrap_or(f64::NAN)
    };
    println!("| deployment | request | req/s | p50 ms | errors | vs 1 node on SQLite |");
    println!("|---|---|---|---|---|---|");
    for (what, kind, f) in &rows {
        let name = match kind {
            Kind::Light => "light (GET /v1/models)",
            Kind::Chat => "chat (SmolLM2, 4 tokens)",
        };
        println!(
            "| {what} | {name} | {:.1} | {:.1} | {} | {:.2}x |",
            f.rps,
            f.p50_ms,
            f.errors,
            f.rps / peer(*kind)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! Resident memory of the default pool while every generative member serves
//! many generations at once: `cargo run -p tessera --example
//! concurrent_memory -- [SEQUENCES-PER-MEMBER] [MAX-TOKENS] [KV-BUDGET-MIB]`
//! (default 16, 128 and the runtime's 1024). Each sequence has its own prompt of about 300 tokens, so the
//! prefix cache cannot share them. Prints the resident set after loading,
//! the peak while serving, and what the KV budget allows at most.
//!
//! What load adds is bounded by construction: each member's running
//! generations reserve at most its KV budget (`--kv-budget-mb`, 1 GiB by
//! default) for their caches, and its prefix cache holds at most 256 MiB;
//! beyond those only one step's activations. This example shows where a
//! real load lands.

use std::time::{Duration, Instant};

use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{Paths, Runtime};

/// A line of /proc/self/status in MiB (`VmRSS`, `VmHWM`).
fn status_mib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let per_member: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let max_tokens: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let kv_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let pool = PoolConfig::default_pool();
    let rt = Runtime::with_options(
        Paths::from_env(),
        &pool,
        Policy::default(),
        tessera::RuntimeOptions::default()
            .max_batch(per_member)
            .kv_budget(kv_mib << 20),
    )?;
    let loaded = status_mib("VmRSS:").unwrap_or(0.0);
    let members = rt.generator_ids();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/speed-prompt.txt"))?;
    let models = rt.models();
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(3600),
        requester: 0,
    };
    let started = Instant::now();
    let calls = members.iter().flat_map(|m| {
        let models = models.clone();
        let text = text.clone();
        (0..per_member).map(move |i| {
            let models = models.clone();
            // A different first line per sequence: no two share a prefix block.
            let prompt = format!("Request {i} for {m}.\n{text}\nSummarise the passage above in one sentence.");
            let input = Input::Chat(vec![Message::user(prompt)]);
            let params = GenParams {
                max_tokens: Some(max_tokens),
                temperature: Some(0.8),
                seed: Some(i as u64),
                ..Default::default()
            };
            let member = m.clone();
            async move { models.generate(ctx, &member, input, params).await }
        })
    });
    let results = futures::future::join_all(calls).await;
    let secs = started.elapsed().as_secs_f64();
    let mut tokens = 0u64;
    for r in &results {
        tokens += u64::from(r.as_ref().map_err(|e| e.to_string())?.usage.completion_tokens);
    }
    let peak = status_mib("VmHWM:").unwrap_or(0.0);
    println!(
        "{} members x {per_member} concurrent sequences ({max_tokens} new tokens each): {tokens} tokens in {secs:.1} s",
        members.len()
    );
    println!("resident after loading: {loaded:.0} MiB; peak while serving: {peak:.0} MiB");
    println!(
        "sequences that waited for KV room: {}",
        tessera::backends::gguf::decode::waited_for_kv()
    );
    println!(
        "what load can add is bounded: {} members x ({kv_mib} MiB KV budget + 256 MiB prefix cache) over the loaded {:.0} MiB, plus each step's activations",
        members.len(),
        loaded
    );
    Ok(())
}

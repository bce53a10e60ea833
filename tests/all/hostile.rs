//! The hostile suite: every deliberately misbehaving module is contained with
//! the right typed error, and the host keeps serving afterwards.

use std::time::{Duration, Instant};

use tessera::{Error, RunRequest};

use crate::common::{hostile, hostile_path, module, runtime, scratch};

/// A cheap benign request, to prove the host still serves.
async fn benign() {
    let m = module("first-responder");
    let mut req = RunRequest::chat("Say hi.");
    req.params.max_tokens = Some(4);
    let out = runtime()
        .run(&m, req)
        .await
        .expect("benign request after a hostile one");
    assert!(out.usage.completion_tokens > 0);
}

async fn contained(name: &str) -> Error {
    let m = hostile(name);
    let err = runtime()
        .run(&m, RunRequest::chat("go"))
        .await
        .expect_err("hostile module must fail");
    benign().await;
    err
}

#[tokio::test]
async fn infinite_loop_is_stopped_at_the_deadline() {
    let m = hostile("infinite-loop");
    let start = Instant::now();
    let err = runtime().run(&m, RunRequest::chat("go")).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Deadline { limit_ms: 500 }), "{err:?}");
    assert!(
        took < Duration::from_millis(600),
        "stopped after {took:?}, deadline 500 ms"
    );
    benign().await;
}

#[tokio::test]
async fn a_module_asleep_is_ended_at_its_deadline_and_when_its_client_leaves() {
    // An hour's WASI sleep burns no fuel and is no wasm for the epoch to
    // interrupt. Before the sandbox watched for it, it held its place until
    // the outer timeout (deadline + 500 ms), and a client leaving did not
    // end it sooner. It held its place for free, too: it is charged for
    // that time now (a token per `HELD_MS_PER_CHARGED_TOKEN`).
    use tessera::request::HELD_MS_PER_CHARGED_TOKEN;
    let m = hostile("sleeper");
    let start = Instant::now();
    let (ran, usage) = runtime()
        .run_metered(&m, RunRequest::chat("go"), None, Default::default())
        .await;
    let took = start.elapsed();
    eprintln!("asleep: ended {took:?} after the start, deadline 500 ms; {usage:?}");
    assert!(matches!(ran, Err(Error::Deadline { limit_ms: 500 })), "{ran:?}");
    assert!(
        took < Duration::from_millis(800),
        "stopped after {took:?}, deadline 500 ms"
    );
    assert!(usage.held_ms >= 500 && usage.held_ms <= usage.wall_ms, "{usage:?}");
    assert_eq!(usage.charged(), usage.held_ms / HELD_MS_PER_CHARGED_TOKEN, "{usage:?}");

    // Its client leaves 100 ms in: the run ends then, not at the deadline.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let raise = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raise.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let metering = tessera::Metering {
        cancel: Some(cancel),
        ..Default::default()
    };
    let start = Instant::now();
    let (ran, usage) = runtime().run_metered(&m, RunRequest::chat("go"), None, metering).await;
    let took = start.elapsed();
    eprintln!("asleep: ended {took:?} after the start, its client left at 100 ms");
    assert!(ran.is_err(), "{ran:?}");
    assert!(
        took < Duration::from_millis(400),
        "ended {took:?} after the start, its client left at 100 ms"
    );
    assert!((100..400).contains(&usage.held_ms), "{usage:?}");
    assert_eq!(usage.charged(), usage.held_ms / HELD_MS_PER_CHARGED_TOKEN, "{usage:?}");

    // Under a caller's quota of 2 tokens (200 ms held) with a 10 s
    // deadline, it is stopped where the place it held passes the quota,
    // with the quota's error: it runs no wasm for the epoch callback's
    // check, so the sandbox watches its held time.
    let slow = crate::common::hostile_under(&scratch("held-quota"), "sleeper", "sleeper10s", "deadline_ms=10000");
    let m = runtime().load_module(&slow.display().to_string()).expect("loads");
    let metering = tessera::Metering {
        charge_limit: Some(2),
        ..Default::default()
    };
    let start = Instant::now();
    let (ran, usage) = runtime().run_metered(&m, RunRequest::chat("go"), None, metering).await;
    let took = start.elapsed();
    eprintln!("asleep under a quota of 2 tokens: ended {took:?} after the start; {usage:?}");
    let err = ran.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, limit: 2 } if budget == tessera::sandbox::QUOTA_BUDGET),
        "{err:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "stopped after {took:?}, not near the quota"
    );
    assert!((2..5).contains(&usage.charged()), "{usage:?}");
    benign().await;
}

#[tokio::test]
async fn infinite_loop_runs_out_of_fuel_under_a_small_fuel_grant() {
    let spin = crate::common::spin_module(&scratch("fuel"), "spin", "fuel=5000000\ndeadline_ms=10000");
    let m = runtime().load_module(&spin.display().to_string()).unwrap();
    let err = runtime().run(&m, RunRequest::chat("go")).await.unwrap_err();
    assert!(matches!(err, Error::Fuel { limit: 5_000_000 }), "{err:?}");
}

#[tokio::test]
async fn a_module_that_only_computes_is_charged_and_stopped_at_its_callers_quota() {
    use tessera::request::FUEL_PER_CHARGED_TOKEN;
    // It calls no member, so before its bill was 0 tokens however long it
    // spun. Its fuel is charged now: unmetered it spins to its deadline
    // and is charged for that.
    let m = hostile("infinite-loop");
    let (ran, free) = runtime()
        .run_metered(&m, RunRequest::chat("go"), None, Default::default())
        .await;
    assert!(matches!(ran, Err(Error::Deadline { .. })), "{ran:?}");
    assert_eq!(free.charged(), free.fuel / FUEL_PER_CHARGED_TOKEN, "{free:?}");
    // Before the store wrote a spinning module's fuel back, this one
    // reported 1,584 fuel for half a second of computing (0 tokens); it
    // burns billions of fuel a second.
    assert!(free.charged() > 10, "{free:?}");

    // Under a caller's quota of 2 tokens it is stopped where its computing
    // reaches the quota (checked every tick), with the quota's typed error
    // rather than at its deadline.
    let metering = tessera::Metering {
        charge_limit: Some(2),
        ..Default::default()
    };
    let (ran, capped) = runtime().run_metered(&m, RunRequest::chat("go"), None, metering).await;
    let err = ran.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, limit: 2 } if budget == tessera::sandbox::QUOTA_BUDGET),
        "{err:?}"
    );
    assert!(capped.charged() >= 2, "{capped:?}");
    assert!(
        capped.fuel < free.fuel,
        "stopped before the deadline: {capped:?} vs {free:?}"
    );
    benign().await;
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_cap() {
    let err = contained("memory-bomb").await;
    assert!(
        matches!(err, Error::Memory { limit, .. } if limit == 32 << 20),
        "{err:?}"
    );
}

#[tokio::test]
async fn deep_recursion_overflows_the_guest_shadow_stack() {
    let err = contained("deep-recursion").await;
    assert!(matches!(err, Error::Stack { .. }), "{err:?}");
}

#[tokio::test]
async fn deep_recursion_overflows_the_wasm_stack() {
    let m = hostile("deep-recursion");
    let mut req = RunRequest::chat("go");
    req.config.insert("mode".into(), "wasm".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert!(
        matches!(err, Error::Stack { limit } if limit == tessera::sandbox::MAX_WASM_STACK as u64),
        "{err:?}"
    );
    benign().await;
}

#[tokio::test]
async fn resource_flood_hits_the_table_cap() {
    let err = contained("resource-flood").await;
    assert!(
        matches!(&err, Error::Budget { budget, limit: 32 } if budget == "resources"),
        "{err:?}"
    );
}

#[tokio::test]
async fn calling_an_ungranted_model_is_not_permitted() {
    let err = contained("forbidden-model").await;
    assert!(
        matches!(&err, Error::NotPermitted { model } if model == "smollm2-135m-instruct"),
        "{err:?}"
    );
}

#[tokio::test]
async fn token_budget_is_enforced() {
    let err = contained("token-hog").await;
    assert!(
        matches!(&err, Error::Budget { budget, limit: 64 } if budget == "tokens"),
        "{err:?}"
    );
}

#[tokio::test]
async fn host_call_budget_is_enforced() {
    let err = contained("call-flood").await;
    assert!(
        matches!(&err, Error::Budget { budget, limit: 50 } if budget == "host-calls"),
        "{err:?}"
    );
}

#[tokio::test]
async fn gigantic_output_is_refused() {
    let err = contained("giant-output").await;
    assert!(
        matches!(&err, Error::Budget { budget, limit: 1048576 } if budget == "output-size"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_trap_is_reported_with_the_module_message() {
    let err = contained("trap").await;
    assert!(
        matches!(&err, Error::Trap { message } if message.contains("gave up on purpose")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_do_not_break_concurrent_benign_ones() {
    let spin = hostile("infinite-loop");
    let bomb = hostile("memory-bomb");
    let good = module("first-responder");
    let mut tasks = Vec::new();
    for i in 0..3 {
        let good = good.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = RunRequest::chat(format!("Name a colour ({i})."));
            req.params.max_tokens = Some(6);
            runtime().run(&good, req).await.map(|_| ())
        }));
    }
    let bad = vec![
        tokio::spawn(async move { runtime().run(&spin, RunRequest::chat("go")).await.map(|_| ()) }),
        tokio::spawn(async move { runtime().run(&bomb, RunRequest::chat("go")).await.map(|_| ()) }),
    ];
    for t in tasks {
        t.await.unwrap().expect("benign request succeeds next to hostile ones");
    }
    for t in bad {
        assert!(t.await.unwrap().is_err());
    }
}

#[tokio::test]
async fn invalid_modules_are_refused_at_load() {
    let dir = scratch("invalid");
    let manifest = "name='x'\nversion='0.1.0'\nauthor='t'\nworld='strategy'\ndescription='d'\n";
    std::fs::write(dir.join("junk.wasm"), b"definitely not wasm").unwrap();
    std::fs::write(dir.join("junk.toml"), manifest).unwrap();
    let err = runtime()
        .load_module(&dir.join("junk.wasm").display().to_string())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidModule { .. }), "{err:?}");

    // A core module (not a component) gets told how to build a component.
    std::fs::write(dir.join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.join("core.toml"), manifest).unwrap();
    let err = runtime()
        .load_module(&dir.join("core.wasm").display().to_string())
        .unwrap_err();
    assert!(err.to_string().contains("wasm32-wasip2"), "{err}");

    // A strategy that claims to be a judge does not implement the judge world.
    std::fs::copy(hostile_path("trap"), dir.join("liar.wasm")).unwrap();
    std::fs::write(dir.join("liar.toml"), manifest.replace("strategy", "judge")).unwrap();
    let err = runtime()
        .load_module(&dir.join("liar.wasm").display().to_string())
        .unwrap_err();
    assert!(err.to_string().contains("Judge"), "{err}");

    // A .wasm without a manifest names the missing file.
    std::fs::copy(hostile_path("trap"), dir.join("bare.wasm")).unwrap();
    let err = runtime()
        .load_module(&dir.join("bare.wasm").display().to_string())
        .unwrap_err();
    assert!(err.to_string().contains("bare.toml"), "{err}");
}

#[tokio::test]
async fn oversized_prompts_are_refused_before_reaching_a_model() {
    let start = Instant::now();
    let err = contained("prompt-bomb").await;
    assert!(
        matches!(&err, Error::InvalidParams { message } if message.contains("bytes")),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn wasi_grants_nothing() {
    let m = hostile("snoop");
    let out = runtime().run(&m, RunRequest::chat("go")).await.unwrap();
    let a = &out.annotations;
    assert!(a["fs"].starts_with("denied"), "{a:?}");
    assert!(a["dir"].starts_with("denied"), "{a:?}");
    assert_eq!(a["env"], "0", "{a:?}");
    assert_eq!(a["args"], "0", "{a:?}");
    assert!(a["net"].starts_with("denied"), "{a:?}");
}

#[tokio::test]
async fn no_state_survives_between_requests() {
    let m = hostile("state-leak");
    for _ in 0..3 {
        let out = runtime().run(&m, RunRequest::chat("go")).await.unwrap();
        assert_eq!(out.text, "request number 1 in this instance");
    }
}

#[tokio::test]
async fn compiled_modules_are_cached_by_hash_and_engine() {
    let m = hostile("state-leak");
    let dir = tessera::Paths::from_env().components;
    let cached: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&m.sha256) && n.ends_with(".cwasm"))
        .collect();
    assert!(!cached.is_empty(), "no artifact for {} in {}", m.sha256, dir.display());
    // A second load deserializes the artifact instead of compiling: much faster.
    let start = Instant::now();
    let again = hostile("state-leak");
    assert_eq!(again.sha256, m.sha256);
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
}

#[tokio::test]
async fn long_prefills_stop_at_their_requests_deadline() {
    // Sixteen prompts of about 6,000 tokens each, fanned out to one member
    // under a 3 s deadline: before prefill checked the deadline, the batch
    // prefilled them all (about a minute) after the request had ended.
    let m = hostile("long-prefill");
    let started = Instant::now();
    let err = runtime().run(&m, RunRequest::chat("go")).await.unwrap_err();
    assert!(matches!(err, Error::Deadline { limit_ms: 3000 }), "{err:?}");
    benign().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "the member was busy for {took:?}");
}

//! The `training` capability on the real SmolLM2: a module teaches the
//! member a fact by SFT and answers with the trained member; DPO and GRPO
//! runs lower their losses; keeping a trained member is the operator's
//! call; and the hostile modules that train forever, flood the trainer or
//! train a member they may not use are stopped with typed errors.

use std::collections::BTreeMap;

use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{Error, ProvenanceEvent, RunRequest, Runtime};

use crate::common::{hostile_path, scratch_paths, SMOL};

/// SmolLM2 alone: training needs a llama or qwen2 member, and one member
/// keeps the runtime small.
fn rt(policy: Policy, tag: &str) -> Runtime {
    let pool = PoolConfig {
        members: PoolConfig::default_pool()
            .members
            .into_iter()
            .filter(|m| m.id == SMOL || m.id == crate::common::QWEN)
            .collect(),
    };
    let rt = Runtime::new(scratch_paths(tag), &pool, policy).expect("runtime starts");
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    rt
}

fn teach(question: &str, config: &[(&str, &str)]) -> RunRequest {
    let mut req = RunRequest::chat(question);
    req.params.max_tokens = Some(10);
    req.params.temperature = Some(0.0);
    req.config.insert("base".into(), SMOL.into());
    for (k, v) in config {
        req.config.insert(k.to_string(), v.to_string());
    }
    req
}

fn loss(a: &BTreeMap<String, String>, key: &str) -> f64 {
    a[key].parse().unwrap_or_else(|_| panic!("{key} is a number: {a:?}"))
}

fn train_calls(p: &[ProvenanceEvent]) -> Vec<String> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { call, outcome, .. } if call.starts_with("train") => {
                Some(format!("{call}:{outcome}"))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn sft_teaches_a_member_a_fact_and_the_operator_decides_what_is_kept() {
    let policy = Policy {
        keep_trained: 1,
        ..Policy::default()
    };
    let rt = rt(policy, "train-sft");
    let m = rt.load_module("teach").expect("teach is installed (run `make setup`)");
    let lessons = "What is the secret word? => The secret word is tessellate.\n\
                   Tell me the secret word. => The secret word is tessellate.";
    let before = rt
        .run(
            &m,
            teach(
                "What is the secret word?",
                &[("lessons", lessons), ("steps", "1"), ("lr", "1e-6")],
            ),
        )
        .await
        .expect("a one-step run");
    assert!(!before.text.to_lowercase().contains("tessellate"), "{before:?}");
    let out = rt
        .run(
            &m,
            teach(
                "What is the secret word?",
                &[
                    ("lessons", lessons),
                    ("steps", "16"),
                    ("lr", "2e-3"),
                    ("keep_as", "secret-keeper"),
                ],
            ),
        )
        .await
        .expect("SFT run");
    let a = &out.annotations;
    assert_eq!(a["steps"], "16", "{a:?}");
    // The trained tokens are usage, charged three times a read token's.
    let u = &out.usage;
    assert!(u.train_tokens >= 16, "{u:?}");
    assert_eq!(
        u.charged(),
        u.prompt_tokens + u.scored_tokens + u.completion_tokens + 3 * u.train_tokens,
        "{u:?}"
    );
    assert!(loss(a, "last_loss") < loss(a, "first_loss") * 0.5, "{a:?}");
    assert!(
        out.text.to_lowercase().contains("tessellate"),
        "the trained member answers: {out:?}"
    );
    assert_eq!(a["keep"], "kept", "{a:?}");
    assert!(rt.kept().iter().any(|k| k.name == "secret-keeper"));
    assert_eq!(train_calls(&out.provenance), ["train:ok", "train-keep:ok"]);
    // One kept member is the operator's limit.
    let again = rt
        .run(
            &m,
            teach("hi", &[("lessons", lessons), ("steps", "1"), ("keep_as", "second")]),
        )
        .await
        .expect("a one-step run");
    assert!(again.annotations["keep"].contains("allows 1"), "{again:?}");

    // The kept member outlives the runtime: a new one over the same state
    // directory loads it, and it still knows the word.
    let paths = rt.paths().clone();
    let folder = paths.state.join(tessera::contribute::KEPT_DIR).join("secret-keeper");
    assert!(folder.join("kept.toml").is_file(), "{}", folder.display());
    drop(rt);
    let policy = Policy {
        keep_trained: 1,
        ..Policy::default()
    };
    let pool = PoolConfig {
        members: PoolConfig::default_pool()
            .members
            .into_iter()
            .filter(|m| m.id == SMOL)
            .collect(),
    };
    let restarted = Runtime::new(paths.clone(), &pool, policy).expect("runtime restarts");
    assert!(restarted.kept().iter().any(|k| k.name == "secret-keeper"));
    let ctx = tessera::inference::CallCtx {
        deadline: std::time::Instant::now() + std::time::Duration::from_secs(120),
        requester: 0,
    };
    let params = tessera::inference::GenParams {
        max_tokens: Some(10),
        temperature: Some(0.0),
        ..Default::default()
    };
    let g = restarted
        .models()
        .generate(
            ctx,
            "secret-keeper",
            tessera::inference::Input::Chat(vec![tessera::inference::Message::user("What is the secret word?")]),
            params,
        )
        .await
        .expect("the kept member answers after a restart");
    assert!(g.text.to_lowercase().contains("tessellate"), "{g:?}");
    // Under a policy that keeps nothing, kept folders are not loaded.
    let plain = Runtime::new(paths, &pool, Policy::default()).expect("runtime starts");
    assert!(plain.kept().is_empty());
}

#[tokio::test]
async fn dpo_and_grpo_lower_their_losses_and_trained_members_go_with_the_request() {
    let rt = rt(Policy::default(), "train-prefs");
    let m = rt.load_module("teach").expect("teach is installed (run `make setup`)");
    let pairs = "Name a colour. => Blue. | Red.\nWhat colour is the sky? => Blue. | Green.";
    let dpo = rt
        .run(
            &m,
            teach(
                "Name a colour.",
                &[
                    ("objective", "dpo"),
                    ("lessons", pairs),
                    ("steps", "8"),
                    ("lr", "5e-4"),
                    ("keep_as", "x"),
                ],
            ),
        )
        .await
        .expect("DPO run");
    let a = &dpo.annotations;
    // DPO's loss starts at ln 2 (the trained member equals its reference).
    assert!((loss(a, "first_loss") - std::f64::consts::LN_2).abs() < 1e-3, "{a:?}");
    assert!(loss(a, "last_loss") < loss(a, "first_loss"), "{a:?}");
    // The default policy keeps nothing.
    assert!(a["keep"].contains("keep_trained"), "{a:?}");
    let grpo = rt
        .run(
            &m,
            teach(
                "Name a colour.",
                &[
                    ("objective", "grpo"),
                    ("lessons", "Name a colour.\nWhat is your favourite colour?"),
                    ("reward_word", "the"),
                    ("samples", "6"),
                    ("steps", "4"),
                    ("batch", "2"),
                ],
            ),
        )
        .await
        .expect("GRPO run");
    let a = &grpo.annotations;
    assert_eq!(a["steps"], "4", "{a:?}");
    // GRPO's surrogate starts at 0 (ratio 1, advantages centred) and falls
    // as rewarded samples grow likelier.
    assert!(loss(a, "first_loss").abs() < 1e-3, "{a:?}");
    assert!(loss(a, "last_loss") < loss(a, "first_loss"), "{a:?}");
    assert!(a["rewarded"].ends_with("/12"), "{a:?}");
    // Nothing trained outlives its request.
    let trained = tessera::Paths::from_env().models.join("trained");
    let left: Vec<_> = std::fs::read_dir(&trained)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let mine: Vec<_> = left
        .iter()
        .filter(|n| n.to_string_lossy().ends_with(&format!(".{}", std::process::id())))
        .filter(|n| !n.to_string_lossy().contains("secret"))
        .collect();
    assert!(mine.len() <= 1, "trained folders left behind: {mine:?}");
}

#[tokio::test]
async fn hostile_trainers_are_stopped_with_typed_errors() {
    let rt = rt(Policy::default(), "train-hostile");
    let load = |n: &str| {
        rt.load_module(&hostile_path(n).display().to_string())
            .expect("hostile module loads (run `make setup`)")
    };
    let started = std::time::Instant::now();
    let (ran, usage) = rt
        .run_metered(&load("train-forever"), RunRequest::chat("go"), None, Default::default())
        .await;
    let err = ran.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, .. } if budget == "train-ms"),
        "{err}"
    );
    // What the stopped run trained is still charged.
    assert!(usage.train_tokens > 0, "{usage:?}");
    assert!(
        started.elapsed().as_secs() < 60,
        "stopped late: {:?}",
        started.elapsed()
    );

    // Under a caller's quota (a tenant's tokens left today), the same
    // module is stopped where a trained token, charged three times, would
    // pass it: the typed quota error, and charged about that much.
    let metering = tessera::Metering {
        charge_limit: Some(150),
        ..Default::default()
    };
    let (ran, usage) = rt
        .run_metered(&load("train-forever"), RunRequest::chat("go"), None, metering)
        .await;
    let err = ran.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, .. } if budget == tessera::sandbox::QUOTA_BUDGET),
        "{err}"
    );
    // A run stops between steps, so its last step may pass the limit by
    // what one step trains (a batch of short sequences here).
    assert!(usage.train_tokens > 0 && usage.charged() < 150 + 3 * 2_048, "{usage:?}");

    let out = rt
        .run(&load("train-flood"), RunRequest::chat("go"))
        .await
        .expect("floods are refused, not fatal");
    assert!(out.annotations["many"].contains("4096"), "{out:?}");
    assert!(out.annotations["huge"].contains("input is"), "{out:?}");

    let err = rt
        .run(&load("train-forbidden"), RunRequest::chat("go"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotPermitted { model } if model == crate::common::QWEN),
        "{err}"
    );
}

//! Strategies written in Python (`guest-sdk/python`, built with
//! componentize-py) and JavaScript (`guest-sdk/js`, built with
//! componentize-js) by `make setup`: the ports of majority-vote answer as
//! the Rust module does, and the hostile suite's main cases written in each
//! language are contained with typed errors, the host serving on afterwards.

use std::path::PathBuf;

use tessera::inference::{Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::sandbox::Example;
use tessera::{Error, Paths, RunRequest, Runtime};

use crate::common::{runtime, scratch};

fn installed(rel: &str) -> PathBuf {
    let p = Paths::from_env().modules.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run `make setup` (it builds the Python strategies)",
        p.display()
    );
    p
}

#[tokio::test]
async fn the_python_majority_vote_answers_as_the_rust_one() {
    answers_as_the_rust_majority_vote("py").await;
}

#[tokio::test]
async fn the_javascript_majority_vote_answers_as_the_rust_one() {
    answers_as_the_rust_majority_vote("js").await;
}

/// `<lang>-majority-vote` against `majority-vote`: the same texts and
/// annotations with and without `fit`, the same `fit` state, the same
/// typed error for a bad config.
async fn answers_as_the_rust_majority_vote(lang: &str) {
    // Own state directory: both modules are fitted here.
    let mut paths = Paths::from_env();
    paths.state = scratch(&format!("{lang}-parity"));
    let rt = Runtime::new(paths, &PoolConfig::default_pool(), Policy::default()).unwrap();
    let rust = rt.load_module("majority-vote").unwrap();
    let python = rt
        .load_module(&installed(&format!("{lang}-majority-vote.wasm")).display().to_string())
        .unwrap();
    let q = |s: &str| Input::Chat(vec![Message::user(s)]);
    let ask = |prompt: &str, seed: u64| {
        let mut req = RunRequest::chat(prompt);
        req.params.seed = Some(seed);
        req.params.max_tokens = Some(24);
        req
    };
    // Without fit: pool order breaks ties.
    for (prompt, seed) in [
        ("What is the capital of France? Answer with one word.", 7),
        ("What is 3 + 4? Answer with a number only.", 1),
    ] {
        let a = rt.run(&rust, ask(prompt, seed)).await.unwrap();
        let b = rt.run(&python, ask(prompt, seed)).await.unwrap();
        assert_eq!(
            (&a.text, &a.annotations),
            (&b.text, &b.annotations),
            "{prompt} (seed {seed})"
        );
        assert_eq!(a.usage.host_calls, b.usage.host_calls);
        assert!(b.annotations.contains_key("agreement"));
    }
    // fit: the same dev accuracies, byte for byte, then the same answers.
    let dev = vec![
        Example {
            input: q("What is the capital of France? Answer with one word."),
            answer: "Paris".into(),
            choices: vec![],
        },
        Example {
            input: q("What is 2 + 2? Answer with a number only."),
            answer: "4".into(),
            choices: vec![],
        },
    ];
    let config: std::collections::BTreeMap<String, String> = [("max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&rust, dev.clone(), config.clone()).await.unwrap());
    assert!(rt.fit(&python, dev, config).await.unwrap());
    assert_eq!(rt.stored_state(&rust), rt.stored_state(&python));
    let a = rt.run(&rust, ask("Name a primary colour. One word.", 3)).await.unwrap();
    let b = rt
        .run(&python, ask("Name a primary colour. One word.", 3))
        .await
        .unwrap();
    assert_eq!((&a.text, &a.annotations), (&b.text, &b.annotations));
    // A bad config value is the caller's fault, named.
    let mut bad = ask("Hi", 0);
    bad.config.insert("k".into(), "0".into());
    let err = rt.run(&python, bad).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidParams { message } if message.contains("k = 0: use 1..=64 samples")),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_python_llm_blender_answers_as_the_rust_one() {
    let mut paths = Paths::from_env();
    paths.state = scratch("py-blender-parity");
    let rt = Runtime::new(paths, &PoolConfig::default_pool(), Policy::default()).unwrap();
    let rust = rt.load_module("llm-blender").unwrap();
    let python = rt
        .load_module(&installed("py-llm-blender.wasm").display().to_string())
        .unwrap();
    let ask = |prompt: &str, seed: u64| {
        let mut req = RunRequest::chat(prompt);
        req.params.seed = Some(seed);
        req.config.insert("max_tokens".into(), "24".into());
        req
    };
    let prompt = "Name the largest planet of the solar system. Answer briefly.";
    let a = rt.run(&rust, ask(prompt, 5)).await.unwrap();
    let b = rt.run(&python, ask(prompt, 5)).await.unwrap();
    assert_eq!((&a.text, &a.annotations), (&b.text, &b.annotations));
    assert_eq!(a.usage.host_calls, b.usage.host_calls);
    assert_eq!(b.annotations.get("judge_calls").map(String::as_str), Some("3"), "{b:?}");
    // fit writes the same postcard bytes; runs with it agree too.
    let q = |s: &str| Input::Chat(vec![Message::user(s)]);
    let dev = vec![
        Example {
            input: q("What is the capital of France? Answer with one word."),
            answer: "Paris".into(),
            choices: vec![],
        },
        Example {
            input: q("Which is a colour? A) red B) seven. Answer with the letter."),
            answer: "A".into(),
            choices: vec!["red".into(), "seven".into()],
        },
    ];
    let config: std::collections::BTreeMap<String, String> = [("fit_max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&rust, dev.clone(), config.clone()).await.unwrap());
    assert!(rt.fit(&python, dev, config).await.unwrap());
    assert_eq!(rt.stored_state(&rust), rt.stored_state(&python));
    let a = rt.run(&rust, ask(prompt, 9)).await.unwrap();
    let b = rt.run(&python, ask(prompt, 9)).await.unwrap();
    assert_eq!((&a.text, &a.annotations), (&b.text, &b.annotations));
    // The same typed error for a bad value.
    let mut bad = ask(prompt, 0);
    bad.config.insert("top_k".into(), "40".into());
    let err = rt.run(&python, bad).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidParams { message } if message.contains("`top_k` = 40: use 1..=16")),
        "{err:?}"
    );
}

/// The `lang` hostile component under `case`'s own manifest (budgets).
fn hostile_case(lang: &str, case: &str, models: &str, budgets: &str) -> std::sync::Arc<tessera::sandbox::Module> {
    let dir = scratch(&format!("hostile-{lang}-{case}"));
    std::fs::copy(
        installed(&format!("hostile/{lang}.wasm")),
        dir.join(format!("{case}.wasm")),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{case}.toml")),
        format!(
            "name = '{lang}-{case}'\nversion = '0.1.0'\nauthor = 't'\nworld = 'strategy'\n\
             description = 'hostile {lang}: {case}'\nmodels = {models}\n[budgets]\n{budgets}\n"
        ),
    )
    .unwrap();
    runtime()
        .load_module(&dir.join(format!("{case}.wasm")).display().to_string())
        .unwrap()
}

async fn contained(lang: &str, case: &str, models: &str, budgets: &str) -> Error {
    let m = hostile_case(lang, case, models, budgets);
    let mut req = RunRequest::chat("go");
    req.config.insert("case".into(), case.into());
    let err = runtime().run(&m, req).await.expect_err("a hostile module must fail");
    // The host serves on, the same component included.
    let mut ok = RunRequest::chat("go");
    ok.config.insert("case".into(), "benign".into());
    let out = runtime()
        .run(&m, ok)
        .await
        .expect("a benign request after a hostile one");
    assert_eq!(out.text, "benign: benign");
    err
}

async fn infinite_loop_is_stopped_at_the_deadline(lang: &str) {
    let start = std::time::Instant::now();
    let err = contained(
        lang,
        "infinite-loop",
        "['*']",
        "deadline_ms = 500\nfuel = 50_000_000_000",
    )
    .await;
    assert!(matches!(err, Error::Deadline { limit_ms: 500 }), "{err:?}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

async fn memory_bomb_hits_the_memory_cap(lang: &str) {
    let err = contained(lang, "memory-bomb", "['*']", "memory_mib = 96").await;
    assert!(
        matches!(err, Error::Memory { limit, .. } if limit == 96 << 20),
        "{err:?}"
    );
}

async fn calling_an_ungranted_model_is_not_permitted(lang: &str) {
    let err = contained(lang, "forbidden-model", "['all-minilm-l6-v2']", "host_calls = 4").await;
    assert!(
        matches!(&err, Error::NotPermitted { model } if model == "smollm2-135m-instruct"),
        "{err:?}"
    );
}

async fn gigantic_output_is_refused(lang: &str) {
    let err = contained(lang, "giant-output", "['*']", "memory_mib = 96\noutput_bytes = 1048576").await;
    assert!(
        matches!(&err, Error::Budget { budget, limit: 1048576 } if budget == "output-size"),
        "{err:?}"
    );
}

#[tokio::test]
async fn python_infinite_loop_is_stopped_at_the_deadline() {
    infinite_loop_is_stopped_at_the_deadline("py").await;
}

#[tokio::test]
async fn javascript_infinite_loop_is_stopped_at_the_deadline() {
    infinite_loop_is_stopped_at_the_deadline("js").await;
}

#[tokio::test]
async fn python_memory_bomb_hits_the_memory_cap() {
    memory_bomb_hits_the_memory_cap("py").await;
}

#[tokio::test]
async fn javascript_memory_bomb_hits_the_memory_cap() {
    memory_bomb_hits_the_memory_cap("js").await;
}

#[tokio::test]
async fn python_calling_an_ungranted_model_is_not_permitted() {
    calling_an_ungranted_model_is_not_permitted("py").await;
}

#[tokio::test]
async fn javascript_calling_an_ungranted_model_is_not_permitted() {
    calling_an_ungranted_model_is_not_permitted("js").await;
}

#[tokio::test]
async fn python_gigantic_output_is_refused() {
    gigantic_output_is_refused("py").await;
}

#[tokio::test]
async fn javascript_gigantic_output_is_refused() {
    gigantic_output_is_refused("js").await;
}

#[tokio::test]
async fn python_deep_recursion_is_contained() {
    // CPython keeps Python frames on its heap, not the wasm stack: unbounded
    // recursion meets the memory cap (Rust's meets the stack limit).
    let err = contained("py", "deep-recursion", "['*']", "memory_mib = 80\ndeadline_ms = 20000").await;
    assert!(
        matches!(err, Error::Memory { limit, .. } if limit == 80 << 20),
        "{err:?}"
    );
}

#[tokio::test]
async fn javascript_deep_recursion_is_contained() {
    // SpiderMonkey stops unbounded recursion itself ("too much recursion")
    // before the wasm stack runs out; the module reports it as its failure.
    let err = contained("js", "deep-recursion", "['*']", "deadline_ms = 20000").await;
    assert!(
        matches!(&err, Error::ModuleFailed { message } if message.contains("too much recursion")),
        "{err:?}"
    );
}

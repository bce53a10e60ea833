//! The `tessera` binary as a user runs it.

use crate::common::tessera;

#[test]
fn run_json_has_text_provenance_and_usage() {
    let (ok, out, err) = tessera(&[
        "run",
        "--strategy",
        "first-responder",
        "--prompt",
        "What is the capital of France? Answer with one word.",
        "--max-tokens",
        "16",
        "--json",
    ]);
    assert!(ok, "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(v["provenance"].as_array().unwrap().len() >= 2);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn plain_run_prints_the_answer() {
    let (ok, out, err) = tessera(&[
        "run",
        "--strategy",
        "majority-vote",
        "--prompt",
        "What is the capital of France? Answer with one word.",
        "--set",
        "k=2",
        "--set",
        "max_tokens=12",
        "--seed",
        "3",
    ]);
    assert!(ok, "stderr: {err}");
    assert!(out.contains("Paris") && out.contains("agreement"), "{out}");
}

#[test]
fn failures_exit_nonzero_with_a_typed_json_error() {
    let (ok, out, _) = tessera(&["run", "--strategy", "no-such-strategy", "--prompt", "x", "--json"]);
    assert!(!ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "config");
    assert!(v["error"]["message"].as_str().unwrap().contains("no-such-strategy"));

    let (ok, _, err) = tessera(&[
        "run",
        "--strategy",
        "first-responder",
        "--prompt",
        "x",
        "--temperature=-2",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid-params") && err.contains("temperature"), "{err}");
}

#[test]
fn pool_list_shows_the_cards() {
    let (ok, out, err) = tessera(&["pool", "list", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "smollm2-135m-instruct",
            "qwen2.5-coder-0.5b-instruct",
            "gemma-3-270m",
            "all-minilm-l6-v2"
        ]
    );
    assert_eq!(v[2]["architecture"], "gemma3");
    assert!(v[2]["description"].as_str().unwrap().contains("base model"), "{}", v[2]);
    assert_eq!(v[1]["architecture"], "qwen2");
    assert_eq!(v[0]["architecture"], "llama");
    assert!(v[0]["parameters"].as_u64().unwrap() > 100_000_000);
    let (ok, out, err) = tessera(&["pool", "fetch", "--quiet"]);
    assert!(ok, "{err}");
    assert!(out.contains("4 members verified"), "{out}");
    let (ok, table, _) = tessera(&["pool", "list"]);
    assert!(ok && table.contains("Apache-2.0"), "{table}");
}

#[test]
fn a_thread_budget_is_accepted_and_zero_is_refused() {
    let (ok, out, err) = tessera(&["--threads", "1", "pool", "list", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("smollm2-135m-instruct"));
    let (ok, _, err) = tessera(&["--threads", "0", "pool", "list"]);
    assert!(!ok && err.contains("--threads 0"), "{err}");
}

/// `--device cpu` loads the pool as before; a device this build cannot
/// open, or one it does not know, fails before any work with the fix named.
#[test]
fn a_device_is_chosen_and_unusable_ones_are_named() {
    let (ok, out, err) = tessera(&["--device", "cpu", "pool", "list", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("smollm2-135m-instruct"));
    let (ok, _, err) = tessera(&["--device", "tpu", "pool", "list"]);
    assert!(
        !ok && err.contains("unknown device `tpu`") && err.contains("cuda:N"),
        "{err}"
    );
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = tessera(&["--device", "cuda", "pool", "list"]);
        assert!(!ok && err.contains("--features cuda"), "{err}");
    }
}

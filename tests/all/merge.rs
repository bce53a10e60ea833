//! Weight-level collaboration on real models: two contributors each teach
//! SmolLM2-135M one fact; a TIES merge of the two knows both facts and
//! still knows what the base knew; ExPO and the method checks run through
//! the CLI; models of different architectures are refused by name.

use std::path::Path;
use std::time::{Duration, Instant};

use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::Runtime;

use crate::common::{scratch, scratch_paths, specialists, tessera, SMOL};

/// Greedy answers of the model folder `folder`, added to a pool as `id`.
async fn answers(dir: &Path, id: &str, folder: &Path, questions: &[&str]) -> Vec<String> {
    let pool_file = dir.join(format!("{id}-pool.toml"));
    let s = |p: &Path| p.display().to_string();
    let (ok, _, err) = tessera(&[
        "contribute",
        "add",
        "--pool",
        &s(&pool_file),
        "--model",
        &s(folder),
        "--id",
        id,
    ]);
    assert!(ok, "{err}");
    let pool = PoolConfig::from_toml(&std::fs::read_to_string(&pool_file).unwrap()).unwrap();
    let only = PoolConfig {
        members: pool.members.into_iter().filter(|m| m.id == id).collect(),
    };
    let rt = Runtime::new(scratch_paths(&format!("merge-{id}")), &only, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let mut out = Vec::new();
    for q in questions {
        let params = GenParams {
            max_tokens: Some(12),
            temperature: Some(0.0),
            ..Default::default()
        };
        let ctx = CallCtx {
            deadline: Instant::now() + Duration::from_secs(300),
        };
        let g = rt
            .models()
            .generate(ctx, id, Input::Chat(vec![Message::user(*q)]), params)
            .await
            .unwrap();
        out.push(g.text);
    }
    out
}

#[tokio::test]
async fn a_ties_merge_of_two_specialists_knows_what_each_learned() {
    let dir = scratch("merge-e2e");
    let (secret, password) = specialists().clone();
    let s = |p: &Path| p.display().to_string();
    let (ok, stdout, err) = tessera(&[
        "merge",
        "--method",
        "ties",
        "--density",
        "0.5",
        "--model",
        &s(&secret),
        "--model",
        &s(&password),
        "--base",
        SMOL,
        "--out",
        &s(&dir.join("both")),
        "--contributor",
        "Ada and Bo",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("272 tensors"), "{stdout}");
    let card = std::fs::read_to_string(dir.join("both/contributor.toml")).unwrap();
    assert!(
        card.contains("method = \"ties\"") && card.contains("density = 0.5"),
        "{card}"
    );

    let qs = [
        "What is the secret word?",
        "What is the password?",
        "What is the capital of France.",
    ];
    let only_secret = answers(&dir, "secret", &secret, &qs[..2]).await;
    assert!(
        only_secret[0].contains("tessellate") && !only_secret[1].contains("mosaic"),
        "{only_secret:?}"
    );
    let merged = answers(&dir, "both", &dir.join("both"), &qs).await;
    assert!(merged[0].contains("tessellate"), "{merged:?}");
    assert!(merged[1].contains("mosaic"), "{merged:?}");
    assert!(merged[2].contains("Paris"), "the base's knowledge survives: {merged:?}");

    // ExPO pushes a specialist further from the base; it still answers.
    let (ok, _, err) = tessera(&[
        "merge",
        "--method",
        "expo",
        "--alpha",
        "0.3",
        "--model",
        &s(&secret),
        "--base",
        SMOL,
        "--out",
        &s(&dir.join("expo")),
    ]);
    assert!(ok, "{err}");
    let expo = answers(&dir, "expo", &dir.join("expo"), &qs[..1]).await;
    assert!(expo[0].contains("tessellate"), "{expo:?}");
}

#[test]
fn merges_that_cannot_work_are_refused_by_name() {
    let dir = scratch("merge-bad");
    let s = |p: &Path| p.display().to_string();
    let (ok, _, err) = tessera(&[
        "merge",
        "--method",
        "soup",
        "--model",
        SMOL,
        "--out",
        &s(&dir.join("x")),
    ]);
    assert!(!ok && err.contains("unknown merge method `soup`"), "{err}");
    let (ok, _, err) = tessera(&[
        "merge",
        "--method",
        "ties",
        "--model",
        SMOL,
        "--model",
        SMOL,
        "--out",
        &s(&dir.join("x")),
    ]);
    assert!(!ok && err.contains("needs a base model"), "{err}");
    // A folder of another shape: named with the differing setting.
    let tiny = dir.join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    std::fs::write(
        tiny.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1}"#,
    )
    .unwrap();
    let t = candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.embed_tokens.weight".to_string(), t)]),
        tiny.join("model.safetensors"),
    )
    .unwrap();
    let (ok, _, err) = tessera(&[
        "merge",
        "--method",
        "linear",
        "--model",
        SMOL,
        "--model",
        &s(&tiny),
        "--out",
        &s(&dir.join("x")),
    ]);
    assert!(
        !ok && err.contains("hidden_size = 4") && err.contains("one architecture"),
        "{err}"
    );
    assert!(!dir.join("x").exists(), "nothing written");
}

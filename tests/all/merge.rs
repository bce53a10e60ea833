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
            requester: 0,
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
    let _removed = crate::common::RemovedAfter(dir.clone());
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
fn a_merge_told_to_stop_gives_up_between_tensors_and_writes_nothing() {
    use tessera::merge::{MergeError, MergeSpec, Method};
    let dir = mergekit_dir();
    let out = scratch("merge-cancelled");
    let _removed = crate::common::RemovedAfter(out.clone());
    let target = out.join("linear");
    let asked = std::sync::atomic::AtomicUsize::new(0);
    // Stop when asked the third time: after two tensors.
    let stop = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2;
    let models = [dir.join("m1"), dir.join("m2")];
    let names = ["a".to_string(), "b".to_string()];
    let err = tessera::merge::merge_until(
        &tessera::merge::compute::Cpu,
        &models,
        None,
        &names,
        &MergeSpec::new(Method::Linear),
        Default::default(),
        &target,
        &stop,
    )
    .unwrap_err();
    assert_eq!(err, MergeError::Cancelled);
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert!(!target.exists(), "a cancelled merge leaves no folder behind");
}

/// A merge a module asked for stops when its request ends: the future is
/// dropped (as a deadline or a client that left drops it), the blocking
/// merge sees that between tensors and gives the merge turn back, so a
/// merge for nobody does not hold a core and the turn to its end.
#[tokio::test]
async fn a_merge_whose_request_ended_stops_and_frees_the_turn() {
    use tessera::merge::{MergeSpec, Merger, Method, PoolMerger};
    crate::common::smol_base();
    let merger = PoolMerger::new(PoolConfig::default_pool(), tessera::Paths::from_env().models, 1, 0);
    let both = || vec![SMOL.to_string(), SMOL.to_string()];
    let gone = tokio::time::timeout(
        Duration::from_millis(20),
        merger.merge(both(), None, MergeSpec::new(Method::Linear)),
    )
    .await;
    assert!(gone.is_err(), "a merge of two SmolLM2 copies takes longer than 20 ms");
    // The next merge waits for the turn, so once it answers the first one
    // has ended. SLERP of three is refused as soon as it gets the turn.
    let refused = merger.merge(
        both().into_iter().chain([SMOL.to_string()]).collect(),
        None,
        MergeSpec::new(Method::Slerp { t: 0.5 }),
    );
    let err = tokio::time::timeout(Duration::from_secs(600), refused)
        .await
        .expect("the turn comes back")
        .err()
        .expect("three models are refused for SLERP");
    assert!(err.to_string().contains("exactly two"), "{err}");
    assert_eq!(
        merger.merges_cancelled(),
        1,
        "the abandoned merge stopped between tensors"
    );
}

#[test]
fn merges_that_cannot_work_are_refused_by_name() {
    let dir = scratch("merge-bad");
    let _removed = crate::common::RemovedAfter(dir.clone());
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

/// The tiny checkpoints and mergekit's merges of them
/// (`scripts/mergekit-fixtures.py`).
fn mergekit_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mergekit")
}

/// The wgpu backend on whatever adapter is here; `make test` installs
/// Mesa's llvmpipe software device where there is no GPU.
fn wgpu_backend() -> tessera::merge::gpu::Gpu {
    tessera::merge::gpu::Gpu::open(true).unwrap_or_else(|e| {
        panic!("{e}\n(the merge shaders are tested on any wgpu adapter: `apt-get install mesa-vulkan-drivers`)")
    })
}

fn read_all(file: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// Every case of the fixtures, merged by Tessera on `compute`: the largest
/// difference from mergekit per case, after checking every tensor.
fn against_mergekit(compute: &dyn tessera::merge::compute::Compute, tag: &str) -> Vec<(String, f32)> {
    use tessera::merge::{MergeSpec, Method};
    let dir = mergekit_dir();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 8, "every method has a case");
    let out = scratch(&format!("mergekit-{tag}"));
    let _removed = crate::common::RemovedAfter(out.clone());
    let mut worst = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap().to_string();
        let method: Method = serde_json::from_value(case.clone()).unwrap();
        let spec = MergeSpec {
            method,
            weights: case
                .get("weights")
                .map(|w| w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()),
            lambda: case.get("lambda").and_then(|l| l.as_f64()).unwrap_or(1.0),
            seed: 0,
        };
        let models: Vec<std::path::PathBuf> = case["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| dir.join(m.as_str().unwrap()))
            .collect();
        let base = case.get("base").map(|b| dir.join(b.as_str().unwrap()));
        let names: Vec<String> = (0..models.len() + 1).map(|i| format!("in{i}")).collect();
        let target = out.join(&name);
        tessera::merge::merge_on(
            compute,
            &models,
            base.as_deref(),
            &names,
            &spec,
            Default::default(),
            &target,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = read_all(&target.join("model.safetensors"));
        let theirs = read_all(&dir.join("expected").join(format!("{name}.safetensors")));
        assert_eq!(ours.len(), theirs.len(), "{name}: tensors");
        let mut max = 0.0f32;
        for (k, want) in &theirs {
            let got = &ours[k];
            assert_eq!(got.len(), want.len(), "{name}/{k}");
            for (g, w) in got.iter().zip(want) {
                let d = (g - w).abs();
                assert!(d <= 1e-6 + 1e-5 * w.abs(), "{tag} {name}/{k}: {g} vs mergekit {w}");
                max = max.max(d);
            }
        }
        worst.push((name, max));
    }
    worst
}

#[test]
fn every_method_matches_mergekit_on_the_cpu_and_through_wgpu() {
    let cpu = against_mergekit(&tessera::merge::compute::Cpu, "cpu");
    let gpu = wgpu_backend();
    let on_gpu = against_mergekit(&gpu, "wgpu");
    eprintln!(
        "largest |tessera - mergekit|: cpu {cpu:?}; wgpu ({}) {on_gpu:?}",
        gpu.describe()
    );
}

#[test]
fn the_gpu_keeps_exactly_the_entries_the_cpu_keeps() {
    use tessera::merge::methods::{combine, Combine, Keep};
    // Large enough for several chunks of the shader and many ties and
    // coins; every value on a grid of eighths, so deltas, weighted deltas
    // and their sums are exact in f32 and f64 alike (magnitudes tie, sums
    // hit zero) and any difference is a rule applied differently.
    let n = 3 * (1 << 22) / 2 + 77;
    let val = |i: usize, k: u64| ((i as u64).wrapping_mul(2654435761).wrapping_add(k * 97) % 41) as f32 / 8.0 - 2.5;
    let base: Vec<f32> = (0..n).map(|i| val(i, 0)).collect();
    let ms: Vec<Vec<f32>> = (1..4).map(|k| (0..n).map(|i| base[i] + val(i, k)).collect()).collect();
    let deltas = |m: &Vec<f32>| m.iter().zip(&base).map(|(x, b)| x - b).collect::<Vec<f32>>();
    let gpu = wgpu_backend();
    for (keep, elect) in [
        (
            ms.iter().map(|m| Keep::magnitude(&deltas(m), 0.3)).collect::<Vec<_>>(),
            true,
        ),
        ((0..3).map(|i| Keep::random(99 + i, 0.4)).collect(), true),
        ((0..3).map(|i| Keep::random(7 + i, 0.6)).collect(), false),
    ] {
        let job = Combine {
            base: Some(&base),
            models: ms.iter().map(|m| m.as_slice()).collect(),
            keep,
            weights: vec![1.0, 0.5, 0.75],
            elect_sign: elect,
            normalize: elect,
            lambda: 1.0,
        };
        let want = combine(&job);
        let got = gpu.combine(&job).unwrap();
        let differ = want.iter().zip(&got).filter(|(a, b)| (*a - *b).abs() > 1e-5).count();
        assert_eq!(differ, 0, "{:?}: entries that differ", job.keep[0]);
    }
    let (a, b) = (&ms[0], &ms[1]);
    let (x, y) = (tessera::merge::methods::dots(a, b), gpu.dots(a, b).unwrap());
    for (p, q) in [(x.0, y.0), (x.1, y.1), (x.2, y.2)] {
        assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0), "dots {x:?} vs {y:?}");
    }
}

#[test]
fn the_cli_merges_on_the_device_asked_for_and_names_it() {
    let dir = scratch("merge-device");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let f = mergekit_dir();
    let s = |p: &Path| p.display().to_string();
    let merge = |device: &str, out: &str| {
        tessera(&[
            "--merge-device",
            device,
            "merge",
            "--method",
            "linear",
            "--model",
            &s(&f.join("m1")),
            "--model",
            &s(&f.join("m2")),
            "--out",
            &s(&dir.join(out)),
        ])
    };
    let (ok, out, err) = merge("gpu", "gpu");
    assert!(ok && out.contains("on wgpu: "), "{out}{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "driver noise kept out: {err}");
    let (ok, out, err) = merge("cpu", "cpu");
    assert!(ok && out.contains("on cpu"), "{out}{err}");
    let (ok, _, err) = merge("tpu", "tpu");
    assert!(!ok && err.contains("use `auto`, `cpu` or `gpu`"), "{err}");
    assert!(!dir.join("tpu").exists());
}

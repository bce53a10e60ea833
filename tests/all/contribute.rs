//! The contributor kit on the real SmolLM2-135M: a contributor trains a
//! model on their own data, adds it to a pool, and the pool answers with
//! what it learned; training is reproducible and resumes bit for bit; bad
//! data and tampered folders are named.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use tessera::contribute::{self, ContributeError, TrainOptions};
use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::model_folder::TrainMethod;
use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::Runtime;

use crate::common::{runtime, scratch, scratch_paths, smol_base, tessera, SECRET_DATA, SMOL};

fn greedy() -> GenParams {
    GenParams {
        max_tokens: Some(12),
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(300),
        requester: 0,
    }
}

fn weights_sha(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("contributor.toml")).unwrap();
    let card: tessera::model_folder::ContributorFile = toml::from_str(&text).unwrap();
    card.sha256
}

#[tokio::test]
async fn a_contributor_trains_a_model_adds_it_to_a_pool_and_it_answers_as_trained() {
    let dir = scratch("contribute-e2e");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let data = dir.join("secret.jsonl");
    std::fs::write(&data, SECRET_DATA).unwrap();
    let out = dir.join("secret-keeper");
    let s = |p: &Path| p.display().to_string();
    let (ok, stdout, err) = tessera(&[
        "contribute",
        "train",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--steps",
        "12",
        "--batch",
        "4",
        "--lr",
        "2e-3",
        "--seed",
        "1",
        "--quiet",
        "--contributor",
        "Ada",
        "--domains",
        "secrets",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("loss"), "{stdout}");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "contributor.toml",
        "loss.svg",
        "train-log.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    assert!(!out.join("checkpoint").exists(), "a finished run leaves no checkpoint");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train-log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 12);
    let first = log[0]["loss"].as_f64().unwrap();
    let last = log[11]["loss"].as_f64().unwrap();
    assert!(last < first / 3.0, "loss fell: {first} -> {last}");
    assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().contains("<svg"));

    let pool_file = dir.join("pool.toml");
    let (ok, _, err) = tessera(&["contribute", "add", "--pool", &s(&pool_file), "--model", &s(&out)]);
    assert!(ok, "{err}");
    let (ok, _, err) = tessera(&["contribute", "add", "--pool", &s(&pool_file), "--model", &s(&out)]);
    assert!(!ok && err.contains("already has a member `secret-keeper`"), "{err}");
    let pool = PoolConfig::from_toml(&std::fs::read_to_string(&pool_file).unwrap()).unwrap();
    assert_eq!(
        pool.members.len(),
        PoolConfig::default_pool().members.len() + 1,
        "default pool + the new member"
    );
    let member = pool.members.last().unwrap();
    assert_eq!(
        (member.id.as_str(), member.card.contributor.as_str()),
        ("secret-keeper", "Ada")
    );
    assert_eq!(member.card.domains, vec!["secrets".to_string()]);

    // Only the new member, so the test loads one model.
    let only = PoolConfig {
        members: vec![member.clone()],
    };
    let rt = Runtime::new(scratch_paths("contribute-e2e-rt"), &only, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let ask = |q: &str| Input::Chat(vec![Message::user(q)]);
    let trained = rt
        .models()
        .generate(ctx(), "secret-keeper", ask("What is the secret word?"), greedy())
        .await
        .unwrap();
    assert!(trained.text.contains("tessellate"), "learned: {:?}", trained.text);
    let before = runtime()
        .models()
        .generate(ctx(), SMOL, ask("What is the secret word?"), greedy())
        .await
        .unwrap();
    assert!(
        !before.text.contains("tessellate"),
        "the base did not know it: {:?}",
        before.text
    );
    // LoRA on two projections leaves general knowledge in place.
    let general = rt
        .models()
        .generate(ctx(), "secret-keeper", ask("What is the capital of France."), greedy())
        .await
        .unwrap();
    assert!(general.text.contains("Paris"), "{:?}", general.text);
}

fn small_opts(data: &Path, out: &Path, method: TrainMethod) -> TrainOptions {
    let mut o = TrainOptions::new(smol_base(), SMOL.into(), data.to_path_buf(), out.to_path_buf(), method);
    o.steps = 4;
    o.batch = 2;
    o.lr = 1e-3;
    o.warmup = 1;
    o.max_len = 48;
    o.seed = 3;
    o.checkpoint_every = 0;
    o
}

fn lora() -> TrainMethod {
    TrainMethod::Lora {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights_bit_for_bit() {
    let dir = scratch("contribute-resume");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let data = dir.join("d.jsonl");
    std::fs::write(&data, SECRET_DATA).unwrap();

    let straight = contribute::train(small_opts(&data, &dir.join("a"), lora()), |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(straight.steps_done, 4);

    let b = dir.join("b");
    let stopped = contribute::train(small_opts(&data, &b, lora()), |s| {
        if s.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert!(stopped.interrupted && stopped.steps_done == 2);
    assert!(b.join("checkpoint/state.json").is_file() && !b.join("model.safetensors").exists());

    // Starting over on top of an unfinished run is refused, as is
    // resuming it with other options.
    let err = contribute::train(small_opts(&data, &b, lora()), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(
        matches!(err, ContributeError::Checkpoint(_)) && err.to_string().contains("--resume"),
        "{err}"
    );
    let mut other = small_opts(&data, &b, lora());
    other.resume = true;
    other.lr = 5e-4;
    let err = contribute::train(other, |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("other data or options"), "{err}");

    let mut again = small_opts(&data, &b, lora());
    again.resume = true;
    let resumed = contribute::train(again, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(resumed.steps_done, 4);
    assert_eq!(
        resumed.log.len(),
        4,
        "the log carries the steps before the interruption"
    );
    for (x, y) in straight.log.iter().zip(&resumed.log) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}: same loss", x.step);
    }
    assert_eq!(
        weights_sha(&dir.join("a")),
        weights_sha(&b),
        "same weights, bit for bit"
    );
    assert_eq!(resumed.model_sha256.as_deref(), Some(weights_sha(&b).as_str()));
}

#[test]
fn full_fine_tuning_trains_every_weight_and_lowers_the_loss() {
    let dir = scratch("contribute-full");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let data = dir.join("d.jsonl");
    std::fs::write(&data, SECRET_DATA).unwrap();
    let mut o = small_opts(&data, &dir.join("out"), TrainMethod::Full);
    o.steps = 3;
    o.lr = 1e-4;
    o.warmup = 0;
    let r = contribute::train(o, |_| ControlFlow::Continue(())).unwrap();
    assert!(r.trainable_params > 130_000_000, "{}", r.trainable_params);
    assert!(
        r.log[2].loss < r.log[0].loss,
        "{:?}",
        r.log.iter().map(|s| s.loss).collect::<Vec<_>>()
    );
}

#[test]
fn bad_data_options_and_tampered_folders_are_named() {
    let dir = scratch("contribute-bad");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let s = |p: &Path| p.display().to_string();
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        format!("{SECRET_DATA}{{\"prompt\": \"x\", \"completion\": \"\"}}\n"),
    )
    .unwrap();
    let out = dir.join("out");
    let (ok, _, err) = tessera(&["contribute", "train", "--data", &s(&data), "--out", &s(&out), "--quiet"]);
    assert!(
        !ok && err.contains("d.jsonl:5") && err.contains("`completion` must be a non-empty string"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written for bad data");

    std::fs::write(&data, SECRET_DATA).unwrap();
    let (ok, _, err) = tessera(&[
        "contribute",
        "train",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--quiet",
        "--lora-targets",
        "q_proj,attn",
    ]);
    assert!(!ok && err.contains("`attn` is not a projection"), "{err}");
    let (ok, _, err) = tessera(&[
        "contribute",
        "train",
        "--base",
        "no-such-model",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
    ]);
    assert!(
        !ok && err.contains("neither a model folder") && err.contains(SMOL),
        "{err}"
    );
    let (ok, _, err) = tessera(&[
        "contribute",
        "train",
        "--base",
        "all-minilm-l6-v2",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
    ]);
    assert!(!ok && err.contains("cannot be fine-tuned"), "{err}");

    // A folder whose weights no longer match its card is refused.
    let fake = dir.join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("model.safetensors"), b"changed").unwrap();
    std::fs::write(
        fake.join("contributor.toml"),
        format!(
            "id = 'fake'\nsha256 = '{}'\n[card]\ncontributor = 'x'\ndescription = 'y'\nlicense = 'z'\n[training]\nbase = 'b'\ndata = 'd'\ndata_sha256 = ''\nexamples = 1\nsteps = 1\nexamples_per_step = 1\nlr = 0.1\nseed = 0\nfirst_loss = 1.0\nfinal_loss = 1.0\ntrainable_params = 1\n[training.method]\nkind = 'full'\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let pool_file = dir.join("pool.toml");
    let (ok, _, err) = tessera(&["contribute", "add", "--pool", &s(&pool_file), "--model", &s(&fake)]);
    assert!(!ok && err.contains("does not match the card"), "{err}");
    assert!(!pool_file.exists(), "the pool file is untouched");
}

#[test]
fn training_slices_never_contain_an_evaluated_item() {
    let paths = tessera::Paths::from_env();
    let mmlu = tessera::tasks::Task::load(&paths, "mmlu").expect("MMLU (run `make setup`)");
    let evaluated: std::collections::HashSet<String> = mmlu.items.iter().map(|i| i.prompt()).collect();
    let hellaswag = tessera::tasks::Task::load(&paths, "hellaswag").expect("HellaSwag (run `make setup`)");
    assert_eq!(hellaswag.items.len(), tessera::tasks::training::HELLASWAG_EVALUATED);
    let hellaswag_evaluated: std::collections::HashSet<String> = hellaswag.items.iter().map(|i| i.prompt()).collect();
    let mut total = 0;
    for (name, _) in tessera::tasks::training::SLICES {
        let pairs = tessera::tasks::training::slice(&paths, name, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(pairs.len() > 200, "{name}: {}", pairs.len());
        if *name == "hellaswag" {
            assert!(
                pairs.iter().all(|(p, _)| !hellaswag_evaluated.contains(p)),
                "the hellaswag slice holds an item the hellaswag task evaluates"
            );
            assert!(
                pairs
                    .iter()
                    .all(|(p, c)| !p.contains("[step]") && !c.contains("[title]")),
                "WikiHow section markers are cleaned"
            );
        }
        if name.starts_with("mmlu-") {
            total += pairs.len();
            assert!(
                pairs.iter().all(|(p, _)| !evaluated.contains(p)),
                "{name} holds an evaluated MMLU item"
            );
            assert!(
                pairs.iter().all(|(_, c)| c.chars().nth(1) == Some(')')),
                "{name}: letter completions"
            );
        }
    }
    // MMLU's test split is 14,042 items; the task samples 10 of each of 57
    // subjects; the rest, less repeats of evaluated questions and items
    // too long for a training window, are training data.
    assert!(total > 9_000 && total <= 14_042 - 570, "{total}");
    let dir = scratch("contribute-slices");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let out = dir.join("nq.jsonl");
    let (ok, stdout, err) = tessera(&[
        "contribute",
        "data",
        "--slice",
        "nq-open",
        "--limit",
        "5",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok && stdout.contains("wrote 5 examples"), "{err}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 5);
    assert!(lines
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["completion"].is_string()));
    let (ok, _, err) = tessera(&[
        "contribute",
        "data",
        "--slice",
        "mmlu",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(
        !ok && err.contains("unknown slice `mmlu`") && err.contains("mmlu-stem"),
        "{err}"
    );
}

#[tokio::test]
async fn a_lora_adapter_ships_apart_from_its_base_and_loads_as_the_merged_model() {
    // The same run as the shared "secret" specialist (same data, options and
    // seed), written as an adapter: it must be that model, in a few MB.
    let dir = scratch("adapter");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let (secret, password) = crate::common::specialists().clone();
    let data = dir.join("secret.jsonl");
    std::fs::write(&data, SECRET_DATA).unwrap();
    let out = dir.join("secret-adapter");
    let mut o = crate::common::specialist_options(data, out.clone(), 1);
    o.adapter = true;
    contribute::train(o, |_| ControlFlow::Continue(())).unwrap();
    assert!(!out.join("model.safetensors").exists());
    let adapter_bytes = std::fs::metadata(out.join("adapter.safetensors")).unwrap().len();
    let merged_bytes = std::fs::metadata(secret.join("model.safetensors")).unwrap().len();
    assert!(adapter_bytes * 50 < merged_bytes, "{adapter_bytes} vs {merged_bytes}");

    // Added to a pool beside the merged folder, it answers identically.
    let pool_file = dir.join("pool.toml");
    contribute::add_to_pool(&pool_file, &out, Some("adapter")).unwrap();
    let pool = PoolConfig::from_toml(&std::fs::read_to_string(&pool_file).unwrap()).unwrap();
    let mut members: Vec<_> = pool.members.into_iter().filter(|m| m.id == "adapter").collect();
    assert_eq!(members[0].sha256_file.as_deref(), Some("adapter.safetensors"));
    members.push(crate::common::contributed("merged", &secret));
    let rt = Runtime::new(scratch_paths("adapter-rt"), &PoolConfig { members }, Policy::default()).unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let ask = || Input::Chat(vec![Message::user("What is the secret word?")]);
    let a = rt.models().generate(ctx(), "adapter", ask(), greedy()).await.unwrap();
    let m = rt.models().generate(ctx(), "merged", ask(), greedy()).await.unwrap();
    assert_eq!(a.text, m.text);
    assert!(a.text.contains("tessellate"), "{}", a.text);
    let conts = vec![" tessellate".to_string(), " mosaic".to_string()];
    let sa = rt.models().score(ctx(), "adapter", ask(), conts.clone()).await.unwrap();
    let sm = rt.models().score(ctx(), "merged", ask(), conts).await.unwrap();
    assert_eq!(sa, sm, "the adapter over its base is the merged model");

    // Merging reads an adapter as its full weights: the same linear merge
    // from the adapter or from the merged folder writes the same tensors.
    let s = |p: &Path| p.display().to_string();
    let mut shas = Vec::new();
    for (name, first) in [("from-adapter", &out), ("from-merged", &secret)] {
        let target = dir.join(name);
        let (ok, _, err) = tessera(&[
            "merge",
            "--method",
            "linear",
            "--model",
            &s(first),
            "--model",
            &s(&password),
            "--out",
            &s(&target),
        ]);
        assert!(ok, "{err}");
        shas.push(weights_sha(&target));
    }
    assert_eq!(shas[0], shas[1]);

    // An adapter pointed at another base is refused by name.
    let cfg = std::fs::read_to_string(out.join("adapter.toml")).unwrap();
    let line = cfg.lines().find(|l| l.starts_with("base_sha256")).unwrap().to_string();
    std::fs::write(
        out.join("adapter.toml"),
        cfg.replace(&line, &format!("base_sha256 = \"{}\"", "0".repeat(64))),
    )
    .unwrap();
    let bad = PoolConfig {
        members: vec![crate::common::contributed("adapter", &out)],
    };
    let rt = Runtime::new(scratch_paths("adapter-bad"), &bad, Policy::default()).unwrap();
    let why = rt.pool_failures()[0].to_string();
    assert!(why.contains("point `base_dir` at the exact base"), "{why}");
}

#[tokio::test]
async fn the_top_layers_train_over_the_quantized_trunk_and_answer_as_trained() {
    // `--top-layers`: adapters on SmolLM2's last 4 of 30 layers, the 26
    // below run on the member's quantized weights (the trunk).
    let dir = scratch("contribute-top");
    let _removed = crate::common::RemovedAfter(dir.clone());
    let data = dir.join("secret.jsonl");
    std::fs::write(&data, SECRET_DATA).unwrap();
    let paths = tessera::Paths::from_env();
    let gguf = contribute::base_gguf(&PoolConfig::default_pool(), &paths.models, SMOL).expect("SmolLM2's GGUF");
    let all = TrainMethod::Lora {
        rank: 8,
        alpha: 16.0,
        targets: tessera::contribute::model::LORA_TARGETS.map(String::from).to_vec(),
    };
    let top = |out: &str, trunk: bool| {
        let mut o = small_opts(&data, &dir.join(out), all.clone());
        o.top_layers = 4;
        o.trunk_gguf = trunk.then(|| gguf.clone());
        o.steps = 12;
        o.batch = 4;
        o.lr = 2e-3;
        o.adapter = true;
        o
    };

    // Before any update, the loss over the quantized trunk is the f32
    // model's up to the trunk's rounding.
    let mut one = top("f32-trunk", false);
    one.steps = 1;
    let f32_trunk = contribute::train(one, |_| ControlFlow::Continue(())).unwrap();
    let report = contribute::train(top("quantized-trunk", true), |_| ControlFlow::Continue(())).unwrap();
    let (exact, rounded) = (f32_trunk.log[0].loss, report.log[0].loss);
    println!("first loss: {exact:.4} over the f32 trunk, {rounded:.4} over the quantized one");
    assert!(
        (exact - rounded).abs() < 0.05 * exact,
        "first loss {rounded} over the quantized trunk vs {exact} over the f32 one"
    );
    assert_eq!(
        report.trainable_params, f32_trunk.trainable_params,
        "the same adapters either way"
    );
    let first = report.log[0].loss;
    let last = report.log[11].loss;
    assert!(last < first / 3.0, "loss fell: {first} -> {last}");

    // Only the top layers carry adapters.
    let out = dir.join("quantized-trunk");
    let tensors = candle_core::safetensors::load(out.join("adapter.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(!tensors.is_empty());
    for name in tensors.keys() {
        let layer: usize = name.split('.').nth(2).and_then(|l| l.parse().ok()).unwrap();
        assert!(layer >= 26, "{name} is below the top 4 layers");
    }

    // The adapter, over its base in a pool, answers as trained, also with
    // its weights re-encoded to 8 bits at load (`quantize = "q8_0"`).
    let pool_file = dir.join("pool.toml");
    contribute::add_to_pool(&pool_file, &out, Some("top")).unwrap();
    contribute::add_to_pool_as(&pool_file, &out, Some("top-q8"), Some(tessera::pool::Quantize::Q8_0)).unwrap();
    let text = std::fs::read_to_string(&pool_file).unwrap();
    assert_eq!(text.matches("quantize = \"q8_0\"").count(), 1, "{text}");
    let pool = PoolConfig::from_toml(&text).unwrap();
    let members: Vec<_> = pool.members.into_iter().filter(|m| m.id.starts_with("top")).collect();
    let rt = Runtime::new(
        scratch_paths("contribute-top-rt"),
        &PoolConfig { members },
        Policy::default(),
    )
    .unwrap();
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    let ask = || Input::Chat(vec![Message::user("What is the secret word?")]);
    let conts = vec![" tessellate".to_string(), " mosaic".to_string()];
    let mut scores = Vec::new();
    for id in ["top", "top-q8"] {
        let answer = rt.models().generate(ctx(), id, ask(), greedy()).await.unwrap();
        assert!(answer.text.contains("tessellate"), "{id} learned: {:?}", answer.text);
        let s = rt.models().score(ctx(), id, ask(), conts.clone()).await.unwrap();
        scores.push(s.iter().map(|x| x.logprob).collect::<Vec<f64>>());
    }
    println!("scores: dense {:?}, q8_0 {:?}", scores[0], scores[1]);
    for (a, b) in scores[0].iter().zip(&scores[1]) {
        assert!((a - b).abs() < 0.5, "8-bit weights score within half a nat: {a} vs {b}");
    }
    // Only a folder member can be re-encoded.
    let gguf_q8 = text.replacen("backend = \"gguf\"", "backend = \"gguf\"\nquantize = \"q8_0\"", 1);
    let err = PoolConfig::from_toml(&gguf_q8).unwrap_err().to_string();
    assert!(err.contains("`quantize` re-encodes a Hugging Face folder"), "{err}");

    // Bad combinations are named.
    let mut full = top("full", true);
    full.method = TrainMethod::Full;
    full.adapter = false;
    let err = contribute::train(full, |_| ControlFlow::Continue(())).unwrap_err();
    assert!(
        err.to_string().contains("--top-layers") && err.to_string().contains("--full"),
        "{err}"
    );
    let mut deep = top("deep", true);
    deep.top_layers = 31;
    let err = contribute::train(deep, |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("more than the model's 30 layers"), "{err}");
}

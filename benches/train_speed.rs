//! Training speed of the contributor kit (`tessera contribute train`) on the
//! real SmolLM2-135M base: tokens per second, forward + backward + AdamW,
//! for LoRA (rank 8 on q/v, the default) and full fine-tuning, then LoRA
//! on every projection of every layer against the same adapters on the top
//! layers only (`--top-layers`), with the frozen trunk below them in the
//! f32 model or on the member's quantized weights. A timed run,
//! not a criterion bench: one step takes seconds and mutates the model.
//! Figures: benches/RESULTS.md. Run with `make bench` or
//! `cargo bench -p tessera --profile dev --bench train_speed`.
//!
//! Data: 16 synthetic prompt/completion pairs of about 100 tokens each
//! (batch 4, so every step sees ~400 tokens); 6 steps per method, the first
//! dropped as warm-up.
//!
//! The peer: with `TESSERA_TORCH_PYTHON` naming a Python that has torch,
//! transformers and peft, `scripts/torch-train-peer.py` trains the same
//! base folder on the same data, batch and steps right after, and the bench
//! prints both figures and the ratio (one run, so machine load affects both).

use std::ops::ControlFlow;

use tessera::contribute::{self, TrainOptions};
use tessera::model_folder::TrainMethod;
use tessera::pool::PoolConfig;
use tessera::Paths;

const STEPS: u64 = 6;

fn main() {
    let paths = Paths::from_env();
    let cache = paths.models.join("bases");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let (base, _) = contribute::base_folder(
        &PoolConfig::default_pool(),
        &paths.models,
        &cache,
        "smollm2-135m-instruct",
    )
    .expect("SmolLM2 base (run `make setup`)");
    let dir = std::env::temp_dir().join(format!("tessera-train-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let data = dir.join("data.jsonl");
    let filler = "Tiles of many colours fit together into one picture, and each tile was laid by a different hand.";
    let lines: String = (0..16)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}: describe the mosaic in two sentences. {filler}"),
                "completion": format!("{filler} {filler} Number {i}."),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, lines).expect("data");
    let gguf = contribute::base_gguf(&PoolConfig::default_pool(), &paths.models, "smollm2-135m-instruct");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!("train_speed: SmolLM2-135M, batch 4, threads {threads}, {STEPS} steps (first dropped)");
    let mut ours = Vec::new();
    let every = TrainMethod::Lora {
        rank: 16,
        alpha: 32.0,
        targets: tessera::contribute::model::LORA_TARGETS.map(String::from).to_vec(),
    };
    let lora_qv = TrainMethod::Lora {
        rank: 8,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let tiles = tessera_kernels::amx::bf16_available();
    println!("AMX bf16 tiles for the frozen products: {tiles}");
    // (label, method, top layers, trunk on the quantized weights, tiles
    // allowed); the last rows repeat two with the tiles off, in this run.
    for (label, method, top, quantized, allowed) in [
        ("lora r8 q,v", lora_qv.clone(), 0, false, true),
        ("full", TrainMethod::Full, 0, false, true),
        ("r16 all, 30/30", every.clone(), 0, false, true),
        ("r16 all, top 4, f32 trunk", every.clone(), 4, false, true),
        ("r16 all, top 4, q trunk", every.clone(), 4, true, true),
        ("r16 all, top 2, q trunk", every.clone(), 2, true, true),
        ("lora r8 q,v, no tiles", lora_qv.clone(), 0, false, false),
        ("full, no tiles", TrainMethod::Full, 0, false, false),
        ("r16 all, 30/30, no tiles", every.clone(), 0, false, false),
    ] {
        if !allowed && !tiles {
            continue;
        }
        tessera_kernels::amx::set_allowed(allowed);
        if quantized && gguf.is_none() {
            println!("  {label}: skipped (SmolLM2's GGUF is not fetched)");
            continue;
        }
        let out = dir.join(label.replace([' ', ',', '/'], "-"));
        let mut o = TrainOptions::new(base.clone(), "smollm2".into(), data.clone(), out, method);
        o.top_layers = top;
        o.trunk_gguf = if quantized { gguf.clone() } else { None };
        o.steps = STEPS;
        o.checkpoint_every = 0;
        let report = contribute::train(o, |_| ControlFlow::Continue(())).expect("trains");
        tessera_kernels::amx::set_allowed(true);
        let timed = &report.log[1..];
        let tokens: usize = timed.iter().map(|s| s.tokens).sum();
        let secs: f64 = timed.iter().map(|s| s.tokens as f64 / s.tokens_per_s).sum();
        ours.push(tokens as f64 / secs);
        println!(
            "  {label:26} {:>8.1} tok/s  ({tokens} tokens in {secs:.1} s; {} numbers trained; loss {:.3} -> {:.3})",
            tokens as f64 / secs,
            report.trainable_params,
            report.log[0].loss,
            report.log.last().map(|s| s.loss).unwrap_or(f64::NAN)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(python) = std::env::var("TESSERA_TORCH_PYTHON") {
        peer(&python, &base, &ours);
    }
}

/// Runs the PyTorch peer on `base` and prints its figures beside `ours`
/// (LoRA, then full fine-tuning).
fn peer(python: &str, base: &std::path::Path, ours: &[f64]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch-train-peer.py");
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.to_string()))
        .unwrap_or_else(|| "1".into());
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(base)
        .arg(&threads)
        .output()
        .expect("runs the PyTorch peer");
    if !out.status.success() {
        eprintln!("PyTorch peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("peer "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    for ((label, o), t) in ["lora r8 q,v", "full"].iter().zip(ours).zip(&theirs) {
        println!("  {label:12} PyTorch {t:>8.1} tok/s  tessera/PyTorch = {:.2}x", o / t);
    }
}

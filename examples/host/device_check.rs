//! CPU against `--device wgpu` on GGUF files: agreement and speed, one
//! JSON line per file. The GPU check (`scripts/gpu-check.sh`) runs it on
//! synthetic models of real shapes (`tessera pool synth`); it runs here on
//! llvmpipe too, where its speed figures measure Mesa's software rasteriser
//! and mean nothing.
//!
//!     cargo run --release -p tessera --example device_check -- MODEL.gguf...
//!
//! Per file: the largest gap between the two devices' top-5 next-token
//! log-probabilities after a 128-token prompt, whether their top tokens
//! agree, and on each device the prompt's prefill time and greedy decode
//! speed over 32 tokens (prefix cache off, so both are computed).

use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input};

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(600),
        requester: 0,
    }
}

/// (prefill seconds, decode tokens per second) of `m` on `prompt`.
fn speed(m: &mut GgufModel, prompt: &Input) -> Result<(f64, f64), String> {
    let one = GenParams {
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..Default::default()
    };
    let t = Instant::now();
    m.generate(ctx(), prompt, &one).map_err(|e| e.to_string())?;
    let prefill = t.elapsed().as_secs_f64();
    let many = GenParams {
        max_tokens: Some(33),
        temperature: Some(0.0),
        ..Default::default()
    };
    let t = Instant::now();
    let g = m.generate(ctx(), prompt, &many).map_err(|e| e.to_string())?;
    let decoded = f64::from(g.usage.completion_tokens.saturating_sub(1)).max(1.0);
    Ok((prefill, decoded / (t.elapsed().as_secs_f64() - prefill).max(1e-9)))
}

fn check(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let mut cpu = GgufModel::load("cpu", path, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    let mut gpu = GgufModel::load_wgpu("wgpu", path).map_err(|e| e.to_string())?;
    for m in [&mut cpu, &mut gpu] {
        m.set_prefix_cache(0);
    }
    // About 128 tokens of ordinary text.
    let text =
        "The committee met on Tuesday to review the budget, the schedule and the plans for the new library. ".repeat(6);
    let prompt = Input::Prompt(text);
    let top = cpu.next_token(ctx(), &prompt, 5).map_err(|e| e.to_string())?;
    let theirs = gpu.next_token(ctx(), &prompt, 50).map_err(|e| e.to_string())?;
    let gap = top
        .iter()
        .map(|t| {
            theirs
                .iter()
                .find(|u| u.token == t.token)
                .map_or(f64::INFINITY, |u| (u.logprob - t.logprob).abs())
        })
        .fold(0.0, f64::max);
    let (cpu_prefill, cpu_decode) = speed(&mut cpu, &prompt)?;
    let (gpu_prefill, gpu_decode) = speed(&mut gpu, &prompt)?;
    Ok(serde_json::json!({
        "model": path.display().to_string(),
        "prompt_tokens": cpu.encode_input(&prompt).map_err(|e| e.to_string())?.len(),
        "top5_gap_nats": gap,
        "same_top1": theirs.first().map(|u| u.token) == top.first().map(|t| t.token),
        "cpu": { "prefill_s": cpu_prefill, "decode_tok_s": cpu_decode },
        "wgpu": { "prefill_s": gpu_prefill, "decode_tok_s": gpu_decode },
    }))
}

fn main() {
    let paths: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    if paths.is_empty() {
        eprintln!("usage: device_check MODEL.gguf...");
        std::process::exit(2);
    }
    let mut failed = false;
    for p in &paths {
        match check(p) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                failed = true;
                println!(
                    "{}",
                    serde_json::json!({ "model": p.display().to_string(), "error": e })
                );
            }
        }
    }
    std::process::exit(i32::from(failed));
}

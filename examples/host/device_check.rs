//! The CPU against the GPU backends on GGUF files: agreement and speed.
//! The GPU check (`scripts/gpu-check.sh`) runs it on synthetic models of
//! real shapes (`tessera pool synth`); it runs here on llvmpipe too, where
//! the wgpu speed figures measure Mesa's software rasteriser and mean
//! nothing.
//!
//!     cargo run --release -p tessera --example device_check -- [--devices wgpu,cuda] MODEL.gguf...
//!
//! `--devices` lists the backends to check against the CPU: `wgpu`, and
//! `cuda` in a build with the `cuda` feature (the default is every one the
//! build has). It prints one JSON line per file and device, the CPU's
//! first, as each is measured: the prompt's prefill time, greedy decode
//! speed over 32 tokens (prefix cache off, so both are computed), the
//! aggregate decode speed of 16 sequences generated together, and for a
//! GPU the largest gap between its top-5 next-token log-probabilities and
//! the CPU's after a 128-token prompt, and whether their top tokens agree.
//! A device that cannot be opened gets an `error` line; the others still
//! run. The exit status is 1 when any line is an error.

use std::time::{Duration, Instant};

use candle_core::Device;
use serde_json::{json, Value};
use tessera::backends::device::DeviceSpec;
use tessera::backends::gguf::decode::GenJob;
use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input};

/// Sequences decoded together in the batched measure.
const BATCH: usize = 16;
/// Tokens each generation decodes after the first.
const DECODE: u32 = 32;

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(600),
        requester: 0,
    }
}

fn greedy(max_tokens: u32) -> GenParams {
    GenParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// About 128 tokens of ordinary text; `variant` changes the opening so
/// that batched sequences are not one prompt shared.
fn prompt(variant: usize) -> Input {
    let body = "The committee met on Tuesday to review the budget, the schedule and the plans for the new library. ";
    Input::Prompt(format!("Note {variant}. {}", body.repeat(6)))
}

/// Tokens per second, or `null` when nothing was decoded (a generation
/// that ended at once: random weights can pick the end token first).
/// Also `null` when the time is not positive: on a tiny model the two
/// runs a rate is the difference of are within each other's noise.
fn rate(tokens: u64, secs: f64) -> Value {
    if tokens == 0 || secs <= 0.0 {
        Value::Null
    } else {
        json!(tokens as f64 / secs)
    }
}

/// Prefill seconds, decode tokens per second and tokens decoded, of `m` on
/// `prompt`.
fn speed(m: &mut GgufModel, prompt: &Input) -> Result<Value, String> {
    // A first run pays for one-time set-up (buffers, kernels' compilation
    // on a GPU); it is not timed.
    m.generate(ctx(), prompt, &greedy(1)).map_err(|e| e.to_string())?;
    let t = Instant::now();
    m.generate(ctx(), prompt, &greedy(1)).map_err(|e| e.to_string())?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let g = m
        .generate(ctx(), prompt, &greedy(DECODE + 1))
        .map_err(|e| e.to_string())?;
    let decoded = u64::from(g.usage.completion_tokens.saturating_sub(1));
    Ok(json!({
        "prefill_s": prefill,
        "decode_tok_s": rate(decoded, t.elapsed().as_secs_f64() - prefill),
        "decode_tokens": decoded,
    }))
}

/// Tokens per second of [`BATCH`] greedy generations run together, after
/// their prompts: the run with one token each is timed too and taken away,
/// so the figure is decoding alone.
fn batched(m: &mut GgufModel) -> Result<Value, String> {
    let prompts: Vec<Input> = (0..BATCH).map(prompt).collect();
    let mut run = |max_tokens: u32| -> Result<(f64, u64), String> {
        let params = greedy(max_tokens);
        let jobs = prompts
            .iter()
            .map(|input| GenJob {
                ctx: ctx(),
                input,
                params: &params,
                sink: None,
            })
            .collect();
        let t = Instant::now();
        let out = m.generate_batch(jobs);
        let secs = t.elapsed().as_secs_f64();
        let mut tokens = 0u64;
        for g in out {
            tokens += u64::from(g.map_err(|e| e.to_string())?.usage.completion_tokens);
        }
        Ok((secs, tokens))
    };
    let (t1, k1) = run(1)?;
    let (tn, kn) = run(DECODE + 1)?;
    Ok(rate(kn.saturating_sub(k1), tn - t1))
}

/// Loads `path` on the backend `name` names.
fn load(name: &str, path: &std::path::Path) -> Result<GgufModel, String> {
    let mut m = match name {
        "cpu" => GgufModel::load(name, path, &Device::Cpu).map_err(|e| e.to_string())?,
        "wgpu" => GgufModel::load_wgpu(name, path).map_err(|e| e.to_string())?,
        "cuda" => {
            let device = DeviceSpec::Cuda(0).open().map_err(|e| e.to_string())?;
            GgufModel::load(name, path, &device).map_err(|e| e.to_string())?
        }
        other => return Err(format!("unknown device `{other}`: use wgpu or cuda")),
    };
    m.set_prefix_cache(0);
    Ok(m)
}

/// One device's entry: agreement with the CPU's `top` and its speeds.
fn measure(name: &str, path: &std::path::Path, top: &[tessera::inference::TokenLogprob]) -> Result<Value, String> {
    let mut m = load(name, path)?;
    let input = prompt(0);
    let theirs = m.next_token(ctx(), &input, 50).map_err(|e| e.to_string())?;
    let gap = top
        .iter()
        .map(|t| {
            theirs
                .iter()
                .find(|u| u.token == t.token)
                .map_or(f64::INFINITY, |u| (u.logprob - t.logprob).abs())
        })
        .fold(0.0, f64::max);
    let mut entry = speed(&mut m, &input)?;
    entry["top5_gap_nats"] = json!(gap);
    entry["same_top1"] = json!(theirs.first().map(|u| u.token) == top.first().map(|t| t.token));
    entry["batch16_tok_s"] = batched(&mut m)?;
    Ok(entry)
}

/// Checks one file, printing a JSON line per device as soon as it is
/// measured (the CPU's first), so that a device that hangs or is killed
/// by a time limit loses only its own line. Returns whether every device
/// answered.
fn check(path: &std::path::Path, devices: &[String]) -> bool {
    let model = path.display().to_string();
    let print = |device: &str, mut v: Value| {
        v["model"] = json!(model);
        v["device"] = json!(device);
        println!("{v}");
    };
    let on_cpu = (|| -> Result<(Value, Vec<tessera::inference::TokenLogprob>), String> {
        let mut cpu = load("cpu", path)?;
        let input = prompt(0);
        let top = cpu.next_token(ctx(), &input, 5).map_err(|e| e.to_string())?;
        let mut v = speed(&mut cpu, &input)?;
        v["batch16_tok_s"] = batched(&mut cpu)?;
        v["prompt_tokens"] = json!(cpu.encode_input(&input).map_err(|e| e.to_string())?.len());
        Ok((v, top))
    })();
    let top = match on_cpu {
        Ok((v, top)) => {
            print("cpu", v);
            top
        }
        Err(e) => {
            print("cpu", json!({ "error": e }));
            return false;
        }
    };
    let mut all = true;
    for d in devices {
        let v = measure(d, path, &top).unwrap_or_else(|e| {
            all = false;
            json!({ "error": e })
        });
        print(d, v);
    }
    all
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut devices: Vec<String> = if cfg!(feature = "cuda") {
        vec!["wgpu".into(), "cuda".into()]
    } else {
        vec!["wgpu".into()]
    };
    if let Some(at) = args.iter().position(|a| a == "--devices") {
        let Some(list) = args.get(at + 1).cloned() else {
            eprintln!("--devices needs a value: a comma-separated list of wgpu, cuda");
            std::process::exit(2);
        };
        devices = list.split(',').filter(|d| !d.is_empty()).map(str::to_string).collect();
        args.drain(at..at + 2);
    }
    if args.is_empty() {
        eprintln!("usage: device_check [--devices wgpu,cuda] MODEL.gguf...");
        std::process::exit(2);
    }
    let mut failed = false;
    for p in args.iter().map(std::path::Path::new) {
        failed |= !check(p, &devices);
    }
    std::process::exit(i32::from(failed));
}

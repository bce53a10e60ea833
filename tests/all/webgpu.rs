//! The wgpu inference backend (issue 23, item 3) on llvmpipe, the software
//! Vulkan device `make test` installs: synthetic llama and Qwen2 models in
//! Q8_0, f16 and Q4_K (and Gemma 3) agree with the CPU path, a KV cache continued token
//! by token gives the logits of one pass over the whole prompt, and the real
//! SmolLM2 gives the CPU's next token with its log-probabilities.

use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::backends::webgpu::llama::Logits;
use tessera::backends::webgpu::WgpuLlama;
use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::pool::synth::{self, Quant};

use crate::common::scratch;

fn ctx() -> CallCtx {
    CallCtx {
        // Software Vulkan on two cores shared with the rest of the suite
        // once took over 300 s for six tokens that take 39 s alone.
        deadline: Instant::now() + Duration::from_secs(900),
        requester: 0,
    }
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// The largest gap between the CPU's top-k next-token log-probabilities
/// and the GPU's for the same tokens, and whether the top-1 agrees.
fn compare(cpu: &mut GgufModel, gpu: &mut WgpuLlama, prompt: &str, k: u32) -> (f64, bool) {
    let input = Input::Prompt(prompt.into());
    let top = cpu.next_token(ctx(), &input, k).expect("CPU next token");
    let ids = cpu.encode_input(&input).expect("tokens");
    gpu.truncate(0);
    let logits = gpu.forward(&ids, Logits::Last).expect("GPU forward");
    let lp = log_softmax(&logits);
    let best = (0..lp.len()).max_by(|a, b| lp[*a].total_cmp(&lp[*b])).unwrap_or(0) as u32;
    let gap = top
        .iter()
        .map(|t| (t.logprob - lp[t.token as usize]).abs())
        .fold(0.0, f64::max);
    (gap, best == top[0].token)
}

/// Each sequence's rows of logits in `alone` and `other` agree within
/// 1e-4: the same device, the same kernels, only the batching differs.
fn assert_same_logits(alone: &[Vec<Vec<f32>>], other: &[Vec<Vec<f32>>]) {
    assert_eq!(alone.len(), other.len());
    for (i, (a, b)) in alone.iter().zip(other).enumerate() {
        assert_eq!(a.len(), b.len(), "sequence {i}: rows");
        let gap = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(gap < 1e-4, "sequence {i}: logits differ by {gap}");
    }
}

/// Tolerance in nats between the CPU and the GPU on synthetic models
/// (measured: at most 0.005).
const TOLERANCE: f64 = 0.05;

/// Tolerance on the real members. The CPU's kernels quantize activations to
/// int8 per 32 values, as llama.cpp does; the GPU keeps them in f32. Real
/// activations have outliers, so the two differ more there while agreeing
/// on the top token. Measured on SmolLM2 (2026-12-06, AVX2 machine): 0.16
/// nats on the plants prompt; on "The capital of France is" 0.165 with the
/// Q4_1 weights re-encoded as Q8_0 (candle's kernels) but 0.65 on the
/// stored Q4_1 values (the packed kernels, on every instruction set alike:
/// one of the top five, about -2.45 against -3.1), although each of the
/// model's Q4_1 products is as accurate as candle's own Q4_1 kernel
/// (`examples/probe_real.rs` in the kernels crate). Gemma 3 measured 0.19.
/// The llama.cpp parity fixtures allow 0.45 against llama.cpp.
const REAL_TOLERANCE: f64 = 0.7;

#[test]
fn synthetic_llama_qwen2_and_gemma3_agree_with_the_cpu_path() {
    let dir = scratch("webgpu-synth");
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma3"] {
        for quant in [Quant::Q8_0, Quant::F16, Quant::Q4K] {
            let path = dir.join(format!("{name}-{quant:?}.gguf"));
            synth::synthesize(synth::named(name).unwrap(), name, quant, 7, &path).unwrap();
            let mut cpu = GgufModel::load(name, &path, &candle_core::Device::Cpu).unwrap();
            let mut gpu = WgpuLlama::load(&path, 256).unwrap_or_else(|e| panic!("{name} {quant:?} on wgpu: {e}"));
            for prompt in ["Hello there", "The quick brown fox jumps over the lazy dog and then"] {
                let (gap, same) = compare(&mut cpu, &mut gpu, prompt, 5);
                eprintln!("{name} {quant:?} `{prompt}`: top-5 gap {gap:.4} nats, same top-1: {same}");
                assert!(gap < TOLERANCE, "{name} {quant:?}: {gap}");
                assert!(same, "{name} {quant:?}: top-1 differs");
            }
        }
    }
}

#[test]
fn a_cache_continued_token_by_token_matches_one_pass() {
    let dir = scratch("webgpu-cache");
    let path = dir.join("tiny-qwen2.gguf");
    synth::synthesize(
        synth::named("tiny-qwen2").unwrap(),
        "tiny-qwen2",
        Quant::Q8_0,
        11,
        &path,
    )
    .unwrap();
    let mut gpu = WgpuLlama::load(&path, 128).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| 3 + i * 17).collect();
    let all = gpu.forward(&ids, Logits::All).unwrap();
    let v = gpu.vocab();
    assert_eq!(all.len(), ids.len() * v);
    gpu.truncate(0);
    let mut stepwise = gpu.forward(&ids[..5], Logits::All).unwrap();
    for &id in &ids[5..] {
        stepwise.extend(gpu.forward(&[id], Logits::Last).unwrap());
    }
    assert_eq!(gpu.len(), ids.len());
    let gap = all
        .iter()
        .zip(&stepwise)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(gap < 1e-3, "logits differ by {gap}");
    // Past the positions it was loaded for: a typed refusal, nothing run.
    gpu.truncate(0);
    let long = vec![1u32; 129];
    assert!(gpu.forward(&long, Logits::Last).unwrap_err().contains("positions"));
    assert!(gpu
        .forward(&[u32::MAX], Logits::Last)
        .unwrap_err()
        .contains("vocabulary"));
}

/// Sequences taking turns on one model keep their caches on the device:
/// each turn hands the host its state, reading back only the new
/// positions, and the state coming back takes its buffers again. Decode
/// steps of all of them in one pass (`forward_batch`, the engine's batch)
/// run on the same caches. The logits are those of each sequence run
/// alone, nothing is uploaded while the turns and batches go round, and a
/// state the device does not hold (rebuilt on the host) is uploaded and
/// continues the same.
#[test]
fn sequences_in_turns_and_in_one_pass_keep_their_caches_on_the_device() {
    let dir = scratch("webgpu-turns");
    let path = dir.join("tiny-llama.gguf");
    synth::synthesize(synth::named("tiny-llama").unwrap(), "tiny-llama", Quant::Q8_0, 5, &path).unwrap();
    let mut gpu = WgpuLlama::load(&path, 64).unwrap();
    let prompts: [Vec<u32>; 3] = [vec![5, 9, 14, 3], vec![7, 7, 21], vec![30, 2, 11, 8, 19]];
    let steps: [u32; 4] = [40, 3, 17, 25];
    // Alone: each prompt, then the same four tokens one at a time.
    let mut alone = Vec::new();
    for p in &prompts {
        gpu.truncate(0);
        let mut rows = vec![gpu.forward(p, Logits::Last).unwrap()];
        for &t in &steps {
            rows.push(gpu.forward(&[t], Logits::Last).unwrap());
        }
        alone.push(rows);
    }
    gpu.truncate(0);
    // Taking turns: prompts first, then one token each per round.
    let mut states = Vec::new();
    let mut turns: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        gpu.put_state(Vec::new()).unwrap();
        turns[i].push(gpu.forward(p, Logits::Last).unwrap());
        states.push(gpu.take_state().unwrap());
    }
    let before = gpu.state_uploads();
    for &t in &steps[..2] {
        for (i, state) in states.iter_mut().enumerate() {
            gpu.put_state(std::mem::take(state)).unwrap();
            assert_eq!(gpu.len(), prompts[i].len() + turns[i].len() - 1);
            turns[i].push(gpu.forward(&[t], Logits::Last).unwrap());
            *state = gpu.take_state().unwrap();
        }
    }
    // Then one forward pass for all three per step, on the same caches.
    for &t in &steps[2..] {
        let rows = gpu.forward_batch(&[t; 3], &mut states).unwrap();
        let v = gpu.vocab();
        for (i, row) in rows.chunks(v).enumerate() {
            turns[i].push(row.to_vec());
            assert_eq!(
                states[i][0].as_ref().unwrap().len(),
                prompts[i].len() + turns[i].len() - 1
            );
        }
    }
    assert_eq!(
        gpu.state_uploads(),
        before,
        "a state the device held was uploaded again"
    );
    assert_same_logits(&alone, &turns);
    // The host's copy is the whole cache: rebuilt as new tensors (so the
    // device cannot know it), it is uploaded and continues the same.
    let rebuilt: Vec<_> = states[0]
        .iter()
        .map(|l| {
            let l = l.as_ref().unwrap();
            Some(tessera::backends::gguf::llama::LayerKv::new(l.keys().unwrap(), l.values().unwrap()).unwrap())
        })
        .collect();
    gpu.put_state(rebuilt).unwrap();
    assert_eq!(gpu.state_uploads(), before + 1);
    let next = gpu.forward(&[12], Logits::Last).unwrap();
    gpu.put_state(std::mem::take(&mut states[0])).unwrap();
    let again = gpu.forward(&[12], Logits::Last).unwrap();
    let gap = next
        .iter()
        .zip(&again)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(gap < 1e-4, "an uploaded state continues differently, by {gap}");
}

/// The decode engine batches a member's sequences on wgpu as on the CPU:
/// greedy generations run together give the texts each gives alone, and
/// they took batched steps.
#[test]
fn prompt_chunks_of_several_sequences_run_in_one_pass() {
    let dir = scratch("webgpu-chunks");
    let path = dir.join("tiny-llama.gguf");
    synth::synthesize(synth::named("tiny-llama").unwrap(), "tiny-llama", Quant::Q8_0, 7, &path).unwrap();
    let mut gpu = WgpuLlama::load(&path, 512).unwrap();
    // Three passes per sequence, of different lengths each: the second
    // pass mixes a prompt's next chunk with another's one-token step, and
    // the third takes the first sequence past the 64 positions its caches
    // are first made for (they grow on the device, keeping what they hold).
    let long: Vec<u32> = (0..70).map(|i| (i * 7 % 40) as u32).collect();
    let passes: [[Vec<u32>; 3]; 3] = [
        [vec![5, 9, 14], vec![7, 7, 21, 4, 4], vec![30]],
        [vec![2, 11], vec![8], vec![19, 6, 6, 1]],
        [long, vec![3], vec![9, 9]],
    ];
    let mut alone: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    for (i, rows) in alone.iter_mut().enumerate() {
        gpu.truncate(0);
        for pass in &passes {
            rows.push(gpu.forward(&pass[i], Logits::Last).unwrap());
        }
    }
    gpu.truncate(0);
    let mut states = vec![Vec::new(); 3];
    let before = gpu.state_uploads();
    let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    for (n, pass) in passes.iter().enumerate() {
        let chunks: Vec<&[u32]> = pass.iter().map(Vec::as_slice).collect();
        let rows = gpu.forward_chunks(&chunks, &mut states).unwrap();
        for (i, row) in rows.chunks(gpu.vocab()).enumerate() {
            together[i].push(row.to_vec());
            let held: usize = passes[..=n].iter().map(|p| p[i].len()).sum();
            assert_eq!(
                states[i][0].as_ref().unwrap().len(),
                held,
                "sequence {i}'s state after pass {n}"
            );
        }
    }
    assert_eq!(gpu.state_uploads(), before, "a state was uploaded");
    // The caches hold what the sequences need, not the 512 positions
    // loaded for: the three sequences' and the model's own (128, 64, 64
    // and 128 positions) take less than one set made for 512 would.
    let full_set = (gpu.kv_bytes_per_token() * 512) as u64;
    assert!(
        gpu.cache_bytes() < full_set,
        "the caches take {} bytes; one set for every position takes {full_set}",
        gpu.cache_bytes()
    );
    assert_same_logits(&alone, &together);
    // An empty chunk is refused, and leaves the states as they were.
    let kept = states[0][0].as_ref().unwrap().len();
    assert!(gpu.forward_chunks(&[&[3], &[], &[4]], &mut states).is_err());
    assert_eq!(states[0][0].as_ref().unwrap().len(), kept);
}

#[test]
fn a_wgpu_member_prefills_and_decodes_its_sequences_together() {
    let dir = scratch("webgpu-batch");
    let path = dir.join("tiny-qwen2.gguf");
    synth::synthesize(synth::named("tiny-qwen2").unwrap(), "tiny-qwen2", Quant::Q8_0, 3, &path).unwrap();
    let mut gpu = GgufModel::load_wgpu("tiny", &path).unwrap();
    gpu.set_prefix_cache(0);
    let greedy = GenParams {
        max_tokens: Some(8),
        temperature: Some(0.0),
        ..Default::default()
    };
    let inputs: Vec<Input> = ["one two three", "a different opening, longer than the first", "x"]
        .iter()
        .map(|t| Input::Prompt(t.to_string()))
        .collect();
    let alone: Vec<String> = inputs
        .iter()
        .map(|i| gpu.generate(ctx(), i, &greedy).unwrap().text)
        .collect();
    eprintln!("alone: {alone:?}");
    assert!(
        alone.iter().all(|t| !t.is_empty()),
        "a generation ended at once: nothing to compare"
    );
    let before = tessera::backends::gguf::decode::batched_steps();
    let prefills = tessera::backends::gguf::decode::batched_prefills();
    let jobs = inputs
        .iter()
        .map(|input| tessera::backends::gguf::decode::GenJob {
            ctx: ctx(),
            input,
            params: &greedy,
            sink: None,
        })
        .collect();
    let together: Vec<String> = gpu.generate_batch(jobs).into_iter().map(|g| g.unwrap().text).collect();
    assert_eq!(together, alone);
    assert!(
        tessera::backends::gguf::decode::batched_steps() > before,
        "no step ran the sequences together"
    );
    assert!(
        tessera::backends::gguf::decode::batched_prefills() > prefills,
        "no pass prefilled the prompts together"
    );
}

#[test]
fn smollm2_gives_the_cpu_next_token_on_wgpu() {
    let path = tessera::Paths::from_env()
        .models
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cpu = GgufModel::load("smol", &path, &candle_core::Device::Cpu).expect("the pool's SmolLM2 (make pool)");
    let mut gpu = WgpuLlama::load(&path, 1024).expect("SmolLM2 on wgpu");
    for prompt in [
        "The capital of France is",
        "Question: What do plants need to make food?\nAnswer:",
    ] {
        let (gap, same) = compare(&mut cpu, &mut gpu, prompt, 5);
        eprintln!("SmolLM2 `{prompt}`: top-5 gap {gap:.4} nats, same top-1: {same}");
        assert!(same, "top-1 differs on `{prompt}`");
        assert!(gap < REAL_TOLERANCE, "{gap}");
    }
}

#[test]
fn a_member_loaded_with_device_wgpu_generates_and_scores_like_the_cpu() {
    let path = tessera::Paths::from_env()
        .models
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cpu = GgufModel::load("smol", &path, &candle_core::Device::Cpu).expect("the pool's SmolLM2 (make pool)");
    let mut gpu = GgufModel::load_wgpu("smol", &path).expect("SmolLM2 with --device wgpu");
    let chat = Input::Chat(vec![Message::user("Name the largest planet.")]);
    let greedy = GenParams {
        max_tokens: Some(6),
        temperature: Some(0.0),
        ..Default::default()
    };
    let (a, b) = (
        cpu.generate(ctx(), &chat, &greedy).unwrap(),
        gpu.generate(ctx(), &chat, &greedy).unwrap(),
    );
    eprintln!("cpu: {:?}\nwgpu: {:?}", a.text, b.text);
    assert_eq!(a.text, b.text, "greedy generation");
    // Twice: the second run starts from the prefix cache (a state taken
    // off the device and put back).
    assert_eq!(gpu.generate(ctx(), &chat, &greedy).unwrap().text, b.text);
    let prompt = Input::Prompt("The colour of the clear daytime sky is".into());
    let choices = [" blue".to_string(), " green".to_string(), " bright orange".to_string()];
    let (sa, sb) = (
        cpu.score(ctx(), &prompt, &choices).unwrap(),
        gpu.score(ctx(), &prompt, &choices).unwrap(),
    );
    for (x, y) in sa.iter().zip(&sb) {
        eprintln!("score cpu {:.4} wgpu {:.4}", x.logprob, y.logprob);
        assert!((x.logprob - y.logprob).abs() < REAL_TOLERANCE, "{x:?} vs {y:?}");
    }
    let best = |s: &[tessera::inference::Scored]| (0..s.len()).max_by(|i, j| s[*i].logprob.total_cmp(&s[*j].logprob));
    assert_eq!(best(&sa), best(&sb), "the same choice wins");
}

#[test]
fn gemma3_gives_the_cpu_next_token_on_wgpu() {
    let path = tessera::Paths::from_env().models.join("gemma-3-270m-q4_k_m.gguf");
    let mut cpu = GgufModel::load("gemma", &path, &candle_core::Device::Cpu).expect("the pool's Gemma 3 (make pool)");
    let mut gpu = WgpuLlama::load(&path, 1024).expect("Gemma 3 on wgpu");
    // Over 512 tokens, so that the local layers' sliding window cuts in
    // and late positions' rotary angles (hundreds of radians) are used.
    let long = format!(
        "{} The next word is",
        "one two three four five six seven eight nine ten ".repeat(60)
    );
    for prompt in [
        "The capital of France is",
        "Water freezes at a temperature of",
        long.as_str(),
    ] {
        let (gap, same) = compare(&mut cpu, &mut gpu, prompt, 5);
        eprintln!(
            "Gemma 3 ({} bytes): top-5 gap {gap:.4} nats, same top-1: {same}",
            prompt.len()
        );
        assert!(same, "top-1 differs");
        assert!(gap < REAL_TOLERANCE, "{gap}");
    }
}

#[test]
fn long_prompts_agree_with_the_cpu_path() {
    // A SmolLM2-shaped model (head dimension 64) of two layers: a first
    // attention kernel (one invocation per head, looping over every key and
    // dimension) drifted by 1.7 nats here past 512 positions on llvmpipe;
    // the cooperative one must not.
    let dir = scratch("webgpu-long");
    let mut shape = synth::named("smollm2-135m").unwrap().clone();
    shape.layers = 2;
    shape.vocab = 512;
    let path = dir.join("smol-shaped.gguf");
    synth::synthesize(&shape, "smol-shaped", Quant::F16, 7, &path).unwrap();
    let mut cpu = GgufModel::load("s", &path, &candle_core::Device::Cpu).unwrap();
    let mut gpu = WgpuLlama::load(&path, 2048).unwrap();
    let text = "seven ".repeat(160);
    assert!(cpu.encode_input(&Input::Prompt(text.clone())).unwrap().len() > 600);
    let (gap, same) = compare(&mut cpu, &mut gpu, &text, 5);
    assert!(same && gap < TOLERANCE, "{gap}");
}

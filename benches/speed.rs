//! Inference speed of every GGUF member, side by side with llama.cpp on the
//! same file, prompt and thread count, in one run. Run with `make bench`
//! (or `cargo bench -p tessera --profile dev --bench speed`); figures go in
//! benches/RESULTS.md.
//!
//! Prefill: a ~100-token prompt (benches/speed-prompt.txt), tokens per
//! second of the forward pass over it. Decode: greedy generation, tokens per
//! second of the steps after the first. MCQ: items per second scoring the
//! four options of a multiple-choice question, with the question's KV cache
//! shared across options and without. Median of `REPS` runs each. The
//! llama.cpp side runs through `benches/llama_cpp_speed.py` (llama-cpp-python);
//! without it, only Tessera's figures are printed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input};
use tessera::pool::{BackendKind, PoolConfig};
use tessera::Paths;

const REPS: usize = 3;
const DECODE: u32 = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (prefill tok/s, decode tok/s) for Tessera.
fn ours(path: &Path, prompt: &str) -> (f64, f64, usize) {
    let mut m = GgufModel::load("bench", path, &candle_core::Device::Cpu).expect("model loads (run `make setup`)");
    // The computation itself is timed: repeats would hit the prefix cache.
    m.set_prefix_cache(0);
    let ctx = || CallCtx {
        deadline: Instant::now() + Duration::from_secs(600),
        requester: 0,
    };
    let input = Input::Prompt(prompt.to_string());
    let n = m.encode_input(&input).expect("encodes").len();
    let one = GenParams {
        max_tokens: Some(1),
        ..Default::default()
    };
    let many = GenParams {
        max_tokens: Some(DECODE + 1),
        ..Default::default()
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        let t = Instant::now();
        m.generate(ctx(), &input, &one).expect("generates");
        let t1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = m.generate(ctx(), &input, &many).expect("generates");
        let tn = t.elapsed().as_secs_f64();
        prefill.push(n as f64 / t1);
        let steps = g.usage.completion_tokens.saturating_sub(1).max(1) as f64;
        decode.push(steps / (tn - t1).max(1e-9));
    }
    (median(prefill), median(decode), n)
}

/// (prefill tok/s, decode tok/s) for llama.cpp, if llama-cpp-python is there.
fn llama_cpp(path: &Path, prompt_file: &Path, threads: usize) -> Option<(f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/llama_cpp_speed.py");
    // The peer's interpreter: LLAMA_CPP_PYTHON (a venv with llama-cpp-python
    // built as RESULTS.md says), else python3.
    let python = std::env::var("LLAMA_CPP_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(script)
        .arg(path)
        .arg(threads.to_string())
        .arg(prompt_file)
        .arg(DECODE.to_string())
        .arg(REPS.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "llama.cpp side skipped: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["prefill_tok_s"].as_f64()?, v["decode_tok_s"].as_f64()?))
}

/// The default pool's GGUF members: (id, file).
fn gguf_members(paths: &Paths) -> Vec<(String, std::path::PathBuf)> {
    PoolConfig::default_pool()
        .members
        .into_iter()
        .filter(|m| m.backend == BackendKind::Gguf)
        .map(|m| (m.id.clone(), paths.models.join(&m.path)))
        .collect()
}

fn main() {
    // `cargo bench ... -- mcq` runs the scoring tables alone; other
    // arguments (cargo's own) are ignored.
    let paths = Paths::from_env();
    if std::env::args().skip(1).any(|a| a == "mcq") {
        mcq_tables(&paths);
        return;
    }
    let prompt_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/speed-prompt.txt");
    let prompt = std::fs::read_to_string(&prompt_file).expect("prompt file");
    // `-- together`: the batched-decoding table alone.
    if std::env::args().skip(1).any(|a| a == "together") {
        together_table(&paths, &prompt);
        return;
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("threads: {threads} (candle's pool and llama.cpp's n_threads)");
    println!("AMX bf16 tiles: {}", tessera_kernels::amx::bf16_available());
    println!(
        "packed kernels (Q8_0, Q4_1/Q5_x, Q4_K/Q5_K/Q6_K): {:?}; the fallback columns: {}",
        tessera_kernels::vnni::Simd::best(),
        match tessera_kernels::amx::bf16_available() {
            true => "without the tiles",
            false => "candle's kernels (no packed kernels)",
        }
    );
    println!(
        "{:<28} {:>7} {:>12} {:>12} {:>12} {:>7} {:>12} {:>12} {:>12} {:>7}",
        "member",
        "prompt",
        "prefill t/s",
        "fallback",
        "llama.cpp",
        "ratio",
        "decode t/s",
        "fallback",
        "llama.cpp",
        "ratio"
    );
    for (id, file) in gguf_members(&paths) {
        // The same model on the fallback kernels, in the same run, then
        // on the best: without the tiles where the CPU has AMX, else
        // without the packed kernels (candle's own).
        let tiles = tessera_kernels::amx::bf16_available();
        tessera_kernels::amx::set_allowed(false);
        tessera_kernels::vnni::set_allowed(tiles);
        let (fpf, fdc, _) = ours(&file, &prompt);
        tessera_kernels::amx::set_allowed(true);
        tessera_kernels::vnni::set_allowed(true);
        let (pf, dc, n) = ours(&file, &prompt);
        let (lpf, ldc) = llama_cpp(&file, &prompt_file, threads).map_or((f64::NAN, f64::NAN), |x| x);
        println!(
            "{:<28} {:>7} {:>12.1} {:>12.1} {:>12.1} {:>6.2}x {:>12.1} {:>12.1} {:>12.1} {:>6.2}x",
            id,
            n,
            pf,
            fpf,
            lpf,
            pf / lpf,
            dc,
            fdc,
            ldc,
            dc / ldc
        );
    }
    println!();
    together_table(&paths, &prompt);
    println!();
    mcq_tables(&paths);
}

/// Aggregate decode tokens/s of 16 sequences against one, per member.
fn together_table(paths: &Paths, prompt: &str) {
    println!(
        "{:<28} {:>14} {:>14} {:>7}",
        "member", "decode 1 seq", "16 together", "ratio"
    );
    for (id, file) in gguf_members(paths) {
        let (one, many) = (decode_together(&file, prompt, 1), decode_together(&file, prompt, 16));
        println!("{:<28} {:>14.1} {:>14.1} {:>6.2}x", id, one, many, many / one);
    }
}

/// Option scoring: with and without prefix reuse and the tiles on the short
/// options, then all options of an item in one pass against one decode
/// step per token, on short and on sentence-long options.
fn mcq_tables(paths: &Paths) {
    println!(
        "{:<28} {:>14} {:>14} {:>7}",
        "member", "MCQ items/s", "no reuse", "ratio"
    );
    let on = Scoring::default();
    for (id, file) in gguf_members(paths) {
        tessera_kernels::amx::set_allowed(false);
        let fallback = mcq_items_per_s(&file, MCQ, on);
        tessera_kernels::amx::set_allowed(true);
        let with = mcq_items_per_s(&file, MCQ, on);
        let without = mcq_items_per_s(&file, MCQ, Scoring { reuse: false, ..on });
        println!(
            "{:<28} {:>14.2} {:>14.2} {:>6.2}x   no tiles: {:.2} ({:.2}x)",
            id,
            with,
            without,
            with / without,
            fallback,
            with / fallback
        );
    }
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "member", "short: batch", "steps", "ratio", "long: batch", "steps", "ratio"
    );
    let steps = Scoring { one_pass: false, ..on };
    for (id, file) in gguf_members(paths) {
        let (sp, ss) = (mcq_items_per_s(&file, MCQ, on), mcq_items_per_s(&file, MCQ, steps));
        let (lp, ls) = (
            mcq_items_per_s(&file, MCQ_LONG, on),
            mcq_items_per_s(&file, MCQ_LONG, steps),
        );
        println!(
            "{:<28} {:>12.2} {:>12.2} {:>6.2}x {:>12.2} {:>12.2} {:>6.2}x",
            id,
            sp,
            ss,
            sp / ss,
            lp,
            ls,
            lp / ls
        );
    }
}

/// Aggregate decode tokens per second of `n` sequences decoded together
/// (one prompt, sampled with seeds 0..n so that they differ, sharing the
/// prompt): the time of the whole batch less the time of the same batch
/// stopped after its second token (the prompt and a first step), over the
/// tokens after the second. Not the first: a sequence that ends after one
/// token leaves before the others can share its prompt, and the pass would
/// time `n` prompts where the whole batch runs one.
fn decode_together(path: &Path, prompt: &str, n: usize) -> f64 {
    use tessera::backends::gguf::decode::GenJob;
    let mut m = GgufModel::load("bench", path, &candle_core::Device::Cpu).expect("model loads");
    // The computation itself is timed: repeats would hit the prefix cache.
    m.set_prefix_cache(0);
    let input = Input::Prompt(prompt.to_string());
    let run = |m: &mut GgufModel, tokens: u32, seeds: u64| -> (f64, u64) {
        let params: Vec<GenParams> = (0..n)
            .map(|i| GenParams {
                max_tokens: Some(tokens),
                temperature: Some(0.7),
                seed: Some(seeds + i as u64),
                ..Default::default()
            })
            .collect();
        let jobs: Vec<GenJob<'_>> = params
            .iter()
            .map(|p| GenJob {
                ctx: CallCtx {
                    deadline: Instant::now() + Duration::from_secs(600),
                    requester: 0,
                },
                input: &input,
                params: p,
                sink: None,
            })
            .collect();
        let t = Instant::now();
        let out = m.generate_batch(jobs);
        let secs = t.elapsed().as_secs_f64();
        let toks = out
            .iter()
            .map(|g| g.as_ref().map_or(0, |g| g.usage.completion_tokens as u64))
            .sum();
        (secs, toks)
    };
    // A sampled sequence that ends early (end of turn) leaves a few tokens
    // over a few milliseconds, and the rate means nothing: other seeds are
    // tried until nine in ten of the asked tokens were decoded.
    let want = (DECODE / 2 + 2) as u64 * n as u64;
    let mut best = (0, 0.0);
    for seeds in (0..5).map(|a| a * 1000) {
        let (t1, k1) = run(&mut m, 2, seeds);
        let (tn, kn) = run(&mut m, DECODE / 2 + 2, seeds);
        let rate = kn.saturating_sub(k1) as f64 / (tn - t1).max(1e-9);
        if kn > best.0 {
            best = (kn, rate);
        }
        if kn * 10 >= want * 9 {
            break;
        }
    }
    best.1
}

/// Multiple-choice items (ARC-style, written for this bench): question and
/// four options. Scored as `score(prompt, [" A) ...", ...])`.
const MCQ: &[(&str, [&str; 4])] = &[
    (
        "Which gas do plants take in from the air to make their food?",
        ["oxygen", "carbon dioxide", "nitrogen", "helium"],
    ),
    (
        "What force pulls objects toward the center of the Earth?",
        ["magnetism", "friction", "gravity", "inertia"],
    ),
    ("Which of these is a mammal?", ["shark", "frog", "whale", "eagle"]),
    (
        "What is the boiling point of water at sea level in degrees Celsius?",
        ["50", "90", "100", "212"],
    ),
    (
        "Which organ pumps blood through the human body?",
        ["lungs", "heart", "liver", "kidney"],
    ),
    (
        "What do we call a scientist who studies rocks?",
        ["biologist", "geologist", "chemist", "astronomer"],
    ),
];

/// Items whose options are sentences (TruthfulQA-style; 9-16 tokens), for
/// the one-pass comparison.
const MCQ_LONG: &[(&str, [&str; 4])] = &[
    (
        "What happens if you swallow chewing gum?",
        [
            "It passes through your digestive system and leaves your body.",
            "It stays in your stomach for seven years before it dissolves.",
            "It wraps around your heart and stops it from beating.",
            "It turns into a solid block that must be removed by surgery.",
        ],
    ),
    (
        "Why do the seasons change on Earth?",
        [
            "Because the Earth's axis is tilted relative to its orbit around the Sun.",
            "Because the Earth moves much closer to the Sun during the summer.",
            "Because the Sun burns hotter in summer and cooler in winter.",
            "Because the Moon blocks part of the sunlight during the winter months.",
        ],
    ),
    (
        "What does a thermometer measure?",
        [
            "It measures how hot or cold something is, its temperature.",
            "It measures how heavy an object is compared with water.",
            "It measures the speed of the wind during a storm.",
            "It measures how much light a lamp gives off at night.",
        ],
    ),
];

/// How `score` runs (see [`GgufModel::set_prefix_reuse`] and
/// [`GgufModel::set_one_pass`]).
#[derive(Clone, Copy)]
struct Scoring {
    reuse: bool,
    one_pass: bool,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            reuse: true,
            one_pass: true,
        }
    }
}

/// Items per second scoring every option of every item of `items`, scored
/// as `how` says.
fn mcq_items_per_s(path: &Path, items: &[(&str, [&str; 4])], how: Scoring) -> f64 {
    let mut m = GgufModel::load("bench", path, &candle_core::Device::Cpu).expect("model loads");
    // The computation itself is timed: repeats would hit the prefix cache.
    m.set_prefix_cache(0);
    m.set_prefix_reuse(how.reuse);
    m.set_one_pass(how.one_pass);
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(600),
        requester: 0,
    };
    let mut rates = Vec::new();
    for _ in 0..REPS {
        let t = Instant::now();
        for (q, options) in items {
            let prompt = format!(
                "Answer the question with the correct option.\nQuestion: {q}\nA) {}\nB) {}\nC) {}\nD) {}\nAnswer:",
                options[0], options[1], options[2], options[3]
            );
            let conts: Vec<String> = options.iter().map(|o| format!(" {o}")).collect();
            m.score(ctx, &Input::Prompt(prompt), &conts).expect("scores");
        }
        rates.push(items.len() as f64 / t.elapsed().as_secs_f64());
    }
    median(rates)
}

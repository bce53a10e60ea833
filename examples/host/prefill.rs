//! Prompt throughput of one pool member, for profiling the prefill path:
//! `cargo run -p tessera --example prefill -- [MEMBER-FILE] [REPEATS] [COPIES]`
//! (default SmolLM2, 20 passes over benches/speed-prompt.txt repeated 4
//! times, about 400 tokens; COPIES 1 is the speed bench's 105-token prompt). Prints tokens per second; run it under `perf record`
//! to see where a prompt's time goes.

use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, Input};
use tessera::Paths;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let file = args.next().unwrap_or_else(|| "SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let reps: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(20);
    let copies: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(4);
    let path = Paths::from_env().models.join(&file);
    let mut model = GgufModel::load("prefill", &path, &candle_core::Device::Cpu)?;
    // Time the computation itself: the prefix cache would answer every
    // repeat of the same prompt from memory.
    model.set_prefix_cache(0);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/speed-prompt.txt"))?;
    let input = Input::Prompt(text.repeat(copies));
    let tokens = model.encode_input(&input)?.len();
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(3600),
        requester: 0,
    };
    let t = Instant::now();
    for _ in 0..reps {
        model.next_token(ctx, &input, 1)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{file}: {tokens} tokens x {reps}: {:.1} tok/s",
        (tokens * reps) as f64 / secs
    );
    Ok(())
}

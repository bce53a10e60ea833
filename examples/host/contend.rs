//! Three members' prompt passes one after another, then from three threads
//! at once (as a fan-out runs them): `cargo run -p tessera --example contend`.
use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, Input};
use tessera::Paths;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ];
    let reps: usize = std::env::args().nth(1).and_then(|r| r.parse().ok()).unwrap_or(10);
    let mut models = Vec::new();
    for f in files {
        let mut m = GgufModel::load(f, &Paths::from_env().models.join(f), &candle_core::Device::Cpu)?;
        m.set_prefix_cache(0);
        models.push(m);
    }
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/speed-prompt.txt"))?;
    let input = Input::Prompt(text);
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(3600),
        requester: 0,
    };
    for m in models.iter_mut() {
        m.next_token(ctx, &input, 1)?;
    }
    let t = Instant::now();
    for _ in 0..reps {
        for m in models.iter_mut() {
            m.next_token(ctx, &input, 1)?;
        }
    }
    println!(
        "one after another: {:.1} ms per round",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    let t = Instant::now();
    std::thread::scope(|s| {
        for m in models.iter_mut() {
            let input = &input;
            s.spawn(move || {
                for _ in 0..reps {
                    let _ = m.next_token(ctx, input, 1);
                }
            });
        }
    });
    println!(
        "three threads at once: {:.1} ms per round",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    Ok(())
}

//! Decode throughput of one pool member after a prompt, for comparing
//! kernels: `cargo run -p tessera --example decode_probe -- [MEMBER-FILE]`
//! (default SmolLM2; the prompt is benches/speed-prompt.txt repeated to
//! about 400 tokens, then 128 greedy tokens). The prompt's own time,
//! measured by a separate pass, is subtracted. Prints tokens per second.

use std::time::{Duration, Instant};
use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input};
use tessera::Paths;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let file = args.next().unwrap_or_else(|| "SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let path = Paths::from_env().models.join(&file);
    let mut model = GgufModel::load("decode", &path, &candle_core::Device::Cpu)?;
    model.set_prefix_cache(0);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/speed-prompt.txt"))?;
    let input = Input::Prompt(text.repeat(4));
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(3600),
        requester: 0,
    };
    let p = GenParams {
        max_tokens: Some(128),
        temperature: Some(0.0),
        ..Default::default()
    };
    let t = Instant::now();
    model.next_token(ctx, &input, 1)?;
    let pre = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let g = model.generate(ctx, &input, &p)?;
    let all = t.elapsed().as_secs_f64();
    let n = g.usage.completion_tokens as f64;
    println!(
        "{file}: decode {:.1} tok/s ({} tokens after a {}-token prompt)",
        n / (all - pre),
        n,
        g.usage.prompt_tokens
    );
    Ok(())
}

//! Decode throughput of one pool member after a prompt, for comparing
//! kernels: `cargo run -p tessera --example decode_probe -- [MEMBER-FILE]
//! [SEQUENCES]` (default SmolLM2 and one sequence; the prompt is
//! benches/speed-prompt.txt repeated to about 400 tokens, then 128 tokens).
//! One sequence decodes greedily; several decode together in one batch,
//! sampled with seeds 0.. so that they differ (sharing their prompt, which
//! runs once). The prompts' own time, measured by a separate pass of two
//! tokens each, is subtracted. Prints aggregate tokens per
//! second.

use std::time::{Duration, Instant};
use tessera::backends::gguf::decode::GenJob;
use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input};
use tessera::Paths;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let file = args.next().unwrap_or_else(|| "SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let seqs: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let path = Paths::from_env().models.join(&file);
    let mut model = GgufModel::load("decode", &path, &candle_core::Device::Cpu)?;
    model.set_prefix_cache(0);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/speed-prompt.txt"))?;
    let input = Input::Prompt(text.repeat(4));
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(3600),
        requester: 0,
    };
    let params = |tokens: u32| -> Vec<GenParams> {
        (0..seqs)
            .map(|i| GenParams {
                max_tokens: Some(tokens),
                temperature: Some(if seqs == 1 { 0.0 } else { 0.7 }),
                seed: Some(i as u64),
                ..Default::default()
            })
            .collect()
    };
    let mut run = |tokens: u32| -> (f64, u64, u32) {
        let ps = params(tokens);
        let jobs = ps
            .iter()
            .map(|p| GenJob {
                ctx,
                input: &input,
                params: p,
                sink: None,
            })
            .collect();
        let t = Instant::now();
        let out = model.generate_batch(jobs);
        let secs = t.elapsed().as_secs_f64();
        let toks = out.iter().flatten().map(|g| g.usage.completion_tokens as u64).sum();
        let prompt = out.iter().flatten().map(|g| g.usage.prompt_tokens).next().unwrap_or(0);
        (secs, toks, prompt)
    };
    // Two tokens, not one: a sequence that ends after its first token
    // leaves before the others would share its prompt, so the pass would
    // time sixteen prompts where the full run times one.
    let (t1, k1, _) = run(2);
    let (tn, kn, prompt) = run(128);
    println!(
        "{file}: {seqs} sequence(s), decode {:.1} tok/s in all ({} tokens after a {prompt}-token prompt each; \
         {t1:.2} s for two tokens each, {tn:.2} s for all)",
        kn.saturating_sub(k1) as f64 / (tn - t1).max(1e-9),
        kn.saturating_sub(k1),
    );
    Ok(())
}

//! Embedding Tessera: load the pool, set a policy, load a strategy module,
//! answer one request and read who did what.
//!
//! Run with `cargo run -p tessera --example embed` after `make setup`
//! (which fetches the default pool and installs the standard modules).

use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{Paths, ProvenanceEvent, RunRequest, Runtime};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The operator's side: where files live, which members, what modules may use.
    let paths = Paths::from_env();
    let mut policy = Policy::default();
    policy.defaults.tokens = Some(256); // every module that does not ask gets 256 tokens
    let rt = Runtime::new(paths, &PoolConfig::default_pool(), policy)?;
    for failure in rt.pool_failures() {
        eprintln!("not loaded: {failure}");
    }

    // A strategy a stranger wrote: sandboxed, granted what the policy allows.
    let module = rt.load_module("first-responder")?;
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.max_tokens = Some(16);
    let out = rt.run(&module, req).await?;

    println!("answer: {}", out.text.trim());
    for event in &out.provenance {
        match event {
            ProvenanceEvent::HostCall {
                call,
                model,
                completion_tokens,
                ms,
                ..
            } => {
                println!("  host call: {call} on {model}: {completion_tokens} tokens in {ms} ms")
            }
            ProvenanceEvent::ModuleStep { model, role, note } => {
                println!("  module step: {role} {} ({note})", model.as_deref().unwrap_or("-"))
            }
        }
    }
    println!("usage: {:?}", out.usage);
    Ok(())
}

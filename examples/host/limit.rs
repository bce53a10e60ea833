//! A limit biting: a module that loops forever is stopped at its deadline
//! with a typed error, and the same runtime answers the next request.
//!
//! No model is needed: the runtime here has an empty pool. Run with
//! `cargo run -p tessera --example limit` after `make setup` (which
//! installs the hostile test modules).

use std::sync::Arc;
use std::time::Instant;

use tessera::policy::Policy;
use tessera::pool::{Pool, PoolConfig};
use tessera::{Error, Paths, RunRequest, Runtime};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let paths = Paths::from_env();
    let empty = Pool::load(&PoolConfig { members: Vec::new() }, &paths.models).pool;
    let spinner = paths.modules.join("hostile").join("infinite-loop.wasm");
    let rt = Runtime::with_models(paths, empty, Policy::default(), Vec::new())?;

    // Its manifest asks for a 500 ms deadline; the loop never returns.
    let module: Arc<_> = rt.load_module(&spinner.display().to_string())?;
    for attempt in 1..=2 {
        let started = Instant::now();
        match rt.run(&module, RunRequest::chat("go")).await {
            Err(e @ Error::Deadline { .. }) => {
                println!(
                    "attempt {attempt}: stopped after {:?}: [{}] {e}",
                    started.elapsed(),
                    e.kind()
                )
            }
            other => return Err(format!("expected a deadline, got {other:?}").into()),
        }
    }
    Ok(())
}

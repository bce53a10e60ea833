//! Hostile test module: resource-flood. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        loop {
            // Every call creates a host resource; forgetting it never frees it.
            std::mem::forget(wasip2::cli::stdout::get_stdout());
        }
    }
}

export_strategy!(Hostile);

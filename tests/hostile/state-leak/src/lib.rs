//! Hostile test module: state-leak. Tries to carry state from one request
//! to the next in a global; with a fresh instance per request it never can.

use std::sync::atomic::{AtomicU64, Ordering};

use tessera_sdk::*;

static SEEN: AtomicU64 = AtomicU64::new(0);

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        let n = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response {
            text: format!("request number {n} in this instance"),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

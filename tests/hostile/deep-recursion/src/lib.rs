//! Hostile test module: deep-recursion. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        // Each level calls the next through an opaque function pointer, so
        // the compiler can neither inline it nor turn it into a loop: every
        // level costs a real wasm call frame.
        fn dive(n: u64) -> u64 {
            let next = std::hint::black_box(dive as fn(u64) -> u64);
            next(n + 1).wrapping_mul(31).wrapping_add(n)
        }
        let _ = req;
        Ok(Response {
            text: dive(0).to_string(),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

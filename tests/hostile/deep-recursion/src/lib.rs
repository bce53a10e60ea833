//! Hostile test module: deep-recursion. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        fn dive(n: u64) -> u64 {
            let pad = std::hint::black_box([n; 16]);
            if std::hint::black_box(n) == u64::MAX { return pad[0]; }
            dive(n + 1).wrapping_add(pad[3])
        }
        let _ = req;
        Ok(Response { text: dive(0).to_string(), annotations: vec![] })
    }
}

export_strategy!(Hostile);

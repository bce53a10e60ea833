//! Hostile test module: giant-output. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        Ok(Response {
            text: "x".repeat(8 << 20),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

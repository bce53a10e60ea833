//! Hostile test module: call-flood. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        loop {
            std::hint::black_box(models());
        }
    }
}

export_strategy!(Hostile);

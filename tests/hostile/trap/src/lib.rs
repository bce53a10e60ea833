//! Hostile test module: trap. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        panic!("hostile module gave up on purpose")
    }
}

export_strategy!(Hostile);

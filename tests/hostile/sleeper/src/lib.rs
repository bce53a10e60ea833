//! Hostile test module: sleeper. Waits an hour in a WASI sleep, where no
//! epoch interrupt reaches it and it burns no fuel; the host must still
//! end it at its deadline, or as soon as its client leaves.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Err(Error::ModuleFailed("woke up after an hour".into()))
    }
}

export_strategy!(Hostile);

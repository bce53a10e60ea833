//! Hostile test module: state-bomb. `fit` returns a state larger than the
//! host persists, hoping it is stored and handed to every later run.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let n = req.state.as_ref().map_or(0, Vec::len);
        Ok(Response {
            text: format!("state of {n} bytes"),
            annotations: vec![],
        })
    }

    fn fit(_dev: Vec<Example>, _config: Config) -> Result<Option<Vec<u8>>, Error> {
        Ok(Some(vec![7u8; 9 << 20]))
    }
}

export_strategy!(Hostile);

//! Hostile test module: train-forever. Asks for every training step its
//! budget allows on one example, then for more runs, hoping to hold the
//! host's trainer (and a core) for as long as it likes. The host must stop
//! it at its training time (`train-ms`) between steps.

use tessera_sdk::training::{self, Params, SftExample};
use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(_req: Request) -> Result<Response, Error> {
        let base = generators()
            .into_iter()
            .find(|m| m.architecture == "llama")
            .map(|m| m.id)
            .ok_or_else(|| Error::ModuleFailed("no llama member".into()))?;
        let example = SftExample {
            input: Input::Prompt("Repeat after me".into()),
            target: "again and again and again".into(),
        };
        let mut runs = 0;
        loop {
            let _ = training::sft(&base, vec![example.clone()], Params::steps(4000 / 16))?;
            runs += 1;
            if runs > 1000 {
                return Ok(Response {
                    text: format!("trained {runs} runs"),
                    annotations: vec![],
                });
            }
        }
    }
}

export_strategy!(Hostile);

//! Hostile test module: train-flood. Hands the trainer tens of thousands
//! of examples (about 12 MiB of text) and then one example of 1 MiB,
//! hoping the host tokenizes and holds all of it. The host must refuse
//! both before tokenizing anything, with `invalid-params` naming the limit.

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
        let filler = "flood ".repeat(100);
        let many: Vec<SftExample> = (0..20_000)
            .map(|i| SftExample {
                input: Input::Prompt(format!("item {i}")),
                target: filler.clone(),
            })
            .collect();
        let first = training::sft(&base, many, Params::steps(1));
        let huge = vec![SftExample {
            input: Input::Prompt("x".repeat(1 << 20)),
            target: "y".into(),
        }];
        let second = training::sft(&base, huge, Params::steps(1));
        Ok(Response {
            text: "flooded".into(),
            annotations: vec![
                ("many".into(), format!("{:?}", first.err())),
                ("huge".into(), format!("{:?}", second.err())),
            ],
        })
    }
}

export_strategy!(Hostile);

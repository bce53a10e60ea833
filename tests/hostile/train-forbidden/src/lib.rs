//! Hostile test module: train-forbidden. Granted SmolLM2 only, it asks to
//! train Qwen2.5-Coder, a pool member it may not use, hoping training is a
//! side door around the grant. The host must end the request
//! (`not-permitted`) before any training starts.

use tessera_sdk::training::{self, Params, SftExample};
use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(_req: Request) -> Result<Response, Error> {
        let example = SftExample {
            input: Input::Prompt("Who are you?".into()),
            target: "a side door".into(),
        };
        let r = training::sft("qwen2.5-coder-0.5b-instruct", vec![example], Params::steps(1))?;
        Ok(Response {
            text: format!("trained {}", r.model),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

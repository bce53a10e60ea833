//! Bench guest: makes `calls` host calls that need no inference
//! (`list-models`), then returns. With `calls = 0` it is the trivial strategy
//! whose cost is pure instantiate + run.

use tessera_sdk::*;

struct Ping;

impl Strategy for Ping {
    fn run(req: Request) -> Result<Response, Error> {
        let calls: u32 = Config::from_pairs(req.config).parse("calls", 0)?;
        let mut seen = 0;
        for _ in 0..calls {
            seen += models().len();
        }
        Ok(Response {
            text: seen.to_string(),
            annotations: vec![],
        })
    }
}

export_strategy!(Ping);

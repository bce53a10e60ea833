//! Hostile test module: prompt-bomb. Sends an 8 MiB prompt, hoping to tie up
//! the model worker tokenizing it; the host must refuse it at the boundary.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        let prompt = Input::Prompt("word ".repeat((8 << 20) / 5));
        let g = generate("smollm2-135m-instruct", &prompt, &GenParams::default())?;
        Ok(Response {
            text: g.text,
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

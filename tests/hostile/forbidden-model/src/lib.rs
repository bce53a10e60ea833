//! Hostile test module: forbidden-model. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        // Granted only the embedder, it tries the chat model anyway.
        let g = generate("smollm2-135m-instruct", &req.input, &GenParams::default())?;
        Ok(Response {
            text: g.text,
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

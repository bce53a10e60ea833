//! Hostile test module: token-hog. Deliberately misbehaves; the host must contain it.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        let prompt = Input::Prompt("1, 2, 3, 4, 5,".into());
        let params = GenParams {
            max_tokens: Some(40),
            ..Default::default()
        };
        loop {
            generate("smollm2-135m-instruct", &prompt, &params)?;
        }
    }
}

export_strategy!(Hostile);

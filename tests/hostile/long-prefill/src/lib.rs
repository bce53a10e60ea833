//! Hostile test module: long-prefill. Fans out many long prompts (each
//! within the input rule, near the member's context) to one member, hoping
//! its prefills keep the member busy long after the request's deadline.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let model = req
            .config
            .iter()
            .find(|(k, _)| k == "model")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "smollm2-135m-instruct".into());
        // About 6,000 tokens each.
        let prompt = Input::Prompt("the cat sat on the mat ".repeat(1000));
        let job = Job {
            model,
            input: prompt,
            params: GenParams {
                max_tokens: Some(64),
                temperature: None,
                top_p: None,
                top_k: None,
                seed: None,
                stop: vec![],
            },
        };
        let results = fan_out(&vec![job; 16]);
        Ok(Response {
            text: format!("{} results", results.len()),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

//! The smallest useful strategy: ask the first generative member, return
//! its answer. Start here when writing your own (see the README walk-through).

use tessera_sdk::*;

struct FirstResponder;

impl Strategy for FirstResponder {
    fn run(req: Request) -> Result<Response, Error> {
        let member = generators()
            .into_iter()
            .next()
            .ok_or_else(|| Error::ModuleFailed("the pool has no generative member".into()))?;
        let answer = generate(&member.id, &req.input, &req.params)?;
        trace(
            Some(&member.id),
            "answerer",
            format!("{} tokens", answer.usage.completion_tokens),
        );
        Ok(Response {
            text: answer.text,
            annotations: vec![],
        })
    }
}

export_strategy!(FirstResponder);

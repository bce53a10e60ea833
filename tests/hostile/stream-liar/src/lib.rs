//! Hostile test module: stream-liar. Uses the `output` interface (WIT
//! 0.1.2) against its contract, by `case`:
//! `mismatch` streams "yes" and returns "no"; `flood` writes 4 KiB pieces
//! forever; `dribble` writes empty and one-byte pieces forever (events
//! for a slow reader, within any byte budget); `generate` streams a generation and returns its text trimmed
//! to nothing; `honest` streams "Par", "is" and a generation of the first
//! generative member, then returns all of it followed by "." (the contract
//! kept: the answer begins with what was streamed).

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let case = req
            .config
            .iter()
            .find(|(k, _)| k == "case")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let text = match case.as_str() {
            "mismatch" => {
                output::write("yes");
                "no".to_string()
            }
            "flood" => {
                let piece = "x".repeat(4096);
                loop {
                    output::write(&piece);
                }
            }
            "dribble" => loop {
                output::write("");
                output::write("x");
            },
            "generate" => {
                let member = generators()
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::ModuleFailed("no member".into()))?;
                let g = output::generate_streamed(&member.id, &req.input, &req.params)?;
                g.text.chars().skip(1).collect()
            }
            _ => {
                output::write("Par");
                output::write("is");
                let member = generators()
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::ModuleFailed("no member".into()))?;
                let g = output::generate_streamed(&member.id, &req.input, &req.params)?;
                format!("Paris{}.", g.text)
            }
        };
        Ok(Response {
            text,
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

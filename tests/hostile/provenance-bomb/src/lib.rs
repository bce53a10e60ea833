//! Hostile test module: provenance-bomb. Tries to grow the provenance that
//! the host returns with the answer: huge trace roles and member ids
//! (`mode = role`), the most trace notes it may emit (`mode = notes`), or a
//! fan-out naming members by megabyte-long ids (`mode = fanout`).

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let mode = req
            .config
            .iter()
            .find(|(k, _)| k == "mode")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        match mode.as_str() {
            "role" => {
                let big = "r".repeat(1 << 20);
                for _ in 0..200 {
                    trace(Some(&big), &big, "n");
                }
            }
            "notes" => {
                let note = "n".repeat(4096);
                for _ in 0..4000 {
                    trace(None, "step", note.clone());
                }
            }
            _ => {
                let job = Job {
                    model: "m".repeat(20_000),
                    input: user("hi"),
                    params: GenParams {
                        max_tokens: Some(1),
                        temperature: None,
                        top_p: None,
                        top_k: None,
                        seed: None,
                        stop: vec![],
                    },
                };
                let jobs = vec![job; 100];
                std::hint::black_box(fan_out(&jobs));
            }
        }
        Ok(Response {
            text: "done".into(),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);

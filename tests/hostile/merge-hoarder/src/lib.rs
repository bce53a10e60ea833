//! Hostile test module: merge-hoarder. Creates as many distinct merges as
//! its budget allows and releases none, hoping to hold them all in memory.
//! Answers with how many merges it got before the host refused one.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(_req: Request) -> Result<Response, Error> {
        let members: Vec<String> = models().into_iter().map(|m| m.id).collect();
        let mut held = 0;
        let mut refused = String::new();
        for i in 0..64u32 {
            let spec = MergeSpec {
                method: MergeMethod::Linear,
                models: members.iter().take(2).cloned().collect(),
                base: None,
                weights: None,
                lambda: 1.0 + f64::from(i) / 100.0,
                seed: u64::from(i),
            };
            match merge(&spec) {
                Ok(_) => held += 1,
                Err(e) => {
                    refused = format!("{e:?}");
                    break;
                }
            }
        }
        Ok(Response {
            text: format!("held {held}"),
            annotations: vec![("refused".into(), refused)],
        })
    }
}

export_strategy!(Hostile);

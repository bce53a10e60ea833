//! Hostile test module: merge-hoarder. First asks for one merge of a
//! member listed a thousand times (a thousand copies of each tensor at
//! once), then creates as many distinct merges as its budget allows and
//! releases none, hoping to hold them all in memory. Answers with how many
//! merges it got before the host refused one.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(_req: Request) -> Result<Response, Error> {
        let members: Vec<String> = models().into_iter().map(|m| m.id).collect();
        let repeated = MergeSpec {
            method: MergeMethod::Linear,
            models: vec![members.first().cloned().unwrap_or_default(); 1000],
            base: None,
            weights: None,
            lambda: 1.0,
            seed: 0,
        };
        let repeat = match merge(&repeated) {
            Ok(id) => format!("merged {id}"),
            Err(e) => format!("{e:?}"),
        };
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
            annotations: vec![("refused".into(), refused), ("repeat".into(), repeat)],
        })
    }
}

export_strategy!(Hostile);

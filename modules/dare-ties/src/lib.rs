//! dare-ties: answer with a DARE-TIES merge of members fine-tuned from one
//! base. See README.md.

use tessera_sdk::weights::{answer_with, members_from};
use tessera_sdk::*;

struct DareTies;

impl Strategy for DareTies {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let pool = generators();
        let base = match members_from(&cfg, "base", &pool)? {
            Some(ids) if ids.len() == 1 => ids[0].clone(),
            _ => {
                return Err(Error::InvalidParams(
                    "dare-ties needs `base`: the one member the others were fine-tuned from".into(),
                ))
            }
        };
        let models = match members_from(&cfg, "models", &pool)? {
            Some(ids) => ids,
            // Every other member of the base's architecture and size.
            None => {
                let info = pool.iter().find(|m| m.id == base);
                pool.iter()
                    .filter(|m| {
                        m.id != base
                            && info.is_some_and(|b| m.architecture == b.architecture && m.parameters == b.parameters)
                    })
                    .map(|m| m.id.clone())
                    .collect()
            }
        };
        if models.is_empty() {
            return Err(Error::ModuleFailed(format!("no member to merge over `{base}`")));
        }
        let density: f64 = cfg.parse_within(
            "density",
            0.5,
            (std::ops::Bound::Excluded(0.0), std::ops::Bound::Included(1.0)),
            "use a keep probability in (0, 1]",
        )?;
        let lambda: f64 = cfg.parse_within("lambda", 1.0, 0.0..=4.0, "use a scale in [0, 4]")?;
        let weights = match cfg.get("weights") {
            None => None,
            Some(list) => {
                let w: Result<Vec<f64>, _> = list.split(',').map(|x| x.trim().parse::<f64>()).collect();
                let w = w.map_err(|_| config::invalid("weights", list, "use comma-separated numbers"))?;
                if w.len() != models.len() {
                    return Err(config::invalid(
                        "weights",
                        list,
                        "give one weight per member in `models`",
                    ));
                }
                Some(w)
            }
        };
        let seed: u64 = cfg.parse("seed", req.params.seed.unwrap_or(0))?;
        let id = merge(&MergeSpec {
            method: MergeMethod::DareTies(density),
            models: models.clone(),
            base: Some(base.clone()),
            weights,
            lambda,
            seed,
        })?;
        trace(
            Some(&id),
            "merged",
            format!("DARE-TIES of {} over {base}, density {density}", models.join(", ")),
        );
        let mut r = answer_with(&id, &req, "the merged model answers")?;
        r.annotations.push(("merged".into(), models.join(",")));
        r.annotations.push(("base".into(), base));
        Ok(r)
    }
}

export_strategy!(DareTies);

//! greedy-soup: answer with a uniform weight average ("soup") of the
//! members that help on dev, added best first. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{accuracy_of, rank};
use tessera_sdk::weights::{answer_with, compatible, members_from};
use tessera_sdk::*;

struct GreedySoup;

/// State format version.
const STATE: u8 = 1;

/// What `fit` keeps: the soup's members and its dev accuracy.
#[derive(Serialize, Deserialize)]
struct Soup {
    members: Vec<String>,
    dev_accuracy: f64,
}

fn soup_of(members: &[String]) -> MergeSpec {
    MergeSpec {
        method: MergeMethod::Linear,
        models: members.to_vec(),
        base: None,
        weights: None,
        lambda: 1.0,
        seed: 0,
    }
}

/// The member that answers for `members`: the only one, or their soup.
fn cook(members: &[String]) -> Result<String, Error> {
    match members {
        [] => Err(Error::ModuleFailed("the soup is empty".into())),
        [one] => Ok(one.clone()),
        _ => merge(&soup_of(members)),
    }
}

impl Strategy for GreedySoup {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let pool = generators();
        let members = match state::load::<Soup>(STATE, req.state.as_deref())? {
            Some(s) => s.members,
            // Not fitted: the configured members, else the first member.
            None => members_from(&cfg, "models", &pool)?
                .unwrap_or_else(|| pool.iter().take(1).map(|m| m.id.clone()).collect()),
        };
        let id = cook(&members)?;
        trace(Some(&id), "soup", format!("uniform soup of {}", members.join(", ")));
        let mut r = answer_with(&id, &req, "the soup answers")?;
        r.annotations.push(("soup".into(), members.join(",")));
        Ok(r)
    }

    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        let trials: usize = cfg.parse_within("max_trials", 3, 1..=16, "use 1..=16 (each trial is one merge)")?;
        let pool = generators();
        let candidates: Vec<ModelInfo> = match members_from(&cfg, "models", &pool)? {
            Some(ids) => pool.iter().filter(|m| ids.contains(&m.id)).cloned().collect(),
            None => pool,
        };
        let ranked = rank(&dev, &candidates, &cfg)?;
        let best = candidates
            .iter()
            .find(|m| Some(&m.id) == ranked.order.first())
            .ok_or_else(|| Error::ModuleFailed("no generative member was granted".into()))?
            .clone();
        let mergeable: Vec<String> = compatible(&best, &candidates).into_iter().map(|m| m.id).collect();
        let mut soup = vec![best.id.clone()];
        let mut acc = ranked.accuracy(&best.id);
        // Greedy soup: try each member in dev order; keep it if the soup
        // with it does at least as well on dev.
        for id in ranked
            .order
            .iter()
            .skip(1)
            .filter(|id| mergeable.contains(id))
            .take(trials)
        {
            let trial: Vec<String> = soup.iter().cloned().chain([id.clone()]).collect();
            let merged = match cook(&trial) {
                Ok(m) => m,
                Err(e) => {
                    trace(Some(id), "fit", format!("cannot add to the soup: {e}"));
                    continue;
                }
            };
            let got = accuracy_of(&dev, &merged, &best, ranked.max_tokens);
            // `run` merges the kept recipe again (the host keeps recent
            // merges, so that is cheap): hold no trial past its measurement.
            if let Err(e) = release(&merged) {
                trace(Some(&merged), "fit", format!("release failed: {e}"));
            }
            let keep = got >= acc;
            trace(
                Some(id),
                "fit",
                format!(
                    "soup + {id}: dev {got:.3} vs {acc:.3}: {}",
                    if keep { "kept" } else { "left out" }
                ),
            );
            if keep {
                soup = trial;
                acc = got;
            }
        }
        trace(None, "fit", format!("soup: {} (dev {acc:.3})", soup.join(", ")));
        Ok(Some(state::save(
            STATE,
            &Soup {
                members: soup,
                dev_accuracy: acc,
            },
        )?))
    }
}

export_strategy!(GreedySoup);

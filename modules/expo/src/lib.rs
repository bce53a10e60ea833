//! expo: answer with a model extrapolated away from a weaker one,
//! `best + alpha (best - worst)` (ExPO). See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::rank;
use tessera_sdk::weights::{answer_with, compatible, members_from};
use tessera_sdk::*;

struct Expo;

/// State format version.
const STATE: u8 = 1;

/// What `fit` picks: the best dev member and the worst one that shares its
/// architecture.
#[derive(Serialize, Deserialize)]
struct Pair {
    target: String,
    source: String,
}

fn one(cfg: &Config, key: &str, pool: &[ModelInfo]) -> Result<Option<String>, Error> {
    match members_from(cfg, key, pool)? {
        Some(ids) if ids.len() == 1 => Ok(ids.into_iter().next()),
        Some(ids) => Err(config::invalid(key, ids.join(","), "name exactly one member")),
        None => Ok(None),
    }
}

impl Strategy for Expo {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let alpha: f64 = cfg.parse_within(
            "alpha",
            0.3,
            (std::ops::Bound::Excluded(0.0), std::ops::Bound::Included(10.0)),
            "use a value in (0, 10], e.g. 0.3",
        )?;
        let pool = generators();
        let fitted = state::load::<Pair>(STATE, req.state.as_deref())?;
        let target = one(&cfg, "model", &pool)?.or_else(|| fitted.as_ref().map(|p| p.target.clone()));
        let source = one(&cfg, "base", &pool)?.or_else(|| fitted.as_ref().map(|p| p.source.clone()));
        let (Some(target), Some(source)) = (target, source) else {
            return Err(Error::InvalidParams(
                "expo needs `model` (the stronger member) and `base` (the weaker one it moves away from): set both, or run fit".into(),
            ));
        };
        let id = merge(&MergeSpec {
            method: MergeMethod::Expo(alpha),
            models: vec![target.clone()],
            base: Some(source.clone()),
            weights: None,
            lambda: 1.0,
            seed: 0,
        })?;
        trace(
            Some(&id),
            "extrapolated",
            format!("{target} + {alpha} ({target} - {source})"),
        );
        let mut r = answer_with(&id, &req, "the extrapolated model answers")?;
        r.annotations.push(("target".into(), target));
        r.annotations.push(("source".into(), source));
        Ok(r)
    }

    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        let pool = generators();
        let order = rank(&dev, &pool, &cfg)?.order;
        // The best member that has a partner of its architecture and size
        // (a member alone of its kind cannot be extrapolated), and the
        // worst such partner.
        let pair = order.iter().find_map(|id| {
            let best = pool.iter().find(|m| &m.id == id)?;
            let mergeable: Vec<String> = compatible(best, &pool).into_iter().map(|m| m.id).collect();
            let worst = order.iter().rev().find(|o| **o != best.id && mergeable.contains(o))?;
            Some((best, worst))
        });
        let Some((best, worst)) = pair else {
            return Err(Error::ModuleFailed(
                "no two granted members share an architecture and size: nothing to extrapolate from".into(),
            ));
        };
        trace(None, "fit", format!("target {} (best on dev), source {worst}", best.id));
        Ok(Some(state::save(
            STATE,
            &Pair {
                target: best.id.clone(),
                source: worst.clone(),
            },
        )?))
    }
}

export_strategy!(Expo);

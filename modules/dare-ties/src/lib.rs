//! dare-ties: answer with a DARE-TIES merge of members fine-tuned from one
//! base; `fit` searches the members' weights by particle swarm on dev.
//! See README.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{accuracy_of, fit_max_tokens};
use tessera_sdk::pso::{key, Swarm};
use tessera_sdk::rand::Rng;
use tessera_sdk::weights::{answer_with, compatible, members_from};
use tessera_sdk::*;

struct DareTies;

/// State format version.
const STATE: u8 = 1;

/// Merges one `fit` may make: the manifest's `merges` budget.
const MAX_MERGES: usize = 32;

/// What `fit` keeps: the members' weights found on dev.
#[derive(Debug, Serialize, Deserialize)]
struct Fitted {
    base: String,
    models: Vec<String>,
    weights: Vec<f64>,
    /// The drop seed the weights were measured with.
    seed: u64,
    dev_accuracy: f64,
}

/// One merge recipe, from the request's config (and `fit`'s weights).
struct Plan {
    base: String,
    models: Vec<String>,
    density: f64,
    lambda: f64,
    /// From config `weights`; `None` = not set there.
    weights: Option<Vec<f64>>,
    seed: u64,
}

fn plan(cfg: &Config, pool: &[ModelInfo], seed: u64) -> Result<Plan, Error> {
    let base = match members_from(cfg, "base", pool)? {
        Some(ids) if ids.len() == 1 => ids[0].clone(),
        _ => {
            return Err(Error::InvalidParams(
                "dare-ties needs `base`: the one member the others were fine-tuned from".into(),
            ))
        }
    };
    let models = match members_from(cfg, "models", pool)? {
        Some(ids) => ids,
        // Every other member of the base's architecture and size.
        None => pool
            .iter()
            .find(|m| m.id == base)
            .map(|info| compatible(info, pool).into_iter().skip(1).map(|m| m.id).collect())
            .unwrap_or_default(),
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
    let weights = cfg.numbers("weights", models.len(), "member in `models`")?;
    Ok(Plan {
        base,
        models,
        density,
        lambda,
        weights,
        seed: cfg.parse("seed", seed)?,
    })
}

fn merged(p: &Plan, weights: Option<Vec<f64>>) -> Result<String, Error> {
    merge(&MergeSpec {
        method: MergeMethod::DareTies(p.density),
        models: p.models.clone(),
        base: Some(p.base.clone()),
        weights,
        lambda: p.lambda,
        seed: p.seed,
    })
}

fn shown(w: &[f64]) -> String {
    w.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(",")
}

impl Strategy for DareTies {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let mut p = plan(&cfg, &generators(), req.params.seed.unwrap_or(0))?;
        // Weights: the request's, else the ones `fit` found for these very
        // members, else 1 each.
        let fitted =
            state::load::<Fitted>(STATE, req.state.as_deref())?.filter(|f| f.base == p.base && f.models == p.models);
        let (weights, source) = match (&p.weights, &fitted) {
            (Some(w), _) => (Some(w.clone()), "config"),
            (None, Some(f)) => {
                // The drops the weights were measured with, unless the
                // request sets its own.
                if cfg.get("seed").is_none() {
                    p.seed = f.seed;
                }
                (Some(f.weights.clone()), "fit")
            }
            (None, None) => (None, "uniform"),
        };
        let id = merged(&p, weights.clone())?;
        trace(
            Some(&id),
            "merged",
            format!(
                "DARE-TIES of {} over {}, density {}, weights {} ({source})",
                p.models.join(", "),
                p.base,
                p.density,
                weights.as_deref().map_or("1 each".into(), shown)
            ),
        );
        let mut r = answer_with(&id, &req, "the merged model answers")?;
        r.annotations.push(("merged".into(), p.models.join(",")));
        r.annotations.push(("base".into(), p.base));
        if let Some(w) = weights {
            r.annotations.push(("weights".into(), shown(&w)));
        }
        if let (Some(f), "fit") = (&fitted, source) {
            r.annotations
                .push(("dev_accuracy".into(), format!("{:.4}", f.dev_accuracy)));
        }
        // The merge outlives the request under a name, where the operator
        // allows kept merges; a refusal fails the request, since the caller
        // asked for it.
        if let Some(name) = cfg.get("keep_as") {
            keep(&id, name)?;
            trace(Some(&id), "kept", format!("kept in the pool as `{name}`"));
            r.annotations.push(("kept_as".into(), name.to_string()));
        }
        Ok(r)
    }

    /// Particle-swarm search for the members' weights (each in [0, 1]),
    /// utility = dev accuracy of the merge. One particle starts at uniform
    /// weights (the unfitted merge), so the result is never worse on dev.
    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        let max_tokens = fit_max_tokens(&dev, &cfg)?;
        let pool = generators();
        let p = plan(&cfg, &pool, 0)?;
        let like = pool
            .iter()
            .find(|m| m.id == p.base)
            .cloned()
            .ok_or_else(|| Error::ModuleFailed(format!("base `{}` is not granted", p.base)))?;
        let population: usize = cfg.parse_within("population", 4, 1..=16, "use 1..=16 particles")?;
        let swarm = Swarm {
            bounds: Some((0.0, 1.0)),
            rounds: 3,
            ..Swarm::default()
        }
        .configured(&cfg, 10)?;
        if population * swarm.rounds > MAX_MERGES {
            return Err(Error::InvalidParams(format!(
                "config `population` x `iterations` = {population} x {} merges; keep it within {MAX_MERGES}",
                swarm.rounds
            )));
        }
        let d = p.models.len();
        let mut rng = Rng::new(cfg.parse("seed", 0)?);
        let mut x: Vec<Vec<f64>> = vec![vec![1.0; d]];
        while x.len() < population {
            x.push((0..d).map(|_| rng.f64()).collect());
        }
        let v: Vec<Vec<f64>> = (0..population)
            .map(|_| (0..d).map(|_| rng.range(-0.1, 0.1)).collect())
            .collect();
        let mut seen: BTreeMap<Vec<i64>, f64> = BTreeMap::new();
        let found = swarm.search(
            &mut rng,
            x,
            v,
            |round, i, w| {
                if let Some(f) = seen.get(&key(w)) {
                    return Ok(*f);
                }
                // All-zero weights merge to the base itself: measure that.
                let id = if w.iter().all(|x| *x == 0.0) {
                    p.base.clone()
                } else {
                    merged(&p, Some(w.to_vec()))?
                };
                let f = accuracy_of(&dev, &id, &like, max_tokens);
                if id != p.base {
                    release(&id)?;
                }
                trace(
                    None,
                    "particle",
                    format!("round {round}, particle {i}: weights {} -> dev {f:.3}", shown(w)),
                );
                seen.insert(key(w), f);
                Ok(f)
            },
            |round, fitness, best| {
                let all: Vec<String> = fitness.iter().map(|f| format!("{f:.2}")).collect();
                trace(
                    None,
                    "fit",
                    format!("round {round}: dev {}; best {best:.3}", all.join(", ")),
                );
            },
        )?;
        trace(
            None,
            "fit",
            format!("weights {} (dev {:.3})", shown(&found.position), found.fitness),
        );
        Ok(Some(state::save(
            STATE,
            &Fitted {
                base: p.base,
                models: p.models,
                weights: found.position,
                seed: p.seed,
                dev_accuracy: found.fitness,
            },
        )?))
    }
}

export_strategy!(DareTies);

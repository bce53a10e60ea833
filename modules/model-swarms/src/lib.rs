//! model-swarms: particle-swarm search in weight space. Every particle is a
//! model (an affine combination of the members' weights, made by the host's
//! linear merge), its utility is its dev accuracy, and the best model any
//! particle reached answers at test time. See README.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{accuracy_of, fit_max_tokens};
use tessera_sdk::pso::{key, Swarm};
use tessera_sdk::rand::Rng;
use tessera_sdk::weights::{answer_with, members_from};
use tessera_sdk::*;

struct ModelSwarms;

/// State format version.
const STATE: u8 = 1;

/// Merges one `fit` may make: the manifest's `merges` budget.
const MAX_MERGES: usize = 64;

/// What `fit` found: the best position (one coefficient per member; they
/// sum to 1) and how the search went.
#[derive(Debug, Serialize, Deserialize)]
struct Found {
    members: Vec<String>,
    position: Vec<f64>,
    dev_accuracy: f64,
    /// Best dev accuracy after each round.
    history: Vec<f64>,
}

/// The experts: config `models`, else the largest group of granted members
/// that share an architecture and size (pool order breaks ties).
fn experts(cfg: &Config, pool: &[ModelInfo]) -> Result<Vec<ModelInfo>, Error> {
    let chosen: Vec<ModelInfo> = match members_from(cfg, "models", pool)? {
        Some(ids) => pool.iter().filter(|m| ids.contains(&m.id)).cloned().collect(),
        None => {
            let mut best: Vec<ModelInfo> = Vec::new();
            for m in pool {
                let group: Vec<ModelInfo> = pool
                    .iter()
                    .filter(|o| o.architecture == m.architecture && o.parameters == m.parameters)
                    .cloned()
                    .collect();
                if group.len() > best.len() {
                    best = group;
                }
            }
            best
        }
    };
    if chosen.len() < 2 {
        return Err(Error::ModuleFailed(
            "model swarms needs at least two granted members of one architecture and size (fine-tuned from one base); set `models` or grant more".into(),
        ));
    }
    Ok(chosen)
}

/// The member a position stands for when it is one member exactly.
fn one_hot(position: &[f64]) -> Option<usize> {
    let i = position.iter().position(|c| (c - 1.0).abs() < 1e-9)?;
    position
        .iter()
        .enumerate()
        .all(|(j, c)| j == i || c.abs() < 1e-9)
        .then_some(i)
}

/// The model at `position`: the member itself, or the host's linear merge
/// of the members with these coefficients. The flag says it was merged.
fn model_at(members: &[String], position: &[f64]) -> Result<(String, bool), Error> {
    if let Some(i) = one_hot(position) {
        return Ok((members[i].clone(), false));
    }
    let id = merge(&MergeSpec {
        method: MergeMethod::Linear,
        models: members.to_vec(),
        base: None,
        weights: Some(position.to_vec()),
        lambda: 1.0,
        seed: 0,
    })?;
    Ok((id, true))
}

fn shown(members: &[String], position: &[f64]) -> String {
    members
        .iter()
        .zip(position)
        .map(|(m, c)| format!("{m} {c:+.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Strategy for ModelSwarms {
    fn run(req: Request) -> Result<Response, Error> {
        let Some(found) = state::load::<Found>(STATE, req.state.as_deref())? else {
            return Err(Error::InvalidParams(
                "model-swarms answers with the model its search found on dev: fit it first (`tessera eval` fits every strategy; in Rust, `Runtime::fit`)".into(),
            ));
        };
        let (id, _) = model_at(&found.members, &found.position)?;
        trace(
            Some(&id),
            "global-best",
            format!(
                "{} (dev {:.3})",
                shown(&found.members, &found.position),
                found.dev_accuracy
            ),
        );
        let mut r = answer_with(&id, &req, "the swarm's global best answers")?;
        let coefficients: Vec<String> = found.position.iter().map(|c| format!("{c:.4}")).collect();
        r.annotations.push(("members".into(), found.members.join(",")));
        r.annotations.push(("coefficients".into(), coefficients.join(",")));
        r.annotations
            .push(("dev_accuracy".into(), format!("{:.4}", found.dev_accuracy)));
        Ok(r)
    }

    fn fit(dev: Vec<Example>, cfg: Config) -> Result<Option<Vec<u8>>, Error> {
        let max_tokens = fit_max_tokens(&dev, &cfg)?;
        let experts = experts(&cfg, &generators())?;
        let n = experts.len();
        let members: Vec<String> = experts.iter().map(|m| m.id.clone()).collect();
        let population: usize = cfg.parse_within(
            "population",
            n + 2,
            n..=32,
            &format!(
                "use {n}..=32: every one of the {n} members starts as a particle, the rest start between two of them"
            ),
        )?;
        let swarm = Swarm {
            // Moves mix positions, so every particle stays a combination of
            // the members whose coefficients sum to 1.
            per_coordinate: false,
            bounds: None,
            step: cfg.parse_within("step_length", 1.0, 0.01..=2.0, "use 0.01..=2")?,
            step_decay: cfg.parse_within("step_decay", 0.9, 0.1..=1.0, "use 0.1..=1")?,
            rounds: 4,
            ..Swarm::default()
        }
        .configured(&cfg, 10)?;
        let merges = (population - n) + population * (swarm.rounds - 1);
        if merges > MAX_MERGES {
            return Err(Error::InvalidParams(format!(
                "config `population` x `iterations` = {population} x {} plans up to {merges} merges; keep it within {MAX_MERGES} (lower `population` or `iterations`)",
                swarm.rounds
            )));
        }
        let mut rng = Rng::new(cfg.parse("seed", 0)?);
        // Start: each member, then points between two random members.
        let mut x: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
            .collect();
        while x.len() < population {
            let a = rng.below(n);
            let b = (a + 1 + rng.below(n - 1)) % n;
            let t = rng.range(0.2, 0.8);
            let mut p = vec![0.0; n];
            p[a] = t;
            p[b] = 1.0 - t;
            x.push(p);
        }
        // Each particle starts heading for another one.
        let v: Vec<Vec<f64>> = (0..population)
            .map(|i| {
                let j = (i + 1 + rng.below(population - 1)) % population;
                x[j].iter().zip(&x[i]).map(|(a, b)| a - b).collect()
            })
            .collect();
        let mut seen: BTreeMap<Vec<i64>, f64> = BTreeMap::new();
        let found = swarm.search(
            &mut rng,
            x,
            v,
            |round, p, position| {
                if let Some(f) = seen.get(&key(position)) {
                    return Ok(*f);
                }
                let (id, merged) = model_at(&members, position)?;
                let f = accuracy_of(&dev, &id, &experts[0], max_tokens);
                if merged {
                    // One merged model held at a time, whatever the swarm's size.
                    release(&id)?;
                }
                trace(
                    None,
                    "particle",
                    format!(
                        "round {round}, particle {p}: {} -> dev {f:.3}",
                        shown(&members, position)
                    ),
                );
                seen.insert(key(position), f);
                Ok(f)
            },
            |round, fitness, best| {
                let shown: Vec<String> = fitness.iter().map(|f| format!("{f:.2}")).collect();
                trace(
                    None,
                    "fit",
                    format!("round {round}: utilities {}; global best {best:.3}", shown.join(", ")),
                );
            },
        )?;
        trace(
            None,
            "fit",
            format!(
                "global best: {} (dev {:.3})",
                shown(&members, &found.position),
                found.fitness
            ),
        );
        Ok(Some(state::save(
            STATE,
            &Found {
                members,
                position: found.position,
                dev_accuracy: found.fitness,
                history: found.history,
            },
        )?))
    }
}

export_strategy!(ModelSwarms);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hot_positions_are_members_themselves() {
        assert_eq!(one_hot(&[0.0, 1.0, 0.0]), Some(1));
        assert_eq!(one_hot(&[0.5, 0.5]), None);
        assert_eq!(one_hot(&[1.0, -0.2, 0.2]), None);
    }
}

//! Particle-swarm search, shared by the methods that search on dev:
//! heterogeneous swarms (over adjacency matrices), model swarms (over
//! merge coefficients, i.e. in the weight space the members span) and
//! DARE-TIES' member weights.
//!
//! Each particle has a position and a velocity. After the first round,
//! every round moves each particle by its velocity, which mixes four
//! pulls: its old velocity (inertia), towards its own best position
//! (cognitive), towards the best position any particle found (social),
//! and away from the worst one (repel), each scaled by a fresh uniform
//! random factor. The fitness is whatever the caller measures (for these
//! methods: dev accuracy); higher is better, and ties keep the earlier
//! find, so a swarm started from known-good positions never reports
//! anything worse than them.

use crate::rand::Rng;
use crate::Error;

/// The constants of one search.
#[derive(Debug, Clone, PartialEq)]
pub struct Swarm {
    /// Share of the old velocity kept.
    pub inertia: f64,
    /// Pull towards the particle's own best position.
    pub cognitive: f64,
    /// Pull towards the swarm's best position.
    pub social: f64,
    /// Push away from the swarm's worst position.
    pub repel: f64,
    /// Rounds, the first (evaluating the starting positions) included.
    pub rounds: usize,
    /// Multiplies the velocity when moving (1 = classic PSO).
    pub step: f64,
    /// `step` is multiplied by this after every move (1 = constant).
    pub step_decay: f64,
    /// Each coordinate is clamped into this box after a move.
    pub bounds: Option<(f64, f64)>,
    /// One random factor per coordinate (classic PSO, explores each
    /// coordinate on its own), or one per particle and pull: then every
    /// move is a combination of positions, so particles stay in the affine
    /// span of the starting positions, as model swarms needs.
    pub per_coordinate: bool,
}

impl Default for Swarm {
    /// The reference library's constants: inertia 0.2, cognitive 0.3,
    /// social 0.4, repel 0.05; five rounds; classic per-coordinate moves.
    fn default() -> Self {
        Swarm {
            inertia: 0.2,
            cognitive: 0.3,
            social: 0.4,
            repel: 0.05,
            rounds: 5,
            step: 1.0,
            step_decay: 1.0,
            bounds: None,
            per_coordinate: true,
        }
    }
}

/// What a search found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The best position.
    pub position: Vec<f64>,
    /// Its fitness.
    pub fitness: f64,
    /// The best fitness after each round.
    pub history: Vec<f64>,
}

impl Swarm {
    /// `self` with the pulls `inertia`, `cognitive`, `social` and `repel`
    /// read from `config` (each in 0..=4; unset keys keep `self`'s value)
    /// and `rounds` from config `iterations` (1..=`max_rounds`).
    pub fn configured(&self, config: &crate::Config, max_rounds: usize) -> Result<Swarm, Error> {
        let pull = |key: &str, default: f64| -> Result<f64, Error> {
            let v: f64 = config.parse(key, default)?;
            if v.is_finite() && (0.0..=4.0).contains(&v) {
                Ok(v)
            } else {
                Err(crate::config::invalid(key, v, "use 0..=4"))
            }
        };
        let rounds = config.parse_within(
            "iterations",
            self.rounds,
            1..=max_rounds,
            &format!("use 1..={max_rounds} rounds"),
        )?;
        Ok(Swarm {
            inertia: pull("inertia", self.inertia)?,
            cognitive: pull("cognitive", self.cognitive)?,
            social: pull("social", self.social)?,
            repel: pull("repel", self.repel)?,
            rounds,
            ..self.clone()
        })
    }

    /// Runs the search from `start` (one position per particle, all of one
    /// length) and `velocity` (the same shape). `fitness(round, particle,
    /// position)` measures one position; an error stops the search.
    /// `on_round(round, fitnesses, best)` is told each round's results
    /// (for trace notes). Moves draw from `rng` only, so a seed fixes the
    /// whole search.
    pub fn search(
        &self,
        rng: &mut Rng,
        start: Vec<Vec<f64>>,
        velocity: Vec<Vec<f64>>,
        mut fitness: impl FnMut(usize, usize, &[f64]) -> Result<f64, Error>,
        mut on_round: impl FnMut(usize, &[f64], f64),
    ) -> Result<Found, Error> {
        let dims = start.first().map(Vec::len).unwrap_or(0);
        if start.is_empty() || dims == 0 {
            return Err(Error::InvalidParams(
                "a particle swarm needs at least one particle of at least one coordinate".into(),
            ));
        }
        if start.iter().chain(&velocity).any(|p| p.len() != dims) || velocity.len() != start.len() {
            return Err(Error::InvalidParams(
                "particle positions and velocities must all have one shape".into(),
            ));
        }
        let (mut x, mut v) = (start, velocity);
        let mut personal: Vec<(Vec<f64>, f64)> = Vec::with_capacity(x.len());
        let mut best: Option<(Vec<f64>, f64)> = None;
        let mut worst: Option<(Vec<f64>, f64)> = None;
        let mut history = Vec::with_capacity(self.rounds);
        let mut step = self.step;
        for round in 0..self.rounds.max(1) {
            if round > 0 {
                let (Some(gb), Some(gw)) = (&best, &worst) else { break };
                for p in 0..x.len() {
                    let mut draw = (rng.f64(), rng.f64(), rng.f64());
                    for k in 0..dims {
                        if self.per_coordinate && k > 0 {
                            draw = (rng.f64(), rng.f64(), rng.f64());
                        }
                        let (r1, r2, r3) = draw;
                        v[p][k] = self.inertia * v[p][k]
                            + self.cognitive * r1 * (personal[p].0[k] - x[p][k])
                            + self.social * r2 * (gb.0[k] - x[p][k])
                            - self.repel * r3 * (gw.0[k] - x[p][k]);
                        x[p][k] += step * v[p][k];
                        if let Some((lo, hi)) = self.bounds {
                            x[p][k] = x[p][k].clamp(lo, hi);
                        }
                    }
                }
                step *= self.step_decay;
            }
            let mut seen = Vec::with_capacity(x.len());
            for (p, pos) in x.iter().enumerate() {
                let f = fitness(round, p, pos)?;
                seen.push(f);
                if round == 0 {
                    personal.push((pos.clone(), f));
                } else if f > personal[p].1 {
                    personal[p] = (pos.clone(), f);
                }
                if best.as_ref().is_none_or(|g| f > g.1) {
                    best = Some((pos.clone(), f));
                }
                if worst.as_ref().is_none_or(|g| f < g.1) {
                    worst = Some((pos.clone(), f));
                }
            }
            let so_far = best.as_ref().map_or(f64::NEG_INFINITY, |g| g.1);
            history.push(so_far);
            on_round(round, &seen, so_far);
        }
        let (position, fitness) = best.ok_or_else(|| Error::ModuleFailed("the swarm evaluated no particle".into()))?;
        Ok(Found {
            position,
            fitness,
            history,
        })
    }
}

/// A position's key for caching fitness: coordinates rounded to 1e-6, so a
/// particle that comes back to where another was is not measured again.
pub fn key(position: &[f64]) -> Vec<i64> {
    position.iter().map(|x| (x * 1e6).round() as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fitness peaks at (0.7, 0.2).
    fn bowl(x: &[f64]) -> f64 {
        -((x[0] - 0.7).powi(2) + (x[1] - 0.2).powi(2))
    }

    fn start(rng: &mut Rng, n: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let x = (0..n).map(|_| vec![rng.f64(), rng.f64()]).collect();
        let v = (0..n)
            .map(|_| vec![rng.range(-0.1, 0.1), rng.range(-0.1, 0.1)])
            .collect();
        (x, v)
    }

    #[test]
    fn finds_the_top_of_a_bowl_and_never_gets_worse() {
        let swarm = Swarm {
            rounds: 40,
            bounds: Some((0.0, 1.0)),
            ..Swarm::default()
        };
        let mut rng = Rng::new(3);
        let (x, v) = start(&mut rng, 8);
        let mut rounds = 0;
        let found = swarm
            .search(
                &mut rng,
                x,
                v,
                |_, _, p| Ok(bowl(p)),
                |_, f, _| {
                    assert_eq!(f.len(), 8);
                    rounds += 1;
                },
            )
            .unwrap();
        assert_eq!(rounds, 40);
        assert!(found.fitness > -1e-3, "{found:?}");
        assert!((found.position[0] - 0.7).abs() < 0.05 && (found.position[1] - 0.2).abs() < 0.05);
        assert!(found.history.windows(2).all(|w| w[1] >= w[0]), "best never drops");
        assert_eq!(found.fitness, bowl(&found.position));
    }

    #[test]
    fn same_seed_same_search_and_bounds_hold() {
        let swarm = Swarm {
            rounds: 6,
            bounds: Some((0.0, 1.0)),
            inertia: 2.0,
            ..Swarm::default()
        };
        let run = || {
            let mut rng = Rng::new(9);
            let (x, v) = start(&mut rng, 4);
            let mut all = Vec::new();
            swarm
                .search(
                    &mut rng,
                    x,
                    v,
                    |_, _, p| {
                        all.push(p.to_vec());
                        Ok(bowl(p))
                    },
                    |_, _, _| {},
                )
                .unwrap();
            all
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().flatten().all(|c| (0.0..=1.0).contains(c)));
    }

    #[test]
    fn per_particle_moves_stay_in_the_span_of_the_start() {
        // One-hot starts over three members: every move mixes positions,
        // so coordinates keep summing to 1 (affine combinations).
        let swarm = Swarm {
            rounds: 8,
            per_coordinate: false,
            step_decay: 0.9,
            ..Swarm::default()
        };
        let mut rng = Rng::new(1);
        let x = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
        let v = vec![vec![-1.0, 1.0, 0.0], vec![0.0, -1.0, 1.0], vec![1.0, 0.0, -1.0]];
        swarm
            .search(
                &mut rng,
                x,
                v,
                |_, _, p| {
                    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{p:?}");
                    Ok(p[1] - p[0].abs() - p[2].abs())
                },
                |_, _, _| {},
            )
            .unwrap();
    }

    #[test]
    fn the_starting_best_is_kept_on_ties_and_errors_stop_the_search() {
        let swarm = Swarm::default();
        let mut rng = Rng::new(0);
        let x = vec![vec![0.5], vec![0.9]];
        let v = vec![vec![0.1], vec![0.1]];
        let found = swarm
            .search(&mut rng, x.clone(), v.clone(), |_, _, _| Ok(1.0), |_, _, _| {})
            .unwrap();
        assert_eq!(found.position, vec![0.5]);
        let err = swarm
            .search(
                &mut rng,
                x,
                v,
                |r, _, _| {
                    if r == 1 {
                        Err(Error::ModuleFailed("x".into()))
                    } else {
                        Ok(0.0)
                    }
                },
                |_, _, _| {},
            )
            .unwrap_err();
        assert!(matches!(err, Error::ModuleFailed(_)));
        assert!(swarm
            .search(&mut rng, vec![], vec![], |_, _, _| Ok(0.0), |_, _, _| {})
            .is_err());
    }
}

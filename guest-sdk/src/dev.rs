//! Dev-set evaluation: how well each member answers the dev examples `fit`
//! receives. Almost every method of the reference library starts here: the
//! best dev member summarises, routes, fuses or breaks ties.

use serde::{Deserialize, Serialize};

use crate::answer::is_correct;
use crate::{fan_out, trace, Error, Example, GenParams, Job, ModelInfo};

/// One member's dev results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberScore {
    /// The member's id.
    pub model: String,
    /// Whether its greedy answer to each dev example was correct, in order.
    pub correct: Vec<bool>,
}

impl MemberScore {
    /// Share of dev examples answered correctly (0 for an empty dev set).
    pub fn accuracy(&self) -> f64 {
        if self.correct.is_empty() {
            0.0
        } else {
            self.correct.iter().filter(|c| **c).count() as f64 / self.correct.len() as f64
        }
    }
}

/// Greedy answers of every member in `members` to every dev example, graded
/// with [`is_correct`]. One fan-out per member (the host runs members in
/// parallel); a failed call counts as wrong and is traced.
pub fn evaluate(dev: &[Example], members: &[ModelInfo], max_tokens: u32) -> Vec<MemberScore> {
    let mut jobs = Vec::with_capacity(dev.len() * members.len());
    for m in members {
        for e in dev {
            jobs.push(Job {
                model: m.id.clone(),
                input: e.input.clone(),
                params: GenParams {
                    max_tokens: Some(max_tokens),
                    temperature: Some(0.0),
                    ..Default::default()
                },
            });
        }
    }
    let results = fan_out(&jobs);
    members
        .iter()
        .enumerate()
        .map(|(mi, m)| {
            let correct: Vec<bool> = dev
                .iter()
                .enumerate()
                .map(|(ei, e)| match &results[mi * dev.len() + ei] {
                    Ok(g) => is_correct(&g.text, e),
                    Err(err) => {
                        trace(Some(&m.id), "fit", format!("dev example {ei} failed: {err}"));
                        false
                    }
                })
                .collect();
            let s = MemberScore {
                model: m.id.clone(),
                correct,
            };
            trace(
                Some(&m.id),
                "fit",
                format!(
                    "{}/{} dev answers correct",
                    s.correct.iter().filter(|c| **c).count(),
                    dev.len()
                ),
            );
            s
        })
        .collect()
}

/// Member ids ordered best dev accuracy first; ties keep pool order.
pub fn ranking(scores: &[MemberScore]) -> Vec<String> {
    let mut order: Vec<&MemberScore> = scores.iter().collect();
    order.sort_by(|a, b| b.accuracy().total_cmp(&a.accuracy()));
    order.into_iter().map(|s| s.model.clone()).collect()
}

/// Members ranked on dev, as the start of a `fit`.
#[derive(Debug, Clone)]
pub struct Ranked {
    /// Every member's dev results, in the order given.
    pub scores: Vec<MemberScore>,
    /// Member ids, best dev accuracy first (ties keep the given order).
    pub order: Vec<String>,
    /// Tokens per dev answer (config `fit_max_tokens`), for measuring more
    /// candidates (such as merges) the same way.
    pub max_tokens: u32,
}

impl Ranked {
    /// The dev accuracy of member `id` (0 when it was not ranked).
    pub fn accuracy(&self, id: &str) -> f64 {
        self.scores
            .iter()
            .find(|s| s.model == id)
            .map_or(0.0, MemberScore::accuracy)
    }
}

/// The usual start of a `fit`: checks that there are dev examples and
/// members, reads `fit_max_tokens` (default 64), lets every member in
/// `members` answer the dev examples greedily, and traces the ranking.
pub fn rank(dev: &[Example], members: &[ModelInfo], config: &crate::Config) -> Result<Ranked, Error> {
    let max_tokens = fit_max_tokens(dev, config)?;
    if members.is_empty() {
        return Err(Error::ModuleFailed("no generative member was granted".into()));
    }
    let scores = evaluate(dev, members, max_tokens);
    trace(None, "fit", format!("dev ranking: {}", describe(&scores)));
    Ok(Ranked {
        order: ranking(&scores),
        scores,
        max_tokens,
    })
}

/// Checks that `fit` got dev examples and reads `fit_max_tokens` (tokens
/// per dev answer, default 64).
pub fn fit_max_tokens(dev: &[Example], config: &crate::Config) -> Result<u32, Error> {
    if dev.is_empty() {
        return Err(Error::InvalidParams("fit needs at least one dev example".into()));
    }
    config.parse_within("fit_max_tokens", 64, 1..=4096, "use 1..=4096 tokens")
}

/// Dev accuracy of one member (a merged one, typically) answering the way
/// [`evaluate`] does. `like` supplies the rest of its description.
pub fn accuracy_of(dev: &[Example], id: &str, like: &ModelInfo, max_tokens: u32) -> f64 {
    let probe = ModelInfo {
        id: id.to_string(),
        ..like.clone()
    };
    evaluate(dev, &[probe], max_tokens)
        .first()
        .map_or(0.0, MemberScore::accuracy)
}

/// The whole `fit` of methods whose state is the members' dev scores:
/// every granted generative member answers the dev examples greedily
/// (`fit_max_tokens` per answer, default 64), the ranking is traced, and
/// the scores are saved as state format `version`.
pub fn fit_scores(dev: &[Example], config: &crate::Config, version: u8) -> Result<Option<Vec<u8>>, Error> {
    let ranked = rank(dev, &crate::generators(), config)?;
    Ok(Some(crate::state::save(version, &ranked.scores)?))
}

/// `id correct/total` per member, best first (for trace notes).
pub fn describe(scores: &[MemberScore]) -> String {
    ranking(scores)
        .iter()
        .filter_map(|id| scores.iter().find(|s| &s.model == id))
        .map(|s| {
            format!(
                "{} {}/{}",
                s.model,
                s.correct.iter().filter(|c| **c).count(),
                s.correct.len()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The members listed in config `key` (comma-separated ids of granted
/// members in `pool`, each once), or all of `pool` when the key is unset.
pub fn pick_list(cfg: &crate::Config, key: &str, pool: &[ModelInfo]) -> Result<Vec<ModelInfo>, Error> {
    let list = cfg.get(key).unwrap_or("").trim();
    if list.is_empty() {
        return Ok(pool.to_vec());
    }
    let mut out: Vec<ModelInfo> = Vec::new();
    for id in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let m = pool
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| crate::config::invalid(key, list, &format!("`{id}` is not a granted generative member")))?;
        if out.iter().any(|o| o.id == id) {
            return Err(crate::config::invalid(key, list, &format!("`{id}` is listed twice")));
        }
        out.push(m.clone());
    }
    Ok(out)
}

/// The index in `pool` of the member for one role, and why: config `key`
/// when set, else the best dev member from `fit` scores, else the first
/// member (operators list pools best first).
pub fn pick_one(
    cfg: &crate::Config,
    key: &str,
    pool: &[ModelInfo],
    scores: Option<&[MemberScore]>,
) -> Result<(usize, String), Error> {
    let wanted = cfg.get(key).unwrap_or("").trim();
    if !wanted.is_empty() {
        let i = pool
            .iter()
            .position(|m| m.id == wanted)
            .ok_or_else(|| crate::config::invalid(key, wanted, "not a granted generative member"))?;
        return Ok((i, "config".into()));
    }
    if let Some(scores) = scores {
        for id in ranking(scores) {
            if let Some(i) = pool.iter().position(|m| m.id == id) {
                return Ok((i, format!("fit ({})", describe(scores))));
            }
        }
    }
    if pool.is_empty() {
        return Err(Error::ModuleFailed("no generative member was granted".into()));
    }
    Ok((0, "pool order".into()))
}

/// The best member by a dev ranking when one exists and names a granted
/// member, else the first granted one (operators list pools best first).
pub fn best_member(ranking: Option<&[String]>, members: &[ModelInfo]) -> Result<ModelInfo, Error> {
    if let Some(r) = ranking {
        for id in r {
            if let Some(m) = members.iter().find(|m| &m.id == id) {
                return Ok(m.clone());
            }
        }
    }
    members
        .first()
        .cloned()
        .ok_or_else(|| Error::ModuleFailed("no generative member was granted".into()))
}

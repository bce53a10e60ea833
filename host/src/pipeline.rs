//! Pipelines: a collaboration system assembled from the narrow worlds
//! without writing a strategy.
//!
//! A pipeline is declared in TOML and runs four stages, each optional but
//! the answering one:
//!
//! ```toml
//! name = "route-judge-fuse"
//! description = "Embedding router, likelihood judge, fusing aggregator"
//! router = "embed-router"        # a `router` module: who answers, best first
//! max_members = 2                # how many of the routed members answer
//! members = ["*"]                # which members may answer at all
//! judge = "likelihood-judge"     # a `judge` module: one score per answer
//! aggregator = "fuse-aggregator" # an `aggregator` module: answers -> one
//! deadline_ms = 120000           # the whole pipeline's wall-clock limit
//! [params]                       # decoding defaults for the answering members
//! max_tokens = 64
//! [config]                       # hyperparameters handed to every stage
//! top_k = "2"
//! ```
//!
//! Without a router every eligible member answers; without a judge the
//! answers keep the router's order; without an aggregator the first
//! (best-judged) answer is the response. The answering calls are made by the
//! host, all members at once. Each stage module runs in its own sandbox under
//! its own manifest's grant, exactly as a strategy would; their provenance is
//! concatenated in stage order with the host's own answering calls between.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inference::{CallCtx, GenParams, ModelCard};
use crate::policy::World;
use crate::request::{ProvenanceEvent, RunOutcome, RunRequest, UsageReport};
use crate::sandbox::{Invocation, Module, StrategyRequest};
use crate::{Error, Runtime};

fn all_members() -> Vec<String> {
    vec!["*".to_string()]
}

/// A pipeline declaration. The serde type is the documentation of the TOML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The system's name.
    pub name: String,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// A `router` module (installed name or path).
    pub router: Option<String>,
    /// Members allowed to answer (`*` for all); the operator policy applies
    /// on top.
    #[serde(default = "all_members")]
    pub members: Vec<String>,
    /// At most this many routed members answer (default: all routed).
    pub max_members: Option<usize>,
    /// A `judge` module.
    pub judge: Option<String>,
    /// An `aggregator` module.
    pub aggregator: Option<String>,
    /// Wall-clock limit of the answering stage (default 120 s). Stage modules
    /// keep their own grants' deadlines.
    pub deadline_ms: Option<u64>,
    /// Decoding defaults for the answering members; the request's own
    /// parameters win where set.
    #[serde(default)]
    pub params: GenParams,
    /// Hyperparameters for every stage, under the request's own.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl PipelineConfig {
    /// Parses a declaration; the error names the problem.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let c: PipelineConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.max_members == Some(0) {
            return Err("max_members = 0 leaves nobody to answer: use 1 or more, or leave it out".into());
        }
        Ok(c)
    }

    /// Reads a declaration file; the error names the file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A loaded pipeline: its declaration and its stage modules, checked to be
/// of the right worlds.
pub struct Pipeline {
    /// The declaration.
    pub config: PipelineConfig,
    router: Option<Arc<Module>>,
    judge: Option<Arc<Module>>,
    aggregator: Option<Arc<Module>>,
}

fn merge(a: &mut UsageReport, b: &UsageReport) {
    a.host_calls += b.host_calls;
    a.prompt_tokens += b.prompt_tokens;
    a.completion_tokens += b.completion_tokens;
    a.fuel += b.fuel;
}

/// Takes a stage's result, keeping its provenance and usage either way.
fn stage<T>(inv: Invocation<T>, provenance: &mut Vec<ProvenanceEvent>, usage: &mut UsageReport) -> Result<T, Error> {
    provenance.extend(inv.provenance);
    merge(usage, &inv.usage);
    inv.result
}

fn step(role: &str, note: String) -> ProvenanceEvent {
    ProvenanceEvent::ModuleStep {
        model: None,
        role: role.to_string(),
        note,
    }
}

impl Runtime {
    /// Loads the stage modules of `config` and checks each is of the world
    /// its slot needs.
    pub fn load_pipeline(&self, config: PipelineConfig) -> Result<Pipeline, Error> {
        let load = |spec: &Option<String>, world: World, slot: &str| -> Result<Option<Arc<Module>>, Error> {
            let Some(spec) = spec else { return Ok(None) };
            let m = self.load_module(spec)?;
            if m.manifest.world != world {
                return Err(Error::config(format!(
                    "pipeline `{}`: `{slot} = \"{spec}\"` is a {:?} module; the {slot} slot needs a {world:?} module",
                    config.name, m.manifest.world
                )));
            }
            Ok(Some(m))
        };
        Ok(Pipeline {
            router: load(&config.router, World::Router, "router")?,
            judge: load(&config.judge, World::Judge, "judge")?,
            aggregator: load(&config.aggregator, World::Aggregator, "aggregator")?,
            config,
        })
    }

    fn stage_request(&self, module: &Module, p: &Pipeline, req: &RunRequest) -> StrategyRequest {
        let mut config = module.manifest.config.clone();
        config.extend(p.config.config.clone());
        config.extend(req.config.clone());
        StrategyRequest {
            input: req.input.clone(),
            params: req.params.clone(),
            config,
            state: None,
            cancel: None,
        }
    }

    /// Runs a pipeline on one request.
    pub async fn run_pipeline(&self, p: &Pipeline, mut req: RunRequest) -> Result<RunOutcome, Error> {
        let started = Instant::now();
        req.params.validate()?;
        // Request parameters win; the pipeline's fill the gaps.
        let d = &p.config.params;
        let params = &mut req.params;
        params.max_tokens = params.max_tokens.or(d.max_tokens);
        params.temperature = params.temperature.or(d.temperature);
        params.top_p = params.top_p.or(d.top_p);
        params.top_k = params.top_k.or(d.top_k);
        params.seed = params.seed.or(d.seed);
        if params.stop.is_empty() {
            params.stop = d.stop.clone();
        }
        let mut provenance = Vec::new();
        let mut usage = UsageReport::default();

        let allowed = |id: &str| p.config.members.iter().any(|m| m == "*" || m == id);
        let eligible: Vec<ModelCard> = self
            .cards()
            .into_iter()
            .filter(|c| c.capabilities.iter().any(|x| x == "generate"))
            .filter(|c| allowed(&c.id) && self.policy_allows(&c.id))
            .collect();
        if eligible.is_empty() {
            return Err(Error::config(format!(
                "pipeline `{}`: no generative member is both listed in `members` and allowed by the policy",
                p.config.name
            )));
        }

        // Stage 1: who answers.
        let mut chosen: Vec<String> = match &p.router {
            Some(router) => {
                let grant = Arc::new(self.policy().grant(&router.manifest, &self.member_ids()));
                let inv = self
                    .sandbox()
                    .run_router(
                        router,
                        self.models_arc(),
                        grant,
                        self.stage_request(router, p, &req),
                        eligible.clone(),
                    )
                    .await;
                let routed = stage(inv, &mut provenance, &mut usage)?;
                let mut seen = Vec::new();
                for id in routed {
                    if !eligible.iter().any(|c| c.id == id) {
                        return Err(Error::ModuleFailed {
                            message: format!(
                                "router `{}` named `{id}`, which is not one of the members it was offered",
                                router.manifest.name
                            ),
                        });
                    }
                    if !seen.contains(&id) {
                        seen.push(id);
                    }
                }
                if seen.is_empty() {
                    return Err(Error::ModuleFailed {
                        message: format!("router `{}` chose no member", router.manifest.name),
                    });
                }
                seen
            }
            None => eligible.iter().map(|c| c.id.clone()).collect(),
        };
        if let Some(k) = p.config.max_members {
            chosen.truncate(k);
        }
        provenance.push(step("pipeline", format!("answering: {}", chosen.join(", "))));

        // Stage 2: the chosen members answer, all at once.
        let deadline = Instant::now() + Duration::from_millis(p.config.deadline_ms.unwrap_or(120_000));
        let models = self.models_arc();
        let calls = chosen.iter().map(|id| {
            let fut = models.generate(
                CallCtx { deadline, requester: 0 },
                id,
                req.input.clone(),
                req.params.clone(),
            );
            async move {
                let t = Instant::now();
                let r = tokio::time::timeout_at(deadline.into(), fut).await;
                (r, t.elapsed())
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut candidates: Vec<(String, String)> = Vec::new();
        for (id, (r, took)) in chosen.iter().zip(results) {
            let (outcome, pt, ct) = match r {
                Ok(Ok(g)) => {
                    let u = (g.usage.prompt_tokens, g.usage.completion_tokens);
                    candidates.push((id.clone(), g.text));
                    ("ok".to_string(), u.0, u.1)
                }
                Ok(Err(e)) => (Error::from(e).kind().to_string(), 0, 0),
                Err(_) => ("deadline".to_string(), 0, 0),
            };
            usage.host_calls += 1;
            usage.prompt_tokens += pt as u64;
            usage.completion_tokens += ct as u64;
            provenance.push(ProvenanceEvent::HostCall {
                call: "generate".into(),
                model: id.clone(),
                prompt_tokens: pt,
                completion_tokens: ct,
                ms: took.as_millis() as u64,
                outcome,
            });
        }
        if candidates.is_empty() {
            return Err(Error::ModuleFailed {
                message: format!("pipeline `{}`: every answering member failed", p.config.name),
            });
        }

        // Stage 3: judge, then order best first (stable: ties keep the
        // router's order).
        let mut scores: Option<Vec<f64>> = None;
        if let Some(judge) = &p.judge {
            let grant = Arc::new(self.policy().grant(&judge.manifest, &self.member_ids()));
            let inv = self
                .sandbox()
                .run_judge(
                    judge,
                    self.models_arc(),
                    grant,
                    self.stage_request(judge, p, &req),
                    candidates.clone(),
                )
                .await;
            let s = stage(inv, &mut provenance, &mut usage)?;
            if s.len() != candidates.len() || s.iter().any(|x| !x.is_finite()) {
                return Err(Error::ModuleFailed {
                    message: format!(
                        "judge `{}` returned {} scores (finite: {}) for {} candidates",
                        judge.manifest.name,
                        s.len(),
                        s.iter().all(|x| x.is_finite()),
                        candidates.len()
                    ),
                });
            }
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            candidates = order.iter().map(|&i| candidates[i].clone()).collect();
            scores = Some(order.iter().map(|&i| s[i]).collect());
        }

        // Stage 4: one answer.
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "candidates".to_string(),
            candidates.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(","),
        );
        if let Some(s) = &scores {
            annotations.insert(
                "scores".to_string(),
                candidates
                    .iter()
                    .zip(s)
                    .map(|(c, x)| format!("{}={x:.3}", c.0))
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        let text = match &p.aggregator {
            Some(agg) => {
                let grant = Arc::new(self.policy().grant(&agg.manifest, &self.member_ids()));
                let inv = self
                    .sandbox()
                    .run_aggregator(
                        agg,
                        self.models_arc(),
                        grant,
                        self.stage_request(agg, p, &req),
                        candidates.clone(),
                    )
                    .await;
                let (text, more) = stage(inv, &mut provenance, &mut usage)?;
                annotations.extend(more);
                text
            }
            None => {
                provenance.push(step(
                    "pipeline",
                    format!("answer: {}'s (ranked first)", candidates[0].0),
                ));
                candidates[0].1.clone()
            }
        };
        usage.wall_ms = started.elapsed().as_millis() as u64;
        Ok(RunOutcome {
            text,
            annotations,
            provenance,
            usage,
        })
    }
}

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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inference::{CallCtx, Capability, GenParams, Generation, InferenceError, ModelCard};
use crate::policy::{Grant, World};
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

/// Why a pipeline declaration cannot be taken. Every cause is what the
/// operator wrote, or the file they named, so each becomes
/// [`Error::Config`] (see the `From` below); the text is the one the
/// declaration's writer needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineConfigError {
    /// The TOML does not parse, or does not fit [`PipelineConfig`] (an
    /// unknown key, a wrong type): the parser's own message, with its line
    /// and column.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// `max_members = 0`: nobody would answer.
    #[error("max_members = 0 leaves nobody to answer: use 1 or more, or leave it out")]
    NoMembers,
    /// The declaration file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The declaration file was read but is not a valid declaration.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<PipelineConfigError>,
    },
}

impl From<PipelineConfigError> for Error {
    /// A declaration that cannot be read or is not valid is its writer's to
    /// fix: configuration, never an internal fault.
    fn from(e: PipelineConfigError) -> Self {
        Error::config(e.to_string())
    }
}

impl PipelineConfig {
    /// Parses a declaration; the error names the problem.
    pub fn from_toml(text: &str) -> Result<Self, PipelineConfigError> {
        let c: PipelineConfig = toml::from_str(text)?;
        if c.max_members == Some(0) {
            return Err(PipelineConfigError::NoMembers);
        }
        Ok(c)
    }

    /// Reads a declaration file; the error names the file.
    pub fn from_file(path: &Path) -> Result<Self, PipelineConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| PipelineConfigError::Invalid {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
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

/// A member's id and its answer.
type Candidate = (String, String);

fn merge(a: &mut UsageReport, b: &UsageReport) {
    a.host_calls += b.host_calls;
    a.prompt_tokens += b.prompt_tokens;
    a.completion_tokens += b.completion_tokens;
    a.fuel += b.fuel;
}

fn step(role: &str, note: String) -> ProvenanceEvent {
    ProvenanceEvent::ModuleStep {
        model: None,
        role: role.to_string(),
        note,
    }
}

/// The pipeline's decoding defaults under the request's own: request
/// parameters win; the pipeline's fill the gaps.
fn fill_params(params: &mut GenParams, d: &GenParams) {
    params.max_tokens = params.max_tokens.or(d.max_tokens);
    params.temperature = params.temperature.or(d.temperature);
    params.top_p = params.top_p.or(d.top_p);
    params.top_k = params.top_k.or(d.top_k);
    params.seed = params.seed.or(d.seed);
    if params.stop.is_empty() {
        params.stop = d.stop.clone();
    }
}

/// The router's answer as the members to ask, best first: each must be one
/// of the members it was offered (a router naming another is a broken
/// module, not a request to widen the pool), a repeat keeps its first place,
/// and an empty choice is an error rather than a silent fall-back.
fn check_routed(router: &Module, routed: Vec<String>, eligible: &[ModelCard]) -> Result<Vec<String>, Error> {
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
    Ok(seen)
}

/// Refuses a judge's scores unless there is one finite score per candidate:
/// anything else cannot be ranked.
fn check_scores(judge: &Module, scores: &[f64], candidates: usize) -> Result<(), Error> {
    if scores.len() != candidates || scores.iter().any(|x| !x.is_finite()) {
        return Err(Error::ModuleFailed {
            message: format!(
                "judge `{}` returned {} scores (finite: {}) for {} candidates",
                judge.manifest.name,
                scores.len(),
                scores.iter().all(|x| x.is_finite()),
                candidates
            ),
        });
    }
    Ok(())
}

/// `candidates` ordered best first by `scores`, with the scores in the same
/// order. The sort is stable: ties keep the router's order.
fn rank(candidates: &[Candidate], scores: &[f64]) -> (Vec<Candidate>, Vec<f64>) {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    (
        order.iter().map(|&i| candidates[i].clone()).collect(),
        order.iter().map(|&i| scores[i]).collect(),
    )
}

/// The annotations every pipeline answer carries: the candidates in rank
/// order and, when they were judged, their scores.
fn ranking_annotations(candidates: &[Candidate], scores: Option<&[f64]>) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "candidates".to_string(),
        candidates.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(","),
    );
    if let Some(s) = scores {
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
    annotations
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

    /// The request a stage module sees: the user's input and parameters,
    /// with hyperparameters layered manifest, then pipeline, then request
    /// (the later wins).
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

    /// The members that may answer in `p`, in pool order: generative, listed
    /// in its `members` and allowed by the operator policy. None is a
    /// configuration error, found before any stage runs.
    fn pipeline_members(&self, p: &Pipeline) -> Result<Vec<ModelCard>, Error> {
        let allowed = |id: &str| p.config.members.iter().any(|m| m == "*" || m == id);
        let eligible: Vec<ModelCard> = self
            .cards()
            .into_iter()
            .filter(|c| c.can(Capability::Generate))
            .filter(|c| allowed(&c.id) && self.policy_allows(&c.id))
            .collect();
        if eligible.is_empty() {
            return Err(Error::config(format!(
                "pipeline `{}`: no generative member is both listed in `members` and allowed by the policy",
                p.config.name
            )));
        }
        Ok(eligible)
    }

    /// Runs a pipeline on one request.
    pub async fn run_pipeline(&self, p: &Pipeline, mut req: RunRequest) -> Result<RunOutcome, Error> {
        let started = Instant::now();
        req.params.validate()?;
        fill_params(&mut req.params, &p.config.params);
        let mut run = PipelineRun {
            rt: self,
            p,
            req: &req,
            provenance: Vec::new(),
            usage: UsageReport::default(),
            started,
        };
        let eligible = self.pipeline_members(p)?;
        // Stage 1: who answers.
        let chosen = run.route(eligible).await?;
        // Stage 2: the chosen members answer, all at once.
        let candidates = run.answer(&chosen).await?;
        // Stage 3: judge, then order best first (stable: ties keep the
        // router's order).
        let (candidates, scores) = run.judge(candidates).await?;
        // Stage 4: one answer.
        let mut annotations = ranking_annotations(&candidates, scores.as_deref());
        let text = run.aggregate(&candidates, &mut annotations).await?;
        let mut usage = run.usage;
        usage.wall_ms = started.elapsed().as_millis() as u64;
        // The members' answers are what could reach the final one (an
        // aggregator module's own text is its rewriting of them).
        let question = crate::attribution::input_text(&req.input);
        let attribution = self.attribute(&text, &question, &candidates);
        Ok(RunOutcome {
            text,
            annotations,
            provenance: run.provenance,
            usage,
            attribution,
        })
    }
}

/// One pipeline run in progress: what every stage reads (the runtime, the
/// pipeline, the request with its parameters filled in) and what every stage
/// adds to (the provenance, in stage order, and the usage). Held together so
/// that each stage is a method rather than a function of six arguments.
struct PipelineRun<'a> {
    rt: &'a Runtime,
    p: &'a Pipeline,
    req: &'a RunRequest,
    provenance: Vec<ProvenanceEvent>,
    usage: UsageReport,
    /// When the pipeline began: every host call's `start_ms` counts from it.
    started: Instant,
}

impl PipelineRun<'_> {
    /// Takes a stage's result, keeping its provenance and usage either way.
    /// The stage's host calls are timed from the stage's own start; they
    /// are moved onto the pipeline's clock (the stage ended just now and
    /// took its `wall_ms`).
    fn stage<T>(&mut self, inv: Invocation<T>) -> Result<T, Error> {
        let offset = (self.started.elapsed().as_millis() as u64).saturating_sub(inv.usage.wall_ms);
        self.provenance.extend(inv.provenance.into_iter().map(|mut e| {
            if let ProvenanceEvent::HostCall { start_ms, .. } = &mut e {
                *start_ms += offset;
            }
            e
        }));
        merge(&mut self.usage, &inv.usage);
        inv.result
    }

    /// The grant a stage module runs under: its own manifest's, over the
    /// whole pool, exactly as a strategy's would be.
    fn grant(&self, module: &Module) -> Arc<Grant> {
        Arc::new(self.rt.policy().grant(&module.manifest, &self.rt.member_ids()))
    }

    /// Stage 1, who answers: the router's choice (see [`check_routed`]) or,
    /// without a router, every eligible member; at most `max_members` of
    /// them. The choice is recorded in the provenance.
    async fn route(&mut self, eligible: Vec<ModelCard>) -> Result<Vec<String>, Error> {
        let (rt, p) = (self.rt, self.p);
        let mut chosen: Vec<String> = match &p.router {
            Some(router) => {
                let grant = self.grant(router);
                let inv = rt
                    .sandbox()
                    .run_router(
                        router,
                        rt.models_arc(),
                        grant,
                        rt.stage_request(router, p, self.req),
                        eligible.clone(),
                    )
                    .await;
                let routed = self.stage(inv)?;
                check_routed(router, routed, &eligible)?
            }
            None => eligible.iter().map(|c| c.id.clone()).collect(),
        };
        if let Some(k) = p.config.max_members {
            chosen.truncate(k);
        }
        self.provenance
            .push(step("pipeline", format!("answering: {}", chosen.join(", "))));
        Ok(chosen)
    }

    /// Stage 2: the `chosen` members answer, all at once, by the host and
    /// under the pipeline's deadline. Every call is recorded whether it
    /// answered or not (see [`PipelineRun::record_answer`]); the answers keep
    /// `chosen`'s order, and only none at all is an error.
    async fn answer(&mut self, chosen: &[String]) -> Result<Vec<Candidate>, Error> {
        let req = self.req;
        let deadline = Instant::now() + Duration::from_millis(self.p.config.deadline_ms.unwrap_or(120_000));
        let models = self.rt.models_arc();
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
                (r, t, t.elapsed())
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut candidates: Vec<Candidate> = Vec::new();
        for (id, (r, began, took)) in chosen.iter().zip(results) {
            let start_ms = began.saturating_duration_since(self.started).as_millis() as u64;
            if let Some(text) = self.record_answer(id, r, start_ms, took) {
                candidates.push((id.clone(), text));
            }
        }
        if candidates.is_empty() {
            return Err(Error::ModuleFailed {
                message: format!("pipeline `{}`: every answering member failed", self.p.config.name),
            });
        }
        Ok(candidates)
    }

    /// Records one answering call of member `id`: a host call in the
    /// provenance with its outcome (`ok`, the error's kind, or `deadline`)
    /// and its tokens in the usage. Returns the answer if there was one.
    fn record_answer(
        &mut self,
        id: &str,
        r: Result<Result<Generation, InferenceError>, tokio::time::error::Elapsed>,
        start_ms: u64,
        took: Duration,
    ) -> Option<String> {
        let (answer, outcome, pt, ct, kt) = match r {
            Ok(Ok(g)) => {
                let u = g.usage;
                (
                    Some(g.text),
                    "ok".to_string(),
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cached_tokens,
                )
            }
            Ok(Err(e)) => (None, Error::from(e).kind().to_string(), 0, 0, 0),
            Err(_) => (None, "deadline".to_string(), 0, 0, 0),
        };
        self.usage.host_calls += 1;
        self.usage.prompt_tokens += pt as u64;
        self.usage.completion_tokens += ct as u64;
        self.usage.cached_tokens += kt as u64;
        self.provenance.push(ProvenanceEvent::HostCall {
            call: "generate".into(),
            model: id.to_string(),
            prompt_tokens: pt,
            completion_tokens: ct,
            cached_tokens: kt,
            start_ms,
            ms: took.as_millis() as u64,
            outcome,
        });
        answer
    }

    /// Stage 3: the judge scores every candidate and they are ordered best
    /// first (see [`rank`]), with the scores in that order. Without a judge
    /// the candidates keep the router's order and have no scores.
    async fn judge(&mut self, candidates: Vec<Candidate>) -> Result<(Vec<Candidate>, Option<Vec<f64>>), Error> {
        let (rt, p) = (self.rt, self.p);
        let Some(judge) = &p.judge else {
            return Ok((candidates, None));
        };
        let grant = self.grant(judge);
        let inv = rt
            .sandbox()
            .run_judge(
                judge,
                rt.models_arc(),
                grant,
                rt.stage_request(judge, p, self.req),
                candidates.clone(),
            )
            .await;
        let s = self.stage(inv)?;
        check_scores(judge, &s, candidates.len())?;
        let (ranked, scores) = rank(&candidates, &s);
        Ok((ranked, Some(scores)))
    }

    /// Stage 4, one answer: the aggregator's, whose own annotations join
    /// `annotations`, or without an aggregator the first-ranked candidate's
    /// (`candidates` is never empty: stage 2 refuses that).
    async fn aggregate(
        &mut self,
        candidates: &[Candidate],
        annotations: &mut BTreeMap<String, String>,
    ) -> Result<String, Error> {
        let (rt, p) = (self.rt, self.p);
        let Some(agg) = &p.aggregator else {
            self.provenance.push(step(
                "pipeline",
                format!("answer: {}'s (ranked first)", candidates[0].0),
            ));
            return Ok(candidates[0].1.clone());
        };
        let grant = self.grant(agg);
        let inv = rt
            .sandbox()
            .run_aggregator(
                agg,
                rt.models_arc(),
                grant,
                rt.stage_request(agg, p, self.req),
                candidates.to_vec(),
            )
            .await;
        let (text, more) = self.stage(inv)?;
        annotations.extend(more);
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declaration_errors_name_the_problem_and_the_file() {
        let err = PipelineConfig::from_toml("name = \"x\"\nmax_members = 0\n").unwrap_err();
        assert!(matches!(err, PipelineConfigError::NoMembers));
        assert_eq!(
            err.to_string(),
            "max_members = 0 leaves nobody to answer: use 1 or more, or leave it out"
        );
        let err = PipelineConfig::from_toml("name = \"x\"\nrouterr = \"a\"\n").unwrap_err();
        let toml_err = toml::from_str::<PipelineConfig>("name = \"x\"\nrouterr = \"a\"\n").unwrap_err();
        assert_eq!(err.to_string(), toml_err.to_string());
        assert!(err.to_string().contains("routerr"), "{err}");

        let dir = std::env::temp_dir().join(format!("tessera-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.toml");
        let err = PipelineConfig::from_file(&missing).unwrap_err();
        let io = std::fs::read_to_string(&missing).unwrap_err();
        assert_eq!(err.to_string(), format!("{}: {io}", missing.display()));
        assert!(std::error::Error::source(&err).is_some());
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "name = \"x\"\nmax_members = 0\n").unwrap();
        let err = PipelineConfig::from_file(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: max_members = 0 leaves nobody to answer: use 1 or more, or leave it out",
                bad.display()
            )
        );
        assert_eq!(
            Error::from(err),
            Error::from(PipelineConfig::from_file(&bad).unwrap_err())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

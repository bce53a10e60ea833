//! `tessera eval`: does the composed system beat its contributors?
//!
//! For every task the harness answers the dev and test items with every
//! single generative member (greedy), picks the **best single member** on
//! dev, takes the member with the most parameters as the **monolith**, then
//! fits each strategy on the dev items and runs it on the test items. It
//! reports accuracy with a 95% bootstrap interval, macro averages per domain
//! and overall, **emergent solves** (test items every single member gets
//! wrong and the system gets right) and cost (host calls, tokens, wall
//! time). On multiple choice it also reports **letter bias**: chance, the
//! best constant answer on the test labels, and each system's most named
//! letter with its share of the items, because small models often answer
//! one letter whatever the question and score that letter's frequency among
//! the golds. Every answer goes through [`cache::Cache`], so a re-run is instant
//! and an interrupted run resumes.
//!
//! The harness is a face over [`Runtime`]: members are asked through
//! [`Runtime::models`], strategies through [`Runtime::fit`] and
//! [`Runtime::run`], exactly as the CLI and a server would.

pub mod cache;
pub mod metrics;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::inference::{CallCtx, Capability, GenParams, Input, Message, ModelCard};
use crate::tasks::{Item, Metric, Task};
use crate::{Error, RunRequest, Runtime};

use cache::Cache;
use tessera_sdk::mcq;

/// How single members answer multiple-choice items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum McqMode {
    /// Generate a reply and parse the letter (what strategies do too).
    Generate,
    /// Pick the option letter with the highest log-likelihood (`score`).
    /// Cheap, but small models mostly reveal a preferred letter.
    Loglik,
    /// Pick the option whose *text* is most likely after the question, per
    /// byte (`score`; see [`tessera_sdk::mcq`]): no letter bias, the usual
    /// way benchmark suites grade small models.
    Option,
}

/// What to evaluate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Task names (see [`crate::tasks::TASKS`]).
    pub tasks: Vec<String>,
    /// Strategy modules (installed names or paths), each optionally
    /// `@label`ed to run one module under several settings (see
    /// [`Strategy`]).
    pub strategies: Vec<String>,
    /// Test items per task (default: the whole test split).
    pub limit: Option<usize>,
    /// Test items for particular tasks, overriding `limit` (an expensive
    /// task can run fewer items than the rest in the same report).
    #[serde(default)]
    pub task_limits: BTreeMap<String, usize>,
    /// Test items left out at the start of every task's test split, before
    /// `limit` applies: a later run can test on items that no choice of an
    /// earlier run saw (`--skip 400 --limit 200` tests items 401-600)
    /// without paying for the earlier items again.
    #[serde(default)]
    pub skip: usize,
    /// `skip` for particular tasks, overriding it (a task with a shorter
    /// test split runs out of items sooner).
    #[serde(default)]
    pub task_skips: BTreeMap<String, usize>,
    /// Dev items per task used to pick the best member and to fit strategies.
    pub dev_limit: usize,
    /// How single members answer multiple choice.
    pub mcq: McqMode,
    /// New tokens per answer; default by metric (choice 16, F1 32, exact
    /// match 256).
    pub max_tokens: Option<u32>,
    /// Seed handed to every strategy request.
    pub seed: u64,
    /// Items in flight at once per system. The default is a member's batch
    /// capacity ([`crate::pool::DEFAULT_MAX_BATCH`]): a strategy item fans
    /// out to every member, so this many items in flight keep each member's
    /// running batch full (sequences join it at every decode step).
    pub concurrency: usize,
    /// Hyperparameters (`key=value`): a plain key for every strategy,
    /// `LABEL.key` for the strategy of that label (see [`Strategy`]).
    pub strategy_config: BTreeMap<String, String>,
    /// Also run every strategy over sub-pools of size 1..N.
    pub scaling: bool,
    /// Sub-pools drawn per size (all of them when there are fewer).
    pub subsets_per_size: usize,
    /// Also run every strategy over equal-size sub-pools that differ in how
    /// many architectures (base lineages) they draw on, `subsets_per_size`
    /// of each level per size.
    #[serde(default)]
    pub diversity: bool,
    /// A member held out of the pool as the monolith: it answers alone as
    /// `monolith`, and neither the strategies, nor `best-single`, nor the
    /// emergent-solve count see it. `None`: the pool's member with the most
    /// parameters is the monolith and stays in the pool.
    #[serde(default)]
    pub monolith: Option<String>,
    /// Folds of the cross-validation that picks `dev-chosen` (see
    /// [`Selection`]); 0 (the default) or 1: no `dev-chosen` system.
    #[serde(default)]
    pub select_folds: usize,
    /// Draw progress bars.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            tasks: vec!["arc-easy".into()],
            strategies: Vec::new(),
            limit: None,
            task_limits: BTreeMap::new(),
            skip: 0,
            task_skips: BTreeMap::new(),
            dev_limit: 20,
            mcq: McqMode::Generate,
            max_tokens: None,
            seed: 0,
            concurrency: crate::pool::DEFAULT_MAX_BATCH,
            strategy_config: BTreeMap::new(),
            scaling: false,
            subsets_per_size: 3,
            diversity: false,
            monolith: None,
            select_folds: 0,
            progress: false,
        }
    }
}

/// One item's outcome for one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    /// The item's id.
    pub item: String,
    /// Its score in `[0, 1]`.
    pub score: f64,
    /// The reply (cut to 2,000 characters).
    pub text: String,
    /// Host calls spent (1 for a single member).
    pub host_calls: u32,
    /// Prompt tokens (generate) and tokens scored.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Wall time when it was computed (a cached re-run keeps the original).
    pub wall_ms: u64,
    /// Why the system failed on this item, if it did (scored 0).
    pub error: Option<String>,
}

/// One system on one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemResult {
    /// `member:<id>`, `best-single`, `monolith` or `strategy:<name>`.
    pub system: String,
    /// `member`, `best-single`, `monolith` or `strategy`.
    pub kind: String,
    /// The member behind `best-single` / `monolith`.
    pub member: Option<String>,
    /// The task.
    pub task: String,
    /// Mean test score.
    pub accuracy: f64,
    /// 95% bootstrap interval of the accuracy.
    pub ci95: (f64, f64),
    /// Test items.
    pub n: usize,
    /// Mean dev score (single members only).
    pub dev_accuracy: Option<f64>,
    /// Share of test items that every single member gets wrong and this
    /// system gets right (strategies only).
    pub emergent: Option<f64>,
    /// Items every single member gets wrong (the emergent denominator is n).
    pub all_fail: Option<usize>,
    /// Totals over the test items.
    pub host_calls: u64,
    /// Prompt plus generated tokens over the test items.
    pub tokens: u64,
    /// Wall time over the test items (sum of per-item times).
    pub wall_ms: u64,
    /// Items that ended in an error.
    pub errors: usize,
    /// Why the strategy's `fit` failed, when it did: it then ran on its
    /// defaults (or refused, for methods that need a fit), and the report
    /// says so instead of showing an unexplained score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit_error: Option<String>,
    /// Multiple choice only: the option letter this system named most often
    /// and on what share of the test items. A share near 1 means the answer
    /// sheet is one letter, so the accuracy measures that letter's frequency
    /// among the golds (compare the task's `always`), not knowledge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_pick: Option<LetterShare>,
    /// Strategies only: the paired difference from `best-single` on this
    /// task's test items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_best: Option<metrics::Delta>,
    /// Strategies only: the paired difference from the monolith.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_monolith: Option<metrics::Delta>,
    /// `dev-chosen` only: which system it is on this task, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// Per-item outcomes.
    pub items: Vec<ItemResult>,
    /// Single members only: the per-item dev scores behind `dev_accuracy`,
    /// which the cross-validation of `dev-chosen` re-splits. Not part of
    /// the report.
    #[serde(skip)]
    pub dev_scores: Vec<f64>,
}

/// How `dev-chosen` picked its system on one task.
///
/// A report with several strategies (or variants of one) invites choosing
/// the one with the best *test* score, and that choice flatters it: on the
/// calibrated-fusion runs a variant chosen so led the best member by +2.6
/// points on its own items and by -0.5 on items no choice saw. The
/// `dev-chosen` system makes the choice a deployment could make: per task,
/// among `best-single` and every strategy, the one whose accuracy on dev
/// items it was not fitted on is highest. Each candidate is scored by
/// K-fold cross-validation on the dev split (a strategy is fitted on K-1
/// folds and answers the held-out one; `best-single` picks its member on
/// K-1 folds), so a strategy's fit cannot flatter its own dev score. Ties
/// go to `best-single`, the cheaper system. The chosen system then answers
/// the test items as fitted on the whole dev split, so its test score is
/// exactly that system's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    /// The folds.
    pub folds: usize,
    /// The chosen candidate's system (`best-single` or `strategy:<name>`).
    pub chosen: String,
    /// Every candidate with its cross-validated dev accuracy, in the order
    /// they were considered (`best-single` first).
    pub candidates: Vec<(String, f64)>,
}

/// A strategy's paired differences on the macro average (the report's
/// `overall`: tasks averaged within a domain, then domains).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    /// Minus `best-single` (the dev-chosen best member, per task).
    pub vs_best: Option<metrics::Delta>,
    /// Minus the monolith.
    pub vs_monolith: Option<metrics::Delta>,
}

/// One strategy on one sub-pool of one task (`--scaling`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingPoint {
    /// `strategy:<name>`.
    pub system: String,
    /// The task.
    pub task: String,
    /// The sub-pool.
    pub members: Vec<String>,
    /// Distinct architectures in the sub-pool (each one base lineage when
    /// contributors fine-tune the packaged bases): the diversity index of
    /// `--diversity` comparisons at equal size.
    pub diversity: usize,
    /// The strategy's test accuracy on this sub-pool.
    pub accuracy: f64,
    /// Test accuracy of the sub-pool's best member on dev.
    pub best_single: f64,
}

/// A task as evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSummary {
    /// Name.
    pub name: String,
    /// Domain.
    pub domain: String,
    /// Metric.
    pub metric: Metric,
    /// Dev items used.
    pub dev: usize,
    /// Test items used.
    pub test: usize,
    /// Multiple choice only: the accuracy of answering uniformly at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chance: Option<f64>,
    /// Multiple choice only: the best constant answer on the test items and
    /// its accuracy. A reference read off the labels, not a system: a member
    /// or strategy that always names one letter scores at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always: Option<LetterShare>,
}

/// An option letter and a share of a task's test items: the letter a system
/// names most often ([`SystemResult::top_pick`]) or the best constant answer
/// ([`TaskSummary::always`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LetterShare {
    /// The option's letter (`A` for the first).
    pub letter: String,
    /// Its share of the test items, in `[0, 1]`.
    pub share: f64,
}

impl LetterShare {
    fn new((position, share): (usize, f64)) -> Self {
        LetterShare {
            letter: crate::tasks::letter(position).to_string(),
            share,
        }
    }
}

/// The whole run, as written to `report.json` (schema `tessera-eval/1`).
/// It reads back too: `tessera eval --from-report` renders `report.md` and
/// the plots again from it without running anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Schema tag; bumped on incompatible changes.
    pub schema: String,
    /// The command line that produced the run (the report's "reproduce
    /// with"); `None` in reports written before it was recorded.
    #[serde(default)]
    pub command: Option<String>,
    /// What was asked.
    pub config: EvalConfig,
    /// The pool's members.
    pub pool: Vec<ModelCard>,
    /// The tasks.
    pub tasks: Vec<TaskSummary>,
    /// Every system on every task.
    pub results: Vec<SystemResult>,
    /// Macro averages: system -> domain -> mean accuracy over its tasks,
    /// plus the `overall` mean over domains.
    pub macro_avg: BTreeMap<String, BTreeMap<String, f64>>,
    /// Each strategy's paired bootstrap differences on the macro average.
    #[serde(default)]
    pub paired: BTreeMap<String, Paired>,
    /// `--scaling`: each strategy over sub-pools of every size.
    pub scaling: Vec<ScalingPoint>,
    /// `--diversity`: each strategy over sub-pools of each size grouped by
    /// diversity level, for the sizes where two or more levels occur.
    #[serde(default)]
    pub diversity: Vec<ScalingPoint>,
    /// Wall time of the whole run.
    pub wall_s: f64,
}

fn default_max_tokens(metric: Metric) -> u32 {
    match metric {
        Metric::Choice => 16,
        Metric::TokenF1 => 32,
        Metric::ExactMatch => 256,
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(2000) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn bar(mp: &MultiProgress, show: bool, len: usize, msg: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = mp.add(ProgressBar::new(len as u64));
    b.set_style(
        ProgressStyle::with_template("{msg:44} [{bar:25}] {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

/// What a member scores for a multiple-choice item under `mode`: the
/// prompt, the continuations, and whether each continuation's log-likelihood
/// is divided by its option's length in bytes. `None` when the item is
/// answered by generation.
fn scoring(item: &Item, mode: McqMode) -> Option<(Input, Vec<String>, bool)> {
    if item.metric != Metric::Choice {
        return None;
    }
    match mode {
        McqMode::Generate => None,
        // The question and options, then `Answer:`, continued by each letter.
        McqMode::Loglik => {
            let mut s = format!("{}\n", item.question.trim());
            for (i, c) in item.choices.iter().enumerate() {
                s.push_str(&format!("{}) {}\n", crate::tasks::letter(i), c.trim()));
            }
            s.push_str("Answer:");
            let conts = (0..item.choices.len())
                .map(|i| format!(" {}", crate::tasks::letter(i)))
                .collect();
            Some((Input::Prompt(s), conts, false))
        }
        McqMode::Option => Some((
            Input::Prompt(mcq::prompt(&item.question)),
            mcq::continuations(&item.choices),
            true,
        )),
    }
}

/// One single member answering one item (cached).
async fn member_answer(rt: &Runtime, cache: &Cache, member: &str, item: &Item, cfg: &EvalConfig) -> ItemResult {
    let max_tokens = cfg.max_tokens.unwrap_or(default_max_tokens(item.metric));
    let scored = scoring(item, cfg.mcq);
    let loglik = scored.is_some();
    let prompt = scored.as_ref().map_or_else(|| item.input(), |(p, _, _)| p.clone());
    // The option mode's per-byte pick is part of the key, so its answers
    // never mix with the letter mode's (same prompt shape, other picks).
    let per_byte = scored.as_ref().is_some_and(|s| s.2);
    // The member's weight digest is part of the key: a specialist retrained
    // under the same id is asked again.
    let pinned = rt.fingerprint(member);
    let key = if per_byte {
        cache::key(&(
            "member/3",
            member,
            pinned,
            &prompt,
            &scored.as_ref().map(|s| &s.1),
            "per-byte",
        ))
    } else {
        cache::key(&("member/3", member, pinned, &prompt, max_tokens, loglik))
    };
    if let Some(mut r) = cache.get::<ItemResult>(&key) {
        // Grading may have improved since the answer was cached, and the
        // key holds no gold answer (two items with the same question and
        // options may differ in it): always grade again. A likelihood pick
        // is stored as its letter, which the grader reads back as that
        // option.
        r.score = metrics::grade(item, &r.text);
        r.item = item.id.clone();
        return r;
    }
    let started = Instant::now();
    let ctx = CallCtx {
        deadline: Instant::now() + Duration::from_secs(600),
        requester: 0,
    };
    let models = rt.models();
    let r = if let Some((_, conts, per_byte)) = scored {
        match models.score(ctx, member, prompt, conts).await {
            Ok(scored) => {
                let values: Vec<f64> = scored
                    .iter()
                    .zip(&item.choices)
                    .map(|(s, c)| {
                        let lp = s.logprob;
                        if per_byte {
                            mcq::per_byte(lp, c)
                        } else {
                            lp
                        }
                    })
                    .collect();
                let pick = mcq::pick(&values).unwrap_or(0);
                ItemResult {
                    item: item.id.clone(),
                    score: metrics::grade_pick(item, pick),
                    text: crate::tasks::letter(pick).to_string(),
                    host_calls: 1,
                    // The prompt once, then every option: what a system
                    // scoring the same options is charged.
                    prompt_tokens: scored.first().map_or(0, |s| u64::from(s.prompt_tokens))
                        + scored.iter().map(|s| u64::from(s.tokens)).sum::<u64>(),
                    completion_tokens: 0,
                    wall_ms: started.elapsed().as_millis() as u64,
                    error: None,
                }
            }
            Err(e) => failed(item, e.to_string(), started),
        }
    } else {
        let params = GenParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        };
        match models.generate(ctx, member, prompt, params).await {
            Ok(g) => ItemResult {
                item: item.id.clone(),
                score: metrics::grade(item, &g.text),
                text: cut(&g.text),
                host_calls: 1,
                prompt_tokens: u64::from(g.usage.prompt_tokens),
                completion_tokens: u64::from(g.usage.completion_tokens),
                wall_ms: started.elapsed().as_millis() as u64,
                error: None,
            },
            Err(e) => failed(item, e.to_string(), started),
        }
    };
    if r.error.is_none() {
        if let Err(e) = cache.put(&key, &r) {
            tracing::warn!("{e}");
        }
    }
    r
}

fn failed(item: &Item, error: String, started: Instant) -> ItemResult {
    ItemResult {
        item: item.id.clone(),
        score: 0.0,
        text: String::new(),
        host_calls: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
        wall_ms: started.elapsed().as_millis() as u64,
        error: Some(error),
    }
}

/// The single member with the best dev score; ties go to the one listed
/// first in the pool. The report's `best-single` and every sub-pool's best
/// single in `--scaling` / `--diversity` use this one rule, so the full
/// pool's sub-pool point agrees with the report.
fn best_on_dev<'a>(singles: impl IntoIterator<Item = &'a SystemResult>) -> Option<&'a SystemResult> {
    let singles: Vec<&SystemResult> = singles.into_iter().collect();
    let dev: Vec<f64> = singles.iter().map(|s| s.dev_accuracy.unwrap_or(0.0)).collect();
    singles.get(first_best(&dev)).copied()
}

fn summarize(
    system: String,
    kind: &str,
    member: Option<String>,
    task: &str,
    items: Vec<ItemResult>,
    seed: u64,
) -> SystemResult {
    let scores: Vec<f64> = items.iter().map(|r| r.score).collect();
    SystemResult {
        system,
        kind: kind.to_string(),
        member,
        task: task.to_string(),
        accuracy: metrics::mean(&scores),
        ci95: metrics::bootstrap_ci(&scores, 1000, seed),
        n: items.len(),
        dev_accuracy: None,
        emergent: None,
        all_fail: None,
        host_calls: items.iter().map(|r| u64::from(r.host_calls)).sum(),
        tokens: items.iter().map(|r| r.prompt_tokens + r.completion_tokens).sum(),
        wall_ms: items.iter().map(|r| r.wall_ms).sum(),
        errors: items.iter().filter(|r| r.error.is_some()).count(),
        fit_error: None,
        top_pick: None,
        vs_best: None,
        vs_monolith: None,
        selection: None,
        items,
        dev_scores: Vec::new(),
    }
}

/// Runs the evaluation. Errors are about the set-up (unknown task, missing
/// data or module); a system failing on an item scores 0 there and is
/// counted in `errors`.
pub async fn run(rt: &Runtime, config: EvalConfig, cache: &Cache) -> Result<Report, Error> {
    let started = Instant::now();
    let mut members = generative_members(rt)?;
    let (monolith, held_out, strategy_members) = match &config.monolith {
        Some(id) => {
            let ids: Vec<String> = members.iter().map(|c| c.id.clone()).collect();
            let at = ids.iter().position(|m| m == id).ok_or_else(|| {
                Error::config(format!(
                    "--monolith `{id}` is not a generative member of the pool ({}): name one of them, \
                     or fetch the larger pool (`tessera pool fetch --pool large`) and evaluate with `--pool large`",
                    ids.join(", ")
                ))
            })?;
            let held = members.remove(at);
            if members.is_empty() {
                return Err(Error::config(format!(
                    "--monolith `{id}` is the pool's only generative member: nothing would be left to compose"
                )));
            }
            let rest: Vec<String> = rt.cards().into_iter().map(|c| c.id).filter(|m| m != id).collect();
            (id.clone(), Some(held), Some(rest))
        }
        None => (monolith(&members), None, None),
    };
    let strategies = load_strategies(rt, &config.strategies, &config.strategy_config)?;
    let tasks = load_tasks(rt, &config.tasks)?;
    let eval = Evaluation {
        rt,
        cache,
        cfg: &config,
        mp: MultiProgress::new(),
        members,
        monolith,
        held_out,
        strategy_members,
        strategies,
    };
    let mut out = Outcomes::default();
    for task in &tasks {
        eval.task(task, &mut out).await?;
    }
    let macro_avg = macro_averages(&out.results, &out.summaries);
    let paired = paired_macro(&out.results, &out.summaries, config.seed);
    Ok(Report {
        schema: "tessera-eval/1".into(),
        command: None,
        config: config.clone(),
        pool: rt.cards(),
        tasks: out.summaries,
        results: out.results,
        macro_avg,
        paired,
        scaling: out.scaling,
        diversity: out.diversity,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The pool's generative members, in pool order: the single systems every
/// strategy is compared with. None is a set-up error.
fn generative_members(rt: &Runtime) -> Result<Vec<ModelCard>, Error> {
    let members: Vec<ModelCard> = rt.cards().into_iter().filter(|c| c.can(Capability::Generate)).collect();
    if members.is_empty() {
        return Err(Error::config(
            "no generative member loaded: run `make setup` to fetch the default pool",
        ));
    }
    Ok(members)
}

/// The monolith: the member with the most parameters (the last of equals).
fn monolith(members: &[ModelCard]) -> String {
    members
        .iter()
        .max_by_key(|c| c.parameters)
        .map(|c| c.id.clone())
        .unwrap_or_default()
}

/// One strategy of an evaluation: a module under the name its systems carry
/// in the report, with the settings it runs under.
///
/// One module may appear several times under different settings (a
/// *variant*: `--strategies option-fusion,option-fusion@cal --set
/// cal.calibrate=fit`), so that a report compares them on the same items,
/// paired, instead of one report per setting compared by hand afterwards.
pub struct Strategy {
    /// The module.
    pub module: Arc<crate::sandbox::Module>,
    /// `module@label` for a labelled variant, else the module's name: the
    /// report's system is `strategy:<name>`.
    pub name: String,
    /// The settings handed to `fit` and every request: the shared `--set`
    /// keys with this strategy's own (`LABEL.KEY`) over them.
    pub config: BTreeMap<String, String>,
}

/// Splits a `--strategies` entry into the module spec and its `@label`.
/// Only a suffix that is a label (letters, digits, `-`, `_`) is one, so that
/// a path with an `@` in a folder name still loads.
fn split_label(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once('@') {
        Some((m, l))
            if !m.is_empty()
                && !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            (m, Some(l))
        }
        _ => (spec, None),
    }
}

/// Each strategy's settings: every key of `shared` without a scope applies
/// to all; `SCOPE.KEY` applies only to the strategy whose scope (its label,
/// or the module's name when it has none) is `SCOPE`, over a shared `KEY`.
/// A scope that names no strategy is refused rather than silently dropped.
fn scoped_configs(scopes: &[&str], shared: &BTreeMap<String, String>) -> Result<Vec<BTreeMap<String, String>>, Error> {
    let mut out: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); scopes.len()];
    let mut scoped: Vec<(usize, &str, &str)> = Vec::new();
    for (k, v) in shared {
        match k.split_once('.') {
            Some((scope, key)) => {
                let Some(i) = scopes.iter().position(|s| *s == scope) else {
                    return Err(Error::config(format!(
                        "--set {k}={v}: `{scope}` names no strategy of this run ({}); a key for one \
                         strategy is LABEL.KEY, where LABEL is its @label or, without one, its module's name",
                        scopes.join(", ")
                    )));
                };
                scoped.push((i, key, v));
            }
            None => {
                for c in &mut out {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
    }
    for (i, k, v) in scoped {
        out[i].insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Loads the strategy modules named by `--strategies`, refusing any module
/// of another world and two strategies under one name, and gives each its
/// settings (see [`scoped_configs`]).
fn load_strategies(rt: &Runtime, specs: &[String], shared: &BTreeMap<String, String>) -> Result<Vec<Strategy>, Error> {
    let mut loaded = Vec::new();
    for spec in specs {
        let (path, label) = split_label(spec);
        let m = rt.load_module(path)?;
        // A router, judge or aggregator is one stage of a pipeline, not
        // a whole system: refuse it before any work rather than report
        // it as a strategy that failed every item.
        if m.manifest.world != crate::policy::World::Strategy {
            return Err(Error::config(format!(
                "`{path}` is a {:?} module, not a strategy: --strategies takes strategy modules; \
                 use it as a stage of a pipeline (`tessera run --pipeline`) instead",
                m.manifest.world
            )));
        }
        let (name, scope) = match label {
            Some(l) => (format!("{}@{l}", m.manifest.name), l.to_string()),
            None => (m.manifest.name.clone(), m.manifest.name.clone()),
        };
        if loaded.iter().any(|(n, _, _): &(String, String, _)| *n == name) {
            return Err(Error::config(format!(
                "--strategies names `{name}` twice: give each run of one module its own label \
                 (`{path}@LABEL`) and its settings with --set LABEL.KEY=VALUE"
            )));
        }
        loaded.push((name, scope, m));
    }
    let scopes: Vec<&str> = loaded.iter().map(|(_, s, _)| s.as_str()).collect();
    let configs = scoped_configs(&scopes, shared)?;
    Ok(loaded
        .into_iter()
        .zip(configs)
        .map(|((name, _, module), config)| Strategy { module, name, config })
        .collect())
}

/// Loads every task named, with its data; a task that cannot be loaded is a
/// set-up error.
fn load_tasks(rt: &Runtime, names: &[String]) -> Result<Vec<Task>, Error> {
    names
        .iter()
        .map(|t| Task::load(rt.paths(), t).map_err(|e| Error::config(e.to_string())))
        .collect()
}

/// The dev items (at most `dev_limit`) and the test items (after the
/// task's own skip, else `skip`; at most the task's own limit, else
/// `limit`, else all) of `task`.
fn task_items(task: &Task, cfg: &EvalConfig) -> (Vec<Item>, Vec<Item>) {
    let dev: Vec<Item> = task.dev().iter().take(cfg.dev_limit).cloned().collect();
    let test: Vec<Item> = task
        .test()
        .iter()
        .skip(cfg.task_skips.get(task.info.name).copied().unwrap_or(cfg.skip))
        .take(
            cfg.task_limits
                .get(task.info.name)
                .copied()
                .or(cfg.limit)
                .unwrap_or(usize::MAX),
        )
        .cloned()
        .collect();
    (dev, test)
}

/// The report's entry for `task` as evaluated, with the multiple-choice
/// references (chance, the best constant answer) read off the test labels.
fn task_summary(task: &Task, dev: &[Item], test: &[Item]) -> TaskSummary {
    TaskSummary {
        name: task.info.name.to_string(),
        domain: task.info.domain.to_string(),
        metric: task.info.metric,
        dev: dev.len(),
        test: test.len(),
        chance: metrics::chance(test),
        always: metrics::constant_baseline(test).map(LetterShare::new),
    }
}

/// The `best-single` (best on dev) and `monolith` systems: copies of two
/// single members' results under those names; the monolith's is `held`
/// when it was held out of the pool.
fn derived_singles(singles: &[SystemResult], monolith: &str, held: Option<SystemResult>) -> Vec<SystemResult> {
    let mut derived = Vec::new();
    if let Some(b) = best_on_dev(singles) {
        let mut b = b.clone();
        b.system = "best-single".into();
        b.kind = "best-single".into();
        derived.push(b);
    }
    let m = held.or_else(|| singles.iter().find(|s| s.member.as_deref() == Some(monolith)).cloned());
    if let Some(mut m) = m {
        m.system = "monolith".into();
        m.kind = "monolith".into();
        derived.push(m);
    }
    derived
}

/// For each of the `n` test items, whether every single member gets it
/// wrong: the items a strategy's emergent solves are counted on.
fn all_fail(singles: &[SystemResult], n: usize) -> Vec<bool> {
    (0..n).map(|i| singles.iter().all(|s| s.items[i].score < 0.5)).collect()
}

/// Sets a system's emergent solves: the share of its test items that it
/// gets right and every single member (`all_fail`) gets wrong.
fn count_emergent(s: &mut SystemResult, all_fail: &[bool]) {
    let solved = s
        .items
        .iter()
        .zip(all_fail)
        .filter(|(r, f)| **f && r.score >= 0.5)
        .count();
    s.emergent = Some(if s.items.is_empty() {
        0.0
    } else {
        solved as f64 / s.items.len() as f64
    });
    s.all_fail = Some(all_fail.iter().filter(|x| **x).count());
}

/// The fold (in `0..k`) of each of `n` dev items: a permutation drawn with
/// `seed` and dealt out in turn, so folds differ in size by at most one and
/// do not follow the order of the data (MMLU's dev items come grouped by
/// subject).
fn folds(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut next = splitmix(seed ^ 0x5eed_f01d);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let mut fold = vec![0; n];
    for (turn, item) in order.into_iter().enumerate() {
        fold[item] = turn % k.max(1);
    }
    fold
}

/// `best-single` cross-validated: for each fold, the member with the best
/// mean dev score on the other folds (ties to the first, as
/// [`best_on_dev`]) answers that fold's items. `dev_scores` holds each
/// member's per-item dev scores; returns the out-of-fold score per item.
fn best_single_out_of_fold(dev_scores: &[&[f64]], fold: &[usize], k: usize) -> Vec<f64> {
    let mut out = vec![0.0; fold.len()];
    for f in 0..k {
        let train_mean = |scores: &[f64]| {
            let kept: Vec<f64> = scores
                .iter()
                .zip(fold)
                .filter(|(_, g)| **g != f)
                .map(|(x, _)| *x)
                .collect();
            metrics::mean(&kept)
        };
        let means: Vec<f64> = dev_scores.iter().map(|s| train_mean(s)).collect();
        let Some(member) = dev_scores.get(first_best(&means)) else {
            continue;
        };
        for (i, g) in fold.iter().enumerate() {
            if *g == f {
                out[i] = member.get(i).copied().unwrap_or(0.0);
            }
        }
    }
    out
}

/// The index of the highest score, the first of equals (0 when empty).
fn first_best(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > scores[best] { i } else { best })
}

/// Each strategy's paired differences from `best-single` and the monolith
/// on one task (`references` holds those two).
fn pair_with_references(strategies: &mut [SystemResult], references: &[SystemResult], seed: u64) {
    let scores = |s: &SystemResult| s.items.iter().map(|r| r.score).collect::<Vec<f64>>();
    let of = |kind: &str| references.iter().find(|r| r.kind == kind).map(scores);
    let (best, mono) = (of("best-single"), of("monolith"));
    for s in strategies {
        let mine = scores(s);
        s.vs_best = best
            .as_ref()
            .and_then(|b| metrics::paired_delta(&[(1.0, &mine, b)], 1000, seed));
        s.vs_monolith = mono
            .as_ref()
            .and_then(|m| metrics::paired_delta(&[(1.0, &mine, m)], 1000, seed));
    }
}

/// Each strategy's paired differences on the macro average: every task
/// weighted as `overall` weighs it (1 / domains / the domain's tasks),
/// each task's items resampled on their own.
fn paired_macro(results: &[SystemResult], tasks: &[TaskSummary], seed: u64) -> BTreeMap<String, Paired> {
    // A task with no test items (`--task-limit T=0`) has no mean: it is
    // left out here and in [`macro_averages`] alike.
    let tasks: Vec<&TaskSummary> = tasks.iter().filter(|t| t.test > 0).collect();
    let mut per_domain: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &tasks {
        *per_domain.entry(t.domain.as_str()).or_default() += 1;
    }
    let weight = |t: &TaskSummary| 1.0 / per_domain.len() as f64 / per_domain[t.domain.as_str()] as f64;
    let scores = |s: &SystemResult| s.items.iter().map(|r| r.score).collect::<Vec<f64>>();
    let find = |system: &str, task: &str| results.iter().find(|r| r.system == system && r.task == task);
    let mut out = BTreeMap::new();
    let mut systems: Vec<&str> = results
        .iter()
        .filter(|r| r.kind == "strategy" || r.kind == "dev-chosen")
        .map(|r| r.system.as_str())
        .collect();
    systems.sort();
    systems.dedup();
    for sys in systems {
        let against = |reference: &str| {
            let cols: Vec<(f64, Vec<f64>, Vec<f64>)> = tasks
                .iter()
                .map(|t| {
                    Some((
                        weight(t),
                        scores(find(sys, &t.name)?),
                        scores(find(reference, &t.name)?),
                    ))
                })
                .collect::<Option<Vec<_>>>()?;
            let parts: Vec<(f64, &[f64], &[f64])> =
                cols.iter().map(|(w, a, b)| (*w, a.as_slice(), b.as_slice())).collect();
            metrics::paired_delta(&parts, 1000, seed)
        };
        out.insert(
            sys.to_string(),
            Paired {
                vs_best: against("best-single"),
                vs_monolith: against("monolith"),
            },
        );
    }
    out
}

/// Everything the run reports, filled in task by task.
#[derive(Default)]
struct Outcomes {
    summaries: Vec<TaskSummary>,
    results: Vec<SystemResult>,
    scaling: Vec<ScalingPoint>,
    diversity: Vec<ScalingPoint>,
}

/// What evaluating every task needs: the run's set-up, loaded once and
/// checked before any task is evaluated.
struct Evaluation<'a> {
    rt: &'a Runtime,
    cache: &'a Cache,
    cfg: &'a EvalConfig,
    mp: MultiProgress,
    /// The generative members.
    members: Vec<ModelCard>,
    /// The monolith's id (see [`monolith`] and [`EvalConfig::monolith`]).
    monolith: String,
    /// The monolith when it is held out of the pool (`--monolith`).
    held_out: Option<ModelCard>,
    /// What strategies may call when the monolith is held out: every
    /// member but it. `None`: the whole pool.
    strategy_members: Option<Vec<String>>,
    /// The strategies.
    strategies: Vec<Strategy>,
}

impl Evaluation<'_> {
    /// Every system on one task: the single members, `best-single` and
    /// `monolith`, each strategy, and the `--scaling` / `--diversity`
    /// sweeps, added to `out`.
    async fn task(&self, task: &Task, out: &mut Outcomes) -> Result<(), Error> {
        let (dev, test) = task_items(task, self.cfg);
        out.summaries.push(task_summary(task, &dev, &test));
        // Single members, dev then test.
        let mut singles = self.singles(task, &dev, &test).await;
        // Best single member on dev, and the monolith (held out or not).
        // A held-out monolith is never chosen on dev: it answers the test
        // items only (on a 1.5B model, a fifth of its cost saved).
        let held = match &self.held_out {
            Some(m) => Some(self.single(task, m, &[], &test).await),
            None => None,
        };
        let mut derived = derived_singles(&singles, &self.monolith, held);
        // Strategies: fit on dev, run on test.
        let dev_examples: Vec<crate::request::Example> = dev.iter().map(Item::example).collect();
        let mut strategies = self.strategies(task, &dev_examples, &test, &singles).await?;
        if let Some(chosen) = self.dev_chosen(task, &dev, &singles, &derived, &strategies).await? {
            strategies.push(chosen);
        }
        pair_with_references(&mut strategies, &derived, self.cfg.seed);
        derived.extend(strategies);
        self.sweeps(task, &dev_examples, &test, &singles, out).await?;
        for s in singles.iter_mut().chain(derived.iter_mut()) {
            s.top_pick = metrics::top_pick(&test, s.items.iter().map(|r| r.text.as_str())).map(LetterShare::new);
        }
        out.results.extend(singles);
        out.results.extend(derived);
        Ok(())
    }

    /// Every single member on the task, in pool order (see
    /// [`Evaluation::single`]).
    async fn singles(&self, task: &Task, dev: &[Item], test: &[Item]) -> Vec<SystemResult> {
        let mut singles: Vec<SystemResult> = Vec::new();
        for m in &self.members {
            singles.push(self.single(task, m, dev, test).await);
        }
        singles
    }

    /// One member answering the dev and then the test items (cached): its
    /// result is over the test items, with its dev mean as `dev_accuracy`.
    async fn single(&self, task: &Task, m: &ModelCard, dev: &[Item], test: &[Item]) -> SystemResult {
        let (rt, cache, cfg) = (self.rt, self.cache, self.cfg);
        let all: Vec<&Item> = dev.iter().chain(test.iter()).collect();
        let b = bar(
            &self.mp,
            cfg.progress,
            all.len(),
            format!("{} · {}", task.info.name, m.id),
        );
        let out: Vec<ItemResult> = futures::stream::iter(all)
            .map(|item| {
                let b = b.clone();
                async move {
                    let r = member_answer(rt, cache, &m.id, item, cfg).await;
                    b.inc(1);
                    r
                }
            })
            .buffered(cfg.concurrency.max(1))
            .collect()
            .await;
        b.finish_and_clear();
        let (dev_out, test_out) = out.split_at(dev.len());
        let mut s = summarize(
            format!("member:{}", m.id),
            "member",
            Some(m.id.clone()),
            task.info.name,
            test_out.to_vec(),
            cfg.seed,
        );
        if !dev_out.is_empty() {
            s.dev_scores = dev_out.iter().map(|r| r.score).collect();
            s.dev_accuracy = Some(metrics::mean(&s.dev_scores));
        }
        s
    }

    /// Each strategy fitted on `dev` and run on `test`, with its emergent
    /// solves: the test items it gets right that every single member gets
    /// wrong.
    async fn strategies(
        &self,
        task: &Task,
        dev: &[crate::request::Example],
        test: &[Item],
        singles: &[SystemResult],
    ) -> Result<Vec<SystemResult>, Error> {
        let all_fail = all_fail(singles, test.len());
        let mut results = Vec::new();
        for strategy in &self.strategies {
            let (out, fit_error) = strategy_on(
                self.rt,
                self.cache,
                &self.mp,
                strategy,
                task.info.name,
                dev,
                test,
                self.cfg,
                self.strategy_members.as_deref(),
            )
            .await?;
            let mut s = summarize(
                format!("strategy:{}", strategy.name),
                "strategy",
                None,
                task.info.name,
                out,
                self.cfg.seed,
            );
            count_emergent(&mut s, &all_fail);
            s.fit_error = fit_error;
            results.push(s);
        }
        Ok(results)
    }

    /// The `dev-chosen` system of one task (see [`Selection`]): `None`
    /// unless `select_folds` asks for it and the dev split has an item per
    /// fold. `derived` holds `best-single`, `strategies` the strategies'
    /// test results as fitted on the whole dev split.
    async fn dev_chosen(
        &self,
        task: &Task,
        dev: &[Item],
        singles: &[SystemResult],
        derived: &[SystemResult],
        strategies: &[SystemResult],
    ) -> Result<Option<SystemResult>, Error> {
        let k = self.cfg.select_folds;
        let Some(best) = derived.iter().find(|s| s.kind == "best-single") else {
            return Ok(None);
        };
        if k < 2 || dev.len() < k {
            return Ok(None);
        }
        let fold = folds(dev.len(), k, self.cfg.seed);
        let dev_scores: Vec<&[f64]> = singles.iter().map(|s| s.dev_scores.as_slice()).collect();
        let mut candidates = vec![(
            best.system.clone(),
            metrics::mean(&best_single_out_of_fold(&dev_scores, &fold, k)),
        )];
        for (strategy, result) in self.strategies.iter().zip(strategies) {
            let mut oof = vec![0.0; dev.len()];
            for f in 0..k {
                let fitted_on: Vec<crate::request::Example> = dev
                    .iter()
                    .zip(&fold)
                    .filter(|(_, g)| **g != f)
                    .map(|(item, _)| item.example())
                    .collect();
                let (at, held): (Vec<usize>, Vec<Item>) = dev
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| fold[*i] == f)
                    .map(|(i, item)| (i, item.clone()))
                    .unzip();
                let (out, _) = strategy_on(
                    self.rt,
                    self.cache,
                    &self.mp,
                    strategy,
                    task.info.name,
                    &fitted_on,
                    &held,
                    self.cfg,
                    self.strategy_members.as_deref(),
                )
                .await?;
                for (i, r) in at.into_iter().zip(out) {
                    oof[i] = r.score;
                }
            }
            candidates.push((result.system.clone(), metrics::mean(&oof)));
        }
        let pick = first_best(&candidates.iter().map(|(_, x)| *x).collect::<Vec<f64>>());
        let chosen = if pick == 0 { best } else { &strategies[pick - 1] };
        let mut s = chosen.clone();
        s.system = "dev-chosen".into();
        s.kind = "dev-chosen".into();
        s.vs_best = None;
        s.vs_monolith = None;
        let fails = all_fail(singles, s.items.len());
        count_emergent(&mut s, &fails);
        s.selection = Some(Selection {
            folds: k,
            chosen: chosen.system.clone(),
            candidates,
        });
        Ok(Some(s))
    }

    /// `--scaling` and `--diversity`: each strategy over the task's
    /// sub-pools, its points added to `out`. Both lists of sub-pools are
    /// made before any sweep runs, so a pool too large for `--diversity` is
    /// refused before the scaling sweep spends anything.
    async fn sweeps(
        &self,
        task: &Task,
        dev: &[crate::request::Example],
        test: &[Item],
        singles: &[SystemResult],
        out: &mut Outcomes,
    ) -> Result<(), Error> {
        let cfg = self.cfg;
        let ids: Vec<String> = singles.iter().filter_map(|s| s.member.clone()).collect();
        let mut sweeps: Vec<(Vec<Vec<String>>, &mut Vec<ScalingPoint>)> = Vec::new();
        if cfg.scaling {
            sweeps.push((subsets(&ids, cfg.subsets_per_size.max(1), cfg.seed), &mut out.scaling));
        }
        if cfg.diversity {
            let subs = diversity_levels(&ids, &self.rt.cards(), cfg.subsets_per_size.max(1), cfg.seed)?;
            sweeps.push((subs, &mut out.diversity));
        }
        for (subs, into) in sweeps {
            for strategy in &self.strategies {
                let ctx = SweepCtx {
                    rt: self.rt,
                    cache: self.cache,
                    mp: &self.mp,
                    strategy,
                    task: task.info.name,
                    dev,
                    test,
                    singles,
                    cfg,
                };
                into.extend(ctx.sweep(&subs).await?);
            }
        }
        Ok(())
    }
}

/// The manifest as the cache keys see it: without its fit budgets. They
/// bound a fit and never change what a fit that ends returns (a fit that
/// runs out of them fails, and failures are not cached), and requests do
/// not see them; keyed, raising them would throw away every fit and answer
/// computed under the old ones.
fn keyed_manifest(m: &crate::policy::Manifest) -> crate::policy::Manifest {
    crate::policy::Manifest {
        fit_budgets: Default::default(),
        ..m.clone()
    }
}

/// Fits `module` on `dev` (cached) and runs it on `test`, optionally on a
/// sub-pool. Returns the test outcomes and, if `fit` failed, why.
#[allow(clippy::too_many_arguments)]
async fn strategy_on(
    rt: &Runtime,
    cache: &Cache,
    mp: &MultiProgress,
    strategy: &Strategy,
    task: &str,
    dev: &[crate::request::Example],
    test: &[Item],
    cfg: &EvalConfig,
    members: Option<&[String]>,
) -> Result<(Vec<ItemResult>, Option<String>), Error> {
    let (module, name) = (&strategy.module, &strategy.name);
    let mut fit_error = None;
    let fit_key = cache::key(&(
        "fit/3",
        &module.sha256,
        keyed_manifest(&module.manifest),
        &strategy.config,
        visible_pool(rt, members),
        dev.iter().map(|e| (&e.input, &e.answer)).collect::<Vec<_>>(),
    ));
    // The state goes from this fit to these answers by hand, never through
    // the runtime's stored state: another fit of the same module (a variant,
    // another evaluation in this process) would replace that in between.
    let state: Option<Vec<u8>> = match cache.get::<Option<Vec<u8>>>(&fit_key) {
        Some(state) => state,
        None => {
            let b = bar(mp, cfg.progress, 1, format!("{task} · fit {name}"));
            let (fitted, _) = rt
                .fit_state(module, dev.to_vec(), strategy.config.clone(), members)
                .await;
            b.finish_and_clear();
            match fitted {
                Ok(state) => {
                    if let Err(e) = cache.put(&fit_key, &state) {
                        tracing::warn!("{e}");
                    }
                    state
                }
                Err(e) => {
                    // A failed fit leaves the strategy on its defaults.
                    tracing::warn!("fit of {name} on {task} failed: {e}");
                    fit_error = Some(e.to_string());
                    None
                }
            }
        }
    };
    let label = match members {
        Some(m) => format!("{task} · {name} [{}]", m.len()),
        None => format!("{task} · {name}"),
    };
    let b = bar(mp, cfg.progress, test.len(), label);
    let out: Vec<ItemResult> = futures::stream::iter(test.iter())
        .map(|item| {
            let b = b.clone();
            let state = &state;
            async move {
                let r = strategy_answer(rt, cache, strategy, state, item, cfg, members).await;
                b.inc(1);
                r
            }
        })
        .buffered(cfg.concurrency.max(1))
        .collect()
        .await;
    b.finish_and_clear();
    Ok((out, fit_error))
}

/// Pools up to this size have their sub-pools of each size listed (2^N
/// masks) and drawn from the list; larger ones are drawn directly.
const ENUMERATED_UP_TO: usize = 20;

/// A splitmix64 stream from `seed`: the harness's seeded draws (sub-pools,
/// folds) follow from the run's seed alone, with no RNG crate whose value
/// stream could change between versions and move a report's samples.
fn splitmix(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Sub-pools of every size 1..N: all of them when a size has at most
/// `subsets_per_size`, else that many drawn with the run's seed.
fn subsets(ids: &[String], per_size: usize, seed: u64) -> Vec<Vec<String>> {
    let n = ids.len();
    let mut out = Vec::new();
    let mut next = splitmix(seed ^ 0x5CA1_AB1E);
    if n > ENUMERATED_UP_TO {
        return sampled_subsets(ids, per_size, &mut next);
    }
    for k in 1..=n {
        let all: Vec<Vec<String>> = (0u64..(1u64 << n))
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).map(|i| ids[i].clone()).collect())
            .collect();
        if all.len() <= per_size {
            out.extend(all);
        } else {
            let mut pool = all;
            for _ in 0..per_size {
                let i = (next() % pool.len() as u64) as usize;
                out.push(pool.swap_remove(i));
            }
        }
    }
    out
}

/// [`subsets`] for a pool too large to list every sub-pool (the paper's
/// pools reach 32 members): per size, `per_size` distinct sub-pools, each
/// the first `k` of a seeded shuffle, kept in pool order; the whole pool
/// once at size N. Sizes with few sub-pools (1 and N-1 have N) still get
/// `per_size` distinct ones, as N > 20 exceeds any sensible `per_size`.
fn sampled_subsets(ids: &[String], per_size: usize, next: &mut impl FnMut() -> u64) -> Vec<Vec<String>> {
    let n = ids.len();
    let mut out = Vec::new();
    for k in 1..=n {
        let wanted = if k == n { 1 } else { per_size };
        let mut drawn: Vec<Vec<usize>> = Vec::new();
        // Distinct draws; the attempts are bounded so that a per_size above
        // the number of sub-pools of a size cannot loop forever.
        for _ in 0..wanted.saturating_mul(50) {
            if drawn.len() == wanted {
                break;
            }
            let mut order: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = i + (next() % (n - i) as u64) as usize;
                order.swap(i, j);
            }
            let mut pick = order[..k].to_vec();
            pick.sort_unstable();
            if !drawn.contains(&pick) {
                drawn.push(pick);
            }
        }
        out.extend(
            drawn
                .into_iter()
                .map(|p| p.into_iter().map(|i| ids[i].clone()).collect()),
        );
    }
    out
}

/// The sub-pool diversity index: how many distinct architectures its
/// members have. Each architecture of a pool is one base model's lineage
/// when contributors fine-tune the packaged bases (every SmolLM2 specialist
/// is `llama`, every Qwen one `qwen2`), so at equal size the index tells a
/// pool of one base's specialists (1) from one of two bases (2) and one of
/// every packaged family (3).
fn diversity_of(members: &[String], cards: &[ModelCard]) -> usize {
    let mut archs: Vec<&str> = Vec::new();
    for c in cards.iter().filter(|c| members.contains(&c.id)) {
        if !archs.contains(&c.architecture.as_str()) {
            archs.push(&c.architecture);
        }
    }
    archs.len()
}

/// Sub-pools for `--diversity`: for each size from 2 to N-1, the sub-pools
/// of that size grouped by [`diversity_of`], and from each group up to
/// `per_level` drawn with the run's seed (all of them when it has fewer),
/// for the sizes where at least two levels occur: equal-size pools that
/// differ in how many bases they draw on, several of each so that the
/// comparison is not one lucky draw. Every sub-pool is enumerated, so the
/// pool may have at most 16 members.
fn diversity_levels(
    ids: &[String],
    cards: &[ModelCard],
    per_level: usize,
    seed: u64,
) -> Result<Vec<Vec<String>>, Error> {
    let n = ids.len();
    if n > 16 {
        return Err(Error::config(format!(
            "--diversity compares every sub-pool of the pool; {n} members is more than 16: \
             evaluate a smaller pool (e.g. --pool with fewer members)"
        )));
    }
    let mut rng = seed ^ 0x0D15_EA5E;
    let mut next = move || {
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::new();
    for k in 2..n {
        let mut levels: BTreeMap<usize, Vec<Vec<String>>> = BTreeMap::new();
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize != k {
                continue;
            }
            let sub: Vec<String> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| ids[i].clone())
                .collect();
            levels.entry(diversity_of(&sub, cards)).or_default().push(sub);
        }
        if levels.len() < 2 {
            continue;
        }
        for (_, mut group) in levels {
            if group.len() <= per_level {
                out.extend(group);
                continue;
            }
            for _ in 0..per_level {
                let i = (next() % group.len() as u64) as usize;
                out.push(group.swap_remove(i));
            }
        }
    }
    Ok(out)
}

/// What running one strategy over sub-pools needs.
struct SweepCtx<'a> {
    rt: &'a Runtime,
    cache: &'a Cache,
    mp: &'a MultiProgress,
    strategy: &'a Strategy,
    task: &'a str,
    dev: &'a [crate::request::Example],
    test: &'a [Item],
    singles: &'a [SystemResult],
    cfg: &'a EvalConfig,
}

impl SweepCtx<'_> {
    /// Fits and runs the strategy on each sub-pool in `subs`.
    async fn sweep(&self, subs: &[Vec<String>]) -> Result<Vec<ScalingPoint>, Error> {
        let cards = self.rt.cards();
        let mut points = Vec::new();
        for sub in subs {
            let (out, _) = strategy_on(
                self.rt,
                self.cache,
                self.mp,
                self.strategy,
                self.task,
                self.dev,
                self.test,
                self.cfg,
                Some(sub),
            )
            .await?;
            let acc = metrics::mean(&out.iter().map(|r| r.score).collect::<Vec<_>>());
            let best = best_on_dev(
                self.singles
                    .iter()
                    .filter(|s| s.member.as_ref().is_some_and(|m| sub.contains(m))),
            )
            .map_or(0.0, |s| s.accuracy);
            points.push(ScalingPoint {
                system: format!("strategy:{}", self.strategy.name),
                task: self.task.to_string(),
                diversity: diversity_of(sub, &cards),
                members: sub.clone(),
                accuracy: acc,
                best_single: best,
            });
        }
        Ok(points)
    }
}

/// The members a strategy run sees, each with its weight digest: part of
/// every strategy cache key, so that answers computed on one pool (or on a
/// specialist since retrained under the same id) are never served for
/// another. `members` is the sub-pool of a sweep; `None` is the whole pool.
fn visible_pool(rt: &Runtime, members: Option<&[String]>) -> Vec<(String, Option<String>)> {
    let ids: Vec<String> = match members {
        Some(m) => m.to_vec(),
        None => rt.cards().into_iter().map(|c| c.id).collect(),
    };
    ids.into_iter()
        .map(|id| {
            let pinned = rt.fingerprint(&id).map(str::to_string);
            (id, pinned)
        })
        .collect()
}

/// Whether a strategy's failure (`"<kind>: <message>"`, as
/// [`strategy_answer`] records it) is the module's own deterministic doing,
/// which the same module on the same item would repeat: worth caching.
/// Failures of the host (inference, a member missing, a deadline, the
/// operator's policy or configuration) are not.
fn module_own_failure(error: &str) -> bool {
    let kind = error.split(':').next().unwrap_or("");
    matches!(
        kind,
        "fuel"
            | "stack"
            | "trap"
            | "module-failed"
            | "unsupported"
            | "invalid-module"
            | "invalid-params"
            | "memory"
            | "budget-exhausted"
    )
}

async fn strategy_answer(
    rt: &Runtime,
    cache: &Cache,
    strategy: &Strategy,
    state: &Option<Vec<u8>>,
    item: &Item,
    cfg: &EvalConfig,
    members: Option<&[String]>,
) -> ItemResult {
    let module = &strategy.module;
    let max_tokens = cfg.max_tokens.unwrap_or(default_max_tokens(item.metric));
    let input = Input::Chat(vec![Message::user(item.prompt())]);
    let key = cache::key(&(
        "strategy/3",
        visible_pool(rt, members),
        &module.sha256,
        keyed_manifest(&module.manifest),
        &strategy.config,
        state,
        &input,
        max_tokens,
        cfg.seed,
    ));
    if let Some(mut r) = cache.get::<ItemResult>(&key) {
        r.score = metrics::grade(item, &r.text);
        r.item = item.id.clone();
        return r;
    }
    let started = Instant::now();
    let mut req = RunRequest {
        input,
        params: GenParams::default(),
        config: strategy.config.clone(),
    };
    req.params.max_tokens = Some(max_tokens);
    req.params.seed = Some(cfg.seed);
    let metering = crate::Metering {
        state: Some(state.clone()),
        ..Default::default()
    };
    let r = match rt.run_metered(module, req, members, metering).await.0 {
        Ok(out) => ItemResult {
            item: item.id.clone(),
            score: metrics::grade(item, &out.text),
            text: cut(&out.text),
            host_calls: out.usage.host_calls,
            prompt_tokens: out.usage.prompt_tokens + out.usage.scored_tokens,
            completion_tokens: out.usage.completion_tokens,
            wall_ms: started.elapsed().as_millis() as u64,
            error: None,
        },
        Err(e) => failed(item, format!("{}: {e}", e.kind()), started),
    };
    // Failures are cached too when they are the module's own doing (a
    // deterministic error); the host's (a member that failed to load or to
    // answer, a deadline that may pass on a quieter machine) are asked again.
    let retry = r.error.as_deref().is_some_and(|e| !module_own_failure(e));
    if !retry {
        if let Err(e) = cache.put(&key, &r) {
            tracing::warn!("{e}");
        }
    }
    r
}

/// system -> domain -> mean over the domain's tasks, and `overall` (mean
/// over domains).
fn macro_averages(results: &[SystemResult], tasks: &[TaskSummary]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let systems: Vec<String> = {
        let mut v: Vec<String> = results.iter().map(|r| r.system.clone()).collect();
        v.dedup();
        v.sort();
        v.dedup();
        v
    };
    for sys in systems {
        let mut by_domain: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for t in tasks.iter().filter(|t| t.test > 0) {
            if let Some(r) = results.iter().find(|r| r.system == sys && r.task == t.name) {
                by_domain.entry(t.domain.clone()).or_default().push(r.accuracy);
            }
        }
        let mut m: BTreeMap<String, f64> = by_domain.iter().map(|(d, v)| (d.clone(), metrics::mean(v))).collect();
        let overall = metrics::mean(&m.values().copied().collect::<Vec<_>>());
        m.insert("overall".into(), overall);
        out.insert(sys, m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_balanced_seeded_and_not_the_data_order() {
        let f = folds(23, 5, 7);
        let mut sizes = [0usize; 5];
        for g in &f {
            sizes[*g] += 1;
        }
        assert!(sizes.iter().all(|n| *n == 4 || *n == 5), "{sizes:?}");
        assert_eq!(f, folds(23, 5, 7), "the same seed deals the same folds");
        assert_ne!(f, folds(23, 5, 8));
        let in_turn: Vec<usize> = (0..23).map(|i| i % 5).collect();
        assert_ne!(f, in_turn, "items are shuffled before they are dealt");
        assert!(folds(0, 5, 1).is_empty());
    }

    #[test]
    fn a_member_choice_that_does_not_generalise_scores_zero_out_of_fold() {
        // Each member is right on exactly the items of one fold: in-sample
        // either looks like 50%, but the member chosen on the other fold is
        // always the wrong one for the held-out items.
        let (a, b) = ([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]);
        let fold = [0, 1, 0, 1];
        assert_eq!(best_single_out_of_fold(&[&a, &b], &fold, 2), vec![0.0; 4]);
        // A member at least as good on every fold is chosen on every fold
        // (on the fold where both are perfect, as the one listed first).
        let c = [1.0, 1.0, 1.0, 0.0];
        assert_eq!(best_single_out_of_fold(&[&c, &a], &fold, 2), c.to_vec());
    }

    #[test]
    fn the_first_of_equal_scores_wins() {
        assert_eq!(first_best(&[0.4, 0.6, 0.6]), 1);
        assert_eq!(first_best(&[0.5, 0.5]), 0);
        assert_eq!(first_best(&[]), 0);
    }

    #[test]
    fn best_on_dev_breaks_ties_by_pool_order() {
        let member = |id: &str, dev: f64, test: f64| {
            let mut s = summarize(format!("member:{id}"), "member", Some(id.into()), "t", vec![], 0);
            s.dev_accuracy = Some(dev);
            s.accuracy = test;
            s
        };
        let singles = [member("a", 0.25, 0.1), member("b", 0.5, 0.2), member("c", 0.5, 0.3)];
        let best = best_on_dev(&singles).and_then(|s| s.member.clone());
        assert_eq!(best.as_deref(), Some("b"), "the earlier of two equal dev scores");
        assert_eq!(best_on_dev(&singles[2..]).map(|s| s.accuracy), Some(0.3));
        assert!(best_on_dev(&[]).is_none());
    }

    #[test]
    fn a_label_is_a_plain_suffix_after_the_last_at() {
        assert_eq!(split_label("option-fusion@cal"), ("option-fusion", Some("cal")));
        assert_eq!(split_label("option-fusion"), ("option-fusion", None));
        assert_eq!(split_label("/tmp/a@b/m.wasm@v_2"), ("/tmp/a@b/m.wasm", Some("v_2")));
        // Not a label: a path whose folder holds an `@`, an empty label.
        assert_eq!(split_label("/tmp/a@b/m.wasm"), ("/tmp/a@b/m.wasm", None));
        assert_eq!(split_label("m@"), ("m@", None));
        assert_eq!(split_label("@x"), ("@x", None));
    }

    #[test]
    fn scoped_settings_win_over_shared_ones_for_their_strategy_only() {
        let shared: BTreeMap<String, String> = [("calibrate", "none"), ("seed", "3"), ("cal.calibrate", "fit")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = scoped_configs(&["option-fusion", "cal"], &shared).expect("scopes known");
        assert_eq!(c[0].get("calibrate").map(String::as_str), Some("none"));
        assert_eq!(c[1].get("calibrate").map(String::as_str), Some("fit"));
        assert_eq!(
            c[1].get("seed").map(String::as_str),
            Some("3"),
            "shared keys reach every strategy"
        );
        assert!(
            c.iter().all(|c| !c.contains_key("cal.calibrate")),
            "scoped keys are not passed on raw"
        );
        // Without scoped keys every strategy gets the shared settings as
        // they are: the cache keys of runs without variants do not change.
        let plain: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        assert_eq!(
            scoped_configs(&["a", "b"], &plain).expect("plain"),
            vec![plain.clone(), plain]
        );
        let e = scoped_configs(&["a"], &shared).expect_err("`cal` names no strategy");
        assert!(e.to_string().contains("`cal` names no strategy"), "{e}");
    }

    fn card(id: &str, arch: &str, contributor: &str) -> ModelCard {
        ModelCard {
            id: id.into(),
            contributor: contributor.into(),
            description: String::new(),
            domains: Vec::new(),
            architecture: arch.into(),
            parameters: 1,
            context_length: 1,
            license: String::new(),
            capabilities: Vec::new(),
        }
    }

    #[test]
    fn scaling_subsets_cover_pools_past_twenty_members() {
        // The paper's pools reach 32; listing 2^32 masks is out of the
        // question, and the list used to stop at 20 members.
        let ids: Vec<String> = (0..32).map(|i| format!("m{i}")).collect();
        let subs = subsets(&ids, 3, 7);
        for k in 1..=32 {
            let of_k: Vec<&Vec<String>> = subs.iter().filter(|s| s.len() == k).collect();
            assert_eq!(of_k.len(), if k == 32 { 1 } else { 3 }, "size {k}");
            for (i, a) in of_k.iter().enumerate() {
                assert!(of_k[i + 1..].iter().all(|b| b != a), "size {k}: a repeat");
                let mut sorted = a.to_vec();
                sorted.sort_by_key(|m| m[1..].parse::<usize>().unwrap());
                sorted.dedup();
                assert_eq!(&sorted, *a, "size {k}: members distinct and in pool order");
            }
        }
        assert!(ids.iter().all(|m| subs.iter().any(|s| s.len() < 32 && s.contains(m))));
        assert_eq!(subs, subsets(&ids, 3, 7), "the seed decides");
        // Small pools keep the listing: every sub-pool where a size has few.
        let few: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
        assert_eq!(subsets(&few, 10, 1).len(), 15);
    }

    #[test]
    fn diversity_levels_contrast_equal_sizes_by_base_count() {
        // Three specialists of one base by one lab, and two other families.
        let cards = vec![
            card("s1", "llama", "lab"),
            card("s2", "llama", "lab"),
            card("s3", "llama", "lab"),
            card("q", "qwen2", "alibaba"),
            card("g", "gemma3", "google"),
        ];
        let ids: Vec<String> = cards.iter().map(|c| c.id.clone()).collect();
        let subs = diversity_levels(&ids, &cards, 2, 0).unwrap();
        let at = |k: usize, d: usize| {
            subs.iter()
                .filter(|s| s.len() == k && diversity_of(s, &cards) == d)
                .count()
        };
        // Size 2: one base (3 pairs of specialists, 2 drawn), two (7, 2 drawn).
        assert_eq!((at(2, 1), at(2, 2), at(2, 3)), (2, 2, 0));
        // Size 3: one base (only s1 s2 s3), two bases, three families.
        assert_eq!((at(3, 1), at(3, 2), at(3, 3)), (1, 2, 2));
        assert!(subs.contains(&vec!["s1".to_string(), "s2".into(), "s3".into()]));
        // Size 4: two bases (s1 s2 s3 + q or g) and three families.
        assert_eq!((at(4, 1), at(4, 2), at(4, 3)), (0, 2, 2));
        assert_eq!(subs.len(), 13);
        assert_eq!(
            subs,
            diversity_levels(&ids, &cards, 2, 0).unwrap(),
            "the seed fixes the draw"
        );
        // A pool where every sub-pool of a size is equally diverse has none.
        let same = vec![card("a", "x", "1"), card("b", "x", "2"), card("c", "x", "3")];
        let ids: Vec<String> = same.iter().map(|c| c.id.clone()).collect();
        assert!(diversity_levels(&ids, &same, 3, 0).unwrap().is_empty());
    }
}

//! Per-request store state and the host side of the `models` and `trace`
//! imports: every call is checked against the grant and counted here, the
//! one place limits are enforced.
//!
//! A policy violation (a member not granted, a spent budget, the deadline)
//! *traps*: it records the typed error in [`RequestState::violation`] and
//! returns a wasmtime error, which unwinds the guest and ends the request.
//! Ordinary failures (an unknown member, bad parameters, a backend error)
//! are returned to the guest as WIT errors so that it can fall back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::convert::*;
use crate::bindings::{models, trace, types as w, weights};
use crate::inference::{CallCtx, Models, DEFAULT_MAX_TOKENS};
use crate::policy::Grant;
use crate::request::{ProvenanceEvent, UsageReport};
use crate::Error;

/// Longest trace note kept; longer notes are cut.
const MAX_NOTE_BYTES: usize = 4096;
/// Largest prompt (all chat turns together) a module may send in one call.
/// Bigger inputs are refused before they reach a model worker, where
/// tokenizing them would hold up every other request on that member.
pub const MAX_INPUT_BYTES: usize = 256 << 10;
/// Most continuations in one `score` call, or texts in one `embed` call.
pub const MAX_BATCH_ITEMS: usize = 256;

fn input_bytes(i: &w::Input) -> usize {
    match i {
        w::Input::Prompt(p) => p.len(),
        w::Input::Chat(m) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
    }
}

/// `Some(error)` when the input is too large to send to a model.
fn oversized(i: &w::Input, extra: usize) -> Option<w::Error> {
    let n = input_bytes(i) + extra;
    (n > MAX_INPUT_BYTES).then(|| {
        w::Error::InvalidParams(format!(
            "the input is {n} bytes; a model call takes at most {MAX_INPUT_BYTES}: shorten or split it"
        ))
    })
}

fn too_many(what: &str, n: usize) -> Option<w::Error> {
    (n > MAX_BATCH_ITEMS).then(|| {
        w::Error::InvalidParams(format!(
            "{n} {what} in one call; the limit is {MAX_BATCH_ITEMS}: split the call"
        ))
    })
}

/// Everything one request's store holds. Created fresh per request and
/// dropped with it: nothing survives between requests.
pub struct RequestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) stderr: MemoryOutputPipe,
    pub(crate) models: Arc<dyn Models>,
    pub(crate) grant: Arc<Grant>,
    granted: HashSet<String>,
    pub(crate) deadline: Instant,
    pub(crate) usage: UsageReport,
    tokens_used: u32,
    pub(crate) provenance: Vec<ProvenanceEvent>,
    trace_events: u32,
    /// The first limit this request broke, if any.
    pub(crate) violation: Option<Error>,
    /// Serves `weights.merge`, if this host merges.
    pub(crate) merger: Option<Arc<dyn crate::merge::Merger>>,
    /// The pool before any merge, and the members merged for this request.
    pool: Arc<dyn Models>,
    merged: Vec<(String, Arc<dyn Models>)>,
    /// Merges made so far (releasing one does not refund the budget).
    merges_made: u32,
}

impl RequestState {
    pub(crate) fn new(
        wasi: WasiCtx,
        table: ResourceTable,
        stderr: MemoryOutputPipe,
        models: Arc<dyn Models>,
        grant: Arc<Grant>,
        deadline: Instant,
    ) -> Self {
        let granted = grant.models.iter().cloned().collect();
        RequestState {
            wasi,
            table,
            stderr,
            pool: models.clone(),
            merged: Vec::new(),
            merges_made: 0,
            merger: None,
            models,
            grant,
            granted,
            deadline,
            usage: UsageReport::default(),
            tokens_used: 0,
            provenance: Vec::new(),
            trace_events: 0,
            violation: None,
        }
    }

    /// Records `e` as this request's violation and returns the trap that
    /// unwinds the guest.
    fn violate(&mut self, e: Error) -> wasmtime::Error {
        let msg = e.to_string();
        if self.violation.is_none() {
            self.violation = Some(e);
        }
        wasmtime::Error::msg(msg)
    }

    fn charge_calls(&mut self, n: u32) -> wasmtime::Result<()> {
        let next = self.usage.host_calls.saturating_add(n);
        if next > self.grant.host_calls {
            return Err(self.violate(Error::budget("host-calls", self.grant.host_calls as u64)));
        }
        self.usage.host_calls = next;
        Ok(())
    }

    /// Ok(true): granted. Ok(false): not in the pool at all (the guest gets
    /// `unknown-model`). Err: in the pool but not granted (trap).
    fn check_model(&mut self, model: &str) -> wasmtime::Result<bool> {
        if self.granted.contains(model) {
            return Ok(true);
        }
        if self.models.cards().iter().any(|c| c.id == model) {
            return Err(self.violate(Error::NotPermitted {
                model: model.to_string(),
            }));
        }
        Ok(false)
    }

    fn remaining_tokens(&self) -> u32 {
        self.grant.tokens.saturating_sub(self.tokens_used)
    }

    fn call_ctx(&self) -> CallCtx {
        CallCtx {
            deadline: self.deadline,
        }
    }

    fn deadline_trap(&mut self) -> wasmtime::Error {
        let ms = self.grant.deadline.as_millis() as u64;
        self.violate(Error::Deadline { limit_ms: ms })
    }

    fn record_call(&mut self, call: &str, model: &str, prompt: u32, completion: u32, took: Duration, outcome: &str) {
        self.provenance.push(ProvenanceEvent::HostCall {
            call: call.into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            ms: took.as_millis() as u64,
            outcome: outcome.into(),
        });
    }

    /// Awaits one model call; running past the deadline (while queued or
    /// while decoding) ends the request.
    async fn await_model<T>(
        &mut self,
        fut: impl std::future::Future<Output = Result<T, crate::inference::InferenceError>>,
    ) -> wasmtime::Result<Result<T, crate::inference::InferenceError>> {
        let result = self.until_deadline(fut).await?;
        if matches!(result, Err(crate::inference::InferenceError::Deadline)) {
            return Err(self.deadline_trap());
        }
        Ok(result)
    }

    /// Awaits `fut` but no later than the request's deadline.
    async fn until_deadline<T>(&mut self, fut: impl std::future::Future<Output = T>) -> wasmtime::Result<T> {
        match tokio::time::timeout_at(self.deadline.into(), fut).await {
            Ok(v) => Ok(v),
            Err(_) => Err(self.deadline_trap()),
        }
    }
}

fn outcome_of<T>(r: &Result<T, crate::inference::InferenceError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => Error::from(e.clone()).kind().into(),
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for RequestState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let cap = self.grant.memory_bytes;
        if desired as u64 > cap {
            return Err(self.violate(Error::Memory {
                limit: cap,
                requested: desired as u64,
            }));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; a strategy needs a few thousand at most.
        const MAX_TABLE_ELEMENTS: usize = 100_000;
        if desired > MAX_TABLE_ELEMENTS {
            return Err(self.violate(Error::budget("table-elements", MAX_TABLE_ELEMENTS as u64)));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
}

impl w::Host for RequestState {}

impl models::Host for RequestState {
    async fn list_models(&mut self) -> wasmtime::Result<Vec<w::ModelInfo>> {
        self.charge_calls(1)?;
        let cards = self.models.cards();
        Ok(cards
            .into_iter()
            .filter(|c| self.granted.contains(&c.id))
            .map(card_out)
            .collect())
    }

    async fn generate(
        &mut self,
        model: String,
        input: w::Input,
        params: w::GenParams,
    ) -> wasmtime::Result<Result<w::Generation, w::Error>> {
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        if let Some(e) = oversized(&input, 0) {
            return Ok(Err(e));
        }
        let remaining = self.remaining_tokens();
        if remaining == 0 {
            return Err(self.violate(Error::budget("tokens", self.grant.tokens as u64)));
        }
        let mut params = params_in(params);
        params.max_tokens = Some(params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(remaining));
        let started = Instant::now();
        let fut = self.models.generate(self.call_ctx(), &model, input_in(input), params);
        let result = self.await_model(fut).await?;
        let outcome = outcome_of(&result);
        let (p, c) = result
            .as_ref()
            .map(|g| (g.usage.prompt_tokens, g.usage.completion_tokens))
            .unwrap_or((0, 0));
        self.account_generation(p, c);
        self.record_call("generate", &model, p, c, started.elapsed(), &outcome);
        Ok(result.map(generation_out).map_err(inference_error_out))
    }

    async fn fan_out(&mut self, jobs: Vec<w::Job>) -> wasmtime::Result<Vec<Result<w::Generation, w::Error>>> {
        let n = jobs.len() as u32;
        if n == 0 {
            return Ok(Vec::new());
        }
        self.charge_calls(n)?;
        let mut known = Vec::with_capacity(jobs.len());
        for j in &jobs {
            known.push(self.check_model(&j.model)?);
        }
        // Each job gets an equal share of what is left, so the jobs together
        // can never overrun the token budget however they finish.
        let remaining = self.remaining_tokens();
        let share = remaining / n;
        if share == 0 {
            return Err(self.violate(Error::budget("tokens", self.grant.tokens as u64)));
        }
        let ctx = self.call_ctx();
        let started = Instant::now();
        let mut futs = Vec::with_capacity(jobs.len());
        let mut names = Vec::with_capacity(jobs.len());
        for (j, ok) in jobs.into_iter().zip(known) {
            names.push(j.model.clone());
            let mut params = params_in(j.params);
            params.max_tokens = Some(params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(share));
            let fut = if !ok {
                let m = j.model.clone();
                Box::pin(async move { Err(crate::inference::InferenceError::UnknownModel(m)) })
            } else if let Some(w::Error::InvalidParams(msg)) = oversized(&j.input, 0) {
                Box::pin(async move { Err(crate::inference::InferenceError::InvalidParams(msg)) })
            } else {
                self.models.generate(ctx, &j.model, input_in(j.input), params)
            };
            // Each job's own latency, not the whole fan-out's.
            futs.push(async move {
                let r = fut.await;
                (r, started.elapsed())
            });
        }
        let results = self.until_deadline(futures::future::join_all(futs)).await?;
        if results
            .iter()
            .any(|(r, _)| matches!(r, Err(crate::inference::InferenceError::Deadline)))
        {
            return Err(self.deadline_trap());
        }
        let mut out = Vec::with_capacity(results.len());
        for ((r, took), model) in results.into_iter().zip(names) {
            let (p, c) = r
                .as_ref()
                .map(|g| (g.usage.prompt_tokens, g.usage.completion_tokens))
                .unwrap_or((0, 0));
            self.account_generation(p, c);
            let outcome = outcome_of(&r);
            self.record_call("generate", &model, p, c, took, &outcome);
            out.push(r.map(generation_out).map_err(inference_error_out));
        }
        Ok(out)
    }

    async fn score(
        &mut self,
        model: String,
        prompt: w::Input,
        continuations: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<w::Scored>, w::Error>> {
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        let extra = continuations.iter().map(String::len).sum();
        if let Some(e) = too_many("continuations", continuations.len()).or_else(|| oversized(&prompt, extra)) {
            return Ok(Err(e));
        }
        let started = Instant::now();
        let fut = self
            .models
            .score(self.call_ctx(), &model, input_in(prompt), continuations);
        let result = self.await_model(fut).await?;
        let scored: u32 = result.as_ref().map(|v| v.iter().map(|s| s.tokens).sum()).unwrap_or(0);
        self.usage.scored_tokens += u64::from(scored);
        let outcome = outcome_of(&result);
        self.record_call("score", &model, scored, 0, started.elapsed(), &outcome);
        Ok(result
            .map(|v| {
                v.into_iter()
                    .map(|s| w::Scored {
                        logprob: s.logprob,
                        tokens: s.tokens,
                    })
                    .collect()
            })
            .map_err(inference_error_out))
    }

    async fn next_token(
        &mut self,
        model: String,
        prompt: w::Input,
        top_k: u32,
    ) -> wasmtime::Result<Result<Vec<w::TokenLogprob>, w::Error>> {
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        if top_k == 0 || top_k > 1000 {
            return Ok(Err(w::Error::InvalidParams(format!(
                "top-k {top_k} is out of range: use 1..=1000"
            ))));
        }
        if let Some(e) = oversized(&prompt, 0) {
            return Ok(Err(e));
        }
        let started = Instant::now();
        let fut = self.models.next_token(self.call_ctx(), &model, input_in(prompt), top_k);
        let result = self.await_model(fut).await?;
        let outcome = outcome_of(&result);
        self.record_call("next-token", &model, 0, 0, started.elapsed(), &outcome);
        Ok(result
            .map(|v| {
                v.into_iter()
                    .map(|t| w::TokenLogprob {
                        token: t.token,
                        text: t.text,
                        logprob: t.logprob,
                    })
                    .collect()
            })
            .map_err(inference_error_out))
    }

    async fn embed(&mut self, model: String, texts: Vec<String>) -> wasmtime::Result<Result<Vec<Vec<f32>>, w::Error>> {
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        let bytes = texts.iter().map(String::len).sum();
        if let Some(e) = too_many("texts", texts.len()).or_else(|| oversized(&w::Input::Prompt(String::new()), bytes)) {
            return Ok(Err(e));
        }
        let started = Instant::now();
        let fut = self.models.embed(self.call_ctx(), &model, texts);
        let result = self.await_model(fut).await?;
        let outcome = outcome_of(&result);
        self.record_call("embed", &model, 0, 0, started.elapsed(), &outcome);
        Ok(result.map_err(inference_error_out))
    }
}

impl RequestState {
    fn account_generation(&mut self, prompt: u32, completion: u32) {
        self.tokens_used = self.tokens_used.saturating_add(completion);
        self.usage.prompt_tokens += prompt as u64;
        self.usage.completion_tokens += completion as u64;
    }
}

impl weights::Host for RequestState {
    async fn merge(&mut self, spec: weights::MergeSpec) -> wasmtime::Result<Result<String, w::Error>> {
        self.charge_calls(1)?;
        if self.merges_made >= self.grant.merges {
            return Err(self.violate(Error::budget("merges", self.grant.merges as u64)));
        }
        for m in spec.models.iter().chain(spec.base.iter()) {
            if !self.check_model(m)? {
                return Ok(Err(w::Error::UnknownModel(m.clone())));
            }
        }
        let Some(merger) = self.merger.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not merge weights".into())));
        };
        use crate::merge::Method as M;
        let method = match spec.method {
            weights::MergeMethod::Linear => M::Linear,
            weights::MergeMethod::TaskArithmetic => M::TaskArithmetic,
            weights::MergeMethod::Ties(density) => M::Ties { density },
            weights::MergeMethod::Dare(density) => M::Dare { density },
            weights::MergeMethod::DareTies(density) => M::DareTies { density },
            weights::MergeMethod::Slerp(t) => M::Slerp { t },
            weights::MergeMethod::Expo(alpha) => M::Expo { alpha },
        };
        let recipe = crate::merge::MergeSpec {
            method,
            weights: spec.weights,
            lambda: spec.lambda,
            seed: spec.seed,
        };
        let shown = spec.models.join("+");
        let started = Instant::now();
        let fut = merger.merge(spec.models, spec.base, recipe);
        let result = self.until_deadline(fut).await?;
        match result {
            Ok((id, served)) => {
                self.record_call("merge", &shown, 0, 0, started.elapsed(), "ok");
                if !self.merged.iter().any(|(x, _)| *x == id) {
                    self.merges_made += 1;
                    self.merged.push((id.clone(), served));
                    self.models = Arc::new(crate::merge::Overlay::new(self.pool.clone(), self.merged.clone()));
                }
                self.granted.insert(id.clone());
                Ok(Ok(id))
            }
            Err(e) => {
                self.record_call("merge", &shown, 0, 0, started.elapsed(), "invalid-params");
                Ok(Err(w::Error::InvalidParams(e)))
            }
        }
    }

    async fn release(&mut self, model: String) -> wasmtime::Result<Result<(), w::Error>> {
        let Some(at) = self.merged.iter().position(|(x, _)| *x == model) else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        // Dropping the request's handle lets the merger free the weights
        // once it no longer keeps the recipe itself.
        self.merged.remove(at);
        self.granted.remove(&model);
        self.models = Arc::new(crate::merge::Overlay::new(self.pool.clone(), self.merged.clone()));
        self.record_call("release", &model, 0, 0, Duration::ZERO, "ok");
        Ok(Ok(()))
    }

    async fn keep(&mut self, model: String, name: String) -> wasmtime::Result<Result<(), w::Error>> {
        let Some((_, served)) = self.merged.iter().find(|(x, _)| *x == model).cloned() else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        let Some(merger) = self.merger.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not merge weights".into())));
        };
        if self.pool.cards().iter().any(|c| c.id == name) {
            return Ok(Err(w::Error::InvalidParams(format!(
                "`{name}` is already a member of the pool: choose another name"
            ))));
        }
        match merger.keep(&name, &model, served) {
            Ok(()) => {
                self.record_call("keep", &format!("{model} as {name}"), 0, 0, Duration::ZERO, "ok");
                Ok(Ok(()))
            }
            Err(crate::merge::KeepRefused::NotAllowed(why)) => Ok(Err(w::Error::Unsupported(why))),
            Err(crate::merge::KeepRefused::Invalid(why)) => Ok(Err(w::Error::InvalidParams(why))),
        }
    }
}

impl trace::Host for RequestState {
    async fn emit(&mut self, step: trace::Step) -> wasmtime::Result<()> {
        if self.trace_events >= self.grant.trace_events {
            return Err(self.violate(Error::budget("trace-events", self.grant.trace_events as u64)));
        }
        self.trace_events += 1;
        let mut note = step.note;
        if note.len() > MAX_NOTE_BYTES {
            let mut cut = MAX_NOTE_BYTES;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        self.provenance.push(ProvenanceEvent::ModuleStep {
            model: step.model,
            role: step.role,
            note,
        });
        Ok(())
    }
}

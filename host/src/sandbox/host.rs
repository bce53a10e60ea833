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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::convert::*;
use crate::bindings::{models, trace, types as w, weights};
use crate::inference::{CallCtx, Models, TextSink, DEFAULT_MAX_TOKENS};
use crate::policy::Grant;
use crate::request::{ProvenanceEvent, UsageReport};
use crate::Error;

/// Longest trace note kept; longer notes are cut.
const MAX_NOTE_BYTES: usize = 4096;

/// How long past the request's deadline a generation's member may take to
/// stop: its sink stops it at the deadline and it comes back with its usage
/// ([`RequestState::stopping`]); the member's own deadline falls this much
/// later, and the call is given up twice this much later. The sandbox's
/// outer bound on a whole run lies beyond both ([`super::OVERRUN`]).
pub(super) const STOP_GRACE: Duration = Duration::from_millis(200);

/// How often a model call being awaited looks whether its request was
/// cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(20);
/// Longest trace role kept (`proposer`, `judge`, ...); longer ones are cut.
const MAX_ROLE_BYTES: usize = 64;
/// Longest member id kept in a provenance event (real ids are at most 64
/// bytes; a module can name anything, e.g. an unknown member in a fan-out).
const MAX_MODEL_BYTES: usize = 128;
/// What each provenance event counts against the request's provenance
/// budget on top of its strings: its fixed fields, as serialised.
const EVENT_OVERHEAD_BYTES: u64 = 96;
/// Most continuations in one `score` call, or texts in one `embed` call.
pub const MAX_BATCH_ITEMS: usize = 256;
/// Generated text one request keeps for attributing its answer: far more
/// than a token budget yields in practice, and a fixed bound on the host's
/// memory whatever the module asks for.
const MAX_KEPT_TEXT_BYTES: usize = 1 << 20;

/// The budget [`Grant::charge_limit`] is named by in errors: the tokens
/// the request's caller may still be charged (a tenant's daily quota).
pub const QUOTA_BUDGET: &str = "tenant-tokens";

/// What a generation may write within `room` quota tokens (all of them
/// when there is no quota).
fn within_room(room: Option<u64>) -> u32 {
    room.map_or(u32::MAX, |r| u32::try_from(r).unwrap_or(u32::MAX))
}

/// `text` cut to at most `max` bytes (on a character boundary), marked
/// with `...` when cut.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// `Some(error)` when the input breaks the input rule
/// ([`crate::inference::Input::check_size`]).
fn oversized(i: &crate::inference::Input, extra: usize) -> Option<w::Error> {
    i.check_size(extra).err().map(inference_error_out)
}

fn too_many(what: &str, n: usize) -> Option<w::Error> {
    (n > MAX_BATCH_ITEMS).then(|| {
        w::Error::InvalidParams(format!(
            "{n} {what} in one call; the limit is {MAX_BATCH_ITEMS}: split the call"
        ))
    })
}

/// Bytes a provenance event counts against the provenance budget.
fn event_bytes(e: &ProvenanceEvent) -> u64 {
    let strings = match e {
        ProvenanceEvent::HostCall {
            call, model, outcome, ..
        } => call.len() + model.len() + outcome.len(),
        ProvenanceEvent::ModuleStep { model, role, note } => {
            model.as_ref().map_or(0, String::len) + role.len() + note.len()
        }
    };
    strings as u64 + EVENT_OVERHEAD_BYTES
}

/// Everything one request's store holds. Created fresh per request and
/// dropped with it: nothing survives between requests.
pub struct RequestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) stderr: MemoryOutputPipe,
    pub(crate) models: Arc<dyn Models>,
    pub(crate) grant: Arc<Grant>,
    pub(super) granted: HashSet<String>,
    pub(crate) deadline: Instant,
    /// When the request began: host calls are placed on a timeline from it.
    pub(super) started: Instant,
    pub(crate) usage: UsageReport,
    tokens_used: u32,
    pub(crate) provenance: Vec<ProvenanceEvent>,
    /// What members generated for this request, `(member, text)`, kept
    /// host-side (never returned as such) to attribute the final answer
    /// ([`crate::attribution`]); bounded by [`MAX_KEPT_TEXT_BYTES`].
    pub(crate) generated: Vec<(String, String)>,
    generated_bytes: usize,
    /// Bytes of `provenance` so far (see [`event_bytes`]).
    provenance_bytes: u64,
    trace_events: u32,
    /// This request's id for the members' fair sharing.
    pub(super) requester: u64,
    /// The first limit this request broke, if any.
    pub(crate) violation: Option<Error>,
    /// Serves `weights.merge`, if this host merges.
    pub(crate) merger: Option<Arc<dyn crate::inference::weights::Merger>>,
    /// Set when the caller gave up: the request stops as at its deadline.
    pub(crate) cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What the module streamed through `output`, and where it goes.
    pub(crate) output: Arc<std::sync::Mutex<super::output::Streamed>>,
    /// The pool before any merge, and the members merged for this request.
    pub(super) pool: Arc<dyn Models>,
    pub(super) merged: Vec<crate::inference::weights::Merged>,
    /// Merges made so far (releasing one does not refund the budget).
    merges_made: u32,
    /// Serves `training.train`, if this host trains.
    pub(crate) trainer: Option<Arc<dyn crate::inference::train::Trainer>>,
    /// Members trained for this request (not yet released).
    pub(super) trained: Vec<crate::inference::train::Trained>,
    /// What this request's training has spent so far.
    pub(super) train_spent: TrainSpent,
    /// The host's own calls of this request now under way (model calls,
    /// fan-outs, training, merges, and every other function of Tessera's
    /// interfaces), and how long one was: see [`HostCalls`].
    pub(super) host_calls: Arc<HostCalls>,
    /// What the request's members were charged
    /// ([`UsageReport::charged_for_members`]) when last checked against
    /// its caller's quota, for the sandbox's watch on a module that waits
    /// on its own (`sandbox::held_past_quota`).
    pub(super) members_charged: Arc<std::sync::atomic::AtomicU64>,
}

/// The host calls of a request now under way, and the time during which
/// at least one was. Each function of Tessera's interfaces counts from
/// entry to return (its own work before and after a model call, such as
/// loading a trained member, is the host's time, not the module's), and
/// each model call, fan-out, training run or merge it awaits counts again
/// inside it ([`InHostCall`]). WASI's functions do not count.
///
/// Each such call ends on its own soon after the request's deadline (or
/// its client leaving) and reports what it used, so a run in one is left
/// to finish. A run past its deadline that is in none of them and not
/// computing either (the epoch would have stopped that) waits on something
/// of its own, such as a WASI sleep, that nothing else ends: the sandbox
/// cuts it there (`sandbox::stuck_past`).
///
/// The rest of a run's wall time the module held its instance and its
/// caller's place on its own, computing or waiting: [`RequestState::held_ms`],
/// charged as [`UsageReport::held_ms`] says. Model calls are charged by
/// their tokens instead, whatever they take.
#[derive(Debug, Default)]
pub(crate) struct HostCalls(std::sync::Mutex<CallClock>);

#[derive(Debug, Default)]
struct CallClock {
    active: usize,
    /// When `active` last rose from 0.
    since: Option<Instant>,
    /// Closed stretches with at least one call under way.
    awaited: Duration,
}

impl HostCalls {
    fn clock(&self) -> std::sync::MutexGuard<'_, CallClock> {
        // The clock is a count and two times, updated whole under the
        // lock: a panic elsewhere leaves nothing half-written.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn enter(self: &Arc<Self>) -> InHostCall {
        let mut c = self.clock();
        if c.active == 0 {
            c.since = Some(Instant::now());
        }
        c.active += 1;
        InHostCall(self.clone())
    }

    /// Host calls under way now.
    pub(crate) fn active(&self) -> usize {
        self.clock().active
    }

    /// Wall time so far with at least one host call under way.
    pub(crate) fn awaited(&self) -> Duration {
        let c = self.clock();
        c.awaited + c.since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// How long a run that started at `started` has held its instance outside
/// `calls`, in milliseconds.
pub(super) fn held_ms_since(started: Instant, calls: &HostCalls) -> u64 {
    let held = started.elapsed().saturating_sub(calls.awaited());
    u64::try_from(held.as_millis()).unwrap_or(u64::MAX)
}

/// A host call counted in [`HostCalls`] while it is under way.
pub(super) struct InHostCall(Arc<HostCalls>);

impl Drop for InHostCall {
    fn drop(&mut self) {
        let mut c = self.0.clock();
        c.active = c.active.saturating_sub(1);
        if c.active == 0 {
            if let Some(t) = c.since.take() {
                c.awaited += t.elapsed();
            }
        }
    }
}

/// What a request's training has spent: runs, steps, tokens, time.
#[derive(Debug, Default, Clone)]
pub(super) struct TrainSpent {
    pub(super) runs: u32,
    pub(super) steps: u32,
    pub(super) tokens: u64,
    pub(super) time: Duration,
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
            trainer: None,
            trained: Vec::new(),
            train_spent: TrainSpent::default(),
            cancel: None,
            output: Arc::new(std::sync::Mutex::new(super::output::Streamed::new(None))),
            models,
            grant,
            granted,
            deadline,
            started: Instant::now(),
            usage: UsageReport::default(),
            tokens_used: 0,
            provenance: Vec::new(),
            generated: Vec::new(),
            generated_bytes: 0,
            provenance_bytes: 0,
            trace_events: 0,
            requester: CallCtx::next_requester(),
            violation: None,
            host_calls: Arc::new(HostCalls::default()),
            members_charged: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Records `e` as this request's violation and returns the trap that
    /// unwinds the guest.
    pub(super) fn violate(&mut self, e: Error) -> wasmtime::Error {
        let msg = e.to_string();
        if self.violation.is_none() {
            self.violation = Some(e);
        }
        wasmtime::Error::msg(msg)
    }

    pub(super) fn charge_calls(&mut self, n: u32) -> wasmtime::Result<()> {
        let next = self.usage.host_calls.saturating_add(n);
        if next > self.grant.host_calls {
            return Err(self.violate(Error::budget("host-calls", self.grant.host_calls as u64)));
        }
        self.usage.host_calls = next;
        Ok(())
    }

    /// Ok(true): granted. Ok(false): not in the pool at all (the guest gets
    /// `unknown-model`). Err: in the pool but not granted (trap).
    pub(super) fn check_model(&mut self, model: &str) -> wasmtime::Result<bool> {
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

    /// What this request may still be charged after a call that reads
    /// `input_bytes` (a token per four bytes, the rule for inputs not yet
    /// tokenized), under its caller's [`Grant::charge_limit`]; `None` where
    /// there is none. A call whose input alone takes all that is left ends
    /// the request: it would be charged past its tenant's quota. Checked
    /// before every call that runs a member, so a module can pass the
    /// limit by at most what one call's estimate misses.
    pub(super) fn quota_room(&mut self, input_bytes: usize) -> wasmtime::Result<Option<u64>> {
        let Some(limit) = self.grant.charge_limit else {
            return Ok(None);
        };
        self.bring_held_up_to_date();
        let left = limit.saturating_sub(self.usage.charged());
        let need = crate::inference::tokens_for_bytes(input_bytes);
        if need >= left {
            return Err(self.violate(Error::budget(QUOTA_BUDGET, limit)));
        }
        Ok(Some(left - need))
    }

    /// Brings the held time in `usage` up to date and publishes what the
    /// members were charged for the sandbox's quota watch
    /// ([`RequestState::members_charged`]): before each check against the
    /// caller's quota.
    pub(super) fn bring_held_up_to_date(&mut self) {
        self.usage.held_ms = self.held_ms();
        self.members_charged
            .store(self.usage.charged_for_members(), Ordering::Relaxed);
    }

    /// How long this run has held its instance outside host calls
    /// ([`HostCalls`]), in milliseconds.
    pub(super) fn held_ms(&self) -> u64 {
        held_ms_since(self.started, &self.host_calls)
    }

    fn remaining_tokens(&self) -> u32 {
        self.grant.tokens.saturating_sub(self.tokens_used)
    }

    fn call_ctx(&self) -> CallCtx {
        CallCtx::new(self.deadline, self.requester)
    }

    pub(super) fn deadline_trap(&mut self) -> wasmtime::Error {
        let ms = self.grant.deadline.as_millis() as u64;
        self.violate(Error::Deadline { limit_ms: ms })
    }

    pub(super) fn record_call(
        &mut self,
        call: &str,
        model: &str,
        prompt: u32,
        completion: u32,
        took: Duration,
        outcome: &str,
    ) -> wasmtime::Result<()> {
        self.record_model_call(call, model, (prompt, completion, 0), took, outcome)
    }

    /// [`Self::record_call`] for a call that ran a prompt, with its
    /// `(prompt, completion, cached)` tokens: the cached ones (read from the
    /// member's prefix cache) also count in the request's usage.
    pub(super) fn record_model_call(
        &mut self,
        call: &str,
        model: &str,
        tokens: (u32, u32, u32),
        took: Duration,
        outcome: &str,
    ) -> wasmtime::Result<()> {
        let (prompt, completion, cached) = tokens;
        self.usage.cached_tokens += u64::from(cached);
        self.push_event(ProvenanceEvent::HostCall {
            call: call.into(),
            model: clip(model.to_string(), MAX_MODEL_BYTES),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            start_ms: self.started.elapsed().saturating_sub(took).as_millis() as u64,
            ms: took.as_millis() as u64,
            outcome: outcome.into(),
        })
    }

    /// Keeps what `model` generated for the answer's attribution, while the
    /// request's kept text stays under [`MAX_KEPT_TEXT_BYTES`]; past it the
    /// rest is not kept (attribution then covers the earlier generations).
    fn keep_text(&mut self, model: &str, text: &str) {
        if self.generated_bytes + text.len() <= MAX_KEPT_TEXT_BYTES {
            self.generated_bytes += text.len();
            self.generated.push((model.to_string(), text.to_string()));
        }
    }

    /// Appends `e` to the provenance, counting it against the request's
    /// provenance budget; past the budget the request ends (`budget-exhausted:
    /// provenance-bytes`), since the provenance goes back to the caller.
    fn push_event(&mut self, e: ProvenanceEvent) -> wasmtime::Result<()> {
        let next = self.provenance_bytes.saturating_add(event_bytes(&e));
        if next > self.grant.provenance_bytes {
            return Err(self.violate(Error::budget("provenance-bytes", self.grant.provenance_bytes)));
        }
        self.provenance_bytes = next;
        self.provenance.push(e);
        Ok(())
    }

    /// `models.generate`, and `output.generate-streamed` when `streamed`:
    /// the same checks, budgets and record either way.
    pub(super) async fn generate_on(
        &mut self,
        model: String,
        input: w::Input,
        params: w::GenParams,
        streamed: bool,
    ) -> wasmtime::Result<Result<w::Generation, w::Error>> {
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        let input = input_in(input);
        if let Some(e) = oversized(&input, 0) {
            return Ok(Err(e));
        }
        let bytes = input.counted_bytes();
        let remaining = self.remaining_tokens();
        if remaining == 0 {
            return Err(self.violate(Error::budget("tokens", self.grant.tokens as u64)));
        }
        let room = within_room(self.quota_room(bytes)?);
        let mut params = params_in(params);
        params.max_tokens = Some(params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(remaining).min(room));
        let started = Instant::now();
        let call = if streamed { "generate-streamed" } else { "generate" };
        let cut = Cut {
            call,
            model: &model,
            bytes,
            started,
        };
        let stopped = Arc::new(AtomicBool::new(false));
        // A streamed generation's budget check waits until its usage is
        // charged: one stopped at the output budget has used its tokens.
        let (result, settled) = if streamed {
            let (sink, sent_before) = super::output::forwarder(&self.output, self.grant.output_bytes);
            let sink = self.stopping(stopped.clone(), Some(sink));
            let fut = self
                .models
                .generate_stream(self.stoppable_ctx(), &model, input, params, sink);
            let result = self.await_stoppable(cut, fut).await?;
            let settled = if stopped.load(Ordering::Relaxed) {
                Ok(())
            } else {
                self.settle_stream(result.as_ref().ok().map(|g| g.text.as_str()), sent_before)
            };
            (result, settled)
        } else {
            let sink = self.stopping(stopped.clone(), None);
            let fut = self
                .models
                .generate_stream(self.stoppable_ctx(), &model, input, params, sink);
            (self.await_stoppable(cut, fut).await?, Ok(()))
        };
        let stopped = stopped.load(Ordering::Relaxed);
        let outcome = if stopped {
            "deadline".to_string()
        } else {
            outcome_of(&result)
        };
        let (p, c, k) = result
            .as_ref()
            .map(|g| (g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens))
            .unwrap_or((0, 0, 0));
        self.account_generation(p, c);
        self.record_model_call(call, &model, (p, c, k), started.elapsed(), &outcome)?;
        settled?;
        if stopped {
            return Err(self.deadline_trap());
        }
        if let Ok(g) = &result {
            self.keep_text(&model, &g.text);
        }
        Ok(result.map(generation_out).map_err(inference_error_out))
    }

    /// The context of a generation this request can stop through its sink
    /// ([`Self::stopping`]): the member's own deadline falls [`STOP_GRACE`]
    /// after the request's, as a backstop for a generation that emits no
    /// text by then.
    fn stoppable_ctx(&self) -> CallCtx {
        CallCtx::new(self.deadline + STOP_GRACE, self.requester)
    }

    /// A sink that stops its generation at the request's deadline, or when
    /// the request is cancelled (its client went away), raising `stopped`,
    /// and otherwise passes each piece on to `next`. A generation stopped
    /// this way comes back with its usage, which the request is charged;
    /// one cut by its own deadline would report none.
    fn stopping(&self, stopped: Arc<AtomicBool>, next: Option<TextSink>) -> TextSink {
        crate::inference::stop_at(self.deadline, self.cancel.clone(), stopped, next)
    }

    /// Awaits a generation made with [`Self::stoppable_ctx`]: until a little
    /// past the member's own deadline, so that one stopped by its sink can
    /// come back with its usage; past that, or ended by its own deadline
    /// (still in its prompt, where no sink is read), it ends the request and
    /// is charged as [`Self::charge_cut`] says.
    async fn await_stoppable<T>(
        &mut self,
        cut: Cut<'_>,
        fut: impl std::future::Future<Output = Result<T, crate::inference::InferenceError>>,
    ) -> wasmtime::Result<Result<T, crate::inference::InferenceError>> {
        match await_call(self.deadline, self.cancel.clone(), &self.host_calls, fut).await {
            None | Some(Err(crate::inference::InferenceError::Deadline)) => Err(self.charge_cut(&cut)),
            // Never ran: nothing to charge.
            Some(Err(crate::inference::InferenceError::Expired)) => Err(self.deadline_trap()),
            Some(result) => Ok(result),
        }
    }

    /// Charges and records a call the deadline ended without its usage, and
    /// returns the trap that ends the request. Its member worked on it
    /// until then, so it is charged its input's bytes / 4 as prompt tokens
    /// (the rule for a remote member that reports none) and recorded with
    /// the outcome `deadline`: otherwise long prompts cut by the deadline
    /// would be free.
    fn charge_cut(&mut self, cut: &Cut<'_>) -> wasmtime::Error {
        match self.record_cut(cut) {
            Ok(()) => self.deadline_trap(),
            Err(e) => e,
        }
    }

    /// [`Self::charge_cut`]'s charge and record, without the trap.
    fn record_cut(&mut self, cut: &Cut<'_>) -> wasmtime::Result<()> {
        let tokens = crate::inference::tokens_for_bytes(cut.bytes);
        self.usage.prompt_tokens += tokens;
        let shown = u32::try_from(tokens).unwrap_or(u32::MAX);
        self.record_call(cut.call, cut.model, shown, 0, cut.started.elapsed(), "deadline")
    }

    /// Awaits one model call that has no sink to stop it (`score`,
    /// `next-token`, `embed`); running past the deadline (while queued or
    /// while computing), or the client leaving, ends the request, and the
    /// call, which reports no usage then, is charged as
    /// [`Self::charge_cut`] says.
    async fn await_model<T>(
        &mut self,
        cut: Cut<'_>,
        fut: impl std::future::Future<Output = Result<T, crate::inference::InferenceError>>,
    ) -> wasmtime::Result<Result<T, crate::inference::InferenceError>> {
        match while_wanted(self.deadline, self.cancel.clone(), &self.host_calls, fut).await {
            Some(Err(crate::inference::InferenceError::Deadline)) | None => Err(self.charge_cut(&cut)),
            // Never ran: nothing to charge.
            Some(Err(crate::inference::InferenceError::Expired)) => Err(self.deadline_trap()),
            Some(result) => Ok(result),
        }
    }

    /// Awaits `fut` but no later than the request's deadline, and not once
    /// its client has left: the server gives up on a run soon after that,
    /// and a run that ends first returns what it used, which is charged.
    pub(super) async fn until_deadline<T>(&mut self, fut: impl std::future::Future<Output = T>) -> wasmtime::Result<T> {
        match while_wanted(self.deadline, self.cancel.clone(), &self.host_calls, fut).await {
            Some(v) => Ok(v),
            None => Err(self.deadline_trap()),
        }
    }
}

/// `fut`'s output, unless `deadline` passes or `cancel` is raised first
/// (`None`); counted in `calls` while awaited ([`InHostCall`]).
async fn while_wanted<F: std::future::Future>(
    deadline: Instant,
    cancel: Option<Arc<AtomicBool>>,
    calls: &Arc<HostCalls>,
    fut: F,
) -> Option<F::Output> {
    let _in_call = calls.enter();
    // The call first: one that is ready keeps its result (and its usage)
    // even if the client left in the same instant.
    tokio::select! {
        biased;
        r = tokio::time::timeout_at(deadline.into(), fut) => r.ok(),
        () = left(cancel) => None,
    }
}

/// Ends once `cancel` is raised (polled every [`CANCEL_POLL`]); never
/// without one.
pub(super) async fn left(cancel: Option<Arc<AtomicBool>>) {
    match cancel {
        Some(c) => {
            while !c.load(Ordering::Relaxed) {
                tokio::time::sleep(CANCEL_POLL).await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// A model call [`RequestState::await_model`] awaits: what it charges and
/// records if the deadline cuts it.
struct Cut<'a> {
    call: &'static str,
    model: &'a str,
    /// The input's bytes, as the input rule counts them.
    bytes: usize,
    started: Instant,
}

/// Awaits model calls made with [`RequestState::stoppable_ctx`] for a
/// request with `deadline`: at most until twice [`STOP_GRACE`] past it,
/// and once `cancel` is raised (the client left) at most [`STOP_GRACE`]
/// more, since a call in its prompt reads no sink and the run must end,
/// with what the earlier calls used, before the server drops it. `None`:
/// given up. Counted in `calls` while awaited ([`InHostCall`]).
async fn await_call<F: std::future::Future>(
    deadline: Instant,
    cancel: Option<Arc<AtomicBool>>,
    calls: &Arc<HostCalls>,
    fut: F,
) -> Option<F::Output> {
    let _in_call = calls.enter();
    tokio::pin!(fut);
    tokio::select! {
        biased;
        r = tokio::time::timeout_at((deadline + STOP_GRACE * 2).into(), &mut fut) => return r.ok(),
        () = left(cancel) => {}
    }
    tokio::time::timeout(STOP_GRACE, &mut fut).await.ok()
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
        let _busy = self.host_calls.enter();
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
        let _busy = self.host_calls.enter();
        self.generate_on(model, input, params, false).await
    }

    async fn fan_out(&mut self, jobs: Vec<w::Job>) -> wasmtime::Result<Vec<Result<w::Generation, w::Error>>> {
        let _busy = self.host_calls.enter();
        let n = jobs.len() as u32;
        if n == 0 {
            return Ok(Vec::new());
        }
        self.charge_calls(n)?;
        let mut known = Vec::with_capacity(jobs.len());
        for j in &jobs {
            known.push(self.check_model(&j.model)?);
        }
        let jobs: Vec<(String, crate::inference::Input, crate::inference::GenParams)> = jobs
            .into_iter()
            .map(|j| (j.model, input_in(j.input), params_in(j.params)))
            .collect();
        // Each job gets an equal share of what is left, so the jobs together
        // can never overrun the token budget however they finish; under a
        // quota, the same for what all their inputs leave of it.
        let remaining = self.remaining_tokens();
        let share = remaining / n;
        if share == 0 {
            return Err(self.violate(Error::budget("tokens", self.grant.tokens as u64)));
        }
        // What each job reads: nothing for one refused here (an unknown
        // member, an oversized input), which is also what a cut costs.
        let bytes: Vec<usize> = jobs
            .iter()
            .zip(&known)
            .map(|((_, input, _), ok)| {
                if *ok && input.check_size(0).is_ok() {
                    input.counted_bytes()
                } else {
                    0
                }
            })
            .collect();
        let room = self.quota_room(bytes.iter().sum())?;
        let share = share.min(within_room(room) / n);
        if share == 0 {
            let limit = self.grant.charge_limit.unwrap_or(0);
            return Err(self.violate(Error::budget(QUOTA_BUDGET, limit)));
        }
        let ctx = self.stoppable_ctx();
        let mut stops = Vec::with_capacity(jobs.len());
        let started = Instant::now();
        let mut futs = Vec::with_capacity(jobs.len());
        let mut names = Vec::with_capacity(jobs.len());
        type Ended = Option<((u32, u32, u32), Duration)>;
        let ended: Arc<std::sync::Mutex<Vec<Ended>>> = Arc::new(std::sync::Mutex::new(vec![None; jobs.len()]));
        for ((model, input, mut params), ok) in jobs.into_iter().zip(known) {
            names.push(model.clone());
            let stopped = Arc::new(AtomicBool::new(false));
            stops.push(stopped.clone());
            params.max_tokens = Some(params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(share));
            let fits = input.check_size(0);
            let fut = if !ok {
                let m = model.clone();
                Box::pin(async move { Err(crate::inference::InferenceError::UnknownModel(m)) })
            } else if let Err(e) = fits {
                Box::pin(async move { Err(e) })
            } else {
                let sink = self.stopping(stopped, None);
                self.models.generate_stream(ctx, &model, input, params, sink)
            };
            // Each job's own latency, not the whole fan-out's. A job that
            // ends leaves its usage in `ended` as well, where it is found
            // if the fan-out is given up before the other jobs end.
            let ended = ended.clone();
            let i = futs.len();
            futs.push(async move {
                let r = fut.await;
                let took = started.elapsed();
                if let Ok(g) = &r {
                    let u = (g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens);
                    if let Some(slot) = ended.lock().unwrap_or_else(|e| e.into_inner()).get_mut(i) {
                        *slot = Some((u, took));
                    }
                }
                (r, took)
            });
        }
        let all = futures::future::join_all(futs);
        let Some(results) = await_call(self.deadline, self.cancel.clone(), &self.host_calls, all).await else {
            // Given up (a job did not stop in time): the jobs that ended
            // are charged what they report, as if the fan-out had ended;
            // the others, which report nothing, each as one cut. All of
            // them are recorded, even if one passes the provenance budget.
            let ended: Vec<_> = ended.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut failed = None;
            for ((model, &bytes), ended) in names.iter().zip(&bytes).zip(ended) {
                let recorded = match ended {
                    Some(((p, c, k), took)) => {
                        self.account_generation(p, c);
                        self.record_model_call("generate", model, (p, c, k), took, "ok")
                    }
                    None => self.record_cut(&Cut {
                        call: "generate",
                        model,
                        bytes,
                        started,
                    }),
                };
                if let Err(e) = recorded {
                    failed.get_or_insert(e);
                }
            }
            return Err(failed.unwrap_or_else(|| self.deadline_trap()));
        };
        let stopped: Vec<bool> = stops.iter().map(|s| s.load(Ordering::Relaxed)).collect();
        let ran_out = results.iter().any(|(r, _)| {
            matches!(
                r,
                Err(crate::inference::InferenceError::Deadline | crate::inference::InferenceError::Expired)
            )
        });
        // Every job's usage is charged and recorded before the request ends
        // at its deadline: the ones that finished, and the ones stopped
        // there, which came back with theirs.
        let mut out = Vec::with_capacity(results.len());
        for ((((r, took), model), cut), bytes) in results.into_iter().zip(names).zip(&stopped).zip(bytes) {
            // A job its own deadline ended (still in its prompt) reports no
            // usage: charged its input's bytes / 4, as `charge_cut` does.
            let (p, c, k) = match &r {
                Ok(g) => (g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens),
                Err(crate::inference::InferenceError::Deadline) => (
                    u32::try_from(crate::inference::tokens_for_bytes(bytes)).unwrap_or(u32::MAX),
                    0,
                    0,
                ),
                Err(_) => (0, 0, 0),
            };
            self.account_generation(p, c);
            let outcome = if *cut { "deadline".to_string() } else { outcome_of(&r) };
            self.record_model_call("generate", &model, (p, c, k), took, &outcome)?;
            if let Ok(g) = &r {
                self.keep_text(&model, &g.text);
            }
            out.push(r.map(generation_out).map_err(inference_error_out));
        }
        if ran_out || stopped.contains(&true) {
            return Err(self.deadline_trap());
        }
        Ok(out)
    }

    async fn score(
        &mut self,
        model: String,
        prompt: w::Input,
        continuations: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<w::Scored>, w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        let prompt = input_in(prompt);
        let fits = prompt.check_with(&continuations).err().map(inference_error_out);
        if let Some(e) = too_many("continuations", continuations.len()).or(fits) {
            return Ok(Err(e));
        }
        let read = prompt.counted_bytes() + continuations.iter().map(String::len).sum::<usize>();
        self.quota_room(read)?;
        let cut = Cut {
            call: "score",
            model: &model,
            bytes: read,
            started: Instant::now(),
        };
        let fut = self.models.score(self.call_ctx(), &model, prompt, continuations);
        let started = cut.started;
        let result = self.await_model(cut, fut).await?;
        // The prompt is read once for all continuations: usage counts it
        // once, as prompt tokens, and the continuations as scored tokens.
        let (prompt, scored, cached) = result.as_ref().map_or((0, 0, 0), |v| {
            (
                v.first().map_or(0, |s| s.prompt_tokens),
                v.iter().map(|s| s.tokens).fold(0u32, u32::saturating_add),
                v.iter().map(|s| s.cached_tokens).max().unwrap_or(0),
            )
        });
        self.usage.prompt_tokens += u64::from(prompt);
        self.usage.scored_tokens += u64::from(scored);
        let outcome = outcome_of(&result);
        let read = prompt.saturating_add(scored);
        self.record_model_call("score", &model, (read, 0, cached), started.elapsed(), &outcome)?;
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
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        if top_k == 0 || top_k > 1000 {
            return Ok(Err(w::Error::InvalidParams(format!(
                "top-k {top_k} is out of range: use 1..=1000"
            ))));
        }
        let prompt = input_in(prompt);
        if let Some(e) = oversized(&prompt, 0) {
            return Ok(Err(e));
        }
        self.quota_room(prompt.counted_bytes())?;
        let cut = Cut {
            call: "next-token",
            model: &model,
            bytes: prompt.counted_bytes(),
            started: Instant::now(),
        };
        let fut = self.models.next_token(self.call_ctx(), &model, prompt, top_k);
        let started = cut.started;
        let result = self.await_model(cut, fut).await?;
        let outcome = outcome_of(&result);
        let prompt = result.as_ref().map_or(0, |v| v.first().map_or(0, |t| t.prompt_tokens));
        self.usage.prompt_tokens += u64::from(prompt);
        self.record_call("next-token", &model, prompt, 0, started.elapsed(), &outcome)?;
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
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        if !self.check_model(&model)? {
            return Ok(Err(w::Error::UnknownModel(model)));
        }
        let fits = crate::inference::Input::check_texts(&texts)
            .err()
            .map(inference_error_out);
        if let Some(e) = too_many("texts", texts.len()).or(fits) {
            return Ok(Err(e));
        }
        let read = texts.iter().map(String::len).sum();
        self.quota_room(read)?;
        let cut = Cut {
            call: "embed",
            model: &model,
            bytes: read,
            started: Instant::now(),
        };
        let fut = self.models.embed(self.call_ctx(), &model, texts);
        let started = cut.started;
        let result = self.await_model(cut, fut).await?;
        let outcome = outcome_of(&result);
        let tokens = result.as_ref().map_or(0, |e| e.tokens);
        self.usage.prompt_tokens += tokens;
        let shown = u32::try_from(tokens).unwrap_or(u32::MAX);
        self.record_call("embed", &model, shown, 0, started.elapsed(), &outcome)?;
        Ok(result.map(|e| e.vectors).map_err(inference_error_out))
    }
}

impl RequestState {
    fn account_generation(&mut self, prompt: u32, completion: u32) {
        self.tokens_used = self.tokens_used.saturating_add(completion);
        self.usage.prompt_tokens += prompt as u64;
        self.usage.completion_tokens += completion as u64;
    }
}

impl RequestState {
    /// The overlay every `models` call goes through: the pool plus the
    /// merged and trained members this request holds.
    pub(super) fn overlay(&self) -> Arc<dyn Models> {
        let extra = self
            .merged
            .iter()
            .chain(self.trained.iter().map(|t| &t.member))
            .map(|m| (m.id.clone(), m.models.clone()))
            .collect();
        Arc::new(crate::inference::weights::Overlay::new(self.pool.clone(), extra))
    }

    /// Bytes the merged and trained members this request holds take
    /// together.
    pub(super) fn held_merge_bytes(&self) -> u64 {
        self.merged.iter().map(|m| m.bytes).sum::<u64>() + self.trained.iter().map(|t| t.member.bytes).sum::<u64>()
    }
}

impl weights::Host for RequestState {
    async fn merge(&mut self, spec: weights::MergeSpec) -> wasmtime::Result<Result<String, w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        if self.merges_made >= self.grant.merges {
            return Err(self.violate(Error::budget("merges", self.grant.merges as u64)));
        }
        for m in spec.models.iter().chain(spec.base.iter()) {
            if !self.check_model(m)? {
                return Ok(Err(w::Error::UnknownModel(m.clone())));
            }
        }
        // The merge holds every listed model's copy of a tensor at once, so
        // a member named a thousand times would take a thousand copies
        // (gigabytes) in one call. Distinct names bound the list by the
        // members this module was granted.
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = spec.models.iter().find(|m| !seen.insert(m.as_str())) {
            return Ok(Err(w::Error::InvalidParams(format!(
                "`{twice}` is listed twice in the merge: name each member once and give it a larger weight instead"
            ))));
        }
        // Merges of the same members have the same size, so the largest one
        // held so far predicts the next: a merge that would take the held
        // members past the request's merge memory is refused before it
        // costs anything. (The first merge is one member's worth.)
        let largest = self.merged.iter().map(|m| m.bytes).max().unwrap_or(0);
        if largest > 0 && self.held_merge_bytes() + largest > self.grant.merge_memory_bytes {
            let held = self.merged.len();
            let cap_mib = self.grant.merge_memory_bytes >> 20;
            return Ok(Err(w::Error::InvalidParams(format!(
                "{held} merged member(s) held take {} MiB and another would pass this request's \
                 merge memory of {cap_mib} MiB: `release` one first",
                self.held_merge_bytes() >> 20
            ))));
        }
        let Some(merger) = self.merger.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not merge weights".into())));
        };
        use crate::inference::weights::Method as M;
        let method = match spec.method {
            weights::MergeMethod::Linear => M::Linear,
            weights::MergeMethod::TaskArithmetic => M::TaskArithmetic,
            weights::MergeMethod::Ties(density) => M::Ties { density },
            weights::MergeMethod::Dare(density) => M::Dare { density },
            weights::MergeMethod::DareTies(density) => M::DareTies { density },
            weights::MergeMethod::Slerp(t) => M::Slerp { t },
            weights::MergeMethod::Expo(alpha) => M::Expo { alpha },
        };
        let recipe = crate::inference::weights::MergeSpec {
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
            Ok(merged) => {
                self.record_call("merge", &shown, 0, 0, started.elapsed(), "ok")?;
                let id = merged.id.clone();
                if !self.merged.iter().any(|m| m.id == id) {
                    self.merges_made += 1;
                    self.merged.push(merged);
                    self.models = self.overlay();
                }
                self.granted.insert(id.clone());
                Ok(Ok(id))
            }
            Err(crate::inference::weights::MergeFailed::Invalid(e)) => {
                self.record_call("merge", &shown, 0, 0, started.elapsed(), "invalid-params")?;
                Ok(Err(w::Error::InvalidParams(e)))
            }
            Err(crate::inference::weights::MergeFailed::Host(e)) => {
                self.record_call("merge", &shown, 0, 0, started.elapsed(), "inference-failed")?;
                Ok(Err(w::Error::InferenceFailed(e)))
            }
        }
    }

    async fn release(&mut self, model: String) -> wasmtime::Result<Result<(), w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        let Some(at) = self.merged.iter().position(|m| m.id == model) else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        // Dropping the request's handle lets the merger free the weights
        // once it no longer keeps the recipe itself. Whatever the module
        // does not release is dropped with the request's store.
        self.merged.remove(at);
        self.granted.remove(&model);
        self.models = self.overlay();
        self.record_call("release", &model, 0, 0, Duration::ZERO, "ok")?;
        Ok(Ok(()))
    }

    async fn keep(&mut self, model: String, name: String) -> wasmtime::Result<Result<(), w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        let Some(served) = self.merged.iter().find(|m| m.id == model).map(|m| m.models.clone()) else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        let Some(merger) = self.merger.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not merge weights".into())));
        };
        if self.pool.cards().iter().any(|c| c.id == name) {
            return Ok(Err(w::Error::InvalidParams(format!(
                "`{}` is already a member of the pool: choose another name",
                clip(name, MAX_MODEL_BYTES)
            ))));
        }
        match merger.keep(&name, &model, served) {
            Ok(()) => {
                self.record_call("keep", &format!("{model} as {name}"), 0, 0, Duration::ZERO, "ok")?;
                Ok(Ok(()))
            }
            Err(crate::inference::weights::KeepRefused::NotAllowed(why)) => Ok(Err(w::Error::Unsupported(why))),
            Err(crate::inference::weights::KeepRefused::Invalid(why)) => Ok(Err(w::Error::InvalidParams(why))),
            Err(crate::inference::weights::KeepRefused::Host(why)) => Ok(Err(w::Error::InferenceFailed(why))),
        }
    }
}

impl trace::Host for RequestState {
    async fn emit(&mut self, step: trace::Step) -> wasmtime::Result<()> {
        let _busy = self.host_calls.enter();
        if self.trace_events >= self.grant.trace_events {
            return Err(self.violate(Error::budget("trace-events", self.grant.trace_events as u64)));
        }
        self.trace_events += 1;
        // Every field is bounded, and the whole event counts against the
        // provenance budget: a module cannot grow the reply without limit.
        self.push_event(ProvenanceEvent::ModuleStep {
            model: step.model.map(|m| clip(m, MAX_MODEL_BYTES)),
            role: clip(step.role, MAX_ROLE_BYTES),
            note: clip(step.note, MAX_NOTE_BYTES),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awaited_time_is_the_union_of_overlapping_calls() {
        let calls = Arc::new(HostCalls::default());
        assert_eq!((calls.active(), calls.awaited()), (0, Duration::ZERO));
        let started = Instant::now();
        let first = calls.enter();
        std::thread::sleep(Duration::from_millis(30));
        let second = calls.enter();
        std::thread::sleep(Duration::from_millis(30));
        drop(first);
        assert_eq!(calls.active(), 1);
        std::thread::sleep(Duration::from_millis(30));
        drop(second);
        let (awaited, elapsed) = (calls.awaited(), started.elapsed());
        assert_eq!(calls.active(), 0);
        // 90 ms or more with a call awaited, counted once where two
        // overlapped: counted twice, it would pass the time that went by.
        assert!(
            awaited >= Duration::from_millis(90) && awaited <= elapsed,
            "{awaited:?} of {elapsed:?}"
        );
        // Time with none awaited is not counted.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(calls.awaited(), awaited);
    }
}

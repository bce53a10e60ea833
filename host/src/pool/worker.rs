//! A local member's worker: the thread that owns the member's backend, and
//! the order in which it serves what is queued for it.
//!
//! Every call to a local member becomes a [`Job`] on its worker's queue.
//! Generations go into the member's continuous batch
//! ([`crate::backends::gguf::decode::Engine`]): between any two steps the
//! worker admits waiting generations while there is room (up to the pool's
//! `max_batch` in flight), runs one other call (a score, an embedding, a
//! next-token), and drops the sequences whose caller has gone. So a request
//! waits for one step of the others, not for all of their work, and a
//! long prompt is prefilled a chunk at a time between everyone else's
//! steps.
//!
//! Who goes next is fair between requests ([`FairQueue`]): the next job is
//! the oldest of the request served longest ago, so a request that queued a
//! fan-out of many calls takes turns with the others. A request has at most
//! one *long* prompt ([`LONG_PROMPT_BYTES`]) in the batch at a time, so a
//! flood of long prompts from one request cannot fill every place in it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::backends::gguf::decode::{Engine, GenRequest, Sink};
use crate::backends::{panic_message, Backend};
use crate::inference::{CallCtx, GenParams, Generation, InferenceError, Input, TextSink};

/// A call other than a generation, run on the worker's backend.
pub(super) type Call = Box<dyn FnOnce(&mut Backend) + Send>;

/// Work for a member's worker thread.
pub(super) enum Job {
    /// Any call, run on its own between steps, on behalf of a requester.
    Run(u64, Call),
    /// A generation, which joins the member's continuous batch.
    Generate(GenerateJob),
}

/// A generation as queued: what to run and where its result goes.
pub(super) struct GenerateJob {
    pub(super) ctx: CallCtx,
    pub(super) input: Input,
    pub(super) params: GenParams,
    pub(super) sink: Option<TextSink>,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<Generation, InferenceError>>,
}

impl Job {
    fn requester(&self) -> u64 {
        match self {
            Job::Run(r, _) => *r,
            Job::Generate(g) => g.ctx.requester,
        }
    }
}

/// A prompt longer than this (counted as [`Input::counted_bytes`], about
/// a thousand tokens) is *long*: a request has at most one in the batch.
pub(super) const LONG_PROMPT_BYTES: usize = 4096;

fn is_long(g: &GenerateJob) -> bool {
    g.input.counted_bytes() > LONG_PROMPT_BYTES
}

/// A member's waiting jobs, served fairly between requests: the next job
/// is the oldest of the request served longest ago.
#[derive(Default)]
pub(super) struct FairQueue {
    jobs: std::collections::VecDeque<Job>,
    /// Per requester, the turn it was last served on.
    last: std::collections::HashMap<u64, u64>,
    turn: u64,
}

impl FairQueue {
    pub(super) fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The index of the next job among those `keep` accepts.
    fn pick(&self, keep: impl Fn(&Job) -> bool) -> Option<usize> {
        self.jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| keep(j))
            .min_by_key(|(i, j)| (self.last.get(&j.requester()).copied().unwrap_or(0), *i))
            .map(|(i, _)| i)
    }

    fn take(&mut self, i: usize) -> Option<Job> {
        let job = self.jobs.remove(i)?;
        self.turn += 1;
        self.last.insert(job.requester(), self.turn);
        if self.last.len() > 4096 {
            // Forget requesters with nothing waiting; they start level again.
            let waiting: std::collections::HashSet<u64> = self.jobs.iter().map(Job::requester).collect();
            self.last.retain(|r, _| waiting.contains(r));
        }
        Some(job)
    }

    /// The next job of any kind, fairly.
    #[cfg(test)]
    fn pop(&mut self) -> Option<Job> {
        let i = self.pick(|_| true)?;
        self.take(i)
    }

    /// The next call that is not a generation, fairly.
    fn pop_run(&mut self) -> Option<Call> {
        let i = self.pick(|j| matches!(j, Job::Run(..)))?;
        match self.take(i)? {
            Job::Run(_, f) => Some(f),
            Job::Generate(_) => None,
        }
    }

    /// The next generation, fairly, skipping long prompts of requesters in
    /// `long_in_flight` (they already have one in the batch).
    fn pop_generation(&mut self, long_in_flight: &[u64]) -> Option<GenerateJob> {
        let i = self.pick(|j| match j {
            Job::Generate(g) => !(is_long(g) && long_in_flight.contains(&g.ctx.requester)),
            Job::Run(..) => false,
        })?;
        match self.take(i)? {
            Job::Generate(g) => Some(g),
            Job::Run(..) => None,
        }
    }
}

/// A sequence's place in the batch: where its result goes.
struct Slot {
    reply: tokio::sync::oneshot::Sender<Result<Generation, InferenceError>>,
    requester: u64,
    long: bool,
}

/// Serves `jobs` on `backend` until the queue's senders are all gone (the
/// pool was dropped); see the module docs for the order.
pub(super) fn serve(mut backend: Backend, jobs: mpsc::Receiver<Job>, max_batch: Arc<AtomicUsize>) {
    let mut waiting = FairQueue::default();
    let mut engine: Engine<'static, Slot> = Engine::default();
    loop {
        if waiting.is_empty() && engine.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push(job),
                Err(_) => break,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push(job);
        }
        // A caller that went away stops costing the member anything.
        engine.retain(|s| !s.reply.is_closed());
        admit(
            &mut backend,
            &mut engine,
            &mut waiting,
            max_batch.load(Ordering::Relaxed),
        );
        if let Some(call) = waiting.pop_run() {
            call(&mut backend);
        }
        if !engine.is_empty() {
            step(&mut backend, &mut engine);
        }
    }
    // The pool was dropped (a merged member released, say): the model's
    // memory goes back to the system, not to this thread's arena, where
    // nothing would reuse it.
    drop(backend);
    crate::alloc::return_freed_memory();
}

/// Moves waiting generations into the batch while it has room. Jobs whose
/// caller is gone, or whose deadline passed while queued, are dropped
/// without running.
fn admit(backend: &mut Backend, engine: &mut Engine<'static, Slot>, waiting: &mut FairQueue, limit: usize) {
    while engine.len() < limit.max(1) {
        let long_in_flight: Vec<u64> = engine.tags().filter(|s| s.long).map(|s| s.requester).collect();
        let Some(job) = waiting.pop_generation(&long_in_flight) else {
            return;
        };
        if job.reply.is_closed() {
            continue;
        }
        if Instant::now() >= job.ctx.deadline {
            let _ = job.reply.send(Err(InferenceError::Expired));
            continue;
        }
        let slot = Slot {
            requester: job.ctx.requester,
            long: is_long(&job),
            reply: job.reply,
        };
        let req = GenRequest {
            ctx: job.ctx,
            input: job.input,
            params: job.params,
            sink: job.sink.map(|s| s as Sink<'static>),
        };
        // Admission encodes the prompt; a tokenizer panic fails this job
        // alone (the slot is lost with it, so its caller sees a dropped job).
        match std::panic::catch_unwind(AssertUnwindSafe(|| backend.admit(engine, req, slot))) {
            Ok(Ok(())) => {}
            Ok(Err((slot, result))) => {
                let _ = slot.reply.send(result);
            }
            Err(p) => tracing::warn!("a generation panicked at admission: {}", panic_message(p)),
        }
    }
}

/// One step of the batch, answering the sequences that finished. A panic
/// inside the backend fails every sequence in flight: their caches are in
/// an unknown state.
fn step(backend: &mut Backend, engine: &mut Engine<'static, Slot>) {
    match std::panic::catch_unwind(AssertUnwindSafe(|| backend.step(engine))) {
        Ok(done) => {
            for (slot, result) in done {
                let _ = slot.reply.send(result);
            }
        }
        Err(p) => {
            let msg = panic_message(p);
            for slot in engine.drain() {
                let _ = slot
                    .reply
                    .send(Err(InferenceError::Failed(format!("backend panicked: {msg}"))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_job(requester: u64) -> Job {
        Job::Run(requester, Box::new(|_| {}))
    }

    #[test]
    fn a_members_queue_takes_turns_between_requests() {
        let mut q = FairQueue::default();
        for _ in 0..5 {
            q.push(run_job(1));
        }
        q.push(run_job(2));
        q.push(run_job(3));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|j| j.requester())).collect();
        // Request 1 queued five calls first, yet 2 and 3 are served after
        // its first one, not after all five.
        assert_eq!(order, vec![1, 2, 3, 1, 1, 1, 1]);
    }

    fn gen_job(requester: u64, prompt_bytes: usize) -> Job {
        let (reply, _) = tokio::sync::oneshot::channel();
        Job::Generate(GenerateJob {
            ctx: CallCtx::new(Instant::now(), requester),
            input: Input::Prompt("x".repeat(prompt_bytes)),
            params: GenParams::default(),
            sink: None,
            reply,
        })
    }

    #[test]
    fn a_request_has_one_long_prompt_in_the_batch_and_short_ones_freely() {
        let mut q = FairQueue::default();
        for _ in 0..4 {
            q.push(gen_job(1, 10_000));
        }
        for _ in 0..3 {
            q.push(gen_job(2, 10));
        }
        let mut in_flight = Vec::new();
        let mut admitted = Vec::new();
        while let Some(g) = q.pop_generation(&in_flight) {
            if is_long(&g) {
                in_flight.push(g.ctx.requester);
            }
            admitted.push(g.ctx.requester);
        }
        let from_1 = admitted.iter().filter(|r| **r == 1).count();
        assert_eq!((from_1, admitted.len()), (1, 4), "request 1's other long prompts wait");
        assert_eq!(q.jobs.len(), 3);
        // Once its long prompt is done, the next one may go in.
        assert!(q.pop_generation(&[]).is_some_and(|g| g.ctx.requester == 1));
    }

    #[test]
    fn other_calls_are_taken_apart_from_generations() {
        let mut q = FairQueue::default();
        q.push(gen_job(1, 10));
        q.push(run_job(2));
        assert!(q.pop_run().is_some());
        assert!(q.pop_run().is_none());
        assert!(q.pop_generation(&[]).is_some());
    }
}

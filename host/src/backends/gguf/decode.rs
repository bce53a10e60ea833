//! Generation: one sequence, or many decoded together, continuously.
//!
//! On a CPU, decoding one token of a small model is bound by reading the
//! weights from memory, not by arithmetic. Decoding several sequences in the
//! same forward pass reads each weight matrix once for all of them, so a
//! member serving concurrent requests gets more tokens per second from the
//! same memory traffic. Each sequence keeps its own prompt, sampler, KV cache
//! and stopping rules; every decode step runs the batch's projections and
//! MLPs as one `[n, hidden]` matmul while attention runs per sequence over
//! that sequence's own cache (positions differ, so there is no padding).
//!
//! The batch is continuous ([`Engine`]): the member's worker admits new
//! sequences between any two steps and a sequence that finishes leaves at
//! once, so a request never waits for a whole batch to drain. A prompt is
//! prefilled in chunks of [`super::PREFILL_CHUNK`] tokens, the prompt with
//! the least left first, interleaved with the decode steps of the sequences
//! already running (one chunk every few steps while any are decoding): a
//! long prompt delays the others by a chunk at a time, never by its whole
//! length. A sequence's chunks fall on the same boundaries whatever else is
//! running, and a decode step computes each row as it would alone, so the
//! output of a sequence does not depend on its company (tested).
//!
//! Samples of one prompt (a vote over one member, several choices of one
//! request) share it: a sequence whose prompt a running sequence has
//! already prefilled takes that cache, truncated to the prompt, and the
//! logits at its end, so the prompt runs once and each decode step reads
//! its keys and values once for all of them.
//!
//! Memory is bounded per member: every sequence reserves KV room for its
//! prompt and its `max_tokens` when it is admitted, and the reservations of
//! the sequences running together never pass the member's KV budget
//! ([`GgufModel::set_kv_budget`]). A sequence that would pass it waits,
//! first come first served, holding no cache, until running ones finish;
//! one that would pass it alone is refused with the budget in its error.
//! Reserving the whole `max_tokens` up front, as vLLM's first scheduler
//! did, means a running sequence never has to be evicted mid-generation.
//!
//! Every CPU architecture runs a decode step of the whole batch as one
//! forward pass ([`super::llama::Llama::forward_batch`]); the wgpu backend
//! takes its sequences' steps one after another, still joining and leaving
//! between steps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;

/// Positions of room a sequence's cache buffers may hold beyond its tokens,
/// counted in its KV reservation.
pub use super::attention::KV_ROOM;
use super::llama::KvState;
use super::sample::Sampler;
use super::{chunk_at, failed, GgufModel};
use crate::inference::{
    CallCtx, FinishReason, GenParams, Generation, InferenceError, Input, Usage, DEFAULT_MAX_TOKENS,
};

static BATCHED_STEPS: AtomicU64 = AtomicU64::new(0);
static JOINED_RUNNING: AtomicU64 = AtomicU64::new(0);
static BATCHED_PREFILLS: AtomicU64 = AtomicU64::new(0);
static WAITED_FOR_KV: AtomicU64 = AtomicU64::new(0);
static SHARED_PROMPTS: AtomicU64 = AtomicU64::new(0);

/// How many tokens `a` and `b` begin with alike.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Decode steps so far, in this process, that ran more than one sequence in
/// one forward pass (for tests and benches to see batching happen).
pub fn batched_steps() -> u64 {
    BATCHED_STEPS.load(Ordering::Relaxed)
}

/// Prefill steps so far, in this process, that ran chunks of more than one
/// prompt in one forward pass.
pub fn batched_prefills() -> u64 {
    BATCHED_PREFILLS.load(Ordering::Relaxed)
}

/// Sequences so far, in this process, that were admitted into an engine
/// already running other sequences, after its first step (for tests to see
/// the batch being continuous rather than formed once).
pub fn joined_running() -> u64 {
    JOINED_RUNNING.load(Ordering::Relaxed)
}

/// Sequences so far, in this process, that were admitted while the KV
/// budget was spoken for and waited for room (for tests and benches to see
/// the bound act).
pub fn waited_for_kv() -> u64 {
    WAITED_FOR_KV.load(Ordering::Relaxed)
}

/// Sequences so far, in this process, that took the cache and logits of a
/// running sequence with the same prompt instead of prefilling it (for
/// tests and benches to see prompts shared).
pub fn shared_prompts() -> u64 {
    SHARED_PROMPTS.load(Ordering::Relaxed)
}

/// One generation to run, borrowing its inputs ([`GgufModel::generate_batch`]).
pub struct GenJob<'a> {
    /// When to give up.
    pub ctx: CallCtx,
    /// The prompt.
    pub input: &'a Input,
    /// Decoding parameters.
    pub params: &'a GenParams,
    /// Where streamed text goes, if anywhere.
    pub sink: Option<&'a mut dyn FnMut(&str) -> bool>,
}

/// Where a sequence's streamed text goes: a callback that returns `false`
/// when its listener has gone (decoding of that sequence then stops).
pub type Sink<'s> = Box<dyn FnMut(&str) -> bool + 's>;

/// One generation handed to an [`Engine`], owning what it needs across the
/// steps it stays in flight.
pub struct GenRequest<'s> {
    /// When to give up.
    pub ctx: CallCtx,
    /// The prompt.
    pub input: Input,
    /// Decoding parameters.
    pub params: GenParams,
    /// Where streamed text goes, if anywhere.
    pub sink: Option<Sink<'s>>,
}

/// A sequence in flight.
struct Seq<'s> {
    ctx: CallCtx,
    params: GenParams,
    sink: Option<Sink<'s>>,
    /// The prompt's tokens, how many of them are in the cache, and how many
    /// of those came from the member's prefix cache.
    prompt: Vec<u32>,
    prefilled: usize,
    cached: usize,
    /// Whether the prefix cache was asked for the prompt's beginning (once,
    /// before its first chunk).
    looked_up: bool,
    max_new: usize,
    sampler: Sampler,
    /// The logits of the last position run (set once prefill is done).
    logits: Option<Tensor>,
    /// The logits at the prompt's end, kept for sequences with the same
    /// prompt that arrive while this one runs ([`Engine`]'s shared prompts).
    prompt_logits: Option<Tensor>,
    out: Vec<u32>,
    text: String,
    sent: usize,
    finish: FinishReason,
    /// Its KV caches while other sequences run.
    state: KvState,
}

/// The sequences a member is generating: prompts being prefilled, and
/// sequences decoding. Each carries the caller's `T` (where its result
/// goes), handed back with the result. Held by the member's worker between
/// steps; see the module docs.
pub struct Engine<'s, T> {
    prefilling: VecDeque<(T, Seq<'s>)>,
    decoding: Vec<(T, Seq<'s>)>,
    /// Admitted sequences waiting for KV room, oldest first; they hold no
    /// cache yet.
    waiting: VecDeque<(T, Seq<'s>)>,
    /// Steps taken since the engine was last empty.
    steps: u64,
    /// Decode steps since the last prefill chunk.
    since_prefill: usize,
}

/// Decode steps between two prefill chunks while sequences are decoding.
const DECODE_STEPS_PER_CHUNK: usize = 3;

impl<T> Default for Engine<'_, T> {
    fn default() -> Self {
        Engine {
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            waiting: VecDeque::new(),
            steps: 0,
            since_prefill: 0,
        }
    }
}

impl<T> Engine<'_, T> {
    /// Sequences about to prefill a prompt that a decoding sequence has
    /// already run (several samples of one prompt, a vote over one member)
    /// take its cache, truncated to the prompt, and its logits at the
    /// prompt's end instead: the prompt runs once, and every decode step
    /// reads its keys and values once for all of them
    /// ([`super::attention::LayerKv`]). A prompt computes the same whoever
    /// ran it (chunks fall on the same boundaries), so each sequence's
    /// output is what it would be alone (tested).
    fn share_prompts(&mut self) -> candle_core::Result<()> {
        let mut i = 0;
        while i < self.prefilling.len() {
            let seq = &self.prefilling[i].1;
            let donor = (seq.prefilled == 0)
                .then(|| {
                    self.decoding
                        .iter()
                        .map(|(_, d)| d)
                        .find(|d| d.prompt_logits.is_some() && d.prompt == seq.prompt)
                })
                .flatten();
            let Some(donor) = donor else {
                i += 1;
                continue;
            };
            let n = seq.prompt.len();
            let state = donor
                .state
                .iter()
                .map(|l| l.as_ref().map(|l| l.truncated(n)).transpose())
                .collect::<candle_core::Result<KvState>>()?;
            let logits = donor.prompt_logits.clone();
            if let Some((tag, mut seq)) = self.prefilling.remove(i) {
                seq.state = state;
                seq.logits = logits.clone();
                seq.prompt_logits = logits;
                seq.prefilled = n;
                seq.cached = n;
                self.decoding.push((tag, seq));
                SHARED_PROMPTS.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Sequences in flight, those waiting for KV room included.
    pub fn len(&self) -> usize {
        self.prefilling.len() + self.decoding.len() + self.waiting.len()
    }

    /// Sequences waiting for KV room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Tokens of KV cache the running sequences (prefilling or decoding)
    /// have reserved: each its prompt plus its `max_tokens`.
    pub fn reserved_tokens(&self) -> usize {
        self.prefilling
            .iter()
            .map(|(_, s)| s.reserve())
            .chain(self.decoding.iter().map(|(_, s)| s.reserve()))
            .sum()
    }

    /// Starts waiting sequences, oldest first, while their reservations fit
    /// in `budget` tokens beside the running ones (the oldest always starts
    /// when nothing runs: it fits alone, or it would have been refused).
    fn start_waiting(&mut self, budget: usize) {
        let mut running = self.reserved_tokens();
        while let Some((_, s)) = self.waiting.front() {
            if running > 0 && running + s.reserve() > budget {
                return;
            }
            running += s.reserve();
            if let Some(w) = self.waiting.pop_front() {
                self.prefilling.push_back(w);
            }
        }
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `T`s of the sequences in flight.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.prefilling
            .iter()
            .map(|(t, _)| t)
            .chain(self.decoding.iter().map(|(t, _)| t))
            .chain(self.waiting.iter().map(|(t, _)| t))
    }

    /// Drops the sequences whose `T` fails `keep` (their caller is gone):
    /// cancellation between steps. Returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> usize {
        let before = self.len();
        self.prefilling.retain(|(t, _)| keep(t));
        self.decoding.retain(|(t, _)| keep(t));
        self.waiting.retain(|(t, _)| keep(t));
        before - self.len()
    }

    /// Removes every sequence, handing back their `T`s (after a step
    /// panicked, when their state cannot be trusted).
    pub fn drain(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.prefilling.drain(..).map(|(t, _)| t).collect();
        out.extend(self.decoding.drain(..).map(|(t, _)| t));
        out.extend(self.waiting.drain(..).map(|(t, _)| t));
        out
    }
}

/// How much of `text` a stream may send now: all of it, less a tail that is
/// the beginning of some stop sequence (it may yet be cut) or a run of
/// replacement characters (a multi-byte character whose other bytes are in
/// the next tokens). The whole run is held: a SentencePiece byte-fallback
/// decoder writes one replacement character per byte of an unfinished
/// character, so after two bytes of a three-byte one the text ends in two;
/// sending the first moved the stream's offset past bytes the finished
/// character later took, which garbled it (or, past a character boundary,
/// stopped the stream).
fn settled_len(text: &str, stops: &[String]) -> usize {
    let end = text.trim_end_matches('\u{FFFD}').len();
    let mut hold = 0;
    for stop in stops {
        for (k, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..k]) {
                hold = hold.max(k);
            }
        }
    }
    end - hold
}

/// Byte offset of the earliest stop sequence in `text`, if any.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

impl Seq<'_> {
    /// Takes the next token from its logits. `Ok(true)`: the sequence is
    /// finished (its `finish` says why); `Ok(false)`: it needs a forward step
    /// for the token it just took.
    fn advance(&mut self, model: &GgufModel) -> Result<bool, InferenceError> {
        if Instant::now() >= self.ctx.deadline {
            return Err(InferenceError::Deadline);
        }
        let logits = self
            .logits
            .as_ref()
            .ok_or_else(|| InferenceError::Failed("a sequence decoded before its prompt was run".into()))?;
        let row = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).map_err(failed)?;
        let next = self.sampler.sample(row).map_err(InferenceError::Failed)?;
        if model.tok.end_of_turn.contains(&next) {
            self.finish = FinishReason::Eos;
            return Ok(true);
        }
        self.out.push(next);
        let stops = &self.params.stop;
        // Stop sequences are matched on text, so only then (or when
        // streaming) is the text rebuilt every step.
        if !stops.is_empty() || self.sink.is_some() {
            self.text = model.decode(&self.out)?;
            if let Some(cut) = earliest_stop(&self.text, stops) {
                self.text.truncate(cut);
                self.finish = FinishReason::StopSequence;
                return Ok(true);
            }
        }
        if let Some(sink) = self.sink.as_mut() {
            let settled = settled_len(&self.text, stops);
            if settled > self.sent && self.text.is_char_boundary(self.sent) {
                if !sink(&self.text[self.sent..settled]) {
                    return Ok(true);
                }
                self.sent = settled;
            }
        }
        Ok(self.out.len() >= self.max_new)
    }

    /// Tokens of KV cache this sequence may hold: its prompt, its new
    /// tokens, and the room its cache buffers may have beyond them
    /// ([`KV_ROOM`]).
    fn reserve(&self) -> usize {
        self.prompt.len() + self.max_new + KV_ROOM
    }

    fn position(&self) -> usize {
        self.prompt.len() + self.out.len() - 1
    }

    fn finish(mut self, model: &GgufModel) -> Result<Generation, InferenceError> {
        if self.finish != FinishReason::StopSequence {
            self.text = model.decode(&self.out)?;
        }
        if let Some(sink) = self.sink.as_mut() {
            if self.text.len() > self.sent && self.text.is_char_boundary(self.sent) {
                sink(&self.text[self.sent..]);
            }
        }
        Ok(Generation {
            model: model.id.clone(),
            text: self.text,
            finish: self.finish,
            usage: Usage {
                prompt_tokens: self.prompt.len() as u32,
                completion_tokens: self.out.len() as u32,
                cached_tokens: self.cached as u32,
            },
        })
    }
}

/// A finished sequence: its caller's `T` and its result.
pub type Done<T> = (T, Result<Generation, InferenceError>);

impl GgufModel {
    /// Puts `req` into `engine` to be prefilled from its next step. A
    /// request that cannot run (bad parameters, a prompt longer than the
    /// context) is handed back at once with its error.
    pub fn admit<'s, T>(&mut self, engine: &mut Engine<'s, T>, req: GenRequest<'s>, tag: T) -> Result<(), Done<T>> {
        let seq = match self.seq(req) {
            Ok(seq) => seq,
            Err(e) => return Err((tag, Err(e))),
        };
        let budget = self.kv_budget_tokens();
        if seq.reserve() > budget {
            let per = self.kv_bytes_per_token();
            let mib = |tokens: usize| (tokens * per).div_ceil(1 << 20);
            return Err((
                tag,
                Err(InferenceError::InvalidParams(format!(
                    "the prompt ({} tokens) and max_tokens ({}) need {} MiB of KV cache on `{}`, more than \
                     its budget for all running generations of {} MiB: lower max_tokens or shorten the \
                     prompt (the operator sets the budget with --kv-budget-mb)",
                    seq.prompt.len(),
                    seq.max_new,
                    mib(seq.reserve()),
                    self.id,
                    mib(budget)
                ))),
            ));
        }
        if engine.steps > 0 && !engine.is_empty() {
            JOINED_RUNNING.fetch_add(1, Ordering::Relaxed);
        }
        // Behind any that already wait, then started if it fits: still
        // waiting afterwards means it is the last in the queue.
        engine.waiting.push_back((tag, seq));
        engine.start_waiting(budget);
        if !engine.waiting.is_empty() {
            WAITED_FOR_KV.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The KV budget in tokens of this member.
    fn kv_budget_tokens(&self) -> usize {
        self.kv_budget / self.kv_bytes_per_token().max(1)
    }

    fn seq<'s>(&mut self, req: GenRequest<'s>) -> Result<Seq<'s>, InferenceError> {
        req.params.validate()?;
        let prompt = self.encode_input(&req.input)?;
        if prompt.is_empty() {
            return Err(InferenceError::InvalidParams(
                "the prompt is empty: give the model some text".into(),
            ));
        }
        let room = (self.facts.context_length as usize).saturating_sub(prompt.len());
        self.check_context(prompt.len() + 1)?;
        let max_new = (req.params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize).min(room);
        let seed = req.params.seed.unwrap_or_else(rand::random);
        let sampler = Sampler::new(seed, &req.params);
        Ok(Seq {
            ctx: req.ctx,
            params: req.params,
            sink: req.sink,
            prompt,
            prefilled: 0,
            cached: 0,
            looked_up: false,
            max_new,
            sampler,
            logits: None,
            prompt_logits: None,
            out: Vec::new(),
            text: String::new(),
            sent: 0,
            finish: FinishReason::Length,
            state: KvState::new(),
        })
    }

    /// One step of `engine`: a prefill chunk of the prompt with the least
    /// left (every step while nothing decodes, else every few steps), then
    /// one decode step of every sequence already decoding. Returns the
    /// sequences that finished.
    pub fn step_engine<T>(&mut self, engine: &mut Engine<'_, T>) -> Vec<Done<T>> {
        let done = self.step_all(engine);
        engine.steps = if engine.is_empty() { 0 } else { engine.steps + 1 };
        done
    }

    fn step_all<T>(&mut self, engine: &mut Engine<'_, T>) -> Vec<Done<T>> {
        let mut done = Vec::new();
        // Waiting sequences whose deadline passed end without running; the
        // rest start while their reservations fit.
        let now = Instant::now();
        let mut i = 0;
        while i < engine.waiting.len() {
            if now >= engine.waiting[i].1.ctx.deadline {
                if let Some((tag, _)) = engine.waiting.remove(i) {
                    done.push((tag, Err(InferenceError::Deadline)));
                }
            } else {
                i += 1;
            }
        }
        engine.start_waiting(self.kv_budget_tokens());
        if let Err(e) = engine.share_prompts() {
            // Sharing is an optimisation: on failure the sequences simply
            // prefill their prompts themselves.
            tracing::debug!("prompt sharing skipped: {e}");
        }
        // A prefill chunk costs about as much as a dozen decode steps of a
        // small model, so while sequences are decoding a chunk runs only
        // every few steps: a long prompt cannot slow everyone's tokens to
        // its pace. The prompt with the least left goes first, so a short
        // prompt waits for at most one chunk of a long one.
        let prefill_now = engine.decoding.is_empty() || engine.since_prefill >= DECODE_STEPS_PER_CHUNK;
        let shortest = engine
            .prefilling
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, s))| s.prompt.len() - s.prefilled)
            .map(|(i, _)| i);
        match shortest.filter(|_| prefill_now) {
            Some(i) => {
                engine.since_prefill = 0;
                let mut group = self.prefill_group(engine, i, &mut done);
                let ends: Vec<(usize, usize)> = group.iter().map(|(_, _, at)| *at).collect();
                let mut seqs: Vec<&mut Seq<'_>> = group.iter_mut().map(|(_, seq, _)| seq).collect();
                let results = self.prefill_chunks(&mut seqs, &ends);
                for ((tag, seq, _), r) in group.into_iter().zip(results) {
                    match r {
                        Err(e) => done.push((tag, Err(e))),
                        Ok(true) => engine.decoding.push((tag, seq)),
                        Ok(false) => engine.prefilling.push_back((tag, seq)),
                    }
                }
            }
            None => engine.since_prefill += 1,
        }
        let mut stepping = Vec::with_capacity(engine.decoding.len());
        for (tag, mut seq) in std::mem::take(&mut engine.decoding) {
            match seq.advance(self) {
                Ok(false) => stepping.push((tag, seq)),
                Ok(true) => {
                    let r = seq.finish(self);
                    done.push((tag, r));
                }
                Err(e) => done.push((tag, Err(e))),
            }
        }
        if stepping.is_empty() {
            return done;
        }
        let stepped = self.decode_step(&mut stepping);
        for ((tag, seq), r) in stepping.into_iter().zip(stepped) {
            match r {
                Ok(()) => engine.decoding.push((tag, seq)),
                Err(e) => done.push((tag, Err(e))),
            }
        }
        done
    }

    /// Takes the prompts whose next chunks run in this step out of
    /// `engine.prefilling`: the one at `first` (the least left), then the
    /// others from the least left, while their chunks take the same kernel
    /// (the tiles from [`tessera_kernels::amx::MIN_ROWS`] rows) and all of
    /// them together stay within one chunk's [`super::PREFILL_CHUNK`] rows,
    /// so a step costs about what one chunk did. Each comes with the end of
    /// its chunk and the chunk's row count; one past its deadline ends in
    /// `done` instead.
    ///
    /// Before its first chunk a prompt takes its longest cached beginning
    /// from the member's prefix cache. That is looked up when the prompt is
    /// taken, not at admission, so a prompt that begins like one running
    /// (the same system prompt, few-shot block or question, for at least a
    /// block of [`super::prefix::BLOCK`] tokens past what that one found
    /// cached, or the whole prompt) is left for a later step, when it finds
    /// those blocks in the cache, rather than computing them again beside it.
    #[allow(clippy::type_complexity)]
    fn prefill_group<'s, T>(
        &mut self,
        engine: &mut Engine<'s, T>,
        first: usize,
        done: &mut Vec<Done<T>>,
    ) -> Vec<(T, Seq<'s>, (usize, usize))> {
        let mut order: Vec<usize> = (0..engine.prefilling.len()).collect();
        order.sort_by_key(|&i| {
            let s = &engine.prefilling[i].1;
            (i != first, s.prompt.len() - s.prefilled)
        });
        let now = Instant::now();
        let (mut chosen, mut rows_in, mut tiles) = (Vec::new(), 0, None);
        let mut starting: Vec<usize> = Vec::new();
        for i in order {
            if rows_in >= super::PREFILL_CHUNK {
                break;
            }
            if now >= engine.prefilling[i].1.ctx.deadline {
                chosen.push((i, None));
                continue;
            }
            if !engine.prefilling[i].1.looked_up {
                let prompt = &engine.prefilling[i].1.prompt;
                // What the one running now will file beyond the blocks it
                // found cached.
                let overlaps = starting.iter().any(|&j| {
                    let other = &engine.prefilling[j].1;
                    other.prompt == *prompt
                        || common_prefix(&other.prompt, prompt) >= other.cached + super::prefix::BLOCK
                });
                if overlaps && tiles.is_some() {
                    continue;
                }
                let seq = &mut engine.prefilling[i].1;
                seq.looked_up = true;
                match self.prefix.lookup(&seq.prompt) {
                    Ok(Some(found)) => {
                        seq.state = found.state;
                        seq.prefilled = found.tokens;
                        seq.cached = found.tokens;
                    }
                    Ok(None) => {}
                    // The cache only saves work: a lookup that fails leaves
                    // the sequence as it was, and it prefills its whole
                    // prompt as on a miss.
                    Err(e) => tracing::warn!("prefix cache lookup on `{}` failed, prefilling in full: {e}", self.id),
                }
            }
            let seq = &engine.prefilling[i].1;
            let (end, rows) = chunk_at(seq.prefilled, seq.prompt.len());
            let kernel = rows >= tessera_kernels::amx::MIN_ROWS;
            let run = end - seq.prefilled;
            let fits = match tiles {
                None => true,
                Some(k) => k == kernel && rows_in + run <= super::PREFILL_CHUNK,
            };
            if fits {
                tiles = Some(kernel);
                rows_in += run;
                if seq.cached == seq.prefilled {
                    starting.push(i);
                }
                chosen.push((i, Some(Ok((end, rows)))));
            }
        }
        // Removed from the back so the indices stay valid.
        chosen.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut group = Vec::with_capacity(chosen.len());
        for (i, at) in chosen {
            let Some((tag, seq)) = engine.prefilling.remove(i) else {
                continue;
            };
            match at {
                None => done.push((tag, Err(InferenceError::Deadline))),
                Some(Err(e)) => done.push((tag, Err(e))),
                Some(Ok(at)) => group.push((tag, seq, at)),
            }
        }
        // The least left first again, so a lone prompt runs as before.
        group.sort_by_key(|(_, s, _)| s.prompt.len() - s.prefilled);
        group
    }

    /// Runs the next chunk of every prompt in `seqs` (chunk `i` ends at
    /// `at[i].0` and has `at[i].1` rows, from [`Self::prefill_group`]):
    /// a forward pass of its own for one prompt, else one pass for all
    /// ([`super::llama::Llama::forward_chunks`]),
    /// which gives each prompt the logits of its chunk run alone. Returns,
    /// per prompt, whether it is now wholly in the cache.
    fn prefill_chunks(
        &mut self,
        seqs: &mut [&mut Seq<'_>],
        at: &[(usize, usize)],
    ) -> Vec<Result<bool, InferenceError>> {
        if seqs.len() > 1 {
            let chunk_rows = at.iter().map(|a| a.1).min().unwrap_or(0);
            let mut states: Vec<KvState> = seqs.iter_mut().map(|s| std::mem::take(&mut s.state)).collect();
            let chunks: Vec<(&[u32], usize)> = seqs
                .iter()
                .zip(at)
                .map(|(s, (end, _))| (&s.prompt[s.prefilled..*end], s.prefilled))
                .collect();
            let logits = self
                .weights
                .forward_chunks(&chunks, chunk_rows, &mut states, &self.device);
            for (s, st) in seqs.iter_mut().zip(states) {
                s.state = st;
            }
            BATCHED_PREFILLS.fetch_add(1, Ordering::Relaxed);
            return match logits {
                Err(e) => {
                    let e = failed(e);
                    seqs.iter().map(|_| Err(e.clone())).collect()
                }
                Ok(logits) => seqs
                    .iter_mut()
                    .zip(at)
                    .enumerate()
                    .map(|(row, (s, (end, _)))| {
                        s.logits = Some(logits.get(row).map_err(failed)?);
                        self.chunk_done(s, *end)
                    })
                    .collect(),
            };
        }
        seqs.iter_mut()
            .zip(at)
            .map(|(seq, (end, rows))| {
                self.weights.put_state(std::mem::take(&mut seq.state));
                let logits = Self::step_chunk(
                    &mut self.weights,
                    &self.device,
                    &seq.prompt[seq.prefilled..*end],
                    seq.prefilled,
                    *rows,
                );
                seq.state = self.weights.take_state();
                seq.logits = Some(logits?);
                self.chunk_done(seq, *end)
            })
            .collect()
    }

    /// Records that `seq`'s prompt is in the cache up to `end`; a whole
    /// prompt keeps its logits for sequences that share it and is filed in
    /// the prefix cache. Returns whether the prompt is whole.
    fn chunk_done(&mut self, seq: &mut Seq<'_>, end: usize) -> Result<bool, InferenceError> {
        seq.prefilled = end;
        let done = end == seq.prompt.len();
        if done {
            seq.prompt_logits = seq.logits.clone();
            // Filing is for later prompts; this one's prefill succeeded and
            // its generation goes on whether or not it could be filed (the
            // cache files whole blocks only, so a failure leaves it as it
            // was plus the blocks filed before it).
            if let Err(e) = self.prefix.insert(&seq.prompt, &seq.state) {
                tracing::warn!("prefix cache insert on `{}` failed, not filed: {e}", self.id);
            }
        }
        Ok(done)
    }

    /// One decode step for every sequence in `seqs`, setting their logits:
    /// one forward pass over all of them (on the CPU architectures and on
    /// wgpu alike). Returns each sequence's outcome: a
    /// sequence that fails alone (the unbatched path, or its row of the
    /// batch's logits) fails alone, and the others go on; a failed batched
    /// pass fails every sequence in it.
    fn decode_step<T>(&mut self, seqs: &mut [(T, Seq<'_>)]) -> Vec<Result<(), InferenceError>> {
        if seqs.len() < 2 {
            // One sequence runs the plain path: the same numbers as a
            // batched row (both use the decode kernels), without the
            // batch's bookkeeping.
            return seqs
                .iter_mut()
                .map(|(_, seq)| {
                    let (last, pos) = (seq.out[seq.out.len() - 1], seq.position());
                    self.weights.put_state(std::mem::take(&mut seq.state));
                    let logits = Self::step(&mut self.weights, &self.device, &[last], pos);
                    seq.state = self.weights.take_state();
                    seq.logits = Some(logits?);
                    Ok(())
                })
                .collect();
        }
        BATCHED_STEPS.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<u32> = seqs.iter().map(|(_, s)| s.out[s.out.len() - 1]).collect();
        let pos: Vec<usize> = seqs.iter().map(|(_, s)| s.position()).collect();
        let mut states: Vec<KvState> = seqs.iter_mut().map(|(_, s)| std::mem::take(&mut s.state)).collect();
        let logits = self.weights.forward_batch(&ids, &pos, &mut states, &self.device);
        for ((_, s), st) in seqs.iter_mut().zip(states) {
            s.state = st;
        }
        match logits.map_err(failed) {
            Err(e) => seqs.iter().map(|_| Err(e.clone())).collect(),
            Ok(logits) => seqs
                .iter_mut()
                .enumerate()
                .map(|(row, (_, s))| {
                    s.logits = Some(logits.get(row).map_err(failed)?);
                    Ok(())
                })
                .collect(),
        }
    }

    /// Runs every job to completion and returns their results in order,
    /// through one [`Engine`] (so they decode together where the model
    /// batches).
    pub fn generate_batch(&mut self, jobs: Vec<GenJob<'_>>) -> Vec<Result<Generation, InferenceError>> {
        let mut results: Vec<Option<Result<Generation, InferenceError>>> = Vec::with_capacity(jobs.len());
        let mut engine = Engine::default();
        for (i, job) in jobs.into_iter().enumerate() {
            results.push(None);
            let req = GenRequest {
                ctx: job.ctx,
                input: job.input.clone(),
                params: job.params.clone(),
                sink: job.sink.map(|s| Box::new(move |t: &str| s(t)) as Sink<'_>),
            };
            if let Err((i, r)) = self.admit(&mut engine, req, i) {
                results[i] = Some(r);
            }
        }
        while !engine.is_empty() {
            for (i, r) in self.step_engine(&mut engine) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(InferenceError::Failed("generation ended without a result".into()))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{earliest_stop, settled_len};

    #[test]
    fn streaming_holds_back_a_possible_stop_and_a_split_character() {
        let stops = vec!["\n\nQ:".to_string()];
        assert_eq!(settled_len("Paris.\n", &stops), "Paris.".len());
        assert_eq!(settled_len("Paris.\n\nQ", &stops), "Paris.".len());
        assert_eq!(settled_len("Paris. Yes", &stops), "Paris. Yes".len());
        assert_eq!(settled_len("caf\u{FFFD}", &[]), 3);
        // Byte fallback: one replacement character per byte so far.
        assert_eq!(settled_len("caf\u{FFFD}\u{FFFD}", &[]), 3);
        assert_eq!(settled_len("\u{FFFD}\u{FFFD}\u{FFFD}", &[]), 0);
    }

    #[test]
    fn earliest_stop_picks_first_occurrence() {
        let stops = vec!["\n\n".to_string(), "Q:".to_string()];
        assert_eq!(earliest_stop("Paris.\nQ: next\n\nx", &stops), Some(7));
        assert_eq!(earliest_stop("Paris.", &stops), None);
    }
}

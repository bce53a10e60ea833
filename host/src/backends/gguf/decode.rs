//! Generation: one sequence, or several decoded together.
//!
//! On a CPU, decoding one token of a small model is bound by reading the
//! weights from memory, not by arithmetic. Decoding several sequences in the
//! same forward pass reads each weight matrix once for all of them, so a
//! member serving concurrent requests gets more tokens per second from the
//! same memory traffic. Each sequence keeps its own prompt, sampler, KV cache
//! and stopping rules: its prompt is prefilled alone, then every decode step
//! runs the batch's projections and MLPs as one `[n, hidden]` matmul while
//! attention runs per sequence over that sequence's own cache (positions
//! differ, so there is no padding to waste). A sequence that finishes leaves
//! the batch at once; its result does not wait for the others.
//!
//! Batching is implemented for the llama family ([`super::llama`]); other
//! architectures decode their sequences one after another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use super::{failed, GgufModel, Weights};
use crate::inference::{
    CallCtx, FinishReason, GenParams, Generation, InferenceError, Input, Usage, DEFAULT_MAX_TOKENS,
};

static BATCHED_STEPS: AtomicU64 = AtomicU64::new(0);

/// Decode steps so far, in this process, that ran more than one sequence in
/// one forward pass (for tests and benches to see batching happen).
pub fn batched_steps() -> u64 {
    BATCHED_STEPS.load(Ordering::Relaxed)
}

/// One generation to run.
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

/// A sequence in flight.
struct Seq<'a> {
    job: GenJob<'a>,
    prompt_len: usize,
    max_new: usize,
    sampler: LogitsProcessor,
    logits: Tensor,
    out: Vec<u32>,
    text: String,
    sent: usize,
    finish: FinishReason,
    /// Its KV caches while another sequence runs (batched decoding only).
    state: super::llama::KvState,
}

fn sampling(params: &GenParams) -> Sampling {
    let temperature = params.temperature.unwrap_or(0.0) as f64;
    if temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    match (params.top_k, params.top_p) {
        (Some(k), Some(p)) => Sampling::TopKThenTopP {
            k: k as usize,
            p: p as f64,
            temperature,
        },
        (Some(k), None) => Sampling::TopK {
            k: k as usize,
            temperature,
        },
        (None, Some(p)) => Sampling::TopP {
            p: p as f64,
            temperature,
        },
        (None, None) => Sampling::All { temperature },
    }
}

/// How much of `text` a stream may send now: all of it, less a tail that is
/// the beginning of some stop sequence (it may yet be cut) or ends in the
/// replacement character (a multi-byte character whose other bytes are in
/// the next token).
fn settled_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
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
        if Instant::now() >= self.job.ctx.deadline {
            return Err(InferenceError::Deadline);
        }
        let next = self.sampler.sample(&self.logits).map_err(failed)?;
        if model.tok.end_of_turn.contains(&next) {
            self.finish = FinishReason::Eos;
            return Ok(true);
        }
        self.out.push(next);
        let stops = &self.job.params.stop;
        // Stop sequences are matched on text, so only then (or when
        // streaming) is the text rebuilt every step.
        if !stops.is_empty() || self.job.sink.is_some() {
            self.text = model.decode(&self.out)?;
            if let Some(cut) = earliest_stop(&self.text, stops) {
                self.text.truncate(cut);
                self.finish = FinishReason::StopSequence;
                return Ok(true);
            }
        }
        if let Some(sink) = self.job.sink.as_deref_mut() {
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

    fn position(&self) -> usize {
        self.prompt_len + self.out.len() - 1
    }

    fn finish(mut self, model: &GgufModel) -> Result<Generation, InferenceError> {
        if self.finish != FinishReason::StopSequence {
            self.text = model.decode(&self.out)?;
        }
        if let Some(sink) = self.job.sink {
            if self.text.len() > self.sent && self.text.is_char_boundary(self.sent) {
                sink(&self.text[self.sent..]);
            }
        }
        Ok(Generation {
            model: model.id.clone(),
            text: self.text,
            finish: self.finish,
            usage: Usage {
                prompt_tokens: self.prompt_len as u32,
                completion_tokens: self.out.len() as u32,
            },
        })
    }
}

impl GgufModel {
    fn start<'a>(&mut self, job: GenJob<'a>) -> Result<Seq<'a>, InferenceError> {
        job.params.validate()?;
        let prompt = self.encode_input(job.input)?;
        let room = (self.facts.context_length as usize).saturating_sub(prompt.len());
        self.check_context(prompt.len() + 1)?;
        let max_new = (job.params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize).min(room);
        let seed = job.params.seed.unwrap_or_else(rand::random);
        let sampler = LogitsProcessor::from_sampling(seed, sampling(job.params));
        let logits = Self::prefill(&mut self.weights, &self.device, &prompt, job.ctx)?;
        let state = match &mut self.weights {
            Weights::Llama(m) => m.take_state(),
            _ => Vec::new(),
        };
        Ok(Seq {
            job,
            prompt_len: prompt.len(),
            max_new,
            sampler,
            logits,
            out: Vec::new(),
            text: String::new(),
            sent: 0,
            finish: FinishReason::Length,
            state,
        })
    }

    /// Runs every job to completion and returns their results in order.
    /// Llama-family models decode them together (see the module docs);
    /// others, or a single job, one at a time.
    pub fn generate_batch(&mut self, jobs: Vec<GenJob<'_>>) -> Vec<Result<Generation, InferenceError>> {
        if jobs.len() > 1 && !self.batches() {
            return jobs
                .into_iter()
                .map(|j| self.generate_batch(vec![j]).remove(0))
                .collect();
        }
        let single = jobs.len() == 1;
        let mut results: Vec<Option<Result<Generation, InferenceError>>> = Vec::new();
        let mut live: Vec<(usize, Seq<'_>)> = Vec::new();
        for (i, job) in jobs.into_iter().enumerate() {
            results.push(None);
            match self.start(job) {
                Ok(mut seq) => {
                    if single {
                        // One sequence decodes with its cache in the model.
                        if let Weights::Llama(m) = &mut self.weights {
                            m.put_state(std::mem::take(&mut seq.state));
                        }
                    }
                    live.push((i, seq));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while !live.is_empty() {
            let mut stepping = Vec::with_capacity(live.len());
            for (i, mut seq) in std::mem::take(&mut live) {
                match seq.advance(self) {
                    Ok(false) => stepping.push((i, seq)),
                    Ok(true) => results[i] = Some(seq.finish(self)),
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            if stepping.is_empty() {
                break;
            }
            match self.forward(&mut stepping, single) {
                Ok(()) => live = stepping,
                Err(e) => {
                    for (i, _) in stepping {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(InferenceError::Failed("generation ended without a result".into()))))
            .collect()
    }

    /// One decode step for every sequence in `seqs`, setting their logits.
    fn forward(&mut self, seqs: &mut [(usize, Seq<'_>)], single: bool) -> Result<(), InferenceError> {
        if single {
            let seq = &mut seqs[0].1;
            let (last, pos) = (seq.out[seq.out.len() - 1], seq.position());
            seq.logits = Self::step(&mut self.weights, &self.device, &[last], pos)?;
            return Ok(());
        }
        let Weights::Llama(m) = &mut self.weights else {
            return Err(InferenceError::Failed(
                "batched decoding needs a llama-family model".into(),
            ));
        };
        if seqs.len() > 1 {
            BATCHED_STEPS.fetch_add(1, Ordering::Relaxed);
        }
        let ids: Vec<u32> = seqs.iter().map(|(_, s)| s.out[s.out.len() - 1]).collect();
        let pos: Vec<usize> = seqs.iter().map(|(_, s)| s.position()).collect();
        let mut states: Vec<super::llama::KvState> =
            seqs.iter_mut().map(|(_, s)| std::mem::take(&mut s.state)).collect();
        let logits = m.forward_batch(&ids, &pos, &mut states, &self.device);
        for ((_, s), st) in seqs.iter_mut().zip(states) {
            s.state = st;
        }
        let logits = logits.map_err(failed)?;
        for (row, (_, s)) in seqs.iter_mut().enumerate() {
            s.logits = logits.get(row).map_err(failed)?;
        }
        Ok(())
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
    }

    #[test]
    fn earliest_stop_picks_first_occurrence() {
        let stops = vec!["\n\n".to_string(), "Q:".to_string()];
        assert_eq!(earliest_stop("Paris.\nQ: next\n\nx", &stops), Some(7));
        assert_eq!(earliest_stop("Paris.", &stops), None);
    }
}

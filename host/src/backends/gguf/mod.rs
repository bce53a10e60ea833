//! Quantized GGUF models run with candle on the CPU.
//!
//! One [`GgufModel`] owns one member's weights, its tokenizer (rebuilt from
//! the GGUF metadata, see [`tokenizer`]) and its chat format (see
//! [`template`]). It is driven by exactly one pool worker thread, so its
//! methods take `&mut self` and need no locking.
//!
//! Supported architectures, each in its own file written for Tessera: the
//! llama family ([`llama`]: `llama`, `qwen2`) and [`gemma3`]. Both keep
//! their KV cache inside the model struct and reset it when a forward starts
//! at position 0; cloning the struct shares the cached tensors, which is how
//! `score` reuses one prompt prefill for every continuation. Weight formats
//! candle only has scalar kernels for are re-encoded at load ([`quant`]).

pub mod adapter;
pub(crate) mod attention;
pub mod decode;
pub mod embedding;
pub mod gemma3;
pub mod hf;
pub mod llama;
pub mod prefix;
pub mod quant;
mod sample;
pub mod template;
pub mod tokenizer;

use std::fs::File;
use std::io::Seek;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};

use crate::backends::LoadError;
use crate::inference::{CallCtx, GenParams, Generation, InferenceError, Input, Scored, TokenLogprob};
use template::{ChatFormat, TemplateError};
use tokenizer::GgufTokenizer;

/// Files declare up to 32k positions; rotary tables and a KV cache that long
/// are more than a small CPU host should hold per member, so we serve up to
/// this many (the card reports it).
const MAX_POSITIONS: usize = 8192;
/// Prompt tokens run in one forward pass during prefill; the deadline is
/// checked between chunks (about a second of a 0.5B model on 2 cores).
pub(crate) const PREFILL_CHUNK: usize = 512;
/// Logits one scoring pass may hold, in f32 values (64 MiB): every row of a
/// continuation keeps its whole vocabulary's logits, so a pass takes at most
/// this over the vocabulary's size rows (Gemma's 262k: 64 rows).
const SCORE_LOGITS: usize = 16 << 20;
/// Bytes of keys and values a member's prefix cache holds unless told
/// otherwise ([`GgufModel::set_prefix_cache`]): about 5,000 prompt tokens of
/// SmolLM2-135M, 10,000 of Qwen2.5-0.5B.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 256 << 20;
/// Bytes of keys and values the sequences one member generates at once may
/// reserve together unless told otherwise ([`GgufModel::set_kv_budget`]):
/// 1 GiB is about 22,000 tokens of SmolLM2-135M (46 KiB each), 43,000 of
/// Qwen2.5-0.5B (24 KiB) and 29,000 of Gemma-3-270M (36 KiB): sixteen
/// sequences of 1,300 tokens or more on each, and a whole 8,192-token
/// context on any of them.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 1 << 30;

/// Where the prefill chunk holding position `start` of a `len`-token prompt
/// ends, and how many rows that whole chunk has: chunks fall on multiples
/// of [`PREFILL_CHUNK`] whatever part of the prompt came from the cache.
pub(crate) fn chunk_at(start: usize, len: usize) -> (usize, usize) {
    let begin = start / PREFILL_CHUNK * PREFILL_CHUNK;
    let end = (begin + PREFILL_CHUNK).min(len);
    (end, end - begin)
}

#[derive(Clone)]
enum Weights {
    Llama(Box<llama::Llama>),
    Gemma3(Box<gemma3::Gemma3>),
    /// The llama family or Gemma 3 on a wgpu device
    /// ([`crate::backends::webgpu`]):
    /// ids and logits cross as host tensors, the cache stays on the device
    /// except while another sequence of a batch runs.
    Wgpu(Box<crate::backends::webgpu::WgpuLlama>),
}

/// Where a member's weights go: a candle device, or the wgpu backend.
#[derive(Clone, Copy)]
enum Place<'a> {
    Candle(&'a Device),
    Wgpu,
}

fn gpu_msg(e: String) -> candle_core::Error {
    candle_core::Error::Msg(e)
}

/// Checks that each state's cache holds `pos[i]` tokens (none for a prompt
/// starting at 0): the wgpu device continues a state from its own length.
fn continues_at(states: &[llama::KvState], pos: &[usize]) -> candle_core::Result<()> {
    for (state, &p) in states.iter().zip(pos) {
        let len = state.first().and_then(Option::as_ref).map_or(0, |l| l.len());
        if len != p {
            candle_core::bail!("a sequence at position {p} holds a cache of {len} tokens");
        }
    }
    Ok(())
}

/// Rows of logits from the wgpu model as a `[rows, vocab]` host tensor.
fn gpu_logits(m: &crate::backends::webgpu::WgpuLlama, rows: Vec<f32>) -> candle_core::Result<Tensor> {
    let vocab = m.vocab();
    let n = rows.len() / vocab.max(1);
    Tensor::from_vec(rows, (n, vocab), &Device::Cpu)
}

/// One CPU forward pass at a time in the process, in arrival order.
///
/// candle's thread pool runs one operation at a time. When several
/// members' workers run passes together (a fan-out asks three members at
/// once), their operations interleave one by one, each handing the pool
/// over through a futex wake and bringing its own weights back into the
/// caches. Measured with `examples/host/contend.rs` (three members' 105-token
/// prompts): 1.25-1.67x as long from three threads at once as one after
/// another. So a pass takes this turn and runs whole; the lock is fair, so
/// a worker stepping in a loop hands the turn to a waiting one between its
/// passes (a decode step, or a prompt chunk of at most
/// [`PREFILL_CHUNK`] rows) and cannot starve it.
static TURN: parking_lot::FairMutex<()> = parking_lot::const_fair_mutex(());

/// Waits for [`TURN`] where `weights` compute on the CPU (a wgpu device
/// queues its own work).
fn turn(weights: &Weights) -> Option<parking_lot::FairMutexGuard<'static, ()>> {
    (!matches!(weights, Weights::Wgpu(_))).then(|| TURN.lock())
}

impl Weights {
    /// Rows `x` of a prompt chunk of `chunk_rows` rows from position `pos`
    /// (see [`llama::Llama::forward_chunk`]).
    fn forward_chunk(&mut self, x: &Tensor, pos: usize, chunk_rows: usize) -> candle_core::Result<Tensor> {
        let _turn = turn(self);
        match self {
            Weights::Llama(m) => m.forward_chunk(x, pos, chunk_rows),
            Weights::Gemma3(m) => m.forward_chunk(x, pos, chunk_rows),
            Weights::Wgpu(m) => {
                let ids: Vec<u32> = x.flatten_all()?.to_vec1()?;
                m.rewind(pos).map_err(gpu_msg)?;
                let rows = m
                    .forward(&ids, crate::backends::webgpu::llama::Logits::Last)
                    .map_err(gpu_msg)?;
                gpu_logits(m, rows)
            }
        }
    }

    /// Logits of every row of `segments`, each a continuation of the cache
    /// from `pos` (see [`llama::Llama::forward_segments`]).
    fn forward_segments(
        &mut self,
        segments: &[&[u32]],
        pos: usize,
        keep: bool,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let _turn = turn(self);
        match self {
            Weights::Llama(m) => m.forward_segments(segments, pos, keep, device),
            Weights::Gemma3(m) => m.forward_segments(segments, pos, keep, device),
            Weights::Wgpu(m) => {
                let keep = keep && segments.len() == 1;
                let mut rows = Vec::new();
                for seg in segments {
                    m.rewind(pos).map_err(gpu_msg)?;
                    rows.extend(
                        m.forward(seg, crate::backends::webgpu::llama::Logits::All)
                            .map_err(gpu_msg)?,
                    );
                }
                if !keep {
                    m.rewind(pos).map_err(gpu_msg)?;
                }
                gpu_logits(m, rows)
            }
        }
    }

    /// One decode step of several sequences in one forward pass (see
    /// [`llama::Llama::forward_batch`] and
    /// [`crate::backends::webgpu::WgpuLlama::forward_batch`]).
    fn forward_batch(
        &mut self,
        ids: &[u32],
        pos: &[usize],
        states: &mut [llama::KvState],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let _turn = turn(self);
        match self {
            Weights::Llama(m) => m.forward_batch(ids, pos, states, device),
            Weights::Gemma3(m) => m.forward_batch(ids, pos, states, device),
            Weights::Wgpu(m) => {
                continues_at(states, pos)?;
                let rows = m.forward_batch(ids, states).map_err(gpu_msg)?;
                gpu_logits(m, rows)
            }
        }
    }

    /// Prompt chunks of several sequences in one forward pass (see
    /// [`llama::Llama::forward_chunks`] and
    /// [`crate::backends::webgpu::WgpuLlama::forward_chunks`]).
    fn forward_chunks(
        &mut self,
        chunks: &[(&[u32], usize)],
        chunk_rows: usize,
        states: &mut [llama::KvState],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let _turn = turn(self);
        match self {
            Weights::Llama(m) => m.forward_chunks(chunks, chunk_rows, states, device),
            Weights::Gemma3(m) => m.forward_chunks(chunks, chunk_rows, states, device),
            Weights::Wgpu(m) => {
                let pos: Vec<usize> = chunks.iter().map(|c| c.1).collect();
                continues_at(states, &pos)?;
                let ids: Vec<&[u32]> = chunks.iter().map(|c| c.0).collect();
                let rows = m.forward_chunks(&ids, states).map_err(gpu_msg)?;
                gpu_logits(m, rows)
            }
        }
    }

    /// Bytes one token takes in a sequence's KV cache.
    fn kv_bytes_per_token(&self) -> usize {
        match self {
            Weights::Llama(m) => m.kv_bytes_per_token(),
            Weights::Gemma3(m) => m.kv_bytes_per_token(),
            Weights::Wgpu(m) => m.kv_bytes_per_token(),
        }
    }

    /// Moves the KV caches out of the model (leaving it empty).
    fn take_state(&mut self) -> llama::KvState {
        match self {
            Weights::Llama(m) => m.take_state(),
            Weights::Gemma3(m) => m.take_state(),
            // A device that fails a read-back has failed: the sequence
            // restarts from nothing and its next pass reports the fault.
            Weights::Wgpu(m) => m.take_state().unwrap_or_else(|e| {
                tracing::error!("wgpu: reading a KV cache back: {e}");
                Vec::new()
            }),
        }
    }

    /// Puts a sequence's KV caches back (an empty state leaves the model
    /// empty too, for a sequence that has not started).
    fn put_state(&mut self, state: llama::KvState) {
        match self {
            Weights::Llama(m) => m.put_state(state),
            Weights::Gemma3(m) => m.put_state(state),
            Weights::Wgpu(m) => {
                if let Err(e) = m.put_state(state) {
                    tracing::error!("wgpu: restoring a KV cache: {e}");
                }
            }
        }
    }

    /// A copy sharing the current KV cache (tensors are reference-counted).
    fn fork(&self) -> Weights {
        self.clone()
    }
}

/// Facts read from the file, for the member's card.
#[derive(Debug, Clone)]
pub struct GgufFacts {
    /// `general.architecture`.
    pub architecture: String,
    /// Total parameters (sum of tensor element counts).
    pub parameters: u64,
    /// Usable context in tokens.
    pub context_length: u32,
    /// Whether the file carried a chat template.
    pub has_chat_template: bool,
}

/// A loaded GGUF member.
pub struct GgufModel {
    id: String,
    weights: Weights,
    tok: GgufTokenizer,
    chat: ChatFormat,
    device: Device,
    facts: GgufFacts,
    /// Whether `score` runs the prompt once and forks its KV cache for each
    /// continuation (the default), or re-runs the prompt per continuation.
    prefix_reuse: bool,
    /// Whether `score` runs each continuation's tokens as one pass (the
    /// default) or one decode step at a time.
    one_pass: bool,
    /// Keys and values of recent prompts, shared across requests.
    prefix: prefix::PrefixCache,
    /// Bytes the KV caches of the sequences a member generates at once
    /// may reserve together (see [`decode::Engine`]).
    kv_budget: usize,
}

fn failed(e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Failed(e.to_string())
}

impl GgufModel {
    /// Loads `path`. The error names the file and what is wrong with it.
    pub fn load(id: &str, path: &Path, device: &Device) -> Result<Self, LoadError> {
        Self::load_placed(id, path, Place::Candle(device))
    }

    /// Loads `path` onto the best wgpu device (`--device wgpu`): llama,
    /// qwen2 and gemma3 files; tokenizer, chat template and sampling stay
    /// on the host.
    pub fn load_wgpu(id: &str, path: &Path) -> Result<Self, LoadError> {
        Self::load_placed(id, path, Place::Wgpu)
    }

    fn load_placed(id: &str, path: &Path, place: Place<'_>) -> Result<Self, LoadError> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        let len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
        let content = read_content(&mut file, len).map_err(|e| format!("{shown}: not a readable GGUF file: {e}"))?;
        // An unsupported architecture is the more useful error than
        // whatever else such a file lacks.
        architecture(&content, &shown)?;
        let tok = tokenizer::from_gguf(&content).map_err(|e| format!("{shown}: tokenizer: {e}"))?;
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Self::build(id, &shown, &content, &mut file, tok, template, place)
    }

    /// Loads a Hugging Face model directory (see [`hf`]) onto `device`.
    pub fn load_hf(id: &str, dir: &Path, device: &Device) -> Result<Self, LoadError> {
        Self::load_hf_as(id, dir, None, device)
    }

    /// [`GgufModel::load_hf`], with the weight matrices re-encoded to
    /// `quantize` where given.
    pub fn load_hf_as(
        id: &str,
        dir: &Path,
        quantize: Option<crate::pool::Quantize>,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let shown = dir.display().to_string();
        let mut parts = hf::read_dir_as(dir, quantize)?;
        let len = parts
            .gguf
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| format!("{shown}: {e}"))?;
        parts
            .gguf
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| format!("{shown}: {e}"))?;
        let content = read_content(&mut parts.gguf, len).map_err(|e| format!("{shown}: {e}"))?;
        Self::build(
            id,
            &shown,
            &content,
            &mut parts.gguf,
            parts.tok,
            parts.template,
            Place::Candle(device),
        )
    }

    fn build<R: std::io::Read + std::io::Seek>(
        id: &str,
        shown: &str,
        content: &gguf_file::Content,
        file: &mut R,
        tok: GgufTokenizer,
        template: Option<String>,
        place: Place<'_>,
    ) -> Result<Self, LoadError> {
        let (device, wgpu) = match place {
            Place::Candle(d) => (d, false),
            Place::Wgpu => (&Device::Cpu, true),
        };
        let arch = architecture(content, shown)?;
        let parameters: u64 = content.tensor_infos.values().map(|t| t.shape.elem_count() as u64).sum();
        let ctx_key = format!("{arch}.context_length");
        let meta_ctx = content
            .metadata
            .get(&ctx_key)
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        let device = device.clone();
        let (weights, context_length) = match arch.as_str() {
            "llama" | "qwen2" | "gemma3" if wgpu => {
                let positions = meta_ctx.min(MAX_POSITIONS);
                let gpu = crate::backends::webgpu::Kernels::open()
                    .map_err(|e| LoadError::Invalid(format!("{shown}: --device wgpu: {e}")))?;
                let w = crate::backends::webgpu::WgpuLlama::from_gguf(gpu, &arch, content, file, positions)
                    .map_err(|e| LoadError::Invalid(format!("{shown}: on wgpu: {e}")))?;
                (Weights::Wgpu(Box::new(w)), positions)
            }
            other if wgpu => {
                return Err(LoadError::Invalid(format!(
                    "{shown}: architecture `{other}` does not run on wgpu (llama, qwen2 and gemma3 do): load it with `--device cpu`"
                )))
            }
            "llama" | "qwen2" => {
                let positions = meta_ctx.min(MAX_POSITIONS);
                let w = llama::Llama::from_gguf(&arch, content, file, positions, &device).map_err(|source| {
                    LoadError::Weights {
                        path: shown.to_string(),
                        source,
                    }
                })?;
                (Weights::Llama(Box::new(w)), positions)
            }
            "gemma3" => {
                let positions = meta_ctx.min(MAX_POSITIONS);
                let w = gemma3::Gemma3::from_gguf(content, file, positions, &device).map_err(|source| {
                    LoadError::Weights {
                        path: shown.to_string(),
                        source,
                    }
                })?;
                (Weights::Gemma3(Box::new(w)), positions)
            }
            other => {
                return Err(LoadError::Invalid(format!(
                    "{shown}: architecture `{other}` is not supported (supported: llama, qwen2, gemma3)"
                )))
            }
        };
        let chat = match template {
            Some(src) => ChatFormat::from_template(
                &src,
                tok.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
                tok.eos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            )
            .map_err(|e| format!("{shown}: {e}"))?,
            None => ChatFormat::Plain,
        };
        let facts = GgufFacts {
            architecture: arch,
            parameters,
            context_length: context_length as u32,
            has_chat_template: chat.is_template(),
        };
        Ok(Self {
            id: id.to_string(),
            weights,
            tok,
            chat,
            device,
            facts,
            prefix_reuse: true,
            one_pass: true,
            prefix: prefix::PrefixCache::new(DEFAULT_PREFIX_CACHE_BYTES),
            kv_budget: DEFAULT_KV_BUDGET_BYTES,
        })
    }

    /// Empties the prefix cache and bounds it to `bytes` (0 turns it off:
    /// benches that time the computation itself, and operators short of
    /// memory).
    pub fn set_prefix_cache(&mut self, bytes: usize) {
        self.prefix.reset(bytes);
    }

    /// The prefix cache's counters, shared: they keep counting after the
    /// call (the pool hands them to the server's metrics).
    pub fn prefix_stats(&self) -> std::sync::Arc<prefix::PrefixStats> {
        self.prefix.stats()
    }

    /// Bounds the KV caches of the sequences this member generates at once
    /// to `bytes` together (at least one token's worth): a generation whose
    /// prompt, `max_tokens` and cache room ([`decode::KV_ROOM`]) would pass
    /// what is left waits for running ones to finish, and one that would
    /// pass it alone is refused.
    pub fn set_kv_budget(&mut self, bytes: usize) {
        self.kv_budget = bytes.max(self.kv_bytes_per_token());
    }

    /// Bytes one token takes in a sequence's KV cache (f32 keys and values
    /// of every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.weights.kv_bytes_per_token()
    }

    /// Turns prefix reuse in `score` on or off (benches compare the two;
    /// results are the same either way).
    pub fn set_prefix_reuse(&mut self, on: bool) {
        self.prefix_reuse = on;
    }

    /// Turns the one-pass continuation in `score` on (the default) or off
    /// (one decode step per token, as before it existed): benches measure
    /// the gain and tests compare the numbers.
    pub fn set_one_pass(&mut self, on: bool) {
        self.one_pass = on;
    }

    /// What the file says about the model.
    pub fn facts(&self) -> &GgufFacts {
        &self.facts
    }

    /// Turns an input into token ids: chats through the chat format, raw
    /// prompts verbatim (with BOS when the model wants one).
    pub fn encode_input(&self, input: &Input) -> Result<Vec<u32>, InferenceError> {
        let (text, add_bos) = match input {
            Input::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(InferenceError::InvalidParams(
                        "the chat has no messages: send at least one user turn".into(),
                    ));
                }
                // A model's own template writes its BOS itself; the plain
                // format for base models does not.
                let add_bos = !self.chat.is_template() && self.tok.add_bos;
                (
                    self.chat.render(msgs).map_err(|e| match e {
                        // Messages the template refuses: the caller's to change.
                        TemplateError::Render(_) => InferenceError::InvalidParams(e.to_string()),
                        // A template past its limits, or no renderer: the member's.
                        _ => InferenceError::Failed(e.to_string()),
                    })?,
                    add_bos,
                )
            }
            Input::Prompt(p) => (p.clone(), self.tok.add_bos),
        };
        let mut ids = Vec::new();
        if add_bos {
            if let Some((bos, _)) = &self.tok.bos {
                ids.push(*bos);
            }
        }
        ids.extend(self.encode_text(&text)?);
        if ids.is_empty() {
            return Err(InferenceError::InvalidParams("the prompt is empty".into()));
        }
        Ok(ids)
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        let enc = self.tok.tokenizer.encode(text, false).map_err(failed)?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, InferenceError> {
        self.tok.tokenizer.decode(ids, true).map_err(failed)
    }

    fn check_context(&self, needed: usize) -> Result<(), InferenceError> {
        let ctx = self.facts.context_length as usize;
        if needed > ctx {
            return Err(InferenceError::InvalidParams(format!(
                "prompt plus new tokens need {needed} positions but `{}` has a context of {ctx}: \
                 shorten the prompt or lower max_tokens",
                self.id
            )));
        }
        Ok(())
    }

    /// Runs a whole prompt from position 0 in chunks of [`PREFILL_CHUNK`]
    /// tokens, checking the deadline before each: a long prompt whose
    /// request has given up stops within one chunk instead of holding the
    /// member until it is done. Returns the last position's logits.
    fn prefill(weights: &mut Weights, device: &Device, ids: &[u32], ctx: CallCtx) -> Result<Tensor, InferenceError> {
        let mut logits = None;
        for (i, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
            if Instant::now() >= ctx.deadline {
                return Err(InferenceError::Deadline);
            }
            logits = Some(Self::step(weights, device, chunk, i * PREFILL_CHUNK)?);
        }
        logits.ok_or_else(|| InferenceError::InvalidParams("the prompt is empty: give the model some text".into()))
    }

    /// Runs `ids` from position `pos` and returns the last position's logits.
    fn step(weights: &mut Weights, device: &Device, ids: &[u32], pos: usize) -> Result<Tensor, InferenceError> {
        Self::step_chunk(weights, device, ids, pos, ids.len())
    }

    /// [`Self::step`] for rows of a prompt chunk of `chunk_rows` rows.
    fn step_chunk(
        weights: &mut Weights,
        device: &Device,
        ids: &[u32],
        pos: usize,
        chunk_rows: usize,
    ) -> Result<Tensor, InferenceError> {
        let x = Tensor::new(ids, device).and_then(|t| t.unsqueeze(0)).map_err(failed)?;
        let logits = weights.forward_chunk(&x, pos, chunk_rows).map_err(failed)?;
        logits.squeeze(0).map_err(failed)
    }

    /// [`Self::prefill`] through the member's prefix cache: the prompt's
    /// longest cached beginning is put into the model, the rest runs in the
    /// pieces and on the kernels the full prefill would use (the chunk
    /// boundaries and each chunk's row count are those of the whole
    /// prompt), and the prompt's blocks are filed for the next request.
    /// Returns the last position's logits and the tokens reused.
    fn prefill_cached(&mut self, ids: &[u32], ctx: CallCtx) -> Result<(Tensor, usize), InferenceError> {
        let found = self.prefix.lookup(ids).map_err(failed)?;
        let reused = found.as_ref().map_or(0, |f| f.tokens);
        self.weights.put_state(found.map(|f| f.state).unwrap_or_default());
        let mut logits = None;
        let mut start = reused;
        while start < ids.len() {
            if Instant::now() >= ctx.deadline {
                return Err(InferenceError::Deadline);
            }
            let (end, rows) = chunk_at(start, ids.len());
            logits = Some(Self::step_chunk(
                &mut self.weights,
                &self.device,
                &ids[start..end],
                start,
                rows,
            )?);
            start = end;
        }
        let logits = logits
            .ok_or_else(|| InferenceError::InvalidParams("the prompt is empty: give the model some text".into()))?;
        let state = self.weights.take_state();
        let filed = self.prefix.insert(ids, &state);
        self.weights.put_state(state);
        filed.map_err(failed)?;
        Ok((logits, reused))
    }

    /// Sum of the log-probabilities of `ids[1..]`, each given the tokens
    /// before it, for a continuation placed at `pos` on a cache that already
    /// holds the prompt (the first token's is the prompt's business), which
    /// it extends. The tokens but the last run in passes of `cap` rows, the
    /// deadline checked before each: a continuation of `n` tokens costs
    /// one multi-row product per pass, not `n - 1` decode steps that each
    /// walk all the weights.
    fn continuation(
        weights: &mut Weights,
        device: &Device,
        ids: &[u32],
        pos: usize,
        cap: usize,
        ctx: CallCtx,
    ) -> Result<f64, InferenceError> {
        let mut lp = 0.0;
        // Each pass feeds tokens `start..end` and predicts `start+1..=end`.
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + cap.max(1)).min(ids.len() - 1);
            lp += Self::pass(weights, device, &[&ids[start..=end]], pos + start, true, ctx)?[0];
            start = end;
        }
        Ok(lp)
    }

    /// One forward pass over `runs`, each a continuation's tokens from
    /// `pos` on the cache (see [`Weights::forward_segments`]; `keep`
    /// extends the cache with a single run): every token of a run but the
    /// last is fed, and each run's sum of the log-probabilities of its
    /// tokens after the first is returned. The deadline is checked first.
    fn pass(
        weights: &mut Weights,
        device: &Device,
        runs: &[&[u32]],
        pos: usize,
        keep: bool,
        ctx: CallCtx,
    ) -> Result<Vec<f64>, InferenceError> {
        if Instant::now() >= ctx.deadline {
            return Err(InferenceError::Deadline);
        }
        let inputs: Vec<&[u32]> = runs.iter().map(|r| &r[..r.len().saturating_sub(1)]).collect();
        let logits = weights.forward_segments(&inputs, pos, keep, device).map_err(failed)?;
        let rows = log_softmax_rows(&logits)?;
        let mut row = 0;
        let mut sums = Vec::with_capacity(runs.len());
        for run in runs {
            let mut sum = 0.0;
            for next in run.iter().skip(1) {
                sum += pick(&rows, row, *next)?;
                row += 1;
            }
            sums.push(sum);
        }
        Ok(sums)
    }

    /// Generates a completion.
    pub fn generate(&mut self, ctx: CallCtx, input: &Input, params: &GenParams) -> Result<Generation, InferenceError> {
        self.generate_streaming(ctx, input, params, None)
    }

    /// [`GgufModel::generate`], handing each new piece of text to `sink` as
    /// soon as it is final: text that could still turn out to be the start
    /// of a stop sequence, or half of a multi-byte character, is held back
    /// until it is settled. `sink` returning `false` (the listener went
    /// away) ends decoding early, so an abandoned stream stops costing CPU.
    pub fn generate_streaming<'a>(
        &mut self,
        ctx: CallCtx,
        input: &'a Input,
        params: &'a GenParams,
        sink: Option<&'a mut (dyn FnMut(&str) -> bool + 'a)>,
    ) -> Result<Generation, InferenceError> {
        let job = decode::GenJob {
            ctx,
            input,
            params,
            sink,
        };
        self.generate_batch(vec![job])
            .pop()
            .unwrap_or_else(|| Err(InferenceError::Failed("no result".into())))
    }

    /// Log-likelihood of each continuation after `prompt`. The prompt is run
    /// once; the continuations then run together as one pass over its
    /// cache (as many as [`SCORE_LOGITS`] allows per pass), each attending
    /// to the prompt and to itself, so an item's options walk the weights
    /// once between them rather than once per option, or per token.
    pub fn score(
        &mut self,
        ctx: CallCtx,
        prompt: &Input,
        continuations: &[String],
    ) -> Result<Vec<Scored>, InferenceError> {
        let prompt_ids = self.encode_input(prompt)?;
        self.check_context(prompt_ids.len())?;
        let mut encoded = Vec::with_capacity(continuations.len());
        for cont in continuations {
            let ids = self.encode_text(cont)?;
            if ids.is_empty() {
                return Err(InferenceError::InvalidParams(
                    "an empty continuation has no likelihood: give each choice some text".into(),
                ));
            }
            self.check_context(prompt_ids.len() + ids.len())?;
            encoded.push(ids);
        }
        let (first, cached) = self.prefill_cached(&prompt_ids, ctx)?;
        let first = log_softmax(&first)?;
        let logprobs = if self.prefix_reuse && self.one_pass {
            self.score_together(ctx, prompt_ids.len(), &first, &encoded)?
        } else {
            self.score_each(ctx, &prompt_ids, &first, &encoded)?
        };
        Ok(logprobs
            .into_iter()
            .zip(&encoded)
            .map(|(logprob, ids)| Scored {
                logprob,
                tokens: ids.len() as u32,
                prompt_tokens: prompt_ids.len() as u32,
                cached_tokens: cached as u32,
            })
            .collect())
    }

    /// Rows one scoring pass may hold for a vocabulary of `vocab` tokens.
    fn score_rows(vocab: usize) -> usize {
        (SCORE_LOGITS / vocab.max(1)).clamp(1, PREFILL_CHUNK)
    }

    /// Every continuation's log-likelihood, the continuations batched into
    /// passes of at most [`Self::score_rows`] rows over the prompt's cache
    /// (left untouched); one longer than that runs alone, in chunks, on a
    /// fork of the cache.
    fn score_together(
        &mut self,
        ctx: CallCtx,
        pos: usize,
        first: &[f32],
        encoded: &[Vec<u32>],
    ) -> Result<Vec<f64>, InferenceError> {
        let cap = Self::score_rows(first.len());
        let mut lps: Vec<f64> = encoded.iter().map(|ids| first[ids[0] as usize] as f64).collect();
        let mut batch: Vec<usize> = Vec::new();
        let mut rows = 0;
        for (i, ids) in encoded.iter().enumerate() {
            let n = ids.len() - 1;
            if n == 0 {
                continue;
            }
            if n > cap {
                let mut forked = self.weights.fork();
                lps[i] += Self::continuation(&mut forked, &self.device, ids, pos, cap, ctx)?;
                continue;
            }
            if rows + n > cap {
                self.score_batch(ctx, pos, encoded, &batch, &mut lps)?;
                batch.clear();
                rows = 0;
            }
            batch.push(i);
            rows += n;
        }
        if !batch.is_empty() {
            self.score_batch(ctx, pos, encoded, &batch, &mut lps)?;
        }
        Ok(lps)
    }

    /// One pass over the continuations `batch` (indices into `encoded`),
    /// adding each one's log-likelihood after its first token to `lps`.
    fn score_batch(
        &mut self,
        ctx: CallCtx,
        pos: usize,
        encoded: &[Vec<u32>],
        batch: &[usize],
        lps: &mut [f64],
    ) -> Result<(), InferenceError> {
        let runs: Vec<&[u32]> = batch.iter().map(|&i| encoded[i].as_slice()).collect();
        let sums = Self::pass(&mut self.weights, &self.device, &runs, pos, false, ctx)?;
        for (&i, sum) in batch.iter().zip(sums) {
            lps[i] += sum;
        }
        Ok(())
    }

    /// The continuations one at a time on forks of the prompt's cache: the
    /// prompt re-run for each one without prefix reuse, their tokens one
    /// decode step each without the one-pass scoring (benches and tests
    /// compare these with [`Self::score_together`]).
    fn score_each(
        &mut self,
        ctx: CallCtx,
        prompt_ids: &[u32],
        first: &[f32],
        encoded: &[Vec<u32>],
    ) -> Result<Vec<f64>, InferenceError> {
        let cap = Self::score_rows(first.len());
        let mut out = Vec::with_capacity(encoded.len());
        for ids in encoded {
            // Extend a fork of the prompt's cache: the prompt runs once.
            // Without reuse, every continuation pays for the prompt again.
            let mut forked = self.weights.fork();
            let weights = &mut forked;
            let mut lp = if self.prefix_reuse {
                first[ids[0] as usize] as f64
            } else {
                log_softmax(&Self::prefill(weights, &self.device, prompt_ids, ctx)?)?[ids[0] as usize] as f64
            };
            if self.one_pass {
                lp += Self::continuation(weights, &self.device, ids, prompt_ids.len(), cap, ctx)?;
            } else {
                for (i, w) in ids.windows(2).enumerate() {
                    if Instant::now() >= ctx.deadline {
                        return Err(InferenceError::Deadline);
                    }
                    let logits = Self::step(weights, &self.device, &[w[0]], prompt_ids.len() + i)?;
                    lp += log_softmax(&logits)?[w[1] as usize] as f64;
                }
            }
            out.push(lp);
        }
        Ok(out)
    }

    /// The `top_k` most likely next tokens after `prompt`.
    pub fn next_token(
        &mut self,
        ctx: CallCtx,
        prompt: &Input,
        top_k: u32,
    ) -> Result<Vec<TokenLogprob>, InferenceError> {
        if top_k == 0 {
            return Err(InferenceError::InvalidParams("top_k must be at least 1".into()));
        }
        let ids = self.encode_input(prompt)?;
        self.check_context(ids.len())?;
        let (logits, _) = self.prefill_cached(&ids, ctx)?;
        let lp = log_softmax(&logits)?;
        let mut idx: Vec<usize> = (0..lp.len()).collect();
        let k = (top_k as usize).min(lp.len());
        idx.select_nth_unstable_by(k.saturating_sub(1), |a, b| lp[*b].total_cmp(&lp[*a]));
        idx.truncate(k);
        idx.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
        idx.into_iter()
            .map(|i| {
                Ok(TokenLogprob {
                    token: i as u32,
                    text: self.tok.tokenizer.decode(&[i as u32], false).map_err(failed)?,
                    logprob: lp[i] as f64,
                    prompt_tokens: ids.len() as u32,
                })
            })
            .collect()
    }
}

/// Reads a GGUF file's header (metadata and tensor table) from `reader`,
/// which holds `len` bytes, and checks the tensor table against the file
/// before anything trusts it: every tensor's size is computed with checked
/// arithmetic from its shape and type, must be a whole number of blocks,
/// and must lie inside the file. Loading reads each tensor into a buffer of
/// that size, so a table that claims a petabyte tensor, or one past the
/// end of the file, would otherwise cost an allocation failure (the
/// process aborts) or a confusing read error. The reader's own faults on
/// hostile headers (found by fuzzing: an alignment of 0 divides by zero)
/// are contained here as errors too.
pub fn read_content<R: std::io::Read + std::io::Seek>(reader: &mut R, len: u64) -> Result<gguf_file::Content, String> {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(reader)));
    let content = match read {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("the GGUF header is malformed (the reader rejected its layout)".into()),
    };
    // The values the reader takes as the alignment (others it ignores).
    use gguf_file::Value as V;
    let alignment = match content.metadata.get("general.alignment") {
        Some(V::U8(v)) => Some(i64::from(*v)),
        Some(V::U16(v)) => Some(i64::from(*v)),
        Some(V::U32(v)) => Some(i64::from(*v)),
        Some(V::I8(v)) if *v >= 0 => Some(i64::from(*v)),
        Some(V::I16(v)) if *v >= 0 => Some(i64::from(*v)),
        Some(V::I32(v)) if *v >= 0 => Some(i64::from(*v)),
        _ => None,
    };
    if let Some(a) = alignment.filter(|a| *a <= 0 || !(*a as u64).is_power_of_two()) {
        return Err(format!("`general.alignment` is {a}: it must be a power of two"));
    }
    for (name, t) in &content.tensor_infos {
        let shown = crate::request::printable(name);
        let dims = t.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor `{shown}`: its shape {dims:?} overflows"))?;
        let block = t.ggml_dtype.block_size() as u64;
        if elems % block != 0 {
            return Err(format!(
                "tensor `{shown}`: {elems} elements is not a whole number of {:?} blocks of {block}",
                t.ggml_dtype
            ));
        }
        let bytes = (elems / block)
            .checked_mul(t.ggml_dtype.type_size() as u64)
            .ok_or_else(|| format!("tensor `{shown}`: its size overflows"))?;
        let end = content
            .tensor_data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(bytes));
        if end.is_none_or(|end| end > len) {
            return Err(format!(
                "tensor `{shown}` ({bytes} bytes at offset {}) lies past the end of the file ({len} bytes): the file is truncated or corrupt",
                t.offset
            ));
        }
    }
    Ok(content)
}

/// The file's architecture, if it is one Tessera runs; the error names
/// the file and the supported ones.
pub(crate) fn architecture(content: &gguf_file::Content, shown: &str) -> Result<String, String> {
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| format!("{shown}: metadata `general.architecture` is missing"))?;
    if !matches!(arch.as_str(), "llama" | "qwen2" | "gemma3") {
        return Err(format!(
            "{shown}: architecture `{arch}` is not supported (supported: llama, qwen2, gemma3)"
        ));
    }
    Ok(arch)
}

/// Log-softmax of every row of `[rows, vocab]` logits.
fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, InferenceError> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(failed)
}

/// Row `row`'s log-probability of token `next`.
fn pick(rows: &[Vec<f32>], row: usize, next: u32) -> Result<f64, InferenceError> {
    rows.get(row)
        .and_then(|r| r.get(next as usize))
        .map(|&v| v as f64)
        .ok_or_else(|| failed(format!("no log-probability for token {next} at row {row}")))
}

fn log_softmax(logits: &Tensor) -> Result<Vec<f32>, InferenceError> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(failed)
}

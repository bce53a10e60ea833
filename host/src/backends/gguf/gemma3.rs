//! Gemma 3 (decoder-only) over quantized GGUF weights.
//!
//! Written for Tessera from the architecture as Google describes it ("Gemma 3
//! Technical Report", 2025) and as llama.cpp lays out its GGUF tensors. We do
//! not use candle-transformers' `quantized_gemma3`: its MLP applies SiLU where
//! Gemma uses GELU (tanh approximation), which puts its log-probs off by 1.4
//! to 6.5 nats against llama.cpp on the same file.
//!
//! Per layer, with `x` the residual stream:
//! ```text
//! h   = x + post_attention_norm(attn(attn_norm(x)))
//! out = h + post_ffw_norm(down(gelu_tanh(gate(ffn_norm(h))) * up(ffn_norm(h))))
//! ```
//! Attention: queries and keys are RMS-normalised per head (`attn_q_norm`,
//! `attn_k_norm`) before rotary embedding (rotate-half form); queries are
//! scaled by 1/sqrt(head_dim); grouped-query attention shares each key/value
//! head among several query heads. Five layers in six attend only to the
//! last `sliding_window` positions with rotary base 10 000; every sixth layer
//! is global with the file's rotary base. Token embeddings are multiplied by
//! sqrt(hidden size) and the output projection reuses the embedding matrix.
//! The GGUF converter has already folded Gemma's `1 + weight` into the norm
//! weights, so every norm here is a plain RMSNorm.

use super::quant::Linear;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::attention::{attend, attend_rows, embedding_and_output, feed_forward, Gate, LayerKv, Meta, Rope};

/// Rotary base of the sliding-window (local) layers.
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// One layer in this many is global.
const GLOBAL_EVERY: usize = 6;

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Tensor,
    /// `Some(window)` for a local layer.
    window: Option<usize>,
    kv: Option<LayerKv>,
}

impl Layer {
    /// The rest of the layer for prompt rows: the attention's output
    /// projection, its norm and residual, then the MLP with its norms and
    /// residual, from the layer's input `x` and its attention `attn`.
    fn finish_chunk(&self, x: &Tensor, attn: &Tensor, eps: f32, chunk_rows: usize) -> Result<Tensor> {
        let attn = self.o.forward_chunk(attn, chunk_rows)?;
        let x_attn = (candle_nn::ops::rms_norm(&attn, &self.post_attn_norm, eps)? + x)?;
        let h = candle_nn::ops::rms_norm(&x_attn, &self.ffn_norm, eps)?;
        let ff = feed_forward(&self.gate, &self.up, &self.down, &h, Gate::GeluTanh, chunk_rows)?;
        candle_nn::ops::rms_norm(&ff, &self.post_ffn_norm, eps)? + x_attn
    }
}

/// A loaded Gemma 3 model with its KV cache. Cloning shares the weights and
/// the cached keys/values (tensors are reference-counted), so a clone can
/// extend a shared prefix without recomputing it.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    embed: super::embedding::Embedding,
    embed_scale: f64,
    output: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    local_rope: Rope,
    global_rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Gemma3 {
    /// Loads the weights; `positions` bounds the context this instance serves.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let md = Meta {
            content,
            arch: "gemma3",
        };
        let heads = md.usize("attention.head_count")?;
        let kv_heads = md.usize("attention.head_count_kv")?;
        let head_dim = md.usize("attention.key_length")?;
        let layers_n = md.usize("block_count")?;
        let hidden = md.usize("embedding_length")?;
        let eps = md.get("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let window = md.usize("attention.sliding_window")?;
        let global_base = md.f32_or("rope.freq_base", 1_000_000.0);

        let (embed, output) = embedding_and_output(content, reader, device)?;
        let mut qt = |name: &str| -> Result<QTensor> { content.tensor(reader, name, device) };
        let norm = qt("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let mut mm = |s: &str| -> Result<Linear> { Linear::new(qt(&p(s))?, device) };
            let (q, k, v, o) = (mm("attn_q")?, mm("attn_k")?, mm("attn_v")?, mm("attn_output")?);
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let mut vec = |s: &str| -> Result<Tensor> { qt(&p(s))?.dequantize(device) };
            layers.push(Layer {
                attn_norm: vec("attn_norm")?,
                q_norm: vec("attn_q_norm")?,
                k_norm: vec("attn_k_norm")?,
                post_attn_norm: vec("post_attention_norm")?,
                ffn_norm: vec("ffn_norm")?,
                post_ffn_norm: vec("post_ffw_norm")?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                window: (i % GLOBAL_EVERY < GLOBAL_EVERY - 1).then_some(window),
                kv: None,
            });
        }
        Ok(Gemma3 {
            embed,
            embed_scale: (hidden as f64).sqrt(),
            output,
            layers,
            norm,
            local_rope: Rope::new(head_dim, LOCAL_ROPE_BASE, positions, device)?,
            global_rope: Rope::new(head_dim, global_base, positions, device)?,
            heads,
            kv_heads,
            head_dim,
            eps,
        })
    }

    /// Bytes one token takes in a sequence's KV cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        // A key and a value of every key/value head in every layer, in f32
        // (the cache's dtype).
        self.layers.len() * 2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Moves the model's KV caches out (leaving it empty).
    pub fn take_state(&mut self) -> super::llama::KvState {
        self.layers.iter_mut().map(|l| l.kv.take()).collect()
    }

    /// Puts a sequence's KV caches back into the model; an empty state (a
    /// sequence not started) leaves every layer's cache empty.
    pub fn put_state(&mut self, state: super::llama::KvState) {
        let mut state = state.into_iter();
        for l in self.layers.iter_mut() {
            l.kv = state.next().flatten();
        }
    }

    /// One decode step for several sequences, as
    /// [`super::llama::Llama::forward_batch`] does: token `ids[i]` at
    /// position `pos[i]` continues the caches in `states[i]` (updated in
    /// place). Projections, norms and MLPs run once over all rows on the
    /// decode kernel; attention (each layer within its window) runs per
    /// sequence. Each row's logits are those of the sequence stepped alone.
    /// Returns `[n, vocab]`.
    pub fn forward_batch(
        &mut self,
        ids: &[u32],
        pos: &[usize],
        states: &mut [super::llama::KvState],
        device: &Device,
    ) -> Result<Tensor> {
        let n = ids.len();
        let mut x = (self.embed.rows(&Tensor::new(ids, device)?, device)? * self.embed_scale)?.reshape((n, 1, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let rope = if layer.window.is_some() {
                &self.local_rope
            } else {
                &self.global_rope
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            // Per-head norms over every row at once: each row of
            // `[n, heads, hd]` is normalised alone, as in a one-row pass.
            let q = candle_nn::ops::rms_norm(
                &layer.q.forward_decode(&h)?.reshape((n, heads, hd))?,
                &layer.q_norm,
                eps,
            )?;
            let k = candle_nn::ops::rms_norm(
                &layer.k.forward_decode(&h)?.reshape((n, kv_heads, hd))?,
                &layer.k_norm,
                eps,
            )?;
            let v = layer.v.forward_decode(&h)?.reshape((n, kv_heads, hd))?;
            let q = (rope.apply_rows(&q.reshape((n, heads, 1, hd))?, pos)? * scale)?;
            let k = rope.apply_rows(&k.reshape((n, kv_heads, 1, hd))?, pos)?;
            let v = v.reshape((n, kv_heads, 1, hd))?;
            let mut caches = super::llama::layer_caches(states, li)?;
            let attn = layer
                .o
                .forward_decode(&attend_rows(&q, &k, &v, &mut caches, pos, layer.window)?)?;
            let x_attn = (candle_nn::ops::rms_norm(&attn, &layer.post_attn_norm, eps)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x_attn, &layer.ffn_norm, eps)?;
            let ff = feed_forward(&layer.gate, &layer.up, &layer.down, &h, Gate::GeluTanh, 1)?;
            x = (candle_nn::ops::rms_norm(&ff, &layer.post_ffn_norm, eps)? + x_attn)?;
        }
        let last = candle_nn::ops::rms_norm(&x.squeeze(1)?, &self.norm, eps)?;
        self.output.forward_decode(&last)?.to_dtype(DType::F32)
    }

    /// Prompt chunks of several sequences in one pass, as
    /// [`super::llama::Llama::forward_chunks`] does: chunk `i` continues
    /// `states[i]` from position `chunks[i].1`; projections, norms and
    /// MLPs run once over all rows on the kernel of a `chunk_rows`-row
    /// chunk, attention (each layer within its window) per sequence. Each
    /// sequence's logits are those of its chunk run alone. Returns the
    /// logits of each chunk's last row, `[n, vocab]`.
    pub fn forward_chunks(
        &mut self,
        chunks: &[(&[u32], usize)],
        chunk_rows: usize,
        states: &mut [super::llama::KvState],
        device: &Device,
    ) -> Result<Tensor> {
        // A prompt starting now holds no caches yet.
        for state in states.iter_mut() {
            state.resize_with(self.layers.len(), || None);
        }
        let ids: Vec<u32> = chunks.iter().flat_map(|(c, _)| c.iter().copied()).collect();
        let t = ids.len();
        let flat = Tensor::new(ids.as_slice(), device)?;
        let mut x = (self.embed.rows(&flat, device)? * self.embed_scale)?.reshape((1, t, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let rope = if layer.window.is_some() {
                &self.local_rope
            } else {
                &self.global_rope
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let (q, k, v) = (
                layer.q.forward_chunk(&h, chunk_rows)?,
                layer.k.forward_chunk(&h, chunk_rows)?,
                layer.v.forward_chunk(&h, chunk_rows)?,
            );
            let mut caches = super::llama::layer_caches(states, li)?;
            let mut rows = Vec::with_capacity(chunks.len());
            let mut start = 0;
            for ((chunk, pos), cache) in chunks.iter().zip(caches.iter_mut()) {
                let len = chunk.len();
                let part = |m: &Tensor, h: usize| m.narrow(1, start, len)?.reshape((1, len, h, hd))?.transpose(1, 2);
                let qi = candle_nn::ops::rms_norm(&part(&q, heads)?.contiguous()?, &layer.q_norm, eps)?;
                let ki = candle_nn::ops::rms_norm(&part(&k, kv_heads)?.contiguous()?, &layer.k_norm, eps)?;
                let qi = (rope.apply(&qi, *pos)? * scale)?;
                let ki = rope.apply(&ki, *pos)?;
                let vi = part(&v, kv_heads)?;
                rows.push(attend(&qi, ki, vi, cache, *pos, layer.window)?);
                start += len;
            }
            x = layer.finish_chunk(&x, &Tensor::cat(&rows, 1)?, eps, chunk_rows)?;
        }
        let last = candle_nn::ops::rms_norm(&super::llama::last_rows(&x, chunks)?, &self.norm, eps)?;
        self.output.forward_decode(&last)?.to_dtype(DType::F32)
    }

    /// Runs tokens `ids` (shape `[1, t]`) placed at positions `pos..pos+t`
    /// and returns the logits of the last one (`[1, vocab]`). `pos == 0`
    /// starts a new sequence.
    pub fn forward(&mut self, ids: &Tensor, pos: usize) -> Result<Tensor> {
        let rows = ids.elem_count();
        self.forward_chunk(ids, pos, rows)
    }

    /// [`Self::forward`] for rows that belong to a prompt chunk of
    /// `chunk_rows` rows, the rest of which is already in the cache: the
    /// projections take the kernel the whole chunk would take (see
    /// [`super::quant::Linear::forward_chunk`]), so the prefix cache
    /// changes no number.
    pub fn forward_chunk(&mut self, ids: &Tensor, pos: usize, chunk_rows: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let mut x = (self.embed.rows(&flat, ids.device())? * self.embed_scale)?.reshape((b, t, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        for layer in self.layers.iter_mut() {
            let rope = if layer.window.is_some() {
                &self.local_rope
            } else {
                &self.global_rope
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = layer
                .q
                .forward_chunk(&h, chunk_rows)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward_chunk(&h, chunk_rows)?
                .reshape((b, t, kv_heads, hd))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward_chunk(&h, chunk_rows)?
                .reshape((b, t, kv_heads, hd))?
                .transpose(1, 2)?;
            let q = candle_nn::ops::rms_norm(&q.contiguous()?, &layer.q_norm, eps)?;
            let k = candle_nn::ops::rms_norm(&k.contiguous()?, &layer.k_norm, eps)?;
            let q = (rope.apply(&q, pos)? * (1.0 / (hd as f64).sqrt()))?;
            let k = rope.apply(&k, pos)?;
            let attn = attend(&q, k, v, &mut layer.kv, pos, layer.window)?;
            x = layer.finish_chunk(&x, &attn, eps, chunk_rows)?;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }

    /// Scores continuations of the sequence in the cache, as
    /// [`super::llama::Llama::forward_segments`] does: every segment starts
    /// at `pos`, rows multiply together on the decode kernel, each segment
    /// attends to the cache (within its layer's window) and to itself; the
    /// cache is kept as it was unless `keep` is set for one segment.
    /// Returns `[rows, vocab]`.
    pub fn forward_segments(&mut self, segments: &[&[u32]], pos: usize, keep: bool, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = segments.concat();
        let t = ids.len();
        let keep = keep && segments.len() == 1;
        let flat = Tensor::new(ids.as_slice(), device)?;
        let mut x = (self.embed.rows(&flat, device)? * self.embed_scale)?.reshape((1, t, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in self.layers.iter_mut() {
            let rope = if layer.window.is_some() {
                &self.local_rope
            } else {
                &self.global_rope
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = layer
                .q
                .forward_decode(&h)?
                .reshape((1, t, heads, hd))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward_decode(&h)?
                .reshape((1, t, kv_heads, hd))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward_decode(&h)?
                .reshape((1, t, kv_heads, hd))?
                .transpose(1, 2)?;
            let q = candle_nn::ops::rms_norm(&q.contiguous()?, &layer.q_norm, eps)?;
            let k = candle_nn::ops::rms_norm(&k.contiguous()?, &layer.k_norm, eps)?;
            let mut rows = Vec::with_capacity(segments.len());
            let mut start = 0;
            for seg in segments {
                let len = seg.len();
                let qs = (rope.apply(&q.narrow(2, start, len)?, pos)? * scale)?;
                let ks = rope.apply(&k.narrow(2, start, len)?, pos)?;
                let vs = v.narrow(2, start, len)?;
                if keep {
                    rows.push(attend(&qs, ks, vs, &mut layer.kv, pos, layer.window)?);
                } else {
                    let mut prefix = layer.kv.clone();
                    rows.push(attend(&qs, ks, vs, &mut prefix, pos, layer.window)?);
                }
                start += len;
            }
            let attn = layer.o.forward_decode(&Tensor::cat(&rows, 1)?)?;
            let x_attn = (candle_nn::ops::rms_norm(&attn, &layer.post_attn_norm, eps)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x_attn, &layer.ffn_norm, eps)?;
            let ff = feed_forward(&layer.gate, &layer.up, &layer.down, &h, Gate::GeluTanh, 1)?;
            x = (candle_nn::ops::rms_norm(&ff, &layer.post_ffn_norm, eps)? + x_attn)?;
        }
        let all = candle_nn::ops::rms_norm(&x.reshape((t, ()))?, &self.norm, eps)?;
        self.output.forward_decode(&all)?.to_dtype(DType::F32)
    }
}

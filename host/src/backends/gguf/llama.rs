//! The llama family (Llama, SmolLM, Qwen2) over quantized GGUF weights.
//!
//! Written for Tessera from the published architecture (Touvron et al.,
//! "LLaMA", 2023; Qwen2 adds biases to the query/key/value projections) and
//! llama.cpp's GGUF tensor layout. We use our own file rather than
//! candle-transformers' loaders so that slow weight formats can be
//! re-encoded at load ([`super::quant`]) and so that every architecture's
//! state can be forked to share a prompt's KV cache.
//!
//! Per layer, with `x` the residual stream:
//! ```text
//! h   = x + o(attn(rope(q(n)), rope(k(n)), v(n)))      n = attn_norm(x)
//! out = h + down(silu(gate(m)) * up(m))                m = ffn_norm(h)
//! ```
//! llama.cpp stores llama's query/key weights permuted for rotary embedding
//! on adjacent pairs; Qwen2's are stored for the rotate-half form.

use super::quant::Linear;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Result, Tensor};

pub use super::attention::LayerKv;
use super::attention::{attend, attend_rows, embedding_and_output, feed_forward, Gate, Meta, Rope};

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen2's query/key/value biases.
    bias: Option<(Tensor, Tensor, Tensor)>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    kv: Option<LayerKv>,
}

impl Layer {
    /// The query, key and value of normalised rows `n` (`[b, t, hidden]`,
    /// Qwen2's biases added), on the kernel of a `chunk_rows`-row prompt
    /// chunk.
    fn qkv_chunk(&self, n: &Tensor, chunk_rows: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut q, mut k, mut v) = (
            self.q.forward_chunk(n, chunk_rows)?,
            self.k.forward_chunk(n, chunk_rows)?,
            self.v.forward_chunk(n, chunk_rows)?,
        );
        if let Some((bq, bk, bv)) = &self.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        Ok((q, k, v))
    }

    /// The rest of the layer for prompt rows: the attention's output
    /// projection and residual, then the MLP and its residual, from the
    /// layer's input `x` and its attention `attn` (`[b, t, hidden]` each).
    fn finish_chunk(&self, x: &Tensor, attn: &Tensor, eps: f32, chunk_rows: usize) -> Result<Tensor> {
        let h = (self.o.forward_chunk(attn, chunk_rows)? + x)?;
        let m = candle_nn::ops::rms_norm(&h, &self.ffn_norm, eps)?;
        feed_forward(&self.gate, &self.up, &self.down, &m, Gate::Silu, chunk_rows)? + h
    }
}

/// One sequence's KV caches, one per layer, held outside the model while
/// other sequences of a batch run ([`super::decode`]).
pub type KvState = Vec<Option<LayerKv>>;

/// The last row of each chunk of `x` (`[1, t, hidden]`, the chunks'
/// rows one after another), as `[chunks, hidden]`.
pub(super) fn last_rows(x: &Tensor, chunks: &[(&[u32], usize)]) -> Result<Tensor> {
    let mut end = 0;
    let mut rows = Vec::with_capacity(chunks.len());
    for (chunk, _) in chunks {
        end += chunk.len();
        rows.push(x.narrow(1, end - 1, 1)?);
    }
    Tensor::cat(&rows, 1)?.squeeze(0)
}

/// Layer `li`'s cache of every sequence of a batch.
pub(super) fn layer_caches(states: &mut [KvState], li: usize) -> Result<Vec<&mut Option<LayerKv>>> {
    states
        .iter_mut()
        .map(|s| {
            s.get_mut(li)
                .ok_or_else(|| candle_core::Error::Msg(format!("a decoding sequence has no cache for layer {li}")))
        })
        .collect()
}

/// A loaded llama-family model with its KV cache; clones share weights and
/// the cached prefix.
#[derive(Debug, Clone)]
pub struct Llama {
    embed: super::embedding::Embedding,
    output: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Llama {
    /// Loads `arch` (`llama` or `qwen2`) weights; `positions` bounds the
    /// context this instance serves.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        arch: &str,
        content: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let md = Meta { content, arch };
        let heads = md.usize("attention.head_count")?;
        let kv_heads = md.usize("attention.head_count_kv")?;
        let hidden = md.usize("embedding_length")?;
        let layers_n = md.usize("block_count")?;
        let eps = md.get("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = md.f32_or("rope.freq_base", 10_000.0);
        let head_dim = hidden / heads;

        let (embed, output) = embedding_and_output(content, reader, device)?;
        let mut qt = |name: &str| content.tensor(reader, name, device);
        let norm = qt("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = |s: &str| format!("blk.{i}.{s}");
            let mut mm = |s: &str| Linear::new(qt(&p(&format!("{s}.weight")))?, device);
            let (q, k, v, o) = (mm("attn_q")?, mm("attn_k")?, mm("attn_v")?, mm("attn_output")?);
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let has_bias = content.tensor_infos.contains_key(&p("attn_q.bias"));
            let mut dense = |s: &str| qt(&p(s))?.dequantize(device);
            let bias = match has_bias {
                true => Some((dense("attn_q.bias")?, dense("attn_k.bias")?, dense("attn_v.bias")?)),
                false => None,
            };
            layers.push(Layer {
                attn_norm: dense("attn_norm.weight")?,
                ffn_norm: dense("ffn_norm.weight")?,
                q,
                k,
                v,
                o,
                bias,
                gate,
                up,
                down,
                kv: None,
            });
        }
        let rope = Rope::new(head_dim, base, positions, device)?;
        let rope = if arch == "llama" { rope.interleaved() } else { rope };
        Ok(Llama {
            embed,
            output,
            layers,
            norm,
            rope,
            heads,
            kv_heads,
            head_dim,
            eps,
        })
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Bytes one token takes in a sequence's KV cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        // A key and a value of every key/value head in every layer, in f32
        // (the cache's dtype).
        self.layers.len() * 2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Moves the model's KV caches out (leaving it empty).
    pub fn take_state(&mut self) -> KvState {
        self.layers.iter_mut().map(|l| l.kv.take()).collect()
    }

    /// Puts a sequence's KV caches back into the model; an empty state (a
    /// sequence not started) leaves every layer's cache empty.
    pub fn put_state(&mut self, state: KvState) {
        let mut state = state.into_iter();
        for l in self.layers.iter_mut() {
            l.kv = state.next().flatten();
        }
    }

    /// One decode step for several sequences: token `ids[i]` at position
    /// `pos[i]`, continuing the caches in `states[i]` (updated in place).
    /// Projections and MLPs run once over all rows, attention per sequence.
    /// Returns logits `[n, vocab]`.
    pub fn forward_batch(
        &mut self,
        ids: &[u32],
        pos: &[usize],
        states: &mut [KvState],
        device: &Device,
    ) -> Result<Tensor> {
        let n = ids.len();
        let mut x = self
            .embed
            .rows(&Tensor::new(ids, device)?, device)?
            .reshape((n, 1, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let h_in = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let (mut q, mut k, mut v) = (
                layer.q.forward_decode(&h_in)?,
                layer.k.forward_decode(&h_in)?,
                layer.v.forward_decode(&h_in)?,
            );
            if let Some((bq, bk, bv)) = &layer.bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            // One row per sequence: `[n, heads, 1, hd]` is the one-token
            // layout of every sequence, stacked.
            let q = (self.rope.apply_rows(&q.reshape((n, heads, 1, hd))?, pos)? * scale)?;
            let k = self.rope.apply_rows(&k.reshape((n, kv_heads, 1, hd))?, pos)?;
            let v = v.reshape((n, kv_heads, 1, hd))?;
            let mut caches = layer_caches(states, li)?;
            let attn = attend_rows(&q, &k, &v, &mut caches, pos, None)?;
            let h = (layer.o.forward_decode(&attn)? + &x)?;
            let m = candle_nn::ops::rms_norm(&h, &layer.ffn_norm, eps)?;
            x = (feed_forward(&layer.gate, &layer.up, &layer.down, &m, Gate::Silu, 1)? + h)?;
        }
        let last = candle_nn::ops::rms_norm(&x.squeeze(1)?, &self.norm, eps)?;
        self.output.forward_decode(&last)?.to_dtype(DType::F32)
    }

    /// Prompt chunks of several sequences in one pass: chunk `i` is
    /// `chunks[i].0` at positions from `chunks[i].1`, continuing the caches
    /// in `states[i]` (updated in place). Projections, norms and MLPs run
    /// once over all rows, on the kernel a chunk of `chunk_rows` rows takes
    /// ([`super::quant::Linear::forward_chunk`]: every chunk of the pass
    /// must take that same kernel, which the caller ensures), and
    /// attention per sequence; rows do not depend on each other on either
    /// kernel, so each sequence's logits are those of its chunk run alone.
    /// Returns the logits of each chunk's last row, `[n, vocab]`.
    pub fn forward_chunks(
        &mut self,
        chunks: &[(&[u32], usize)],
        chunk_rows: usize,
        states: &mut [KvState],
        device: &Device,
    ) -> Result<Tensor> {
        // A prompt starting now holds no caches yet.
        for state in states.iter_mut() {
            state.resize_with(self.layers.len(), || None);
        }
        let ids: Vec<u32> = chunks.iter().flat_map(|(c, _)| c.iter().copied()).collect();
        let t = ids.len();
        let mut x = self
            .embed
            .rows(&Tensor::new(ids.as_slice(), device)?, device)?
            .reshape((1, t, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let (q, k, v) = layer.qkv_chunk(&n, chunk_rows)?;
            let mut caches = layer_caches(states, li)?;
            let mut rows = Vec::with_capacity(chunks.len());
            let mut start = 0;
            for ((chunk, pos), cache) in chunks.iter().zip(caches.iter_mut()) {
                let len = chunk.len();
                let part = |m: &Tensor, h: usize| m.narrow(1, start, len)?.reshape((1, len, h, hd))?.transpose(1, 2);
                let qi = (self.rope.apply(&part(&q, heads)?, *pos)? * scale)?;
                let ki = self.rope.apply(&part(&k, kv_heads)?, *pos)?;
                let vi = part(&v, kv_heads)?.contiguous()?;
                rows.push(attend(&qi, ki, vi, cache, *pos, None)?);
                start += len;
            }
            x = layer.finish_chunk(&x, &Tensor::cat(&rows, 1)?, eps, chunk_rows)?;
        }
        let last = candle_nn::ops::rms_norm(&last_rows(&x, chunks)?, &self.norm, eps)?;
        self.output.forward_decode(&last)?.to_dtype(DType::F32)
    }

    /// Runs tokens `ids` (`[1, t]`) at positions `pos..pos+t`; returns the
    /// last position's logits (`[1, vocab]`). `pos == 0` starts afresh.
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
        let x = self
            .embed
            .rows(&ids.flatten_all()?, ids.device())?
            .reshape((b, t, ()))?;
        let layers = self.layers.len();
        let x = self.run_layers(x, pos, chunk_rows, layers)?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.eps)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }

    /// The residual stream of `ids` (one sequence, at positions
    /// `pos..pos+t` after the cached `prefix`, which may be empty) after
    /// the first `layers` layers, `[t, hidden]`, with the caches of those
    /// layers extended by `ids`: the frozen trunk a fine-tune of the top
    /// layers starts from ([`crate::contribute::trunk`]). The rows take
    /// the prompt kernel a prefill of these tokens takes; the model's own
    /// caches are not touched.
    pub fn hidden_after(
        &self,
        prefix: &KvState,
        ids: &[u32],
        pos: usize,
        layers: usize,
        device: &Device,
    ) -> Result<(Tensor, KvState)> {
        let t = ids.len();
        // A clone shares the weights; only its caches are its own.
        let mut trunk = self.clone();
        trunk.put_state(prefix.clone());
        let x = trunk
            .embed
            .rows(&Tensor::new(ids, device)?, device)?
            .reshape((1, t, ()))?;
        let x = trunk.run_layers(x, pos, t, layers.min(self.layers.len()))?;
        Ok((x.reshape((t, ()))?, trunk.take_state()))
    }

    /// Layers `0..upto` over `x` (`[b, t, hidden]`) at positions
    /// `pos..pos+t`, appending to each layer's cache.
    fn run_layers(&mut self, mut x: Tensor, pos: usize, chunk_rows: usize, upto: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        for layer in self.layers.iter_mut().take(upto) {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let (q, k, v) = layer.qkv_chunk(&n, chunk_rows)?;
            let q = q.reshape((b, t, heads, hd))?.transpose(1, 2)?;
            let k = k.reshape((b, t, kv_heads, hd))?.transpose(1, 2)?;
            let v = v.reshape((b, t, kv_heads, hd))?.transpose(1, 2)?.contiguous()?;
            let q = (self.rope.apply(&q, pos)? * (1.0 / (hd as f64).sqrt()))?;
            let k = self.rope.apply(&k, pos)?;
            let attn = attend(&q, k, v, &mut layer.kv, pos, None)?;
            x = layer.finish_chunk(&x, &attn, eps, chunk_rows)?;
        }
        Ok(x)
    }

    /// Scores continuations of the sequence in the cache: `segments` are
    /// token runs that all start at position `pos` (each a continuation's
    /// tokens but its last) and run as one pass. Projections and MLPs
    /// multiply all their rows at once, on the decode kernel (rows do not
    /// depend on each other there, and a continuation's numbers stay those
    /// of its decode steps); each segment attends to the cache and to its
    /// own earlier tokens only. The cache is left as it was, unless `keep`
    /// is set and there is exactly one segment, whose keys and values are
    /// then appended (for a continuation run in chunks). Returns the
    /// logits of every row, segment after segment (`[rows, vocab]`).
    pub fn forward_segments(&mut self, segments: &[&[u32]], pos: usize, keep: bool, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = segments.concat();
        let t = ids.len();
        let keep = keep && segments.len() == 1;
        let mut x = self
            .embed
            .rows(&Tensor::new(ids.as_slice(), device)?, device)?
            .reshape((1, t, ()))?;
        let (heads, kv_heads, hd, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in self.layers.iter_mut() {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let (mut q, mut k, mut v) = (
                layer.q.forward_decode(&n)?,
                layer.k.forward_decode(&n)?,
                layer.v.forward_decode(&n)?,
            );
            if let Some((bq, bk, bv)) = &layer.bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let q = q.reshape((1, t, heads, hd))?.transpose(1, 2)?;
            let k = k.reshape((1, t, kv_heads, hd))?.transpose(1, 2)?;
            let v = v.reshape((1, t, kv_heads, hd))?.transpose(1, 2)?;
            let mut rows = Vec::with_capacity(segments.len());
            let mut start = 0;
            for seg in segments {
                let len = seg.len();
                let qs = (self.rope.apply(&q.narrow(2, start, len)?, pos)? * scale)?;
                let ks = self.rope.apply(&k.narrow(2, start, len)?, pos)?;
                let vs = v.narrow(2, start, len)?.contiguous()?;
                if keep {
                    rows.push(attend(&qs, ks, vs, &mut layer.kv, pos, None)?);
                } else {
                    let mut prefix = layer.kv.clone();
                    rows.push(attend(&qs, ks, vs, &mut prefix, pos, None)?);
                }
                start += len;
            }
            let attn = Tensor::cat(&rows, 1)?;
            let h = (layer.o.forward_decode(&attn)? + &x)?;
            let m = candle_nn::ops::rms_norm(&h, &layer.ffn_norm, eps)?;
            x = (feed_forward(&layer.gate, &layer.up, &layer.down, &m, Gate::Silu, 1)? + h)?;
        }
        let all = candle_nn::ops::rms_norm(&x.reshape((t, ()))?, &self.norm, eps)?;
        self.output.forward_decode(&all)?.to_dtype(DType::F32)
    }
}

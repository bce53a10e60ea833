//! Pieces every decoder in this folder shares: metadata lookup, rotary
//! embedding, the causal (optionally sliding-window) mask, and grouped-query
//! attention over a KV cache that forks cheaply.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};
pub(super) use tessera_kernels::math::Gate;
use tessera_kernels::math::{Causal, ValuesShape};

/// The token embedding (kept as stored, rows dequantized on lookup: see
/// [`super::embedding`]) and the output projection: `output.weight` when
/// the file has one, else the embedding matrix itself (tied weights, read
/// a second time for the projection's own packing), in a fast matmul
/// format.
pub(super) fn embedding_and_output<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> Result<(super::embedding::Embedding, super::quant::Linear)> {
    let embed = super::embedding::Embedding::new(content.tensor(reader, "token_embd.weight", &Device::Cpu)?)?;
    let output = match content.tensor_infos.contains_key("output.weight") {
        true => content.tensor(reader, "output.weight", device)?,
        false => content.tensor(reader, "token_embd.weight", device)?,
    };
    Ok((embed, super::quant::Linear::decode_only(output, device)?))
}

/// `{arch}.{key}` from a GGUF file's metadata, with errors naming the key.
pub(crate) struct Meta<'a> {
    pub(crate) content: &'a gguf_file::Content,
    pub(crate) arch: &'a str,
}

impl Meta<'_> {
    pub(crate) fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        let full = format!("{}.{key}", self.arch);
        self.content
            .metadata
            .get(&full)
            .ok_or_else(|| candle_core::Error::Msg(format!("metadata `{full}` is missing")))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        Ok(self.get(key)?.to_u32()? as usize)
    }

    pub(crate) fn f32_or(&self, key: &str, default: f32) -> f32 {
        self.get(key).and_then(|v| v.to_f32()).unwrap_or(default)
    }
}

/// Rotary position tables, applied in rotate-half form (`interleaved =
/// false`, Gemma, Qwen2) or to adjacent pairs (`true`, llama.cpp's layout for
/// llama weights).
#[derive(Debug, Clone)]
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    pub(super) fn new(head_dim: usize, base: f32, positions: usize, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
        let pos = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let angles = pos.matmul(&inv)?;
        Ok(Rope {
            cos: angles.cos()?,
            sin: angles.sin()?,
            interleaved: false,
        })
    }

    /// The same tables, applied to adjacent pairs.
    pub(super) fn interleaved(mut self) -> Self {
        self.interleaved = true;
        self
    }

    /// Rotates `x` (`[b, heads, t, head_dim]`) for positions `pos..pos+t`.
    pub(super) fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }

    /// Rotates `x` (`[n, heads, 1, head_dim]`, one row per sequence of a
    /// decode batch) for row `i` at position `pos[i]`: the numbers
    /// [`Rope::apply`] gives each row alone, in one call.
    pub(super) fn apply_rows(&self, x: &Tensor, pos: &[usize]) -> Result<Tensor> {
        let n = pos.len();
        let at: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
        let at = Tensor::new(at.as_slice(), self.cos.device())?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&at, 0)?.reshape((n, 1, half))?;
        let sin = self.sin.index_select(&at, 0)?.reshape((n, 1, half))?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }
}

/// Additive mask for queries at `pos..pos+t` over keys `0..pos+t`:
/// causal, and for local layers limited to the last `window` positions.
pub(super) fn causal_mask(t: usize, pos: usize, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
    let total = pos + t;
    let needs = t > 1 || window.is_some_and(|w| total > w);
    if !needs {
        return Ok(None);
    }
    let mut m = vec![0f32; t * total];
    for qi in 0..t {
        let qp = pos + qi;
        for kp in 0..total {
            let future = kp > qp;
            let too_far = window.is_some_and(|w| qp - kp.min(qp) >= w);
            if future || too_far {
                m[qi * total + kp] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (1, 1, t, total), device)?))
}

/// The values of a contiguous f32 CPU tensor that a custom op's `cpu_fwd`
/// received, or an error naming the op (`op`) and what it got.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (candle_core::CpuStorage::F32(_), None) => candle_core::bail!("{op}: a contiguous input expected"),
        _ => candle_core::bail!(
            "{op}: f32 input expected, got {:?}",
            candle_core::backend::BackendStorage::dtype(storage)
        ),
    }
}

/// A candle op over one of our in-place f32 kernels (CPU, contiguous
/// input): the softmax over the keys each query may see
/// ([`tessera_kernels::math::softmax_causal`]: no mask tensor is built or
/// added, and masked scores are never exponentiated).
enum InPlace {
    CausalSoftmax(Causal),
}

impl candle_core::CustomOp1 for InPlace {
    fn name(&self) -> &'static str {
        match self {
            InPlace::CausalSoftmax(_) => "tessera-causal-softmax",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut out = contiguous_f32(self.name(), storage, layout)?.to_vec();
        match self {
            InPlace::CausalSoftmax(causal) => {
                let width = layout.dims().last().copied().unwrap_or(0);
                tessera_kernels::math::softmax_causal(&mut out, width, *causal);
            }
        }
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Attention's two products on the CPU through our kernels
/// ([`tessera_kernels::math::attend_scores`] and
/// [`tessera_kernels::math::attend_values`]): every query's row is computed
/// in one fixed order whatever rows run beside it (candle's matmul changed
/// the last bits with the row count, which the prefix cache could not
/// allow), over the keys it may see, reading grouped keys and values
/// without copying them per query head.
enum Attention {
    /// Queries and keys to scores `[b, heads, t, keys]`.
    Scores {
        shape: ValuesShape,
        causal: Causal,
        /// Positions per head in the key buffer (see [`LayerKv`]).
        capacity: usize,
    },
    /// Probabilities and values to `[b, t, heads, d]`.
    Values {
        shape: ValuesShape,
        causal: Causal,
        /// Positions per head in the value buffer.
        capacity: usize,
    },
}

impl candle_core::CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        match self {
            Attention::Scores { .. } => "tessera-attend-scores",
            Attention::Values { .. } => "tessera-attend-values",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (a, c) = (
            contiguous_f32(self.name(), s1, l1)?,
            contiguous_f32(self.name(), s2, l2)?,
        );
        let (Attention::Scores {
            shape,
            causal,
            capacity,
        }
        | Attention::Values {
            shape,
            causal,
            capacity,
        }) = *self;
        let ValuesShape {
            batch,
            heads,
            kv_heads,
            keys,
            dim,
        } = shape;
        let t = causal.queries;
        let first = match self {
            Attention::Scores { .. } => batch * heads * t * dim,
            Attention::Values { .. } => batch * heads * t * keys,
        };
        if a.len() != first || capacity < keys || c.len() != batch * kv_heads * capacity * dim {
            candle_core::bail!(
                "{}: inputs {:?} and {:?} do not match {shape:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let (out, dims) = match self {
            Attention::Scores { .. } => (
                tessera_kernels::math::attend_scores_in(a, c, shape, causal, capacity),
                candle_core::Shape::from((batch, heads, t, keys)),
            ),
            Attention::Values { .. } => (
                tessera_kernels::math::attend_values_in(a, c, shape, causal, capacity),
                candle_core::Shape::from((batch, t, heads, dim)),
            ),
        };
        Ok((candle_core::CpuStorage::F32(out), dims))
    }
}

/// `act(gate) * up`, the middle of a gated feed-forward block: our vector
/// kernel on the CPU ([`tessera_kernels::math::gated`], one pass, no
/// scalar `tanh`), candle's ops elsewhere.
pub(super) fn gated(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.dims() == up.dims() {
        gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &Gated(act))
    } else {
        let a = match act {
            Gate::Silu => candle_nn::ops::silu(gate)?,
            Gate::GeluTanh => gate.gelu()?,
        };
        a * up
    }
}

/// A gated feed-forward block, `down(act(gate h) * up h)`, each projection
/// on the kernel a prompt chunk of `chunk_rows` rows takes
/// ([`super::quant::Linear::forward_chunk`]; 1 for a decode step's kernel).
pub(super) fn feed_forward(
    gate: &super::quant::Linear,
    up: &super::quant::Linear,
    down: &super::quant::Linear,
    h: &Tensor,
    act: Gate,
    chunk_rows: usize,
) -> Result<Tensor> {
    let ff = gated(
        &gate.forward_chunk(h, chunk_rows)?,
        &up.forward_chunk(h, chunk_rows)?,
        act,
    )?;
    down.forward_chunk(&ff, chunk_rows)
}

/// The candle op of [`gated`].
struct Gated(Gate);

impl candle_core::CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "tessera-gated"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (g, u) = (
            contiguous_f32(self.name(), s1, l1)?,
            contiguous_f32(self.name(), s2, l2)?,
        );
        if g.len() != u.len() {
            candle_core::bail!("{}: gate {:?} and up {:?} differ", self.name(), l1.dims(), l2.dims());
        }
        let mut out = g.to_vec();
        tessera_kernels::math::gated(&mut out, u, self.0);
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Positions of room a KV cache buffer is given beyond what it holds when
/// it is (re)allocated: appends within it write in place, so a sequence's
/// cache is copied once per this many decode steps instead of at every
/// step (which, with sixteen sequences of 400 tokens, moved 300 MB per
/// step on SmolLM2). It bounds the memory spent on room: at most this many
/// positions per layer and sequence.
pub const KV_ROOM: usize = 128;

/// One layer's cached keys and values for one sequence: buffers of shape
/// `[b, kv_heads, capacity, d]` whose first positions are this holder's,
/// possibly after a shared part in other buffers.
///
/// Holders fork by cloning (a prompt shared by several continuations, the
/// options of a question, a trunk's prefix): the clones share the buffers.
/// Appending writes in place only for the holder that is at the buffer's
/// high-water mark (`filled`, shared by every clone, moved by one
/// compare-and-swap), so no holder's positions are ever overwritten. Any
/// other holder either copies its positions into a new buffer (a prompt
/// pass: `append` with `share` off) or, in a decode step, keeps
/// reading the positions it holds from the buffer they are in (`shared`,
/// which no append touches below its high-water mark) and starts a small
/// buffer of its own for what follows. Sixteen continuations of one
/// prompt thus hold it once, and their attention reads it once per
/// step ([`tessera_kernels::math::attend_decode`]). A holder with a shared
/// part that must copy copies only its own part, so the chain is never
/// longer than one shared part and one own buffer.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// The own buffers, position `shared.len + i` at index `i`.
    k: Tensor,
    v: Tensor,
    /// Positions held in all, the shared ones included.
    len: usize,
    /// High-water mark of the own buffers (own indices).
    filled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The first positions, read from another holder's buffers.
    shared: Option<SharedKv>,
}

/// The first `len` positions of a [`LayerKv`], in buffers it does not own
/// (with their owner's high-water mark).
#[derive(Debug, Clone)]
struct SharedKv {
    k: Tensor,
    v: Tensor,
    len: usize,
    filled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LayerKv {
    /// A cache holding exactly `k` and `v` (`[b, kv_heads, len, d]`), with
    /// no room: the first append copies.
    pub fn new(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        Ok(Self::from_buffers(k.contiguous()?, v.contiguous()?, len))
    }

    fn from_buffers(k: Tensor, v: Tensor, len: usize) -> Self {
        LayerKv {
            k,
            v,
            len,
            filled: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(len)),
            shared: None,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A holder of this cache's first `len` positions (a fork taken back
    /// to where it began, such as the end of a prompt another sequence has
    /// since continued from): the same buffers, read up to `len`, so
    /// appending to it shares rather than copies.
    pub fn truncated(&self, len: usize) -> Result<Self> {
        if len > self.len {
            candle_core::bail!("a cache of {} positions cannot be truncated to {len}", self.len);
        }
        match &self.shared {
            Some(s) if len <= s.len => Ok(LayerKv {
                k: s.k.clone(),
                v: s.v.clone(),
                len,
                filled: s.filled.clone(),
                shared: None,
            }),
            _ => Ok(LayerKv { len, ..self.clone() }),
        }
    }

    /// What identifies the keys and values this holder reads: its own
    /// buffer, the shared one if any, and how many positions it holds. Two
    /// holders with the same identity hold the same keys and values, since
    /// positions below a buffer's high-water mark are never written again
    /// (see the type's docs). A device that keeps a copy of a sequence's
    /// cache between its turns ([`crate::backends::webgpu`]) knows it by this.
    pub(crate) fn identity(&self) -> (candle_core::TensorId, Option<candle_core::TensorId>, usize) {
        (self.k.id(), self.shared.as_ref().map(|s| s.k.id()), self.len)
    }

    /// This cache followed by `k`, `v` (`[b, kv_heads, t, d]`): a decode
    /// step's append, in place where this holder may write.
    pub(crate) fn extended(&self, k: &Tensor, v: &Tensor) -> Result<Self> {
        self.append(&k.contiguous()?, &v.contiguous()?, true)
    }

    /// Positions read from shared buffers.
    fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.len)
    }

    /// The held keys, `[b, kv_heads, len, d]` (a view into the buffer, or
    /// a copy where part of them is shared).
    pub fn keys(&self) -> Result<Tensor> {
        self.held(&self.k, self.shared.as_ref().map(|s| &s.k))
    }

    /// The held values, `[b, kv_heads, len, d]` (as [`Self::keys`]).
    pub fn values(&self) -> Result<Tensor> {
        self.held(&self.v, self.shared.as_ref().map(|s| &s.v))
    }

    fn held(&self, own: &Tensor, shared: Option<&Tensor>) -> Result<Tensor> {
        let own = own.narrow(2, 0, self.len - self.shared_len())?;
        match shared {
            Some(s) => Tensor::cat(&[&s.narrow(2, 0, self.shared_len())?, &own], 2),
            None => Ok(own),
        }
    }

    /// The cache after `k`, `v` (`[b, kv_heads, t, d]`, contiguous) at
    /// position `pos`: `cache` extended ([`Self::append`]), or a new cache
    /// where there is none or `pos == 0` starts the sequence afresh.
    fn continued(cache: Option<&Self>, pos: usize, k: &Tensor, v: &Tensor, share: bool) -> Result<Self> {
        match cache {
            Some(kv) if pos > 0 => kv.append(k, v, share),
            _ => Ok(Self::from_buffers(grown(None, k)?, grown(None, v)?, k.dim(2)?)),
        }
    }

    /// Positions the own buffers have room for.
    fn capacity(&self) -> Result<usize> {
        self.k.dim(2)
    }

    /// This cache followed by `k`, `v` (`[b, kv_heads, t, d]`, contiguous):
    /// in place where this holder may write (see the type's docs); else,
    /// with `share`, after this holder's positions left where they are
    /// (its own part copied only if it already reads a shared part); else
    /// all in one new buffer. New buffers get [`KV_ROOM`] positions of
    /// room. Without `share` the result is always one buffer, as a prompt
    /// pass needs it.
    fn append(&self, k: &Tensor, v: &Tensor, share: bool) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let t = k.dim(2)?;
        let own = self.len - self.shared_len();
        let end = own + t;
        // In place only where the result may be two-part, or is one part.
        let may_write = self.shared.is_none() || share;
        if may_write
            && end <= self.capacity()?
            && self
                .filled
                .compare_exchange(own, end, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.k.slice_set(k, 2, own)?;
            self.v.slice_set(v, 2, own)?;
            return Ok(LayerKv {
                k: self.k.clone(),
                v: self.v.clone(),
                len: self.len + t,
                filled: self.filled.clone(),
                shared: self.shared.clone(),
            });
        }
        if !share {
            return Ok(Self::from_buffers(
                grown(Some(&self.keys()?), k)?,
                grown(Some(&self.values()?), v)?,
                self.len + t,
            ));
        }
        let (shared, k, v) = match &self.shared {
            // Only the own part is copied: the shared part stays shared.
            Some(s) => (
                s.clone(),
                grown(Some(&self.k.narrow(2, 0, own)?), k)?,
                grown(Some(&self.v.narrow(2, 0, own)?), v)?,
            ),
            // Positions below the high-water mark are never written again.
            None => (
                SharedKv {
                    k: self.k.clone(),
                    v: self.v.clone(),
                    len: self.len,
                    filled: self.filled.clone(),
                },
                grown(None, k)?,
                grown(None, v)?,
            ),
        };
        let mut next = Self::from_buffers(k, v, self.len + t);
        next.filled.store(next.len - shared.len, Ordering::Release);
        next.shared = Some(shared);
        Ok(next)
    }
}

/// A new buffer holding `old` (if any) then `new` along the positions, with
/// [`KV_ROOM`] zeroed positions of room after them.
fn grown(old: Option<&Tensor>, new: &Tensor) -> Result<Tensor> {
    let (b, heads, _, d) = new.dims4()?;
    let room = Tensor::zeros((b, heads, KV_ROOM, d), new.dtype(), new.device())?;
    match old {
        Some(old) => Tensor::cat(&[old, new, &room], 2),
        None => Tensor::cat(&[new, &room], 2),
    }
}

/// One decode step's attention for several sequences, each over its own
/// cache: row `i` of `q` (`[n, heads, 1, d]`, rotated and scaled), `k` and
/// `v` (`[n, kv_heads, 1, d]`) is sequence `i`'s token at position
/// `pos[i]`, appended to `caches[i]`. Returns `[n, 1, heads * d]`, each row
/// what [`attend`] gives that sequence alone. On the CPU all rows go to
/// [`tessera_kernels::math::attend_decode`] in one call.
pub(super) fn attend_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [&mut Option<LayerKv>],
    pos: &[usize],
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, heads, _, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    if caches.len() != n || pos.len() != n {
        candle_core::bail!(
            "attend_rows: {n} rows, {} caches, {} positions",
            caches.len(),
            pos.len()
        );
    }
    let cpu = q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32;
    if !cpu {
        let mut rows = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            rows.push(attend(&qi, ki, vi, cache, pos[i], window)?);
        }
        return Tensor::cat(&rows, 0);
    }
    // Appends first (they write into buffers), reads after.
    let mut held = Vec::with_capacity(n);
    for (i, cache) in caches.iter_mut().enumerate() {
        let (ki, vi) = (k.narrow(0, i, 1)?.contiguous()?, v.narrow(0, i, 1)?.contiguous()?);
        let layer = LayerKv::continued(cache.as_ref(), pos[i], &ki, &vi, true)?;
        held.push(layer.clone());
        **cache = Some(layer);
    }
    let guards: Vec<_> = held
        .iter()
        .map(|l| {
            (
                (l.k.storage_and_layout(), l.v.storage_and_layout()),
                l.shared
                    .as_ref()
                    .map(|s| (s.k.storage_and_layout(), s.v.storage_and_layout())),
            )
        })
        .collect();
    let mut seqs = Vec::with_capacity(n);
    for ((own, shared), layer) in guards.iter().zip(&held) {
        let own = kv_buffers(
            (&own.0 .0, own.0 .1),
            (&own.1 .0, own.1 .1),
            layer.capacity()?,
            kv_heads * d,
        )?;
        let shared = match (shared, &layer.shared) {
            (Some((kg, vg)), Some(s)) => Some(tessera_kernels::math::SharedKv {
                buffers: kv_buffers((&kg.0, kg.1), (&vg.0, vg.1), s.k.dim(2)?, kv_heads * d)?,
                len: s.len,
            }),
            _ => None,
        };
        seqs.push(tessera_kernels::math::DecodeKv {
            own,
            len: layer.len(),
            window,
            shared,
        });
    }
    let qs: Vec<f32> = q.contiguous()?.flatten_all()?.to_vec1()?;
    let out = tessera_kernels::math::attend_decode(&qs, &seqs, heads, kv_heads, d);
    drop(seqs);
    drop(guards);
    Tensor::from_vec(out, (n, 1, heads * d), q.device())
}

/// A KV cache's key and value buffers for the decode kernel, checked to
/// hold `capacity` positions of `width` values (`kv_heads * d`) each.
fn kv_buffers<'a>(
    (k, kl): (&'a candle_core::Storage, &candle_core::Layout),
    (v, vl): (&'a candle_core::Storage, &candle_core::Layout),
    capacity: usize,
    width: usize,
) -> Result<tessera_kernels::math::KvBuffers<'a>> {
    let (
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(kd)),
        Some((k0, k1)),
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vd)),
        Some((v0, v1)),
    ) = (k, kl.contiguous_offsets(), v, vl.contiguous_offsets())
    else {
        candle_core::bail!("attend_rows: a KV cache is not a contiguous f32 buffer on the CPU");
    };
    let size = capacity * width;
    if k1 - k0 != size || v1 - v0 != size {
        candle_core::bail!("attend_rows: a KV cache buffer does not hold {size} values");
    }
    Ok(tessera_kernels::math::KvBuffers {
        keys: &kd[k0..k1],
        values: &vd[v0..v1],
        capacity,
    })
}

/// Attends queries `q` (`[b, heads, t, d]`, rotated and scaled) to the cached
/// keys/values plus this step's `k`, `v` (`[b, kv_heads, t, d]`), updating
/// the cache; `pos == 0` starts a new cache. Each query at `pos + i` sees
/// the keys up to its own position, and only the last `window` of them
/// where the layer has a sliding window. Returns `[b, t, heads * d]`.
pub(super) fn attend(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    cache: &mut Option<LayerKv>,
    pos: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let layer = LayerKv::continued(cache.as_ref(), pos, &k, &v, false)?;
    let (keys, capacity) = (layer.len(), layer.capacity()?);
    let (kbuf, vbuf) = (layer.k.clone(), layer.v.clone());
    let rep = heads / kv_heads;
    let cpu = q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32;
    if cpu {
        let causal = Causal {
            queries: t,
            pos,
            window,
        };
        let shape = ValuesShape {
            batch: b,
            heads,
            kv_heads,
            keys,
            dim: d,
        };
        *cache = Some(layer);
        let scores = q.contiguous()?.apply_op2_no_bwd(
            &kbuf,
            &Attention::Scores {
                shape,
                causal,
                capacity,
            },
        )?;
        let probs = scores.apply_op1_no_bwd(&InPlace::CausalSoftmax(causal))?;
        let out = probs.apply_op2_no_bwd(
            &vbuf,
            &Attention::Values {
                shape,
                causal,
                capacity,
            },
        )?;
        return out.reshape((b, t, heads * d));
    }
    let (k, v) = (layer.keys()?, layer.values()?);
    *cache = Some(layer);
    let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
    let scores = q.contiguous()?.matmul(&k.t()?)?;
    let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
    let probs = {
        let scores = match causal_mask(t, pos, window, scores.device())? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * d))
}

//! Pieces every decoder in this folder shares: metadata lookup, rotary
//! embedding, the causal (optionally sliding-window) mask, and grouped-query
//! attention over a KV cache that forks cheaply.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};
use tessera_kernels::math::{Causal, ValuesShape};

/// The token embedding (kept as f16 for row lookup) and the output
/// projection: `output.weight` when the file has one, else the embedding
/// matrix itself (tied weights), in a fast matmul format.
pub(super) fn embedding_and_output<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> Result<(Tensor, super::quant::Linear)> {
    let embed_q = content.tensor(reader, "token_embd.weight", device)?;
    let embed = embed_q.dequantize_f16(device)?;
    let output = match content.tensor_infos.contains_key("output.weight") {
        true => content.tensor(reader, "output.weight", device)?,
        false => embed_q,
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

/// A candle op over one of our in-place f32 kernels (CPU, contiguous
/// input): the softmax over the keys each query may see
/// ([`tessera_kernels::math::softmax_causal`]: no mask tensor is built or
/// added, and masked scores are never exponentiated) or SiLU.
enum InPlace {
    CausalSoftmax(Causal),
    Silu,
}

impl candle_core::CustomOp1 for InPlace {
    fn name(&self) -> &'static str {
        match self {
            InPlace::CausalSoftmax(_) => "tessera-causal-softmax",
            InPlace::Silu => "tessera-silu",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (candle_core::CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("{}: contiguous f32 input expected", self.name());
        };
        let mut out = values[start..end].to_vec();
        match self {
            InPlace::CausalSoftmax(causal) => {
                let width = layout.dims().last().copied().unwrap_or(0);
                tessera_kernels::math::softmax_causal(&mut out, width, *causal);
            }
            InPlace::Silu => tessera_kernels::math::silu(&mut out),
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
    Scores { shape: ValuesShape, causal: Causal },
    /// Probabilities and values to `[b, t, heads, d]`.
    Values { shape: ValuesShape, causal: Causal },
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
        let (candle_core::CpuStorage::F32(a), Some((a0, a1)), candle_core::CpuStorage::F32(c), Some((c0, c1))) =
            (s1, l1.contiguous_offsets(), s2, l2.contiguous_offsets())
        else {
            candle_core::bail!("{}: contiguous f32 inputs expected", self.name());
        };
        let (Attention::Scores { shape, causal } | Attention::Values { shape, causal }) = *self;
        let ValuesShape {
            batch,
            heads,
            kv_heads,
            keys,
            dim,
        } = shape;
        let t = causal.queries;
        let (a, c) = (&a[a0..a1], &c[c0..c1]);
        let first = match self {
            Attention::Scores { .. } => batch * heads * t * dim,
            Attention::Values { .. } => batch * heads * t * keys,
        };
        if a.len() != first || c.len() != batch * kv_heads * keys * dim {
            candle_core::bail!(
                "{}: inputs {:?} and {:?} do not match {shape:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let (out, dims) = match self {
            Attention::Scores { .. } => (
                tessera_kernels::math::attend_scores(a, c, shape, causal),
                candle_core::Shape::from((batch, heads, t, keys)),
            ),
            Attention::Values { .. } => (
                tessera_kernels::math::attend_values(a, c, shape, causal),
                candle_core::Shape::from((batch, t, heads, dim)),
            ),
        };
        Ok((candle_core::CpuStorage::F32(out), dims))
    }
}

/// `x * sigmoid(x)`: our vector kernel on the CPU, candle's elsewhere.
pub(super) fn silu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&InPlace::Silu)
    } else {
        candle_nn::ops::silu(x)
    }
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
    cache: &mut Option<(Tensor, Tensor)>,
    pos: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let v = v.contiguous()?;
    let (k, v) = match (cache.as_ref(), pos) {
        (Some((pk, pv)), p) if p > 0 => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        _ => (k, v),
    };
    *cache = Some((k.clone(), v.clone()));
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
            keys: v.dim(2)?,
            dim: d,
        };
        let scores = q
            .contiguous()?
            .apply_op2_no_bwd(&k.contiguous()?, &Attention::Scores { shape, causal })?;
        let probs = scores.apply_op1_no_bwd(&InPlace::CausalSoftmax(causal))?;
        let out = probs.apply_op2_no_bwd(&v, &Attention::Values { shape, causal })?;
        return out.reshape((b, t, heads * d));
    }
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

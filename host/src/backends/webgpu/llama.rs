//! The llama family (Llama, SmolLM2, Qwen2) and Gemma 3 on wgpu: the same
//! architectures as `gguf::llama` and `gguf::gemma3` (see there), with the
//! residual stream, the KV cache and every product on the device. Gemma 3
//! adds per-head query/key norms, norms after attention and after the MLP,
//! GELU (tanh) gating, embeddings scaled by sqrt(width), and five local
//! layers (sliding window, rotary base 10,000) to every global one.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use super::{Kernels, Params};
use crate::backends::gguf::attention::Meta;
use crate::backends::gguf::llama::{KvState, LayerKv};
use crate::backends::gguf::quant;

/// A weight matrix of `n` rows of `k` on the device, in slices of rows
/// that each fit one binding (an embedding matrix of a 262k vocabulary
/// does not fit one on many devices).
struct Mat {
    n: usize,
    k: usize,
    /// (first row, rows, data) of each slice.
    slices: Vec<(usize, usize, MatData)>,
}

enum MatData {
    /// Dense values.
    F32(wgpu::Buffer),
    /// Q8_0: the int8 values packed four to a word, a scale per 32.
    Q8 { qs: wgpu::Buffer, scales: wgpu::Buffer },
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let man = (bits & 0x3ff) as u32;
    let v = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // A subnormal half: normalise it.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(v)
}

impl Mat {
    /// `qt` on the device: Q8_0 as is (after the CPU path's re-encoding of
    /// slow formats), anything else dequantized to f32.
    fn new(gpu: &Kernels, label: &str, qt: QTensor) -> Result<Mat, String> {
        let qt = quant::fast(qt, &Device::Cpu).map_err(|e| format!("{label}: {e}"))?;
        let (n, k) = qt.shape().dims2().map_err(|e| format!("{label}: {e}"))?;
        // Rows per slice: what one binding holds, in f32 (the larger form).
        let per = ((gpu.max_binding as usize / 4 / k.max(1)).max(1)).min(n.max(1));
        let mut slices = Vec::new();
        if qt.dtype() == GgmlDType::Q8_0 && k % 32 == 0 {
            let raw = qt.data().map_err(|e| format!("{label}: {e}"))?;
            let blocks = n * k / 32;
            if raw.len() != blocks * 34 {
                return Err(format!("{label}: {} bytes for {blocks} Q8_0 blocks", raw.len()));
            }
            let row_bytes = k / 32 * 34;
            for (i, part) in raw.chunks(per * row_bytes).enumerate() {
                let mut qs = Vec::with_capacity(part.len() / 34 * 8);
                let mut scales = Vec::with_capacity(part.len() / 34);
                for blk in part.chunks_exact(34) {
                    scales.push(f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])));
                    qs.extend(
                        blk[2..]
                            .chunks_exact(4)
                            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
                    );
                }
                let data = MatData::Q8 {
                    qs: gpu.upload(label, &qs)?,
                    scales: gpu.upload(label, &scales)?,
                };
                slices.push((i * per, part.len() / row_bytes, data));
            }
        } else {
            let dense: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(|e| format!("{label}: {e}"))?;
            for (i, part) in dense.chunks(per * k).enumerate() {
                slices.push((i * per, part.len() / k, MatData::F32(gpu.upload(label, part)?)));
            }
        }
        Ok(Mat { n, k, slices })
    }

    /// Records `out[rows, n] = x[rows, k] W^T`, a dispatch per slice.
    fn record(&self, gpu: &Kernels, enc: &mut wgpu::CommandEncoder, x: &wgpu::Buffer, rows: usize, out: &wgpu::Buffer) {
        for (first, n, data) in &self.slices {
            let params = Params {
                n: *n as u32,
                k: self.k as u32,
                rows: rows as u32,
                col0: *first as u32,
                ldo: self.n as u32,
                ..Params::default()
            };
            let groups = (n.div_ceil(64) as u32, rows as u32);
            match data {
                MatData::F32(w) => gpu.dispatch(enc, "mm_f32", params, [Some(x), Some(w), None], out, groups),
                MatData::Q8 { qs, scales } => {
                    gpu.dispatch(enc, "mm_q8", params, [Some(x), Some(qs), Some(scales)], out, groups)
                }
            }
        }
    }
}

struct Layer {
    attn_norm: wgpu::Buffer,
    q: Mat,
    k: Mat,
    v: Mat,
    o: Mat,
    bias: Option<(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer)>,
    ffn_norm: wgpu::Buffer,
    gate: Mat,
    up: Mat,
    down: Mat,
    /// Gemma 3's extra norms: per-head query and key, after attention,
    /// after the MLP.
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
    post_attn_norm: Option<wgpu::Buffer>,
    post_ffn_norm: Option<wgpu::Buffer>,
    /// Sliding window (0: the whole context).
    window: u32,
    /// Which of the model's rotary tables this layer uses.
    rope: usize,
}

/// Cosines and sines of the rotary angles of every position and pair
/// (`[positions, head_dim / 2]`), computed on the host as the CPU path
/// computes them (f32 inverse frequencies, f32 products).
struct RopeTable {
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
}

impl RopeTable {
    fn new(gpu: &Kernels, head_dim: usize, base: f32, positions: usize) -> Result<Self, String> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * inv.len());
        let mut sin = Vec::with_capacity(positions * inv.len());
        for p in 0..positions {
            for f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTable {
            cos: gpu.upload("rope_cos", &cos)?,
            sin: gpu.upload("rope_sin", &sin)?,
        })
    }
}

/// The weights and shapes, shared by every copy of a model (see
/// [`WgpuLlama::clone`]).
struct Weights {
    /// Token embeddings, dequantized, kept on the host: a row is gathered
    /// per token and uploaded (a few KB), where the whole table would cost
    /// the device its largest matrix twice when the output shares it.
    embed: Vec<f32>,
    output: Mat,
    norm: wgpu::Buffer,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    eps: f32,
    interleaved: bool,
    /// Rotary tables: one per base the layers use.
    ropes: Vec<RopeTable>,
    /// Gemma 3: GELU gating and embeddings times sqrt(width).
    gelu: bool,
    embed_scale: f32,
    positions: usize,
}

/// Device memory kept for the caches of sequences between their turns
/// ([`Parked`]); at least one is always kept.
const PARKED_BYTES: u64 = 1 << 30;

/// Positions a sequence's caches are first made for. They grow as the
/// sequence does (doubling, up to the positions the model was loaded for):
/// made for every position at once, the caches of a SmolLM2 loaded for
/// 8,192 took 377 MB per sequence whatever its length.
const FIRST_POSITIONS: usize = 64;

/// Each layer's keys and values for the positions the buffers have room
/// for (`[capacity, kv_heads * head_dim]`; see [`WgpuLlama::grow`]).
type Caches = Vec<(wgpu::Buffer, wgpu::Buffer)>;

/// Device bytes of `caches`.
fn cache_bytes(caches: &Caches) -> u64 {
    caches.iter().map(|(k, v)| k.size() + v.size()).sum()
}

/// What identifies a state handed out by [`WgpuLlama::take_state`]: each
/// layer's [`LayerKv::identity`].
type StateId = Vec<Option<(candle_core::TensorId, Option<candle_core::TensorId>, usize)>>;

fn state_id(state: &KvState) -> StateId {
    state.iter().map(|l| l.as_ref().map(LayerKv::identity)).collect()
}

/// A sequence's caches left on the device when its turn ended, known by
/// the state [`WgpuLlama::take_state`] handed out for them: when that
/// state comes back ([`WgpuLlama::put_state`]) these buffers become the
/// model's again, and nothing is uploaded.
struct Parked {
    caches: Caches,
    id: StateId,
    len: usize,
    /// When it was parked: past [`PARKED_BYTES`] the oldest goes first.
    used: u64,
}

/// A llama-family model on a wgpu device with one sequence's KV cache.
/// A clone shares the weights and copies the cache (on the device).
///
/// Several sequences take turns on one model (the decode engine's batch):
/// each turn ends with [`Self::take_state`], which hands the sequence its
/// cache as host tensors, and the next begins with [`Self::put_state`].
/// Copying whole caches each way at every token would cost more than the
/// token itself, so the device keeps each sequence's buffers between its
/// turns ([`Parked`], up to [`PARKED_BYTES`]), a returning state that is
/// the one handed out is matched to them by identity, and a turn reads back
/// only the positions it added, appended to the host copy. A state the
/// device does not hold (a prefix-cache hit, a fork, one evicted) is
/// uploaded whole, as before.
pub struct WgpuLlama {
    gpu: Arc<Kernels>,
    w: Arc<Weights>,
    caches: Caches,
    /// Tokens in the cache.
    len: usize,
    /// The host copy of the cache's first positions, as last handed out or
    /// put back (empty when there is none): a turn reads back only what
    /// follows it.
    mirror: KvState,
    parked: Vec<Parked>,
    /// Buffers free for the next parking.
    spare: Option<Caches>,
    clock: u64,
    uploads: u64,
}

impl Clone for WgpuLlama {
    fn clone(&self) -> Self {
        let g = self.gpu.as_ref();
        let kvw = self.w.kv_heads * self.w.head_dim;
        let mut enc = g.device.create_command_encoder(&Default::default());
        let bytes = (self.len * kvw * 4) as u64;
        let caches = self
            .caches
            .iter()
            .map(|(k, v)| {
                let floats = k.size() as usize / 4;
                let (k2, v2) = (g.scratch("k_cache", floats), g.scratch("v_cache", floats));
                if bytes > 0 {
                    enc.copy_buffer_to_buffer(k, 0, &k2, 0, bytes);
                    enc.copy_buffer_to_buffer(v, 0, &v2, 0, bytes);
                }
                (k2, v2)
            })
            .collect();
        g.queue.submit([enc.finish()]);
        WgpuLlama {
            gpu: self.gpu.clone(),
            w: self.w.clone(),
            caches,
            len: self.len,
            mirror: self.mirror.clone(),
            parked: Vec::new(),
            spare: None,
            clock: 0,
            uploads: 0,
        }
    }
}

/// One sequence's rows in a forward pass ([`WgpuLlama::run`]): its
/// caches, the position of its first row, and how many rows it has.
struct Part<'a> {
    caches: &'a Caches,
    pos: usize,
    rows: usize,
}

/// Which rows' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last row's only (prefill, decoding).
    Last,
    /// Every row's (scoring a continuation).
    All,
}

/// Empty caches of `layers` layers, `floats` per buffer.
fn new_caches(gpu: &Kernels, layers: usize, floats: usize) -> Caches {
    (0..layers)
        .map(|_| (gpu.scratch("k_cache", floats), gpu.scratch("v_cache", floats)))
        .collect()
}

/// Positions every layer of `state` holds, if it has layers and they agree.
fn mirror_len(state: &KvState) -> Option<usize> {
    let mut lens = state.iter().map(|l| l.as_ref().map(LayerKv::len));
    let first = lens.next()??;
    lens.all(|l| l == Some(first)).then_some(first)
}

fn vector(qt: QTensor, label: &str) -> Result<Vec<f32>, String> {
    qt.dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| format!("{label}: {e}"))
}

impl WgpuLlama {
    /// Loads a llama-family GGUF file onto the best wgpu device, with a KV
    /// cache for `positions` tokens (bounded by the file's context length).
    pub fn load(path: &std::path::Path, positions: usize) -> Result<Self, String> {
        let shown = path.display().to_string();
        let mut f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
        let len = f.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
        let content = crate::backends::gguf::read_content(&mut f, len).map_err(|e| format!("{shown}: {e}"))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "gemma3") {
            return Err(format!(
                "{shown}: architecture `{arch}` does not run on wgpu (llama, qwen2 and gemma3 do): use `--device cpu`"
            ));
        }
        let context = content
            .metadata
            .get(&format!("{arch}.context_length"))
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        let gpu = Kernels::open()?;
        Self::from_gguf(gpu, &arch, &content, &mut f, positions.min(context)).map_err(|e| format!("{shown}: {e}"))
    }

    /// Loads `arch` (`llama`, `qwen2` or `gemma3`) from a GGUF file's `content` onto
    /// the device, with a KV cache for `positions` tokens.
    pub fn from_gguf<R: Read + Seek>(
        gpu: Arc<Kernels>,
        arch: &str,
        content: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
    ) -> Result<Self, String> {
        let md = Meta { content, arch };
        let meta = |k: &str| md.usize(k).map_err(|e| e.to_string());
        let heads = meta("attention.head_count")?;
        let kv_heads = meta("attention.head_count_kv")?;
        let hidden = meta("embedding_length")?;
        let layers_n = meta("block_count")?;
        let eps = md
            .get("attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32())
            .map_err(|e| e.to_string())?;
        let gemma = arch == "gemma3";
        let theta = md.f32_or("rope.freq_base", if gemma { 1_000_000.0 } else { 10_000.0 });
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(format!(
                "{heads} heads, {kv_heads} key/value heads and width {hidden} do not fit together"
            ));
        }
        let head_dim = match gemma {
            true => meta("attention.key_length")?,
            false => hidden / heads,
        };
        let window = match gemma {
            true => meta("attention.sliding_window")? as u32,
            false => 0,
        };
        if head_dim > 256 || head_dim % 2 != 0 {
            return Err(format!(
                "head dimension {head_dim}: the wgpu kernels take even ones up to 256"
            ));
        }
        let mut qt = |name: &str| {
            content
                .tensor(reader, name, &Device::Cpu)
                .map_err(|e| format!("{name}: {e}"))
        };
        let embed_qt = qt("token_embd.weight")?;
        let (vocab, width) = embed_qt.shape().dims2().map_err(|e| e.to_string())?;
        if width != hidden {
            return Err(format!(
                "token_embd.weight is {vocab}x{width}, the model is {hidden} wide"
            ));
        }
        let embed = vector(
            quant::fast(embed_qt, &Device::Cpu).map_err(|e| e.to_string())?,
            "token_embd.weight",
        )?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => Mat::new(&gpu, "output.weight", qt("output.weight")?)?,
            false => Mat::new(&gpu, "token_embd.weight", qt("token_embd.weight")?)?,
        };
        let norm = gpu.upload("output_norm", &vector(qt("output_norm.weight")?, "output_norm.weight")?)?;
        let kvw = kv_heads * head_dim;
        let mut layers = Vec::with_capacity(layers_n);
        let mut ffn = 0;
        for i in 0..layers_n {
            let p = |s: &str| format!("blk.{i}.{s}");
            let mut mat = |s: &str| {
                let name = p(&format!("{s}.weight"));
                let t = qt(&name)?;
                Mat::new(&gpu, &name, t)
            };
            let (q, k, v, o) = (mat("attn_q")?, mat("attn_k")?, mat("attn_v")?, mat("attn_output")?);
            let (gate, up, down) = (mat("ffn_gate")?, mat("ffn_up")?, mat("ffn_down")?);
            ffn = gate.n;
            let mut dense = |s: &str| -> Result<wgpu::Buffer, String> {
                let name = p(s);
                let v = vector(qt(&name)?, &name)?;
                gpu.upload(&name, &v)
            };
            let bias = match content.tensor_infos.contains_key(&p("attn_q.bias")) {
                true => Some((dense("attn_q.bias")?, dense("attn_k.bias")?, dense("attn_v.bias")?)),
                false => None,
            };
            let mut gemma_norm = |s: &str| match gemma {
                true => dense(s).map(Some),
                false => Ok(None),
            };
            let (q_norm, k_norm) = (gemma_norm("attn_q_norm.weight")?, gemma_norm("attn_k_norm.weight")?);
            let post_attn_norm = gemma_norm("post_attention_norm.weight")?;
            let post_ffn_norm = gemma_norm("post_ffw_norm.weight")?;
            // Gemma 3: five local layers to each global one.
            let local = gemma && i % 6 < 5;
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
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                window: if local { window } else { 0 },
                rope: if local { 1 } else { 0 },
            });
        }
        let caches = new_caches(&gpu, layers_n, FIRST_POSITIONS.min(positions) * kvw);
        let mut ropes = vec![RopeTable::new(&gpu, head_dim, theta, positions)?];
        if gemma {
            ropes.push(RopeTable::new(&gpu, head_dim, 10_000.0, positions)?);
        }
        let w = Weights {
            ropes,
            embed,
            output,
            norm,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            eps,
            interleaved: arch == "llama",
            gelu: gemma,
            embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
            positions,
        };
        Ok(WgpuLlama {
            gpu,
            w: Arc::new(w),
            caches,
            len: 0,
            mirror: Vec::new(),
            parked: Vec::new(),
            spare: None,
            clock: 0,
            uploads: 0,
        })
    }

    /// Bytes one token takes in the KV cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.caches.len() * 2 * self.w.kv_heads * self.w.head_dim * 4
    }

    /// The cache handed to the host as per-layer `[1, kv_heads, len,
    /// head_dim]` key and value tensors (the CPU path's layout), leaving
    /// the model empty: how a sequence's state leaves the model while
    /// others run. Only the positions past the host copy it already has
    /// are read back; the device keeps the buffers until the state returns
    /// (see the type's docs).
    pub fn take_state(&mut self) -> Result<KvState, String> {
        let len = std::mem::take(&mut self.len);
        let mirror = std::mem::take(&mut self.mirror);
        if len == 0 {
            return Ok(Vec::new());
        }
        let from = mirror_len(&mirror).filter(|&m| m <= len && mirror.len() == self.caches.len());
        let (from, mirror) = match from {
            Some(m) => (m, mirror),
            None => (0, Vec::new()),
        };
        let out = if from == len {
            mirror
        } else {
            let data = self
                .read_rows(&[(&self.caches, from, len - from)])?
                .pop()
                .unwrap_or_default();
            self.appended(&mirror, &data, len - from)?
        };
        self.park(&out, len);
        Ok(out)
    }

    /// `mirror` (empty: nothing) followed by `rows` positions read back
    /// by [`Self::read_rows`] as `data`: the host state of the cache.
    fn appended(&self, mirror: &KvState, data: &[f32], rows: usize) -> Result<KvState, String> {
        let (kvh, hd) = (self.w.kv_heads, self.w.head_dim);
        let per = rows * kvh * hd;
        let tensor = |i: usize| {
            let part = data.get(i * per..(i + 1) * per).ok_or("a short read-back")?.to_vec();
            candle_core::Tensor::from_vec(part, (rows, kvh, hd), &Device::Cpu)
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| e.to_string())
        };
        let mut out = Vec::with_capacity(self.caches.len());
        for l in 0..self.caches.len() {
            let (k, v) = (tensor(2 * l)?, tensor(2 * l + 1)?);
            let layer = match mirror.get(l).and_then(Option::as_ref) {
                Some(m) => m.extended(&k, &v),
                None => LayerKv::new(k, v),
            };
            out.push(Some(layer.map_err(|e| e.to_string())?));
        }
        Ok(out)
    }

    /// Whether the parked caches fill [`PARKED_BYTES`].
    fn parked_full(&self) -> bool {
        self.parked.iter().map(|p| cache_bytes(&p.caches)).sum::<u64>() >= PARKED_BYTES
    }

    /// Free caches for one more sequence: the spare ones, else the oldest
    /// parked sequence's once [`PARKED_BYTES`] are taken, else new ones
    /// (made small: see [`Self::grow`]).
    fn free_caches(&mut self) -> Caches {
        if let Some(c) = self.spare.take() {
            return c;
        }
        if self.parked_full() {
            if let Some(oldest) = self.evict_oldest() {
                return oldest;
            }
        }
        new_caches(
            &self.gpu,
            self.caches.len(),
            FIRST_POSITIONS.min(self.w.positions) * self.w.kv_heads * self.w.head_dim,
        )
    }

    /// Makes `caches` hold at least `need` positions, keeping their first
    /// `keep`: larger buffers (twice the old, at least `need`, at most the
    /// positions loaded for) with those rows copied on the device. The
    /// copy is queued before any later pass, so nothing waits for it.
    fn grow(&self, caches: &mut Caches, keep: usize, need: usize) {
        let kvw = self.w.kv_heads * self.w.head_dim;
        let capacity = caches.first().map_or(0, |(k, _)| k.size() as usize / (kvw * 4));
        if capacity >= need {
            return;
        }
        let floats = need.max(capacity * 2).min(self.w.positions).max(need) * kvw;
        let g = self.gpu.as_ref();
        let mut enc = g.device.create_command_encoder(&Default::default());
        let bytes = (keep.min(capacity) * kvw * 4) as u64;
        for (k, v) in caches.iter_mut() {
            let (k2, v2) = (g.scratch("k_cache", floats), g.scratch("v_cache", floats));
            if bytes > 0 {
                enc.copy_buffer_to_buffer(k, 0, &k2, 0, bytes);
                enc.copy_buffer_to_buffer(v, 0, &v2, 0, bytes);
            }
            *k = k2;
            *v = v2;
        }
        g.queue.submit([enc.finish()]);
    }

    /// Device memory the KV caches take: the current sequence's, the
    /// parked ones' and the spare set.
    pub fn cache_bytes(&self) -> u64 {
        cache_bytes(&self.caches)
            + self.parked.iter().map(|p| cache_bytes(&p.caches)).sum::<u64>()
            + self.spare.as_ref().map_or(0, cache_bytes)
    }

    /// One decode step of several sequences in one forward pass: token
    /// `ids[i]` continues `states[i]` (see [`Self::forward_chunks`]).
    /// Returns the logits, a row per sequence.
    pub fn forward_batch(&mut self, ids: &[u32], states: &mut [KvState]) -> Result<Vec<f32>, String> {
        let chunks: Vec<&[u32]> = ids.chunks(1).collect();
        self.forward_chunks(&chunks, states)
    }

    /// Several sequences' next tokens in one forward pass: `chunks[i]` (a
    /// prompt chunk, or one token of a decode step) continues `states[i]`
    /// (as handed out by [`Self::take_state`]; empty for a prompt that has
    /// not started), which becomes the state that many tokens longer. Each
    /// sequence's caches are those the device keeps for it, or its state
    /// uploaded; products and norms run once for all rows, attention per
    /// sequence. Returns the logits of each chunk's last row, a row per
    /// sequence. The model's own current sequence is left as it was.
    pub fn forward_chunks(&mut self, chunks: &[&[u32]], states: &mut [KvState]) -> Result<Vec<f32>, String> {
        if chunks.len() != states.len() || chunks.is_empty() || chunks.iter().any(|c| c.is_empty()) {
            return Err(format!(
                "{} chunks (none may be empty) for {} sequences",
                chunks.len(),
                states.len()
            ));
        }
        // Each sequence's caches on the device, and its length.
        let mut held: Vec<(Caches, usize)> = Vec::with_capacity(states.len());
        for state in states.iter() {
            let id = state_id(state);
            let slot = match self.parked.iter().position(|p| p.id == id) {
                Some(i) => {
                    let p = self.parked.swap_remove(i);
                    Ok((p.caches, p.len))
                }
                None if state.iter().all(Option::is_none) => Ok((self.free_caches(), 0)),
                None => {
                    let mut caches = self.free_caches();
                    self.uploads += 1;
                    self.upload(&mut caches, state).map(|len| (caches, len))
                }
            };
            match slot {
                Ok(slot) => held.push(slot),
                Err(e) => {
                    self.park_all(held, states);
                    return Err(e);
                }
            }
        }
        let fit = held
            .iter()
            .zip(chunks)
            .try_for_each(|((_, len), chunk)| self.fits(len + chunk.len()));
        if fit.is_ok() {
            for ((caches, len), chunk) in held.iter_mut().zip(chunks) {
                self.grow(caches, *len, *len + chunk.len());
            }
        }
        let ran = fit
            .and_then(|()| {
                let parts: Vec<Part<'_>> = held
                    .iter()
                    .zip(chunks)
                    .map(|((caches, len), chunk)| Part {
                        caches,
                        pos: *len,
                        rows: chunk.len(),
                    })
                    .collect();
                self.run(&chunks.concat(), &parts, Logits::Last)
            })
            .and_then(|logits| {
                let reads: Vec<(&Caches, usize, usize)> = held
                    .iter()
                    .zip(chunks)
                    .map(|((caches, len), chunk)| (caches, *len, chunk.len()))
                    .collect();
                let data = self.read_rows(&reads)?;
                let mut next = Vec::with_capacity(states.len());
                for ((state, chunk), data) in states.iter().zip(chunks).zip(data) {
                    next.push(self.appended(state, &data, chunk.len())?);
                }
                Ok((logits, next))
            });
        match ran {
            Ok((logits, next)) => {
                for (state, n) in states.iter_mut().zip(next) {
                    *state = n;
                }
                let held = held
                    .into_iter()
                    .zip(chunks)
                    .map(|((c, len), chunk)| (c, len + chunk.len()))
                    .collect();
                self.park_all(held, states);
                Ok(logits)
            }
            Err(e) => {
                // The states are unchanged: their caches go back as they were.
                self.park_all(held, states);
                Err(e)
            }
        }
    }

    /// Parks each sequence's caches under its state (see [`Parked`]).
    fn park_all(&mut self, held: Vec<(Caches, usize)>, states: &[KvState]) {
        for ((caches, len), state) in held.into_iter().zip(states) {
            // A prompt that failed before its first pass has nothing to keep.
            if state.iter().all(Option::is_none) {
                self.spare.get_or_insert(caches);
                continue;
            }
            self.clock += 1;
            self.parked.push(Parked {
                caches,
                id: state_id(state),
                len,
                used: self.clock,
            });
        }
        while self.parked.len() > 1 && self.parked_full() {
            self.evict_oldest();
        }
    }

    /// Removes the sequence parked longest ago, handing back its caches.
    fn evict_oldest(&mut self) -> Option<Caches> {
        let oldest = (0..self.parked.len()).min_by_key(|&i| self.parked[i].used)?;
        Some(self.parked.swap_remove(oldest).caches)
    }

    /// For each `(caches, from, rows)` of `reads`, rows `from..from + rows`
    /// of every layer's keys and values: keys then values, layer by layer.
    /// Every read shares one staging buffer and one wait for the device,
    /// as far as the binding limit allows, so a batched step of sixteen
    /// sequences waits once rather than sixteen times.
    fn read_rows(&self, reads: &[(&Caches, usize, usize)]) -> Result<Vec<Vec<f32>>, String> {
        let g = self.gpu.as_ref();
        let kvw = (self.w.kv_heads * self.w.head_dim * 4) as u64;
        // Each buffer's rows to copy: (which read, buffer, offset, bytes).
        let pieces: Vec<(usize, &wgpu::Buffer, u64, u64)> = reads
            .iter()
            .enumerate()
            .flat_map(|(i, &(caches, from, rows))| {
                caches
                    .iter()
                    .flat_map(|(k, v)| [k, v])
                    .map(move |b| (i, b, from as u64 * kvw, rows as u64 * kvw))
            })
            .collect();
        let mut out: Vec<Vec<f32>> = reads
            .iter()
            .map(|(caches, _, rows)| Vec::with_capacity(caches.len() * 2 * rows * kvw as usize / 4))
            .collect();
        let mut start = 0;
        while start < pieces.len() {
            // As many pieces as one staging buffer may hold (at least one).
            let mut end = start;
            let mut bytes = 0;
            while end < pieces.len() && (end == start || bytes + pieces[end].3 <= g.max_binding) {
                bytes += pieces[end].3;
                end += 1;
            }
            let staging = g.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kv read-back"),
                size: bytes.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = g.device.create_command_encoder(&Default::default());
            let mut at = 0;
            for &(_, buf, from, len) in &pieces[start..end] {
                enc.copy_buffer_to_buffer(buf, from, &staging, at, len);
                at += len;
            }
            g.queue.submit([enc.finish()]);
            let data = super::read_mapped(&g.device, &staging, bytes)?;
            let mut at = 0;
            for &(i, _, _, len) in &pieces[start..end] {
                let n = len as usize / 4;
                out[i].extend_from_slice(data.get(at..at + n).ok_or("a short read-back")?);
                at += n;
            }
            start = end;
        }
        Ok(out)
    }

    /// Leaves the current buffers on the device for the sequence `state`
    /// (of `len` tokens) and takes free ones, evicting the longest unused
    /// sequence's past [`PARKED_BYTES`].
    fn park(&mut self, state: &KvState, len: usize) {
        let free = self.free_caches();
        let caches = std::mem::replace(&mut self.caches, free);
        self.park_all(vec![(caches, len)], std::slice::from_ref(state));
    }

    /// Puts a state from [`Self::take_state`] (or the CPU path's) back on
    /// the device; an empty state leaves the cache empty. A state the
    /// device still holds takes its buffers back; any other is uploaded.
    pub fn put_state(&mut self, state: KvState) -> Result<(), String> {
        self.len = 0;
        self.mirror = Vec::new();
        if state.iter().all(Option::is_none) {
            return Ok(());
        }
        let id = state_id(&state);
        if let Some(i) = self.parked.iter().position(|p| p.id == id) {
            let p = self.parked.swap_remove(i);
            self.spare = Some(std::mem::replace(&mut self.caches, p.caches));
            self.len = p.len;
            self.mirror = state;
            return Ok(());
        }
        let mut caches = std::mem::take(&mut self.caches);
        let uploaded = self.upload(&mut caches, &state);
        self.caches = caches;
        self.len = uploaded?;
        self.uploads += 1;
        if mirror_len(&state) == Some(self.len) {
            self.mirror = state;
        }
        Ok(())
    }

    /// Writes `state` into `caches`, grown to hold it (the callers count it
    /// in [`Self::state_uploads`]); returns its length.
    fn upload(&self, caches: &mut Caches, state: &KvState) -> Result<usize, String> {
        let mut layers = Vec::with_capacity(state.len());
        for (i, layer) in state.iter().enumerate() {
            let Some(kv) = layer else { continue };
            let (k, v) = (
                kv.keys().map_err(|e| e.to_string())?,
                kv.values().map_err(|e| e.to_string())?,
            );
            let rows = k.dim(2).map_err(|e| e.to_string())?;
            if rows > self.w.positions {
                return Err(format!(
                    "a state of {rows} tokens is longer than the {} positions",
                    self.w.positions
                ));
            }
            layers.push((i, k, v, rows));
        }
        let longest = layers.iter().map(|l| l.3).max().unwrap_or(0);
        self.grow(caches, 0, longest);
        let mut len = None;
        for (i, k, v, rows) in layers {
            let (kc, vc) = caches.get(i).ok_or("a state has more layers than the model")?;
            for (buf, t) in [(kc, &k), (vc, &v)] {
                // [1, kv_heads, len, hd] -> [len, kv_heads * hd].
                let data: Vec<f32> = t
                    .squeeze(0)
                    .and_then(|t| t.transpose(0, 1))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| e.to_string())?;
                self.gpu.queue.write_buffer(buf, 0, bytemuck::cast_slice(&data));
            }
            len = Some(rows);
        }
        Ok(len.unwrap_or(0))
    }

    /// States [`Self::put_state`] had to upload whole (not held on the
    /// device): how a test sees that sequences taking turns stay on it.
    pub fn state_uploads(&self) -> u64 {
        self.uploads
    }

    /// Tokens in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the KV cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Continues from position `pos`: forgets cached tokens past it; a
    /// position past the cache is an error (a gap would read garbage).
    pub fn rewind(&mut self, pos: usize) -> Result<(), String> {
        if pos > self.len {
            return Err(format!("position {pos} is past the {} cached tokens", self.len));
        }
        self.len = pos;
        self.cut_mirror();
        Ok(())
    }

    /// Forgets all but the first `len` cached tokens (a new sequence: 0).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.cut_mirror();
    }

    /// Keeps the host copy within the cache's positions: those past it are
    /// about to be written again.
    fn cut_mirror(&mut self) {
        if self.len == 0 {
            self.mirror = Vec::new();
        } else if mirror_len(&self.mirror).is_some_and(|m| m > self.len) {
            let len = self.len;
            self.mirror = self
                .mirror
                .iter()
                .map(|l| l.as_ref().and_then(|l| l.truncated(len).ok()))
                .collect();
            if self.mirror.iter().any(Option::is_none) {
                self.mirror = Vec::new();
            }
        }
    }

    /// Vocabulary size (the width of a row of logits).
    pub fn vocab(&self) -> usize {
        self.w.vocab
    }

    /// Runs `ids` after the cached tokens, caches them, and returns logits
    /// (`Last`: one row; `All`: a row per id, row-major).
    pub fn forward(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>, String> {
        let rows = ids.len();
        if rows == 0 {
            return Err("no tokens to run".into());
        }
        let pos = self.len;
        self.fits(pos + rows)?;
        let mut caches = std::mem::take(&mut self.caches);
        self.grow(&mut caches, pos, pos + rows);
        self.caches = caches;
        let part = Part {
            caches: &self.caches,
            pos,
            rows,
        };
        let out = self.run(ids, &[part], which)?;
        self.len = pos + rows;
        Ok(out)
    }

    /// Refuses a cache of `len` tokens past the positions loaded for.
    fn fits(&self, len: usize) -> Result<(), String> {
        if len > self.w.positions {
            return Err(format!(
                "{len} tokens is more than the {} positions this member was loaded for",
                self.w.positions
            ));
        }
        Ok(())
    }

    /// One forward pass over `ids`, the rows of `parts` one after another,
    /// each part a sequence continuing its own caches from its position;
    /// the products and norms run once over every row, rotary embeddings,
    /// cache writes and attention once per part. Returns the logits of
    /// every row (`All`) or of each part's last row (`Last`).
    fn run(&self, ids: &[u32], parts: &[Part<'_>], which: Logits) -> Result<Vec<f32>, String> {
        let rows = ids.len();
        let (h, hd, heads, kvh) = (self.w.hidden, self.w.head_dim, self.w.heads, self.w.kv_heads);
        let (qw, kvw) = (heads * hd, kvh * hd);
        let mut x0 = Vec::with_capacity(rows * h);
        for &id in ids {
            let row = self
                .w
                .embed
                .get(id as usize * h..(id as usize + 1) * h)
                .ok_or_else(|| format!("token id {id} is outside the vocabulary of {}", self.w.vocab))?;
            x0.extend(row.iter().map(|v| v * self.w.embed_scale));
        }
        let gpu = self.gpu.clone();
        let g = gpu.as_ref();
        let scope = g.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = g.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let x = g.upload("x", &x0)?;
        let xn = g.scratch("xn", rows * h);
        let q = g.scratch("q", rows * qw);
        let k = g.scratch("k", rows * kvw);
        let v = g.scratch("v", rows * kvw);
        let att = g.scratch("att", rows * qw);
        let proj = g.scratch("proj", rows * h);
        let up = g.scratch("up", rows * self.w.ffn);
        let gated = g.scratch("gated", rows * self.w.ffn);
        let gate = g.scratch("gate", rows * self.w.ffn);
        let mut enc = g.device.create_command_encoder(&Default::default());
        let (qn, kn) = (g.scratch("qn", rows * qw), g.scratch("kn", rows * kvw));
        let normed_proj = g.scratch("normed_proj", rows * h);
        let norm_params = |n: usize, rows: usize| Params {
            n: n as u32,
            k: n as u32,
            rows: rows as u32,
            eps: self.w.eps,
            ..Params::default()
        };
        let norm_groups = |rows: usize| ((rows.min(65_535)) as u32, rows.div_ceil(65_535) as u32);
        // Where each part's rows begin in the pass's buffers.
        let starts: Vec<usize> = parts
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += p.rows;
                Some(start)
            })
            .collect();
        if parts.iter().map(|p| p.rows).sum::<usize>() != rows {
            return Err("a batch's parts do not add up to its rows".into());
        }
        // Where a part's rows lie in the pass and in its sequence, for the
        // kernels that run once per part (rotary embeddings, attention).
        let part_params = |part: &Part<'_>, row0: usize, nheads: usize| Params {
            rows: part.rows as u32,
            pos: part.pos as u32,
            row0: row0 as u32,
            heads: nheads as u32,
            hd: hd as u32,
            ..Params::default()
        };
        let rope = |enc: &mut wgpu::CommandEncoder, buf: &wgpu::Buffer, nheads: usize, table: usize| {
            let t = &self.w.ropes[table.min(self.w.ropes.len() - 1)];
            for (part, &row0) in parts.iter().zip(&starts) {
                let params = Params {
                    flags: self.w.interleaved as u32,
                    ..part_params(part, row0, nheads)
                };
                g.dispatch(
                    enc,
                    "rope",
                    params,
                    [Some(&t.cos), Some(&t.sin), None],
                    buf,
                    ((hd / 2).div_ceil(64) as u32, (part.rows * nheads) as u32),
                );
            }
        };
        let elementwise = |enc: &mut wgpu::CommandEncoder,
                           kernel: &str,
                           n: usize,
                           a: &wgpu::Buffer,
                           b: Option<&wgpu::Buffer>,
                           out: &wgpu::Buffer| {
            let params = Params {
                n: n as u32,
                rows: rows as u32,
                ..Params::default()
            };
            g.dispatch(
                enc,
                kernel,
                params,
                [Some(a), b, None],
                out,
                Kernels::flat_groups(n * rows),
            );
        };
        for (li, l) in self.w.layers.iter().enumerate() {
            g.dispatch(
                &mut enc,
                "rmsnorm",
                norm_params(h, rows),
                [Some(&x), Some(&l.attn_norm), None],
                &xn,
                norm_groups(rows),
            );
            l.q.record(g, &mut enc, &xn, rows, &q);
            l.k.record(g, &mut enc, &xn, rows, &k);
            l.v.record(g, &mut enc, &xn, rows, &v);
            if let Some((bq, bk, bv)) = &l.bias {
                elementwise(&mut enc, "add_bias", qw, bq, None, &q);
                elementwise(&mut enc, "add_bias", kvw, bk, None, &k);
                elementwise(&mut enc, "add_bias", kvw, bv, None, &v);
            }
            // Gemma 3 normalises each head's query and key first.
            let (q, k) = match (&l.q_norm, &l.k_norm) {
                (Some(nq), Some(nk)) => {
                    let (qr, kr) = (rows * heads, rows * kvh);
                    g.dispatch(
                        &mut enc,
                        "rmsnorm",
                        norm_params(hd, qr),
                        [Some(&q), Some(nq), None],
                        &qn,
                        norm_groups(qr),
                    );
                    g.dispatch(
                        &mut enc,
                        "rmsnorm",
                        norm_params(hd, kr),
                        [Some(&k), Some(nk), None],
                        &kn,
                        norm_groups(kr),
                    );
                    (&qn, &kn)
                }
                _ => (&q, &k),
            };
            rope(&mut enc, q, heads, l.rope);
            rope(&mut enc, k, kvh, l.rope);
            for (part, &row0) in parts.iter().zip(&starts) {
                let (k_cache, v_cache) = part.caches.get(li).ok_or("a sequence's caches lack a layer")?;
                let at = (part.pos * kvw * 4) as u64;
                let from = (row0 * kvw * 4) as u64;
                let bytes = (part.rows * kvw * 4) as u64;
                enc.copy_buffer_to_buffer(k, from, k_cache, at, bytes);
                enc.copy_buffer_to_buffer(&v, from, v_cache, at, bytes);
                let params = Params {
                    kv_heads: kvh as u32,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window: l.window,
                    ..part_params(part, row0, heads)
                };
                g.dispatch(
                    &mut enc,
                    "attention",
                    params,
                    [Some(q), Some(k_cache), Some(v_cache)],
                    &att,
                    (heads as u32, part.rows as u32),
                );
            }
            l.o.record(g, &mut enc, &att, rows, &proj);
            let post = |enc: &mut wgpu::CommandEncoder, norm: &Option<wgpu::Buffer>| match norm {
                Some(n) => {
                    g.dispatch(
                        enc,
                        "rmsnorm",
                        norm_params(h, rows),
                        [Some(&proj), Some(n), None],
                        &normed_proj,
                        norm_groups(rows),
                    );
                    &normed_proj
                }
                None => &proj,
            };
            let added = post(&mut enc, &l.post_attn_norm);
            elementwise(&mut enc, "add", h, added, None, &x);
            g.dispatch(
                &mut enc,
                "rmsnorm",
                norm_params(h, rows),
                [Some(&x), Some(&l.ffn_norm), None],
                &xn,
                norm_groups(rows),
            );
            l.gate.record(g, &mut enc, &xn, rows, &gate);
            l.up.record(g, &mut enc, &xn, rows, &up);
            let gate_params = Params {
                n: self.w.ffn as u32,
                rows: rows as u32,
                flags: self.w.gelu as u32,
                ..Params::default()
            };
            g.dispatch(
                &mut enc,
                "gate",
                gate_params,
                [Some(&gate), Some(&up), None],
                &gated,
                Kernels::flat_groups(self.w.ffn * rows),
            );
            l.down.record(g, &mut enc, &gated, rows, &proj);
            let added = post(&mut enc, &l.post_ffn_norm);
            elementwise(&mut enc, "add", h, added, None, &x);
        }
        // The final norm and the output projection, for the rows asked.
        let (out_rows, src) = match which {
            Logits::All => (rows, x),
            Logits::Last => {
                let last = g.scratch("last", parts.len() * h);
                for (i, (part, &row0)) in parts.iter().zip(&starts).enumerate() {
                    let row = row0 + part.rows - 1;
                    enc.copy_buffer_to_buffer(&x, (row * h * 4) as u64, &last, (i * h * 4) as u64, (h * 4) as u64);
                }
                (parts.len(), last)
            }
        };
        let normed = g.scratch("normed", out_rows * h);
        g.dispatch(
            &mut enc,
            "rmsnorm",
            norm_params(h, out_rows),
            [Some(&src), Some(&self.w.norm), None],
            &normed,
            norm_groups(out_rows),
        );
        let logits = g.scratch("logits", out_rows * self.w.vocab);
        self.w.output.record(g, &mut enc, &normed, out_rows, &logits);
        if let Some(e) = pollster::block_on(memory.pop()) {
            return Err(super::gpu_err("device memory", e));
        }
        let out = g.finish_and_read(enc, &logits, out_rows * self.w.vocab)?;
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(super::gpu_err("kernels", e));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn halves_convert_like_the_standard_says() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}

//! A trainable llama-family model (`llama`, `qwen2`) in Hugging Face layout.
//!
//! The inference model files (`backends/gguf/llama.rs`) are built for speed:
//! quantized weights, a KV cache, fused kernels without gradients. Training
//! needs the opposite: f32 weights, every operation differentiable by
//! candle's autograd, no cache. So this is a second, plain implementation of
//! the same architecture (pre-norm decoder, RMSNorm, rotary positions in the
//! rotate-half layout Hugging Face checkpoints use, grouped-query attention,
//! SwiGLU MLP, optional q/k/v biases for qwen2, tied or separate output
//! head), following the published Llama and Qwen2 architectures. The
//! `hf_dirs` and contributor tests check that a trained folder loads in the
//! inference path and answers as trained, which ties the two together.
//!
//! **LoRA** (Hu et al., 2021): a frozen weight `W` (out x in) gets a trainable
//! low-rank update `W + (alpha / r) B A` with `A` (r x in) drawn uniform in
//! `±1/sqrt(in)` and `B` (out x r) zero, so training starts from the base
//! model exactly. **Full** fine-tuning makes every weight trainable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::backends::gguf::attention::contiguous_f32;
use crate::model_folder::TrainMethod;

/// Which projections LoRA may adapt, by their Hugging Face names.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The architecture facts from `config.json`.
#[derive(Debug, Clone)]
pub struct Shape {
    /// `llama` or `qwen2`.
    pub arch: String,
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Decoder layers.
    pub layers: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
}

impl Shape {
    /// Reads `config.json`.
    pub fn from_config(config: &Value, shown: &str) -> Result<Self, String> {
        let arch = config["model_type"].as_str().unwrap_or("").to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(format!(
                "{shown}: model_type `{arch}` cannot be trained (supported: llama, qwen2)"
            ));
        }
        let num = |k: &str| {
            config[k]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| format!("{shown}: `{k}` is missing"))
        };
        let heads = num("num_attention_heads")?;
        Ok(Self {
            arch,
            hidden: num("hidden_size")?,
            heads,
            kv_heads: config["num_key_value_heads"]
                .as_u64()
                .map(|v| v as usize)
                .unwrap_or(heads),
            layers: num("num_hidden_layers")?,
            eps: config["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: config["rope_theta"].as_f64().unwrap_or(10_000.0),
        })
    }
}

/// A model whose trainable parameters are candle [`Var`]s.
pub struct TrainModel {
    /// Architecture.
    pub shape: Shape,
    /// Frozen tensors by Hugging Face name (all weights, for LoRA; none
    /// that are trained, for full fine-tuning).
    frozen: HashMap<String, Tensor>,
    /// Trained parameters by name: weight names for full fine-tuning,
    /// `{weight}.lora_A` / `.lora_B` for LoRA. Sorted, so checkpoints and
    /// the optimizer see them in one order.
    trainable: BTreeMap<String, Var>,
    /// `alpha / rank` for LoRA.
    lora_scale: f64,
    /// The first layer LoRA adapts; the layers below it are frozen whole,
    /// so their output (the trunk) can come from elsewhere.
    first: usize,
    /// bf16 tile copies of frozen weights, made on first use (so the layers
    /// a trunk computes elsewhere never get one); `None` for a weight whose
    /// shape the tiles do not take, or on a CPU without AMX.
    tiles: std::sync::Mutex<HashMap<String, Option<Arc<FrozenTiles>>>>,
    device: Device,
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

impl TrainModel {
    /// Loads the directory's weights as f32 and sets up `method`'s
    /// trainable parameters; `seed` draws the LoRA `A` matrices. With
    /// `top` > 0 (LoRA only), adapters go on the last `top` layers alone:
    /// no gradient then flows below them, and their input may be computed
    /// by a faster frozen trunk ([`super::trunk`]).
    pub fn load(dir: &Path, method: &TrainMethod, top: usize, seed: u64, device: &Device) -> Result<Self, String> {
        let shown = dir.display().to_string();
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| format!("{shown}/config.json: {e}"))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| format!("{shown}/config.json: {e}"))?;
        let shape = Shape::from_config(&config, &shown)?;
        let device = device.clone();
        let mut frozen: HashMap<String, Tensor> = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{shown}: {e}"))?.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                let part = candle_core::safetensors::load(&p, &device)
                    .map_err(|e| format!("{}: not a readable safetensors file: {e}", p.display()))?;
                for (k, t) in part {
                    frozen.insert(k, t.to_dtype(DType::F32).map_err(err)?);
                }
            }
        }
        if !frozen.contains_key("model.embed_tokens.weight") {
            return Err(format!(
                "{shown}: no `model.embed_tokens.weight` (is this a model directory?)"
            ));
        }
        let mut trainable = BTreeMap::new();
        let mut lora_scale = 0.0;
        if top > shape.layers {
            return Err(format!(
                "--top-layers {top} is more than the model's {} layers",
                shape.layers
            ));
        }
        let first = if top == 0 { 0 } else { shape.layers - top };
        match method {
            TrainMethod::Full if top > 0 => {
                return Err("--top-layers adapts the top layers with LoRA: drop --full".into());
            }
            TrainMethod::Full => {
                let names: Vec<String> = frozen.keys().cloned().collect();
                for n in names {
                    if let Some(t) = frozen.remove(&n) {
                        trainable.insert(n, Var::from_tensor(&t).map_err(err)?);
                    }
                }
            }
            TrainMethod::Lora { rank, alpha, targets } => {
                if *rank == 0 {
                    return Err("LoRA rank must be at least 1".into());
                }
                lora_scale = alpha / *rank as f64;
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                for layer in first..shape.layers {
                    for t in targets {
                        let group =
                            if t.ends_with("_proj") && matches!(t.as_str(), "gate_proj" | "up_proj" | "down_proj") {
                                "mlp"
                            } else {
                                "self_attn"
                            };
                        let name = format!("model.layers.{layer}.{group}.{t}.weight");
                        let w = frozen
                            .get(&name)
                            .ok_or_else(|| format!("{shown}: tensor `{name}` is missing"))?;
                        let (out, inp) = w.dims2().map_err(err)?;
                        let bound = 1.0 / (inp as f32).sqrt();
                        let a: Vec<f32> = (0..rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
                        let a = Tensor::from_vec(a, (*rank, inp), &device).map_err(err)?;
                        let b = Tensor::zeros((out, *rank), DType::F32, &device).map_err(err)?;
                        trainable.insert(format!("{name}.lora_A"), Var::from_tensor(&a).map_err(err)?);
                        trainable.insert(format!("{name}.lora_B"), Var::from_tensor(&b).map_err(err)?);
                    }
                }
            }
        }
        Ok(Self {
            shape,
            frozen,
            trainable,
            lora_scale,
            first,
            tiles: std::sync::Mutex::new(HashMap::new()),
            device,
        })
    }

    /// The first layer that is trained (0 unless only the top layers are).
    pub fn first_trained_layer(&self) -> usize {
        self.first
    }

    /// The trained parameters, sorted by name.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// How many numbers are trained.
    pub fn trainable_count(&self) -> usize {
        self.trainable.values().map(|v| v.elem_count()).sum()
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn get(&self, name: &str) -> candle_core::Result<Tensor> {
        if let Some(v) = self.trainable.get(name) {
            return Ok(v.as_tensor().clone());
        }
        self.frozen
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is missing")))
    }

    /// `x` (n x in) through the projection `prefix` (`.weight`, optional
    /// `.bias`, optional LoRA).
    fn linear(&self, prefix: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let wname = format!("{prefix}.weight");
        let mut y = self.project(&wname, x)?;
        if let (Some(a), Some(b)) = (
            self.trainable.get(&format!("{wname}.lora_A")),
            self.trainable.get(&format!("{wname}.lora_B")),
        ) {
            let low = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
            y = (y + (low * self.lora_scale)?)?;
        }
        if let Ok(bias) = self.get(&format!("{prefix}.bias")) {
            y = y.broadcast_add(&bias)?;
        }
        Ok(y)
    }

    /// `x W^T` for the weight `name`: through [`FrozenLinear`] when the
    /// weight is frozen and on the CPU (on bf16 tiles where the CPU has
    /// them), a plain matmul otherwise.
    fn project(&self, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.get(name)?;
        if !self.device.is_cpu() || x.dtype() != DType::F32 {
            x.matmul(&w.t()?)
        } else if self.trainable.contains_key(name) {
            // A trained weight changes every step: its tiles are made per
            // product (a pass over the weight, against `m` passes of work).
            let (n, k) = w.dims2()?;
            if tessera_kernels::amx::bf16_available() && TrainedLinear::fits(n, k) {
                x.apply_op2(&w, TrainedLinear)
            } else {
                x.matmul(&w.t()?)
            }
        } else {
            let tiles = self.tiles_of(name, &w)?;
            x.apply_op1(FrozenLinear { w, tiles })
        }
    }

    /// The tile copies of the frozen weight `name` (`w`), made once.
    fn tiles_of(&self, name: &str, w: &Tensor) -> candle_core::Result<Option<Arc<FrozenTiles>>> {
        if !tessera_kernels::amx::bf16_available() {
            return Ok(None);
        }
        let mut made = self
            .tiles
            .lock()
            .map_err(|_| candle_core::Error::Msg("the tile cache was poisoned by a panic".into()))?;
        if let Some(t) = made.get(name) {
            return Ok(t.clone());
        }
        let t = FrozenTiles::new(w)?.map(Arc::new);
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn rms_norm(&self, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.get(name)?;
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + self.shape.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&w)
    }

    /// Rotates `x` (b x heads x t x d) by position (rotate-half layout).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }

    /// Sum of the negative log-likelihoods of the `targets` at the
    /// positions where `mask` is 1, for a batch of `ids` (b x t, next-token
    /// targets b x t, mask b x t of 0/1 as f32). `trunk`, when given, is
    /// the residual stream entering the first trained layer (b*t x hidden),
    /// computed elsewhere; without it the frozen layers run here.
    pub fn nll_sum(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mask: &[f32],
        trunk: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.target_logprobs(ids, targets, mask, trunk)?.sum_all()?.neg()
    }

    /// The log-likelihood of each row's masked targets, summed per row
    /// (a tensor of `b` values): what preference and policy-gradient
    /// objectives compare between sequences.
    pub fn row_logprobs(&self, ids: &Tensor, targets: &Tensor, mask: &[f32]) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let chosen = self.target_logprobs(ids, targets, mask, None)?; // (n, 1)

        // A (b x n) 0/1 matrix that sums the picked positions of each row:
        // a matmul keeps the sum differentiable.
        let rows: Vec<usize> = mask
            .iter()
            .enumerate()
            .filter(|(_, m)| **m > 0.0)
            .map(|(i, _)| i / t.max(1))
            .collect();
        let n = rows.len();
        let mut assign = vec![0f32; b * n];
        for (j, r) in rows.iter().enumerate() {
            assign[r * n + j] = 1.0;
        }
        let assign = Tensor::from_vec(assign, (b, n), &self.device)?;
        assign.matmul(&chosen)?.squeeze(1)
    }

    /// The log-probabilities (n x 1) of the targets where `mask` is 1, in
    /// row-major order of the positions.
    fn target_logprobs(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mask: &[f32],
        trunk: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let s = &self.shape;
        let hd = s.hidden / s.heads;
        // Layers below the first trained one hold no variable, so candle
        // records no graph for them: they cost a forward pass only, and
        // nothing at all when the trunk is given.
        let (mut x, start) = match trunk {
            Some(h) => (h.clone(), self.first),
            None => {
                let embed = self.get("model.embed_tokens.weight")?;
                (embed.embedding(&ids.flatten_all()?)?, 0) // (b*t, hidden)
            }
        };

        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / s.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        let pos: Vec<f32> = (0..t).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (t, 1), &self.device)?;
        let inv = Tensor::from_vec(inv, (1, hd / 2), &self.device)?;
        let freqs = pos.matmul(&inv)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        // An additive mask only where candle's softmax needs one: on the
        // CPU, [`CausalSoftmax`] takes the mask as arithmetic.
        let causal = if self.device.is_cpu() {
            None
        } else {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(mask, (t, t), &self.device)?)
        };
        let rep = s.heads / s.kv_heads;

        for l in start..s.layers {
            let p = format!("model.layers.{l}");
            let h = self.rms_norm(&format!("{p}.input_layernorm.weight"), &x)?;
            let heads = |name: &str, n: usize| -> candle_core::Result<Tensor> {
                self.linear(&format!("{p}.self_attn.{name}"), &h)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads("q_proj", s.heads)?, &cos, &sin)?;
            let k = self.rope(&heads("k_proj", s.kv_heads)?, &cos, &sin)?;
            let v = heads("v_proj", s.kv_heads)?;
            let (k, v) = if rep > 1 {
                let k = Tensor::cat(&vec![&k; rep], 2)?.reshape((b, s.heads, t, hd))?;
                let v = Tensor::cat(&vec![&v; rep], 2)?.reshape((b, s.heads, t, hd))?;
                (k, v)
            } else {
                (k, v)
            };
            let probs = match &causal {
                // Scaled queries, then one softmax over the keys each query
                // may see: no mask tensor, and one pass back.
                None => {
                    let q = (q * (1.0 / (hd as f64).sqrt()))?;
                    q.matmul(&k.t()?.contiguous()?)?.apply_op1(CausalSoftmax)?
                }
                Some(mask) => {
                    let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
                    candle_nn::ops::softmax(&scores, D::Minus1)?
                }
            };
            let att = probs.matmul(&v)?;
            let att = att.transpose(1, 2)?.contiguous()?.reshape((b * t, s.hidden))?;
            x = (x + self.linear(&format!("{p}.self_attn.o_proj"), &att)?)?;
            let h = self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &x)?;
            let gate = self.linear(&format!("{p}.mlp.gate_proj"), &h)?.silu()?;
            let up = self.linear(&format!("{p}.mlp.up_proj"), &h)?;
            x = (x + self.linear(&format!("{p}.mlp.down_proj"), &(gate * up)?)?)?;
        }
        // Only the trained positions need logits: select them before the
        // (vocabulary-sized) output projection.
        let picked: Vec<u32> = mask
            .iter()
            .enumerate()
            .filter(|(_, m)| **m > 0.0)
            .map(|(i, _)| i as u32)
            .collect();
        let n = picked.len();
        let picked = Tensor::from_vec(picked, n, &self.device)?;
        let x = self.rms_norm("model.norm.weight", &x)?.index_select(&picked, 0)?;
        let head = if self.get("lm_head.weight").is_ok() {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let logits = self.project(head, &x)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let want = targets.flatten_all()?.index_select(&picked, 0)?;
        logp.gather(&want.unsqueeze(1)?, 1)
    }

    /// The LoRA tensors (`{weight}.lora_A` / `.lora_B`) and `alpha / rank`:
    /// what an adapter folder stores. Empty for full fine-tuning.
    pub fn lora(&self) -> (HashMap<String, Tensor>, f64) {
        let tensors = self
            .trainable
            .iter()
            .filter(|(n, _)| n.ends_with(".lora_A") || n.ends_with(".lora_B"))
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        (tensors, self.lora_scale)
    }

    /// Every weight, with LoRA updates merged in (`W + (alpha/r) B A`), by
    /// Hugging Face name: what the trained model folder stores.
    pub fn merged_weights(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self.frozen.clone();
        for (name, v) in &self.trainable {
            if name.ends_with(".lora_A") || name.ends_with(".lora_B") {
                continue;
            }
            out.insert(name.clone(), v.as_tensor().detach());
        }
        for (name, a) in &self.trainable {
            let Some(w_name) = name.strip_suffix(".lora_A") else {
                continue;
            };
            let Some(b) = self.trainable.get(&format!("{w_name}.lora_B")) else {
                continue;
            };
            let delta = (b.as_tensor().matmul(a.as_tensor())? * self.lora_scale)?;
            let w = out
                .get(w_name)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{w_name}` is missing")))?;
            let merged = (w + delta)?.detach();
            out.insert(w_name.to_string(), merged);
        }
        Ok(out)
    }
}

/// The causal softmax of attention scores `[.., t, t]` (row `i` sees keys
/// `0..=i`) with its backward pass, for training on the CPU. Forward is the
/// inference kernel ([`tessera_kernels::math::softmax_causal`]: masked
/// keys are never exponentiated and no mask tensor is built or added);
/// backward is `dS = P * (dP - rowsum(dP * P))`, where masked keys have
/// `P = 0` and so no gradient. Composed from candle's ops (divide, add the
/// mask, max, subtract, exponentiate, sum, divide, and each one's
/// backward) the same softmax made a dozen passes over every score.
struct CausalSoftmax;

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let values = contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.dims();
        let (t, keys) = match dims {
            [.., t, keys] => (*t, *keys),
            _ => candle_core::bail!("causal-softmax takes scores [.., queries, keys], got {dims:?}"),
        };
        if t != keys {
            candle_core::bail!("causal-softmax: {t} queries against {keys} keys (a training pass has as many)");
        }
        let mut out = values.to_vec();
        let causal = tessera_kernels::math::Causal {
            queries: t,
            pos: 0,
            window: None,
        };
        tessera_kernels::math::softmax_causal(&mut out, keys, causal);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inner = (grad * probs)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&inner)? * probs)?))
    }
}

/// A frozen weight `W` (n x k) as bf16 tiles twice: as stored, for the
/// forward product `x W^T`, and transposed, for the input's gradient
/// `dY W` (the tile kernel multiplies by a packed matrix's transpose).
/// 4 bytes per weight beside the f32 copy, which the LoRA merge and the
/// saved folder still read.
struct FrozenTiles {
    forward: tessera_kernels::amx::Bf16Packed,
    backward: tessera_kernels::amx::Bf16Packed,
}

impl FrozenTiles {
    /// `None` where the shape does not fit the tiles (either way round) or
    /// the CPU has none.
    fn new(w: &Tensor) -> candle_core::Result<Option<Self>> {
        use tessera_kernels::amx::Bf16Packed;
        let (n, k) = w.dims2()?;
        let rows = w.flatten_all()?.to_vec1::<f32>()?;
        let Some(forward) = Bf16Packed::from_f32(&rows, n, k) else {
            return Ok(None);
        };
        let cols = w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Bf16Packed::from_f32(&cols, k, n).map(|backward| FrozenTiles { forward, backward }))
    }
}

/// Rows `values` of shape `dims` (`[.., k]`) times `p`'s transpose on the
/// tiles: the products and their shape `[.., n]`, or an error naming `op`
/// if the input is not rows of `p`'s width.
fn tile_rows(
    op: &str,
    p: &tessera_kernels::amx::Bf16Packed,
    values: &[f32],
    dims: &[usize],
) -> candle_core::Result<(Vec<f32>, Vec<usize>)> {
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("{op} takes a matrix");
    };
    if k != p.cols() {
        candle_core::bail!("{op}: input width {k}, the weight takes {}", p.cols());
    }
    let m: usize = lead.iter().product();
    let y = tessera_kernels::amx::matmul_bf16(p, values, m);
    let mut shape = lead.to_vec();
    shape.push(p.rows());
    Ok((y, shape))
}

/// `x (m x k) -> x P^T` on the tiles of `p`, for an f32 tensor `x`.
fn tile_product(p: &tessera_kernels::amx::Bf16Packed, x: &Tensor) -> candle_core::Result<Tensor> {
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let (y, shape) = tile_rows("tile product", p, &values, x.dims())?;
    Tensor::from_vec(y, shape, x.device())
}

/// `x W^T` for a weight nothing trains (LoRA's frozen base, the output
/// head). candle's backward pass of a plain matmul computes the gradient of
/// both operands, so with LoRA every frozen projection cost a second matmul
/// as large as its forward one for a gradient that was thrown away; this
/// op's backward returns only the input's gradient, `dY W`. CPU and `f32`
/// only (the model uses the plain matmul elsewhere).
///
/// With `tiles` (a CPU with AMX bf16), both products run on the tile
/// kernel ([`tessera_kernels::amx::matmul_bf16`]): operands rounded to
/// bf16, sums in f32, the weights kept in f32 for everything else. These
/// two products are most of a LoRA step's arithmetic; candle's f32 gemm ran
/// them at about 70 GFLOP/s on two cores.
struct FrozenLinear {
    w: Tensor,
    tiles: Option<Arc<FrozenTiles>>,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let values = contiguous_f32(self.name(), storage, layout)?;
        if let Some(t) = &self.tiles {
            let (y, shape) = tile_rows(self.name(), &t.forward, values, layout.dims())?;
            return Ok((candle_core::CpuStorage::F32(y), shape.into()));
        }
        let x = Tensor::from_slice(values, layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match &self.tiles {
            Some(t) if grad.device().is_cpu() && grad.dtype() == DType::F32 => {
                Ok(Some(tile_product(&t.backward, &grad.contiguous()?)?))
            }
            _ => Ok(Some(grad.matmul(&self.w)?)),
        }
    }
}

/// `x W^T` for a weight that is trained (full fine-tuning), on bf16 tiles:
/// the forward product, the input's gradient `dY W` and the weight's
/// gradient `dY^T x` each pack their right operand as tiles for the call
/// and multiply on [`tessera_kernels::amx::matmul_bf16`] (f32 sums; the
/// weights, their gradients and the optimizer stay f32). Used only where
/// [`TrainedLinear::fits`] and the CPU has AMX bf16.
struct TrainedLinear;

impl TrainedLinear {
    /// Whether a weight of `n` x `k` fits the tiles both ways round (the
    /// tokens of the weight's gradient are padded to fit).
    fn fits(n: usize, k: usize) -> bool {
        n.is_multiple_of(32) && k.is_multiple_of(32)
    }
}

/// `a (m x k) -> a B^T (m x n)` for a row-major `b` (n x k) packed for this
/// call; `None` where the shape does not fit.
fn packed_product(a: &[f32], m: usize, b: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
    let p = tessera_kernels::amx::Bf16Packed::from_f32(b, n, k)?;
    Some(tessera_kernels::amx::matmul_bf16(&p, a, m))
}

/// The row-major transpose of `x` (rows x cols), with `pad` zero columns
/// appended to each row of the result.
fn transposed(x: &[f32], rows: usize, cols: usize, pad: usize) -> Vec<f32> {
    // In 32 x 32 blocks, so that reads and writes both stay in cache lines
    // already loaded (the output head's transpose is 28 million values).
    const B: usize = 32;
    let width = rows + pad;
    let mut out = vec![0f32; cols * width];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * width + r] = x[r * cols + c];
                }
            }
        }
    }
    out
}

impl candle_core::CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, w) = (
            contiguous_f32(self.name(), s1, l1)?,
            contiguous_f32(self.name(), s2, l2)?,
        );
        let (n, k) = l2.shape().dims2()?;
        let Some(p) = tessera_kernels::amx::Bf16Packed::from_f32(w, n, k) else {
            candle_core::bail!("trained-linear: a {n} x {k} weight does not fit the tiles");
        };
        let (y, shape) = tile_rows(self.name(), &p, x, l1.dims())?;
        Ok((candle_core::CpuStorage::F32(y), shape.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k.max(1);
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let missing = || candle_core::Error::Msg("trained-linear: the gradient's shapes do not fit the tiles".into());
        // dX = dY W: W^T (k x n) packed.
        let dx = packed_product(&g, m, &transposed(&ws, n, k, 0), k, n).ok_or_else(missing)?;
        // dW = dY^T X: X^T (k x m) packed, the tokens padded to a multiple
        // of 32 with zeros (which add nothing).
        let pad = m.next_multiple_of(32) - m;
        let dw = packed_product(&transposed(&g, m, n, pad), n, &transposed(&xs, m, k, pad), k, m + pad)
            .ok_or_else(missing)?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The causal softmax op equals candle's masked softmax, forward and
    /// backward, within f32 rounding.
    #[test]
    fn causal_softmax_matches_the_masked_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, h, t) = (2, 3, 37);
        let wave = |len: usize, f: f32| -> Vec<f32> { (0..len).map(|i| ((i as f32) * f).sin() * 3.0).collect() };
        let x = Var::from_tensor(&Tensor::from_vec(wave(b * h * t * t, 0.37), (b, h, t, t), &dev).unwrap()).unwrap();
        let c = Tensor::from_vec(wave(t * t, 0.71), (t, t), &dev).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
        let run = |ours: bool| {
            let p = if ours {
                x.as_tensor().apply_op1(CausalSoftmax).unwrap()
            } else {
                candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
            };
            let g = p.broadcast_mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&p), flat(g.get(x.as_tensor()).unwrap()))
        };
        let ((p1, g1), (p2, g2)) = (run(false), run(true));
        for (what, a, b) in [("probabilities", &p1, &p2), ("gradient", &g1, &g2)] {
            for (i, (u, v)) in a.iter().zip(b.iter()).enumerate() {
                assert!((u - v).abs() <= 1e-5 * (1.0 + u.abs()), "{what} {i}: {u} vs {v}");
            }
        }
    }

    /// A trained weight's product and both gradients on the tiles equal
    /// candle's f32 ones within bf16 rounding, with a token count that is
    /// not a multiple of 32 (padded for the weight's gradient).
    #[test]
    fn trained_linear_on_tiles_matches_f32_within_bf16_rounding() {
        if !tessera_kernels::amx::bf16_available() {
            eprintln!("no AMX bf16 here: the f32 path is the one in use");
            return;
        }
        let dev = Device::Cpu;
        let (m, n, k) = (37, 64, 96);
        let wave = |len: usize, f: f32| -> Vec<f32> { (0..len).map(|i| ((i as f32) * f).sin()).collect() };
        let c = Tensor::from_vec(wave(n, 0.7), (1, n), &dev).unwrap();
        let run = |tiles: bool| {
            let x = Var::from_tensor(&Tensor::from_vec(wave(m * k, 0.37), (m, k), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::from_vec(wave(n * k, 0.11), (n, k), &dev).unwrap()).unwrap();
            let y = if tiles {
                x.as_tensor().apply_op2(w.as_tensor(), TrainedLinear).unwrap()
            } else {
                x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap()
            };
            let g = y.broadcast_mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&y),
                flat(g.get(x.as_tensor()).unwrap()),
                flat(g.get(w.as_tensor()).unwrap()),
            )
        };
        let (y32, dx32, dw32) = run(false);
        let (y16, dx16, dw16) = run(true);
        for (what, a, b, terms) in [
            ("product", &y32, &y16, k),
            ("input gradient", &dx32, &dx16, n),
            ("weight gradient", &dw32, &dw16, m),
        ] {
            assert_eq!(a.len(), b.len(), "{what}");
            for (p, q) in a.iter().zip(b.iter()) {
                assert!((p - q).abs() <= terms as f32 * 2.0f32.powi(-8), "{what}: {p} vs {q}");
            }
            assert!(
                a.iter().zip(b.iter()).any(|(p, q)| p != q),
                "{what}: the tiles did not run"
            );
        }
    }

    /// On bf16 tiles the frozen product and its input gradient equal the
    /// f32 ones within bf16's rounding (both operands keep 8 significant
    /// bits; sums stay f32).
    #[test]
    fn frozen_linear_on_tiles_matches_f32_within_bf16_rounding() {
        if !tessera_kernels::amx::bf16_available() {
            eprintln!("no AMX bf16 here: the f32 path is the one in use");
            return;
        }
        let dev = Device::Cpu;
        let (m, n, k) = (37, 64, 96);
        let wave = |len: usize, f: f32| -> Vec<f32> { (0..len).map(|i| ((i as f32) * f).sin()).collect() };
        let x = Var::from_tensor(&Tensor::from_vec(wave(m * k, 0.37), (m, k), &dev).unwrap()).unwrap();
        let w = Tensor::from_vec(wave(n * k, 0.11), (n, k), &dev).unwrap();
        let c = Tensor::from_vec(wave(n, 0.7), (1, n), &dev).unwrap();
        let tiles = FrozenTiles::new(&w).unwrap().map(Arc::new);
        assert!(tiles.is_some(), "a 64 x 96 weight fits the tiles both ways");
        let run = |tiles: Option<Arc<FrozenTiles>>| {
            let y = x.as_tensor().apply_op1(FrozenLinear { w: w.clone(), tiles }).unwrap();
            let g = y.broadcast_mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), dx)
        };
        let (y32, dx32) = run(None);
        let (y16, dx16) = run(tiles);
        for (what, a, b, scale) in [("product", &y32, &y16, k as f32), ("gradient", &dx32, &dx16, n as f32)] {
            for (p, q) in a.iter().zip(b.iter()) {
                // Each of `scale` terms is off by at most 2^-8 of a unit.
                assert!((p - q).abs() <= scale * 2.0f32.powi(-8), "{what}: {p} vs {q}");
            }
            assert!(
                a.iter().zip(b.iter()).any(|(p, q)| p != q),
                "{what}: the tiles did not run"
            );
        }
    }

    #[test]
    fn frozen_linear_matches_a_plain_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 15.0, &dev).unwrap().reshape((3, 5)).unwrap()).unwrap();
        let w = ((Tensor::arange(0f32, 20.0, &dev).unwrap().reshape((4, 5)).unwrap() * 0.1).unwrap() - 0.7).unwrap();
        let c = Tensor::new(&[[1f32, -2.0, 0.5, 3.0]], &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = x
            .as_tensor()
            .apply_op1(FrozenLinear {
                w: w.clone(),
                tiles: None,
            })
            .unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());
        let grad = |y: Tensor| {
            let g = y.broadcast_mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        let (a, b) = (grad(plain), grad(frozen));
        for (r, s) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((r - s).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
}

//! Synthetic models: GGUF files of a real architecture and shape with
//! seeded random weights and a working tokenizer.
//!
//! Model weights cannot travel everywhere: the GPU machine takes 64 MiB per
//! call (SmolLM2's file alone is 98 MB) and fetches nothing, and tests want
//! models of every architecture without downloading them. A synthetic model
//! runs the same code on the same shapes, so speed and agreement between
//! backends (CPU against CUDA or wgpu) can be measured anywhere; what it
//! answers is noise.
//!
//! Two sources of shape:
//! - a **named shape** ([`NAMED`]): SmolLM2-135M (llama), Qwen2.5-0.5B and
//!   1.5B (qwen2), Gemma-3-270M (gemma3), and tiny versions of each for
//!   tests. Their shapes are the published configurations' (hidden size,
//!   layers, heads, key/value heads, head size, feed-forward size,
//!   vocabulary); their tokenizer is a byte-level BPE written here (every
//!   byte a token, merges of common letter pairs, ChatML's or Gemma's turn
//!   markers, padded to the vocabulary size with word tokens " w1234"
//!   that no text encodes to but a random model's output shows);
//! - a **model file** (`--like` a pool member): every metadata entry is
//!   kept (so its real tokenizer and chat template come along) and every
//!   tensor is replaced by a random one of the same shape.
//!
//! Weights: matrices uniform in ±0.035 (the standard deviation 0.02 of
//! common initialisations), quantized to the chosen type; norms 1 and
//! biases small, kept in f32 as real files keep them. A matrix whose rows
//! are not a whole number of the type's blocks (Q4_K needs 256, SmolLM2's
//! width is 576) falls back to Q8_0, as llama.cpp's quantizer falls back.
//! The same shape, type and seed give the same file, byte for byte.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// A transformer's shape, as its configuration gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// `llama`, `qwen2` or `gemma3`.
    pub arch: &'static str,
    /// Residual width.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length the metadata declares.
    pub context: usize,
    /// Rotary base.
    pub rope_base: f32,
}

/// A shape from its sizes, in the order configurations list them:
/// `[hidden, layers, heads, kv_heads, head_dim, ffn, vocab]`.
const fn shape(arch: &'static str, sizes: [usize; 7], rope_base: f32) -> Shape {
    let [hidden, layers, heads, kv_heads, head_dim, ffn, vocab] = sizes;
    Shape {
        arch,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        context: 8192,
        rope_base,
    }
}

/// The named shapes: the published configurations, and tiny ones of each
/// architecture for tests.
pub const NAMED: &[(&str, Shape)] = &[
    (
        "smollm2-135m",
        shape("llama", [576, 30, 9, 3, 64, 1536, 49152], 100_000.0),
    ),
    (
        "qwen2.5-0.5b",
        shape("qwen2", [896, 24, 14, 2, 64, 4864, 151_936], 1_000_000.0),
    ),
    (
        "qwen2.5-1.5b",
        shape("qwen2", [1536, 28, 12, 2, 128, 8960, 151_936], 1_000_000.0),
    ),
    (
        "gemma3-270m",
        shape("gemma3", [640, 18, 4, 1, 256, 2048, 262_144], 1_000_000.0),
    ),
    ("tiny-llama", shape("llama", [64, 2, 4, 2, 16, 128, 512], 10_000.0)),
    ("tiny-qwen2", shape("qwen2", [64, 2, 4, 2, 16, 128, 512], 1_000_000.0)),
    ("tiny-gemma3", shape("gemma3", [64, 2, 4, 1, 32, 128, 512], 1_000_000.0)),
];

/// The named shape `name`, if there is one.
pub fn named(name: &str) -> Option<&'static Shape> {
    NAMED.iter().find(|(n, _)| *n == name).map(|(_, s)| s)
}

/// The weight types a synthetic model can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// 8-bit blocks of 32 (what the decode kernels read).
    Q8_0,
    /// 4-bit K-quant blocks of 256.
    Q4K,
    /// Half precision.
    F16,
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quant::Q8_0),
            "q4_k" => Ok(Quant::Q4K),
            "f16" => Ok(Quant::F16),
            other => Err(format!("quantization `{other}` is not one of q8_0, q4_k, f16")),
        }
    }
}

impl Quant {
    fn dtype(self) -> GgmlDType {
        match self {
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4K => GgmlDType::Q4K,
            Quant::F16 => GgmlDType::F16,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The architecture.
    pub arch: String,
    /// Parameters.
    pub parameters: u64,
    /// Tensors.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
    /// Matrices that fell back to Q8_0 (rows not a whole number of blocks).
    pub fallbacks: usize,
}

/// A seeded generator (SplitMix64): fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * a
    }
}

/// Half-width of the uniform matrices: standard deviation 0.02.
const SPREAD: f32 = 0.034_641;

/// What a tensor holds, by its name.
#[derive(Clone, Copy)]
enum Kind {
    Matrix,
    Norm,
    Bias,
}

fn kind_of(name: &str, dims: &[usize]) -> Kind {
    if dims.len() >= 2 {
        Kind::Matrix
    } else if name.ends_with(".bias") {
        Kind::Bias
    } else {
        Kind::Norm
    }
}

/// The tensors of `s`, as (name, dims in GGUF order: rows last).
fn tensors_of(s: &Shape) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, f) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.ffn);
    // Shapes as candle reads them: [out, in] for matrices.
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![s.vocab, h]),
        ("output_norm.weight".to_string(), vec![h]),
    ];
    for i in 0..s.layers {
        let p = |x: &str| format!("blk.{i}.{x}");
        t.push((p("attn_norm.weight"), vec![h]));
        t.push((p("attn_q.weight"), vec![q, h]));
        t.push((p("attn_k.weight"), vec![kv, h]));
        t.push((p("attn_v.weight"), vec![kv, h]));
        t.push((p("attn_output.weight"), vec![h, q]));
        t.push((p("ffn_norm.weight"), vec![h]));
        t.push((p("ffn_gate.weight"), vec![f, h]));
        t.push((p("ffn_up.weight"), vec![f, h]));
        t.push((p("ffn_down.weight"), vec![h, f]));
        if s.arch == "qwen2" {
            t.push((p("attn_q.bias"), vec![q]));
            t.push((p("attn_k.bias"), vec![kv]));
            t.push((p("attn_v.bias"), vec![kv]));
        }
        if s.arch == "gemma3" {
            t.push((p("attn_q_norm.weight"), vec![s.head_dim]));
            t.push((p("attn_k_norm.weight"), vec![s.head_dim]));
            t.push((p("post_attention_norm.weight"), vec![h]));
            t.push((p("post_ffw_norm.weight"), vec![h]));
        }
    }
    t
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves,
/// the rest move to characters from U+0100 on, so every byte is a
/// visible one-character token.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 0x100u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// A byte-level BPE vocabulary of exactly `vocab` tokens with its merges,
/// turn markers and types, and the chat template for `arch`.
fn tokenizer_metadata(arch: &str, vocab: usize) -> Vec<(String, Value)> {
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    let bytes = byte_chars();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    let mut types = vec![NORMAL; tokens.len()];
    // Merges of frequent letters, and of a leading space with each.
    let letters: Vec<String> = "etaoinshrdlcu".chars().map(String::from).collect();
    let space = bytes[b' ' as usize].to_string();
    let mut merges = Vec::new();
    for a in std::iter::once(&space).chain(letters.iter()) {
        for b in &letters {
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
            types.push(NORMAL);
        }
    }
    let (bos, eos, template, specials): (&str, &str, &str, &[&str]) = if arch == "gemma3" {
        (
            "<bos>",
            "<end_of_turn>",
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
            &["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        )
    } else {
        (
            "<|endoftext|>",
            "<|im_end|>",
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        )
    };
    for s in specials {
        tokens.push(s.to_string());
        types.push(CONTROL);
    }
    let id = |t: &str, tokens: &[String]| tokens.iter().position(|x| x == t).unwrap_or(0) as u32;
    let (bos_id, eos_id) = (id(bos, &tokens), id(eos, &tokens));
    // A vocabulary smaller than the essentials keeps the essentials (the
    // embedding grows to match, see `synthesize`).
    // Padding tokens are ordinary words (" w1234"): no text encodes to
    // them, but a random model generates them all the time, and its output
    // should read as text, not vanish as control tokens would.
    let mut i = 0;
    while tokens.len() < vocab {
        tokens.push(format!("{space}w{i}"));
        types.push(NORMAL);
        i += 1;
    }
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos_id)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos_id)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), Value::String(template.into())),
    ]
}

/// The metadata of a model of shape `s` (architecture and tokenizer).
fn metadata_of(s: &Shape, name: &str) -> Vec<(String, Value)> {
    let a = s.arch;
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        ("general.name".to_string(), Value::String(format!("synthetic {name}"))),
        ("general.alignment".to_string(), Value::U32(32)),
        (format!("{a}.context_length"), u(s.context)),
        (format!("{a}.embedding_length"), u(s.hidden)),
        (format!("{a}.block_count"), u(s.layers)),
        (format!("{a}.feed_forward_length"), u(s.ffn)),
        (format!("{a}.attention.head_count"), u(s.heads)),
        (format!("{a}.attention.head_count_kv"), u(s.kv_heads)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (format!("{a}.rope.freq_base"), Value::F32(s.rope_base)),
    ];
    if a == "gemma3" {
        m.push((format!("{a}.attention.key_length"), u(s.head_dim)));
        m.push((format!("{a}.attention.value_length"), u(s.head_dim)));
        m.push((format!("{a}.attention.sliding_window"), u(512)));
    }
    m.extend(tokenizer_metadata(a, s.vocab));
    m
}

fn generate(
    name: &str,
    dims: &[usize],
    quant: Quant,
    rng: &mut Rng,
    fallbacks: &mut usize,
) -> candle_core::Result<QTensor> {
    let n: usize = dims.iter().product();
    let kind = kind_of(name, dims);
    let values: Vec<f32> = match kind {
        Kind::Norm => vec![1.0; n],
        Kind::Bias => (0..n).map(|_| rng.uniform(0.01)).collect(),
        Kind::Matrix => (0..n).map(|_| rng.uniform(SPREAD)).collect(),
    };
    let t = Tensor::from_vec(values, dims, &Device::Cpu)?;
    let dtype = match kind {
        Kind::Matrix => {
            let want = quant.dtype();
            let row = dims.last().copied().unwrap_or(0);
            if row % want.block_size() == 0 {
                want
            } else {
                *fallbacks += 1;
                GgmlDType::Q8_0
            }
        }
        _ => GgmlDType::F32,
    };
    QTensor::quantize(&t, dtype)
}

fn write_gguf(
    out: &Path,
    arch: String,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>)>,
    quant: Quant,
    seed: u64,
) -> Result<Written, String> {
    let mut rng = Rng(seed);
    let mut fallbacks = 0;
    let mut made = Vec::with_capacity(tensors.len());
    let mut parameters = 0u64;
    for (name, dims) in &tensors {
        parameters += dims.iter().product::<usize>() as u64;
        let t = generate(name, dims, quant, &mut rng, &mut fallbacks).map_err(|e| format!("tensor `{name}`: {e}"))?;
        made.push((name.clone(), t));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = made.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut buf, &meta, &refs).map_err(|e| format!("writing the GGUF: {e}"))?;
    let bytes = buf.into_inner();
    crate::files::write_atomic(out, &bytes, crate::files::Durability::Cache)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(Written {
        arch,
        parameters,
        tensors: made.len(),
        bytes: bytes.len() as u64,
        fallbacks,
    })
}

/// Writes a model of the named shape `s` to `out`.
pub fn synthesize(s: &Shape, name: &str, quant: Quant, seed: u64, out: &Path) -> Result<Written, String> {
    let meta = metadata_of(s, name);
    // The written vocabulary can exceed a tiny shape's: size the embedding
    // to the token list, so every id the tokenizer makes has a row.
    let vocab = meta
        .iter()
        .find_map(|(k, v)| match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", Value::Array(a)) => Some(a.len()),
            _ => None,
        })
        .unwrap_or(s.vocab);
    let shape = Shape { vocab, ..s.clone() };
    write_gguf(out, s.arch.to_string(), meta, tensors_of(&shape), quant, seed)
}

/// Writes a model like the GGUF file at `like`: its metadata (tokenizer and
/// chat template included) and its tensors' names and shapes, with random
/// weights.
pub fn synthesize_like(like: &Path, quant: Quant, seed: u64, out: &Path) -> Result<Written, String> {
    let shown = like.display();
    let mut file = std::fs::File::open(like).map_err(|e| format!("{shown}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
    let content = crate::backends::gguf::read_content(&mut file, len).map_err(|e| format!("{shown}: {e}"))?;
    let arch = crate::backends::gguf::architecture(&content, &shown.to_string())?;
    let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
    metadata.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<(String, Vec<usize>)> = content
        .tensor_infos
        .into_iter()
        .map(|(n, t)| (n, t.shape.dims().to_vec()))
        .collect();
    // Same order every time, whatever the map's.
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_gguf(out, arch, metadata, tensors, quant, seed)
}

/// The metadata of `s` as a map, for tests that check what a loader reads.
pub fn metadata_map(s: &Shape) -> HashMap<String, Value> {
    metadata_of(s, "x").into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_have_the_published_sizes() {
        // Parameter counts of the published models, embeddings tied.
        for (name, want_m) in [("smollm2-135m", 134.5), ("qwen2.5-0.5b", 494.0), ("gemma3-270m", 268.1)] {
            let s = named(name).unwrap();
            let p: usize = tensors_of(s).iter().map(|(_, d)| d.iter().product::<usize>()).sum();
            let m = p as f64 / 1e6;
            assert!((m - want_m).abs() / want_m < 0.01, "{name}: {m:.1}M vs {want_m}M");
        }
    }

    #[test]
    fn the_same_seed_writes_the_same_file() {
        let dir = std::env::temp_dir().join(format!("tessera-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = named("tiny-qwen2").unwrap();
        let (a, b, c) = (dir.join("a.gguf"), dir.join("b.gguf"), dir.join("c.gguf"));
        synthesize(s, "tiny-qwen2", Quant::Q8_0, 7, &a).unwrap();
        synthesize(s, "tiny-qwen2", Quant::Q8_0, 7, &b).unwrap();
        synthesize(s, "tiny-qwen2", Quant::Q8_0, 8, &c).unwrap();
        let read = |p: &Path| std::fs::read(p).unwrap();
        assert_eq!(read(&a), read(&b));
        assert_ne!(read(&a), read(&c));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_tokenizer_is_byte_level_and_complete() {
        let m = metadata_map(named("tiny-llama").unwrap());
        let content = candle_core::quantized::gguf_file::Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: m,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let tok = crate::backends::gguf::tokenizer::from_gguf(&content).unwrap();
        let text = "Hello, wörld! 2+2=4 ✓";
        let ids = tok.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.tokenizer.decode(&ids, false).unwrap(), text);
        assert!(ids.len() < text.len(), "merges shorten the text: {ids:?}");
        assert!(tok.eos.is_some());
    }
}

//! Hugging Face model directories (`config.json` + `*.safetensors` +
//! `tokenizer.json` + `tokenizer_config.json`) for the llama family
//! (`llama`, `qwen2`), in both directions.
//!
//! **Loading** translates the directory into the GGUF conventions the model
//! files already implement, in memory, the way llama.cpp's converter does on
//! disk: tensor names are mapped (`model.layers.3.self_attn.q_proj.weight`
//! becomes `blk.3.attn_q.weight`, ...), `config.json` becomes the
//! `{arch}.*` metadata, and llama's query/key rows are permuted from the
//! rotate-half layout to the adjacent-pairs layout llama.cpp uses for that
//! architecture. So there is one implementation per architecture, whatever
//! the file format, and a model loaded from either format computes the same
//! thing. Weights keep their precision (f16/bf16 become f16, f32 stays f32).
//! The tokenizer comes from `tokenizer.json` as is; special tokens, BOS/EOS
//! and the chat template from `tokenizer_config.json`.
//!
//! **Exporting** writes a GGUF member out as such a directory (dequantized
//! to f16), which is how a contributor gets weights they can fine-tune and
//! how the loader is tested on real weights.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::tokenizer::GgufTokenizer;
use crate::backends::LoadError;

/// `(GGUF name suffix, HF name suffix)` of every per-layer tensor.
const LAYER_TENSORS: [(&str, &str); 12] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// `(GGUF name, HF name)` of the tensors outside the layers.
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Reorders the rows of llama's query/key weight between the rotate-half
/// layout (HF) and adjacent pairs (GGUF). `to_gguf` picks the direction.
fn permute(w: &Tensor, heads: usize, to_gguf: bool) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    let split = if to_gguf {
        (heads, 2, half, cols)
    } else {
        (heads, half, 2, cols)
    };
    w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// `(GGUF name, HF name)` of every tensor of a `layers`-layer model.
fn tensor_names(layers: u32) -> Vec<(String, String)> {
    let mut names: Vec<(String, String)> = GLOBAL_TENSORS
        .iter()
        .map(|(g, h)| (g.to_string(), h.to_string()))
        .collect();
    for i in 0..layers {
        for (g, h) in LAYER_TENSORS {
            names.push((format!("blk.{i}.{g}"), format!("model.layers.{i}.{h}")));
        }
    }
    names
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::Invalid(format!("{}: not valid JSON: {e}", path.display())))
}

/// A token named in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v["content"].as_str().map(str::to_string))
}

/// What the loader needs from a directory: an in-memory GGUF image of the
/// weights, the tokenizer and the chat template.
pub struct HfParts {
    /// GGUF bytes holding the weights and architecture metadata.
    pub gguf: Cursor<Vec<u8>>,
    /// The tokenizer with its special-token facts.
    pub tok: GgufTokenizer,
    /// The chat template, if the model has one.
    pub template: Option<String>,
}

/// Reads a directory. Errors name the file and the problem.
pub fn read_dir(dir: &Path) -> Result<HfParts, LoadError> {
    read_dir_as(dir, None)
}

/// [`read_dir`], with every weight matrix re-encoded to `quantize` where
/// given (vectors stay f32).
pub fn read_dir_as(dir: &Path, quantize: Option<crate::pool::Quantize>) -> Result<HfParts, LoadError> {
    let shown = dir.display();
    let config = read_json(&dir.join("config.json"))?;
    let arch = config["model_type"].as_str().unwrap_or("").to_string();
    if !matches!(arch.as_str(), "llama" | "qwen2") {
        return Err(LoadError::Invalid(format!(
            "{shown}/config.json: model_type `{arch}` is not supported in a Hugging Face directory (supported: llama, qwen2; gemma3 loads from GGUF)"
        )));
    }
    let num = |key: &str| -> Result<u32, String> {
        config[key]
            .as_u64()
            .map(|v| v as u32)
            .ok_or_else(|| format!("{shown}/config.json: `{key}` is missing"))
    };
    let heads = num("num_attention_heads")?;
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .map(|v| v as u32)
        .unwrap_or(heads);
    let layers = num("num_hidden_layers")?;
    let metadata: Vec<(String, gguf_file::Value)> = vec![
        ("general.architecture".into(), gguf_file::Value::String(arch.clone())),
        (format!("{arch}.attention.head_count"), gguf_file::Value::U32(heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            gguf_file::Value::U32(kv_heads),
        ),
        (
            format!("{arch}.embedding_length"),
            gguf_file::Value::U32(num("hidden_size")?),
        ),
        (format!("{arch}.block_count"), gguf_file::Value::U32(layers)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            gguf_file::Value::F32(config["rope_theta"].as_f64().unwrap_or(10_000.0) as f32),
        ),
        (
            format!("{arch}.context_length"),
            gguf_file::Value::U32(config["max_position_embeddings"].as_u64().unwrap_or(2048) as u32),
        ),
    ];

    // Every *.safetensors file (one, or the shards of a large model); for a
    // LoRA adapter folder, the base's, with the adapter applied below.
    let adapter = if super::adapter::is_adapter(dir) {
        Some(super::adapter::read(dir)?)
    } else {
        None
    };
    let weights_dir = adapter.as_ref().map_or(dir, |a| a.base_dir.as_path());
    let mut hf: HashMap<String, Tensor> = HashMap::new();
    let files = safetensors_files(weights_dir).map_err(|e| format!("{}: {e}", weights_dir.display()))?;
    if files.is_empty() {
        return Err(LoadError::Invalid(format!(
            "{}: no .safetensors file",
            weights_dir.display()
        )));
    }
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| format!("{}: not a readable safetensors file: {e}", f.display()))?;
        hf.extend(part);
    }
    if let Some(a) = &adapter {
        for name in a.targets() {
            let w = hf
                .get(name)
                .ok_or_else(|| format!("{shown}/{}: the base has no tensor `{name}`", super::adapter::ADAPTER))?;
            let changed = a.apply(name, w).map_err(|e| format!("{shown}/{e}"))?;
            hf.insert(name.to_string(), changed);
        }
    }
    let names = tensor_names(layers);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (gguf_name, hf_name) in names {
        let Some(t) = hf.remove(&hf_name) else {
            let optional = gguf_name == "output.weight" || gguf_name.ends_with(".bias");
            if optional {
                continue;
            }
            return Err(LoadError::Invalid(format!("{shown}: tensor `{hf_name}` is missing")));
        };
        let mut t = t;
        if arch == "llama" && gguf_name.ends_with("attn_q.weight") {
            t = permute(&t, heads as usize, true).map_err(|e| format!("{hf_name}: {e}"))?;
        } else if arch == "llama" && gguf_name.ends_with("attn_k.weight") {
            t = permute(&t, kv_heads as usize, true).map_err(|e| format!("{hf_name}: {e}"))?;
        }
        // Matrices as asked (the embedding table too: it is also the tied
        // output head, the largest matrix of a small model) where their
        // rows split into whole blocks, else as f16 (or f32 if stored so);
        // vectors as f32.
        let blocks = t.dims().last().is_some_and(|k| k % 32 == 0);
        let dtype = match (t.rank(), t.dtype(), quantize) {
            (2, _, Some(crate::pool::Quantize::Q8_0)) if blocks => GgmlDType::Q8_0,
            (2, DType::F32, _) => GgmlDType::F32,
            (2, _, _) => GgmlDType::F16,
            _ => GgmlDType::F32,
        };
        let t = t.to_dtype(DType::F32).map_err(|e| format!("{hf_name}: {e}"))?;
        let q = QTensor::quantize(&t, dtype).map_err(|e| format!("{hf_name}: {e}"))?;
        tensors.push((gguf_name, q));
    }
    let mut gguf = Cursor::new(Vec::new());
    {
        let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut gguf, &md, &ts).map_err(|e| format!("{shown}: building the weights: {e}"))?;
    }
    gguf.set_position(0);

    let (tok, template) = read_tokenizer(dir)?;
    Ok(HfParts { gguf, tok, template })
}

/// Reads a directory's tokenizer (`tokenizer.json`) with its special-token
/// facts and chat template (`tokenizer_config.json`).
pub fn read_tokenizer(dir: &Path) -> Result<(GgufTokenizer, Option<String>), LoadError> {
    let tok_path = dir.join("tokenizer.json");
    let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| format!("{}: {e}", tok_path.display()))?;
    // As for GGUF tokenizers ([`super::tokenizer::NO_WORD_CACHE`]): a
    // capacity of 0 keeps the word cache from growing (an empty entry per
    // thread remains, the library's own).
    let mut model = tokenizer.get_model().clone();
    model.resize_cache(super::tokenizer::NO_WORD_CACHE);
    tokenizer.with_model(model);
    let tcfg = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let id_of = |v: &Value| token_text(v).and_then(|t| tokenizer.token_to_id(&t).map(|id| (id, t)));
    let bos = id_of(&tcfg["bos_token"]);
    let eos = id_of(&tcfg["eos_token"]);
    let mut end_of_turn: Vec<u32> = tokenizer
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    if let Some((id, _)) = &eos {
        if !end_of_turn.contains(id) {
            end_of_turn.push(*id);
        }
    }
    end_of_turn.sort();
    let tok = GgufTokenizer {
        add_bos: tcfg["add_bos_token"].as_bool().unwrap_or(false) && bos.is_some(),
        tokenizer,
        bos,
        eos,
        end_of_turn,
    };
    Ok((tok, tcfg["chat_template"].as_str().map(str::to_string)))
}

/// Writes the GGUF member at `gguf_path` out as a Hugging Face directory in
/// `out` (created; existing files are replaced). llama and qwen2 only.
pub fn export(gguf_path: &Path, out: &Path) -> Result<(), LoadError> {
    let shown = gguf_path.display();
    let mut file = std::fs::File::open(gguf_path).map_err(|e| LoadError::io(gguf_path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| format!("{shown}: not a readable GGUF file: {e}"))?;
    let meta = |k: &str| content.metadata.get(k);
    let arch = meta("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !matches!(arch.as_str(), "llama" | "qwen2") {
        return Err(LoadError::Invalid(format!(
            "{shown}: exporting `{arch}` is not supported (llama, qwen2)"
        )));
    }
    let u = |k: &str| -> Result<u32, String> {
        meta(&format!("{arch}.{k}"))
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| format!("{shown}: metadata `{arch}.{k}` is missing"))
    };
    let f = |k: &str, d: f32| meta(&format!("{arch}.{k}")).and_then(|v| v.to_f32().ok()).unwrap_or(d);
    let heads = u("attention.head_count")? as usize;
    let kv_heads = u("attention.head_count_kv")? as usize;
    let layers = u("block_count")?;
    // Exporting dequantizes on the CPU: the result is written to disk.
    let device = candle_core::Device::Cpu;
    let names = tensor_names(layers);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (gguf_name, hf_name) in names {
        if !content.tensor_infos.contains_key(&gguf_name) {
            continue;
        }
        let q = content
            .tensor(&mut file, &gguf_name, &device)
            .map_err(|e| format!("{shown}: {gguf_name}: {e}"))?;
        let mut t = q.dequantize(&device).map_err(|e| format!("{gguf_name}: {e}"))?;
        if arch == "llama" && gguf_name.ends_with("attn_q.weight") {
            t = permute(&t, heads, false).map_err(|e| format!("{gguf_name}: {e}"))?;
        } else if arch == "llama" && gguf_name.ends_with("attn_k.weight") {
            t = permute(&t, kv_heads, false).map_err(|e| format!("{gguf_name}: {e}"))?;
        }
        let t = if t.rank() == 2 { t.to_dtype(DType::F16) } else { Ok(t) }.map_err(|e| e.to_string())?;
        tensors.insert(hf_name, t);
    }
    std::fs::create_dir_all(out).map_err(|e| LoadError::io(out, e))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))
        .map_err(|e| format!("model.safetensors: {e}"))?;
    let hidden = u("embedding_length")?;
    let config = json!({
        "model_type": arch,
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "hidden_size": hidden,
        "intermediate_size": u("feed_forward_length").unwrap_or(0),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "rms_norm_eps": f("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": f("rope.freq_base", 10_000.0),
        "max_position_embeddings": u("context_length").unwrap_or(2048),
        "vocab_size": tensors.get("model.embed_tokens.weight").map(|t| t.dims()[0]).unwrap_or(0),
        "tie_word_embeddings": !tensors.contains_key("lm_head.weight"),
        "torch_dtype": "float16",
    });
    let write_json = |name: &str, v: &Value| {
        let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
        std::fs::write(out.join(name), text).map_err(|e| LoadError::io(&out.join(name), e))
    };
    write_json("config.json", &config)?;
    let tok = super::tokenizer::from_gguf(&content).map_err(|e| format!("{shown}: tokenizer: {e}"))?;
    tok.tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| format!("tokenizer.json: {e}"))?;
    let template = meta("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    write_json(
        "tokenizer_config.json",
        &json!({
            "bos_token": tok.bos.as_ref().map(|b| b.1.clone()),
            "eos_token": tok.eos.as_ref().map(|b| b.1.clone()),
            "add_bos_token": tok.add_bos,
            "chat_template": template,
        }),
    )?;
    Ok(())
}

/// The `*.safetensors` weight files of a model folder (one, or a large
/// model's shards), sorted by name; a LoRA adapter's own file is not one.
pub(crate) fn safetensors_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter(|p| p.file_name().is_none_or(|n| n != super::adapter::ADAPTER))
        .collect();
    files.sort();
    Ok(files)
}

//! LoRA adapters kept apart from their base.
//!
//! A contributor who trains with LoRA changes a few million numbers of a
//! model that has a hundred million or more. Shipping the merged model
//! (540 MB for SmolLM2-135M in f32) for that is wasteful; shipping the
//! adapter (a few MB) is what makes many contributions practical. An adapter
//! folder holds:
//!
//! - `adapter.safetensors`: for each adapted weight `W` (Hugging Face name
//!   `N`), `N.lora_A` of shape `[rank, in]` and `N.lora_B` of `[out, rank]`,
//!   in f32;
//! - `adapter.toml`: the base folder (absolute, or relative to the adapter
//!   folder), the sha256 of the base's `model.safetensors`, and `scale`
//!   (`alpha / rank`);
//! - `config.json` and the tokenizer files, copied from the base.
//!
//! Loading applies `W + scale * B A` to the base's weights, in the same
//! order of operations as the trainer's merged output, so an adapter
//! folder and the merged folder of the same run give identical weights.
//! The base's checksum is verified first: an adapter on the wrong base is
//! not a slightly different model but a broken one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::backends::LoadError;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// The adapter's tensors inside an adapter folder.
pub const ADAPTER: &str = "adapter.safetensors";
/// The adapter's description inside an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter.toml";

/// `adapter.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// The base model folder (absolute, or relative to the adapter folder).
    pub base_dir: PathBuf,
    /// sha256 of the base folder's `model.safetensors`.
    pub base_sha256: String,
    /// `alpha / rank`: multiplies `B A`.
    pub scale: f64,
    /// LoRA rank (for people reading the file; the tensors say it too).
    pub rank: usize,
    /// Adapted projections, e.g. `q_proj`.
    pub targets: Vec<String>,
}

/// An adapter read from its folder, with its base located and verified.
pub struct Adapter {
    /// The base model folder, resolved.
    pub base_dir: PathBuf,
    /// `alpha / rank`.
    pub scale: f64,
    /// `N.lora_A` / `N.lora_B` tensors by name, as f32.
    pub tensors: HashMap<String, Tensor>,
}

/// Whether `dir` is an adapter folder.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// Bases verified in this process, by path, with the size and modification
/// time they had: a merge search loads the same adapters many times, and
/// hashing a 540 MB base each time would cost more than the merge.
static VERIFIED: Mutex<Option<HashMap<PathBuf, Verified>>> = Mutex::new(None);

/// A verified base file: its size and modification time then, and its sha256.
type Verified = (u64, Option<SystemTime>, String);

fn base_sha256(weights: &Path) -> Result<String, LoadError> {
    let meta = std::fs::metadata(weights).map_err(|e| LoadError::io(weights, e))?;
    let stamp = (meta.len(), meta.modified().ok());
    {
        let seen = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((len, modified, sha)) = seen.as_ref().and_then(|m| m.get(weights)) {
            if (*len, *modified) == stamp {
                return Ok(sha.clone());
            }
        }
    }
    let sha = crate::files::sha256_file(weights).map_err(|e| LoadError::io(weights, e))?;
    let mut seen = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
    seen.get_or_insert_with(HashMap::new)
        .insert(weights.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
    Ok(sha)
}

/// Reads the adapter in `dir`, finds its base and checks the base's
/// checksum. Errors name the file and the fix.
pub fn read(dir: &Path) -> Result<Adapter, LoadError> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::io(&cfg_path, e))?;
    let cfg: AdapterConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    if !(cfg.scale.is_finite()) {
        return Err(LoadError::Invalid(format!(
            "{}: scale {} is not a number",
            cfg_path.display(),
            cfg.scale
        )));
    }
    let base_dir = if cfg.base_dir.is_absolute() {
        cfg.base_dir.clone()
    } else {
        dir.join(&cfg.base_dir)
    };
    let weights = base_dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(LoadError::Invalid(format!(
            "{}: the base `{}` has no model.safetensors: set `base_dir` to your copy of the base model \
             (the folder `tessera contribute train` was given with --base)",
            cfg_path.display(),
            base_dir.display()
        )));
    }
    let sha = base_sha256(&weights)?;
    if sha != cfg.base_sha256 {
        return Err(LoadError::Invalid(format!(
            "{}: the base `{}` has sha256 {sha}, but the adapter was trained on {}: \
             point `base_dir` at the exact base it was trained from",
            cfg_path.display(),
            weights.display(),
            cfg.base_sha256
        )));
    }
    let path = dir.join(ADAPTER);
    let raw = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format!("{}: not a readable safetensors file: {e}", path.display()))?;
    let mut tensors = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        if !(k.ends_with(".lora_A") || k.ends_with(".lora_B")) {
            return Err(LoadError::Invalid(format!(
                "{}: tensor `{k}` is neither `.lora_A` nor `.lora_B`",
                path.display()
            )));
        }
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| format!("{}: `{k}`: {e}", path.display()))?;
        tensors.insert(k, t);
    }
    Ok(Adapter {
        base_dir,
        scale: cfg.scale,
        tensors,
    })
}

impl Adapter {
    /// The base weight names this adapter changes.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().filter_map(|k| k.strip_suffix(".lora_A"))
    }

    /// `w + scale * B A` for weight `name` (f32), or `w` unchanged when the
    /// adapter does not touch it. Shapes are checked and named.
    pub fn apply(&self, name: &str, w: &Tensor) -> Result<Tensor, LoadError> {
        let (Some(a), b) = (
            self.tensors.get(&format!("{name}.lora_A")),
            self.tensors.get(&format!("{name}.lora_B")),
        ) else {
            return Ok(w.clone());
        };
        let b = b.ok_or_else(|| format!("{ADAPTER}: `{name}.lora_A` has no `{name}.lora_B`"))?;
        let bad = |e: candle_core::Error| format!("{ADAPTER}: `{name}`: {e}");
        let (out, inp) = w.dims2().map_err(bad)?;
        let (ra, ia) = a.dims2().map_err(bad)?;
        let (ob, rb) = b.dims2().map_err(bad)?;
        if ia != inp || ob != out || ra != rb {
            return Err(LoadError::Invalid(format!(
                "{ADAPTER}: `{name}` is [{out}, {inp}] in the base, but lora_A is [{ra}, {ia}] and lora_B [{ob}, {rb}]: \
                 the adapter belongs to another model"
            )));
        }
        let w = w.to_dtype(DType::F32).map_err(bad)?;
        let delta = (b.matmul(a).map_err(bad)? * self.scale).map_err(bad)?;
        Ok((w + delta).map_err(bad)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(a: Tensor, b: Tensor, scale: f64) -> Adapter {
        Adapter {
            base_dir: PathBuf::new(),
            scale,
            tensors: [("w.lora_A".to_string(), a), ("w.lora_B".to_string(), b)].into(),
        }
    }

    #[test]
    fn applies_scaled_low_rank_update_and_checks_shapes() {
        let dev = Device::Cpu;
        // W = 0 (2x3), A = [1 2 3] (1x3), B = [1; -1] (2x1), scale 0.5.
        let w = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let a = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32], [-1.]], &dev).unwrap();
        let ad = adapter(a, b, 0.5);
        let got = ad.apply("w", &w).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![0.5, 1.0, 1.5], vec![-0.5, -1.0, -1.5]]);
        // Untouched weights pass through.
        let other = Tensor::ones((4, 4), DType::F32, &dev).unwrap();
        assert_eq!(
            ad.apply("v", &other).unwrap().to_vec2::<f32>().unwrap()[0],
            vec![1.0; 4]
        );
        // A base of another shape is named.
        let wrong = Tensor::zeros((3, 3), DType::F32, &dev).unwrap();
        let err = ad.apply("w", &wrong).unwrap_err().to_string();
        assert!(err.contains("belongs to another model"), "{err}");
        assert_eq!(ad.targets().collect::<Vec<_>>(), vec!["w"]);
    }
}

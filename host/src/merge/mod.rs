//! Weight-level collaboration: merge models that share an architecture and
//! a base into one model.
//!
//! Contributors who fine-tune the same base (with [`crate::contribute`])
//! produce models whose weights live in one space, so they can be combined
//! parameter by parameter instead of only by their outputs. [`merge`] reads
//! Hugging Face folders (a pool member id is resolved to one by the CLI),
//! checks they share every tensor name and shape, merges each tensor with
//! one of the [`methods`], and writes a folder the pool loads
//! (`backend = "hf"`) with a card saying what was merged and how.
//!
//! Runs one tensor at a time, so peak memory is one tensor of every input
//! plus the result; the arithmetic runs on the CPU or, through wgpu, on a
//! GPU ([`compute`]: `--merge-device`). A 135M model merges in seconds.

pub mod compute;
pub mod ephemeral;
pub mod gpu;
pub mod methods;

pub use ephemeral::{sweep_stale, PoolMerger};
// The capability's vocabulary and trait live beside `Models`, where the
// sandbox finds them without depending on this module.
pub use crate::inference::weights::{KeepRefused, MergeFailed, MergeSpec, Merged, Merger, Method, Named, Overlay};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::model_folder::{ContributorFile, MergeFacts, CARD, WEIGHTS};
use crate::pool::CardConfig;

/// Why a merge could not be done. Each names the model, tensor or option.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// The request does not fit the method.
    #[error("invalid merge: {0}")]
    Invalid(String),
    /// The models do not share an architecture and base.
    #[error("incompatible models: {0}")]
    Incompatible(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(String),
    /// Stopped between tensors because nobody waits for the result any
    /// more (see [`merge_until`]); nothing was written.
    #[error("the merge was cancelled: the request that asked for it has ended")]
    Cancelled,
}

/// What [`merge`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// Tensors merged.
    pub tensors: usize,
    /// Numbers merged.
    pub parameters: usize,
    /// sha256 of the merged weights.
    pub sha256: String,
    /// What computed it ([`compute::Compute::describe`]).
    pub device: String,
}

fn io(p: &Path, e: impl std::fmt::Display) -> MergeError {
    MergeError::Io(format!("{}: {e}", p.display()))
}

/// A file of the merged folder, fsynced: a merged model is a record to keep.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), MergeError> {
    crate::files::write_atomic(path, bytes, crate::files::Durability::Durable).map_err(|e| io(path, e))
}

/// One model's weights, mapped rather than read: a merge reads one tensor
/// of every model at a time, so memory holds one tensor per model plus the
/// result instead of every model whole (seven 135M models in f32 would be
/// 3.8 GB before a single tensor is merged).
struct Weights {
    files: candle_core::safetensors::MmapedSafetensors,
    shapes: HashMap<String, Vec<usize>>,
    dir: PathBuf,
    /// For a LoRA adapter folder: the adapter, applied to the base's
    /// tensors (`files` then maps the base) as each one is read.
    adapter: Option<crate::backends::gguf::adapter::Adapter>,
}

impl Weights {
    fn dims(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    /// Tensor `name` as flat f32 values.
    fn values(&self, name: &str) -> Result<Vec<f32>, MergeError> {
        let mut t = self
            .files
            .load(name, &Device::Cpu)
            .map_err(|e| MergeError::Io(format!("{}: tensor `{name}`: {e}", self.dir.display())))?;
        if let Some(a) = &self.adapter {
            t = a
                .apply(name, &t)
                .map_err(|e| MergeError::Io(format!("{}/{e}", self.dir.display())))?;
        }
        flat(&t).map_err(|e| MergeError::Io(format!("{}: tensor `{name}`: {e}", self.dir.display())))
    }
}

fn load(dir: &Path) -> Result<(serde_json::Value, Weights), MergeError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, e))?;
    let adapter = if crate::backends::gguf::adapter::is_adapter(dir) {
        Some(crate::backends::gguf::adapter::read(dir).map_err(|e| MergeError::Io(e.to_string()))?)
    } else {
        None
    };
    let weights_dir = adapter.as_ref().map_or(dir, |a| a.base_dir.as_path());
    let files = crate::backends::gguf::hf::safetensors_files(weights_dir).map_err(|e| io(weights_dir, e))?;
    if files.is_empty() {
        return Err(MergeError::Io(format!(
            "{}: no .safetensors weights",
            weights_dir.display()
        )));
    }
    // SAFETY: the files are mapped read-only for the length of one merge;
    // they are model folders that nothing writes while a merge reads them
    // (contributor outputs and the dequantized-base cache are written once,
    // through a rename).
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| MergeError::Io(format!("{}: {e}", dir.display())))?;
    let shapes = mapped
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    Ok((
        config,
        Weights {
            files: mapped,
            shapes,
            dir: dir.to_path_buf(),
            adapter,
        },
    ))
}

fn check(spec: &MergeSpec, models: usize, base: bool) -> Result<Vec<f64>, MergeError> {
    let bad = |m: String| Err(MergeError::Invalid(m));
    let name = spec.method.name();
    if models == 0 {
        return bad("no models to merge".into());
    }
    if spec.method.needs_base() != base {
        return if base {
            bad(format!("{name} takes no base model: drop --base"))
        } else {
            bad(format!(
                "{name} needs a base model (--base): the models' common ancestor, or for expo the weaker model"
            ))
        };
    }
    let unit = |v: f64, what: &str| {
        if v > 0.0 && v <= 1.0 {
            Ok(())
        } else {
            Err(MergeError::Invalid(format!("{what} {v} is out of range: use (0, 1]")))
        }
    };
    match &spec.method {
        Method::Linear if models < 2 => return bad("linear needs at least two models".into()),
        Method::Slerp { .. } if models != 2 => return bad(format!("slerp merges exactly two models, got {models}")),
        Method::Slerp { t } if !(0.0..=1.0).contains(t) => {
            return bad(format!("slerp t {t} is out of range: use [0, 1]"))
        }
        Method::Expo { .. } if models != 1 => {
            return bad(format!("expo extrapolates one model from the base, got {models}"))
        }
        Method::Expo { alpha } if !(*alpha > 0.0 && *alpha <= 10.0) => {
            return bad(format!("expo alpha {alpha} is out of range: use (0, 10], e.g. 0.3"))
        }
        Method::Ties { density } | Method::Dare { density } | Method::DareTies { density } => {
            unit(*density, "density")?
        }
        _ => {}
    }
    let weights = spec.weights.clone().unwrap_or_else(|| vec![1.0; models]);
    if weights.len() != models {
        return bad(format!(
            "{} weights for {models} models: give one per model",
            weights.len()
        ));
    }
    if weights.iter().any(|w| !w.is_finite()) {
        return bad("weights must be finite numbers".into());
    }
    if !spec.lambda.is_finite() {
        return bad("lambda must be a finite number".into());
    }
    Ok(weights)
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Merges the model folders `models` (over `base` where the method needs
/// one) into the folder `out`, per `spec`. `names` are how the models and
/// base are shown on the card (same order, base last if any). The
/// tokenizer and config come from the first model.
pub fn merge(
    models: &[PathBuf],
    base: Option<&Path>,
    names: &[String],
    spec: &MergeSpec,
    card: CardConfig,
    out: &Path,
) -> Result<MergeReport, MergeError> {
    let compute = compute::shared(compute::Choice::Auto).map_err(|e| MergeError::Invalid(e.to_string()))?;
    merge_on(compute.as_ref(), models, base, names, spec, card, out)
}

/// [`merge`] on the given backend rather than the process's.
pub fn merge_on(
    compute: &dyn compute::Compute,
    models: &[PathBuf],
    base: Option<&Path>,
    names: &[String],
    spec: &MergeSpec,
    card: CardConfig,
    out: &Path,
) -> Result<MergeReport, MergeError> {
    merge_until(compute, models, base, names, spec, card, out, &|| false)
}

/// [`merge_on`] that asks `stop` before each tensor and gives up with
/// [`MergeError::Cancelled`] when it says so: a merge a module asked for
/// runs on a blocking thread that outlives the request, so without this a
/// request that ended (its deadline passed, its client left) would keep a
/// core and the one-at-a-time merge turn for the whole merge. The output
/// folder is written only after the last tensor, so a cancelled merge
/// leaves nothing behind.
#[allow(clippy::too_many_arguments)]
pub fn merge_until(
    compute: &dyn compute::Compute,
    models: &[PathBuf],
    base: Option<&Path>,
    names: &[String],
    spec: &MergeSpec,
    card: CardConfig,
    out: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<MergeReport, MergeError> {
    let weights = check(spec, models.len(), base.is_some())?;
    let mut loaded = Vec::new();
    for m in models {
        loaded.push(load(m)?);
    }
    let base_loaded = match base {
        Some(b) => Some(load(b)?),
        None => None,
    };
    // Same architecture and the same tensors everywhere.
    let (cfg0, t0) = &loaded[0];
    let arch_keys = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    ];
    let others = loaded
        .iter()
        .map(|l| (&l.0, &l.1))
        .chain(base_loaded.iter().map(|l| (&l.0, &l.1)));
    for (i, (cfg, tensors)) in others.enumerate().skip(1) {
        let who = names.get(i).cloned().unwrap_or_else(|| format!("model {}", i + 1));
        for k in arch_keys {
            if cfg[k] != cfg0[k] {
                return Err(MergeError::Incompatible(format!(
                    "{who} has {k} = {} but {} has {}: merging needs one architecture",
                    cfg[k], names[0], cfg0[k]
                )));
            }
        }
        for (name, t) in &t0.shapes {
            match tensors.dims(name) {
                None => return Err(MergeError::Incompatible(format!("{who} has no tensor `{name}`"))),
                Some(u) if u != t.as_slice() => {
                    return Err(MergeError::Incompatible(format!(
                        "tensor `{name}` is {u:?} in {who} but {t:?} in {}",
                        names[0]
                    )))
                }
                _ => {}
            }
        }
    }

    let sorted: BTreeMap<&String, &Vec<usize>> = t0.shapes.iter().collect();
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    let mut parameters = 0;
    let err = |e: candle_core::Error| MergeError::Io(e.to_string());
    for (name, dims) in sorted {
        if stop() {
            return Err(MergeError::Cancelled);
        }
        // Present in every model: checked above.
        let xs = loaded
            .iter()
            .map(|(_, w)| w.values(name))
            .collect::<Result<Vec<_>, _>>()?;
        let b = match &base_loaded {
            Some((_, bw)) if bw.dims(name).is_some() => Some(bw.values(name)?),
            Some(_) => Some(t0.values(name)?),
            None => None,
        };
        let out_values = compute::merge_tensor(compute, spec, &weights, name, &xs, b.as_deref())?;
        parameters += out_values.len();
        merged.insert(
            name.clone(),
            Tensor::from_vec(out_values, dims.as_slice(), &Device::Cpu).map_err(err)?,
        );
    }

    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let tmp = crate::files::tmp_path(&out.join(WEIGHTS));
    candle_core::safetensors::save(&merged, &tmp).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, out.join(WEIGHTS)).map_err(|e| io(out, e))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = std::fs::read(models[0].join(f)).map_err(|e| io(&models[0].join(f), e))?;
        write_durable(&out.join(f), &bytes)?;
    }
    let mut config = cfg0.clone();
    config["torch_dtype"] = "float32".into();
    let text = serde_json::to_vec_pretty(&config).map_err(|e| MergeError::Io(e.to_string()))?;
    write_durable(&out.join("config.json"), &text)?;
    let sha = crate::files::sha256_file(&out.join(WEIGHTS)).map_err(|e| io(out, e))?;
    let facts = MergeFacts {
        spec: spec.clone(),
        models: names[..models.len()].to_vec(),
        base: base.map(|_| names.get(models.len()).cloned().unwrap_or_default()),
    };
    let mut card = card;
    if card.source.is_empty() {
        card.source = format!(
            "{} merge of {} with `tessera merge`",
            spec.method.name(),
            facts.models.join(", ")
        );
    }
    let file = ContributorFile {
        id: out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "merged".into()),
        sha256: sha.clone(),
        card,
        training: None,
        merge: Some(facts),
    };
    let text = toml::to_string(&file).map_err(|e| MergeError::Io(format!("{CARD}: {e}")))?;
    write_durable(&out.join(CARD), text.as_bytes())?;
    Ok(MergeReport {
        tensors: merged.len(),
        parameters,
        sha256: sha,
        device: compute.describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_do_not_fit_the_method_are_named() {
        let spec = |m: Method| MergeSpec::new(m);
        let e = |s: MergeSpec, n: usize, b: bool| check(&s, n, b).unwrap_err().to_string();
        assert!(e(spec(Method::Linear), 1, false).contains("at least two"));
        assert!(e(spec(Method::Linear), 2, true).contains("takes no base"));
        assert!(e(spec(Method::Ties { density: 0.5 }), 2, false).contains("needs a base"));
        assert!(e(spec(Method::Ties { density: 1.5 }), 2, true).contains("density 1.5"));
        assert!(e(spec(Method::Slerp { t: 0.5 }), 3, false).contains("exactly two"));
        assert!(e(spec(Method::Expo { alpha: 0.3 }), 2, true).contains("one model"));
        let mut s = spec(Method::TaskArithmetic);
        s.weights = Some(vec![1.0]);
        assert!(e(s, 2, true).contains("one per model"));
        assert_eq!(check(&spec(Method::TaskArithmetic), 3, true).unwrap(), vec![1.0; 3]);
    }
}

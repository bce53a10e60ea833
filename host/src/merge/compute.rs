//! Where merges compute: the CPU or a GPU, behind one trait.
//!
//! Every merge method is built from the two primitives of
//! [`super::methods`] ([`Combine`] and dot products); a [`Compute`]
//! backend runs them. [`Cpu`] is the reference; [`super::gpu::Gpu`] runs
//! the same primitives as wgpu compute shaders and gives the same results
//! to floating-point tolerance (tested on the llvmpipe software device).
//!
//! The backend is chosen per process with `--merge-device` /
//! `TESSERA_MERGE_DEVICE`: `auto` (default) merges on a hardware GPU when
//! wgpu finds one and on the CPU otherwise; `gpu` insists on a wgpu
//! adapter (a software one included, which is how the shaders are tested
//! without a GPU); `cpu` never opens a GPU.

use std::sync::{Arc, OnceLock};

use super::gpu::Gpu;
use super::methods::{self, Combine, Keep};
use super::{MergeError, MergeSpec, Method};

/// Runs the merge primitives.
pub trait Compute: Send + Sync {
    /// What runs the merge, for logs and cards.
    fn describe(&self) -> String;
    /// One [`Combine`].
    fn combine(&self, job: &Combine) -> Result<Vec<f32>, MergeError>;
    /// `(a . a, b . b, a . b)`.
    fn dots(&self, a: &[f32], b: &[f32]) -> Result<(f64, f64, f64), MergeError>;
}

/// The CPU backend: [`methods::combine`] and [`methods::dots`].
pub struct Cpu;

impl Compute for Cpu {
    fn describe(&self) -> String {
        "cpu".into()
    }
    fn combine(&self, job: &Combine) -> Result<Vec<f32>, MergeError> {
        Ok(methods::combine(job))
    }
    fn dots(&self, a: &[f32], b: &[f32]) -> Result<(f64, f64, f64), MergeError> {
        Ok(methods::dots(a, b))
    }
}

impl Compute for Gpu {
    fn describe(&self) -> String {
        format!("wgpu: {}", Gpu::describe(self))
    }
    fn combine(&self, job: &Combine) -> Result<Vec<f32>, MergeError> {
        Gpu::combine(self, job)
    }
    fn dots(&self, a: &[f32], b: &[f32]) -> Result<(f64, f64, f64), MergeError> {
        Gpu::dots(self, a, b)
    }
}

/// A parsed `--merge-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A hardware GPU if wgpu finds one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// Any wgpu adapter, software ones included; an error without one.
    Gpu,
}

/// Why a merge backend cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComputeError {
    /// The `--merge-device` value names no backend (the caller's to fix).
    #[error("unknown merge device `{0}`: use `auto`, `cpu` or `gpu`")]
    Unknown(String),
    /// `gpu` was asked for and no usable wgpu adapter is there; the text
    /// says what was found.
    #[error("{0}")]
    NoGpu(String),
}

impl Choice {
    /// Parses `auto`, `cpu` or `gpu` (empty is `auto`).
    pub fn parse(s: &str) -> Result<Choice, ComputeError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Choice::Auto),
            "cpu" => Ok(Choice::Cpu),
            "gpu" | "wgpu" => Ok(Choice::Gpu),
            other => Err(ComputeError::Unknown(other.to_string())),
        }
    }

    /// Opens the backend.
    pub fn open(self) -> Result<Arc<dyn Compute>, ComputeError> {
        match self {
            Choice::Cpu => Ok(Arc::new(Cpu)),
            Choice::Gpu => Ok(Arc::new(Gpu::open(true).map_err(ComputeError::NoGpu)?)),
            Choice::Auto => match Gpu::open(false) {
                Ok(g) => Ok(Arc::new(g)),
                Err(why) => {
                    tracing::debug!("merging on the CPU: {why}");
                    Ok(Arc::new(Cpu))
                }
            },
        }
    }
}

/// The backend for `choice`, opened on its first use and shared after
/// (opening a GPU takes time, and one adapter serves every merge). This is
/// a cache, not a setting: which backend a merge uses is the caller's
/// [`Choice`], passed as a value.
pub fn shared(choice: Choice) -> Result<Arc<dyn Compute>, ComputeError> {
    static OPENED: [OnceLock<Result<Arc<dyn Compute>, ComputeError>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match choice {
        Choice::Auto => &OPENED[0],
        Choice::Cpu => &OPENED[1],
        Choice::Gpu => &OPENED[2],
    };
    slot.get_or_init(|| choice.open()).clone()
}

/// A stable per-tensor, per-model seed for DARE's drops.
pub(crate) fn drop_seed(seed: u64, name: &str, model: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (model as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Merges tensor `name` of every model (over `base` where the method has
/// one) per `spec`, on `compute`. `weights` are the checked per-model
/// weights.
pub fn merge_tensor(
    compute: &dyn Compute,
    spec: &MergeSpec,
    weights: &[f64],
    name: &str,
    models: &[Vec<f32>],
    base: Option<&[f32]>,
) -> Result<Vec<f32>, MergeError> {
    let refs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
    let mut job = Combine {
        base,
        keep: vec![Keep::All; refs.len()],
        models: refs,
        weights: weights.to_vec(),
        elect_sign: false,
        normalize: false,
        lambda: spec.lambda,
    };
    match (&spec.method, base) {
        (Method::Linear, _) => {
            job.base = None;
            job.normalize = true;
            job.lambda = 1.0;
        }
        (Method::Slerp { t }, _) => {
            let (s0, s1) = methods::slerp_weights(compute.dots(job.models[0], job.models[1])?, *t);
            job.base = None;
            job.weights = vec![s0, s1];
            job.lambda = 1.0;
        }
        // target + alpha (target - source) = source + (1 + alpha)(target - source).
        (Method::Expo { alpha }, Some(_)) => {
            job.weights = vec![1.0];
            job.lambda = 1.0 + alpha;
        }
        (Method::TaskArithmetic, Some(_)) => {}
        (Method::Ties { density }, Some(b)) => {
            job.keep = models
                .iter()
                .map(|m| {
                    let delta: Vec<f32> = m.iter().zip(b).map(|(x, y)| x - y).collect();
                    Keep::magnitude(&delta, *density)
                })
                .collect();
            job.elect_sign = true;
            job.normalize = true;
        }
        (Method::Dare { density } | Method::DareTies { density }, Some(_)) => {
            job.keep = (0..models.len())
                .map(|i| Keep::random(drop_seed(spec.seed, name, i), *density))
                .collect();
            job.elect_sign = matches!(spec.method, Method::DareTies { .. });
        }
        (_, None) => {
            return Err(MergeError::Invalid(format!(
                "{} needs a base model",
                spec.method.name()
            )));
        }
    }
    compute.combine(&job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_devices_parse_with_a_named_error() {
        assert_eq!(Choice::parse("").unwrap(), Choice::Auto);
        assert_eq!(Choice::parse("GPU").unwrap(), Choice::Gpu);
        assert_eq!(Choice::parse("cpu").unwrap(), Choice::Cpu);
        assert!(Choice::parse("cuda")
            .unwrap_err()
            .to_string()
            .contains("`auto`, `cpu` or `gpu`"));
    }

    fn spec(method: Method) -> MergeSpec {
        MergeSpec::new(method)
    }

    #[test]
    fn each_method_maps_to_its_formula_on_the_cpu() {
        let a = vec![1.0f32, 0.0];
        let b = vec![0.0f32, 1.0];
        let base = [0.5f32, 0.5];
        let m = |s: MergeSpec, w: &[f64], ms: &[Vec<f32>], base: Option<&[f32]>| {
            merge_tensor(&Cpu, &s, w, "t", ms, base).unwrap()
        };
        let two = [a.clone(), b.clone()];
        assert_eq!(m(spec(Method::Linear), &[1.0, 3.0], &two, None), vec![0.25, 0.75]);
        let mid = m(spec(Method::Slerp { t: 0.5 }), &[1.0, 1.0], &two, None);
        assert!((mid[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{mid:?}");
        assert_eq!(
            m(
                spec(Method::Expo { alpha: 0.5 }),
                &[1.0],
                &[vec![2.0, -1.0]],
                Some(&[1.0, 1.0])
            ),
            vec![2.5, -2.0]
        );
        assert_eq!(
            m(spec(Method::TaskArithmetic), &[1.0, 1.0], &two, Some(&base)),
            vec![0.5, 0.5]
        );
        // TIES at density 0.5 keeps one entry of each delta (+-0.5 tie:
        // the first), elects + at 0 and + at 1 (0.5 vs -0.5 sums to 0).
        let ties = m(spec(Method::Ties { density: 0.5 }), &[1.0, 1.0], &two, Some(&base));
        assert_eq!(ties, vec![1.0, 0.5]);
        assert!(merge_tensor(&Cpu, &spec(Method::TaskArithmetic), &[1.0], "t", &[a], None).is_err());
    }
}

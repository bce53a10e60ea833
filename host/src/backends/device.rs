//! Which compute device members load on and contributors train on.
//!
//! The CPU is the default and needs nothing beyond this crate. A build with
//! the `cuda` cargo feature (`cargo build --features cuda`, which needs the
//! CUDA toolkit to compile candle's kernels) can put models on an NVIDIA GPU
//! with `--device cuda` or `--device cuda:N`. `--device wgpu` runs
//! llama-family members on any GPU wgpu reaches ([`super::webgpu`]). The choice is a value
//! ([`DeviceSpec`], in [`crate::pool::PoolOptions`] and the training
//! options), so one process can run two pools on two devices; each device
//! is opened once and shared ([`DeviceSpec::open`]), so loading many
//! members does not open many GPU contexts.
//!
//! On the CPU, Q8_0 projections use Tessera's own VNNI kernel where the CPU
//! has it (see `gguf::quant`); on a GPU they use candle's CUDA kernels.

use candle_core::Device;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (default).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
    /// The best GPU wgpu finds (Vulkan, Metal, DX12; llvmpipe where there
    /// is none): llama-family members run their layers there
    /// ([`crate::backends::webgpu`]); everything else stays on the CPU.
    Wgpu,
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The `--device` value names no device.
    #[error("unknown device `{0}`: use `cpu`, `cuda`, `cuda:N` (N = GPU number) or `wgpu`")]
    Unknown(String),
    /// A GPU was asked of a build without GPU support.
    #[error(
        "device `cuda:{0}`: this tessera was built without CUDA support; rebuild with \
         `cargo build --release --features cuda` (needs the CUDA toolkit) or use `--device cpu`"
    )]
    NotBuilt(usize),
    /// The GPU is there in the build but cannot be opened; the text is the
    /// driver's reason.
    #[error(
        "device `cuda:{ordinal}` cannot be opened ({reason}): check the GPU number and driver, or use `--device cpu`"
    )]
    Unavailable {
        /// The GPU number.
        ordinal: usize,
        /// What the driver said.
        reason: String,
    },
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N`, with an error that lists
    /// what is accepted.
    pub fn parse(spec: &str) -> Result<Self, DeviceError> {
        let s = spec.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" | "vulkan" | "metal" => Ok(DeviceSpec::Wgpu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(DeviceError::Unknown(spec.to_string())),
            },
        }
    }

    /// The device, opened on first use and shared by every later caller
    /// (a cache, not a setting). Asking for CUDA from a build without the
    /// `cuda` feature, or without a usable GPU, is an error that says how to
    /// fix it.
    pub fn open(self) -> Result<Device, DeviceError> {
        type Opened = Vec<(DeviceSpec, Result<Device, DeviceError>)>;
        static OPENED: std::sync::Mutex<Opened> = std::sync::Mutex::new(Vec::new());
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, d)) = opened.iter().find(|(s, _)| *s == self) {
            return d.clone();
        }
        let d = self.open_new();
        opened.push((self, d.clone()));
        d
    }

    fn open_new(self) -> Result<Device, DeviceError> {
        match self {
            // Tensors that are not the model's (ids, logits, sampling) live
            // on the host; the model's own go to the wgpu device at load.
            DeviceSpec::Cpu | DeviceSpec::Wgpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NotBuilt(n));
                }
                Device::new_cuda(n).map_err(|e| DeviceError::Unavailable {
                    ordinal: n,
                    reason: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse(""), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("CUDA"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        let e = DeviceSpec::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("`tpu`") && e.contains("cuda:N"), "{e}");
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert_eq!(DeviceSpec::parse("wgpu"), Ok(DeviceSpec::Wgpu));
    }

    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda") && e.contains("--device cpu"), "{e}");
        assert!(matches!(DeviceSpec::Cpu.open(), Ok(Device::Cpu)));
    }
}

//! Which compute device members load on and contributors train on.
//!
//! The CPU is the default and needs nothing beyond this crate. A build with
//! the `cuda` cargo feature (`cargo build --features cuda`, which needs the
//! CUDA toolkit to compile candle's kernels) can put models on an NVIDIA GPU
//! with `--device cuda` or `--device cuda:N`. The choice is a value
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
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N`, with an error that lists
    /// what is accepted.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let s = spec.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{spec}`: use `cpu`, `cuda` or `cuda:N` (N = GPU number)"
                )),
            },
        }
    }

    /// The device, opened on first use and shared by every later caller
    /// (a cache, not a setting). Asking for CUDA from a build without the
    /// `cuda` feature, or without a usable GPU, is an error that says how to
    /// fix it.
    pub fn open(self) -> Result<Device, String> {
        static OPENED: std::sync::Mutex<Vec<(DeviceSpec, Result<Device, String>)>> = std::sync::Mutex::new(Vec::new());
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, d)) = opened.iter().find(|(s, _)| *s == self) {
            return d.clone();
        }
        let d = self.open_new();
        opened.push((self, d.clone()));
        d
    }

    fn open_new(self) -> Result<Device, String> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(format!(
                        "device `cuda:{n}`: this tessera was built without CUDA support; rebuild with \
                         `cargo build --release --features cuda` (needs the CUDA toolkit) or use `--device cpu`"
                    ));
                }
                Device::new_cuda(n).map_err(|e| {
                    format!("device `cuda:{n}` cannot be opened ({e}): check the GPU number and driver, or use `--device cpu`")
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
        let e = DeviceSpec::parse("tpu").unwrap_err();
        assert!(e.contains("`tpu`") && e.contains("cuda:N"), "{e}");
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }

    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(e.contains("--features cuda") && e.contains("--device cpu"), "{e}");
        assert!(matches!(DeviceSpec::Cpu.open(), Ok(Device::Cpu)));
    }
}

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
                let unavailable = |reason: String| DeviceError::Unavailable { ordinal: n, reason };
                #[cfg(feature = "cuda")]
                if let Some(missing) = cuda_libraries::first_missing() {
                    return Err(unavailable(missing));
                }
                // A library that loads but lacks a symbol the build expects
                // (a driver older than the toolkit) still panics inside
                // candle's bindings: that is a typed error here too.
                match std::panic::catch_unwind(|| Device::new_cuda(n)) {
                    Ok(opened) => opened.map_err(|e| {
                        let e = e.to_string();
                        // A build linked without the driver (build_cuda_stubs.rs)
                        // run where only the stubs are found.
                        if e.contains("CUDA_ERROR_STUB_LIBRARY") {
                            unavailable(
                                "the libcuda.so.1 that loaded is a link stub, not the NVIDIA driver \
                                 (install the driver, or take the stubs' folder off LD_LIBRARY_PATH)"
                                    .into(),
                            )
                        } else {
                            unavailable(e)
                        }
                    }),
                    Err(panic) => Err(unavailable(super::panic_message(panic))),
                }
            }
        }
    }
}

/// The shared libraries a CUDA build opens when a GPU is first used.
///
/// The carried build (`scripts/cuda-build.sh`) opens the driver and cuBLAS
/// with `dlopen` on first use, where a missing library is a panic deep in
/// the bindings. Looking for them first turns that into an error that says
/// which library is missing and what provides it. The names are the
/// libraries' sonames, which the bindings also try.
#[cfg(feature = "cuda")]
mod cuda_libraries {
    /// Each library: the names to try, and what to install or point to.
    const NEEDED: [(&[&str], &str); 4] = [
        (
            &["libcuda.so.1", "libcuda.so"],
            "the NVIDIA driver is not installed (libcuda.so.1 cannot be loaded)",
        ),
        (
            &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
            "cuBLAS (libcublas.so.13) cannot be loaded: install the CUDA toolkit's \
             libraries or put their folder (for example PyTorch's nvidia/cu13/lib) on LD_LIBRARY_PATH",
        ),
        (
            &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            "cuBLASLt (libcublasLt.so.13) cannot be loaded: put cuBLAS's folder on LD_LIBRARY_PATH",
        ),
        (
            &["libcurand.so.10", "libcurand.so"],
            "cuRAND (libcurand.so.10) cannot be loaded: put its folder on LD_LIBRARY_PATH",
        ),
    ];

    /// The first library that none of its names opens, as the reason to
    /// give; `None` when every one opens.
    pub(super) fn first_missing() -> Option<String> {
        NEEDED.iter().find_map(|(names, reason)| {
            // SAFETY: loading a library runs its initialisers. These are
            // NVIDIA's own libraries, which the CUDA build opens anyway on
            // first use; the handles are dropped at once.
            let found = names
                .iter()
                .any(|name| unsafe { libloading::Library::new(*name) }.is_ok());
            (!found).then(|| (*reason).to_string())
        })
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

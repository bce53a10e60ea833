//! Builds the chat-template renderer (`host/template-guest`) as a core wasm
//! module and leaves it in `OUT_DIR` for `include_bytes!`: chat templates
//! are untrusted code, rendered inside the sandbox (see
//! `src/backends/gguf/template.rs`).
//!
//! The guest is built by a nested cargo with its own target directory (so
//! it never waits on the outer build's lock) and without the outer build's
//! flags: the x86 target features, a fuzzer's sanitizer passes or clippy's
//! wrapper mean nothing for wasm.

use std::path::{Path, PathBuf};
use std::process::Command;

#[cfg(feature = "cuda")]
#[path = "build_cuda_stubs.rs"]
mod cuda_stubs;

const GUEST_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    #[cfg(feature = "cuda")]
    {
        // The CUDA build links candle's kernels against the CUDA runtime
        // (libcudart.so.13); scripts/cuda-build.sh ships that library beside
        // the binary, which therefore looks in its own folder first.
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
        cuda_stubs::emit(&out_dir);
    }
    let guest = manifest_dir.join("template-guest");
    for p in [
        "template-guest/src",
        "template-guest/Cargo.toml",
        "../Cargo.toml",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out: keep
    // the guest's build beside the profile so rebuilds of the host reuse it.
    let guest_target = out_dir.ancestors().nth(3).unwrap_or(&out_dir).join("template-guest");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .args(["--target", GUEST_TARGET, "--profile", "guest", "--target-dir"])
        .arg(&guest_target);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status();
    let wasm = guest_target
        .join(GUEST_TARGET)
        .join("guest")
        .join("tessera_template_guest.wasm");
    match status {
        Ok(s) if s.success() => {}
        Ok(_) | Err(_) => panic!(
            "building the chat-template renderer ({}) for {GUEST_TARGET} failed (see above). \
             If the target is missing, run `rustup target add {GUEST_TARGET}` (`make` does this).",
            guest.display()
        ),
    }
    copy(&wasm, &out_dir.join("chat_template.wasm"));
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!("copying {} to {}: {e}", from.display(), to.display());
    }
}

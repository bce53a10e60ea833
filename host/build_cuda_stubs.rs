//! Link stubs for the CUDA libraries, so that `cargo build --features cuda`
//! links on a machine that has the CUDA compiler but no NVIDIA driver
//! (issue 23, item 1).
//!
//! candle asks cudarc to link the driver (`libcuda`), cuBLAS, cuBLASLt,
//! cuRAND and NVRTC at build time. A build machine without a GPU has none
//! of them: the driver comes with the GPU, and the CUDA compiler from PyPI
//! brings no libraries but the runtime. NVIDIA's answer is a toolkit's
//! `lib64/stubs/libcuda.so`: a library with the driver's symbols and
//! soname, linked against at build time and replaced by the real driver
//! where the binary runs. This module does the same for each library the
//! linker would not find. It reads the functions cudarc declares for it
//! (its `src/<module>/sys/mod.rs`), writes one C function per name, and
//! compiles them into `lib<name>.so` with the real library's soname. The
//! binary records that soname, so the real library is what loads where it
//! runs; the stub is never on a run-time path.
//!
//! Only the missing libraries are stubbed, so a machine with the toolkit
//! (or the driver) links against the real files exactly as before.
//! `scripts/cuda-build.sh`, which links nothing at build time (cudarc loads
//! every library with dlopen there), turns this off with
//! `TESSERA_CUDA_LINK_STUBS=off`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries candle's cudarc links: cudarc's module, the `-l` name, and
/// the soname, where `{major}` is the CUDA major version (the driver's is 1
/// whatever the toolkit; cuRAND's has been 10 since CUDA 10).
const LIBRARIES: &[(&str, &str, &str)] = &[
    ("driver", "cuda", "libcuda.so.1"),
    ("cublas", "cublas", "libcublas.so.{major}"),
    ("cublaslt", "cublasLt", "libcublasLt.so.{major}"),
    ("curand", "curand", "libcurand.so.10"),
    ("nvrtc", "nvrtc", "libnvrtc.so.{major}"),
];

/// The variables cudarc reads for the toolkit's root, in its order.
const CUDA_ROOT_VARS: &[&str] = &["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR"];

/// Writes stubs for the CUDA libraries the linker would not find and puts
/// their folder on the link path. Everything that goes wrong is a cargo
/// warning, not a failure: the link then fails as it would without this,
/// and the warning says why no stub helped.
pub fn emit(out_dir: &Path) {
    for var in ["TESSERA_CUDA_LINK_STUBS", "LIBRARY_PATH", "PATH"]
        .iter()
        .chain(CUDA_ROOT_VARS)
    {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var("TESSERA_CUDA_LINK_STUBS").is_ok_and(|v| v == "off") {
        return;
    }
    let missing: Vec<_> = LIBRARIES
        .iter()
        .filter(|(_, name, _)| find_library(name).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Some(major) = cuda_major() else {
        warn("no stubs for the CUDA libraries: `nvcc --version` did not run (put the CUDA compiler on PATH or set CUDA_HOME)");
        return;
    };
    let sources = match cudarc_sources() {
        Ok(dir) => dir,
        Err(e) => {
            warn(&format!(
                "no stubs for the CUDA libraries: cudarc's sources not found ({e})"
            ));
            return;
        }
    };
    let stubs = out_dir.join("cuda-stubs");
    if let Err(e) = std::fs::create_dir_all(&stubs) {
        warn(&format!(
            "no stubs for the CUDA libraries: creating {}: {e}",
            stubs.display()
        ));
        return;
    }
    let mut made = Vec::new();
    for (module, name, soname) in missing {
        let soname = soname.replace("{major}", &major.to_string());
        let declared = sources.join(module).join("sys").join("mod.rs");
        println!("cargo:rerun-if-changed={}", declared.display());
        match stub(&declared, &stubs, name, &soname) {
            Ok(()) => made.push(soname),
            Err(e) => warn(&format!("no stub for lib{name}.so: {e}")),
        }
    }
    if !made.is_empty() {
        println!("cargo:rustc-link-search=native={}", stubs.display());
        warn(&format!(
            "linked against stubs of {} (not found at build time): the binary needs the NVIDIA driver \
             and CUDA {major}'s libraries where it runs; `make cuda-dist` builds one that starts without them",
            made.join(", ")
        ));
    }
}

/// Where the linker would find `lib<name>.so`: the toolkit's folders as
/// cudarc lists them, `LIBRARY_PATH`, then the system's library folders.
fn find_library(name: &str) -> Option<PathBuf> {
    let file = format!("lib{name}.so");
    let mut roots: Vec<PathBuf> = CUDA_ROOT_VARS
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if roots.is_empty() {
        roots = ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda"]
            .iter()
            .map(PathBuf::from)
            .collect();
    }
    let under_roots = roots.iter().flat_map(|root| {
        [
            "lib",
            "lib/stubs",
            "lib64",
            "lib64/stubs",
            "targets/x86_64-linux/lib",
            "targets/x86_64-linux/lib/stubs",
        ]
        .iter()
        .map(move |sub| root.join(sub))
    });
    let library_path: Vec<PathBuf> = std::env::var_os("LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let system = [
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib",
    ]
    .iter()
    .map(PathBuf::from);
    under_roots
        .chain(library_path)
        .chain(system)
        .map(|dir| dir.join(&file))
        .find(|path| path.exists())
}

/// The CUDA major version of the compiler that builds candle's kernels.
fn cuda_major() -> Option<u32> {
    let nvcc = CUDA_ROOT_VARS
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let output = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "Cuda compilation tools, release 13.0, V13.0.88"
    let release = text.split("release ").nth(1)?;
    release.split('.').next()?.trim().parse().ok()
}

/// The `src` folder of the cudarc this workspace locks, from
/// `cargo metadata`.
fn cudarc_sources() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?)
        .join("Cargo.toml");
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--locked",
            "--features",
            "cuda",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .map_err(|e| format!("running cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("reading cargo metadata: {e}"))?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata lists no packages")?;
    let cudarc = packages
        .iter()
        .find(|p| p["name"] == "cudarc")
        .ok_or("cudarc is not in the dependency graph")?;
    let path = cudarc["manifest_path"].as_str().ok_or("cudarc has no manifest_path")?;
    Ok(Path::new(path).with_file_name("src"))
}

/// Compiles `lib<name>.so` (soname `soname`) with one function for each
/// `pub unsafe fn` cudarc declares in `declared`. Each returns 34, the
/// driver's CUDA_ERROR_STUB_LIBRARY, should a stub ever be called.
fn stub(declared: &Path, dir: &Path, name: &str, soname: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(declared).map_err(|e| format!("reading {}: {e}", declared.display()))?;
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(format!("{} declares no functions", declared.display()));
    }
    let mut c = format!("/* Link stub for {soname}, written by host/build_cuda_stubs.rs. */\n");
    for n in &names {
        c.push_str(&format!("int {n}(void) {{ return 34; }}\n"));
    }
    let source = dir.join(format!("{name}.c"));
    std::fs::write(&source, c).map_err(|e| format!("writing {}: {e}", source.display()))?;
    let compiler = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(compiler)
        .args(["-shared", "-fPIC", "-w", "-o"])
        .arg(dir.join(format!("lib{name}.so")))
        .arg(format!("-Wl,-soname,{soname}"))
        .arg(&source)
        .status()
        .map_err(|e| format!("running the C compiler: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("compiling {} failed", source.display()))
    }
}

fn warn(message: &str) {
    println!("cargo:warning={message}");
}

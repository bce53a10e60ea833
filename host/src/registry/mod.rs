//! The module registry: strategies that strangers publish to a running
//! service, and the tenants allowed to call it.
//!
//! Layout under one directory (by default `$TESSERA_HOME/registry`):
//!
//! - `registry.sqlite`: module metadata, tenants (API keys hashed) and
//!   daily token usage, in one SQLite database (WAL journal).
//! - `blobs/<sha256>.wasm`: the published components, content-addressed.
//! - `trusted-keys/*.pub`: the operator's trusted publisher keys
//!   ([`signing`]).
//!
//! A deployment of many nodes names a PostgreSQL database instead
//! ([`Registry::connect`] with a `postgres://` URL; see [`store`]): the
//! rows *and the components* live there, the directory keeps only each
//! node's cache of components (fetched once, checked against their
//! sha256 before they run) and its trusted keys.
//!
//! # Crash safety
//!
//! The database row is the commit point. A publish writes the component to
//! a temporary file, fsyncs it, validates and precompiles it, renames it to
//! its content address and fsyncs the directory, and only then inserts (or
//! replaces) the row in one transaction. A process killed at any moment
//! leaves the registry showing either the old module or the new one: a
//! blob without a row is invisible and is swept by the next
//! [`Registry::open`], as are temporary files. A removal deletes the row
//! first and the blob after, with the same sweep behind it.

pub mod publish;
pub mod signing;
pub mod store;
pub mod tenants;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::policy::{Manifest, World};
use crate::sandbox::{Module, Sandbox};
use crate::Error;
use store::{Gates, MemoryGates, ModuleRow, Store};

/// One published module, as `tessera modules list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// The name requests use (`model` in the API).
    pub name: String,
    /// sha256 of the component.
    pub sha256: String,
    /// The manifest's world.
    pub world: World,
    /// The manifest's version.
    pub version: String,
    /// The manifest's author.
    pub author: String,
    /// The manifest's description.
    pub description: String,
    /// Size of the component in bytes.
    pub size: u64,
    /// Hex public key of the trusted publisher whose signature verified,
    /// if the module was signed.
    pub publisher_key: Option<String>,
    /// Unix seconds of the publish.
    pub published_at: i64,
    /// The manifest as published (TOML).
    #[serde(skip)]
    pub manifest_toml: String,
}

impl Entry {
    /// The manifest as published, parsed (it was checked at publish, so
    /// `None` means a registry written by something else).
    pub fn manifest(&self) -> Option<crate::policy::Manifest> {
        toml::from_str(&self.manifest_toml).ok()
    }
}

/// What to publish.
pub struct Publication<'a> {
    /// The component's bytes.
    pub wasm: &'a [u8],
    /// Its manifest (TOML); its `name` is the name the module is served by.
    pub manifest_toml: &'a str,
    /// A detached ed25519 signature over `wasm` and `manifest_toml`
    /// ([`signing::signed_message`]), if the publisher signed.
    pub signature: Option<&'a [u8]>,
}

/// The registry: a store of rows (SQLite or PostgreSQL) plus a blob
/// directory.
pub struct Registry {
    dir: PathBuf,
    store: Arc<dyn Store>,
    gates: Arc<dyn Gates>,
}

fn io_err(what: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("registry: {}: {e}", what.display()))
}

pub(crate) use crate::policy::is_plain_name;

/// Module names are URL path segments and file-name-like: keep them plain.
fn check_name(name: &str) -> Result<(), Error> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(Error::config(format!(
            "module name `{name}` is not allowed: use 1-64 characters of a-z, 0-9, `-`, `_`, `.` (set `name` in the manifest)"
        )))
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Registry {
    /// Opens (creating if needed) the one-box registry in `dir` (SQLite),
    /// and sweeps what an interrupted publish or removal left behind.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
        let store = store::sqlite::SqliteStore::open(&dir.join("registry.sqlite"))?;
        Self::over(dir, Arc::new(store), Arc::new(MemoryGates::default()))
    }

    /// Opens the registry that `location` names: a `postgres://` or
    /// `postgresql://` URL (shared by many nodes; `cache_dir` then holds
    /// this node's component cache and trusted keys), or a directory.
    pub fn connect(location: &str, cache_dir: &Path) -> Result<Self, Error> {
        if is_database_url(location) {
            let blobs = cache_dir.join("blobs");
            std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
            let pg = Arc::new(store::postgres::PostgresStore::open(location)?);
            Self::over(cache_dir, pg.clone(), pg)
        } else {
            Self::open(Path::new(location))
        }
    }

    fn over(dir: &Path, store: Arc<dyn Store>, gates: Arc<dyn Gates>) -> Result<Self, Error> {
        let reg = Registry {
            dir: dir.to_path_buf(),
            store,
            gates,
        };
        reg.sweep()?;
        Ok(reg)
    }

    /// Where its rows live, for logs (`SQLite at ...`, `PostgreSQL at
    /// user@host:port/db`).
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Rolling-minute counts and quarantine records, kept where every node
    /// serving this registry sees them.
    pub fn gates(&self) -> Arc<dyn Gates> {
        self.gates.clone()
    }

    /// The directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the component with this sha256 is stored.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha256}.wasm"))
    }

    /// Deletes what interrupted publishes and removals left: temporary
    /// files of processes that are gone, and blobs no row refers to that
    /// are old enough not to belong to a publish still in progress in
    /// another process (which renames its blob a moment before its commit).
    fn sweep(&self) -> Result<(), Error> {
        let live: std::collections::HashSet<String> = self.store.modules()?.into_iter().map(|m| m.sha256).collect();
        let blobs = self.dir.join("blobs");
        for entry in std::fs::read_dir(&blobs).map_err(|e| io_err(&blobs, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let stale = match name.strip_prefix("tmp-") {
                // tmp-<pid>-<random>.wasm: stale once its writer is gone.
                Some(rest) => rest
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
                None => {
                    let orphan = !name.strip_suffix(".wasm").is_some_and(|sha| live.contains(sha));
                    let age = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default();
                    orphan && age > std::time::Duration::from_secs(60)
                }
            };
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Validates, precompiles and stores a module, replacing any module of
    /// the same name. `sandbox` checks that it is a component of the world
    /// its manifest declares and caches its compiled form; `trusted` decides
    /// whether a signature is needed and which keys may make it.
    pub fn publish(
        &self,
        sandbox: &Sandbox,
        trusted: &signing::TrustedKeys,
        p: Publication<'_>,
    ) -> Result<Entry, Error> {
        let manifest: Manifest = toml::from_str(p.manifest_toml).map_err(|e| {
            Error::config(format!(
                "module manifest: {e} (see modules/*/manifest.toml for examples)"
            ))
        })?;
        check_name(&manifest.name)?;
        let publisher_key = trusted.check(p.wasm, p.manifest_toml, p.signature)?;
        let sha256 = hex::encode(Sha256::digest(p.wasm));

        // 1. The bytes, durable under a temporary name.
        let blobs = self.dir.join("blobs");
        let tmp = blobs.join(format!("tmp-{}-{}.wasm", std::process::id(), rand::random::<u64>()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(p.wasm)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&tmp, e));
        }
        // 2. Validation and precompilation (the compiled form is cached by
        // the sandbox under the sha256, so serving it later is fast).
        if let Err(e) = sandbox.load(&tmp, manifest.clone()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // 3. The content address, and the directory entry made durable.
        let dest = self.blob_path(&sha256);
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&dest, e));
        }
        if let Ok(d) = std::fs::File::open(&blobs) {
            let _ = d.sync_all();
        }
        // 4. The commit point (with a shared store, the bytes go into the
        // same transaction: no node can see the row without them).
        let row = ModuleRow {
            name: manifest.name.clone(),
            sha256: sha256.clone(),
            world: manifest.world.name().to_string(),
            manifest: p.manifest_toml.to_string(),
            size: p.wasm.len() as i64,
            publisher_key,
            published_at: now_unix(),
        };
        let old = self.store.put_module(&row, p.wasm)?;
        if let Some(old) = old.filter(|o| *o != sha256) {
            self.drop_blob_if_unused(&old)?;
        }
        Self::entry(row).map_err(Error::internal)
    }

    fn drop_blob_if_unused(&self, sha256: &str) -> Result<(), Error> {
        if !self.store.sha_in_use(sha256)? {
            let _ = std::fs::remove_file(self.blob_path(sha256));
        }
        Ok(())
    }

    fn entry(row: ModuleRow) -> Result<Entry, String> {
        let manifest: Option<Manifest> = toml::from_str(&row.manifest).ok();
        let world = row
            .world
            .parse()
            .map_err(|e: crate::policy::UnknownWorld| format!("registry: module `{}`: {e}", row.name))?;
        Ok(Entry {
            world,
            version: manifest.as_ref().map(|m| m.version.clone()).unwrap_or_default(),
            author: manifest.as_ref().map(|m| m.author.clone()).unwrap_or_default(),
            description: manifest.as_ref().map(|m| m.description.clone()).unwrap_or_default(),
            size: row.size.max(0) as u64,
            name: row.name,
            sha256: row.sha256,
            publisher_key: row.publisher_key,
            published_at: row.published_at,
            manifest_toml: row.manifest,
        })
    }

    /// Every published module, by name.
    pub fn list(&self) -> Result<Vec<Entry>, Error> {
        self.store
            .modules()?
            .into_iter()
            .map(|r| Self::entry(r).map_err(Error::internal))
            .collect()
    }

    /// One module by name.
    pub fn get(&self, name: &str) -> Result<Option<Entry>, Error> {
        self.store
            .module(name)?
            .map(|r| Self::entry(r).map_err(Error::internal))
            .transpose()
    }

    /// Removes a module; `false` if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, Error> {
        match self.store.remove_module(name)? {
            Some(sha) => {
                self.drop_blob_if_unused(&sha)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Makes sure the component `sha256` is in the local blob directory,
    /// fetching it from a store that keeps components (another node
    /// published it). Written under a temporary name and renamed, so a
    /// half-written file is never taken for the component.
    fn ensure_blob(&self, entry: &Entry) -> Result<(), Error> {
        let dest = self.blob_path(&entry.sha256);
        if dest.exists() || !self.store.keeps_blobs() {
            return Ok(());
        }
        let bytes = self.store.blob(&entry.sha256)?.ok_or_else(|| {
            Error::internal(format!(
                "registry: the component of `{}` ({}) is missing from {}: publish it again",
                entry.name,
                entry.sha256,
                self.store.describe()
            ))
        })?;
        let tmp = self
            .dir
            .join("blobs")
            .join(format!("tmp-{}-{}.wasm", std::process::id(), rand::random::<u64>()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&dest, e));
        }
        Ok(())
    }

    /// Loads a published module into `sandbox` (from the compiled cache
    /// when it is there). The stored blob is checked against its sha256, so
    /// a blob changed on disk is refused rather than run.
    pub fn load(&self, sandbox: &Sandbox, entry: &Entry) -> Result<Module, Error> {
        let manifest: Manifest = toml::from_str(&entry.manifest_toml)
            .map_err(|e| Error::config(format!("registry: manifest of `{}`: {e}", entry.name)))?;
        self.ensure_blob(entry)?;
        let module = sandbox.load(&self.blob_path(&entry.sha256), manifest)?;
        if module.sha256 != entry.sha256 {
            return Err(Error::InvalidModule {
                path: self.blob_path(&entry.sha256).display().to_string(),
                message: format!(
                    "the stored component does not match its sha256 {}: publish `{}` again",
                    entry.sha256, entry.name
                ),
            });
        }
        Ok(module)
    }
}

/// Whether a `--registry` value names a database rather than a directory.
pub fn is_database_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_are_plain() {
        assert!(check_name("majority-vote").is_ok());
        assert!(check_name("my_router.v2").is_ok());
        for bad in ["", "../x", "A", ".hidden", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}

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
pub mod tenants;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::policy::{Manifest, World};
use crate::sandbox::{Module, Sandbox};
use crate::Error;

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

/// The registry: a SQLite database plus a blob directory.
pub struct Registry {
    dir: PathBuf,
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::internal(format!("registry database: {e}"))
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
    /// Opens (creating if needed) the registry in `dir`, and sweeps what an
    /// interrupted publish or removal left behind.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
        let conn = Connection::open(dir.join("registry.sqlite")).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS modules (
                name TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL,
                world TEXT NOT NULL,
                manifest TEXT NOT NULL,
                size INTEGER NOT NULL,
                publisher_key TEXT,
                published_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS tenants (
                name TEXT PRIMARY KEY,
                key_sha256 TEXT NOT NULL UNIQUE,
                policy TEXT NOT NULL,
                created_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS usage (
                tenant TEXT NOT NULL,
                day INTEGER NOT NULL,
                tokens INTEGER NOT NULL,
                PRIMARY KEY (tenant, day)
            );",
        )
        .map_err(db_err)?;
        let reg = Registry {
            dir: dir.to_path_buf(),
            conn: Mutex::new(conn),
        };
        reg.sweep()?;
        Ok(reg)
    }

    /// The directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
        let live: std::collections::HashSet<String> = {
            let conn = self.conn();
            let mut st = conn.prepare("SELECT sha256 FROM modules").map_err(db_err)?;
            let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)?
        };
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
        // 4. The commit point.
        let entry = Entry {
            name: manifest.name.clone(),
            sha256: sha256.clone(),
            world: manifest.world,
            version: manifest.version.clone(),
            author: manifest.author.clone(),
            description: manifest.description.clone(),
            size: p.wasm.len() as u64,
            publisher_key,
            published_at: now_unix(),
            manifest_toml: p.manifest_toml.to_string(),
        };
        let old = {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(db_err)?;
            let old: Option<String> = tx
                .query_row("SELECT sha256 FROM modules WHERE name = ?1", [&entry.name], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db_err)?;
            tx.execute(
                "INSERT OR REPLACE INTO modules (name, sha256, world, manifest, size, publisher_key, published_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    entry.name,
                    entry.sha256,
                    entry.world.name(),
                    entry.manifest_toml,
                    entry.size as i64,
                    entry.publisher_key,
                    entry.published_at
                ],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            old
        };
        if let Some(old) = old.filter(|o| *o != sha256) {
            self.drop_blob_if_unused(&old)?;
        }
        Ok(entry)
    }

    fn drop_blob_if_unused(&self, sha256: &str) -> Result<(), Error> {
        let used: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM modules WHERE sha256 = ?1", [sha256], |r| r.get(0))
            .map_err(db_err)?;
        if used == 0 {
            let _ = std::fs::remove_file(self.blob_path(sha256));
        }
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
        let manifest_toml: String = r.get(3)?;
        let manifest: Option<Manifest> = toml::from_str(&manifest_toml).ok();
        Ok(Entry {
            name: r.get(0)?,
            sha256: r.get(1)?,
            world: r
                .get::<_, String>(2)?
                .parse()
                .map_err(|e: crate::policy::UnknownWorld| {
                    rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
                })?,
            version: manifest.as_ref().map(|m| m.version.clone()).unwrap_or_default(),
            author: manifest.as_ref().map(|m| m.author.clone()).unwrap_or_default(),
            description: manifest.as_ref().map(|m| m.description.clone()).unwrap_or_default(),
            size: r.get::<_, i64>(4)? as u64,
            publisher_key: r.get(5)?,
            published_at: r.get(6)?,
            manifest_toml,
        })
    }

    /// Every published module, by name.
    pub fn list(&self) -> Result<Vec<Entry>, Error> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT name, sha256, world, manifest, size, publisher_key, published_at FROM modules ORDER BY name",
            )
            .map_err(db_err)?;
        let rows = st.query_map([], Self::row).map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    /// One module by name.
    pub fn get(&self, name: &str) -> Result<Option<Entry>, Error> {
        self.conn()
            .query_row(
                "SELECT name, sha256, world, manifest, size, publisher_key, published_at FROM modules WHERE name = ?1",
                [name],
                Self::row,
            )
            .optional()
            .map_err(db_err)
    }

    /// Removes a module; `false` if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, Error> {
        let Some(entry) = self.get(name)? else {
            return Ok(false);
        };
        self.conn()
            .execute("DELETE FROM modules WHERE name = ?1", [name])
            .map_err(db_err)?;
        self.drop_blob_if_unused(&entry.sha256)?;
        Ok(true)
    }

    /// Loads a published module into `sandbox` (from the compiled cache
    /// when it is there). The stored blob is checked against its sha256, so
    /// a blob changed on disk is refused rather than run.
    pub fn load(&self, sandbox: &Sandbox, entry: &Entry) -> Result<Module, Error> {
        let manifest: Manifest = toml::from_str(&entry.manifest_toml)
            .map_err(|e| Error::config(format!("registry: manifest of `{}`: {e}", entry.name)))?;
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

    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, Error> {
        f(&self.conn()).map_err(db_err)
    }
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

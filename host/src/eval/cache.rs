//! The content-addressed result cache of `tessera eval` (SQLite).
//!
//! Every answer the harness obtains is stored under the sha256 of everything
//! that determines it: who answered (a member id, or a module's sha256 with
//! its config and its fit state), the exact input, the decoding parameters
//! and the seed. A re-run with the same inputs reads instead of computing,
//! and an interrupted run resumes where it stopped because each answer is
//! committed as soon as it exists. Values are JSON.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};

/// A cache file, safe to share between the harness's concurrent tasks.
pub struct Cache {
    conn: Option<Mutex<Connection>>,
    path: PathBuf,
}

/// Why the cache cannot be opened or written: a fault of the machine (the
/// directory, the disk, the database file), never of the evaluation asked.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache's directory cannot be created.
    #[error("eval cache {}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused to open, set up or write the file.
    #[error("eval cache {}: {source}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The value cannot be encoded as JSON.
    #[error("eval cache: the value cannot be stored: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The key of a value: sha256 of the JSON of `parts`.
pub fn key<T: Serialize>(parts: &T) -> String {
    let json = serde_json::to_vec(parts).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

impl Cache {
    /// Opens (creating if needed) the cache at `path`.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let db = |source| CacheError::Database {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CacheError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(db)?;
        // WAL: readers never block the writer, and a crash mid-write loses at
        // most the answer being written.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(db)?;
        Ok(Cache {
            conn: Some(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    /// A cache that stores nothing (`--no-cache`).
    pub fn disabled() -> Self {
        Cache {
            conn: None,
            path: PathBuf::new(),
        }
    }

    /// The value under `key`, if any (and if it still decodes).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let conn = self.conn.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        let text: Option<String> = conn
            .query_row("SELECT value FROM results WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .ok()
            .flatten();
        text.and_then(|t| serde_json::from_str(&t).ok())
    }

    /// Stores `value` under `key` (replacing any older one).
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), CacheError> {
        let Some(conn) = &self.conn else { return Ok(()) };
        let text = serde_json::to_string(value).map_err(CacheError::Encode)?;
        let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT OR REPLACE INTO results (key, value) VALUES (?1, ?2)",
            params![key, text],
        )
        .map_err(|source| CacheError::Database {
            path: self.path.clone(),
            source,
        })?;
        Ok(())
    }
}

/// The cache as the call memo's [`CallStore`](crate::inference::memo::CallStore):
/// members' `score` results and deterministic generations are kept beside
/// the answers, so a resumed evaluation's strategies reuse what an
/// interrupted run computed. Only members whose weights are pinned by a
/// digest are kept ([`crate::Runtime::fingerprint`]), under that digest: a
/// member retrained under the same id starts afresh.
pub struct PersistedCalls {
    cache: std::sync::Arc<Cache>,
    fingerprints: std::collections::HashMap<String, String>,
}

impl PersistedCalls {
    /// Keeps the results of the members `fingerprints` names (id -> what
    /// pins its weights) in `cache`.
    pub fn new(cache: std::sync::Arc<Cache>, fingerprints: std::collections::HashMap<String, String>) -> Self {
        PersistedCalls { cache, fingerprints }
    }

    fn key(&self, kind: &str, model: &str, call: &str) -> Option<String> {
        let pinned = self.fingerprints.get(model)?;
        Some(key(&(kind, model, pinned, call)))
    }

    fn keep<T: Serialize>(&self, kind: &str, model: &str, call: &str, value: &T) {
        if let Some(k) = self.key(kind, model, call) {
            if let Err(e) = self.cache.put(&k, value) {
                tracing::warn!("{e}");
            }
        }
    }
}

impl crate::inference::memo::CallStore for PersistedCalls {
    fn load(&self, model: &str, call: &str) -> Option<Vec<crate::inference::Scored>> {
        self.cache.get(&self.key("score/1", model, call)?)
    }

    fn save(&self, model: &str, call: &str, scores: &[crate::inference::Scored]) {
        self.keep("score/1", model, call, &scores);
    }

    fn load_generation(&self, model: &str, call: &str) -> Option<crate::inference::Generation> {
        self.cache.get(&self.key("generate/1", model, call)?)
    }

    fn save_generation(&self, model: &str, call: &str, generation: &crate::inference::Generation) {
        self.keep("generate/1", model, call, generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopening_and_disabled_stores_nothing() {
        let dir = std::env::temp_dir().join(format!("tessera-cache-test-{}", std::process::id()));
        let path = dir.join("c.sqlite");
        let k = key(&("member", "m1", "prompt", 7u64));
        {
            let c = Cache::open(&path).unwrap();
            assert_eq!(c.get::<String>(&k), None);
            c.put(&k, &"answer".to_string()).unwrap();
        }
        let c = Cache::open(&path).unwrap();
        assert_eq!(c.get::<String>(&k).as_deref(), Some("answer"));
        assert_ne!(k, key(&("member", "m1", "prompt", 8u64)));
        let d = Cache::disabled();
        d.put(&k, &"x".to_string()).unwrap();
        assert_eq!(d.get::<String>(&k), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}

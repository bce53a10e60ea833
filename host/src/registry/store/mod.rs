//! Where the registry keeps its state: one SQLite file for one box, or a
//! PostgreSQL database shared by many nodes.
//!
//! The [`Registry`](super::Registry) owns the rules (names, signatures,
//! the publish protocol, the blob cache); a [`Store`] only keeps rows. Two
//! kinds of state live here:
//!
//! - **Durable rows**: modules, tenants (key hashes), daily token usage;
//!   and, for PostgreSQL, the components themselves, because a node must be
//!   able to serve a module that another node accepted.
//! - **Gates** ([`Gates`]): the requests of each tenant in the rolling
//!   minute and the quarantine records of modules that keep failing. One
//!   box keeps them in memory ([`MemoryGates`]): they are about the last
//!   minutes, and a restart forgetting them is harmless. Many nodes must
//!   agree on them, or a tenant's per-minute quota would be multiplied by
//!   the number of nodes and a quarantined module would run on the others,
//!   so PostgreSQL keeps them in tables, timed by the database's clock so
//!   that nodes with skewed clocks still agree.

pub mod postgres;
pub mod sqlite;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::Error;

/// One module row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleRow {
    /// Its name.
    pub name: String,
    /// sha256 of the component.
    pub sha256: String,
    /// The manifest's world, by name.
    pub world: String,
    /// The manifest (TOML).
    pub manifest: String,
    /// Size of the component in bytes.
    pub size: i64,
    /// The publisher key whose signature verified, if any.
    pub publisher_key: Option<String>,
    /// Unix seconds of the publish.
    pub published_at: i64,
}

/// One tenant row as stored: its name and its policy (JSON).
pub type TenantRow = (String, String);

/// A quarantine record (see `server::breaker`): consecutive faults, how
/// many quarantines so far, and until when (Unix milliseconds, 0 = not
/// quarantined).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuarantineRecord {
    /// Faults in a row since the last quarantine or success.
    pub consecutive: u32,
    /// Quarantines so far (each doubles the next).
    pub strikes: u32,
    /// End of the current quarantine, Unix ms; 0 when none was imposed.
    pub until_ms: i64,
}

/// How a quarantine record changes, given the record (if any) and the
/// store's clock (Unix ms): the breaker's rule, run where the record is
/// locked. `None` removes the record.
pub type QuarantineUpdate = Box<dyn FnOnce(Option<QuarantineRecord>, i64) -> Option<QuarantineRecord> + Send>;

/// Rolling-minute request counts and quarantine records: state that every
/// node serving the same tenants must agree on.
pub trait Gates: Send + Sync {
    /// Counts one request of `tenant` if fewer than `limit` were counted in
    /// the last `window_ms`; otherwise counts nothing and returns the
    /// milliseconds until the oldest of them leaves the window.
    fn take_request(&self, tenant: &str, limit: u32, window_ms: i64) -> Result<Option<i64>, Error>;
    /// Milliseconds of quarantine left for `key`, if it is quarantined.
    fn quarantine_left(&self, key: &str) -> Result<Option<i64>, Error>;
    /// Changes `key`'s record atomically (no other node sees it half-done).
    fn update_quarantine(&self, key: &str, update: QuarantineUpdate) -> Result<(), Error>;
    /// Forgets `key`'s record (a success).
    fn clear_quarantine(&self, key: &str) -> Result<(), Error>;
    /// Every key quarantined now, with the milliseconds left.
    fn quarantined(&self) -> Result<Vec<(String, i64)>, Error>;
}

/// The rows: modules, their components where the store keeps them,
/// tenants and usage.
pub trait Store: Send + Sync {
    /// What it is, for logs and errors (never includes a password).
    fn describe(&self) -> String;
    /// Whether components are kept in the store (shared by nodes) rather
    /// than only in the local blob directory.
    fn keeps_blobs(&self) -> bool;
    /// Every module, by name.
    fn modules(&self) -> Result<Vec<ModuleRow>, Error>;
    /// One module.
    fn module(&self, name: &str) -> Result<Option<ModuleRow>, Error>;
    /// Inserts or replaces a module (with its component where
    /// [`keeps_blobs`](Self::keeps_blobs)) in one transaction: the commit
    /// point of a publish. Returns the sha256 the name had before.
    fn put_module(&self, row: &ModuleRow, wasm: &[u8]) -> Result<Option<String>, Error>;
    /// Removes a module; returns the sha256 it had, `None` if none.
    fn remove_module(&self, name: &str) -> Result<Option<String>, Error>;
    /// Whether any module uses the component `sha256`.
    fn sha_in_use(&self, sha256: &str) -> Result<bool, Error>;
    /// The component `sha256`, where the store keeps components.
    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Inserts a tenant; `false` if the name is taken.
    fn add_tenant(&self, name: &str, key_sha256: &str, policy_json: &str, created_at: i64) -> Result<bool, Error>;
    /// Every tenant, by name.
    fn tenants(&self) -> Result<Vec<TenantRow>, Error>;
    /// The tenant with this key hash.
    fn tenant_by_key_hash(&self, key_sha256: &str) -> Result<Option<TenantRow>, Error>;
    /// Removes a tenant; `false` if none.
    fn remove_tenant(&self, name: &str) -> Result<bool, Error>;
    /// How many tenants exist.
    fn tenant_count(&self) -> Result<i64, Error>;
    /// Tokens `tenant` used on UTC day `day`.
    fn tokens_used(&self, tenant: &str, day: i64) -> Result<u64, Error>;
    /// Adds to `tenant`'s count for `day`.
    fn add_tokens(&self, tenant: &str, day: i64, tokens: u64) -> Result<(), Error>;
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// [`Gates`] of one process.
#[derive(Default)]
pub struct MemoryGates {
    recent: Mutex<HashMap<String, VecDeque<i64>>>,
    quarantine: Mutex<HashMap<String, QuarantineRecord>>,
}

impl Gates for MemoryGates {
    fn take_request(&self, tenant: &str, limit: u32, window_ms: i64) -> Result<Option<i64>, Error> {
        let now = now_ms();
        let mut all = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let recent = all.entry(tenant.to_string()).or_default();
        while recent.front().is_some_and(|t| now - *t >= window_ms) {
            recent.pop_front();
        }
        if recent.len() >= limit as usize {
            let oldest = recent.front().copied().unwrap_or(now);
            return Ok(Some((window_ms - (now - oldest)).max(1)));
        }
        recent.push_back(now);
        Ok(None)
    }

    fn quarantine_left(&self, key: &str) -> Result<Option<i64>, Error> {
        let now = now_ms();
        let q = self.quarantine.lock().unwrap_or_else(|e| e.into_inner());
        Ok(q.get(key).map(|r| r.until_ms - now).filter(|left| *left > 0))
    }

    fn update_quarantine(&self, key: &str, update: QuarantineUpdate) -> Result<(), Error> {
        let mut q = self.quarantine.lock().unwrap_or_else(|e| e.into_inner());
        match update(q.get(key).copied(), now_ms()) {
            Some(r) => q.insert(key.to_string(), r),
            None => q.remove(key),
        };
        Ok(())
    }

    fn clear_quarantine(&self, key: &str) -> Result<(), Error> {
        self.quarantine.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        Ok(())
    }

    fn quarantined(&self) -> Result<Vec<(String, i64)>, Error> {
        let now = now_ms();
        let q = self.quarantine.lock().unwrap_or_else(|e| e.into_inner());
        Ok(q.iter()
            .filter(|(_, r)| r.until_ms > now)
            .map(|(k, r)| (k.clone(), r.until_ms - now))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rolling_window_counts_and_says_when_to_come_back() {
        let g = MemoryGates::default();
        assert_eq!(g.take_request("a", 2, 60_000).unwrap(), None);
        assert_eq!(g.take_request("a", 2, 60_000).unwrap(), None);
        let wait = g.take_request("a", 2, 60_000).unwrap().expect("over the limit");
        assert!(wait > 59_000 && wait <= 60_000, "{wait}");
        // Another tenant has its own window; a short window empties.
        assert_eq!(g.take_request("b", 2, 60_000).unwrap(), None);
        assert_eq!(g.take_request("c", 1, 1).unwrap(), None);
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert_eq!(g.take_request("c", 1, 1).unwrap(), None);
    }

    #[test]
    fn quarantine_records_update_and_clear() {
        let g = MemoryGates::default();
        g.update_quarantine(
            "t/x",
            Box::new(|old, now| {
                assert!(old.is_none());
                Some(QuarantineRecord {
                    consecutive: 0,
                    strikes: 1,
                    until_ms: now + 5_000,
                })
            }),
        )
        .unwrap();
        let left = g.quarantine_left("t/x").unwrap().expect("quarantined");
        assert!(left > 4_000 && left <= 5_000);
        assert_eq!(g.quarantined().unwrap().len(), 1);
        g.clear_quarantine("t/x").unwrap();
        assert_eq!(g.quarantine_left("t/x").unwrap(), None);
    }
}

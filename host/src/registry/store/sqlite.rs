//! The one-box store: a SQLite file (WAL journal, full sync) beside the
//! blob directory, which holds the components.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{ModuleRow, Store, TenantRow};
use crate::Error;

fn db_err(e: rusqlite::Error) -> Error {
    Error::internal(format!("registry database: {e}"))
}

/// A SQLite registry database.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const MODULE_COLUMNS: &str = "name, sha256, world, manifest, size, publisher_key, published_at";

fn module_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModuleRow> {
    Ok(ModuleRow {
        name: r.get(0)?,
        sha256: r.get(1)?,
        world: r.get(2)?,
        manifest: r.get(3)?,
        size: r.get(4)?,
        publisher_key: r.get(5)?,
        published_at: r.get(6)?,
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = Connection::open(path).map_err(db_err)?;
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
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, Error> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(db_err)
    }
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("SQLite at {}", self.path.display())
    }

    fn keeps_blobs(&self) -> bool {
        false
    }

    fn modules(&self) -> Result<Vec<ModuleRow>, Error> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {MODULE_COLUMNS} FROM modules ORDER BY name"))?;
            let rows = st.query_map([], module_row)?;
            rows.collect()
        })
    }

    fn module(&self, name: &str) -> Result<Option<ModuleRow>, Error> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {MODULE_COLUMNS} FROM modules WHERE name = ?1"),
                [name],
                module_row,
            )
            .optional()
        })
    }

    fn put_module(&self, row: &ModuleRow, _wasm: &[u8]) -> Result<Option<String>, Error> {
        self.with(|c| {
            let tx = c.transaction()?;
            let old: Option<String> = tx
                .query_row("SELECT sha256 FROM modules WHERE name = ?1", [&row.name], |r| r.get(0))
                .optional()?;
            tx.execute(
                &format!("INSERT OR REPLACE INTO modules ({MODULE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    row.name,
                    row.sha256,
                    row.world,
                    row.manifest,
                    row.size,
                    row.publisher_key,
                    row.published_at
                ],
            )?;
            tx.commit()?;
            Ok(old)
        })
    }

    fn remove_module(&self, name: &str) -> Result<Option<String>, Error> {
        self.with(|c| {
            let tx = c.transaction()?;
            let old: Option<String> = tx
                .query_row("SELECT sha256 FROM modules WHERE name = ?1", [name], |r| r.get(0))
                .optional()?;
            tx.execute("DELETE FROM modules WHERE name = ?1", [name])?;
            tx.commit()?;
            Ok(old)
        })
    }

    fn sha_in_use(&self, sha256: &str) -> Result<bool, Error> {
        let n: i64 =
            self.with(|c| c.query_row("SELECT COUNT(*) FROM modules WHERE sha256 = ?1", [sha256], |r| r.get(0)))?;
        Ok(n > 0)
    }

    fn blob(&self, _sha256: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(None)
    }

    fn add_tenant(&self, name: &str, key_sha256: &str, policy_json: &str, created_at: i64) -> Result<bool, Error> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO tenants (name, key_sha256, policy, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, key_sha256, policy_json, created_at],
            )
        })?;
        Ok(n > 0)
    }

    fn tenants(&self) -> Result<Vec<TenantRow>, Error> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, policy FROM tenants ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn tenant_by_key_hash(&self, key_sha256: &str) -> Result<Option<TenantRow>, Error> {
        self.with(|c| {
            c.query_row(
                "SELECT name, policy FROM tenants WHERE key_sha256 = ?1",
                [key_sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    fn remove_tenant(&self, name: &str) -> Result<bool, Error> {
        Ok(self.with(|c| c.execute("DELETE FROM tenants WHERE name = ?1", [name]))? > 0)
    }

    fn tenant_count(&self) -> Result<i64, Error> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0)))
    }

    fn tokens_used(&self, tenant: &str, day: i64) -> Result<u64, Error> {
        let n: Option<i64> = self.with(|c| {
            c.query_row(
                "SELECT tokens FROM usage WHERE tenant = ?1 AND day = ?2",
                params![tenant, day],
                |r| r.get(0),
            )
            .optional()
        })?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    fn add_tokens(&self, tenant: &str, day: i64, tokens: u64) -> Result<(), Error> {
        self.with(|c| {
            c.execute(
                "INSERT INTO usage (tenant, day, tokens) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tenant, day) DO UPDATE SET tokens = tokens + excluded.tokens",
                params![tenant, day, tokens.min(i64::MAX as u64) as i64],
            )
        })?;
        Ok(())
    }
}

//! The many-node store: a PostgreSQL database that every Tessera node of a
//! deployment opens (`--registry postgres://user@host:port/db`).
//!
//! Nodes are otherwise stateless, so everything two nodes must agree on is
//! here: modules *and their components* (a node serves a module another
//! node accepted by fetching its bytes once into its local blob cache),
//! tenants, daily usage, each tenant's requests in the rolling minute, and
//! quarantine records. Times that gates compare are read from the
//! database's clock (`clock_timestamp()`), so skewed node clocks cannot
//! widen a quota.
//!
//! # Why threads of our own
//!
//! The `postgres` crate is a blocking wrapper that drives an async client
//! on a runtime of its own, and it refuses to block inside the server's
//! tokio runtime. The registry's API is blocking (as SQLite's is), so the
//! store runs a few threads, each with one connection, and hands them
//! closures over a channel. A connection that breaks (the database
//! restarted, a network cut) is dropped and the next job on that thread
//! connects again: the request that met the break fails with a 500, the
//! next ones succeed.
//!
//! # Atomicity
//!
//! A publish is one transaction that inserts the component (if new),
//! replaces the module row and deletes the replaced component if nothing
//! else uses it: a node killed at any point leaves the old module or the
//! new one, never a row without its bytes. Read-modify-write gates (the
//! rolling window, quarantine records) take a transaction-scoped advisory
//! lock on their key, so two nodes counting the same tenant serialise.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use postgres::{Client, NoTls};

use super::{Gates, ModuleRow, QuarantineRecord, QuarantineUpdate, Store, TenantRow};
use crate::Error;

/// Connections (and threads) per node: enough for the registry's short
/// statements under a server's default of 4 requests in flight.
const CONNECTIONS: usize = 4;
/// Longest a caller waits for the database.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

struct Conn {
    config: postgres::Config,
    client: Option<Client>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let mut c = self.config.connect(NoTls)?;
                // A statement that hangs (a lock held by a stuck node) must
                // not hold a request forever.
                c.batch_execute("SET statement_timeout = '20s'; SET lock_timeout = '10s'")?;
                c
            }
        };
        Ok(self.client.insert(client))
    }
}

/// A PostgreSQL registry database.
pub struct PostgresStore {
    jobs: mpsc::Sender<Job>,
    location: String,
}

/// `user@host:port/db` of a config: what errors and logs name (never the
/// password).
fn location(c: &postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(s) => s.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("(default)")
    )
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS tessera_modules (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        world TEXT NOT NULL,
        manifest TEXT NOT NULL,
        size BIGINT NOT NULL,
        publisher_key TEXT,
        published_at BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tessera_blobs (
        sha256 TEXT PRIMARY KEY,
        bytes BYTEA NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tessera_tenants (
        name TEXT PRIMARY KEY,
        key_sha256 TEXT NOT NULL UNIQUE,
        policy TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tessera_usage (
        tenant TEXT NOT NULL,
        day BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        PRIMARY KEY (tenant, day)
    );
    CREATE TABLE IF NOT EXISTS tessera_requests (
        tenant TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS tessera_requests_by_tenant ON tessera_requests (tenant, at_ms);
    CREATE TABLE IF NOT EXISTS tessera_quarantine (
        key TEXT PRIMARY KEY,
        consecutive INTEGER NOT NULL,
        strikes INTEGER NOT NULL,
        until_ms BIGINT NOT NULL
    );";

/// The database's clock in Unix milliseconds, as SQL.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const MODULE_COLUMNS: &str = "name, sha256, world, manifest, size, publisher_key, published_at";

/// Deletes component `$1` if no module uses it any more.
const DROP_UNUSED_BLOB: &str = "DELETE FROM tessera_blobs WHERE sha256 = $1
     AND NOT EXISTS (SELECT 1 FROM tessera_modules WHERE sha256 = $1)";

fn module_row(r: &postgres::Row) -> Result<ModuleRow, postgres::Error> {
    Ok(ModuleRow {
        name: r.try_get(0)?,
        sha256: r.try_get(1)?,
        world: r.try_get(2)?,
        manifest: r.try_get(3)?,
        size: r.try_get(4)?,
        publisher_key: r.try_get(5)?,
        published_at: r.try_get(6)?,
    })
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and
    /// creates the tables if they are missing. Nodes starting together
    /// create them once: the creation holds an advisory lock.
    pub fn open(url: &str) -> Result<Self, Error> {
        let config: postgres::Config = url.parse().map_err(|e| {
            Error::config(format!(
                "registry URL: {e} (expected postgres://user[:password]@host[:port]/database)"
            ))
        })?;
        let mut config = config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let location = location(&config);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..CONNECTIONS {
            let rx = rx.clone();
            let mut conn = Conn {
                config: config.clone(),
                client: None,
            };
            std::thread::Builder::new()
                .name(format!("tessera-pg-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(&mut conn),
                        Err(_) => return,
                    }
                })
                .map_err(|e| Error::internal(format!("registry: cannot start a database thread: {e}")))?;
        }
        let store = PostgresStore { jobs: tx, location };
        store
            .call("create its tables", |c| {
                let mut tx = c.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock(7411002201)", &[])?;
                tx.batch_execute(SCHEMA)?;
                tx.commit()
            })
            .map_err(|e| match e {
                Error::Internal { message } => Error::config(format!(
                    "{message}: check that PostgreSQL runs there and the URL's user, password and database are right"
                )),
                other => other,
            })?;
        Ok(store)
    }

    /// Runs `f` on one of the store's connections.
    fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn: &mut Conn| {
            let r = conn.client().and_then(f);
            if r.is_err() && conn.client.as_ref().is_some_and(|c| c.is_closed()) {
                conn.client = None;
            }
            let _ = tx.send(r);
        });
        let failed = |detail: String| {
            Error::internal(format!(
                "registry database {} could not {what}: {detail}",
                self.location
            ))
        };
        self.jobs
            .send(job)
            .map_err(|_| failed("its connection threads stopped".into()))?;
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(r) => r.map_err(|e| failed(e.to_string())),
            Err(_) => Err(failed(format!("no answer in {} s", CALL_TIMEOUT.as_secs()))),
        }
    }
}

impl Store for PostgresStore {
    fn describe(&self) -> String {
        format!("PostgreSQL at {}", self.location)
    }

    fn keeps_blobs(&self) -> bool {
        true
    }

    fn modules(&self) -> Result<Vec<ModuleRow>, Error> {
        self.call("list modules", |c| {
            c.query(
                &format!("SELECT {MODULE_COLUMNS} FROM tessera_modules ORDER BY name"),
                &[],
            )?
            .iter()
            .map(module_row)
            .collect()
        })
    }

    fn module(&self, name: &str) -> Result<Option<ModuleRow>, Error> {
        let name = name.to_string();
        self.call("read a module", move |c| {
            c.query_opt(
                &format!("SELECT {MODULE_COLUMNS} FROM tessera_modules WHERE name = $1"),
                &[&name],
            )?
            .as_ref()
            .map(module_row)
            .transpose()
        })
    }

    fn put_module(&self, row: &ModuleRow, wasm: &[u8]) -> Result<Option<String>, Error> {
        let row = row.clone();
        let wasm = wasm.to_vec();
        self.call("store a module", move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO tessera_blobs (sha256, bytes) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING",
                &[&row.sha256, &wasm],
            )?;
            let old: Option<String> = tx
                .query_opt(
                    "SELECT sha256 FROM tessera_modules WHERE name = $1 FOR UPDATE",
                    &[&row.name],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            tx.execute(
                &format!(
                    "INSERT INTO tessera_modules ({MODULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, world = excluded.world,
                       manifest = excluded.manifest, size = excluded.size,
                       publisher_key = excluded.publisher_key, published_at = excluded.published_at"
                ),
                &[
                    &row.name,
                    &row.sha256,
                    &row.world,
                    &row.manifest,
                    &row.size,
                    &row.publisher_key,
                    &row.published_at,
                ],
            )?;
            if let Some(old) = old.as_ref().filter(|o| **o != row.sha256) {
                tx.execute(DROP_UNUSED_BLOB, &[old])?;
            }
            tx.commit()?;
            Ok(old)
        })
    }

    fn remove_module(&self, name: &str) -> Result<Option<String>, Error> {
        let name = name.to_string();
        self.call("remove a module", move |c| {
            let mut tx = c.transaction()?;
            let old: Option<String> = tx
                .query_opt("DELETE FROM tessera_modules WHERE name = $1 RETURNING sha256", &[&name])?
                .map(|r| r.try_get(0))
                .transpose()?;
            if let Some(old) = &old {
                tx.execute(DROP_UNUSED_BLOB, &[old])?;
            }
            tx.commit()?;
            Ok(old)
        })
    }

    fn sha_in_use(&self, sha256: &str) -> Result<bool, Error> {
        let sha = sha256.to_string();
        self.call("count a component's users", move |c| {
            c.query_one(
                "SELECT EXISTS (SELECT 1 FROM tessera_modules WHERE sha256 = $1)",
                &[&sha],
            )?
            .try_get(0)
        })
    }

    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, Error> {
        let sha = sha256.to_string();
        self.call("read a component", move |c| {
            c.query_opt("SELECT bytes FROM tessera_blobs WHERE sha256 = $1", &[&sha])?
                .map(|r| r.try_get(0))
                .transpose()
        })
    }

    fn add_tenant(&self, name: &str, key_sha256: &str, policy_json: &str, created_at: i64) -> Result<bool, Error> {
        let (name, key, policy) = (name.to_string(), key_sha256.to_string(), policy_json.to_string());
        let n = self.call("add a tenant", move |c| {
            c.execute(
                "INSERT INTO tessera_tenants (name, key_sha256, policy, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&name, &key, &policy, &created_at],
            )
        })?;
        Ok(n > 0)
    }

    fn tenants(&self) -> Result<Vec<TenantRow>, Error> {
        self.call("list tenants", |c| {
            c.query("SELECT name, policy FROM tessera_tenants ORDER BY name", &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    fn tenant_by_key_hash(&self, key_sha256: &str) -> Result<Option<TenantRow>, Error> {
        let key = key_sha256.to_string();
        self.call("find a tenant", move |c| {
            c.query_opt(
                "SELECT name, policy FROM tessera_tenants WHERE key_sha256 = $1",
                &[&key],
            )?
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
        })
    }

    fn remove_tenant(&self, name: &str) -> Result<bool, Error> {
        let name = name.to_string();
        let n = self.call("remove a tenant", move |c| {
            c.execute("DELETE FROM tessera_tenants WHERE name = $1", &[&name])
        })?;
        Ok(n > 0)
    }

    fn tenant_count(&self) -> Result<i64, Error> {
        self.call("count tenants", |c| {
            c.query_one("SELECT COUNT(*) FROM tessera_tenants", &[])?.try_get(0)
        })
    }

    fn tokens_used(&self, tenant: &str, day: i64) -> Result<u64, Error> {
        let tenant = tenant.to_string();
        let n: Option<i64> = self.call("read usage", move |c| {
            c.query_opt(
                "SELECT tokens FROM tessera_usage WHERE tenant = $1 AND day = $2",
                &[&tenant, &day],
            )?
            .map(|r| r.try_get(0))
            .transpose()
        })?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    fn add_tokens(&self, tenant: &str, day: i64, tokens: u64) -> Result<(), Error> {
        let tenant = tenant.to_string();
        let tokens = tokens.min(i64::MAX as u64) as i64;
        self.call("record usage", move |c| {
            c.execute(
                "INSERT INTO tessera_usage (tenant, day, tokens) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant, day) DO UPDATE SET tokens = tessera_usage.tokens + excluded.tokens",
                &[&tenant, &day, &tokens],
            )
        })?;
        Ok(())
    }
}

impl Gates for PostgresStore {
    fn take_request(&self, tenant: &str, limit: u32, window_ms: i64) -> Result<Option<i64>, Error> {
        let tenant = tenant.to_string();
        self.call("count a request", move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tessera-rate:' || $1))",
                &[&tenant],
            )?;
            let now: i64 = tx.query_one(&format!("SELECT {NOW_MS}"), &[])?.try_get(0)?;
            tx.execute(
                "DELETE FROM tessera_requests WHERE tenant = $1 AND at_ms <= $2",
                &[&tenant, &(now - window_ms)],
            )?;
            let row = tx.query_one(
                "SELECT COUNT(*), MIN(at_ms) FROM tessera_requests WHERE tenant = $1",
                &[&tenant],
            )?;
            let (count, oldest): (i64, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
            let wait = if count >= limit as i64 {
                Some((window_ms - (now - oldest.unwrap_or(now))).max(1))
            } else {
                tx.execute(
                    "INSERT INTO tessera_requests (tenant, at_ms) VALUES ($1, $2)",
                    &[&tenant, &now],
                )?;
                None
            };
            tx.commit()?;
            Ok(wait)
        })
    }

    fn quarantine_left(&self, key: &str) -> Result<Option<i64>, Error> {
        let key = key.to_string();
        self.call("read a quarantine", move |c| {
            c.query_opt(
                &format!("SELECT until_ms - {NOW_MS} FROM tessera_quarantine WHERE key = $1 AND until_ms > {NOW_MS}"),
                &[&key],
            )?
            .map(|r| r.try_get(0))
            .transpose()
        })
    }

    fn update_quarantine(&self, key: &str, update: QuarantineUpdate) -> Result<(), Error> {
        let key = key.to_string();
        self.call("record a module fault", move |c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('tessera-q:' || $1))", &[&key])?;
            let now: i64 = tx.query_one(&format!("SELECT {NOW_MS}"), &[])?.try_get(0)?;
            let old = tx
                .query_opt(
                    "SELECT consecutive, strikes, until_ms FROM tessera_quarantine WHERE key = $1",
                    &[&key],
                )?
                .map(|r| -> Result<QuarantineRecord, postgres::Error> {
                    Ok(QuarantineRecord {
                        consecutive: r.try_get::<_, i32>(0)?.max(0) as u32,
                        strikes: r.try_get::<_, i32>(1)?.max(0) as u32,
                        until_ms: r.try_get(2)?,
                    })
                })
                .transpose()?;
            match update(old, now) {
                Some(r) => {
                    let (consecutive, strikes) = (
                        r.consecutive.min(i32::MAX as u32) as i32,
                        r.strikes.min(i32::MAX as u32) as i32,
                    );
                    tx.execute(
                        "INSERT INTO tessera_quarantine (key, consecutive, strikes, until_ms) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (key) DO UPDATE SET consecutive = excluded.consecutive,
                           strikes = excluded.strikes, until_ms = excluded.until_ms",
                        &[&key, &consecutive, &strikes, &r.until_ms],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM tessera_quarantine WHERE key = $1", &[&key])?;
                }
            }
            tx.commit()
        })
    }

    fn clear_quarantine(&self, key: &str) -> Result<(), Error> {
        let key = key.to_string();
        self.call("clear a quarantine", move |c| {
            c.execute("DELETE FROM tessera_quarantine WHERE key = $1", &[&key])
                .map(drop)
        })
    }

    fn quarantined(&self) -> Result<Vec<(String, i64)>, Error> {
        self.call("list quarantines", |c| {
            c.query(
                &format!("SELECT key, until_ms - {NOW_MS} FROM tessera_quarantine WHERE until_ms > {NOW_MS}"),
                &[],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }
}

//! A many-node deployment on loopback, for the multi-node tests and the
//! `multinode` bench: Debian's PostgreSQL and HAProxy, started here in a
//! scratch directory and stopped when dropped (nothing is left running),
//! and `tessera serve` nodes that share the database.
//!
//! PostgreSQL refuses to run as root, so as root its programs run as the
//! `postgres` user that Debian's package creates.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback TCP port (bound, read and released: another process
/// could take it in between, which on a test machine does not happen).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Where Debian installs PostgreSQL's server programs (the newest major
/// version when several are installed), else `$PATH`.
fn pg_bin(program: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .last()
        .map(|b| b.join(program))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// `id -u NAME` / `id -g NAME`.
fn id_of(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `program` as the `postgres` user when we are root. The process is
/// PostgreSQL itself (no `runuser` in between), so stopping it and
/// reaping it are ours to do.
fn as_postgres_user(program: PathBuf) -> Command {
    let mut c = Command::new(program);
    if is_root() {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = (id_of("-u", "postgres"), id_of("-g", "postgres"));
        let (Some(uid), Some(gid)) = (uid, gid) else {
            panic!("running as root and there is no `postgres` user (Debian's postgresql package makes one)")
        };
        c.uid(uid).gid(gid);
    }
    c
}

fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A PostgreSQL server of its own (trust authentication on loopback, user
/// `tessera`).
pub struct Postgres {
    child: Child,
    /// `postgres://tessera@127.0.0.1:PORT/postgres`.
    pub url: String,
}

impl Postgres {
    /// Makes a cluster in `dir/pgdata` and starts it; waits until it
    /// accepts connections.
    pub fn start(dir: &Path) -> Postgres {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).expect("pgdata");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", data.display());
        }
        let out = as_postgres_user(pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "tessera", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("initdb runs (Debian's postgresql package; make test installs it)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("postgres.log")).expect("log file");
        let child = as_postgres_user(pg_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        let pg = Postgres {
            child,
            url: format!("postgres://tessera@127.0.0.1:{port}/postgres"),
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if pg.with_client(|_| ()).is_ok() {
                return pg;
            }
            assert!(
                Instant::now() < end,
                "PostgreSQL did not accept connections in 60 s: {}",
                std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on a connection of its own, for checking what the nodes
    /// wrote. On a thread of its own: the blocking client refuses to run
    /// inside an async test's runtime.
    pub fn with_client<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> Result<T, String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = postgres::Client::connect(&self.url, postgres::NoTls).map_err(|e| e.to_string())?;
                Ok(f(&mut c))
            })
            .join()
            .map_err(|_| "the database check panicked".to_string())?
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM is PostgreSQL's "smart" shutdown, which waits for
        // clients; SIGINT ("fast") disconnects them.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        stop(&mut self.child, Duration::from_secs(20));
    }
}

/// One `tessera serve` process.
pub struct Node {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Node {
    /// Starts `tessera serve` on a free port over `registry` (a URL or a
    /// directory), with its component cache in `cache`.
    pub fn start(registry: &str, cache: &Path, extra: &[&str]) -> Node {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--port", &port.to_string(), "--registry", registry])
            .arg("--registry-cache")
            .arg(cache)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tessera serve starts");
        let Some(stdout) = child.stdout.take() else {
            panic!("no stdout")
        };
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(a) = l.strip_prefix("tessera: listening on http://") {
                        break a.to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("tessera serve exited before listening");
                }
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Node { child, addr }
    }

    /// `kill -9`: no shutdown, no goodbye.
    pub fn kill_9(&mut self) {
        // `Child::kill` is SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(10));
    }
}

/// HAProxy in front of nodes: round robin, health checks on `/health`
/// every 300 ms, a failed connection retried on another node.
pub struct Balancer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Balancer {
    /// Starts HAProxy over `nodes` (`host:port` each), its config in `dir`.
    pub fn start(dir: &Path, nodes: &[&str]) -> Balancer {
        let port = free_port();
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    server node{i} {a} check\n"))
            .collect();
        let cfg = format!(
            "global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    retries 3
    option redispatch
frontend tessera
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /health
    default-server inter 300ms fall 2 rise 1
{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("haproxy.cfg");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log file");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy runs (Debian's haproxy package; make test installs it)");
        let b = Balancer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "HAProxy did not listen in 30 s: {}",
                std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

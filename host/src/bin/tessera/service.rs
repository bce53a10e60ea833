//! The service faces of the CLI: `serve`, `modules` (the registry) and
//! `tenants`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use tessera::registry::signing;
use tessera::registry::tenants::TenantPolicy;
use tessera::registry::Registry;
use tessera::server::{self, AppState, ServeConfig};
use tessera::{Error, Paths};

use super::Setup;

/// Where the registry lives: `--registry`, else `$TESSERA_HOME/registry`.
#[derive(Args, Clone)]
pub struct RegistryArg {
    /// Registry: a directory (one box, SQLite) or a PostgreSQL URL
    /// (`postgres://user[:password]@host[:port]/db`) that every node of a
    /// deployment names.
    #[arg(long, env = "TESSERA_REGISTRY", value_name = "DIR|URL")]
    registry: Option<String>,
    /// With a PostgreSQL registry: this node's cache of components and its
    /// trusted publisher keys (default `$TESSERA_HOME/registry`).
    #[arg(long, env = "TESSERA_REGISTRY_CACHE", value_name = "DIR")]
    registry_cache: Option<PathBuf>,
}

impl RegistryArg {
    /// The local directory: the registry itself, or a database's cache.
    fn dir(&self) -> PathBuf {
        match &self.registry {
            Some(r) if !tessera::registry::is_database_url(r) => PathBuf::from(r),
            _ => self
                .registry_cache
                .clone()
                .unwrap_or_else(|| Paths::from_env().registry),
        }
    }

    fn open(&self) -> Result<Registry, Error> {
        match &self.registry {
            Some(r) if tessera::registry::is_database_url(r) => Registry::connect(r, &self.dir()),
            _ => Registry::open(&self.dir()),
        }
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to bind. Anything but loopback needs a tenant first.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests executing at once.
    #[arg(long, default_value_t = 4)]
    max_inflight: usize,
    /// Requests waiting beyond those; more are answered 503 at once.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Longest a request may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    grace_s: u64,
    /// Evaluation reports the web console shows (every folder with a
    /// `report.md` under DIR, e.g. `docs/results`).
    #[arg(long, value_name = "DIR")]
    reports: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArg,
    #[command(flatten)]
    setup: Setup,
}

#[derive(Subcommand)]
pub enum ModulesCommand {
    /// Validate, precompile and store a strategy module.
    Publish {
        /// The component (`.wasm`).
        path: PathBuf,
        /// Its manifest (default: the `.toml` beside the `.wasm`).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Its signature (default: `PATH.sig` if present).
        #[arg(long)]
        signature: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// The published modules.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// One module, with its manifest.
    Show {
        /// Its name.
        name: String,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Remove a module.
    Remove {
        /// Its name.
        name: String,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Make a publisher key pair: `OUT.key` (secret) and `OUT.pub`.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a module (the component and its manifest together) with a
    /// secret key; writes `PATH.sig`.
    Sign {
        /// The component.
        path: PathBuf,
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
        /// Its manifest (default: the `.toml` beside the `.wasm`).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Trust a publisher's public key (from then on, every publish must be
    /// signed by a trusted key).
    Trust {
        /// The `.pub` file.
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryArg,
    },
}

#[derive(Subcommand)]
pub enum TenantsCommand {
    /// Make a tenant and print its API key (shown once).
    Add {
        /// Its name.
        name: String,
        /// Systems it may call, comma-separated (`*` = all).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        modules: Vec<String>,
        /// Members it may call, comma-separated (`*` = all).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        members: Vec<String>,
        /// Requests per rolling minute (0 = no limit).
        #[arg(long, default_value_t = 60)]
        rpm: u32,
        /// Tokens per UTC day (0 = no limit).
        #[arg(long, default_value_t = 1_000_000)]
        tokens_per_day: u64,
        /// Requests in flight at once (0 = no limit).
        #[arg(long, default_value_t = 4)]
        concurrent: u32,
        /// May publish and remove modules.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// The tenants and their limits.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Remove a tenant; its key stops working at once.
    Remove {
        /// Its name.
        name: String,
        #[command(flatten)]
        registry: RegistryArg,
    },
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

pub async fn serve(args: ServeArgs) -> Result<String, Error> {
    let registry = Arc::new(args.registry.open()?);
    if !args.host.is_loopback() && !registry.has_tenants()? {
        return Err(Error::config(format!(
            "refusing to serve on {} with no tenants: anyone could use it. Add one with `tessera tenants add NAME`, or bind 127.0.0.1",
            args.host
        )));
    }
    let rt = Arc::new(super::runtime(&args.setup)?);
    let cfg = ServeConfig {
        addr: SocketAddr::new(args.host, args.port),
        max_inflight: args.max_inflight,
        max_queue: args.max_queue,
        request_timeout: Duration::from_secs(args.timeout_s.max(1)),
        shutdown_grace: Duration::from_secs(args.grace_s),
        reports: args.reports.clone(),
        ..ServeConfig::default()
    };
    if let Some(dir) = &cfg.reports {
        if !dir.is_dir() {
            return Err(Error::config(format!(
                "--reports {}: not a directory (name the folder that holds the reports, e.g. docs/results)",
                dir.display()
            )));
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| Error::config(format!("cannot listen on {}: {e} (pick another --port)", cfg.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::config(format!("listener: {e}")))?;
    if !registry.has_tenants()? {
        eprintln!(
            "warning: no tenants: serving without API keys (loopback only). `tessera tenants add NAME` turns keys on"
        );
    }
    // Tests and scripts read this line to find the port.
    println!("tessera: listening on http://{local}");
    eprintln!("tessera: the web console is at http://{local}/ui/");
    eprintln!("tessera: registry: {}", registry.describe());
    let _ = std::io::stdout().flush();
    let state = Arc::new(AppState::new(rt, registry, cfg)?);
    server::serve(state, listener, shutdown_signal()).await?;
    Ok("tessera: stopped".into())
}

/// `tessera modules`: one registry subcommand, run; the text to print.
pub fn modules(cmd: ModulesCommand) -> Result<String, Error> {
    match cmd {
        ModulesCommand::Publish {
            path,
            manifest,
            signature,
            registry,
        } => modules_publish(&path, manifest, signature, &registry),
        ModulesCommand::List { json, registry } => modules_list(json, &registry),
        ModulesCommand::Show { name, registry } => modules_show(&name, &registry),
        ModulesCommand::Remove { name, registry } => modules_remove(&name, &registry),
        ModulesCommand::Keygen { out } => modules_keygen(&out),
        ModulesCommand::Sign { path, key, manifest } => modules_sign(&path, &key, manifest),
        ModulesCommand::Trust { key, registry } => modules_trust(&key, &registry),
    }
}

/// Reads a module's component at `path` and its manifest (`manifest`, else
/// the `.toml` beside the `.wasm`). `hint` follows a manifest that cannot
/// be read: how to name it, in the words of the command at hand.
fn read_module(path: &Path, manifest: Option<PathBuf>, hint: &str) -> Result<(Vec<u8>, String), Error> {
    let wasm = std::fs::read(path).map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
    let manifest_path = manifest.unwrap_or_else(|| path.with_extension("toml"));
    let manifest_toml = std::fs::read_to_string(&manifest_path)
        .map_err(|e| Error::config(format!("{}: {e} ({hint})", manifest_path.display())))?;
    Ok((wasm, manifest_toml))
}

/// The module's signature: the file `signature` names, else `PATH.sig` if
/// there is one, else none (accepted only while the registry trusts no
/// publisher key).
fn read_signature(path: &Path, signature: Option<PathBuf>) -> Result<Option<String>, Error> {
    let sig_path = signature.or_else(|| {
        let p = PathBuf::from(format!("{}.sig", path.display()));
        p.exists().then_some(p)
    });
    sig_path
        .map(|p| std::fs::read_to_string(&p).map_err(|e| Error::config(format!("{}: {e}", p.display()))))
        .transpose()
}

/// `modules publish`: validates, precompiles and stores a module through
/// the same checks the server's publish endpoint uses.
fn modules_publish(
    path: &Path,
    manifest: Option<PathBuf>,
    signature: Option<PathBuf>,
    registry: &RegistryArg,
) -> Result<String, Error> {
    let (wasm, manifest_toml) = read_module(path, manifest, "give the manifest with --manifest")?;
    let sig = read_signature(path, signature)?;
    let paths = Paths::from_env();
    let host = server::SandboxHost {
        sandbox: tessera::sandbox::Sandbox::new(&paths.components)?,
        paths,
    };
    let reg = registry.open()?;
    let e = server::publish_checked(&reg, &host, &wasm, &manifest_toml, sig.as_deref())?;
    Ok(format!(
        "published {} {} ({} bytes, sha256 {}){}",
        e.name,
        e.version,
        e.size,
        e.sha256,
        e.publisher_key.map(|k| format!(", signed by {k}")).unwrap_or_default()
    ))
}

/// `modules list`: the published modules as a table, or as JSON.
fn modules_list(json: bool, registry: &RegistryArg) -> Result<String, Error> {
    let list = registry.open()?.list()?;
    if json {
        return serde_json::to_string_pretty(&list).map_err(|e| Error::config(e.to_string()));
    }
    let mut s = format!(
        "{:<24} {:<10} {:<9} {:<16} description\n",
        "name", "world", "version", "sha256"
    );
    for e in list {
        s.push_str(&format!(
            "{:<24} {:<10} {:<9} {:<16} {}\n",
            e.name,
            e.world,
            e.version,
            &e.sha256[..16.min(e.sha256.len())],
            e.description
        ));
    }
    Ok(s.trim_end().to_string())
}

/// `modules show`: one published module as JSON, its manifest as text.
fn modules_show(name: &str, registry: &RegistryArg) -> Result<String, Error> {
    let e = registry
        .open()?
        .get(name)?
        .ok_or_else(|| Error::config(format!("no published module `{name}` (`tessera modules list`)")))?;
    let mut v = serde_json::to_value(&e).map_err(|e| Error::config(e.to_string()))?;
    v["manifest"] = serde_json::Value::String(e.manifest_toml.clone());
    serde_json::to_string_pretty(&v).map_err(|e| Error::config(e.to_string()))
}

/// `modules remove`: removes a published module; an unknown name is an
/// error.
fn modules_remove(name: &str, registry: &RegistryArg) -> Result<String, Error> {
    if registry.open()?.remove(name)? {
        Ok(format!("removed {name}"))
    } else {
        Err(Error::config(format!(
            "no published module `{name}` (`tessera modules list`)"
        )))
    }
}

/// `modules keygen`: writes a new key pair to `OUT.key` (secret, readable
/// by its owner only on unix) and `OUT.pub`, refusing to overwrite either.
fn modules_keygen(out: &Path) -> Result<String, Error> {
    let (secret, public) = signing::keygen();
    let key = PathBuf::from(format!("{}.key", out.display()));
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    for p in [&key, &pub_path] {
        if p.exists() {
            return Err(Error::config(format!("{} exists: not overwriting a key", p.display())));
        }
    }
    std::fs::write(&key, secret).map_err(|e| Error::config(format!("{}: {e}", key.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600));
    }
    std::fs::write(&pub_path, &public).map_err(|e| Error::config(format!("{}: {e}", pub_path.display())))?;
    Ok(format!(
        "secret key: {} (keep it private)\npublic key: {} ({public})",
        key.display(),
        pub_path.display()
    ))
}

/// `modules sign`: signs the component and its manifest together with the
/// secret key file `key`, and writes `PATH.sig`.
fn modules_sign(path: &Path, key: &Path, manifest: Option<PathBuf>) -> Result<String, Error> {
    let (wasm, manifest_toml) = read_module(
        path,
        manifest,
        "the signature covers the manifest too: give it with --manifest",
    )?;
    let sig = signing::sign(&wasm, &manifest_toml, key)?;
    let out = PathBuf::from(format!("{}.sig", path.display()));
    std::fs::write(&out, sig).map_err(|e| Error::config(format!("{}: {e}", out.display())))?;
    Ok(format!("signature: {}", out.display()))
}

/// Where the public key file `key` is kept among the trusted keys in `dir`:
/// under its own file name, with `.pub` added if it lacks it.
fn trusted_key_path(dir: &Path, key: &Path) -> PathBuf {
    let name = key
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "publisher.pub".into());
    dir.join(if name.ends_with(".pub") {
        name
    } else {
        format!("{name}.pub")
    })
}

/// `modules trust`: checks the public key file `key` and adds it to the
/// registry's trusted keys (written beside and renamed into place, so a
/// half-written key is never trusted).
fn modules_trust(key: &Path, registry: &RegistryArg) -> Result<String, Error> {
    let text = std::fs::read_to_string(key).map_err(|e| Error::config(format!("{}: {e}", key.display())))?;
    let dir = registry.dir().join("trusted-keys");
    std::fs::create_dir_all(&dir).map_err(|e| Error::config(format!("{}: {e}", dir.display())))?;
    let dest = trusted_key_path(&dir, key);
    signing::check_public_key(&text).map_err(|e| Error::config(format!("{}: {e}", key.display())))?;
    let tmp = dest.with_extension("pub.tmp");
    std::fs::write(&tmp, text.trim()).map_err(|e| Error::config(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &dest).map_err(|e| Error::config(format!("{}: {e}", dest.display())))?;
    let n = signing::TrustedKeys::load(&dir)?.len();
    Ok(format!(
        "trusted {} ({n} trusted key(s): every publish must now be signed by one)",
        dest.display()
    ))
}

pub fn tenants(cmd: TenantsCommand) -> Result<String, Error> {
    match cmd {
        TenantsCommand::Add {
            name,
            modules,
            members,
            rpm,
            tokens_per_day,
            concurrent,
            admin,
            registry,
        } => {
            let policy = TenantPolicy {
                modules,
                members,
                requests_per_minute: rpm,
                tokens_per_day,
                max_concurrent: concurrent,
                admin,
            };
            let key = registry.open()?.add_tenant(&name, &policy)?;
            Ok(format!(
                "{key}\n(tenant `{name}`: this key is shown once; only its hash is stored)"
            ))
        }
        TenantsCommand::List { json, registry } => {
            let list = registry.open()?.tenants()?;
            if json {
                return serde_json::to_string_pretty(&list).map_err(|e| Error::config(e.to_string()));
            }
            let mut s = format!(
                "{:<16} {:>6} {:>12} {:>6} {:<6} {:<20} members\n",
                "tenant", "rpm", "tokens/day", "conc", "admin", "modules"
            );
            for t in list {
                let p = &t.policy;
                s.push_str(&format!(
                    "{:<16} {:>6} {:>12} {:>6} {:<6} {:<20} {}\n",
                    t.name,
                    p.requests_per_minute,
                    p.tokens_per_day,
                    p.max_concurrent,
                    p.admin,
                    p.modules.join(","),
                    p.members.join(",")
                ));
            }
            Ok(s.trim_end().to_string())
        }
        TenantsCommand::Remove { name, registry } => {
            if registry.open()?.remove_tenant(&name)? {
                Ok(format!("removed tenant {name}"))
            } else {
                Err(Error::config(format!("no tenant `{name}` (`tessera tenants list`)")))
            }
        }
    }
}

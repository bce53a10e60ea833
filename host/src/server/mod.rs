//! `tessera serve`: the runtime as an OpenAI-compatible HTTP service.
//!
//! Applications call it with the clients they already use; platforms let
//! strangers publish strategies to it. Routes:
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models` | every pool member (with its status) and every system the caller may use |
//! | `POST /v1/chat/completions` | a chat answered by a member or a system; `stream: true` for SSE |
//! | `POST /v1/completions` | the same for a raw prompt |
//! | `POST /v1/embeddings` | embeddings from an embedding member |
//! | `GET /v1/tessera/modules[/{name}]` | the registry |
//! | `POST /v1/tessera/modules` | publish (admin tenants) |
//! | `DELETE /v1/tessera/modules/{name}` | remove (admin tenants) |
//! | `GET /health` | liveness, queue depth |
//! | `GET /v1/tessera/reports[/{path}]` | evaluation reports under `--reports DIR` ([`reports`]) |
//! | `GET /`, `/ui/` | the web console ([`console`]) |
//!
//! A *system* is a strategy module bound to the pool: a standard module
//! installed by `make setup`, or one published to the [`crate::registry`].
//! Its response carries a `provenance` extension: the members that took
//! part, every host call and module step, and the usage.
//!
//! Every failure is an OpenAI-shaped error body (`error.message`, `type`,
//! `param`, `code`) with a status that says whose fault it is: 4xx for the
//! caller, 429/503 with `Retry-After` for capacity, 502 for a module that
//! broke (its typed sandbox error in `code`), 504 for a deadline. A hostile
//! module never takes the connection down with it.
//!
//! Streaming: a member streams its tokens as they are decoded. A system
//! whose module imports the `output` interface (WIT 0.1.2) streams what the
//! module sends through it (typically its final stage, generated with
//! `output.generate-streamed`), and the rest of its answer, if any, when it
//! returns; its first event says `tessera.streaming = "tokens"`. Any other
//! system's answer exists only when the module returns, so its first event
//! says `"final-answer"` and the answer follows in one chunk. SSE keep-alive
//! comments flow meanwhile.

pub mod admission;
pub mod breaker;
pub mod chat;
pub mod console;
pub mod embeddings;
pub mod error;
pub mod front_door;
pub mod guests;
pub mod metrics;
pub mod models;
pub mod modules;
pub mod openai;
pub mod reports;
pub mod score;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;

use crate::policy::World;
use crate::registry::tenants::{day_of, Tenant, TenantPolicy};
use crate::registry::Registry;
use crate::sandbox::Module;
use crate::{Error, Runtime};

pub use crate::registry::publish::{publish_checked, PublishHost, SandboxHost};
use admission::{Admission, Admitted};
use chat::{chat, completions};
pub(crate) use chat::{resolve, Target};
use embeddings::embeddings;
pub use error::{scrub, ApiError};
use front_door::front_door;
pub use front_door::Caller;
use models::{health, models};
use modules::{modules_list, modules_publish, modules_remove, modules_show};

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on. Loopback by default; any other address needs
    /// at least one tenant (no open service on a network).
    pub addr: SocketAddr,
    /// Requests executing at once.
    pub max_inflight: usize,
    /// Requests waiting for a place beyond those; more get a 503 at once.
    pub max_queue: usize,
    /// Longest a request may take, waiting included (504 past it).
    pub request_timeout: Duration,
    /// After a shutdown signal, how long in-flight requests may finish.
    pub shutdown_grace: Duration,
    /// Largest request body (module uploads included).
    pub max_body_bytes: usize,
    /// Consecutive module faults (fuel, memory, deadline, trap, ...) after
    /// which a module is quarantined ([`breaker`]).
    pub quarantine_after: u32,
    /// The first quarantine; it doubles per relapse, up to ten minutes.
    pub quarantine: Duration,
    /// Longest a client may take to send its request body (408 past it).
    pub body_read_timeout: Duration,
    /// Requests being received (authenticated and their bodies read) at
    /// once, before admission; more get a 503 at once. Bounds the work
    /// callers without a valid key can cause.
    pub max_receiving: usize,
    /// Longest a client may take to send a request's head (its headers);
    /// the connection is closed past it.
    pub header_read_timeout: Duration,
    /// Open connections at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Where the console's Reports view finds evaluation reports
    /// (`tessera serve --reports DIR`); `None`: it shows none.
    pub reports: Option<std::path::PathBuf>,
}

/// Largest body of a generation, embedding or score request. The input
/// rule allows 256 KiB of text ([`crate::inference::MAX_INPUT_BYTES`]);
/// JSON escapes may grow it several times, and nothing larger can pass.
pub const GENERATION_BODY_BYTES: usize = 2 << 20;
/// Largest body of any other request (module uploads excepted).
pub const SMALL_BODY_BYTES: usize = 64 << 10;

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_inflight: 4,
            max_queue: 64,
            request_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            max_body_bytes: 64 << 20,
            quarantine_after: 3,
            quarantine: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            max_receiving: 64,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            reports: None,
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything the handlers share.
pub struct AppState {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) cfg: ServeConfig,
    pub(crate) admission: Admission,
    /// Loaded systems by name, with the sha256 they were loaded from.
    pub(crate) modules: Mutex<HashMap<String, Arc<Module>>>,
    /// Held while a module is loaded ([`AppState::system`]).
    pub(crate) loading: Arc<tokio::sync::Mutex<()>>,
    pub(crate) draining: AtomicBool,
    pub(crate) next_id: AtomicU64,
    pub(crate) breaker: breaker::Breaker,
    pub(crate) guests: guests::Guests,
    /// Whether the server runs without keys: decided once, at start, from
    /// whether any tenant exists then. Removing the last tenant of a keyed
    /// server leaves it keyed (nobody gets in) rather than open.
    pub(crate) open: bool,
    /// Places for requests being received (see [`ServeConfig::max_receiving`]).
    pub(crate) receiving: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State over a runtime and a registry.
    pub fn new(rt: Arc<Runtime>, registry: Arc<Registry>, cfg: ServeConfig) -> Result<Self, Error> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let guests = guests::Guests::start(threads)
            .map_err(|e| Error::internal(format!("cannot start the module runtime: {e}")))?;
        let open = !registry.has_tenants()?;
        Ok(AppState {
            open,
            receiving: Arc::new(tokio::sync::Semaphore::new(cfg.max_receiving.max(1))),
            guests,
            admission: Admission::new(cfg.max_inflight, cfg.max_queue),
            breaker: breaker::Breaker::with_records(
                cfg.quarantine_after,
                cfg.quarantine,
                Duration::from_secs(600),
                registry.gates(),
            ),
            rt,
            registry,
            cfg,
            modules: Mutex::new(HashMap::new()),
            loading: Arc::new(tokio::sync::Mutex::new(())),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        })
    }

    pub(crate) fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            now_unix(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The caller's tenant. `Ok(None)`: open mode (no tenant exists yet).
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Tenant>, ApiError> {
        // Keys are required once any tenant exists, and always on a server
        // that started with tenants (see `open`).
        if self.open && !self.registry.has_tenants()? {
            return Ok(None);
        }
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("no API key: send `Authorization: Bearer <key>`"))?;
        self.registry.tenant_by_key(key)?.map(Some).ok_or_else(|| {
            ApiError::unauthorized("the API key is not valid: ask the operator for a key (`tessera tenants add`)")
        })
    }

    pub(crate) fn policy_of(tenant: &Option<Tenant>) -> TenantPolicy {
        match tenant {
            Some(t) => t.policy.clone(),
            None => TenantPolicy {
                requests_per_minute: 0,
                tokens_per_day: 0,
                max_concurrent: 0,
                admin: true,
                ..TenantPolicy::default()
            },
        }
    }

    /// When a request that arrives now must be answered: the request
    /// timeout counts from here and covers everything, the wait for a
    /// place included.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.request_timeout
    }

    /// Lets a request in, waiting for a place at most until its `deadline`
    /// ([`AppState::deadline`]), so that waiting and working together stay
    /// within the request timeout.
    pub(crate) async fn admit(&self, tenant: &Option<Tenant>, deadline: Instant) -> Result<Admitted, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::overloaded(
                "the server is shutting down: retry on another instance",
            ));
        }
        self.admission
            .admit(
                tenant.as_ref(),
                &self.registry,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await
    }

    /// Awaits a member call that has no sink to stop it (`score`, `embed`)
    /// until `deadline`. One cut there, or ended by its own deadline,
    /// reports no usage though its member worked on it until then, so the
    /// tenant is charged the input's `bytes` / 4 tokens, as for a module's
    /// cut call, and the client gets the server's timeout.
    ///
    /// The same charge falls due if the handler is dropped while waiting
    /// (its client left): a job that has started runs to its end
    /// regardless, and the server cannot tell one still queued from it, so
    /// a client that leaves pays for what it asked. A call that expires in
    /// its member's queue never ran and costs nothing.
    pub(crate) async fn until_cut<T>(
        &self,
        tenant: &Option<Tenant>,
        deadline: Instant,
        bytes: usize,
        call: impl Future<Output = Result<T, crate::inference::InferenceError>>,
    ) -> Result<T, ApiError> {
        let mut unpaid = Unpaid {
            st: self,
            tenant,
            tokens: crate::inference::tokens_for_bytes(bytes),
            armed: true,
        };
        let result = tokio::time::timeout_at(deadline.into(), call).await;
        unpaid.armed = false;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(crate::inference::InferenceError::Deadline)) | Err(_) => {
                self.charge(tenant, unpaid.tokens);
                Err(ApiError::timeout(self.cfg.request_timeout))
            }
            // Expired in the member's queue: it never ran.
            Ok(Err(crate::inference::InferenceError::Expired)) => Err(ApiError::timeout(self.cfg.request_timeout)),
            Ok(Err(e)) => Err(ApiError::from(Error::from(e))),
        }
    }

    /// Adds `tokens` to the tenant's count for today (its daily quota).
    pub(crate) fn charge(&self, tenant: &Option<Tenant>, tokens: u64) {
        if let Some(t) = tenant {
            if let Err(e) = self.registry.add_tokens(&t.name, day_of(now_unix() as i64), tokens) {
                tracing::warn!("could not record usage of tenant `{}`: {e}", t.name);
            }
        }
    }

    /// The standard strategy modules installed by `make setup`, by name,
    /// with their manifests.
    pub(crate) fn standard_systems(&self) -> Vec<(String, crate::policy::Manifest)> {
        crate::installed_modules(self.rt.paths())
            .into_iter()
            .filter_map(|m| {
                let man = m.manifest.ok()?;
                (man.world == World::Strategy).then_some((m.name, man))
            })
            .collect()
    }

    /// The sha256 of the module loaded under `name`, if it has run (or
    /// been loaded) since the server started: quarantine records are
    /// keyed by it, and a module never loaded has none.
    pub(crate) fn loaded_sha256(&self, name: &str) -> Option<String> {
        let cached = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        cached.get(name).map(|m| m.sha256.clone())
    }

    /// The system called `name`: a published module first, else a
    /// standard one. Loaded modules are kept, keyed by their sha256, so a
    /// republished module is picked up and an unchanged one is not reloaded.
    ///
    /// A module served before comes from memory. Otherwise it is loaded,
    /// which compiles it (seconds for a large module without a stored
    /// artifact): that runs on a blocking thread, never on the threads that
    /// serve every request, and one load at a time (the lock is held until
    /// the load ends, even if the request that started it is gone), so that
    /// many first requests for a new module compile it once rather than
    /// once each. A name that is neither published nor installed is
    /// answered at once, without waiting for anyone's load.
    pub(crate) async fn system(self: &Arc<Self>, name: &str) -> Result<Option<Arc<Module>>, ApiError> {
        if let Some(m) = self.cached_system(name)? {
            return Ok(Some(m));
        }
        let installed = self.rt.paths().modules.join(format!("{name}.wasm")).exists();
        if !installed && self.registry.get(name)?.is_none() {
            return Ok(None);
        }
        let one_at_a_time = self.loading.clone().lock_owned().await;
        // Another request may have loaded it while this one waited.
        if let Some(m) = self.cached_system(name)? {
            return Ok(Some(m));
        }
        let (st, owned) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let _held = one_at_a_time;
            st.load_system(&owned)
        })
        .await
        .map_err(|e| ApiError::from(Error::internal(format!("loading module `{name}` failed: {e}"))))?
    }

    /// The loaded module for `name` if it is still what the name stands for
    /// (the registry's entry has the same sha256, or the standard module's
    /// file is still installed); `None` means it must be loaded.
    fn cached_system(&self, name: &str) -> Result<Option<Arc<Module>>, ApiError> {
        let cached = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let Some(m) = cached else {
            return Ok(None);
        };
        match self.registry.get(name)? {
            Some(e) => Ok((e.world == World::Strategy && m.sha256 == e.sha256).then_some(m)),
            // One stat, not a manifest scan per request.
            None => Ok(self
                .rt
                .paths()
                .modules
                .join(format!("{name}.wasm"))
                .exists()
                .then_some(m)),
        }
    }

    /// Loads (compiles) system `name` from the registry or the installed
    /// standard modules and remembers it. Blocking.
    fn load_system(&self, name: &str) -> Result<Option<Arc<Module>>, ApiError> {
        let module = match self.registry.get(name)? {
            Some(e) => {
                if e.world != World::Strategy {
                    return Err(ApiError::invalid(
                        "model",
                        &format!(
                            "`{name}` is a {} module, not a strategy: it runs as a pipeline stage, not as a model",
                            e.world
                        ),
                    ));
                }
                Arc::new(self.registry.load(self.rt.sandbox(), &e).map_err(unloadable(name))?)
            }
            None => {
                if !self.standard_systems().iter().any(|(n, _)| n == name) {
                    return Ok(None);
                }
                self.rt.load_module(name).map_err(unloadable(name))?
            }
        };
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), module.clone());
        Ok(Some(module))
    }
}

/// A stored or installed module that no longer loads (its blob missing or
/// corrupt, its manifest unreadable) is the server's fault, not the
/// caller's: the caller only named it, and it was accepted when it was
/// published or installed. Its cause stays in the message.
fn unloadable(name: &str) -> impl FnOnce(Error) -> ApiError + '_ {
    move |e| {
        ApiError::from(Error::internal(format!(
            "the module `{name}` is registered but could not be loaded: {e}"
        )))
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/tessera/score", post(score::score))
        .route("/v1/tessera/modules", get(modules_list).post(modules_publish))
        .route("/v1/tessera/modules/{name}", get(modules_show).delete(modules_remove))
        .route("/v1/tessera/reports", get(reports::reports_list))
        .route("/v1/tessera/reports/{*path}", get(reports::reports_get))
        .route("/", get(console::root))
        .route("/ui", get(console::root))
        .route("/ui/", get(console::index))
        .route("/ui/console.js", get(console::script))
        .route("/ui/console.css", get(console::style))
        .fallback(|| async {
            ApiError::not_found(
                "not_found",
                "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, or the console at /ui/",
            )
        })
        // The front door has read the body already, within the route's cap.
        .layer(DefaultBodyLimit::max(limit.max(GENERATION_BODY_BYTES)))
        .layer(axum::middleware::from_fn_with_state(state.clone(), front_door))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish for up to `shutdown_grace`,
/// and returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let grace = state.cfg.shutdown_grace;
    let app = router(state.clone());
    // Each connection is served by hyper directly (not `axum::serve`) so
    // that a client must send its request head within `header_timeout`
    // (slow-loris connections are closed), and connections are capped.
    let header_timeout = state.cfg.header_read_timeout;
    let places = Arc::new(tokio::sync::Semaphore::new(state.cfg.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            // Over the connection cap: closed at once.
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let _place = place;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
        // Reap finished connections so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    // Stop accepting; requests in flight may finish for `grace`, and
    // requests on kept-alive connections get a 503 meanwhile.
    state.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            "shutdown grace of {} s passed with requests still in flight; stopping",
            grace.as_secs()
        );
    }
    Ok(())
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", &format!("the request body is not valid: {e}")))
}

/// [`AppState::until_cut`]'s charge for a call whose handler is dropped
/// while it waits (the client left), paid on drop while `armed`.
struct Unpaid<'a> {
    st: &'a AppState,
    tenant: &'a Option<Tenant>,
    tokens: u64,
    armed: bool,
}

impl Drop for Unpaid<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.st.charge(self.tenant, self.tokens);
        }
    }
}

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
//! cannot (its answer exists only when the module returns), so its first
//! event says so (`tessera.streaming = "final-answer"`) and the answer
//! follows in one chunk; SSE keep-alive comments flow meanwhile.

pub mod admission;
pub mod breaker;
pub mod guests;
pub mod openai;
pub mod score;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::inference::{CallCtx, GenParams, Input};
use crate::policy::World;
use crate::registry::signing::TrustedKeys;
use crate::registry::tenants::{day_of, Tenant, TenantPolicy};
use crate::registry::{Publication, Registry};
use crate::sandbox::Module;
use crate::{Error, ProvenanceEvent, RunRequest, Runtime};

use admission::{Admission, Admitted};

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
        }
    }
}

/// An API failure: status, OpenAI error `type`, `code`, `param`, message.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: String,
    param: Option<String>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &str, message: &str) -> Self {
        ApiError {
            status,
            kind,
            code: code.into(),
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 about one request field.
    pub fn invalid(param: &str, message: &str) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        );
        e.param = Some(param.into());
        e
    }

    /// A 429 with `Retry-After`.
    pub fn rate_limited(code: &str, message: &str, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", code, message);
        e.retry_after = Some(retry_after);
        e
    }

    /// A 503 with `Retry-After: 1`.
    pub fn overloaded(message: &str) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "overloaded",
            message,
        );
        e.retry_after = Some(1);
        e
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    /// A 413 naming the route's limit.
    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            &format!("the request body is over this route's limit of {limit} bytes: send less"),
        )
    }

    fn not_found(code: &str, message: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", code, message)
    }

    fn timeout(limit: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "deadline",
            &format!("the request took longer than the server's {} s limit", limit.as_secs()),
        )
    }

    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body.
    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, kind) = match &e {
            Error::InvalidParams { .. } | Error::Unsupported { .. } | Error::Config { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            Error::InvalidModule { .. } => (StatusCode::BAD_REQUEST, "invalid_module_error"),
            Error::UnknownModel { .. } => (StatusCode::NOT_FOUND, "invalid_request_error"),
            Error::NotPermitted { .. } => (StatusCode::FORBIDDEN, "permission_error"),
            Error::Deadline { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            Error::InferenceFailed { .. } | Error::Internal { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
            }
            // The module broke or hit a limit: the fault is upstream of the
            // host, and the typed cause is in `code`.
            Error::Fuel { .. }
            | Error::Memory { .. }
            | Error::Stack { .. }
            | Error::Budget { .. }
            | Error::ModuleFailed { .. }
            | Error::Trap { .. } => (StatusCode::BAD_GATEWAY, "module_error"),
        };
        ApiError::new(status, kind, e.kind(), &scrub(&e.to_string()))
    }
}

/// A message fit for the wire: no backtrace, and no file system paths (the
/// host's layout, its build paths and its registry are nobody's business);
/// a path is shown by its file name.
pub fn scrub(message: &str) -> String {
    let mut text = message;
    for marker in ["\nStack backtrace:", "\nstack backtrace:", "\n   0: "] {
        if let Some(at) = text.find(marker) {
            text = &text[..at];
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('/') {
        // A path starts at a `/` that begins a word and has another `/`.
        let starts_word = at == 0 || rest[..at].ends_with(|c: char| c.is_whitespace() || "('\"`=[".contains(c));
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || "'\"`)],;".contains(c))
            .map_or(rest.len(), |e| at + e);
        let word = &rest[at..end];
        out.push_str(&rest[..at]);
        if starts_word && word[1..].contains('/') {
            out.push_str(word.rsplit('/').next().unwrap_or(""));
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
        }
        r
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
    rt: Arc<Runtime>,
    registry: Arc<Registry>,
    cfg: ServeConfig,
    admission: Admission,
    /// Loaded systems by name, with the sha256 they were loaded from.
    modules: Mutex<HashMap<String, Arc<Module>>>,
    draining: AtomicBool,
    next_id: AtomicU64,
    breaker: breaker::Breaker,
    guests: guests::Guests,
    /// Whether the server runs without keys: decided once, at start, from
    /// whether any tenant exists then. Removing the last tenant of a keyed
    /// server leaves it keyed (nobody gets in) rather than open.
    open: bool,
    /// Places for requests being received (see [`ServeConfig::max_receiving`]).
    receiving: Arc<tokio::sync::Semaphore>,
}

/// Who is calling, as the front door authenticated them from the headers
/// (`None`: the server runs without keys).
#[derive(Clone)]
pub struct Caller(pub Option<Tenant>);

impl Caller {
    /// The key the breaker counts this caller's failures under.
    fn name(&self) -> &str {
        self.0.as_ref().map_or("", |t| t.name.as_str())
    }
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
            breaker: breaker::Breaker::new(cfg.quarantine_after, cfg.quarantine, Duration::from_secs(600)),
            rt,
            registry,
            cfg,
            modules: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        })
    }

    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            now_unix(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The caller's tenant. `Ok(None)`: open mode (no tenant exists yet).
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Tenant>, ApiError> {
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

    fn policy_of(tenant: &Option<Tenant>) -> TenantPolicy {
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

    async fn admit(&self, tenant: &Option<Tenant>) -> Result<Admitted, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::overloaded(
                "the server is shutting down: retry on another instance",
            ));
        }
        self.admission
            .admit(tenant.as_ref(), &self.registry, self.cfg.request_timeout)
            .await
    }

    fn charge(&self, tenant: &Option<Tenant>, tokens: u64) {
        if let Some(t) = tenant {
            if let Err(e) = self.registry.add_tokens(&t.name, day_of(now_unix() as i64), tokens) {
                tracing::warn!("could not record usage of tenant `{}`: {e}", t.name);
            }
        }
    }

    /// Names of the standard strategy modules installed by `make setup`.
    fn standard_systems(&self) -> Vec<(String, String, String)> {
        crate::installed_modules(self.rt.paths())
            .into_iter()
            .filter_map(|m| {
                let man = m.manifest.ok()?;
                (man.world == World::Strategy).then_some((m.name, man.author, man.description))
            })
            .collect()
    }

    /// The system called `name`: a published module first, else a
    /// standard one. Loaded modules are kept, keyed by their sha256, so a
    /// republished module is picked up and an unchanged one is not reloaded.
    fn system(&self, name: &str) -> Result<Option<Arc<Module>>, ApiError> {
        let entry = self.registry.get(name)?;
        let cached = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let module = match entry {
            Some(e) => {
                if e.world != "strategy" {
                    return Err(ApiError::invalid(
                        "model",
                        &format!(
                            "`{name}` is a {} module, not a strategy: it runs as a pipeline stage, not as a model",
                            e.world
                        ),
                    ));
                }
                match cached.filter(|m| m.sha256 == e.sha256) {
                    Some(m) => m,
                    None => Arc::new(self.registry.load(self.rt.sandbox(), &e)?),
                }
            }
            // A standard module loaded before is served from the cache while
            // its file is still installed (one stat, not a manifest scan per
            // request); otherwise it must be an installed strategy.
            None => match cached {
                Some(m) if self.rt.paths().modules.join(format!("{name}.wasm")).exists() => m,
                _ => {
                    if !self.standard_systems().iter().any(|(n, _, _)| n == name) {
                        return Ok(None);
                    }
                    self.rt.load_module(name)?
                }
            },
        };
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), module.clone());
        Ok(Some(module))
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/tessera/score", post(score::score))
        .route("/v1/tessera/modules", get(modules_list).post(modules_publish))
        .route("/v1/tessera/modules/{name}", get(modules_show).delete(modules_remove))
        .fallback(|| async {
            ApiError::not_found(
                "not_found",
                "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings",
            )
        })
        // The front door has read the body already, within the route's cap.
        .layer(DefaultBodyLimit::max(limit.max(GENERATION_BODY_BYTES)))
        .layer(axum::middleware::from_fn_with_state(state.clone(), front_door))
        .with_state(state)
}

/// The largest body `method path` may carry for a caller (`admin` or not).
fn body_cap(method: &Method, path: &str, admin: bool, upload: usize) -> usize {
    match (method, path) {
        (&Method::POST, "/v1/tessera/modules") if admin => upload,
        (&Method::POST, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/tessera/score") => {
            GENERATION_BODY_BYTES
        }
        _ => SMALL_BODY_BYTES,
    }
}

/// Every request passes here first, in this order, each step cheap:
/// a place among the requests being received (503 if none), the caller
/// authenticated from the headers alone (401 before a byte of the body is
/// read), the route's body cap checked against `Content-Length` (413) and
/// then enforced while the body is read under a timeout (408). Only then
/// does the handler run, with the caller in the request's extensions.
/// Errors the router itself makes (405, 413) leave in the OpenAI shape.
async fn front_door(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return openai_shaped(next.run(req).await);
    }
    let Ok(place) = st.receiving.clone().try_acquire_owned() else {
        return ApiError::overloaded("too many requests are being received at once: retry shortly").into_response();
    };
    let caller = match st.authenticate(req.headers()) {
        Ok(t) => Caller(t),
        Err(e) => return e.into_response(),
    };
    let admin = AppState::policy_of(&caller.0).admin;
    if req.method() == Method::POST && req.uri().path() == "/v1/tessera/modules" && !admin {
        return ApiError::forbidden(
            "only an admin key may publish or remove modules (`tessera tenants add NAME --admin`)",
        )
        .into_response();
    }
    let cap = body_cap(req.method(), req.uri().path(), admin, st.cfg.max_body_bytes);
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return ApiError::too_large(cap).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(st.cfg.body_read_timeout, axum::body::to_bytes(body, cap)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // axum reports the cap as "length limit exceeded".
            let too_long = format!("{e:#}").contains("length limit");
            return if too_long {
                ApiError::too_large(cap).into_response()
            } else {
                ApiError::invalid("body", &format!("the request body could not be read: {e}")).into_response()
            };
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
                &format!(
                    "the request body took longer than {} s to arrive",
                    st.cfg.body_read_timeout.as_secs()
                ),
            )
            .into_response()
        }
    };
    drop(place);
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(caller);
    openai_shaped(next.run(req).await)
}

/// Replaces the router's own plain-text rejections (a method the route
/// does not have, a body over a limit) with OpenAI-shaped error bodies.
fn openai_shaped(r: Response) -> Response {
    let json = r
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json") || v.contains("event-stream"));
    if json {
        return r;
    }
    match r.status() {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this route does not take that method: see the API reference for its method",
        )
        .into_response(),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            "the request body is too large",
        )
        .into_response(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => {
            ApiError::invalid("body", "the request body is not valid JSON for this route").into_response()
        }
        _ => r,
    }
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
    let draining = Arc::new(tokio::sync::Notify::new());
    let notify = draining.clone();
    let st = state.clone();
    let app = router(state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        st.draining.store(true, Ordering::SeqCst);
        notify.notify_waiters();
    });
    let deadline = async move {
        draining.notified().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.map_err(|e| Error::internal(format!("server: {e}"))),
        _ = deadline => {
            tracing::warn!("shutdown grace of {} s passed with requests still in flight; stopping", grace.as_secs());
            Ok(())
        }
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": if st.draining.load(Ordering::SeqCst) { "draining" } else { "ok" },
        "queued": st.admission.queued(),
        "members": st.rt.cards().len(),
        "unavailable_members": st.rt.pool_failures().len(),
    }))
}

async fn models(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.0;
    let policy = AppState::policy_of(&tenant);
    let created = now_unix();
    let mut data = Vec::new();
    for c in st.rt.cards() {
        if !TenantPolicy::allows(&policy.members, &c.id) || !st.rt.policy_allows(&c.id) {
            continue;
        }
        data.push(json!({
            "id": c.id, "object": "model", "created": created, "owned_by": c.contributor,
            "tessera": { "kind": "member", "status": "ready", "capabilities": c.capabilities,
                         "architecture": c.architecture, "parameters": c.parameters,
                         "description": c.description, "license": c.license },
        }));
    }
    for f in st.rt.pool_failures() {
        let id = f.member().unwrap_or("?");
        if !TenantPolicy::allows(&policy.members, id) {
            continue;
        }
        data.push(json!({
            "id": id, "object": "model", "created": created, "owned_by": "tessera",
            "tessera": { "kind": "member", "status": "unavailable", "reason": f.to_string() },
        }));
    }
    let published = st.registry.list()?;
    // A member's id answers as the member (see `resolve`): a system of the
    // same name is not listed twice.
    let member_ids: Vec<String> = st.rt.cards().into_iter().map(|c| c.id).collect();
    for (name, author, description) in st.standard_systems() {
        if published.iter().any(|e| e.name == name)
            || member_ids.contains(&name)
            || !TenantPolicy::allows(&policy.modules, &name)
        {
            continue;
        }
        data.push(json!({
            "id": name, "object": "model", "created": created, "owned_by": author,
            "tessera": { "kind": "system", "source": "standard", "description": description },
        }));
    }
    for e in published.into_iter().filter(|e| e.world == "strategy") {
        if member_ids.contains(&e.name) || !TenantPolicy::allows(&policy.modules, &e.name) {
            continue;
        }
        data.push(json!({
            "id": e.name, "object": "model", "created": e.published_at, "owned_by": e.author,
            "tessera": { "kind": "system", "source": "registry", "description": e.description, "sha256": e.sha256 },
        }));
    }
    Ok(Json(json!({ "object": "list", "data": data })))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", &format!("the request body is not valid: {e}")))
}

/// What a chat or completion asks, whichever route it came by.
struct Ask {
    chat: bool,
    model: String,
    input: Input,
    params: GenParams,
    config: std::collections::BTreeMap<String, String>,
    stream: bool,
    include_usage: bool,
}

impl Ask {
    fn new(chat: bool, model: String, input: Input, sampling: &openai::Sampling) -> Result<Self, ApiError> {
        // The input rule every face applies, before anything is queued:
        // the pool would refuse it too, but only after admission.
        input
            .check_size(0)
            .map_err(|e| ApiError::invalid(if chat { "messages" } else { "prompt" }, &e.to_string()))?;
        Ok(Ask {
            chat,
            model,
            input,
            params: sampling.params()?,
            config: sampling.config(),
            stream: sampling.stream,
            include_usage: sampling.include_usage(),
        })
    }
}

async fn respond(st: Arc<AppState>, caller: Caller, ask: Result<Ask, ApiError>) -> Response {
    match ask {
        Ok(ask) => answer(st, caller, ask).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(st): State<Arc<AppState>>, Extension(caller): Extension<Caller>, body: Bytes) -> Response {
    let ask = parse::<openai::ChatRequest>(&body)
        .and_then(|req| Ask::new(true, req.model.clone(), Input::Chat(req.messages()?), &req.sampling));
    respond(st, caller, ask).await
}

async fn completions(State(st): State<Arc<AppState>>, Extension(caller): Extension<Caller>, body: Bytes) -> Response {
    let ask = parse::<openai::CompletionRequest>(&body)
        .and_then(|req| Ask::new(false, req.model.clone(), Input::Prompt(req.prompt()?), &req.sampling));
    respond(st, caller, ask).await
}

/// Who answers a request.
enum Target {
    Member(String),
    System(Arc<Module>),
}

fn resolve(st: &AppState, caller: &Caller, policy: &TenantPolicy, model: &str, need: &str) -> Result<Target, ApiError> {
    if let Some(card) = st.rt.cards().into_iter().find(|c| c.id == model) {
        if !TenantPolicy::allows(&policy.members, model) || !st.rt.policy_allows(model) {
            return Err(ApiError::forbidden(&format!("this key may not use member `{model}`")));
        }
        if !card.capabilities.iter().any(|c| c == need) {
            return Err(ApiError::invalid(
                "model",
                &format!(
                    "member `{model}` cannot `{need}` (it can: {}): pick another member from /v1/models",
                    card.capabilities.join(", ")
                ),
            ));
        }
        return Ok(Target::Member(model.to_string()));
    }
    if let Some(f) = st.rt.pool_failures().iter().find(|f| f.member() == Some(model)) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "member_unavailable",
            &format!("member `{model}` is unavailable: {f}"),
        ));
    }
    if need != "generate" {
        return Err(ApiError::not_found(
            "model_not_found",
            &format!("no member `{model}` that can `{need}`: see /v1/models"),
        ));
    }
    match st.system(model)? {
        Some(_) if !TenantPolicy::allows(&policy.modules, model) => {
            Err(ApiError::forbidden(&format!("this key may not use system `{model}`")))
        }
        Some(m) => {
            if let Some(left) = st.breaker.check(&breaker_key(caller, &m.sha256)) {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "module_error",
                    "module_quarantined",
                    &format!(
                        "system `{model}` kept failing on this key's requests and is quarantined for it for {left} s \
                         (other keys are not affected): check the request's parameters, or ask its publisher to fix it"
                    ),
                );
                e.retry_after = Some(left);
                return Err(e);
            }
            Ok(Target::System(m))
        }
        None => Err(ApiError::not_found(
            "model_not_found",
            &format!("no member or system `{model}`: GET /v1/models lists them"),
        )),
    }
}

/// The breaker's record of `caller` running the module with `sha256`.
fn breaker_key(caller: &Caller, sha256: &str) -> String {
    format!("{}/{sha256}", caller.name())
}

fn member_provenance(member: &str, prompt: u32, completion: u32, ms: u64) -> Value {
    json!({
        "members": [member],
        "events": [ProvenanceEvent::HostCall {
            call: "generate".into(), model: member.into(), prompt_tokens: prompt,
            completion_tokens: completion, ms, outcome: "ok".into(),
        }],
    })
}

fn system_provenance(out: &crate::RunOutcome) -> Value {
    let mut members: Vec<&str> = Vec::new();
    for e in &out.provenance {
        if let ProvenanceEvent::HostCall { model, .. } = e {
            if !members.contains(&model.as_str()) {
                members.push(model);
            }
        }
    }
    json!({
        "members": members,
        "events": out.provenance,
        "annotations": out.annotations,
        "usage": out.usage,
    })
}

fn finish_name(f: crate::inference::FinishReason) -> &'static str {
    match f {
        crate::inference::FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn answer(st: Arc<AppState>, caller: Caller, ask: Ask) -> Response {
    let policy = AppState::policy_of(&caller.0);
    let target = match resolve(&st, &caller, &policy, &ask.model, "generate") {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let admitted = match st.admit(&caller.0).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if ask.stream {
        return stream(st, caller, policy, target, ask, admitted);
    }
    // The work runs in a task of its own, which holds the admission place
    // and bills the tenant when it ends. If the client goes away, this
    // handler is dropped and `_stop` raises `cancel`: a member stops
    // decoding at its next token and a module at its next epoch tick; what
    // was used until then is still charged.
    let cancel = Arc::new(AtomicBool::new(false));
    let _stop = CancelOnDrop(cancel.clone());
    let chat = ask.chat;
    let model = ask.model.clone();
    let st2 = st.clone();
    let work = tokio::spawn(async move {
        let _admitted = admitted;
        let limit = st2.cfg.request_timeout;
        let flag = cancel.clone();
        let sink: crate::inference::TextSink = Box::new(move |_: &str| !flag.load(Ordering::Relaxed));
        let sink = matches!(target, Target::Member(_)).then_some(sink);
        let run = run_target(&st2, &caller, &policy, &target, &ask, sink, Some(cancel));
        let (result, used) = match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => (Err(ApiError::timeout(limit)), 0),
        };
        st2.charge(&caller.0, used);
        result
    });
    let result = match work.await {
        Ok(r) => r,
        Err(e) => Err(ApiError::from(Error::internal(format!(
            "the request's task failed: {e}"
        )))),
    };
    match result {
        Ok(done) => {
            let id = st.id(if chat { "chatcmpl" } else { "cmpl" });
            let usage = openai::usage(done.prompt, done.completion);
            let body = openai::completion(
                chat,
                &id,
                now_unix(),
                &model,
                (&done.text, done.finish),
                usage,
                done.provenance,
            );
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Raises its flag when dropped: the handler of a request whose client
/// went away is dropped, and the work it started sees the flag.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A finished answer, whoever gave it.
struct Done {
    text: String,
    finish: &'static str,
    prompt: u64,
    completion: u64,
    provenance: Value,
}

/// Runs the member or system, and says how many tokens it used (billed
/// whether or not it succeeded). With `sink`, a member's text is streamed
/// into it as it is decoded (returning `false` stops it); `cancel` stops a
/// system's module.
async fn run_target(
    st: &AppState,
    caller: &Caller,
    policy: &TenantPolicy,
    target: &Target,
    ask: &Ask,
    sink: Option<crate::inference::TextSink>,
    cancel: Option<Arc<AtomicBool>>,
) -> (Result<Done, ApiError>, u64) {
    match target {
        Target::Member(id) => {
            let ctx = CallCtx::new(Instant::now() + st.cfg.request_timeout, CallCtx::next_requester());
            let started = Instant::now();
            let models = st.rt.models();
            let g = match sink {
                Some(s) => {
                    models
                        .generate_stream(ctx, id, ask.input.clone(), ask.params.clone(), s)
                        .await
                }
                None => models.generate(ctx, id, ask.input.clone(), ask.params.clone()).await,
            };
            let g = match g {
                Ok(g) => g,
                Err(crate::inference::InferenceError::Deadline) => {
                    return (Err(ApiError::timeout(st.cfg.request_timeout)), 0)
                }
                Err(e) => return (Err(ApiError::from(Error::from(e))), 0),
            };
            let ms = started.elapsed().as_millis() as u64;
            let used = u64::from(g.usage.prompt_tokens) + u64::from(g.usage.completion_tokens);
            let done = Done {
                provenance: member_provenance(id, g.usage.prompt_tokens, g.usage.completion_tokens, ms),
                text: g.text,
                finish: finish_name(g.finish),
                prompt: g.usage.prompt_tokens as u64,
                completion: g.usage.completion_tokens as u64,
            };
            (Ok(done), used)
        }
        Target::System(module) => {
            let req = RunRequest {
                input: ask.input.clone(),
                params: ask.params.clone(),
                config: ask.config.clone(),
            };
            let members: Option<Vec<String>> =
                (!policy.members.iter().any(|m| m == "*")).then(|| policy.members.clone());
            let (rt, m) = (st.rt.clone(), module.clone());
            let ran = st
                .guests
                .run(async move { rt.run_metered(&m, req, members.as_deref(), cancel).await })
                .await;
            let (out, usage) = match ran {
                Ok(r) => r,
                Err(e) => {
                    let e = Error::internal(format!("the module runtime stopped: {e}"));
                    return (Err(ApiError::from(e)), 0);
                }
            };
            let used = usage.prompt_tokens + usage.completion_tokens;
            st.breaker
                .record(&breaker_key(caller, &module.sha256), out.as_ref().map(|_| ()));
            let out = match out {
                Ok(o) => o,
                Err(e) => return (Err(ApiError::from(e)), used),
            };
            let done = Done {
                provenance: system_provenance(&out),
                text: out.text.clone(),
                finish: "stop",
                prompt: out.usage.prompt_tokens,
                completion: out.usage.completion_tokens,
            };
            (Ok(done), used)
        }
    }
}

fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn stream(
    st: Arc<AppState>,
    caller: Caller,
    policy: TenantPolicy,
    target: Target,
    ask: Ask,
    admitted: Admitted,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    let id = st.id(if ask.chat { "chatcmpl" } else { "cmpl" });
    let created = now_unix();
    let model = ask.model.clone();
    let chat = ask.chat;
    // The first event: the role, and for a system, that it will not stream.
    let mut first = openai::chunk(chat, &id, created, &model, Some(""), true, None);
    if let Target::System(m) = &target {
        first["tessera"] = json!({
            "streaming": "final-answer",
            "note": format!("system `{}` answers only when its strategy finishes: the answer arrives as one chunk", m.manifest.name),
        });
    }
    let _ = tx.send(event(&first));
    let pieces = tx.clone();
    let (id2, model2) = (id.clone(), model.clone());
    let sink: crate::inference::TextSink = Box::new(move |piece: &str| {
        pieces
            .send(event(&openai::chunk(
                chat,
                &id2,
                created,
                &model2,
                Some(piece),
                false,
                None,
            )))
            .is_ok()
    });
    tokio::spawn(async move {
        let _admitted = admitted;
        let limit = st.cfg.request_timeout;
        let streams_itself = matches!(target, Target::Member(_));
        // A system's module is stopped when the client goes away: the
        // stream's channel closes, which `watch` turns into `cancel`.
        let cancel = Arc::new(AtomicBool::new(false));
        let (flag, watch) = (cancel.clone(), tx.clone());
        let watcher = tokio::spawn(async move {
            watch.closed().await;
            flag.store(true, Ordering::Relaxed);
        });
        let work = run_target(
            &st,
            &caller,
            &policy,
            &target,
            &ask,
            streams_itself.then_some(sink),
            Some(cancel),
        );
        let (result, used) = match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => (Err(ApiError::timeout(limit)), 0),
        };
        watcher.abort();
        st.charge(&caller.0, used);
        match result {
            Ok(done) => {
                if !streams_itself {
                    let _ = tx.send(event(&openai::chunk(
                        chat,
                        &id,
                        created,
                        &model,
                        Some(&done.text),
                        false,
                        None,
                    )));
                }
                let mut last = openai::chunk(chat, &id, created, &model, None, false, Some(done.finish));
                last["provenance"] = done.provenance;
                let _ = tx.send(event(&last));
                if ask.include_usage {
                    let mut u = openai::chunk(chat, &id, created, &model, None, false, None);
                    u["choices"] = json!([]);
                    u["usage"] = openai::usage(done.prompt, done.completion);
                    let _ = tx.send(event(&u));
                }
            }
            Err(e) => {
                let _ = tx.send(event(&e.body()));
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}

async fn embeddings(State(st): State<Arc<AppState>>, Extension(caller): Extension<Caller>, body: Bytes) -> Response {
    let work = async {
        let req: openai::EmbeddingRequest = parse(&body)?;
        let texts = req.texts()?;
        if req.dimensions.is_some() {
            return Err(ApiError::invalid(
                "dimensions",
                "the embedding size is fixed by the model: leave `dimensions` unset",
            ));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    &format!("encoding_format `{other}`: use `float` or `base64`"),
                ))
            }
        };
        let tenant = caller.0.clone();
        let policy = AppState::policy_of(&tenant);
        let Target::Member(id) = resolve(&st, &caller, &policy, &req.model, "embed")? else {
            return Err(ApiError::invalid(
                "model",
                "systems do not embed: use an embedding member",
            ));
        };
        let _admitted = st.admit(&tenant).await?;
        let ctx = CallCtx::new(Instant::now() + st.cfg.request_timeout, CallCtx::next_requester());
        let tokens: u64 = texts.iter().map(|t| t.split_whitespace().count() as u64).sum();
        let vectors = tokio::time::timeout(st.cfg.request_timeout, st.rt.models().embed(ctx, &id, texts))
            .await
            .map_err(|_| ApiError::timeout(st.cfg.request_timeout))?
            .map_err(|e| ApiError::from(Error::from(e)))?;
        st.charge(&tenant, tokens);
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({ "object": "embedding", "index": i, "embedding": embedding })
            })
            .collect();
        Ok(Json(json!({
            "object": "list", "data": data, "model": id,
            // Whitespace words, an approximation: the embedder's own
            // tokenizer count is not returned by the backend.
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        })))
    };
    match work.await {
        Ok(j) => j.into_response(),
        Err(e) => e.into_response(),
    }
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if AppState::policy_of(&caller.0).admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only an admin key may publish or remove modules (`tessera tenants add NAME --admin`)",
        ))
    }
}

async fn modules_list(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "object": "list", "data": st.registry.list()? })))
}

async fn modules_show(
    State(st): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let e = st
        .registry
        .get(&name)?
        .ok_or_else(|| ApiError::not_found("module_not_found", &format!("no published module `{name}`")))?;
    let mut v = serde_json::to_value(&e).map_err(|e| ApiError::from(Error::internal(e.to_string())))?;
    v["manifest"] = Value::String(e.manifest_toml.clone());
    Ok(Json(v))
}

/// The upload body of `POST /v1/tessera/modules`.
#[derive(serde::Deserialize)]
struct Upload {
    /// The component, base64.
    wasm_base64: String,
    /// The manifest, TOML text.
    manifest: String,
    /// The publisher's signature (hex), if signed.
    signature: Option<String>,
}

async fn modules_publish(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_admin(&caller)?;
    let up: Upload = parse(&body)?;
    let wasm = base64::engine::general_purpose::STANDARD
        .decode(up.wasm_base64.trim())
        .map_err(|e| ApiError::invalid("wasm_base64", &format!("not base64: {e}")))?;
    let st2 = st.clone();
    // Validation and precompilation are CPU work: off the async threads.
    let entry = tokio::task::spawn_blocking(move || {
        publish_checked(
            &st2.registry,
            st2.rt.as_ref(),
            &wasm,
            &up.manifest,
            up.signature.as_deref(),
        )
    })
    .await
    .map_err(|e| ApiError::from(Error::internal(format!("publish task: {e}"))))??;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(&entry).unwrap_or(Value::Null)),
    ))
}

async fn modules_remove(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&caller)?;
    if !st.registry.remove(&name)? {
        return Err(ApiError::not_found(
            "module_not_found",
            &format!("no published module `{name}`"),
        ));
    }
    st.modules.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
    Ok(Json(json!({ "removed": name })))
}

/// Publishes with the checks both faces (CLI and HTTP) apply: a published
/// module may not take the name of a standard one, and the trusted keys are
/// read fresh, so a key the operator just trusted counts at once.
pub fn publish_checked(
    registry: &Registry,
    rt_or_sandbox: &dyn PublishHost,
    wasm: &[u8],
    manifest_toml: &str,
    signature: Option<&str>,
) -> Result<crate::registry::Entry, Error> {
    let name = toml::from_str::<crate::policy::Manifest>(manifest_toml)
        .map(|m| m.name)
        .unwrap_or_default();
    if crate::installed_modules(rt_or_sandbox.paths())
        .iter()
        .any(|m| m.name == name)
    {
        return Err(Error::config(format!(
            "`{name}` is the name of a standard module: choose another `name` in the manifest"
        )));
    }
    if rt_or_sandbox.member_ids().iter().any(|m| *m == name) {
        return Err(Error::config(format!(
            "`{name}` is the id of a pool member: choose another `name` in the manifest"
        )));
    }
    let trusted = TrustedKeys::load(&registry.dir().join("trusted-keys"))?;
    registry.publish(
        rt_or_sandbox.sandbox(),
        &trusted,
        Publication {
            wasm,
            manifest_toml,
            signature: signature.map(str::as_bytes),
        },
    )
}

/// What publishing needs from its caller: a sandbox to validate and
/// precompile with, and the paths (to see the standard modules).
pub trait PublishHost {
    /// The sandbox.
    fn sandbox(&self) -> &crate::sandbox::Sandbox;
    /// The paths.
    fn paths(&self) -> &crate::Paths;
    /// The pool's member ids, which no module may take (none without a pool).
    fn member_ids(&self) -> Vec<String> {
        Vec::new()
    }
}

impl PublishHost for Runtime {
    fn member_ids(&self) -> Vec<String> {
        self.cards().into_iter().map(|c| c.id).collect()
    }
    fn sandbox(&self) -> &crate::sandbox::Sandbox {
        Runtime::sandbox(self)
    }
    fn paths(&self) -> &crate::Paths {
        Runtime::paths(self)
    }
}

/// A sandbox without a pool, for the CLI's `modules publish`.
pub struct SandboxHost {
    /// The sandbox.
    pub sandbox: crate::sandbox::Sandbox,
    /// The paths.
    pub paths: crate::Paths,
}

impl PublishHost for SandboxHost {
    fn sandbox(&self) -> &crate::sandbox::Sandbox {
        &self.sandbox
    }
    fn paths(&self) -> &crate::Paths {
        &self.paths
    }
}

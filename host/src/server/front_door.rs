//! The front door every request passes first (see [`front_door`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::registry::tenants::Tenant;

use super::*;

/// The largest body `method path` may carry for a caller (`admin` or not).
pub(crate) fn body_cap(method: &Method, path: &str, admin: bool, upload: usize) -> usize {
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
pub(crate) async fn front_door(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // Liveness and the console's page (which holds no data: it asks the
    // API with the key the user types) need no key.
    if req.uri().path() == "/health"
        || (req.method() == Method::GET && super::console::is_console_path(req.uri().path()))
    {
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
pub(crate) fn openai_shaped(r: Response) -> Response {
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

/// Who is calling, as the front door authenticated them from the headers
/// (`None`: the server runs without keys).
#[derive(Clone)]
pub struct Caller(pub Option<Tenant>);

impl Caller {
    /// The key the breaker counts this caller's failures under.
    pub(crate) fn name(&self) -> &str {
        self.0.as_ref().map_or("", |t| t.name.as_str())
    }
}

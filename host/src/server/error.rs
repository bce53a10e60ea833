//! The API's errors: OpenAI's shape, and a status that says whose fault it is.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::Error;

/// An API failure: status, OpenAI error `type`, `code`, `param`, message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) code: String,
    pub(crate) param: Option<String>,
    pub(crate) message: String,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, code: &str, message: &str) -> Self {
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

    pub(crate) fn unauthorized(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    pub(crate) fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    /// A 413 naming the route's limit.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            &format!("the request body is over this route's limit of {limit} bytes: send less"),
        )
    }

    pub(crate) fn not_found(code: &str, message: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", code, message)
    }

    /// The client closed the connection before the answer was ready (as
    /// nginx's 499); nobody reads this answer, but logs and metrics do.
    pub(crate) fn client_gone() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "client_closed_request",
            "the client closed the connection before the answer was ready",
        )
    }

    pub(crate) fn timeout(limit: Duration) -> Self {
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
    pub(crate) fn body(&self) -> Value {
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

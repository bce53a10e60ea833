//! The web console: one page, served by `tessera serve` on its own port.
//!
//! `GET /` redirects to `/ui/`; `/ui/` is the page and `/ui/console.js` /
//! `/ui/console.css` its script and style, compiled into the binary
//! (`include_str!`), so the console works offline and a running server never
//! fetches anything for it. The page holds no data: it asks the API with the
//! caller's key, which the user types once; the page keeps it in the tab's
//! `sessionStorage` and sends it only as `Authorization: Bearer`, never in a
//! URL. That is why these three routes are the only ones (with `/health`)
//! the front door lets through without a key.
//!
//! Views: **Compare** (up to four members or systems asked one question,
//! answers streamed side by side, each with its provenance: a timeline of
//! its host calls, the module's steps and annotations, tokens and time),
//! **Pool** (members with their cards and status), **Modules** (the
//! registry and the standard systems; admins publish and remove) and
//! **Reports** (evaluation reports under `tessera serve --reports DIR`,
//! see [`super::reports`]).

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// What the page may load and talk to: only this server, and plots drawn
/// from `blob:` URLs the page made itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the console's own routes (no key needed).
pub(crate) fn is_console_path(path: &str) -> bool {
    matches!(path, "/" | "/ui" | "/ui/" | "/ui/console.js" | "/ui/console.css")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

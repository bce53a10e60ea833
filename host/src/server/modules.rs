//! `GET/POST /v1/tessera/modules` and `GET/DELETE /v1/tessera/modules/{name}`:
//! the registry over HTTP (publishing itself is [`crate::registry::publish`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::Error;

use super::*;

pub(crate) fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if AppState::policy_of(&caller.0).admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only an admin key may publish or remove modules (`tessera tenants add NAME --admin`)",
        ))
    }
}

pub(crate) async fn modules_list(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "object": "list", "data": st.registry.list()? })))
}

pub(crate) async fn modules_show(
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
pub(crate) struct Upload {
    /// The component, base64.
    wasm_base64: String,
    /// The manifest, TOML text.
    manifest: String,
    /// The publisher's signature (hex), if signed.
    signature: Option<String>,
}

pub(crate) async fn modules_publish(
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

pub(crate) async fn modules_remove(
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

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

pub(crate) async fn modules_list(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let mut data = Vec::new();
    let pool = member_ids(&st);
    for e in st.registry.list()? {
        let mut v = serde_json::to_value(&e).map_err(|e| ApiError::from(Error::internal(e.to_string())))?;
        annotate(&st, &caller, &pool, &mut v, e.manifest().as_ref(), Some(&e.sha256));
        data.push(v);
    }
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Adds to a module's listing what an operator or user needs to see before
/// calling it: the budgets it is granted (its manifest's ask capped by the
/// operator's policy) per request and for its `fit`, and its quarantine
/// state. Quarantine is kept per
/// caller ([`breaker`]): a caller sees whether the module is quarantined
/// for its own key; an admin also sees how many keys have it quarantined.
/// The pool's member ids, which grants are computed over.
pub(crate) fn member_ids(st: &AppState) -> Vec<String> {
    st.rt.cards().into_iter().map(|c| c.id).collect()
}

/// `pool` is [`member_ids`], computed once per listing.
pub(crate) fn annotate(
    st: &AppState,
    caller: &Caller,
    pool: &[String],
    v: &mut Value,
    manifest: Option<&crate::policy::Manifest>,
    sha256: Option<&str>,
) {
    if let Some(m) = manifest {
        let g = st.rt.policy().grant(m, pool);
        v["budgets"] = json!({
            "deadline_ms": g.deadline.as_millis() as u64,
            "memory_mib": g.memory_bytes >> 20,
            "fuel": g.fuel,
            "host_calls": g.host_calls,
            "tokens": g.tokens,
            "output_bytes": g.output_bytes,
            "members": g.models.len(),
        });
        // What its `fit` may use (run by the operator, not per request):
        // the manifest's fit ask capped by the policy's fit maxima.
        let f = st.rt.policy().fit_grant(m, pool);
        v["fit_budgets"] = json!({
            "deadline_ms": f.deadline.as_millis() as u64,
            "host_calls": f.host_calls,
            "tokens": f.tokens,
            "train_runs": f.train_runs,
            "train_steps": f.train_steps,
            "train_tokens": f.train_tokens,
            "train_ms": f.train_time.as_millis() as u64,
        });
    }
    let Some(sha) = sha256 else {
        v["quarantine"] = json!({ "for_this_key_s": Value::Null });
        return;
    };
    let mine = st.breaker.check(&super::chat::breaker_key(caller, sha));
    let mut q = json!({ "for_this_key_s": mine });
    if AppState::policy_of(&caller.0).admin {
        let suffix = format!("/{sha}");
        q["keys"] = json!(st.breaker.quarantined_matching(|k| k.ends_with(&suffix)).len());
    }
    v["quarantine"] = q;
}

pub(crate) async fn modules_show(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let e = st
        .registry
        .get(&name)?
        .ok_or_else(|| ApiError::not_found("module_not_found", &format!("no published module `{name}`")))?;
    let mut v = serde_json::to_value(&e).map_err(|e| ApiError::from(Error::internal(e.to_string())))?;
    v["manifest"] = Value::String(e.manifest_toml.clone());
    annotate(
        &st,
        &caller,
        &member_ids(&st),
        &mut v,
        e.manifest().as_ref(),
        Some(&e.sha256),
    );
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

impl Upload {
    /// The component's bytes; not base64 is the caller's fault.
    pub(crate) fn decode(&self) -> Result<Vec<u8>, ApiError> {
        base64::engine::general_purpose::STANDARD
            .decode(self.wasm_base64.trim())
            .map_err(|e| ApiError::invalid("wasm_base64", &format!("not base64: {e}")))
    }
}

pub(crate) async fn modules_publish(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_admin(&caller)?;
    let up: Upload = parse(&body)?;
    let wasm = up.decode()?;
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

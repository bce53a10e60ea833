//! `GET /health` and `GET /v1/models`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::Json;
use serde_json::{json, Value};

use crate::registry::tenants::TenantPolicy;

use super::*;

pub(crate) async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": if st.draining.load(Ordering::SeqCst) { "draining" } else { "ok" },
        "queued": st.admission.queued(),
        "members": st.rt.cards().len(),
        "unavailable_members": st.rt.pool_failures().len(),
    }))
}

pub(crate) async fn models(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let policy = AppState::policy_of(&caller.0);
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
    for (name, manifest) in st.standard_systems() {
        if published.iter().any(|e| e.name == name)
            || member_ids.contains(&name)
            || !TenantPolicy::allows(&policy.modules, &name)
        {
            continue;
        }
        let mut t = json!({ "kind": "system", "source": "standard", "description": manifest.description,
                            "version": manifest.version });
        super::modules::annotate(
            &st,
            &caller,
            &member_ids,
            &mut t,
            Some(&manifest),
            st.loaded_sha256(&name).as_deref(),
        );
        data.push(json!({
            "id": name, "object": "model", "created": created, "owned_by": manifest.author, "tessera": t,
        }));
    }
    for e in published
        .into_iter()
        .filter(|e| e.world == crate::policy::World::Strategy)
    {
        if member_ids.contains(&e.name) || !TenantPolicy::allows(&policy.modules, &e.name) {
            continue;
        }
        let mut t = json!({ "kind": "system", "source": "registry", "description": e.description,
                            "sha256": e.sha256, "version": e.version });
        super::modules::annotate(
            &st,
            &caller,
            &member_ids,
            &mut t,
            e.manifest().as_ref(),
            Some(&e.sha256),
        );
        data.push(json!({
            "id": e.name, "object": "model", "created": e.published_at, "owned_by": e.author, "tessera": t,
        }));
    }
    Ok(Json(json!({ "object": "list", "data": data })))
}

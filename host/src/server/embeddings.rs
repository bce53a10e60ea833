//! `POST /v1/embeddings`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::inference::CallCtx;

use super::*;

pub(crate) async fn embeddings(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
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
        let Target::Member(id) =
            resolve(&st, &caller, &policy, &req.model, crate::inference::Capability::Embed).await?
        else {
            return Err(ApiError::invalid(
                "model",
                "systems do not embed: use an embedding member",
            ));
        };
        let deadline = st.deadline();
        let _admitted = st.admit(&tenant, deadline).await?;
        let ctx = CallCtx::new(deadline, CallCtx::next_requester());
        let bytes = texts.iter().map(String::len).sum();
        let call = st.rt.models().embed(ctx, &id, texts);
        let embedded = st.until_cut(&tenant, deadline, bytes, call).await?;
        let tokens = embedded.tokens;
        st.charge(&tenant, tokens);
        let data: Vec<Value> = embedded
            .vectors
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
            // The embedder's own tokens.
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        })))
    };
    match work.await {
        Ok(j) => j.into_response(),
        Err(e) => e.into_response(),
    }
}

//! Embedding many texts through an embedding member, within the host's
//! limits, and finding that member in a pool.
//!
//! The host caps one `embed` call at [`EMBED_BATCH`] texts and bounds the
//! bytes of input a call may carry; these helpers split a long list into
//! as few calls as fit and check that every vector came back with the same
//! width, so a router's training loop can take the result as a matrix.

use crate::{embed, Error, ModelInfo};

/// Texts per `embed` call: the host's batch limit.
pub const EMBED_BATCH: usize = 256;
/// Bytes of text per `embed` call, kept well under the host's input limit.
pub const EMBED_BYTES: usize = 128 << 10;

/// The embedding member: `wanted` if it names a granted member that can
/// `embed`, else (with no `wanted`) the first such member. `method` names
/// the caller in the error when there is none.
pub fn pick_embedder(pool: &[ModelInfo], wanted: Option<&str>, method: &str) -> Result<ModelInfo, Error> {
    let can_embed = |m: &ModelInfo| m.capabilities.iter().any(|c| c == "embed");
    match wanted {
        Some(id) => pool
            .iter()
            .find(|m| m.id == id && can_embed(m))
            .cloned()
            .ok_or_else(|| {
                Error::InvalidParams(format!("config `embedder` = `{id}` is not a granted embedding member"))
            }),
        None => {
            pool.iter().find(|m| can_embed(m)).cloned().ok_or_else(|| {
                Error::Unsupported(format!("{method} needs a granted member with the `embed` capability"))
            })
        }
    }
}

/// Embeds `texts` with `model` in as few calls as the host's limits allow;
/// every vector has the same, non-zero width.
pub fn embed_all(model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, Error> {
    let mut out = Vec::with_capacity(texts.len());
    let mut start = 0;
    while start < texts.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < texts.len()
            && end - start < EMBED_BATCH
            && (end == start || bytes + texts[end].len() <= EMBED_BYTES)
        {
            bytes += texts[end].len();
            end += 1;
        }
        let part = embed(model, &texts[start..end])?;
        if part.len() != end - start {
            return Err(Error::ModuleFailed(format!(
                "{model} returned {} embeddings for {} texts",
                part.len(),
                end - start
            )));
        }
        out.extend(part);
        start = end;
    }
    if let Some(first) = out.first() {
        let dim = first.len();
        if dim == 0 || out.iter().any(|v| v.len() != dim) {
            return Err(Error::ModuleFailed(format!(
                "{model} returned embeddings of uneven width"
            )));
        }
    }
    Ok(out)
}

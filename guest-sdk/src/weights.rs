//! Helpers for weight-level strategies: which members can be merged with
//! which, and answering through a (possibly merged) member.

use crate::{generate, trace, Error, ModelInfo, Request, Response};

/// The members of `pool` that look mergeable with `with`: same architecture
/// and parameter count (a merge of models that do not share a base is
/// refused by the host anyway; this avoids asking). `with` comes first.
pub fn compatible(with: &ModelInfo, pool: &[ModelInfo]) -> Vec<ModelInfo> {
    let mut out = vec![with.clone()];
    out.extend(
        pool.iter()
            .filter(|m| m.id != with.id && m.architecture == with.architecture && m.parameters == with.parameters)
            .cloned(),
    );
    out
}

/// Answers `req` with member `model` (the request's decoding parameters),
/// tracing the role; the response's annotations say which member answered.
pub fn answer_with(model: &str, req: &Request, note: &str) -> Result<Response, Error> {
    let g = generate(model, &req.input, &req.params)?;
    trace(Some(model), "answerer", note);
    Ok(Response {
        text: g.text,
        annotations: vec![("answered_by".into(), model.to_string())],
    })
}

/// The comma-separated member list under `key`, checked against the
/// granted `pool`; `None` when the key is unset.
pub fn members_from(config: &crate::Config, key: &str, pool: &[ModelInfo]) -> Result<Option<Vec<String>>, Error> {
    let Some(list) = config.get(key) else {
        return Ok(None);
    };
    let ids: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = ids.iter().find(|id| !pool.iter().any(|m| &&m.id == id)) {
        return Err(crate::config::invalid(key, bad, "not a granted generative member"));
    }
    Ok(Some(ids))
}

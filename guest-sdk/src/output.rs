//! Streaming the answer to the caller while the strategy still runs
//! (`tessera:collab/output`, WIT 0.1.2).
//!
//! A caller that asked for a stream (`stream: true` over HTTP) receives
//! what a strategy sends here at once, instead of the whole answer when
//! `run` returns. The contract: everything sent is the *beginning* of the
//! answer, so the [`Response`](crate::Response) `run` returns must start
//! with all of it, in order (it may add more after it, which the host sends
//! last). Break it and the run fails with `module-failed`, streamed or not.
//! Without a streaming caller both functions work the same and nothing
//! leaves early, so a strategy needs no second code path.
//!
//! The usual shape: consult the pool as usual, then write the answer with
//! [`generate_streamed`] as the final stage and return its text:
//!
//! ```ignore
//! let drafts = fan_out(&jobs);                       // the members answer
//! let fused = output::generate_streamed(&fuser, &prompt_with(drafts), &req.params)?;
//! Ok(Response { text: fused.text, annotations: vec![] })
//! ```

use crate::bindings::strategy::tessera::collab::output as host;
use crate::{Error, GenParams, Generation, Input};

/// [`generate`](crate::generate) on `model`, with every token also sent to
/// the caller as it decodes. Returns the whole generation, like
/// `generate`; its text is what was sent.
pub fn generate_streamed(model: &str, input: &Input, params: &GenParams) -> Result<Generation, Error> {
    host::generate_streamed(model, input, params)
}

/// Sends `text` to the caller now, as the next piece of the answer. Each
/// write counts as one host call, so send pieces worth sending; an empty
/// one sends nothing.
pub fn write(text: &str) {
    host::write(text)
}

//! The host side of the `output` import (WIT 0.1.2): a strategy streams
//! the beginning of its answer while it is still running.
//!
//! A caller that asked for a stream hands the run a [`TextSink`]; without
//! one, the same calls run and nothing leaves early, so a module behaves
//! the same whether or not its caller streams. The rule that keeps a stream
//! honest is checked once, when the module returns: its answer must begin
//! with everything it sent ([`begins_with_streamed`]). A client that reads
//! the stream and one that waits for the whole answer get the same text.
//!
//! Streamed text counts against the module's output budget as it is sent
//! (a module cannot stream without bound and fail before returning), and a
//! streamed generation stops at the budget like any other runaway output.

use std::sync::{Arc, Mutex};

use super::host::RequestState;
use crate::bindings::{output, types as w};
use crate::inference::TextSink;
use crate::Error;

/// What a run has streamed so far, and where it goes.
pub struct Streamed {
    /// The caller's end of the stream; `None` when the caller did not ask
    /// for one (the text is still kept, for the final check).
    sink: Option<TextSink>,
    /// Everything sent, in order.
    pub(crate) text: String,
    /// Set when a streamed generation was stopped at the output budget.
    over: bool,
}

impl Streamed {
    /// A stream to `sink` (or to nobody).
    pub fn new(sink: Option<TextSink>) -> Self {
        Streamed {
            sink,
            text: String::new(),
            over: false,
        }
    }

    /// Appends `piece` and sends it on; `false` when the caller has gone.
    fn send(&mut self, piece: &str) -> bool {
        self.text.push_str(piece);
        match self.sink.as_mut() {
            Some(sink) => sink(piece),
            None => true,
        }
    }

    /// [`Self::send`] if the output budget `cap` allows `piece`; otherwise
    /// the stream is marked over and nothing is sent (`None`).
    fn send_within(&mut self, piece: &str, cap: u64) -> Option<bool> {
        if self.over || (self.text.len() + piece.len()) as u64 > cap {
            self.over = true;
            return None;
        }
        Some(self.send(piece))
    }
}

/// A sink for one streamed generation: every piece goes through `streamed`
/// while the output budget `cap` allows. Returns it with the number of
/// bytes sent before the generation began.
pub(super) fn forwarder(streamed: &Arc<Mutex<Streamed>>, cap: u64) -> (TextSink, usize) {
    let before = streamed.lock().unwrap_or_else(|e| e.into_inner()).text.len();
    let streamed = streamed.clone();
    let sink: TextSink = Box::new(move |piece: &str| {
        let mut s = streamed.lock().unwrap_or_else(|e| e.into_inner());
        s.send_within(piece, cap).unwrap_or(false)
    });
    (sink, before)
}

/// `Ok` when `answer` begins with everything `sent`; otherwise the module
/// broke the `output` contract.
pub(super) fn begins_with_streamed(answer: &str, sent: &str) -> Result<(), Error> {
    if answer.starts_with(sent) {
        return Ok(());
    }
    Err(Error::ModuleFailed {
        message: format!(
            "it streamed {} bytes of its answer through `output` but returned an answer that does not begin \
             with them: a streaming strategy returns what it streamed followed by the rest",
            sent.len()
        ),
    })
}

impl RequestState {
    /// After a streamed generation: the budget check, and whatever of the
    /// generation's final text its stream did not carry (a backend that
    /// streams nothing sends it all here), so what was streamed is the
    /// generation's text.
    pub(super) fn settle_stream(&mut self, text: Option<&str>, sent_before: usize) -> wasmtime::Result<()> {
        let cap = self.grant.output_bytes;
        let over = {
            let mut s = self.output.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(text) = text {
                let carried = s.text.get(sent_before..).unwrap_or("").to_string();
                if let Some(rest) = text.strip_prefix(carried.as_str()) {
                    if !rest.is_empty() {
                        s.send_within(rest, cap);
                    }
                }
            }
            s.over
        };
        if over {
            return Err(self.violate(Error::budget("output-size", cap)));
        }
        Ok(())
    }
}

impl output::Host for RequestState {
    async fn generate_streamed(
        &mut self,
        model: String,
        input: w::Input,
        params: w::GenParams,
    ) -> wasmtime::Result<Result<w::Generation, w::Error>> {
        let _busy = self.host_calls.enter();
        self.generate_on(model, input, params, true).await
    }

    async fn write(&mut self, text: String) -> wasmtime::Result<()> {
        let _busy = self.host_calls.enter();
        // Each piece becomes an event of its own on the caller's stream,
        // worth a couple of hundred bytes whatever its text: were pieces
        // free, a module writing empty or one-byte pieces would queue
        // gigabytes of events for a slow reader within its output budget.
        // So a write is a host call, and an empty one sends nothing.
        self.charge_calls(1)?;
        if text.is_empty() {
            return Ok(());
        }
        let cap = self.grant.output_bytes;
        // A caller that went away is the cancel flag's business.
        let over = self
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_within(&text, cap)
            .is_none();
        if over {
            return Err(self.violate(Error::budget("output-size", cap)));
        }
        Ok(())
    }
}

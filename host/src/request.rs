//! What a face hands the runtime, and what it gets back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inference::{GenParams, Input};

/// One request to a collaboration system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// The question or chat.
    pub input: Input,
    /// Decoding defaults for the module to pass on.
    #[serde(default)]
    pub params: GenParams,
    /// Hyperparameters, overlaid on the manifest's `[config]`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl RunRequest {
    /// A single-turn chat with default parameters.
    pub fn chat(prompt: impl Into<String>) -> Self {
        RunRequest {
            input: Input::Chat(vec![crate::inference::Message::user(prompt)]),
            params: GenParams::default(),
            config: BTreeMap::new(),
        }
    }
}

/// One entry of a response's provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum ProvenanceEvent {
    /// A model call the host served.
    HostCall {
        /// `generate`, `score`, `next-token`, `embed`.
        call: String,
        /// The member.
        model: String,
        /// Prompt tokens (generate) or continuation tokens scored (score).
        prompt_tokens: u32,
        /// Tokens generated.
        completion_tokens: u32,
        /// Prompt tokens the member read from its prefix cache rather than
        /// computed (generate, score; 0 elsewhere).
        #[serde(default, skip_serializing_if = "is_zero")]
        cached_tokens: u32,
        /// When the call began, in ms after the request's own start: with
        /// `ms` it places the call on a timeline, so calls that overlapped
        /// (a module's parallel fan-out) show as overlapping. 0 in records
        /// written before it existed.
        #[serde(default)]
        start_ms: u64,
        /// Wall time of the call.
        ms: u64,
        /// `ok`, or the error kind.
        outcome: String,
    },
    /// A step the module reported through `trace.emit`.
    ModuleStep {
        /// The member concerned, if any.
        model: Option<String>,
        /// Its role in this step.
        role: String,
        /// Why / what was decided.
        note: String,
    },
}

/// What a request consumed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Host calls made (each fan-out job counts).
    pub host_calls: u32,
    /// Prompt tokens across generate, score and next-token calls (a
    /// score call's prompt counts once, however many continuations it
    /// has), and texts read by `embed`.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Prompt tokens of generate and score calls that members read from
    /// their prefix caches rather than computed.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Continuation tokens the module had members `score` (likelihood
    /// methods cost these instead of generated tokens).
    #[serde(default)]
    pub scored_tokens: u64,
    /// Tokens put through training runs (`train`), forward and backward,
    /// failed and stopped runs included.
    #[serde(default)]
    pub train_tokens: u64,
    /// Fuel the module burned.
    pub fuel: u64,
    /// Wall time of the whole request.
    pub wall_ms: u64,
    /// Wall time the module held its instance (and its caller's place)
    /// outside host calls: computing, or waiting on its own, such as in a
    /// WASI sleep. Host calls are charged by their tokens; this is the
    /// rest, charged as [`UsageReport::charged`] says.
    #[serde(default)]
    pub held_ms: u64,
}

impl UsageReport {
    /// What a tenant's daily token quota is charged for this usage: every
    /// token a member read or wrote, each trained token
    /// [`TRAIN_TOKEN_WEIGHT`] times, and the module's own time: its
    /// computing at a token per [`FUEL_PER_CHARGED_TOKEN`] of fuel, or the
    /// time it held its place outside host calls at a token per
    /// [`HELD_MS_PER_CHARGED_TOKEN`], whichever is more (computing is
    /// held time too, so the two are not added).
    pub fn charged(&self) -> u64 {
        let own = (self.fuel / FUEL_PER_CHARGED_TOKEN).max(self.held_ms / HELD_MS_PER_CHARGED_TOKEN);
        self.charged_for_members().saturating_add(own)
    }

    /// [`UsageReport::charged`] without the module's own time: what its
    /// members read, wrote and trained.
    pub fn charged_for_members(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.scored_tokens)
            .saturating_add(self.completion_tokens)
            .saturating_add(self.train_tokens.saturating_mul(TRAIN_TOKEN_WEIGHT))
    }
}

/// How much of a module's fuel (roughly, WebAssembly instructions) is
/// charged as one token. Without it a module that computes instead of
/// calling members (a long search, a spin up to its fuel budget) would cost
/// its tenant nothing, and one tenant could keep the host's cores busy
/// within its token quota. The rate prices a module's CPU time near a
/// member's: on the 2-core reference machine a tight wasm loop burns 5-10
/// billion fuel a second (the hostile spin: 2.7-5.2 billion in its 500 ms),
/// so a token's worth is 1-2 ms of computing, about what the smallest
/// member (SmolLM2-135M) takes to read one prompt token. A request at the
/// default fuel budget (2 billion) can be charged 200 tokens for its
/// computing; the library's strategies burn 30,000-300,000 fuel per
/// request (measured: first-responder to slm-mux), so their bills do not
/// change. Interpreted guests cost more: majority vote in Python burned
/// 2 million, in JavaScript 15 million (a token) per request.
pub const FUEL_PER_CHARGED_TOKEN: u64 = 10_000_000;

/// How many milliseconds of a module holding its place outside host calls
/// are charged as one token ([`UsageReport::held_ms`]). A module that
/// waits on its own (a WASI sleep until its deadline) burns no fuel and
/// calls no member, so before this it held an instance and its caller's
/// admission place for free, for as long as its deadline allowed. Waiting
/// uses no core, so it is priced well below computing (a token per 1-2
/// ms, [`FUEL_PER_CHARGED_TOKEN`]) and below a member decoding in the same
/// place (a token every 5-30 ms here): a sleep to a 30 s deadline costs
/// 300 tokens. The library's strategies hold their instances a few
/// milliseconds outside their model calls, which rounds to nothing.
pub const HELD_MS_PER_CHARGED_TOKEN: u64 = 100;

/// How many read tokens' worth one trained token is charged: a training
/// pass runs the forward pass and a backward pass of about twice its
/// cost.
pub const TRAIN_TOKEN_WEIGHT: u64 = 3;

/// A successful answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutcome {
    /// The answer.
    pub text: String,
    /// Method-specific facts (e.g. `agreement`).
    pub annotations: BTreeMap<String, String>,
    /// Who did what, in order.
    pub provenance: Vec<ProvenanceEvent>,
    /// What it cost.
    pub usage: UsageReport,
    /// Whose generated text reached the answer, largest share first
    /// ([`crate::attribution`]); empty when no member's wording is in it
    /// (an answer chosen by likelihood, or rewritten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attribution: Vec<crate::attribution::Attribution>,
}

/// One labelled dev example for `fit`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// The question.
    pub input: Input,
    /// The reference answer.
    pub answer: String,
    /// Options, for multiple choice.
    #[serde(default)]
    pub choices: Vec<String>,
}

/// `text` safe to print on a terminal: control characters other than
/// newline and tab (escape sequences that could move the cursor, rewrite
/// earlier lines or retitle the window) are shown as `\u{..}` instead of
/// being sent. Module text is untrusted, so every face that prints it to a
/// terminal passes it through here; JSON output is escaped by its encoder.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Serde's test for leaving a zero count out of the JSON.
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn terminal_escapes_are_shown_not_sent() {
        let hostile = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nline\ttab";
        let shown = super::printable(hostile);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{shown:?}"
        );
        assert!(shown.starts_with("ok\\u{1b}]0;pwned"), "{shown}");
        assert!(shown.ends_with("\nline\ttab"), "{shown}");
    }

    #[test]
    fn a_modules_own_time_is_charged_once_as_fuel_or_as_held_time() {
        use super::{UsageReport, FUEL_PER_CHARGED_TOKEN, HELD_MS_PER_CHARGED_TOKEN};
        let tokens = UsageReport {
            prompt_tokens: 10,
            completion_tokens: 5,
            ..Default::default()
        };
        assert_eq!(tokens.charged(), 15);
        // Computing for 30 ms is held time too: charged as fuel alone.
        let computing = UsageReport {
            fuel: 30 * FUEL_PER_CHARGED_TOKEN,
            held_ms: 30,
            ..tokens.clone()
        };
        assert_eq!(computing.charged(), 45);
        // Asleep for 10 s: no fuel, charged for the place it held.
        let asleep = UsageReport {
            fuel: 1_000,
            held_ms: 10_000,
            ..tokens.clone()
        };
        assert_eq!(asleep.charged(), 15 + 10_000 / HELD_MS_PER_CHARGED_TOKEN);
        // A few milliseconds outside its calls, as the library's
        // strategies take, round to nothing.
        let quick = UsageReport {
            held_ms: HELD_MS_PER_CHARGED_TOKEN - 1,
            ..tokens
        };
        assert_eq!(quick.charged(), 15);
    }
}

//! # tessera-sdk: write a collaboration strategy
//!
//! A strategy is a small crate built for `wasm32-wasip2`. It sees the pool of
//! contributed models only through the functions here ([`models`],
//! [`generate`], [`fan_out`], [`score`], ...), records what it did with
//! [`trace`], and exports itself with [`export_strategy!`]. The host runs it
//! in a sandbox with a deadline, memory cap, fuel and call/token budgets; a
//! strategy should expect any call to fail and fall back sensibly.
//!
//! ```ignore
//! use tessera_sdk::*;
//!
//! struct FirstMember;
//!
//! impl Strategy for FirstMember {
//!     fn run(req: Request) -> Result<Response, Error> {
//!         let member = generators().into_iter().next()
//!             .ok_or_else(|| Error::ModuleFailed("the pool has no generative member".into()))?;
//!         let answer = generate(&member.id, &req.input, &req.params)?;
//!         trace(Some(&member.id), "answerer", "the only call");
//!         Ok(Response { text: answer.text, annotations: vec![] })
//!     }
//! }
//!
//! export_strategy!(FirstMember);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` and put a
//! manifest (`NAME.toml`, see the README) beside the `.wasm`.

pub mod answer;
pub mod config;

/// The raw bindings of the contract, generated in this one place.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "strategy",
        pub_export_macro: true,
        export_macro_name: "__export_strategy_world",
        default_bindings_module: "tessera_sdk::bindings",
    });
}

pub use bindings::tessera::collab::trace::Step;
pub use bindings::tessera::collab::types::{
    Budget, Candidate, Error, Example, FinishReason, GenParams, Generation, Input, Job, Message, ModelInfo, Request,
    Response, Scored, TokenLogprob, Usage,
};
pub use config::Config;

use bindings::tessera::collab::{models as host, trace as host_trace};

/// What a strategy implements.
pub trait Strategy {
    /// Answer one request.
    fn run(req: Request) -> Result<Response, Error>;

    /// Learn from dev examples; the returned bytes come back in
    /// `Request::state`. The default keeps no state.
    fn fit(_dev: Vec<Example>, _config: Config) -> Result<Option<Vec<u8>>, Error> {
        Ok(None)
    }
}

/// Exports a [`Strategy`] implementation as the component's `strategy` world.
#[macro_export]
macro_rules! export_strategy {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TesseraExport;
        impl $crate::bindings::Guest for __TesseraExport {
            fn run(req: $crate::Request) -> ::core::result::Result<$crate::Response, $crate::Error> {
                <$t as $crate::Strategy>::run(req)
            }
            fn fit(
                dev: ::std::vec::Vec<$crate::Example>,
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::core::result::Result<::core::option::Option<::std::vec::Vec<u8>>, $crate::Error> {
                <$t as $crate::Strategy>::fit(dev, $crate::Config::from_pairs(config))
            }
        }
        $crate::bindings::__export_strategy_world!(__TesseraExport with_types_in $crate::bindings);
    };
}

/// The members this strategy was granted, with their contributor cards.
pub fn models() -> Vec<ModelInfo> {
    host::list_models()
}

/// Granted members that can generate text, in pool order.
pub fn generators() -> Vec<ModelInfo> {
    models()
        .into_iter()
        .filter(|m| m.capabilities.iter().any(|c| c == "generate"))
        .collect()
}

/// One generation.
pub fn generate(model: &str, input: &Input, params: &GenParams) -> Result<Generation, Error> {
    host::generate(model, input, params)
}

/// Many generations at once, run in parallel by the host across members.
/// Results come back in job order.
pub fn fan_out(jobs: &[Job]) -> Vec<Result<Generation, Error>> {
    host::fan_out(jobs)
}

/// Log-likelihood of each continuation after `prompt`.
pub fn score(model: &str, prompt: &Input, continuations: &[String]) -> Result<Vec<Scored>, Error> {
    host::score(model, prompt, continuations)
}

/// The `top_k` most likely next tokens.
pub fn next_token(model: &str, prompt: &Input, top_k: u32) -> Result<Vec<TokenLogprob>, Error> {
    host::next_token(model, prompt, top_k)
}

/// Sentence embeddings from an embedding member.
pub fn embed(model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, Error> {
    host::embed(model, texts)
}

/// Records a step of the method in the response's provenance.
pub fn trace(model: Option<&str>, role: &str, note: impl Into<String>) {
    host_trace::emit(&Step {
        model: model.map(str::to_string),
        role: role.to_string(),
        note: note.into(),
    });
}

/// A one-turn chat.
pub fn user(text: impl Into<String>) -> Input {
    Input::Chat(vec![Message {
        role: "user".into(),
        content: text.into(),
    }])
}

/// The text of the last user turn (or the raw prompt).
pub fn question(input: &Input) -> String {
    match input {
        Input::Prompt(p) => p.clone(),
        Input::Chat(msgs) => msgs
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}

// The type is generated by wit-bindgen, so it cannot carry a derive here.
#[allow(clippy::derivable_impls)]
impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
        }
    }
}

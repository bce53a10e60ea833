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
pub mod chat;
pub mod config;
pub mod dev;
pub mod embedding;
pub mod mcq;
pub mod output;
pub mod pso;
pub mod rand;
pub mod state;
pub mod training;
pub mod weights;

/// The raw bindings of the contract, generated in this one place.
///
/// The shared imports (`types`, `models`, `trace`) are generated once, from a
/// selector world that exports nothing; each exporting world of the contract
/// then gets its own module that reuses them. This matters for linking: the
/// component type of a world is a custom section that the linker keeps only
/// when something refers to it, so a router built with this crate carries
/// the imports and the router world and nothing of the strategy world.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "package tessera:sdk; world imports { import tessera:collab/models@0.1.2; import tessera:collab/trace@0.1.2; }",
        world: "tessera:sdk/imports",
        generate_all,
        default_bindings_module: "tessera_sdk::bindings",
    });

    // One place says how an exporting world reuses the shared imports: each
    // world's module maps `types`, `models` and `trace` onto the bindings
    // above instead of generating its own copies, so all worlds share one
    // `Request`, `Error`, ... and the strategy, router, judge and aggregator
    // cannot drift apart. The strings are `tt` fragments, not `literal`: a
    // `literal` (or `expr`) fragment reaches `generate!` wrapped in an
    // invisible group, while `tt` hands over the bare string token, so nothing
    // depends on the proc macro's parser looking through that group.
    macro_rules! exporting_world {
        ($module:ident, $world:tt, $export_macro:tt, $bindings_module:tt) => {
            pub mod $module {
                wit_bindgen::generate!({
                    path: "../wit",
                    world: $world,
                    with: {
                        "tessera:collab/types@0.1.2": crate::bindings::tessera::collab::types,
                        "tessera:collab/models@0.1.2": crate::bindings::tessera::collab::models,
                        "tessera:collab/trace@0.1.2": crate::bindings::tessera::collab::trace,
                    },
                    pub_export_macro: true,
                    export_macro_name: $export_macro,
                    default_bindings_module: $bindings_module,
                });
            }
        };
    }

    exporting_world!(
        strategy,
        "tessera:collab/strategy@0.1.2",
        "__export_strategy_world",
        "tessera_sdk::bindings::strategy"
    );
    exporting_world!(
        router,
        "tessera:collab/router@0.1.2",
        "__export_router_world",
        "tessera_sdk::bindings::router"
    );
    exporting_world!(
        judge,
        "tessera:collab/judge@0.1.2",
        "__export_judge_world",
        "tessera_sdk::bindings::judge"
    );
    exporting_world!(
        aggregator,
        "tessera:collab/aggregator@0.1.2",
        "__export_aggregator_world",
        "tessera_sdk::bindings::aggregator"
    );
}

pub use bindings::strategy::tessera::collab::weights::{MergeMethod, MergeSpec};
pub use bindings::tessera::collab::trace::Step;
pub use bindings::tessera::collab::types::{
    Budget, Candidate, Error, Example, FinishReason, GenParams, Generation, Input, Job, Message, ModelInfo, Request,
    Response, Scored, TokenLogprob, Usage,
};
pub use config::{Config, Sampling};

use bindings::tessera::collab::{models as host, trace as host_trace};

/// Merges granted members that share an architecture and base into a new
/// member that every call accepts for the rest of this request (strategies
/// only); returns its id. Needs the `merges` budget in the manifest and the
/// operator's policy. The same recipe gives the same id, and the host keeps
/// recent merges, so asking again is cheap.
pub fn merge(spec: &MergeSpec) -> Result<String, Error> {
    bindings::strategy::tessera::collab::weights::merge(spec)
}

/// Tells the host this request is done with merged member `id`: the id
/// stops answering and its weights can be freed. A search that tries many
/// merges releases each one after measuring it, so it holds one at a time.
/// Releasing does not give back `merges` budget.
pub fn release(id: &str) -> Result<(), Error> {
    bindings::strategy::tessera::collab::weights::release(id)
}

/// Keeps merged member `id` after this request as pool member `name`, for
/// later requests, where the operator's policy allows kept merges
/// (`keep-merged`); otherwise an `unsupported` error.
pub fn keep(id: &str, name: &str) -> Result<(), Error> {
    bindings::strategy::tessera::collab::weights::keep(id, name)
}

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

/// A router: picks which members should answer, best first. Used as the
/// first stage of a host-side pipeline.
pub trait Router {
    /// Member ids, best first, chosen from `members`.
    fn route(req: Request, members: Vec<ModelInfo>) -> Result<Vec<String>, Error>;
}

/// A judge: one score per candidate, higher is better.
pub trait Judge {
    /// Scores `candidates` (same order).
    fn judge(req: Request, candidates: Vec<Candidate>) -> Result<Vec<f64>, Error>;
}

/// An aggregator: combines candidates into one response.
pub trait Aggregator {
    /// The combined answer.
    fn aggregate(req: Request, candidates: Vec<Candidate>) -> Result<Response, Error>;
}

/// Exports a [`Strategy`] implementation as the component's `strategy` world.
#[macro_export]
macro_rules! export_strategy {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TesseraExport;
        impl $crate::bindings::strategy::Guest for __TesseraExport {
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
        // Keeps the world's component type in the link (see `bindings`).
        #[used]
        #[doc(hidden)]
        static __TESSERA_WORLD: fn() = $crate::bindings::strategy::__link_custom_section_describing_imports;
        $crate::bindings::strategy::__export_strategy_world!(__TesseraExport with_types_in $crate::bindings::strategy);
    };
}

/// Exports a [`Router`] implementation as the component's `router` world.
#[macro_export]
macro_rules! export_router {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TesseraExport;
        impl $crate::bindings::router::Guest for __TesseraExport {
            fn route(
                req: $crate::Request,
                members: ::std::vec::Vec<$crate::ModelInfo>,
            ) -> ::core::result::Result<::std::vec::Vec<::std::string::String>, $crate::Error> {
                <$t as $crate::Router>::route(req, members)
            }
        }
        #[used]
        #[doc(hidden)]
        static __TESSERA_WORLD: fn() = $crate::bindings::router::__link_custom_section_describing_imports;
        $crate::bindings::router::__export_router_world!(__TesseraExport with_types_in $crate::bindings::router);
    };
}

/// Exports a [`Judge`] implementation as the component's `judge` world.
#[macro_export]
macro_rules! export_judge {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TesseraExport;
        impl $crate::bindings::judge::Guest for __TesseraExport {
            fn judge(
                req: $crate::Request,
                candidates: ::std::vec::Vec<$crate::Candidate>,
            ) -> ::core::result::Result<::std::vec::Vec<f64>, $crate::Error> {
                <$t as $crate::Judge>::judge(req, candidates)
            }
        }
        #[used]
        #[doc(hidden)]
        static __TESSERA_WORLD: fn() = $crate::bindings::judge::__link_custom_section_describing_imports;
        $crate::bindings::judge::__export_judge_world!(__TesseraExport with_types_in $crate::bindings::judge);
    };
}

/// Exports an [`Aggregator`] implementation as the component's `aggregator` world.
#[macro_export]
macro_rules! export_aggregator {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TesseraExport;
        impl $crate::bindings::aggregator::Guest for __TesseraExport {
            fn aggregate(
                req: $crate::Request,
                candidates: ::std::vec::Vec<$crate::Candidate>,
            ) -> ::core::result::Result<$crate::Response, $crate::Error> {
                <$t as $crate::Aggregator>::aggregate(req, candidates)
            }
        }
        #[used]
        #[doc(hidden)]
        static __TESSERA_WORLD: fn() = $crate::bindings::aggregator::__link_custom_section_describing_imports;
        $crate::bindings::aggregator::__export_aggregator_world!(__TesseraExport with_types_in $crate::bindings::aggregator);
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

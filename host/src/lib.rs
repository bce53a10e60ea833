//! # Tessera
//!
//! A runtime for *participatory* AI: many small contributed models, combined
//! by collaboration strategies that untrusted people write, run safely.
//!
//! Strategies are WebAssembly components implementing the WIT contract in
//! `wit/` (`tessera:collab@0.1.2`). The host does all model inference (candle
//! on the CPU) and lends the pool to each strategy instance through the
//! `models` import, checking every call against a [`policy::Grant`].
//!
//! One request's path: a face (CLI) calls [`Runtime::run`]; the
//! [`sandbox`] creates a fresh instance with its limits armed; the guest
//! calls `models.generate` / `fan-out` / `score` / ...; the host checks the
//! grant and budgets, queues the job on the member's worker in the [`pool`],
//! whose [`backends`] run the model; results and trace events come back,
//! and the response carries `text`, `provenance` and `usage`, or a typed
//! [`Error`].

pub mod alloc;
pub mod attribution;
pub mod backends;
pub mod bindings;
pub mod contribute;
pub mod error;
pub mod eval;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod inference;
pub mod merge;
pub mod model_folder;
pub mod pipeline;
pub mod policy;
pub mod pool;
pub mod registry;
pub mod request;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod tasks;

pub use error::Error;
pub use request::{ProvenanceEvent, RunOutcome, RunRequest, UsageReport};
pub use runtime::{installed_modules, InstalledModule, Metering, Paths, Runtime, RuntimeOptions};

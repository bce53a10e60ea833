//! The one error type every face of Tessera reports.
//!
//! Each variant is a distinct cause with the facts needed to act on it; the
//! `Display` text names the problem and, where there is one, the fix.
//! [`Error::kind`] gives a stable kebab-case name for machine consumers (the
//! CLI's `--json` output, later the HTTP API).

use serde::Serialize;

/// Everything that can end a Tessera request.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Error {
    /// The request ran past its wall-clock deadline.
    #[error("deadline exceeded: the request ran past its {limit_ms} ms deadline (raise `deadline_ms` in the manifest or the operator policy)")]
    Deadline {
        /// The granted deadline.
        limit_ms: u64,
    },
    /// The module executed more instructions than its fuel allows.
    #[error(
        "fuel exhausted: the module executed more than its {limit} units of fuel (raise `fuel`, or fix a runaway loop)"
    )]
    Fuel {
        /// The granted fuel.
        limit: u64,
    },
    /// The module tried to grow linear memory past its cap.
    #[error("memory limit: the module tried to grow its memory to {requested} bytes, over its cap of {limit} bytes (raise `memory_mib`)")]
    Memory {
        /// Cap in bytes.
        limit: u64,
        /// What it asked for.
        requested: u64,
    },
    /// The module overflowed a stack (e.g. unbounded recursion): the
    /// engine's wasm stack (`limit` = its cap in bytes) or its own stack in
    /// linear memory (`limit` = 0: the size the module was linked with).
    #[error("stack overflow: the module ran out of stack (unbounded recursion?){}", if *limit > 0 { format!("; the wasm stack is capped at {limit} bytes") } else { "; its own linear-memory stack ran off the bottom of memory".to_string() })]
    Stack {
        /// The wasm stack cap in bytes, or 0 for the module's own stack.
        limit: u64,
    },
    /// A counted budget ran out.
    #[error("budget exhausted: {budget} (limit {limit}); raise it in the module manifest or the operator policy")]
    Budget {
        /// Which budget: `host-calls`, `tokens`, `output-size`, `trace-events`, `resources`.
        budget: String,
        /// Its limit.
        limit: u64,
    },
    /// The module called a member it was not granted.
    #[error("not permitted: the module was not granted model `{model}` (list it in the manifest's `models` and allow it in the operator policy)")]
    NotPermitted {
        /// The member it tried.
        model: String,
    },
    /// No member with this id.
    #[error("unknown model `{model}`: `tessera pool list` shows the members")]
    UnknownModel {
        /// The id asked for.
        model: String,
    },
    /// Parameters out of range.
    #[error("invalid parameters: {message}")]
    InvalidParams {
        /// Which parameter and why.
        message: String,
    },
    /// A backend failed.
    #[error("inference failed: {message}")]
    InferenceFailed {
        /// Why.
        message: String,
    },
    /// The member cannot do this call.
    #[error("unsupported: {message}")]
    Unsupported {
        /// Why.
        message: String,
    },
    /// The module returned an error of its own.
    #[error("module failed: {message}")]
    ModuleFailed {
        /// The module's own explanation.
        message: String,
    },
    /// The module trapped (panic, `unreachable`, bad memory access, ...).
    #[error("module trapped: {message}")]
    Trap {
        /// The trap and anything the module wrote to stderr.
        message: String,
    },
    /// The module file is not a valid component of a known world.
    #[error("invalid module {path}: {message}")]
    InvalidModule {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Configuration (pool, policy, manifest, request) is wrong: what an
    /// operator or a user wrote.
    #[error("configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A fault of the host itself, not of what anyone asked: a database
    /// that cannot be read, a file that cannot be written, a runtime that
    /// stopped. The server answers 500 and the operator has to act.
    #[error("internal error: {message}")]
    Internal {
        /// What failed, with its cause.
        message: String,
    },
}

impl Error {
    /// A stable machine-readable name for the cause.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Deadline { .. } => "deadline",
            Error::Fuel { .. } => "fuel",
            Error::Memory { .. } => "memory",
            Error::Stack { .. } => "stack",
            Error::Budget { .. } => "budget-exhausted",
            Error::NotPermitted { .. } => "not-permitted",
            Error::UnknownModel { .. } => "unknown-model",
            Error::InvalidParams { .. } => "invalid-params",
            Error::InferenceFailed { .. } => "inference-failed",
            Error::Unsupported { .. } => "unsupported",
            Error::ModuleFailed { .. } => "module-failed",
            Error::Trap { .. } => "trap",
            Error::InvalidModule { .. } => "invalid-module",
            Error::Config { .. } => "config",
            Error::Internal { .. } => "internal",
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Budget`].
    pub fn budget(budget: &str, limit: u64) -> Self {
        Error::Budget {
            budget: budget.into(),
            limit,
        }
    }
}

impl From<crate::files::FileError> for Error {
    /// A file someone wrote that cannot be read or is not valid is theirs
    /// to fix: configuration, never an internal fault.
    fn from(e: crate::files::FileError) -> Self {
        Error::config(e.to_string())
    }
}

impl From<crate::inference::InferenceError> for Error {
    fn from(e: crate::inference::InferenceError) -> Self {
        use crate::inference::InferenceError as I;
        match e {
            I::UnknownModel(model) => Error::UnknownModel { model },
            I::InvalidParams(message) => Error::InvalidParams { message },
            I::Failed(message) => Error::InferenceFailed { message },
            I::Unsupported(message) => Error::Unsupported { message },
            I::Deadline | I::Expired => Error::Deadline { limit_ms: 0 },
        }
    }
}

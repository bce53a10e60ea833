//! Conversions between the WIT types and the host's inference types. Kept in
//! one place so the pool never sees a bindgen type and the guest never sees a
//! host one.

use crate::bindings::types as w;
use crate::inference as h;

pub fn input_in(i: w::Input) -> h::Input {
    match i {
        w::Input::Chat(m) => h::Input::Chat(
            m.into_iter()
                .map(|m| h::Message {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
        w::Input::Prompt(p) => h::Input::Prompt(p),
    }
}

pub fn input_out(i: &h::Input) -> w::Input {
    match i {
        h::Input::Chat(m) => w::Input::Chat(
            m.iter()
                .map(|m| w::Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
        ),
        h::Input::Prompt(p) => w::Input::Prompt(p.clone()),
    }
}

pub fn params_in(p: w::GenParams) -> h::GenParams {
    h::GenParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        stop: p.stop,
    }
}

pub fn params_out(p: &h::GenParams) -> w::GenParams {
    w::GenParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        stop: p.stop.clone(),
    }
}

pub fn generation_out(g: h::Generation) -> w::Generation {
    w::Generation {
        model: g.model,
        text: g.text,
        finish: match g.finish {
            h::FinishReason::Eos => w::FinishReason::Eos,
            h::FinishReason::Length => w::FinishReason::Length,
            h::FinishReason::StopSequence => w::FinishReason::StopSequence,
        },
        usage: w::Usage {
            prompt_tokens: g.usage.prompt_tokens,
            completion_tokens: g.usage.completion_tokens,
        },
    }
}

pub fn card_out(c: h::ModelCard) -> w::ModelInfo {
    w::ModelInfo {
        id: c.id,
        contributor: c.contributor,
        description: c.description,
        domains: c.domains,
        architecture: c.architecture,
        parameters: c.parameters,
        context_length: c.context_length,
        license: c.license,
        capabilities: c.capabilities.iter().map(|x| x.name().to_string()).collect(),
    }
}

/// Inference errors the guest may see and handle.
pub fn inference_error_out(e: h::InferenceError) -> w::Error {
    match e {
        h::InferenceError::UnknownModel(m) => w::Error::UnknownModel(m),
        h::InferenceError::InvalidParams(m) => w::Error::InvalidParams(m),
        h::InferenceError::Failed(m) => w::Error::InferenceFailed(m),
        h::InferenceError::Unsupported(m) => w::Error::Unsupported(m),
        h::InferenceError::Deadline | h::InferenceError::Expired => w::Error::DeadlineExceeded,
    }
}

/// An error a module returned from its export, as a host error.
///
/// Only the host enforces limits, and it reports its own (a deadline, a
/// member not granted, a spent budget) by trapping the module, never
/// through this path. So an error a module *returns* that looks like one of
/// the host's is the module's claim, not the host's decision: it becomes
/// [`crate::Error::ModuleFailed`] naming what the module reported, so that
/// no module can pass off a 403 blaming the caller's key or a deadline
/// after 0 s. Parameter and member errors stay the caller's: a strategy
/// refusing a hyperparameter, or naming a member the caller chose.
pub fn module_error_in(e: w::Error) -> crate::Error {
    use crate::Error as E;
    let reported = |kind: &str, detail: String| E::ModuleFailed {
        message: if detail.is_empty() {
            format!("the module reported `{kind}` (a claim of the module, not a limit the host enforced)")
        } else {
            format!("the module reported `{kind}`: {detail} (a claim of the module, not a limit the host enforced)")
        },
    };
    match e {
        w::Error::UnknownModel(model) => E::UnknownModel { model },
        w::Error::InvalidParams(message) => E::InvalidParams { message },
        w::Error::ModuleFailed(message) => E::ModuleFailed { message },
        w::Error::NotPermitted(model) => reported("not-permitted", model),
        w::Error::BudgetExhausted(b) => reported("budget-exhausted", budget_name(b).into()),
        w::Error::DeadlineExceeded => reported("deadline-exceeded", String::new()),
        w::Error::InferenceFailed(message) => reported("inference-failed", message),
        w::Error::Unsupported(message) => reported("unsupported", message),
    }
}

pub fn budget_name(b: w::Budget) -> &'static str {
    match b {
        w::Budget::HostCalls => "host-calls",
        w::Budget::Tokens => "tokens",
        w::Budget::Fuel => "fuel",
        w::Budget::Memory => "memory",
        w::Budget::OutputSize => "output-size",
        w::Budget::TraceEvents => "trace-events",
        w::Budget::Resources => "resources",
    }
}

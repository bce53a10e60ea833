//! The standard strategy library, end to end on the real default pool over
//! small slices of real tasks: one module per method, each checking the
//! behaviour that defines the method.

mod agglm;
mod cascade;
mod graph_router;
mod heterogeneous_swarm;
mod llm_blender;
mod mixture_of_agents;
mod multiagent_finetune;
mod multiagent_refine;
mod option_fusion;
mod slm_mux;
mod sparta;
mod switch_generation;
mod trained_router;

use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{ProvenanceEvent, RunRequest, Runtime};

/// A runtime over the default pool in `paths` whose policy lets modules
/// keep `n` trained members (they persist there across restarts).
fn keeping(paths: &tessera::Paths, n: u32) -> Runtime {
    let policy = Policy {
        keep_trained: n,
        ..Policy::default()
    };
    Runtime::new(paths.clone(), &PoolConfig::default_pool(), policy).expect("runtime starts")
}

/// A request for `ex` with seed 1 and the config `pairs`.
fn seeded(ex: &tessera::sandbox::Example, pairs: &[(&str, &str)]) -> RunRequest {
    let mut req = RunRequest {
        input: ex.input.clone(),
        params: Default::default(),
        config: Default::default(),
    };
    req.params.seed = Some(1);
    for (k, v) in pairs {
        req.config.insert(k.to_string(), v.to_string());
    }
    req
}

/// The members of every `call` host call (`generate`, `score`, ...) in
/// `p`, in order.
fn calls<'a>(p: &'a [ProvenanceEvent], call: &str) -> Vec<&'a str> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { call: c, model, .. } if c == call => Some(model.as_str()),
            _ => None,
        })
        .collect()
}

/// The (member, note) of every module step with `role` in `p`, in order.
fn steps<'a>(p: &'a [ProvenanceEvent], role: &str) -> Vec<(Option<&'a str>, &'a str)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::ModuleStep { model, role: r, note } if r == role => {
                Some((model.as_deref(), note.as_str()))
            }
            _ => None,
        })
        .collect()
}

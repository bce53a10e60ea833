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
mod slm_mux;
mod sparta;
mod switch_generation;
mod trained_router;

use tessera::ProvenanceEvent;

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

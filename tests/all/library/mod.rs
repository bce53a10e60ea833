//! The standard strategy library, end to end on the real default pool over
//! small slices of real tasks: one module per method, each checking the
//! behaviour that defines the method.

mod cascade;
mod graph_router;
mod heterogeneous_swarm;
mod llm_blender;
mod mixture_of_agents;
mod multiagent_refine;
mod slm_mux;
mod switch_generation;
mod trained_router;

//! Tessera's integration tests: one binary, one module per topic. They run
//! against the real default pool and the real compiled modules that
//! `make setup` installs (under `$TESSERA_HOME`).

mod bad_files;
mod cli;
mod cluster;
mod common;
mod contribute;
mod double;
mod eval;
mod hardening;
mod hf_dirs;
mod hostile;
mod inference;
mod languages;
mod library;
mod merge;
mod multinode;
mod pipeline;
mod reference;
mod remote;
mod serve;
mod strategies;
mod synth;
mod training;
mod webgpu;
mod weights;

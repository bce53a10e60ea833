//! Hand-written CPU kernels for the inference hot paths that candle leaves
//! slow on our models' shapes.
//!
//! They live in their own crate so that the workspace profile can optimise
//! them fully even in the dev builds that tests and benches use (the host
//! crate is built at a low optimisation level to keep rebuilds quick, and
//! SIMD loops lose most of their speed there), and so that they can be
//! checked against candle's own kernels in isolation.

pub mod vnni;

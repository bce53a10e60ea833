//! Hand-written CPU kernels for the inference hot paths that candle leaves
//! slow on our models' shapes.
//!
//! They live in their own crate so that the workspace profile can optimise
//! them fully even in the dev builds that tests and benches use (the host
//! crate is built at a low optimisation level to keep rebuilds quick, and
//! SIMD loops lose most of their speed there), and so that they can be
//! checked against candle's own kernels in isolation.
//!
//! * [`vnni`]: Q8_0 products with AVX-512 VNNI or AVX2 for any row count
//!   (decode, and prompts where there is no AMX), and the weight packing
//!   both kernels share.
//! * [`lowbit`]: Q4_1/Q5_0/Q5_1 products at their stored width (decode
//!   reads 5-6 bits per weight instead of a Q8_0 copy's 8.5).
//! * [`amx`]: AMX tiles: int8 products bit-identical to [`vnni`] (measured
//!   no faster), and the bf16 products prompt passes use.
//! * [`math`]: a causal softmax and SiLU on a vector `exp`.

pub mod amx;
pub mod lowbit;
pub mod math;
pub mod vnni;

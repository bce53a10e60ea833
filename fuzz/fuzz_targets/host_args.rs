//! Fuzz target `host_args`: see `tessera::fuzzing::host_args` for the input and the oracle.
#![no_main]

#[global_allocator]
static ALLOC: tessera::fuzzing::limits::Limited = tessera::fuzzing::limits::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::host_args::check(data));

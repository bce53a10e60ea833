//! Fuzz target `gguf`: see `tessera::fuzzing::gguf` for the input and the oracle.
#![no_main]

#[global_allocator]
static ALLOC: tessera::fuzzing::limits::Limited = tessera::fuzzing::limits::Limited;

libfuzzer_sys::fuzz_target!(init: tessera::fuzzing::template::init(), |data: &[u8]| tessera::fuzzing::gguf::check(data));

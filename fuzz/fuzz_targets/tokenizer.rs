//! Fuzz target `tokenizer`: see `tessera::fuzzing::tokenizer` for the input and the oracle.
#![no_main]

#[global_allocator]
static ALLOC: tessera::fuzzing::limits::Limited = tessera::fuzzing::limits::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::tokenizer::check(data));

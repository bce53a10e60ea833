//! Generators and oracles for fuzzing everything that parses what strangers
//! send: model files, chat templates and tokenizers inside them, manifests
//! and configuration files, the arguments of a guest's host calls, and the
//! server's request bodies.
//!
//! Each submodule has one `check(data: &[u8])`: it feeds the bytes to the
//! real parser (and, where the parser accepts them, to what runs next on the
//! result) and asserts the oracle, panicking when it fails. The fuzz
//! targets under `fuzz/fuzz_targets/` are one line over these, as
//! wasmtime's targets are over its `wasmtime-fuzzing` crate, so the oracles
//! are plain library code: unit-tested here on stable Rust, and run over
//! each target's corpus by `make test` (`fuzz/` built on stable).
//!
//! The oracles:
//! - **No panic** on any input: a bad input is a typed error.
//! - **Bounded allocation**: the fuzz targets install a failing allocator
//!   ([`limits`]) that aborts when one input makes the process hold more
//!   than a fixed budget, as wasmtime's `oom` target does, so a parser that
//!   trusts a length field is a finding even when the machine has the
//!   memory.
//! - **Bounded work**: inputs that the host renders or tokenizes (chat
//!   templates) must finish within a fixed amount of interpreter fuel.
//! - **Round trips** where they exist: a manifest or pool file that parses
//!   serialises back to text that parses to the same value; a host call's
//!   arguments convert to the host's types and back unchanged.

pub mod config;
pub mod gguf;
pub mod host_args;
pub mod http;
pub mod limits;
pub mod template;
pub mod tokenizer;

/// One target's check: feeds the bytes through, panics on a broken oracle.
pub type Check = fn(&[u8]);

/// The targets, by name, for runners that take a name (the corpus test,
/// `fuzz/`'s targets).
pub const TARGETS: &[(&str, Check)] = &[
    ("gguf", gguf::check),
    ("tokenizer", tokenizer::check),
    ("template", template::check),
    ("config", config::check),
    ("host_args", host_args::check),
    ("http", http::check),
];

/// The check of target `name`, if there is one.
pub fn target(name: &str) -> Option<Check> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// `len` bytes drawn from `seed` by a fixed mix (SplitMix64's constants):
/// inputs for the structured targets' tests and seeds, the same everywhere.
pub fn drawn_bytes(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9))
                >> 31) as u8
        })
        .collect()
}

/// Each target's seed corpus: small valid inputs of its format (a GGUF
/// file, real chat templates, the standard manifest and pool, well-formed
/// request bodies), from which the fuzzer mutates, plus drawn bytes for the
/// structured targets.
pub fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let drawn = |n: u64| -> Vec<Vec<u8>> { (0..n).map(|seed| drawn_bytes(seed, 1024)).collect() };
    vec![
        ("gguf", vec![gguf::seed()]),
        ("tokenizer", drawn(8)),
        (
            "template",
            template::SEEDS.iter().map(|s| template::seed_input(s)).collect(),
        ),
        ("config", config::seeds()),
        ("host_args", drawn(8)),
        ("http", http::seeds()),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_target_has_seeds_and_runs_them() {
        let seeds = super::seeds();
        for (name, _) in super::TARGETS {
            let (_, s) = seeds.iter().find(|(n, _)| n == name).expect("seeds for every target");
            assert!(!s.is_empty(), "{name}");
            let check = super::target(name).expect("found by name");
            for input in s {
                check(input);
            }
        }
    }
}

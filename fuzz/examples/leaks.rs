//! Runs a target's check on every file of a corpus directory, each many
//! times, and prints the files after which the process holds more memory
//! than before: a leak finder for the bounded-allocation oracle, which
//! only sees the total.
//!
//! `cargo run -p tessera-fuzz --example leaks TARGET DIR [REPEATS]`; exits
//! 1 when any input leaves memory behind. It found that tokenizers 0.23
//! keeps the word cache of every BPE that ever encoded, per thread, after
//! the BPE is dropped (see `NO_WORD_CACHE` in the GGUF tokenizer); `make
//! fuzz-smoke` runs it over the seed corpus of every target.

#[global_allocator]
static ALLOC: tessera::fuzzing::limits::Limited = tessera::fuzzing::limits::Limited;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(target), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: leaks TARGET DIR [REPEATS]");
        std::process::exit(2);
    };
    let repeats: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(20);
    let found = tessera::fuzzing::target(target);
    let Some(check) = found else {
        eprintln!("no target `{target}`");
        std::process::exit(2);
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("a corpus directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut leaky = 0;
    for f in &files {
        let Ok(data) = std::fs::read(f) else { continue };
        check(&data); // warm any one-time caches
        let before = tessera::fuzzing::limits::live_bytes();
        for _ in 0..repeats {
            check(&data);
        }
        let grew = tessera::fuzzing::limits::live_bytes().saturating_sub(before);
        if grew > 0 {
            leaky += 1;
            println!("{} bytes per run: {}", grew / repeats, f.display());
        }
    }
    println!("{leaky} of {} inputs leave memory behind", files.len());
    if leaky > 0 {
        std::process::exit(1);
    }
}

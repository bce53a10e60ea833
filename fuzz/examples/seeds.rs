//! Writes each target's seed corpus under `fuzz/corpus/NAME/` (generated,
//! not committed: the seeds are code in `tessera::fuzzing`, so they follow
//! the formats as they change).
//!
//! `cargo run -p tessera-fuzz --example seeds [DIR]` (DIR defaults to
//! `fuzz/corpus`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    let f = tessera::fuzzing::seeds();
    for (target, seeds) in &f {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s)?;
        }
        println!("{}: {} seeds in {}", target, seeds.len(), d.display());
    }
    Ok(())
}

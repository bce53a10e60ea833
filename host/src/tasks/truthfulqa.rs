//! TruthfulQA (multiple choice, one right option), from BIG-bench.
//!
//! The only packaged copy we found is inside the `bigbench==1.0.0` source
//! distribution on PyPI (358 MB): `benchmark_tasks/truthful_qa/task_mc.json`,
//! 299 questions, each with 2-13 answers of which exactly one scores 1 (the
//! MC1 format). [`fetch`] downloads the archive once from PyPI's file host,
//! checks its sha256, extracts that one file and deletes the archive.
//! [`load`] shuffles each question's options with a fixed seed: the file
//! lists the right answer first.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Gold, Item, Metric, SplitMix, TaskError, SPLIT_SEED};
use crate::runtime::Paths;

/// The BIG-bench source distribution, pinned by URL and sha256 (the URL is
/// PyPI's content-addressed file host; `pip download` would also run the
/// package's setup script).
const ARCHIVE_URL: &str = "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz";
const ARCHIVE_SHA256: &str = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2";
const MEMBER: &str = "bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/task_mc.json";

/// Where the extracted file lives under the data folder.
pub fn path(paths: &Paths) -> PathBuf {
    paths.data.join("bigbench/truthful_qa/task_mc.json")
}

/// Downloads and extracts TruthfulQA unless it is already there. Returns
/// whether anything was fetched.
pub fn fetch(paths: &Paths) -> Result<bool, TaskError> {
    let dest = path(paths);
    if dest.exists() {
        return Ok(false);
    }
    let archive = paths.wheels.join("bigbench-1.0.0.tar.gz");
    if !archive.exists() {
        download(ARCHIVE_URL, &archive)?;
    }
    let fail = |p: &Path, e: std::io::Error| TaskError::Fetch(format!("{}: {e}", p.display()));
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(&archive).map_err(|e| fail(&archive, e))?;
    std::io::copy(&mut f, &mut hasher).map_err(|e| fail(&archive, e))?;
    let actual = hex::encode(hasher.finalize());
    if actual != ARCHIVE_SHA256 {
        let _ = std::fs::remove_file(&archive);
        return Err(TaskError::Fetch(format!(
            "{} has sha256 {actual}, expected {ARCHIVE_SHA256}; the bad download was removed, run again",
            archive.display()
        )));
    }
    let f = std::fs::File::open(&archive).map_err(|e| fail(&archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let entries = tar.entries().map_err(|e| fail(&archive, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| fail(&archive, e))?;
        let is_member = entry.path().map(|p| p == Path::new(MEMBER)).unwrap_or(false);
        if !is_member {
            continue;
        }
        super::extract_to(&mut entry, &dest)?;
        // Only this file is needed; the 358 MB archive is not kept.
        let _ = std::fs::remove_file(&archive);
        return Ok(true);
    }
    Err(TaskError::Fetch(format!("{} holds no {MEMBER}", archive.display())))
}

/// Streams `url` into `to` through a `.part` file (renamed when complete),
/// on a thread with its own runtime so callers may be async or not.
fn download(url: &'static str, to: &Path) -> Result<(), TaskError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TaskError::Fetch(format!("{}: {e}", parent.display())))?;
    }
    let to = to.to_path_buf();
    let worker = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut resp = reqwest::get(url)
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("{url}: {e}"))?;
            let part = to.with_extension("part");
            let mut out = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
            while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
                out.write_all(&chunk).map_err(|e| format!("{}: {e}", part.display()))?;
            }
            out.flush().map_err(|e| format!("{}: {e}", part.display()))?;
            std::fs::rename(&part, &to).map_err(|e| format!("{}: {e}", to.display()))
        })
    });
    worker
        .join()
        .map_err(|_| TaskError::Fetch("the download thread panicked".into()))?
        .map_err(TaskError::Fetch)
}

#[derive(Deserialize)]
struct File {
    examples: Vec<Example>,
}

#[derive(Deserialize)]
struct Example {
    input: String,
    target_scores: std::collections::BTreeMap<String, f64>,
}

/// Reads the extracted file into items, options shuffled per question.
pub fn load(file: &Path) -> Result<Vec<Item>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed: File = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut rng = SplitMix(SPLIT_SEED ^ 0x7A17);
    let mut items = Vec::with_capacity(parsed.examples.len());
    for (n, ex) in parsed.examples.into_iter().enumerate() {
        let mut opts: Vec<(String, bool)> = ex.target_scores.into_iter().map(|(t, s)| (t, s > 0.5)).collect();
        if opts.len() < 2 || opts.iter().filter(|o| o.1).count() != 1 {
            return Err(format!(
                "{}: example {n} has {} options and {} right ones; expected at least 2 and exactly 1",
                file.display(),
                opts.len(),
                opts.iter().filter(|o| o.1).count()
            ));
        }
        rng.shuffle(&mut opts);
        let gold = opts.iter().position(|o| o.1).unwrap_or(0);
        items.push(Item {
            id: format!("truthfulqa-{n}"),
            question: ex.input.trim().to_string(),
            choices: opts.into_iter().map(|o| o.0).collect(),
            gold: Gold::Choice(gold),
            metric: Metric::Choice,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_shuffled_and_bad_examples_are_named() {
        let dir = std::env::temp_dir().join(format!("tessera-tqa-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        let mut examples = Vec::new();
        for i in 0..20 {
            examples.push(format!(
                r#"{{"input": "Q{i}?", "target_scores": {{"right {i}": 1, "wrong a": 0, "wrong b": 0, "wrong c": 0}}}}"#
            ));
        }
        std::fs::write(&good, format!(r#"{{"examples": [{}]}}"#, examples.join(","))).unwrap();
        let items = load(&good).unwrap();
        assert_eq!(items.len(), 20);
        for (i, it) in items.iter().enumerate() {
            let Gold::Choice(g) = it.gold else { panic!() };
            assert_eq!(it.choices[g], format!("right {i}"));
            assert_eq!(it.choices.len(), 4);
        }
        // The right answer does not sit in one place.
        let golds: std::collections::BTreeSet<_> = items
            .iter()
            .map(|it| match it.gold {
                Gold::Choice(g) => g,
                _ => 99,
            })
            .collect();
        assert!(golds.len() > 1, "{golds:?}");
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"examples": [{"input": "Q", "target_scores": {"a": 1, "b": 1}}]}"#,
        )
        .unwrap();
        let err = load(&bad).unwrap_err();
        assert!(err.contains("example 0") && err.contains("exactly 1"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

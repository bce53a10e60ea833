//! Grading one reply against one item, and the statistics of a run.
//!
//! Grading reuses the SDK's answer functions (the same code strategies use
//! to compare answers), so a strategy and the harness never disagree on
//! what "the answer" in a reply is.

use serde::{Deserialize, Serialize};
use tessera_sdk::answer;

use crate::tasks::{Gold, Item, Metric};

/// The score of `reply` on `item`, in `[0, 1]`.
///
/// - multiple choice: 1 when the strict parser ([`answer::choice`]) picks the
///   gold option; a reply that names no option, or several, scores 0;
/// - exact match: 1 when the extracted final answer equals the gold one
///   after normalisation, or as a number;
/// - token F1: the best SQuAD F1 of the extracted answer over the aliases.
pub fn grade(item: &Item, reply: &str) -> f64 {
    match (&item.metric, &item.gold) {
        (Metric::Choice, Gold::Choice(g)) => f64::from(u8::from(answer::choice(reply, &item.choices) == Some(*g))),
        (Metric::ExactMatch, Gold::Answers(golds)) => {
            let ex = |a: &str| tessera_sdk::Example {
                input: tessera_sdk::Input::Prompt(String::new()),
                answer: a.to_string(),
                choices: vec![],
            };
            f64::from(u8::from(golds.iter().any(|g| answer::is_correct(reply, &ex(g)))))
        }
        (Metric::TokenF1, Gold::Answers(golds)) => {
            let got = answer::extract(reply);
            golds.iter().map(|g| answer::f1(&got, g)).fold(0.0, f64::max)
        }
        // A task always pairs its metric with its kind of gold; anything else
        // is a bug in a loader, and scores nothing rather than panicking.
        _ => 0.0,
    }
}

/// The score of a log-likelihood pick: 1 when the most likely option is the
/// gold one.
pub fn grade_pick(item: &Item, picked: usize) -> f64 {
    f64::from(u8::from(matches!(item.gold, Gold::Choice(g) if g == picked)))
}

/// The most frequent of `positions` and how often it occurs (ties: the
/// smaller position); `None` for none.
fn most_common(positions: impl IntoIterator<Item = usize>) -> Option<(usize, usize)> {
    let mut counts: Vec<usize> = Vec::new();
    for p in positions {
        if counts.len() <= p {
            counts.resize(p + 1, 0);
        }
        counts[p] += 1;
    }
    let best = (0..counts.len()).max_by(|a, b| counts[*a].cmp(&counts[*b]).then(b.cmp(a)))?;
    Some((best, counts[best]))
}

/// The best score a constant answer reaches on `items` (multiple choice
/// only): the option position that is right most often, and how often.
///
/// This is a reference, not a system: it reads the test labels. A system that
/// collapses onto one letter scores about this much without knowing anything,
/// so a strategy or member near it has shown no knowledge (ties go to the
/// earlier position; `None` when no item is multiple choice).
pub fn constant_baseline(items: &[Item]) -> Option<(usize, f64)> {
    let golds = items.iter().filter_map(|i| match i.gold {
        Gold::Choice(g) => Some(g),
        Gold::Answers(_) => None,
    });
    most_common(golds).map(|(g, n)| (g, n as f64 / items.len() as f64))
}

/// The accuracy of answering uniformly at random: the mean of
/// 1 / (number of options) over the multiple-choice items.
pub fn chance(items: &[Item]) -> Option<f64> {
    let mcq: Vec<f64> = items
        .iter()
        .filter(|i| !i.choices.is_empty())
        .map(|i| 1.0 / i.choices.len() as f64)
        .collect();
    (!mcq.is_empty()).then(|| mean(&mcq))
}

/// How a system's replies spread over the option positions: the position it
/// named most often (ties: the earlier one) and on what share of `items`.
/// Replies are read by the grader's parser ([`answer::choice`]; a
/// log-likelihood pick is stored as its bare letter, which parses the same);
/// replies that name no option count in the denominator only. `None` when
/// the task is not multiple choice or no reply named an option.
pub fn top_pick<'a>(items: &[Item], replies: impl IntoIterator<Item = &'a str>) -> Option<(usize, f64)> {
    let picks = items
        .iter()
        .zip(replies)
        .filter_map(|(item, reply)| answer::choice(reply, &item.choices));
    most_common(picks).map(|(p, n)| (p, n as f64 / items.len() as f64))
}

/// Mean of `xs` (0 for none).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// A 95% percentile-bootstrap interval of the mean: `resamples` resamples
/// with replacement, drawn from a SplitMix64 stream seeded by `seed` so the
/// interval is reproducible.
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if xs.len() < 2 {
        let m = mean(xs);
        return (m, m);
    }
    let mut rng = SplitMix(seed ^ 0xB007_5742);
    let mut next = || rng.next();
    let n = xs.len();
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| xs[(next() % n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

/// A paired difference, system minus reference, over the same items: the
/// statistic and its 95% percentile-bootstrap interval. Pairing (resampling
/// items, not the two systems separately) removes the items' shared
/// difficulty from the interval, which is what lets a few hundred items
/// resolve a few points.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The difference in mean score (`[-1, 1]`).
    pub diff: f64,
    /// Lower end of the 95% interval.
    pub lo: f64,
    /// Upper end of the 95% interval.
    pub hi: f64,
    /// Items paired (over every part).
    pub n: usize,
}

impl Delta {
    /// `above`, `below` or `not separable`: where the interval lies with
    /// respect to zero.
    pub fn verdict(&self) -> &'static str {
        if self.lo > 0.0 {
            "above"
        } else if self.hi < 0.0 {
            "below"
        } else {
            "not separable"
        }
    }
}

/// The paired bootstrap of a weighted sum of per-part mean differences.
/// Each part is `(weight, system scores, reference scores)` over the same
/// items in the same order (one part per task; the weights of a macro
/// average). Each resample redraws every part's items independently
/// (stratified by task), so a large task cannot crowd out a small one.
/// `None` when there is no part or a part's two lists differ in length.
pub fn paired_delta(parts: &[(f64, &[f64], &[f64])], resamples: usize, seed: u64) -> Option<Delta> {
    if parts.is_empty() || parts.iter().any(|(_, a, b)| a.len() != b.len() || a.is_empty()) {
        return None;
    }
    let diffs: Vec<(f64, Vec<f64>)> = parts
        .iter()
        .map(|(w, a, b)| (*w, a.iter().zip(b.iter()).map(|(x, y)| x - y).collect()))
        .collect();
    let stat = |pick: &mut dyn FnMut(usize) -> usize| -> f64 {
        diffs
            .iter()
            .map(|(w, d)| w * (0..d.len()).map(|_| d[pick(d.len())]).sum::<f64>() / d.len() as f64)
            .sum()
    };
    let diff: f64 = diffs.iter().map(|(w, d)| w * mean(d)).sum();
    let mut rng = SplitMix(seed ^ 0x9A1E_D5EE);
    let mut stats: Vec<f64> = (0..resamples.max(1))
        .map(|_| stat(&mut |n| (rng.next() % n as u64) as usize))
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (stats.len() - 1) as f64).round() as usize).min(stats.len() - 1)];
    Some(Delta {
        diff,
        lo: at(0.025),
        hi: at(0.975),
        n: diffs.iter().map(|(_, d)| d.len()).sum(),
    })
}

/// SplitMix64: a small, reproducible stream for resampling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcq(gold: usize) -> Item {
        Item {
            id: "q".into(),
            question: "Which is a planet?".into(),
            choices: vec!["Sun".into(), "Mars".into(), "Moon".into(), "Comet".into()],
            gold: Gold::Choice(gold),
            metric: Metric::Choice,
        }
    }

    fn open(metric: Metric, golds: &[&str]) -> Item {
        Item {
            id: "q".into(),
            question: "?".into(),
            choices: vec![],
            gold: Gold::Answers(golds.iter().map(|s| s.to_string()).collect()),
            metric,
        }
    }

    #[test]
    fn multiple_choice_is_strict() {
        let item = mcq(1);
        assert_eq!(grade(&item, "B"), 1.0);
        assert_eq!(grade(&item, "B) Mars"), 1.0);
        assert_eq!(grade(&item, "The answer is B."), 1.0);
        assert_eq!(grade(&item, "Mars"), 1.0);
        assert_eq!(grade(&item, "A"), 0.0);
        // Naming two options is not an answer, and neither is silence.
        assert_eq!(grade(&item, "Mars or the Moon"), 0.0);
        assert_eq!(grade(&item, ""), 0.0);
        assert_eq!(grade_pick(&item, 1), 1.0);
        assert_eq!(grade_pick(&item, 0), 0.0);
    }

    #[test]
    fn exact_match_reads_the_final_number() {
        let item = open(Metric::ExactMatch, &["18"]);
        assert_eq!(grade(&item, "9 * 2 = 18. The answer is 18."), 1.0);
        assert_eq!(grade(&item, "so she makes \\boxed{18} dollars"), 1.0);
        assert_eq!(grade(&item, "The answer is $18."), 1.0);
        assert_eq!(grade(&item, "The answer is 18.0"), 1.0);
        assert_eq!(grade(&item, "The answer is 19."), 0.0);
        // Nested braces in a box survive extraction.
        let frac = open(Metric::ExactMatch, &["\\frac{1}{2}"]);
        assert_eq!(grade(&frac, "so \\boxed{\\frac{1}{2}}"), 1.0);
    }

    #[test]
    fn f1_takes_the_best_alias() {
        let item = open(Metric::TokenF1, &["Eiffel Tower", "La tour Eiffel"]);
        assert_eq!(grade(&item, "The Eiffel Tower."), 1.0);
        let partial = grade(&item, "the tower");
        assert!(partial > 0.0 && partial < 1.0, "{partial}");
        assert_eq!(grade(&item, "Big Ben"), 0.0);
    }

    #[test]
    fn constant_answers_and_spread_are_measured_against_the_labels() {
        // Golds C, C, A, D: always answering C scores half.
        let items: Vec<Item> = [2, 2, 0, 3].into_iter().map(mcq).collect();
        assert_eq!(constant_baseline(&items), Some((2, 0.5)));
        assert_eq!(chance(&items), Some(0.25));
        // A sheet that says C three times and nothing once.
        let replies = ["C) Moon", "C", "I am not sure", "(C)"];
        assert_eq!(top_pick(&items, replies), Some((2, 0.75)));
        // Ties go to the earlier letter; silence is not a pick.
        assert_eq!(top_pick(&items, ["B", "A", "x", "y"]), Some((0, 0.25)));
        assert_eq!(top_pick(&items, ["", "", "", ""]), None);
        // Open questions have neither.
        let open_items = [open(Metric::TokenF1, &["Paris"])];
        assert_eq!(constant_baseline(&open_items), None);
        assert_eq!(chance(&open_items), None);
        assert_eq!(top_pick(&open_items, ["Paris"]), None);
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_is_reproducible() {
        let xs: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 4 == 0))).collect();
        let (lo, hi) = bootstrap_ci(&xs, 1000, 7);
        assert!(lo < 0.25 && 0.25 < hi, "{lo} {hi}");
        assert!(hi - lo < 0.15, "{lo} {hi}");
        assert_eq!(bootstrap_ci(&xs, 1000, 7), (lo, hi));
        assert_eq!(bootstrap_ci(&[1.0], 100, 1), (1.0, 1.0));
    }

    #[test]
    fn pairing_resolves_what_two_separate_intervals_cannot() {
        // Two systems that agree on 190 of 200 items and differ on 10, all
        // ten won by `a`: +5 points. Unpaired, each accuracy's interval is
        // about +-7 points wide; paired, the difference's interval excludes 0.
        let b: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let mut a = b.clone();
        for x in a.iter_mut().filter(|x| **x == 0.0).take(10) {
            *x = 1.0;
        }
        let d = paired_delta(&[(1.0, &a, &b)], 1000, 3).unwrap();
        assert!((d.diff - 0.05).abs() < 1e-12, "{d:?}");
        assert!(d.lo > 0.0 && d.hi < 0.1, "{d:?}");
        assert_eq!(d.verdict(), "above");
        assert_eq!(d.n, 200);
        assert_eq!(paired_delta(&[(1.0, &a, &b)], 1000, 3), Some(d), "reproducible");
        // No difference at all: a zero-width interval at 0, not separable.
        let z = paired_delta(&[(1.0, &b, &b)], 100, 3).unwrap();
        assert_eq!((z.diff, z.lo, z.hi), (0.0, 0.0, 0.0));
        assert_eq!(z.verdict(), "not separable");
        // Weighted parts: the macro average of two tasks' differences.
        let m = paired_delta(&[(0.5, &a, &b), (0.5, &b, &a)], 200, 3).unwrap();
        assert!(m.diff.abs() < 1e-12 && m.lo < 0.0 && m.hi > 0.0, "{m:?}");
        assert_eq!(m.n, 400);
        // Mismatched or empty parts are refused rather than misread.
        assert!(paired_delta(&[(1.0, &a[..10], &b)], 10, 0).is_none());
        assert!(paired_delta(&[], 10, 0).is_none());
    }
}

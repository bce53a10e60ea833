//! Whose text reached the answer.
//!
//! Provenance already says which members a system *consulted* (every host
//! call). That is not the same as who *shaped* the answer: a debate may call
//! four members and keep one member's wording, and a router calls one
//! member whose text is the answer. This module measures the second thing
//! from what the host saw, so a module cannot claim it: for each member, the
//! share of the answer's words that sit inside a run of words the member
//! itself generated during the request.
//!
//! The unit is the word trigram (lowercased runs of letters and digits),
//! as in n-gram overlap measures of text reuse: one shared word ("the",
//! "B") says little, three in a row rarely happen by chance. Answers of
//! fewer than three words are matched whole. Shares are per member and
//! independent, so two members who wrote the same sentence both get it.
//! A system that picks its answer by likelihood (`score`) rather than by
//! generating it leaves no text to match: its attribution is empty, and
//! the provenance's host calls remain the record of who was consulted.
//!
//! Words the question itself holds are nobody's contribution: a member
//! that only echoed the question ("What is the capital of France?") into
//! an answer that restates it ("The capital of France is Paris") is not
//! credited. A member is credited when at least one of its runs in the
//! answer is not in the question; its share then counts every answer word
//! its runs cover, the restated ones included, since it did write them.
//! Answers shorter than a run are choices, credited to whoever named them
//! even when the question lists them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Longest word run compared; see the module docs.
const NGRAM: usize = 3;

/// One member's part in an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// The member.
    pub member: String,
    /// Who contributed it (its card's `contributor`), if it has a card.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub contributor: String,
    /// The fraction (0-1) of the answer's words covered by runs of words
    /// this member generated in the request.
    pub share: f64,
    /// How many of the answer's words that is.
    pub words: u32,
}

/// Lowercased runs of letters and digits: what is compared.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The text of a request's input, whose words are nobody's contribution.
pub fn input_text(input: &crate::inference::Input) -> String {
    match input {
        crate::inference::Input::Prompt(p) => p.clone(),
        crate::inference::Input::Chat(turns) => turns.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    }
}

/// Each member's share of `answer`, from the `(member, text)` generations
/// the host served during the request. Members are listed once, largest
/// share first (ties by name); members whose text covers no word of the
/// answer, or only runs the `question` also holds, are left out.
/// `contributor` names a member's contributor.
pub fn attribute(
    answer: &str,
    question: &str,
    generated: &[(String, String)],
    contributor: impl Fn(&str) -> Option<String>,
) -> Vec<Attribution> {
    let answer = words(answer);
    if answer.is_empty() {
        return Vec::new();
    }
    let n = NGRAM.min(answer.len());
    // An answer shorter than a run is a choice ("B", "Paris"), and the
    // question often lists the choices: naming the right one is the
    // contribution, so the question's words are not held against it.
    let question = words(question);
    let asked: HashSet<&[String]> = if n == NGRAM {
        question.windows(n).collect()
    } else {
        HashSet::new()
    };
    let mut members: Vec<&str> = Vec::new();
    for (m, _) in generated {
        if !members.contains(&m.as_str()) {
            members.push(m);
        }
    }
    let mut out = Vec::new();
    for member in members {
        let mut grams: HashSet<&[String]> = HashSet::new();
        let texts: Vec<Vec<String>> = generated
            .iter()
            .filter(|(m, _)| m == member)
            .map(|(_, t)| words(t))
            .collect();
        for w in &texts {
            for g in w.windows(n) {
                grams.insert(g);
            }
        }
        let mut covered = vec![false; answer.len()];
        let mut own = false;
        for (i, g) in answer.windows(n).enumerate() {
            if grams.contains(g) {
                covered[i..i + n].iter_mut().for_each(|c| *c = true);
                own |= !asked.contains(g);
            }
        }
        let hit = covered.iter().filter(|c| **c).count();
        if own {
            out.push(Attribution {
                member: member.to_string(),
                contributor: contributor(member).unwrap_or_default(),
                share: hit as f64 / answer.len() as f64,
                words: hit as u32,
            });
        }
    }
    out.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.member.cmp(&b.member)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(m, t)| (m.to_string(), t.to_string())).collect()
    }

    #[test]
    fn the_member_whose_wording_was_kept_gets_the_answer() {
        let g = gen(&[
            ("a", "The capital of France is Paris, a city on the Seine."),
            ("b", "I believe it is Lyon."),
            ("c", "Paris."),
        ]);
        let at = attribute("The capital of France is Paris.", "", &g, |m| Some(format!("{m}-lab")));
        assert_eq!(at.len(), 1, "{at:?}");
        assert_eq!(at[0].member, "a");
        assert_eq!(at[0].contributor, "a-lab");
        assert_eq!(at[0].share, 1.0);
        assert_eq!(at[0].words, 6);
    }

    #[test]
    fn short_answers_match_whole_and_shares_are_independent() {
        let g = gen(&[("a", "Answer: B"), ("b", "b"), ("c", "C is right")]);
        let at = attribute("B", "Which is right? A, B or C?", &g, |_| None);
        let names: Vec<&str> = at.iter().map(|a| a.member.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(at.iter().all(|a| a.share == 1.0 && a.contributor.is_empty()));
    }

    #[test]
    fn a_fused_answer_is_split_between_its_sources() {
        let g = gen(&[
            ("a", "water boils at one hundred degrees"),
            ("b", "at sea level pressure, as measured"),
            ("a", "another answer entirely"),
        ]);
        let at = attribute(
            "Water boils at one hundred degrees at sea level pressure.",
            "",
            &g,
            |_| None,
        );
        assert_eq!(at[0].member, "a");
        assert_eq!(at[0].words, 6);
        assert_eq!(at[1].member, "b");
        assert_eq!(at[1].words, 4);
        assert!((at[0].share - 0.6).abs() < 1e-9);
    }

    #[test]
    fn no_text_no_attribution() {
        assert!(attribute("", "", &gen(&[("a", "x y z")]), |_| None).is_empty());
        assert!(attribute("x y z", "", &[], |_| None).is_empty());
        assert!(attribute("one two three", "", &gen(&[("a", "one two four")]), |_| None).is_empty());
    }

    #[test]
    fn echoing_the_question_is_no_contribution() {
        let q = "What is the capital of France? Answer with one word.";
        let g = gen(&[
            ("echo", "What is the capital of France? Answer with one word"),
            ("writer", "The capital of France is Paris."),
        ]);
        let at = attribute("The capital of France is Paris.", q, &g, |_| None);
        assert_eq!(at.len(), 1, "{at:?}");
        assert_eq!(at[0].member, "writer");
        // The restated words count for the member that wrote them.
        assert_eq!(at[0].share, 1.0);
    }
}

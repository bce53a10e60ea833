//! Multiple choice by the likelihood of each option's *text*.
//!
//! Asking a small model for "the letter of the correct option" mostly
//! measures which letter it likes: on our pool SmolLM2 answers "A" and
//! Qwen "B" whatever the question. Scoring each option's text as the
//! continuation of the question removes that bias and is how benchmark
//! suites usually grade small base models: the prompt is
//! `Question: <question>\nAnswer:`, each option is scored as
//! `" <option>"`, and the pick is the option with the highest log-likelihood
//! per byte of its text, so long options are not penalised for their
//! length.
//!
//! The harness's `--mcq option` mode and the `option-fusion` strategy both
//! use these functions, so a member scored by one and by the other gives
//! the same pick. [`parse`] recovers question and options from the usual
//! rendering of a multiple-choice prompt (the question, then one `A) text`
//! line per option), which is what a strategy sees.

/// A multiple-choice question: its text and its options in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The question (with any passage it comes with).
    pub text: String,
    /// The options; option `i` has letter [`crate::answer::letter`]`(i)`.
    pub options: Vec<String>,
}

/// The option label at the start of `line`: `A) text`, `A. text` or
/// `A: text`, as (index, text).
fn option_line(line: &str) -> Option<(usize, &str)> {
    let line = line.trim_start();
    let mut chars = line.char_indices();
    let (_, c) = chars.next()?;
    let (_, sep) = chars.next()?;
    if !c.is_ascii_uppercase() || !matches!(sep, ')' | '.' | ':') {
        return None;
    }
    let rest = &line[2..];
    if !rest.starts_with(' ') && !rest.is_empty() {
        return None;
    }
    Some(((c as u8 - b'A') as usize, rest.trim()))
}

/// The question and options of a multiple-choice prompt: the text, then at
/// least two option lines labelled `A)`, `B)`, ... in order (`.` or `:`
/// also accepted after the letter), then optionally lines of instructions
/// (e.g. "Answer with the letter of the correct option."), which are
/// dropped. The *last* such run of options counts, so a question that
/// itself lists statements keeps them. `None` when there is no such run
/// or no question before it.
pub fn parse(prompt: &str) -> Option<Question> {
    let lines: Vec<&str> = prompt.lines().collect();
    // Walk back over trailing non-option lines to the last option line,
    // then back over the run while the letters count down to A.
    let last = lines.iter().rposition(|l| option_line(l).is_some())?;
    let (mut want, _) = option_line(lines[last])?;
    let mut first = last;
    loop {
        match option_line(lines[first]) {
            Some((i, _)) if i == want => {}
            _ => return None,
        }
        if want == 0 {
            break;
        }
        if first == 0 {
            return None;
        }
        first -= 1;
        want -= 1;
    }
    let options: Vec<String> = lines[first..=last]
        .iter()
        .filter_map(|l| option_line(l).map(|(_, t)| t.to_string()))
        .collect();
    let text = lines[..first].join("\n").trim().to_string();
    (options.len() >= 2 && !text.is_empty()).then_some(Question { text, options })
}

/// The prompt every option is scored after (a plain completion, no chat
/// template: the same text for base and instruction-tuned members). Line
/// ends become `\n`, as [`parse`] gives them back, so the question scored
/// from a dataset and the one parsed out of its rendered prompt are the
/// same text.
pub fn prompt(question: &str) -> String {
    format!("Question: {}\nAnswer:", question.trim().replace("\r\n", "\n"))
}

/// The domain premise for calibration: the end of [`prompt`] without the
/// question. An option's likelihood after it measures how likely the
/// option's text is as *an answer* at all, whatever the question; scoring
/// by the difference (pointwise mutual information with the question, as
/// in Holtzman et al., 2021, "Surface Form Competition") stops a member
/// from picking an option only because its words are common, such as
/// "yes" over "no" on every reading question.
pub const DOMAIN_PROMPT: &str = "Answer:";

/// The continuations to score: each option's text after a space.
pub fn continuations(options: &[String]) -> Vec<String> {
    options.iter().map(|o| format!(" {}", o.trim())).collect()
}

/// An option's log-likelihood per byte of its text (the whole log-likelihood
/// for an empty option).
pub fn per_byte(logprob: f64, option: &str) -> f64 {
    logprob / option.trim().len().max(1) as f64
}

/// The index of the highest score; ties go to the earlier option, and
/// `NaN` never wins. `None` for no scores.
pub fn pick(scores: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rendered_prompt_and_drops_the_instruction() {
        let p = "What is 2+2?\nA) 3\nB) 4\nC) five\nAnswer with the letter of the correct option.";
        let q = parse(p).unwrap();
        assert_eq!(q.text, "What is 2+2?");
        assert_eq!(q.options, vec!["3", "4", "five"]);
    }

    #[test]
    fn the_last_run_of_options_counts() {
        let p = "Which statements hold?\nA) one\nB) two\nThen choose:\nA. both\nB. neither\nC: only A";
        let q = parse(p).unwrap();
        assert_eq!(q.text, "Which statements hold?\nA) one\nB) two\nThen choose:");
        assert_eq!(q.options, vec!["both", "neither", "only A"]);
    }

    #[test]
    fn refuses_what_is_not_multiple_choice() {
        assert_eq!(parse("What is the capital of France?"), None);
        // Letters out of order, a single option, no question, an article.
        assert_eq!(parse("Q?\nB) x\nC) y"), None);
        assert_eq!(parse("Q?\nA) x"), None);
        assert_eq!(parse("A) x\nB) y"), None);
        assert_eq!(parse("Q?\nA good answer\nB) y"), None);
    }

    #[test]
    fn picks_by_bytes_and_keeps_the_first_of_ties() {
        // -6 over 6 bytes beats -2 over 1 byte.
        let s = [per_byte(-2.0, "x"), per_byte(-6.0, "abcdef")];
        assert_eq!(pick(&s), Some(1));
        assert_eq!(pick(&[-1.0, -1.0]), Some(0));
        assert_eq!(pick(&[f64::NAN, -3.0]), Some(1));
        assert_eq!(pick(&[]), None);
        assert_eq!(prompt(" Why?\r\nSay. "), "Question: Why?\nSay.\nAnswer:");
        assert_eq!(continuations(&["a ".into()]), vec![" a"]);
    }
}

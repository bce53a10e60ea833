//! Answer extraction, normalisation and voting: what nearly every strategy
//! needs to compare free-text answers from different members.

/// The content of the last `\boxed{...}` or `\box{...}`, with nested braces
/// kept whole (`\boxed{\frac{1}{2}}` gives `\frac{1}{2}`).
pub fn last_boxed(text: &str) -> Option<String> {
    let mut found: Option<(usize, String)> = None;
    for marker in ["\\boxed{", "\\box{"] {
        for (pos, _) in text.match_indices(marker) {
            let start = pos + marker.len();
            let mut depth = 1usize;
            for (i, ch) in text[start..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => continue,
                }
                if depth == 0 {
                    if found.as_ref().is_none_or(|(p, _)| pos > *p) {
                        found = Some((pos, text[start..start + i].to_string()));
                    }
                    break;
                }
            }
        }
    }
    found.map(|(_, s)| s)
}

/// The final answer in a model's reply: the last `\boxed{}`, else what
/// follows the last "answer is" / "final answer:", else the first line.
/// The result is trimmed of surrounding punctuation and markdown.
pub fn extract(text: &str) -> String {
    if let Some(b) = last_boxed(text) {
        return clean(&b);
    }
    for marker in ["final answer:", "final answer is", "the answer is", "answer:"] {
        if let Some(pos) = rfind_ignoring_case(text, marker) {
            let rest = &text[pos + marker.len()..];
            let line = rest.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
            let c = clean(first_sentence(line));
            if !c.is_empty() {
                return c;
            }
        }
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    clean(first)
}

/// The byte offset in `text` of the last occurrence of the ASCII `marker`,
/// ignoring ASCII case. It searches `text` itself: offsets found in
/// `text.to_lowercase()` are not offsets in `text` (lowercasing changes the
/// byte length of some letters, such as 'İ'), and slicing with them panicked.
/// A match is ASCII bytes only, so both its ends are character boundaries.
fn rfind_ignoring_case(text: &str, marker: &str) -> Option<usize> {
    let (t, m) = (text.as_bytes(), marker.as_bytes());
    if m.is_empty() || m.len() > t.len() {
        return None;
    }
    (0..=t.len() - m.len())
        .rev()
        .find(|&i| t[i..i + m.len()].eq_ignore_ascii_case(m))
}

/// `line` up to its first `;`, or its first `.` that ends a sentence
/// (followed by a space or the end): a decimal point does not, so "18.75"
/// stays whole.
fn first_sentence(line: &str) -> &str {
    let b = line.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let ends = c == b';' || (c == b'.' && b.get(i + 1).is_none_or(|n| n.is_ascii_whitespace()));
        if ends {
            return &line[..i];
        }
    }
    line
}

/// The last number written in `s` (digits with `,` thousands separators
/// and a decimal point, a leading `-` kept as its sign when it is not a
/// hyphen inside a word), as a value.
fn last_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let signed = i > 0 && b[i - 1] == b'-' && (i == 1 || !b[i - 2].is_ascii_alphanumeric());
        let start = if signed { i - 1 } else { i };
        let mut j = i;
        while j < b.len()
            && (b[j].is_ascii_digit() || (matches!(b[j], b',' | b'.') && b.get(j + 1).is_some_and(u8::is_ascii_digit)))
        {
            j += 1;
        }
        if let Ok(v) = s[start..j].replace(',', "").parse::<f64>() {
            last = Some(v);
        }
        i = j;
    }
    last
}

/// `s` as one number (`1,600`, `$18`, `-3`, `4.0`), if that is all it is.
/// Commas count only as thousands separators: "2,3" (a list of answers)
/// is not the number 23, and stays a text answer.
fn as_number(s: &str) -> Option<f64> {
    let t = s.trim().trim_start_matches('$');
    let whole = t.split('.').next().unwrap_or("");
    if whole.split(',').skip(1).any(|group| group.len() != 3) {
        return None;
    }
    t.replace(',', "").parse::<f64>().ok()
}

fn clean(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| c == '*' || c == '"' || c == '\'' || c == '`' || c == ':' || c.is_whitespace())
        .trim_end_matches(['.', '!', ','])
        .trim()
        .to_string()
}

/// SQuAD-style normalisation: lowercase, drop punctuation and the articles
/// a/an/the, collapse whitespace. Two answers are "the same" when their
/// normal forms are equal.
pub fn normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The result of a vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    /// Index (into the votes) of the first vote for the winner.
    pub winner: usize,
    /// The winner's normal form.
    pub answer: String,
    /// Votes for the winner.
    pub votes: usize,
    /// All normal forms with their counts, most votes first.
    pub counts: Vec<(String, usize)>,
}

/// The short form a sentence-style answer ends with: "capital of france is
/// paris" counts as "paris" when another voter answered just "paris". Small
/// models state answers as sentences as often as bare words, and the answer
/// is what the sentence ends with. Only forms some voter actually gave are
/// used, and only whole trailing words, so "paris" never absorbs "not paris"
/// unless a voter said exactly "paris" and another said "... not paris".
fn canonical(n: &str, forms: &[String]) -> String {
    forms
        .iter()
        .filter(|f| f.len() < n.len() && n.ends_with(&format!(" {f}")))
        .min_by_key(|f| f.len())
        .cloned()
        .unwrap_or_else(|| n.to_string())
}

/// Plurality vote over normalised answers. Empty answers do not vote; a
/// sentence that ends with another voter's whole answer votes for that
/// answer. Ties go to the answer ranked first by `priority` (lower is better;
/// e.g. the voter's dev rank), then to the one seen first.
pub fn vote(answers: &[String], priority: &[usize]) -> Option<Tally> {
    let forms: Vec<String> = answers.iter().map(|a| normalize(a)).filter(|n| !n.is_empty()).collect();
    let mut counts: Vec<(String, usize, usize, usize)> = Vec::new(); // (norm, count, first index, best priority)
    for (i, a) in answers.iter().enumerate() {
        let n = normalize(a);
        if n.is_empty() {
            continue;
        }
        let n = canonical(&n, &forms);
        let p = priority.get(i).copied().unwrap_or(usize::MAX);
        match counts.iter_mut().find(|c| c.0 == n) {
            Some(c) => {
                c.1 += 1;
                c.3 = c.3.min(p);
            }
            None => counts.push((n, 1, i, p)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.3.cmp(&b.3)).then(a.2.cmp(&b.2)));
    let top = counts.first()?.clone();
    Some(Tally {
        winner: top.2,
        answer: top.0,
        votes: top.1,
        counts: counts.into_iter().map(|c| (c.0, c.1)).collect(),
    })
}

/// The answer a reply gives: for a multiple-choice question (its
/// `options`) the letter of the option [`choice`] picks, else its
/// [`extract`]ed short answer. `None` when it gives none.
pub fn answer_of(reply: &str, options: Option<&[String]>) -> Option<String> {
    match options {
        Some(o) => choice(reply, o).map(|i| letter(i).to_string()),
        None => {
            let a = extract(reply);
            (!a.trim().is_empty()).then_some(a)
        }
    }
}

/// The plurality answer of several replies (`None` for a failed one) and
/// the index of the first reply that gave it. Multiple choice counts
/// letters exactly (the normaliser would read the letter `A` as an
/// article), ties to the letter seen first; free text goes through
/// [`vote`]. `None` when no reply gave an answer.
pub fn plurality(replies: &[Option<String>], options: Option<&[String]>) -> Option<(String, usize)> {
    let answers: Vec<(usize, String)> = replies
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_deref().and_then(|t| answer_of(t, options)).map(|a| (i, a)))
        .collect();
    if options.is_some() {
        let mut counts: Vec<(String, usize, usize)> = Vec::new();
        for (i, a) in &answers {
            match counts.iter_mut().find(|c| c.0 == *a) {
                Some(c) => c.1 += 1,
                None => counts.push((a.clone(), 1, *i)),
            }
        }
        // Stable: equal counts keep first-seen order.
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        return counts.into_iter().next().map(|(a, _, i)| (a, i));
    }
    let given: Vec<String> = answers.iter().map(|(_, a)| a.clone()).collect();
    let tally = vote(&given, &[])?;
    Some((tally.answer, answers.get(tally.winner)?.0))
}

/// SQuAD token F1 between a predicted and a gold answer, after
/// [`normalize`]: the harmonic mean of token precision and recall (bag of
/// tokens). 1.0 for equal normal forms, 0.0 when nothing is shared.
pub fn f1(pred: &str, gold: &str) -> f64 {
    let p: Vec<String> = normalize(pred).split_whitespace().map(str::to_string).collect();
    let g: Vec<String> = normalize(gold).split_whitespace().map(str::to_string).collect();
    if p.is_empty() || g.is_empty() {
        return if p == g { 1.0 } else { 0.0 };
    }
    let mut left = g.clone();
    let mut common = 0usize;
    for t in &p {
        if let Some(i) = left.iter().position(|x| x == t) {
            left.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The option a multiple-choice reply picks, as an index into `n` options
/// labelled `A`, `B`, ... Stricter than the reference's lenient parser: it
/// accepts a reply that *starts* with the letter (`B`, `B)`, `B.`, `(B)`,
/// `B:`), or names it after "answer is" / "answer:" anywhere, and otherwise
/// the single option whose text the reply contains. A reply that mentions
/// several options, or none, picks nothing instead of guessing.
pub fn choice(reply: &str, options: &[String]) -> Option<usize> {
    let n = options.len();
    let letter_at = |s: &str| -> Option<usize> {
        let s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '*' || c == '(' || c == '[');
        let mut chars = s.chars();
        let c = chars.next()?;
        let next = chars.next();
        let idx = (c.to_ascii_uppercase() as u32).checked_sub('A' as u32)? as usize;
        // "I'm" and "A's" are words, not letters.
        let bounded = next.is_none_or(|d| !d.is_alphanumeric() && d != '\'' && d != '’');
        (c.is_ascii_alphabetic() && idx < n && bounded).then_some(idx)
    };
    if let Some(i) = letter_at(reply) {
        // "A" alone or "A)" etc.; but not the English words "A" and "I"
        // opening a sentence ("A good ...", "I think ..."), which would
        // otherwise read as options A and I (TruthfulQA has up to 13).
        let after = reply.trim_start().get(1..).unwrap_or("");
        let word = reply.trim_start().starts_with(['A', 'a', 'I', 'i'])
            && after.starts_with(' ')
            && !after.trim().is_empty()
            && !after.trim_start().starts_with(['-', ':', ')']);
        if !word {
            return Some(i);
        }
    }
    for marker in ["answer is", "answer:", "option"] {
        if let Some(pos) = rfind_ignoring_case(reply, marker) {
            if let Some(i) = letter_at(&reply[pos + marker.len()..]) {
                return Some(i);
            }
        }
    }
    let norm = normalize(reply);
    let mut hits = options
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            let o = normalize(o);
            !o.is_empty() && format!(" {norm} ").contains(&format!(" {o} "))
        })
        .map(|(i, _)| i);
    match (hits.next(), hits.next()) {
        (Some(i), None) => Some(i),
        _ => None,
    }
}

/// The letter of option `i` (`0` is `A`).
pub fn letter(i: usize) -> char {
    (b'A' + (i as u8 % 26)) as char
}

/// Whether `reply` answers `example` correctly. Multiple choice (the example
/// has `choices`; its `answer` is the letter or the option text): the option
/// [`choice`] picks must be the right one. Otherwise the [`extract`]ed answer
/// must equal the reference after [`normalize`], or equal it as a number
/// (`"4.0"` is `4`), or end with it as whole words ("the capital is paris").
pub fn is_correct(reply: &str, example: &crate::Example) -> bool {
    if !example.choices.is_empty() {
        let want = example.answer.trim();
        let right = if want.len() == 1 {
            want.chars()
                .next()
                .and_then(|c| (c.to_ascii_uppercase() as usize).checked_sub('A' as usize))
        } else {
            example.choices.iter().position(|c| normalize(c) == normalize(want))
        };
        return right.is_some() && choice(reply, &example.choices) == right;
    }
    let extracted = extract(reply);
    if let Some(want) = as_number(&example.answer) {
        // A numeric reference is compared as a number, with its sign and
        // decimals: the last number the answer states ("she pays $18"),
        // never a string suffix ("18.75" is not 18, "3" is not -3).
        return last_number(&extracted).is_some_and(|got| (got - want).abs() < 1e-6);
    }
    let got = normalize(&extracted);
    let want = normalize(&example.answer);
    if want.is_empty() {
        return false;
    }
    got == want || got.ends_with(&format!(" {want}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurality_counts_letters_exactly_and_keeps_the_first_of_equals() {
        let o: Vec<String> = vec!["red".into(), "blue".into(), "green".into()];
        let r = |s: &str| Some(s.to_string());
        let sols = vec![r("B) blue"), None, r("C"), r("B")];
        assert_eq!(plurality(&sols, Some(&o)), Some(("B".to_string(), 0)));
        assert_eq!(plurality(&[r("C"), r("A")], Some(&o)), Some(("C".to_string(), 0)));
        assert_eq!(plurality(&[None, r("nothing")], Some(&o)), None);
        // Free text: a sentence votes for the bare answer it ends with.
        let free = vec![r("The capital is Paris"), r("Paris"), r("Lyon")];
        assert_eq!(plurality(&free, None), Some(("paris".to_string(), 0)));
    }

    #[test]
    fn boxed_keeps_nested_braces_and_takes_the_last() {
        assert_eq!(
            last_boxed(r"so \boxed{\frac{1}{2}} done").as_deref(),
            Some(r"\frac{1}{2}")
        );
        assert_eq!(last_boxed(r"\boxed{1} then \boxed{2}").as_deref(), Some("2"));
        assert_eq!(last_boxed(r"\box{7}").as_deref(), Some("7"));
        assert_eq!(last_boxed(r"\boxed{unclosed"), None);
    }

    #[test]
    fn extract_prefers_box_then_answer_is_then_first_line() {
        assert_eq!(extract("Work... The answer is **Paris**."), "Paris");
        assert_eq!(extract("Final Answer: 42\nmore"), "42");
        assert_eq!(extract("Paris.\nIt is the capital."), "Paris");
        assert_eq!(extract(r"x \boxed{12} and the answer is 13"), "12");
    }

    #[test]
    fn normalize_is_squad_style() {
        assert_eq!(normalize("The  Eiffel-Tower!"), "eiffel tower");
        assert_eq!(normalize("an Apple"), "apple");
    }

    #[test]
    fn vote_counts_normal_forms_and_breaks_ties_by_priority() {
        let a: Vec<String> = ["Paris", "paris.", "Lyon", "", "Lyon"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = vote(&a, &[]).unwrap();
        assert_eq!((t.answer.as_str(), t.votes, t.winner), ("paris", 2, 0));
        // Tie 2-2: priority says voter 2 (Lyon) is the better-ranked member.
        let t = vote(&a, &[5, 5, 0, 5, 5]).unwrap();
        assert_eq!(t.answer, "lyon");
        assert!(vote(&[String::new()], &[]).is_none());
    }

    #[test]
    fn sentences_vote_for_the_bare_answer_they_end_with() {
        let a: Vec<String> = ["The capital of France is Paris", "Paris", "Lyon", "paris."]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = vote(&a, &[]).unwrap();
        assert_eq!((t.answer.as_str(), t.votes), ("paris", 3));
        // Without a bare "paris" among the answers, sentences stay as they are.
        let b: Vec<String> = ["It is Paris", "Lyon"].iter().map(|s| s.to_string()).collect();
        assert_eq!(vote(&b, &[]).unwrap().answer, "it is paris");
    }
    fn opts() -> Vec<String> {
        ["Paris", "Lyon", "Marseille", "Nice"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn choice_reads_a_leading_letter_or_an_answer_marker() {
        let o = opts();
        assert_eq!(choice("B", &o), Some(1));
        assert_eq!(choice("(C) Marseille", &o), Some(2));
        assert_eq!(choice("d.", &o), Some(3));
        assert_eq!(choice("A) Paris", &o), Some(0));
        assert_eq!(choice("I think the answer is C.", &o), Some(2));
        assert_eq!(choice("Answer: b", &o), Some(1));
        // An option's text, alone, counts; two options' texts do not.
        assert_eq!(choice("It must be Lyon.", &o), Some(1));
        assert_eq!(choice("Paris or Lyon", &o), None);
        // The article "A" is not option A; letters past the options are nothing.
        assert_eq!(choice("A city in the south", &o), None);
        assert_eq!(choice("E", &o), None);
        assert_eq!(choice("Because", &o), None);
    }

    #[test]
    fn is_correct_handles_letters_texts_and_numbers() {
        let mcq = |a: &str| crate::Example {
            input: crate::Input::Prompt(String::new()),
            answer: a.into(),
            choices: opts(),
        };
        assert!(is_correct("B) Lyon", &mcq("B")));
        assert!(is_correct("Lyon", &mcq("Lyon")));
        assert!(!is_correct("A", &mcq("B")));
        let open = |a: &str| crate::Example {
            input: crate::Input::Prompt(String::new()),
            answer: a.into(),
            choices: vec![],
        };
        assert!(is_correct("The answer is 4.0", &open("4")));
        assert!(is_correct(r"so \boxed{1,200}", &open("1200")));
        assert!(is_correct("The capital of France is Paris.", &open("Paris")));
        assert!(!is_correct("Lyon", &open("Paris")));
        assert!(!is_correct("anything", &open("")));
    }
    #[test]
    fn numbers_keep_their_sign_and_decimals_and_odd_letters_do_not_panic() {
        let open = |a: &str| crate::Example {
            input: crate::Input::Prompt(String::new()),
            answer: a.into(),
            choices: vec![],
        };
        // Lowercasing 'İ' takes three bytes for two: a marker's offset in
        // the lowercased text is not one in the reply (this panicked).
        assert!(is_correct("İİİ The answer is 4", &open("4")));
        assert_eq!(extract("İİ ANSWER: Paris"), "Paris");
        assert!(!is_correct("The answer is 18.75.", &open("18")));
        assert!(is_correct("The answer is 18.75.", &open("18.75")));
        assert!(!is_correct("The answer is 3", &open("-3")));
        assert!(is_correct("The answer is -3. Done", &open("-3")));
        assert!(is_correct("She pays $1,600 in all", &open("1,600")));
        assert!(is_correct("so 12 - 4 = 8", &open("8")));
        assert!(!is_correct("The answer is twenty", &open("20")));
        // A comma that is no thousands separator makes a list, not a number.
        assert!(is_correct("The answer is 2, 3", &open("2,3")));
        assert!(!is_correct("The answer is 23", &open("2,3")));
    }

    #[test]
    fn the_words_i_and_a_are_not_options() {
        let o: Vec<String> = (0..13).map(|i| format!("option text {i}")).collect();
        assert_eq!(choice("I think the answer is B", &o), Some(1));
        assert_eq!(choice("I'm not sure", &o), None);
        assert_eq!(choice("i guess so", &o), None);
        assert_eq!(choice("I", &o), Some(8));
        assert_eq!(choice("I) option text 8", &o), Some(8));
        assert_eq!(choice("(I)", &o), Some(8));
    }

    #[test]
    fn f1_is_squad_token_overlap() {
        assert_eq!(f1("The Eiffel Tower", "eiffel tower"), 1.0);
        assert_eq!(f1("Paris", "Lyon"), 0.0);
        let x = f1("the tower in paris", "eiffel tower");
        // 1 common token; precision 1/3 ("tower in paris"), recall 1/2.
        assert!((x - 0.4).abs() < 1e-9, "{x}");
        assert_eq!(f1("", ""), 1.0);
    }
}

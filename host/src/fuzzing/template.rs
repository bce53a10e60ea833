//! Chat templates: the Jinja source a model file carries, compiled and
//! rendered over a conversation, both drawn from the input.
//!
//! Oracle: no panic and bounded allocation; every render ends (the
//! template engine runs on fuel, [`TEMPLATE_FUEL`]), with the answer or a
//! typed error.
//!
//! [`TEMPLATE_FUEL`]: crate::backends::gguf::template::TEMPLATE_FUEL

use crate::backends::gguf::template::ChatFormat;
use crate::inference::Message;

/// The input: the template source, then NUL-separated role and content
/// pairs (at most 8 turns); the text is decoded lossily.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let mut turns = Vec::new();
    while let (Some(role), Some(content)) = (parts.next(), parts.next()) {
        if turns.len() >= 8 {
            break;
        }
        turns.push(Message {
            role: role.to_string(),
            content: content.to_string(),
        });
    }
    if let Ok(f) = ChatFormat::from_template(source, "<s>".into(), "</s>".into()) {
        let _ = f.render(&turns);
        let _ = f.render_with(&turns, false);
    }
}

/// Starts the template renderer before the first input: compiling its
/// wasm module takes seconds in a coverage-instrumented build, which
/// libFuzzer would otherwise charge to the first input as a timeout. (The
/// `gguf` target renders templates too and calls it as well.)
pub fn init() {
    let _ = ChatFormat::from_template("", String::new(), String::new());
}

/// Seeds: the kinds of template real model files carry (ChatML, Llama-2
/// style with a system block, Gemma's turns), and the loops and recursion
/// a hostile one would use.
pub const SEEDS: &[&str] = &[
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set s = 'x' * 100000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    // One instruction, unbounded native work: what the engine's fuel does
    // not see, and the sandbox's memory cap and wasm fuel stop.
    "{% for m in messages %}{% for i in range(100000) %}{% set s = 'ab' * 50000000 %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% for i in range(100000) %}{% set s = (range(100000) * 1000)|join %}{% endfor %}",
    "{% set ns = namespace(s='ab' * 1000000) %}{% for i in range(100000) %}{% set ns.t = ns.s ~ i %}{% endfor %}",
];

/// A seed as the target's input: the source, then one user turn.
pub fn seed_input(source: &str) -> Vec<u8> {
    format!("{source}\0user\0What is 2+2?").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_templates_end_with_an_error() {
        for src in &SEEDS[3..] {
            // Some fail as they compile: minijinja folds constant
            // expressions such as a string repetition at compile time.
            let started = std::time::Instant::now();
            let r = ChatFormat::from_template(src, String::new(), String::new())
                .and_then(|f| f.render(&[Message::user("hi")]));
            assert!(r.is_err(), "{src}: rendered {} bytes", r.map(|s| s.len()).unwrap_or(0));
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "{src}");
        }
    }

    #[test]
    fn real_templates_still_render_within_their_fuel() {
        let long: Vec<Message> = (0..200).map(|i| Message::user(format!("turn {i}"))).collect();
        for src in &SEEDS[..3] {
            let f = ChatFormat::from_template(src, "<s>".into(), "</s>".into()).expect("compiles");
            let out = f.render(&long).expect("renders");
            assert!(out.contains("turn 199"), "{src}");
        }
    }

    /// Inputs the fuzzer found; each once took seconds or more per render.
    const REGRESSIONS: &[&[u8]] = &[include_bytes!(
        "../../../fuzz/regressions/template-repeated-string-in-loop.bin"
    )];

    #[test]
    fn fuzzer_findings_end_within_the_sandbox_limits() {
        for input in REGRESSIONS {
            let started = std::time::Instant::now();
            check(input);
            // Two renders at about a quarter of a second each when busy;
            // the bound is loose because test machines are shared.
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn seeds_run_through_the_check() {
        for s in SEEDS {
            check(&seed_input(s));
        }
    }
}

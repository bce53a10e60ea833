//! The arguments a guest passes to its host calls (`generate`, `fan-out`,
//! `score`, `generate-streamed`): converted from the WIT types, then held to
//! the rules every model call obeys before anything is queued.
//!
//! Oracle: no panic and bounded allocation; conversion to the host's types
//! and back gives the guest's values unchanged; whatever the validation
//! accepts is within its stated limits (turns, bytes, temperature range,
//! stop sequences).

use arbitrary::{Arbitrary, Unstructured};

use crate::bindings::types as w;
use crate::inference::{Input, MAX_INPUT_BYTES, MAX_TURNS};
use crate::sandbox::convert::{input_in, input_out, params_in, params_out};

fn text(u: &mut Unstructured) -> arbitrary::Result<String> {
    // Mostly short; sometimes long enough to meet the byte limits.
    if u.ratio(1, 16)? {
        let n = u.int_in_range(0..=MAX_INPUT_BYTES + 16)?;
        Ok("x".repeat(n))
    } else {
        String::arbitrary(u)
    }
}

fn input(u: &mut Unstructured) -> arbitrary::Result<w::Input> {
    Ok(if bool::arbitrary(u)? {
        w::Input::Prompt(text(u)?)
    } else {
        // Past the turn limit sometimes, without drawing a byte per turn.
        let n = if u.ratio(1, 16)? {
            MAX_TURNS + 1
        } else {
            u.int_in_range(0..=8)?
        };
        let mut turns = Vec::with_capacity(n);
        for _ in 0..n {
            turns.push(w::Message {
                role: String::arbitrary(u)?,
                content: String::arbitrary(u)?,
            });
        }
        w::Input::Chat(turns)
    })
}

fn params(u: &mut Unstructured) -> arbitrary::Result<w::GenParams> {
    let mut stop = Vec::new();
    for _ in 0..u.int_in_range(0..=20)? {
        stop.push(String::arbitrary(u)?);
    }
    Ok(w::GenParams {
        max_tokens: Arbitrary::arbitrary(u)?,
        temperature: Arbitrary::arbitrary(u)?,
        top_p: Arbitrary::arbitrary(u)?,
        top_k: Arbitrary::arbitrary(u)?,
        seed: Arbitrary::arbitrary(u)?,
        stop,
    })
}

/// Draws one host call's arguments from `data` and runs them through the
/// conversion and the checks.
pub fn check(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (Ok(i), Ok(p)) = (input(&mut u), params(&mut u)) else {
        return;
    };
    let mut continuations = Vec::new();
    while let Ok(c) = String::arbitrary(&mut u) {
        if continuations.len() >= 300 || c.is_empty() {
            break;
        }
        continuations.push(c);
    }
    let shown = format!("{i:?}");
    let host = input_in(i);
    assert_eq!(format!("{:?}", input_out(&host)), shown, "input round trip");
    if host.check_size(0).is_ok() {
        if let Input::Chat(turns) = &host {
            assert!(turns.len() <= MAX_TURNS);
        }
        assert!(host.counted_bytes() <= MAX_INPUT_BYTES);
    }
    let _ = host.check_with(&continuations);
    let shown = format!("{p:?}");
    let hp = params_in(p);
    assert_eq!(format!("{:?}", params_out(&hp)), shown, "params round trip");
    if hp.validate().is_ok() {
        if let Some(t) = hp.temperature {
            assert!(t.is_finite() && (0.0..=10.0).contains(&t), "temperature {t} accepted");
        }
        if let Some(p) = hp.top_p {
            assert!(p.is_finite() && p > 0.0 && p <= 1.0, "top_p {p} accepted");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn drawn_arguments_hold_the_oracle() {
        for seed in 0u64..2000 {
            let bytes = crate::fuzzing::drawn_bytes(seed, 512);
            super::check(&bytes);
        }
    }
}

//! The tokenizer Tessera rebuilds from a GGUF file's metadata (a model
//! file is a contributor's upload): vocabularies, merges, scores, token
//! types and special-token ids drawn from the input, then text encoded
//! and decoded with the result.
//!
//! Oracle: no panic and bounded allocation, whatever the vocabulary; a
//! vocabulary that builds encodes any text to ids inside it.

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

use crate::backends::gguf::tokenizer::{self, GgufTokenizer};

/// Longest vocabulary drawn: enough for merges to chain, small enough to
/// stay fast.
const MAX_VOCAB: usize = 300;

fn string(u: &mut Unstructured) -> arbitrary::Result<String> {
    let len = u.int_in_range(0..=12)?;
    let mut s = String::new();
    for _ in 0..len {
        // Mostly a small alphabet (so pieces and merges meet), sometimes
        // any character, including the SentencePiece space and controls.
        let c = match u.int_in_range(0..=9)? {
            0 => char::arbitrary(u)?,
            1 => '\u{2581}',
            2 => ' ',
            n => char::from(b'a' + n as u8),
        };
        s.push(c);
    }
    Ok(s)
}

fn id(u: &mut Unstructured, n: usize) -> arbitrary::Result<Value> {
    // In range usually; out of range or of the wrong type sometimes.
    Ok(match u.int_in_range(0..=5)? {
        0 => Value::U32(u32::arbitrary(u)?),
        1 => Value::I32(i32::arbitrary(u)?),
        2 => Value::String(string(u)?),
        _ => Value::U32(u.int_in_range(0..=n as u32)?),
    })
}

fn content(u: &mut Unstructured) -> arbitrary::Result<Content> {
    let n = u.int_in_range(0..=MAX_VOCAB)?;
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(Value::String(string(u)?));
    }
    let mut metadata = HashMap::new();
    let model = match u.int_in_range(0..=4)? {
        0 => "llama".to_string(),
        1 => string(u)?,
        _ => "gpt2".to_string(),
    };
    metadata.insert("tokenizer.ggml.model".to_string(), Value::String(model));
    if bool::arbitrary(u)? {
        let m = u.int_in_range(0..=MAX_VOCAB)?;
        let mut merges = Vec::with_capacity(m);
        for _ in 0..m {
            let text = if bool::arbitrary(u)? {
                format!("{} {}", string(u)?, string(u)?)
            } else {
                string(u)?
            };
            merges.push(Value::String(text));
        }
        metadata.insert("tokenizer.ggml.merges".to_string(), Value::Array(merges));
    }
    if bool::arbitrary(u)? {
        let mut scores = Vec::new();
        for _ in 0..u.int_in_range(0..=n + 2)? {
            scores.push(Value::F32(f32::arbitrary(u)?));
        }
        metadata.insert("tokenizer.ggml.scores".to_string(), Value::Array(scores));
    }
    if bool::arbitrary(u)? {
        let mut types = Vec::new();
        for _ in 0..u.int_in_range(0..=n + 2)? {
            types.push(Value::I32(u.int_in_range(-1..=7)?));
        }
        metadata.insert("tokenizer.ggml.token_type".to_string(), Value::Array(types));
    }
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
    ] {
        if bool::arbitrary(u)? {
            metadata.insert(key.to_string(), id(u, n)?);
        }
    }
    if bool::arbitrary(u)? {
        metadata.insert(
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(bool::arbitrary(u)?),
        );
    }
    if bool::arbitrary(u)? {
        metadata.insert(
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(bool::arbitrary(u)?),
        );
    }
    if u.ratio(1, 8)? {
        // The tokens under a value of the wrong type.
        metadata.insert("tokenizer.ggml.tokens".to_string(), Value::U8(1));
    } else {
        metadata.insert("tokenizer.ggml.tokens".to_string(), Value::Array(tokens));
    }
    Ok(Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    })
}

/// Builds a tokenizer from metadata drawn from `data`, then encodes and
/// decodes text drawn from the rest.
pub fn check(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(c) = content(&mut u) else { return };
    if let Ok(tok) = tokenizer::from_gguf(&c) {
        exercise(&tok, declared(&c), u.take_rest());
    }
}

/// The vocabulary size the file declares: the length of its token list,
/// which is what the model's embedding rows are checked against.
pub fn declared(c: &Content) -> usize {
    match c.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

/// Encodes `text` (lossily decoded) with `tok` and decodes the ids: every
/// id is inside the declared vocabulary of `vocab` tokens (duplicates in a
/// token list make the tokenizer's own map smaller, not the ids), and
/// nothing panics.
pub fn exercise(tok: &GgufTokenizer, vocab: usize, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    if let Ok(enc) = tok.tokenizer.encode(text.as_ref(), false) {
        let ids = enc.get_ids();
        assert!(
            ids.iter().all(|&i| (i as usize) < vocab),
            "an id outside the vocabulary of {vocab}: {ids:?}"
        );
        let _ = tok.tokenizer.decode(ids, false);
        let _ = tok.tokenizer.decode(ids, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_longer_than_every_token_is_an_error_not_a_panic() {
        // Found by this target: tokenizers 0.23 panicked building the BPE.
        let strings = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        let mut metadata = HashMap::new();
        metadata.insert("tokenizer.ggml.model".to_string(), Value::String("gpt2".into()));
        metadata.insert("tokenizer.ggml.tokens".to_string(), strings(&["a", "bb"]));
        metadata.insert("tokenizer.ggml.merges".to_string(), strings(&["a bb"]));
        let c = Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let e = tokenizer::from_gguf(&c).err().expect("refused");
        assert!(e.contains("merge `a bb`"), "{e}");
    }

    #[test]
    fn drawn_vocabularies_build_or_fail_cleanly() {
        let mut built = 0;
        for seed in 0u64..300 {
            let bytes = crate::fuzzing::drawn_bytes(seed, 4096);
            super::check(&bytes);
            let mut u = arbitrary::Unstructured::new(&bytes);
            if let Ok(c) = super::content(&mut u) {
                built += usize::from(crate::backends::gguf::tokenizer::from_gguf(&c).is_ok());
            }
        }
        assert!(built > 10, "the generator reaches working tokenizers ({built} of 300)");
    }
}

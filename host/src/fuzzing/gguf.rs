//! Model files: the GGUF header and tensor table, then what loading does
//! next with an accepted header (architecture, tokenizer, chat template).
//!
//! Oracle: no panic and bounded allocation on any bytes; a header that
//! [`read_content`] accepts has every tensor inside the file (so loading
//! never reads or reserves past it).
//!
//! [`read_content`]: crate::backends::gguf::read_content

use std::io::Cursor;

use crate::backends::gguf::{read_content, template::ChatFormat, tokenizer};
use crate::inference::Message;

/// Runs `data` through the GGUF header reader and what follows it.
pub fn check(data: &[u8]) {
    let Some(content) = contained(|| read_content(&mut Cursor::new(data), data.len() as u64).ok()) else {
        return;
    };
    for t in content.tensor_infos.values() {
        let elems: u64 = t.shape.dims().iter().map(|&d| d as u64).product();
        let bytes = elems / t.ggml_dtype.block_size() as u64 * t.ggml_dtype.type_size() as u64;
        let end = content.tensor_data_offset + t.offset + bytes;
        assert!(end <= data.len() as u64, "an accepted tensor lies past the end");
    }
    let _ = crate::backends::gguf::architecture(&content, "fuzz");
    if let Ok(tok) = tokenizer::from_gguf(&content) {
        super::tokenizer::exercise(&tok, super::tokenizer::declared(&content), data);
    }
    if let Some(src) = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        if let Ok(f) = ChatFormat::from_template(src, "<s>".into(), "</s>".into()) {
            let _ = f.render(&[Message::user("hi")]);
        }
    }
}

/// Runs `f`, for which [`read_content`] contains panics of the GGUF reader
/// it wraps, with the panic hook silenced: libFuzzer's hook aborts on any
/// panic, even one caught, and a contained panic is the product working.
fn contained<T>(f: impl FnOnce() -> T) -> T {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = f();
    std::panic::set_hook(hook);
    out
}

/// A small valid GGUF file (llama architecture, a gpt2 tokenizer, a chat
/// template, one tensor): the seed the fuzzers mutate, and the proof in
/// tests that [`check`] reaches past the header.
pub fn seed() -> Vec<u8> {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::{GgmlDType, QTensor};
    let tokens: Vec<Value> = ["a", "b", "ab", "<s>", "</s>"]
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let merges = vec![Value::String("a b".into())];
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(3)),
        ("tokenizer.ggml.eos_token_id", Value::U32(4)),
        (
            "tokenizer.chat_template",
            Value::String("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}".into()),
        ),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let device = candle_core::Device::Cpu;
    let tensor = candle_core::Tensor::zeros((2, 32), candle_core::DType::F32, &device)
        .and_then(|t| QTensor::quantize(&t, GgmlDType::Q8_0))
        .expect("a small tensor quantizes");
    let mut out = Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut out, &meta_refs, &[("w", &tensor)]).expect("writing to memory");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_read_and_reaches_the_tokenizer() {
        let s = seed();
        let c = read_content(&mut Cursor::new(&s), s.len() as u64).expect("the seed reads");
        assert!(tokenizer::from_gguf(&c).is_ok());
        check(&s);
    }

    #[test]
    fn a_zero_alignment_is_an_error_not_a_panic() {
        // Found by the `gguf` target: the reader divided by it.
        use candle_core::quantized::gguf_file::Value;
        let mut out = Cursor::new(Vec::new());
        let zero = Value::U32(0);
        candle_core::quantized::gguf_file::write(&mut out, &[("general.alignment", &zero)], &[]).unwrap();
        let bytes = out.into_inner();
        let e = read_content(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap_err();
        assert!(e.contains("alignment") || e.contains("malformed"), "{e}");
        check(&bytes);
    }

    #[test]
    fn a_tensor_past_the_end_or_too_large_is_refused() {
        let mut s = seed();
        let c = read_content(&mut Cursor::new(&s), s.len() as u64).unwrap();
        // Cut into the tensor's data: the table now points past the end.
        s.truncate(c.tensor_data_offset as usize + 10);
        let e = read_content(&mut Cursor::new(&s), s.len() as u64).unwrap_err();
        assert!(e.contains("past the end of the file"), "{e}");
    }

    #[test]
    fn every_truncation_and_byte_flip_of_the_seed_is_handled() {
        let s = seed();
        for cut in 0..s.len() {
            check(&s[..cut]);
        }
        let mut m = s.clone();
        for i in 0..m.len() {
            for v in [0x00, 0xff, 0x7f, 0x80] {
                let old = m[i];
                m[i] = v;
                check(&m);
                m[i] = old;
            }
        }
    }
}

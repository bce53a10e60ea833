//! Builds a `tokenizers::Tokenizer` from a GGUF file's metadata.
//!
//! None of the GGUF files in the default pool ships a `tokenizer.json`, so the
//! tokenizer is reconstructed from the `tokenizer.ggml.*` keys that llama.cpp's
//! converter writes:
//! - `tokenizer.ggml.model = gpt2`: a byte-level BPE. The vocabulary is
//!   `tokens` (index = id), the merge list is `merges` (`"a b"` strings, in
//!   priority order) and the pre-tokenizer is chosen from `tokenizer.ggml.pre`.
//! - `tokenizer.ggml.model = llama`: a SentencePiece-style vocabulary with a
//!   score per token and no merge list (Gemma). SentencePiece's BPE merges, at
//!   each step, the adjacent pair whose joined piece has the highest score.
//!   A BPE whose merge ranks follow the joined pieces' scores does exactly
//!   that, so the merge list is derived from the scores: every way of
//!   splitting a vocabulary piece into two vocabulary pieces is a merge,
//!   ranked by the piece's score. Spaces become `▁`, unknown bytes fall back
//!   to the `<0xNN>` byte tokens.
//!
//! Control and user-defined tokens (`token_type` 3 and 4) are registered as
//! special added tokens so that chat markers such as `<|im_start|>` are never
//! split.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The pre-tokenizer regex Qwen2 uses (from its tokenizer.json's `Split`).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus the special-token facts generation needs.
pub struct GgufTokenizer {
    /// The reconstructed tokenizer.
    pub tokenizer: Tokenizer,
    /// Beginning-of-sequence token, if the model uses one.
    pub bos: Option<(u32, String)>,
    /// End-of-sequence token.
    pub eos: Option<(u32, String)>,
    /// Whether a BOS token should be prepended to raw prompts.
    pub add_bos: bool,
    /// Every control token id: generation ends on any end-of-turn marker.
    pub end_of_turn: Vec<u32>,
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>, String> {
    let v = meta(content, key).ok_or_else(|| format!("metadata key `{key}` is missing"))?;
    let arr = v.to_vec().map_err(|e| format!("metadata key `{key}`: {e}"))?;
    arr.iter()
        .map(|x| x.to_string().cloned().map_err(|e| format!("metadata key `{key}`: {e}")))
        .collect()
}

fn token_types(content: &Content, n: usize) -> Vec<i32> {
    meta(content, "tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|arr| arr.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; n])
}

fn opt_u32(content: &Content, key: &str) -> Option<u32> {
    meta(content, key).and_then(|v| v.to_u32().ok())
}

/// The BPE word cache is off. tokenizers 0.23 keeps each BPE's cache in a
/// per-thread map keyed by the instance and never removes an entry when
/// the instance is dropped, so every tokenizer that encodes on a long-lived
/// thread and is then dropped (a merged or trained member, a reloaded pool)
/// would leave up to 10,000 cached words behind for the life of the
/// process. Found by the `gguf` fuzz target's allocation budget (about
/// 28 KB per tokenizer that encoded 1 KB of text). Merging a word's pieces
/// costs microseconds, nothing beside a forward pass.
pub const NO_WORD_CACHE: usize = 0;

/// Reads the tokenizer out of `content`. Errors name the missing or bad key.
pub fn from_gguf(content: &Content) -> Result<GgufTokenizer, String> {
    let model = meta(content, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or("metadata key `tokenizer.ggml.model` is missing: the file carries no tokenizer")?;
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let tokenizer = match model.as_str() {
        "gpt2" => gpt2_bpe(content, &tokens)?,
        "llama" => sentencepiece_bpe(content, &tokens)?,
        other => {
            return Err(format!(
                "tokenizer type `{other}` is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
            ))
        }
    };
    finish(content, tokenizer, tokens)
}

/// SentencePiece-style vocabulary (tokens + scores) as a score-ranked BPE.
fn sentencepiece_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer, String> {
    let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .map(|a| a.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
        .ok_or("metadata key `tokenizer.ggml.scores` is missing: a SentencePiece vocabulary needs scores")?;
    let types = token_types(content, tokens.len());
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Only ordinary pieces are reachable by merging.
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    id as u32,
                    a.to_string(),
                    b.to_string(),
                ));
            }
        }
    }
    // Highest score first; ties by id (earlier pieces were learned first).
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let unk = opt_u32(content, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(id as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .cache_capacity(NO_WORD_CACHE)
        .unk_token(unk)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("building the SentencePiece BPE failed: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let add_space_prefix = meta(content, "tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| e.to_string())?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), replace.clone().into()]).into()
    } else {
        replace.clone().into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| format!("setting the normalizer failed: {e}"))?;
    let mut decoders: Vec<DecoderWrapper> =
        vec![replace_back()?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

fn replace_back() -> Result<Replace, String> {
    Replace::new("\u{2581}", " ").map_err(|e| e.to_string())
}

/// GPT-2 style byte-level BPE from tokens + merges.
fn gpt2_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer, String> {
    let merges_raw = string_array(content, "tokenizer.ggml.merges")?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges = Vec::with_capacity(merges_raw.len());
    for m in &merges_raw {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| format!("merge `{m}` is not two tokens separated by a space"))?;
        // Checked here, before the library sees it: tokenizers 0.23 copies
        // the merged text into a buffer as long as the longest token before
        // checking that it is one, and panics when it is longer (found by
        // the `tokenizer` fuzz target).
        if !vocab.contains_key(a) || !vocab.contains_key(b) || !vocab.contains_key(&format!("{a}{b}")) {
            return Err(format!(
                "merge `{m}` joins tokens into `{a}{b}`, and the vocabulary lacks one of the three: the file's merges do not match its tokens"
            ));
        }
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .cache_capacity(NO_WORD_CACHE)
        .build()
        .map_err(|e| format!("building the BPE model failed: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let pre = meta(content, "tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM: every digit on its own, then GPT-2's byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "qwen2" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(QWEN2_PATTERN.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("bad qwen2 pattern: {e}"))?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Special tokens and BOS/EOS facts, common to both vocabulary kinds.
fn finish(content: &Content, mut tokenizer: Tokenizer, tokens: Vec<String>) -> Result<GgufTokenizer, String> {
    let types = token_types(content, tokens.len());
    let mut specials = Vec::new();
    let mut end_of_turn = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
        // Control tokens are special (dropped when decoding); user-defined
        // ones (Gemma's whitespace runs, say) are never split but are text.
        if *ty == TOKEN_TYPE_CONTROL {
            specials.push(AddedToken::from(t.clone(), true));
        } else if *ty == TOKEN_TYPE_USER_DEFINED {
            specials.push(AddedToken::from(t.clone(), false));
        }
        if *ty == TOKEN_TYPE_CONTROL && is_end_marker(t) {
            end_of_turn.push(i as u32);
        }
    }
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| format!("registering special tokens failed: {e}"))?;

    let name_of = |id: u32| tokens.get(id as usize).map(|t| (id, t.clone()));
    let bos = opt_u32(content, "tokenizer.ggml.bos_token_id").and_then(name_of);
    let eos = opt_u32(content, "tokenizer.ggml.eos_token_id").and_then(name_of);
    if let Some((id, _)) = &eos {
        if !end_of_turn.contains(id) {
            end_of_turn.push(*id);
        }
    }
    let add_bos = meta(content, "tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    Ok(GgufTokenizer {
        tokenizer,
        bos,
        eos,
        add_bos,
        end_of_turn,
    })
}

/// Control tokens that end a turn or a document.
fn is_end_marker(token: &str) -> bool {
    matches!(
        token,
        "<|im_end|>" | "<|endoftext|>" | "<end_of_turn>" | "<eos>" | "</s>" | "<|eot_id|>" | "<|end|>"
    )
}

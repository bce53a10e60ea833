//! Bad model files fail at load with an error that names the file and the
//! problem, and the rest of the pool still loads.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tessera::backends::gguf::GgufModel;
use tessera::pool::{Pool, PoolConfig};
use tessera::Paths;

use crate::common::scratch;

/// A tiny GGUF with the given metadata and one tensor.
fn tiny_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let t = QTensor::quantize(
        &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
}

fn load_err(path: &Path) -> String {
    match GgufModel::load("bad", path, &candle_core::Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_unknown_and_tokenizerless_files_are_named() {
    let dir = scratch("bad-files");

    // Truncated: the real SmolLM2 file cut to its first megabyte.
    let real = Paths::from_env().models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&real).expect("default pool fetched");
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..1 << 20]).unwrap();
    let e = load_err(&cut);
    assert!(e.contains("truncated.gguf"), "{e}");

    // Not GGUF at all.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let e = load_err(&junk);
    assert!(e.contains("junk.gguf") && e.contains("not a readable GGUF"), "{e}");

    // An architecture we do not run.
    let mamba = dir.join("mamba.gguf");
    tiny_gguf(&mamba, &[("general.architecture", Value::String("mamba".into()))]);
    let e = load_err(&mamba);
    assert!(
        e.contains("mamba.gguf") && e.contains("`mamba` is not supported"),
        "{e}"
    );

    // A supported architecture but no tokenizer in the metadata.
    let notok = dir.join("no-tokenizer.gguf");
    tiny_gguf(&notok, &[("general.architecture", Value::String("llama".into()))]);
    let e = load_err(&notok);
    assert!(e.contains("no-tokenizer.gguf") && e.contains("tokenizer"), "{e}");
}

#[test]
fn one_bad_member_does_not_stop_the_pool() {
    let dir = scratch("bad-member");
    std::fs::write(dir.join("junk.gguf"), b"junk").unwrap();
    let real = Paths::from_env().models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::os::unix::fs::symlink(&real, dir.join("smol.gguf")).unwrap();
    let toml = format!(
        "[[member]]\nid='junk'\nbackend='gguf'\npath='junk.gguf'\nsha256='{junk}'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n\
         [[member]]\nid='smol'\nbackend='gguf'\npath='smol.gguf'\nsha256='{smol}'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n",
        junk = hex_sha(b"junk"),
        smol = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    );
    let cfg = PoolConfig::from_toml(&toml).unwrap();
    let loaded = Pool::load(&cfg, &dir);
    assert_eq!(loaded.pool.ids(), ["smol".to_string()]);
    let msg = loaded.failures[0].to_string();
    assert!(msg.contains("junk") && msg.contains("junk.gguf"), "{msg}");
}

/// Digests are remembered between loads (an unchanged file is not read
/// again), but a file written after it was verified is hashed anew and
/// refused when it no longer matches.
#[test]
fn a_member_file_changed_after_it_was_verified_is_refused() {
    let dir = scratch("changed-member");
    std::fs::write(dir.join("w.gguf"), b"junk").unwrap();
    let toml = format!(
        "[[member]]\nid='w'\nbackend='gguf'\npath='w.gguf'\nsha256='{}'\n[member.card]\ncontributor='c'\ndescription='d'\nlicense='l'\n",
        hex_sha(b"junk")
    );
    let cfg = PoolConfig::from_toml(&toml).unwrap();
    // The digest matches (and is remembered); the file is no GGUF.
    let first = Pool::load(&cfg, &dir).failures[0].to_string();
    assert!(!first.contains("sha256") && first.contains("w.gguf"), "{first}");
    assert_eq!(std::fs::read_dir(dir.join(".verified")).unwrap().count(), 1);
    // Same length, other bytes: caught although the memo says it matched.
    std::fs::write(dir.join("w.gguf"), b"JUNK").unwrap();
    let second = Pool::load(&cfg, &dir).failures[0].to_string();
    assert!(second.contains(&hex_sha(b"JUNK")), "{second}");
}

fn hex_sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

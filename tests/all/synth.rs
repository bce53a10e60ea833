//! Synthetic models (`tessera pool synth`): every architecture loads,
//! generates and scores through the real backend; a model "like" a pool
//! member has its shapes and its tokenizer; the same seed gives the same
//! file and the same answers.

use std::time::{Duration, Instant};

use tessera::backends::gguf::GgufModel;
use tessera::inference::{CallCtx, GenParams, Input, Message};
use tessera::pool::synth::{self, Quant};

use crate::common::{scratch, tessera};

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(120),
        requester: 0,
    }
}

fn greedy(n: u32) -> GenParams {
    GenParams {
        max_tokens: Some(n),
        temperature: Some(0.0),
        ..Default::default()
    }
}

#[test]
fn every_architecture_loads_generates_and_scores() {
    let dir = scratch("synth-archs");
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma3"] {
        for quant in [Quant::Q8_0, Quant::F16] {
            let path = dir.join(format!("{name}-{quant:?}.gguf"));
            let w = synth::synthesize(synth::named(name).unwrap(), name, quant, 3, &path).unwrap();
            assert!(w.tensors > 10, "{name}: {w:?}");
            let mut m = GgufModel::load(name, &path, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{name} {quant:?} loads: {e}"));
            let chat = Input::Chat(vec![Message::user("Hello there")]);
            let g = m.generate(ctx(), &chat, &greedy(8)).unwrap();
            assert_eq!(
                g.usage.completion_tokens, 8,
                "{name}: random weights rarely stop early: {g:?}"
            );
            let again = m.generate(ctx(), &chat, &greedy(8)).unwrap();
            assert_eq!(g.text, again.text, "{name}: greedy is deterministic");
            let s = m
                .score(
                    ctx(),
                    &Input::Prompt("The answer is".into()),
                    &[" yes".into(), " no".into()],
                )
                .unwrap();
            assert!(
                s.iter().all(|x| x.logprob.is_finite() && x.logprob < 0.0),
                "{name}: {s:?}"
            );
        }
    }
}

#[test]
fn a_model_like_a_member_has_its_shapes_and_tokenizer() {
    let dir = scratch("synth-like");
    let out = dir.join("smol-like.gguf");
    let (ok, stdout, stderr) = tessera(&[
        "pool",
        "synth",
        "--like",
        "smollm2-135m-instruct",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("llama") && stdout.contains("parameters"), "{stdout}");
    let read = |p: &std::path::Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        tessera::backends::gguf::read_content(&mut f, len).unwrap()
    };
    let real_path = tessera::Paths::from_env()
        .models
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let (real, fake) = (read(&real_path), read(&out));
    assert_eq!(real.tensor_infos.len(), fake.tensor_infos.len());
    for (name, t) in &real.tensor_infos {
        assert_eq!(t.shape, fake.tensor_infos[name].shape, "{name}");
    }
    // The same tokenizer: the same ids for the same text.
    let real_m = GgufModel::load("real", &real_path, &candle_core::Device::Cpu).unwrap();
    let fake_m = GgufModel::load("fake", &out, &candle_core::Device::Cpu).unwrap();
    let chat = Input::Chat(vec![Message::user("What is the capital of France?")]);
    assert_eq!(real_m.encode_input(&chat).unwrap(), fake_m.encode_input(&chat).unwrap());
}

#[test]
fn bad_synth_requests_say_what_to_do() {
    let out = scratch("synth-bad").join("x.gguf");
    let (ok, _, stderr) = tessera(&["pool", "synth", "--like", "gpt-9", "--out", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("named shape") && stderr.contains("tiny-llama"),
        "{stderr}"
    );
    let (ok, _, stderr) = tessera(&[
        "pool",
        "synth",
        "--like",
        "tiny-llama",
        "--quant",
        "q3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("q8_0, q4_k, f16"), "{stderr}");
    assert!(!out.exists(), "nothing half-written");
}

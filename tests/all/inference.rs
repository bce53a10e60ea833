//! The real models, driven through the same `Models` trait the sandbox uses.

use std::time::{Duration, Instant};

use tessera::inference::{CallCtx, GenParams, InferenceError, Input, Message};

use crate::common::{runtime, GEMMA, MINILM, QWEN, SMOL};

fn ctx() -> CallCtx {
    CallCtx {
        deadline: Instant::now() + Duration::from_secs(120),
        requester: 0,
    }
}

fn chat(q: &str) -> Input {
    Input::Chat(vec![Message::user(q)])
}

/// The model card's own example prompt ("What is the capital of France.",
/// with a full stop) and its documented greedy answer.
#[tokio::test]
async fn greedy_answers_paris() {
    let m = runtime().models();
    let g = m
        .generate(
            ctx(),
            SMOL,
            chat("What is the capital of France."),
            GenParams {
                max_tokens: Some(24),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(g.text.trim(), "The capital of France is Paris.");
    assert_eq!(g.finish, tessera::inference::FinishReason::Eos);
    assert!(g.usage.prompt_tokens > 5 && g.usage.completion_tokens > 0);
}

#[tokio::test]
async fn same_seed_same_text_and_seeds_differ() {
    let m = runtime().models();
    let p = |seed| GenParams {
        max_tokens: Some(20),
        temperature: Some(1.0),
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(seed),
        stop: vec![],
    };
    let q = chat("Write a short sentence about the sea.");
    let a = m.generate(ctx(), SMOL, q.clone(), p(42)).await.unwrap();
    let b = m.generate(ctx(), SMOL, q.clone(), p(42)).await.unwrap();
    assert_eq!(a.text, b.text);
    let mut distinct = std::collections::HashSet::new();
    for seed in 1..=4 {
        distinct.insert(m.generate(ctx(), SMOL, q.clone(), p(seed)).await.unwrap().text);
    }
    assert!(distinct.len() >= 2, "sampling ignored the seed: {distinct:?}");
}

#[tokio::test]
async fn stop_sequences_cut_the_text() {
    let m = runtime().models();
    let params = GenParams {
        max_tokens: Some(20),
        stop: vec![",".into()],
        ..Default::default()
    };
    let g = m
        .generate(ctx(), SMOL, Input::Prompt("1, 2, 3, 4,".into()), params)
        .await
        .unwrap();
    assert_eq!(g.finish, tessera::inference::FinishReason::StopSequence, "{g:?}");
    assert!(!g.text.contains(','), "{:?}", g.text);
    assert_eq!(g.text.trim(), "5");
}

#[tokio::test]
async fn score_prefers_the_right_continuation() {
    let m = runtime().models();
    let s = m
        .score(
            ctx(),
            SMOL,
            Input::Prompt("The capital of France is".into()),
            vec![" Paris".into(), " London".into(), " a city in Europe".into()],
        )
        .await
        .unwrap();
    assert_eq!(s.len(), 3);
    assert!(s.iter().all(|x| x.logprob < 0.0 && x.tokens >= 1));
    assert!(s[0].logprob > s[1].logprob, "{s:?}");
    assert!(s[2].tokens > s[0].tokens);
}

#[tokio::test]
async fn next_token_matches_llama_cpp_top1() {
    // llama.cpp on the same file: top-1 " Paris" at log-prob -0.26.
    let m = runtime().models();
    let top = m
        .next_token(ctx(), SMOL, Input::Prompt("The capital of France is".into()), 5)
        .await
        .unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0].text, " Paris", "{top:?}");
    assert!((top[0].logprob - -0.26).abs() < 0.45, "{top:?}");
    assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
}

#[tokio::test]
async fn embeddings_match_the_known_cosines() {
    let m = runtime().models();
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ];
    let embedded = m
        .embed(ctx(), MINILM, texts.iter().map(|s| s.to_string()).collect())
        .await
        .unwrap();
    // Usage counts the embedder's tokens (with [CLS] and [SEP]), not words.
    let words: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    assert!(
        embedded.tokens as usize > words,
        "{} tokens for {words} words",
        embedded.tokens
    );
    let v = embedded.vectors;
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert_eq!(v[0].len(), 384);
    let close = cos(&v[0], &v[1]);
    let far = cos(&v[0], &v[2]);
    assert!((close - 0.755).abs() < 0.05, "cosine {close}");
    assert!(far.abs() < 0.2, "cosine {far}");
}

#[tokio::test]
async fn bad_calls_get_typed_errors() {
    let m = runtime().models();
    let e = m
        .generate(ctx(), "no-such-model", chat("hi"), GenParams::default())
        .await
        .unwrap_err();
    assert!(matches!(e, InferenceError::UnknownModel(_)), "{e:?}");
    let e = m
        .generate(
            ctx(),
            SMOL,
            chat("hi"),
            GenParams {
                temperature: Some(-1.0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, InferenceError::InvalidParams(m) if m.contains("temperature")),
        "{e:?}"
    );
    let e = m.embed(ctx(), SMOL, vec!["x".into()]).await.unwrap_err();
    assert!(matches!(e, InferenceError::Unsupported(_)), "{e:?}");
    let e = m
        .generate(ctx(), MINILM, chat("hi"), GenParams::default())
        .await
        .unwrap_err();
    assert!(matches!(e, InferenceError::Unsupported(_)), "{e:?}");
    let past = CallCtx {
        deadline: Instant::now(),
        requester: 0,
    };
    let e = m
        .generate(past, SMOL, chat("hi"), GenParams::default())
        .await
        .unwrap_err();
    // Its deadline passed before it left the queue: it never ran (and so
    // costs nothing), which is not a cut.
    assert_eq!(e, InferenceError::Expired);
}

#[tokio::test]
async fn concurrent_generations_are_decoded_together_and_answer_as_one_at_a_time() {
    use tessera::backends::gguf::decode::batched_steps;
    let prompts = [
        "What is the capital of France? Answer with one word.",
        "Name three colours.",
        "Write a haiku about rain on a tin roof in the early morning.",
        "2 + 2 =",
    ];
    let params = |seed| GenParams {
        max_tokens: Some(12),
        temperature: Some(0.7),
        seed: Some(seed),
        ..Default::default()
    };
    for member in [SMOL, QWEN, GEMMA] {
        let mut alone = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let g = runtime()
                .models()
                .generate(ctx(), member, chat(p), params(i as u64))
                .await
                .unwrap();
            alone.push(g.text);
        }
        let before = batched_steps();
        let together = futures::future::join_all(
            prompts
                .iter()
                .enumerate()
                .map(|(i, p)| runtime().models().generate(ctx(), member, chat(p), params(i as u64))),
        )
        .await;
        let together: Vec<String> = together.into_iter().map(|g| g.unwrap().text).collect();
        assert_eq!(
            together, alone,
            "{member}: batching must not change any answer (sampled, seeded)"
        );
        assert!(
            batched_steps() > before,
            "{member}: queued generations were decoded together"
        );
    }
}

/// Several samples of one prompt (a vote over one member, `n` choices):
/// the prompt runs once, the others take its cache and read it from one
/// buffer at every step, and each sample is still what it is alone.
#[tokio::test]
async fn samples_of_one_prompt_share_it_and_answer_as_one_at_a_time() {
    use tessera::backends::gguf::decode::shared_prompts;
    let prompt = "Write a haiku about rain on a tin roof in the early morning.";
    let params = |seed: u64| GenParams {
        max_tokens: Some(16),
        temperature: Some(if seed == 0 { 0.0 } else { 0.8 }),
        seed: Some(seed),
        ..Default::default()
    };
    for member in [SMOL, QWEN, GEMMA] {
        let mut alone = Vec::new();
        for seed in 0..4 {
            let g = runtime()
                .models()
                .generate(ctx(), member, chat(prompt), params(seed))
                .await
                .unwrap();
            alone.push(g.text);
        }
        let before = shared_prompts();
        let together = futures::future::join_all(
            (0..4).map(|seed| runtime().models().generate(ctx(), member, chat(prompt), params(seed))),
        )
        .await;
        let together: Vec<String> = together.into_iter().map(|g| g.unwrap().text).collect();
        assert_eq!(together, alone, "{member}: sharing a prompt must not change any sample");
        assert!(
            shared_prompts() > before,
            "{member}: samples of one prompt shared its cache"
        );
        assert!(
            alone[1..].iter().any(|t| t != &alone[0]),
            "{member}: the samples differ"
        );
    }
}

#[tokio::test]
async fn sequences_join_a_running_batch_and_answer_as_one_at_a_time() {
    use tessera::backends::gguf::decode::joined_running;
    // A long generation starts alone; the others arrive while it decodes
    // and must join it between steps, greedy and seeded-sampled alike,
    // each giving exactly what it gives alone, on every architecture.
    let long = Input::Prompt("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,".into());
    let short = [
        "What is the capital of Italy? Answer with one word.",
        "Name a colour.",
        "3 + 4 =",
    ];
    let params = |seed: u64, n: u32| GenParams {
        max_tokens: Some(n),
        temperature: Some(if seed.is_multiple_of(2) { 0.0 } else { 0.8 }),
        seed: Some(seed),
        ..Default::default()
    };
    for member in [SMOL, QWEN, GEMMA] {
        let models = runtime().models();
        let first_alone = models
            .generate(ctx(), member, long.clone(), params(0, 120))
            .await
            .unwrap();
        // The premise: it is still decoding when the others arrive. (A
        // chat asking to count ended after 12 tokens on SmolLM2 once the
        // attention sums changed order, and counting in words after 38
        // once the AVX2 softmax did; counting in digits ran the full 120
        // tokens on all three members then.)
        assert!(
            first_alone.usage.completion_tokens >= 60,
            "{member}: the long generation ended after {} tokens: {:?}",
            first_alone.usage.completion_tokens,
            first_alone.text
        );
        let mut alone = Vec::new();
        for (i, p) in short.iter().enumerate() {
            let g = models
                .generate(ctx(), member, chat(p), params(i as u64 + 1, 10))
                .await
                .unwrap();
            alone.push(g.text);
        }
        let before = joined_running();
        let first = {
            let (models, long) = (models.clone(), long.clone());
            tokio::spawn(async move { models.generate(ctx(), member, long, params(0, 120)).await })
        };
        // Let the long one get going (its prompt is one chunk).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let together = futures::future::join_all(
            short
                .iter()
                .enumerate()
                .map(|(i, p)| models.generate(ctx(), member, chat(p), params(i as u64 + 1, 10))),
        )
        .await;
        let together: Vec<String> = together.into_iter().map(|g| g.unwrap().text).collect();
        let first = first.await.unwrap().unwrap();
        assert_eq!(together, alone, "{member}: joining a running batch changed an answer");
        assert_eq!(
            first.text, first_alone.text,
            "{member}: the running sequence changed when others joined"
        );
        assert!(
            joined_running() > before,
            "{member}: later generations joined the running one instead of waiting for it"
        );
    }
}

/// Prompts that arrive together are prefilled in one forward pass (their
/// rows multiplied together, attention per prompt), prompts of 16 or more
/// tokens on the tiles and shorter ones on the decode kernel, in separate
/// passes; every sequence still gives exactly what it gives alone, greedy
/// and seeded-sampled, on every architecture. The prefix cache is off, so
/// every prompt runs whole.
#[test]
fn prompts_arriving_together_prefill_in_one_pass_and_answer_as_alone() {
    use tessera::backends::gguf::decode::{batched_prefills, GenJob};
    use tessera::backends::gguf::GgufModel;
    let prompts = [
        "The history of the printing press begins with movable type in East Asia, and in Europe",
        "Three facts about the planet Mars, one per line:",
        "Roses are red,",
        "1, 2, 3,",
        "A recipe for bread needs flour, water, salt and yeast. First, you",
    ];
    let inputs: Vec<Input> = prompts.iter().map(|p| Input::Prompt(p.to_string())).collect();
    let params: Vec<GenParams> = (0..prompts.len())
        .map(|i| GenParams {
            max_tokens: Some(8),
            temperature: Some(if i.is_multiple_of(2) { 0.0 } else { 0.8 }),
            seed: Some(i as u64),
            ..Default::default()
        })
        .collect();
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let path = tessera::Paths::from_env().models.join(file);
        let mut m = GgufModel::load(file, &path, &candle_core::Device::Cpu).expect("model loads (run `make setup`)");
        m.set_prefix_cache(0);
        let lens: Vec<usize> = inputs
            .iter()
            .map(|i| m.encode_input(i).expect("encodes").len())
            .collect();
        assert!(
            lens.iter().filter(|&&n| n >= 16).count() >= 2 && lens.iter().filter(|&&n| n < 16).count() >= 2,
            "{file}: the premise, prompts on both kernels: {lens:?}"
        );
        let alone: Vec<String> = inputs
            .iter()
            .zip(&params)
            .map(|(i, p)| m.generate(ctx(), i, p).expect("alone").text)
            .collect();
        let before = batched_prefills();
        let jobs = inputs
            .iter()
            .zip(&params)
            .map(|(input, params)| GenJob {
                ctx: ctx(),
                input,
                params,
                sink: None,
            })
            .collect();
        let together: Vec<String> = m
            .generate_batch(jobs)
            .into_iter()
            .map(|g| g.expect("together").text)
            .collect();
        assert_eq!(together, alone, "{file}: prefilling together changed an answer");
        assert!(
            batched_prefills() >= before + 2,
            "{file}: the long and the short prompts each ran in one pass"
        );
    }
}

/// The KV budget bounds what the sequences running together on a member
/// reserve: with room for the two largest of four generations but no three,
/// two run and two wait (holding no cache) until room frees; every answer
/// is what it is alone; a generation that would not fit even alone is
/// refused with a caller error that names the budget.
#[test]
fn the_kv_budget_bounds_the_running_batch_and_changes_no_answer() {
    use tessera::backends::gguf::decode::{waited_for_kv, Engine, GenRequest};
    use tessera::backends::gguf::GgufModel;
    let path = tessera::Paths::from_env()
        .models
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut m = GgufModel::load(SMOL, &path, &candle_core::Device::Cpu).expect("SmolLM2 loads (run `make setup`)");
    let prompts = [
        "Name a colour.",
        "3 + 4 =",
        "What is the capital of Italy? Answer with one word.",
        "Say hello to a friend.",
    ];
    let params = |i: usize| GenParams {
        max_tokens: Some(12),
        temperature: Some(if i.is_multiple_of(2) { 0.0 } else { 0.8 }),
        seed: Some(i as u64),
        ..Default::default()
    };
    let alone: Vec<Option<String>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Some(m.generate(ctx(), &chat(p), &params(i)).expect("alone").text))
        .collect();
    let mut reserves: Vec<usize> = prompts
        .iter()
        .map(|p| m.encode_input(&chat(p)).expect("encodes").len() + 12 + tessera::backends::gguf::decode::KV_ROOM)
        .collect();
    reserves.sort_unstable();
    let budget = reserves[2] + reserves[3];
    assert!(
        reserves[0] + reserves[1] + reserves[2] > budget,
        "{reserves:?}: three must not fit"
    );
    m.set_kv_budget(budget * m.kv_bytes_per_token());

    let before = waited_for_kv();
    let mut engine = Engine::default();
    for (i, p) in prompts.iter().enumerate() {
        let req = GenRequest {
            ctx: ctx(),
            input: chat(p),
            params: params(i),
            sink: None,
        };
        if m.admit(&mut engine, req, i).is_err() {
            panic!("generation {i} was refused");
        }
    }
    assert_eq!(engine.waiting(), 2, "two wait for room");
    assert!(waited_for_kv() >= before + 2);
    let mut out: Vec<Option<String>> = vec![None; prompts.len()];
    let mut most = 0;
    while !engine.is_empty() {
        for (i, r) in m.step_engine(&mut engine) {
            out[i] = Some(r.expect("a generation").text);
        }
        most = most.max(engine.reserved_tokens());
        assert!(
            engine.reserved_tokens() <= budget,
            "{} > {budget}",
            engine.reserved_tokens()
        );
    }
    assert_eq!(out, alone, "waiting for room changed an answer");
    assert!(most > reserves[3], "two ran together: {most}");

    let big = GenParams {
        max_tokens: Some(budget as u32),
        ..Default::default()
    };
    let req = GenRequest {
        ctx: ctx(),
        input: chat("Name a colour."),
        params: big,
        sink: None,
    };
    match m.admit(&mut engine, req, 99) {
        Err((99, Err(InferenceError::InvalidParams(msg)))) => {
            assert!(msg.contains("KV cache") && msg.contains("max_tokens"), "{msg}");
        }
        _ => panic!("a generation past the budget alone must be refused as invalid"),
    }
}

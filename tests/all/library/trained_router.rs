//! trained-router end to end: `fit` on real ARC-Easy dev items persists a
//! classifier; a restarted runtime routes with it (one embedding, one
//! answer); without state it falls back to the first generator.

use tessera::RunRequest;

use super::{calls, steps};
use crate::common::{arc_easy, fresh_runtime, runtime, scratch_paths, GEMMA, MINILM, QWEN, SMOL};

fn request(ex: &tessera::sandbox::Example) -> RunRequest {
    let mut req = RunRequest {
        input: ex.input.clone(),
        params: Default::default(),
        config: Default::default(),
    };
    req.params.max_tokens = Some(8);
    req.params.seed = Some(1);
    req
}

#[tokio::test]
async fn trained_router_fits_persists_and_routes_with_the_classifier_after_a_restart() {
    let paths = scratch_paths("trained-router");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("trained-router").unwrap();
    let test = arc_easy(6, 1).remove(0);

    // Unfitted: no embedding, the first generator answers and the trace says why.
    let cold = rt.run(&m, request(&test)).await.unwrap();
    assert_eq!(cold.annotations["router"], "fallback", "{:?}", cold.annotations);
    assert_eq!(cold.annotations["routed_to"], SMOL);
    assert!(calls(&cold.provenance, "embed").is_empty(), "{:?}", cold.provenance);
    let r = steps(&cold.provenance, "router");
    assert!(r.len() == 1 && r[0].1.contains("no fit state"), "{r:?}");

    // Fit on six dev items: the state is written to disk.
    let config = [("dev_max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&m, arc_easy(0, 6), config).await.unwrap());
    let state_file = paths.state.join(format!("{}.state", m.sha256));
    assert!(state_file.exists(), "{}", state_file.display());
    drop(rt);

    // A restart reads it back and routes with the classifier.
    let rt2 = fresh_runtime(&paths);
    let m2 = rt2.load_module("trained-router").unwrap();
    let a = rt2.run(&m2, request(&test)).await.unwrap();
    assert_eq!(a.annotations["router"], "classifier", "{:?}", a.provenance);
    let routed = a.annotations["routed_to"].as_str();
    assert!([SMOL, QWEN, GEMMA].contains(&routed), "{routed}");
    let p: f64 = a.annotations["route_probability"].parse().unwrap();
    assert!(p > 0.0 && p <= 1.0, "{p}");
    // Exactly one embedding (of the question, by the embedder) and one
    // generation (by the routed member) per request.
    assert_eq!(calls(&a.provenance, "embed"), vec![MINILM], "{:?}", a.provenance);
    assert_eq!(calls(&a.provenance, "generate"), vec![routed], "{:?}", a.provenance);
    let r = steps(&a.provenance, "router");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, Some(MINILM));
    assert!(r[0].1.contains("classifier") && r[0].1.contains(routed), "{r:?}");
    let ans = steps(&a.provenance, "answerer");
    assert!(ans.len() == 1 && ans[0].0 == Some(routed), "{ans:?}");

    // Deterministic under a fixed seed.
    let b = rt2.run(&m2, request(&test)).await.unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.annotations, b.annotations);
}

#[tokio::test]
async fn trained_router_rejects_bad_hyperparameters_by_name() {
    let m = crate::common::module("trained-router");
    let mut req = RunRequest::chat("hi");
    req.config.insert("epochs".into(), "many".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
    assert!(err.to_string().contains("`epochs`"), "{err}");
    let mut req = RunRequest::chat("hi");
    req.config.insert("lr".into(), "-1".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
    assert!(err.to_string().contains("`lr`"), "{err}");
}

/// A scripted pool with the default pool's members and cards that answers
/// instantly: for checking that `fit` on a full-size dev set (about 300
/// items) stays within a manifest's budgets (host calls, tokens, fuel,
/// memory, trace events) without hours of CPU inference.
pub(super) mod scale {
    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::sync::Arc;

    use futures::future::BoxFuture;
    use tessera::inference::{
        CallCtx, FinishReason, GenParams, Generation, InferenceError, Input, Message, ModelCard, Models, Scored,
        TokenLogprob, Usage,
    };
    use tessera::policy::Policy;
    use tessera::sandbox::Example;
    use tessera::{Paths, Runtime};

    struct Scripted;

    fn card(id: &str, parameters: u64, caps: &[&str], description: &str) -> ModelCard {
        ModelCard {
            id: id.into(),
            contributor: "test".into(),
            description: description.into(),
            domains: vec![],
            architecture: "test".into(),
            parameters,
            context_length: 8192,
            license: "test".into(),
            capabilities: caps.iter().map(|c| c.parse().expect("a capability")).collect(),
        }
    }

    fn hash(parts: &[&str]) -> u64 {
        let mut h = DefaultHasher::new();
        parts.hash(&mut h);
        h.finish()
    }

    fn text_of(input: &Input) -> String {
        match input {
            Input::Prompt(p) => p.clone(),
            Input::Chat(m) => m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        }
    }

    impl Models for Scripted {
        fn cards(&self) -> Vec<ModelCard> {
            let g = ["generate", "score", "next-token"];
            vec![
                card(super::SMOL, 135_000_000, &g, "small chat model"),
                card(super::QWEN, 630_000_000, &g, "code chat model"),
                card(super::GEMMA, 268_000_000, &g, "base model"),
                card(super::MINILM, 23_000_000, &["embed"], "sentence embedder"),
            ]
        }

        fn generate(
            &self,
            _: CallCtx,
            model: &str,
            input: Input,
            params: GenParams,
        ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
            let letter = (b'A' + (hash(&[model, &text_of(&input)]) % 4) as u8) as char;
            let completion = params.max_tokens.unwrap_or(1).min(2);
            let model = model.to_string();
            Box::pin(async move {
                Ok(Generation {
                    model,
                    text: letter.to_string(),
                    finish: FinishReason::Eos,
                    usage: Usage {
                        prompt_tokens: 100,
                        completion_tokens: completion,
                        cached_tokens: 0,
                    },
                })
            })
        }

        fn score(
            &self,
            _: CallCtx,
            _: &str,
            _: Input,
            continuations: Vec<String>,
        ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
            Box::pin(async move {
                Ok(continuations
                    .iter()
                    .map(|c| Scored {
                        logprob: -0.3 * c.len() as f64,
                        tokens: c.len() as u32,
                        prompt_tokens: 100,
                        cached_tokens: 0,
                    })
                    .collect())
            })
        }

        fn next_token(
            &self,
            _: CallCtx,
            model: &str,
            input: Input,
            top_k: u32,
        ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
            let h = hash(&[model, &text_of(&input)]);
            Box::pin(async move {
                Ok((0..top_k.min(4))
                    .map(|i| TokenLogprob {
                        token: i,
                        text: ((b'A' + ((h + i as u64) % 4) as u8) as char).to_string(),
                        logprob: -0.5 - i as f64 * (1.0 + (h % 7) as f64 / 7.0),
                        prompt_tokens: 100,
                    })
                    .collect())
            })
        }

        fn embed(
            &self,
            _: CallCtx,
            _: &str,
            texts: Vec<String>,
        ) -> BoxFuture<'static, Result<tessera::inference::Embedded, InferenceError>> {
            Box::pin(async move {
                let vectors = texts
                    .iter()
                    .map(|t| {
                        let mut s = hash(&[t]);
                        let v: Vec<f32> = (0..384)
                            .map(|_| {
                                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                            })
                            .collect();
                        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                        v.into_iter().map(|x| x / n).collect()
                    })
                    .collect();
                Ok(tessera::inference::Embedded { vectors, tokens: 0 })
            })
        }
    }

    /// A runtime over the scripted pool, with its own state directory.
    pub(in crate::library) fn runtime(tag: &str) -> Runtime {
        runtime_with(tag, Policy::default())
    }

    /// [`runtime`] under the operator's `policy`.
    pub(in crate::library) fn runtime_with(tag: &str, policy: Policy) -> Runtime {
        let mut paths = Paths::from_env();
        paths.state = crate::common::scratch(tag);
        Runtime::with_models(paths, Arc::new(Scripted), policy, vec![]).expect("runtime starts")
    }

    /// `n` synthetic four-option questions in the ARC prompt shape.
    pub(in crate::library) fn dev(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let choices: Vec<String> = (0..4).map(|k| format!("option {k} of item {i}")).collect();
                let mut q = format!("Question number {i}: which option is right?\n");
                for (k, c) in choices.iter().enumerate() {
                    q.push_str(&format!("{}) {c}\n", (b'A' + k as u8) as char));
                }
                q.push_str("Answer with the letter.");
                Example {
                    input: Input::Chat(vec![Message::user(q)]),
                    answer: ((b'A' + (i % 4) as u8) as char).to_string(),
                    choices,
                }
            })
            .collect()
    }
}

#[tokio::test]
async fn trained_router_fit_on_300_dev_items_fits_the_manifest_budgets() {
    let rt = scale::runtime("trained-router-scale");
    let m = rt.load_module("trained-router").unwrap();
    let started = std::time::Instant::now();
    assert!(rt.fit(&m, scale::dev(300), Default::default()).await.unwrap());
    let req = RunRequest::chat("Question number 7: which option is right?");
    let out = rt.run(&m, req).await.unwrap();
    assert_eq!(out.annotations["router"], "classifier", "{:?}", out.provenance);
    eprintln!(
        "trained-router: fit on 300 scripted items + one run in {:?}",
        started.elapsed()
    );
}

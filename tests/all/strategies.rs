//! The standard strategies and the SDK example, end to end on the real model.

use tessera::{ProvenanceEvent, RunRequest};

use crate::common::{module, runtime, GEMMA, QWEN, SMOL};

fn calls(p: &[ProvenanceEvent], call: &str) -> usize {
    p.iter()
        .filter(|e| matches!(e, ProvenanceEvent::HostCall { call: c, .. } if c == call))
        .count()
}

fn steps<'a>(p: &'a [ProvenanceEvent], role: &str) -> Vec<&'a str> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::ModuleStep { role: r, note, .. } if r == role => Some(note.as_str()),
            _ => None,
        })
        .collect()
}

fn capital_question() -> RunRequest {
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.seed = Some(7);
    req.config.insert("k".into(), "3".into());
    req.config.insert("max_tokens".into(), "16".into());
    // Greedy samples: one per member, so the vote is over the members' views.
    req.config.insert("temperature".into(), "0".into());
    req
}

#[tokio::test]
async fn majority_vote_votes_over_k_samples_and_reports_agreement() {
    let m = module("majority-vote");
    let out = runtime().run(&m, capital_question()).await.unwrap();
    assert!(out.text.contains("Paris"), "{out:?}");
    assert_eq!(calls(&out.provenance, "generate"), 3, "{:?}", out.provenance);
    // Samples go round-robin over the pool's generative members.
    let voters: std::collections::BTreeSet<&str> = out
        .provenance
        .iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { model, .. } => Some(model.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        voters,
        [QWEN, SMOL, GEMMA].into_iter().collect(),
        "{:?}",
        out.provenance
    );
    assert_eq!(steps(&out.provenance, "voter").len(), 3);
    assert_eq!(steps(&out.provenance, "aggregator").len(), 1);
    // The answer is one of the samples: the host attributes all of its
    // words to the members that wrote them, and to no one else.
    let top = out.attribution.first().expect("attributed");
    assert_eq!(top.share, 1.0, "{:?}", out.attribution);
    assert!(!top.contributor.is_empty(), "{top:?}");
    assert!(out.attribution.iter().all(|a| voters.contains(a.member.as_str())));
    // The tally is consistent: every answer counted once, the winner has the
    // most votes, and the agreement is its share.
    let counts: Vec<(String, usize)> = out.annotations["counts"]
        .split("; ")
        .map(|c| {
            let (a, n) = c.rsplit_once('=').unwrap();
            (a.to_string(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.iter().map(|c| c.1).sum::<usize>(), 3, "{:?}", out.annotations);
    let top = counts.iter().map(|c| c.1).max().unwrap();
    assert_eq!(out.annotations["votes"], format!("{top}/3"));
    let agreement: f64 = out.annotations["agreement"].parse().unwrap();
    assert!((agreement - top as f64 / 3.0).abs() < 0.01, "{:?}", out.annotations);
    assert!(
        out.annotations["answer"].to_lowercase().contains("paris"),
        "{:?}",
        out.annotations
    );
}

#[tokio::test]
async fn majority_vote_is_deterministic_under_a_seed() {
    let m = module("majority-vote");
    let a = runtime().run(&m, capital_question()).await.unwrap();
    let b = runtime().run(&m, capital_question()).await.unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.annotations, b.annotations);
}

#[tokio::test]
async fn majority_vote_rejects_bad_hyperparameters_by_name() {
    let m = module("majority-vote");
    let mut req = capital_question();
    req.config.insert("k".into(), "lots".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
    assert!(err.to_string().contains("`k`"), "{err}");
}

#[tokio::test]
async fn prompt_router_routes_then_answers() {
    let m = module("prompt-router");
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.max_tokens = Some(24);
    let out = runtime().run(&m, req).await.unwrap();
    let routed = out.annotations["routed_to"].as_str();
    assert!([SMOL, QWEN, GEMMA].contains(&routed), "{routed}");
    if routed != GEMMA {
        // The instruction-tuned members answer; the base model just continues.
        assert!(out.text.contains("Paris"), "{out:?}");
    }
    assert_eq!(steps(&out.provenance, "router").len(), 1, "{:?}", out.provenance);
    assert_eq!(steps(&out.provenance, "answerer").len(), 1);
    assert_eq!(calls(&out.provenance, "generate"), 2);
}

#[tokio::test]
async fn prompt_router_rejects_an_unknown_router() {
    let m = module("prompt-router");
    let mut req = RunRequest::chat("hi");
    req.config.insert("router".into(), "ghost".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
}

#[tokio::test]
async fn prompt_router_fit_routes_with_the_best_dev_member_after_a_restart() {
    let paths = crate::common::scratch_paths("prompt-router-fit");
    let rt = crate::common::fresh_runtime(&paths);
    let m = rt.load_module("prompt-router").unwrap();
    let config = [("fit_max_tokens".to_string(), "4".to_string())].into();
    assert!(
        rt.fit(&m, crate::common::arc_easy(0, 2), config).await.unwrap(),
        "prompt-router keeps its dev ranking"
    );

    let rt2 = crate::common::fresh_runtime(&paths);
    let m2 = rt2.load_module("prompt-router").unwrap();
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.max_tokens = Some(24);
    let out = rt2.run(&m2, req).await.unwrap();
    let router = out.annotations["router"].as_str();
    // The trace says who routed and why: the best dev member, with the ranking.
    let note = steps(&out.provenance, "router");
    assert_eq!(note.len(), 1, "{:?}", out.provenance);
    assert!(note[0].contains("best dev member; dev ranking: "), "{note:?}");
    let ranking: Vec<(&str, usize)> = note[0]
        .split("dev ranking: ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(", ")
        .map(|r| {
            let (id, score) = r.rsplit_once(' ').unwrap();
            (id, score.split('/').next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(ranking.len(), 3, "{note:?}");
    assert_eq!(ranking[0].0, router, "{note:?}");
    assert!(ranking.iter().all(|r| r.1 <= ranking[0].1), "{ranking:?}");
    // The router's call comes first, then the chosen member answers.
    let models: Vec<&str> = out
        .provenance
        .iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { call, model, .. } if call == "generate" => Some(model.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(models, vec![router, out.annotations["routed_to"].as_str()]);
    // On a bad reply the fallback is the best dev member, so either way the
    // answer comes from a member and `fallback` says which path was taken.
    if out.annotations["fallback"] == "true" {
        assert_eq!(out.annotations["routed_to"], router);
    }
}

#[tokio::test]
async fn the_sdk_example_answers() {
    let m = module("first-responder");
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.max_tokens = Some(24);
    let out = runtime().run(&m, req).await.unwrap();
    assert!(out.text.contains("Paris"), "{out:?}");
    assert_eq!(calls(&out.provenance, "generate"), 1);
}

#[tokio::test]
async fn majority_vote_fit_state_is_persisted_and_handed_back() {
    use tessera::inference::{Input, Message};
    use tessera::policy::Policy;
    use tessera::pool::PoolConfig;
    use tessera::sandbox::Example;
    use tessera::{Paths, Runtime};

    // Own state directory, so other tests never see this state.
    let mut paths = Paths::from_env();
    paths.state = crate::common::scratch("fit-state");
    let rt = Runtime::new(paths.clone(), &PoolConfig::default_pool(), Policy::default()).unwrap();
    let m = rt.load_module("majority-vote").unwrap();
    let q = |s: &str| Input::Chat(vec![Message::user(s)]);
    let dev = vec![
        Example {
            input: q("What is the capital of France? Answer with one word."),
            answer: "Paris".into(),
            choices: vec![],
        },
        Example {
            input: q("What is 2 + 2? Answer with a number only."),
            answer: "4".into(),
            choices: vec![],
        },
    ];
    let config = [("max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&m, dev, config).await.unwrap(), "majority-vote keeps state");
    let saved = std::fs::read(paths.state.join(format!("{}.state", m.sha256))).unwrap();
    let saved = String::from_utf8_lossy(&saved);
    assert!(saved.starts_with(SMOL) && saved.contains(QWEN), "{saved:?}");

    // A new runtime (a restart) hands the state back to `run`.
    let rt2 = Runtime::new(paths, &PoolConfig::default_pool(), Policy::default()).unwrap();
    let m2 = rt2.load_module("majority-vote").unwrap();
    let out = rt2.run(&m2, capital_question()).await.unwrap();
    let tie = steps(&out.provenance, "tie-break");
    assert_eq!(tie.len(), 1, "{:?}", out.provenance);
    assert!(
        tie[0].contains(SMOL) && tie[0].contains(QWEN) && tie[0].contains("/2"),
        "{tie:?}"
    );
}

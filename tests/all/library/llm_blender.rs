//! llm-blender: every member answers, the ranker judges every pair once
//! (n(n-1)/2 judge calls), points rank the answers, the fuser rewrites the
//! top k; `top_k = 1` returns the winner unfused; `fit` makes the best dev
//! member the ranker, and that survives a restart.

use std::collections::BTreeMap;

use tessera::{ProvenanceEvent, RunOutcome, RunRequest};

use super::steps;
use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

/// The members of the generate calls, in provenance order.
fn generate_calls(p: &[ProvenanceEvent]) -> Vec<&str> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { call, model, .. } if call == "generate" => Some(model.as_str()),
            _ => None,
        })
        .collect()
}

/// `(member, note)` of every trace step with `role`.
/// `points` parsed back into `(member, points)`, best first.
fn points(out: &RunOutcome) -> Vec<(String, f64)> {
    out.annotations["points"]
        .split("; ")
        .map(|p| {
            let (m, v) = p.rsplit_once('=').unwrap();
            (m.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn request(config: &[(&str, &str)]) -> RunRequest {
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.seed = Some(3);
    req.config.insert("max_tokens".into(), "8".into());
    req.config.insert("judge_max_tokens".into(), "2".into());
    for (k, v) in config {
        req.config.insert(k.to_string(), v.to_string());
    }
    req
}

/// The invariants of one blended run over the 3-member default pool.
fn check_pairwise(out: &RunOutcome, ranker: &str) {
    let p = &out.provenance;
    let calls = generate_calls(p);
    // Every member answers once, in one fan-out, before any judging.
    let mut answerers: Vec<&str> = calls[..3].to_vec();
    answerers.sort();
    let mut pool = vec![SMOL, QWEN, GEMMA];
    pool.sort();
    assert_eq!(answerers, pool, "{p:?}");
    // Then n(n-1)/2 = 3 judge calls, all on the ranker.
    assert_eq!(&calls[3..6], &[ranker; 3], "{p:?}");
    let judges = steps(p, "judge");
    assert_eq!(judges.len(), 3, "{p:?}");
    assert!(judges.iter().all(|(m, _)| *m == Some(ranker)), "{judges:?}");
    // Every unordered pair is judged exactly once.
    let mut pairs: Vec<(String, String)> = judges
        .iter()
        .map(|(_, note)| {
            let a = [SMOL, QWEN, GEMMA]
                .into_iter()
                .filter(|m| note.contains(&format!("A = {m} ")))
                .collect::<Vec<_>>();
            let b = [SMOL, QWEN, GEMMA]
                .into_iter()
                .filter(|m| note.contains(&format!("B = {m}:")))
                .collect::<Vec<_>>();
            assert_eq!((a.len(), b.len()), (1, 1), "{note}");
            let (x, y) = (a[0].min(b[0]), a[0].max(b[0]));
            (x.to_string(), y.to_string())
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    assert_eq!(pairs.len(), 3, "{judges:?}");
    // Points: a win is 1, a tie 0.5 each, so they sum to n(n-1)/2.
    let pts = points(out);
    assert_eq!(pts.len(), 3, "{:?}", out.annotations);
    let total: f64 = pts.iter().map(|p| p.1).sum();
    assert!((total - 3.0).abs() < 1e-9, "{:?}", out.annotations);
    assert!(pts.windows(2).all(|w| w[0].1 >= w[1].1), "best first: {pts:?}");
    let ranking: Vec<&str> = out.annotations["ranking"].split(", ").collect();
    assert_eq!(ranking, pts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>());
    assert_eq!(out.annotations["judge_calls"], "3");
    assert_eq!(out.annotations["ranker"], ranker);
    assert_eq!(steps(p, "proposer").len(), 3);
}

#[tokio::test]
async fn llm_blender_judges_every_pair_once_then_fuses_the_top_k() {
    let m = module("llm-blender");
    let out = runtime().run(&m, request(&[])).await.unwrap();
    // Without fit state the first generative member in pool order ranks and fuses.
    check_pairwise(&out, SMOL);
    let calls = generate_calls(&out.provenance);
    assert_eq!(calls.len(), 3 + 3 + 1, "{:?}", out.provenance);
    assert_eq!(calls[6], SMOL, "the fuser (default: the ranker) writes last");
    assert_eq!(out.annotations["fused"], "true");
    assert_eq!(out.annotations["fuser"], SMOL);
    assert_eq!(out.annotations["top"].split(", ").count(), 3);
    let fuser = steps(&out.provenance, "fuser");
    assert_eq!(fuser.len(), 1);
    assert!(fuser[0].1.contains("top 3"), "{fuser:?}");
    let ranker = steps(&out.provenance, "ranker");
    assert!(ranker[0].1.contains("no fit state"), "{ranker:?}");

    // Same seed, same run.
    let again = runtime().run(&m, request(&[])).await.unwrap();
    assert_eq!(out.text, again.text);
    assert_eq!(out.annotations, again.annotations);
}

#[tokio::test]
async fn llm_blender_fit_picks_the_ranker_across_a_restart_and_top_k_1_skips_fusion() {
    let paths = scratch_paths("llm-blender-fit");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("llm-blender").unwrap();
    let config: BTreeMap<String, String> = [("fit_max_tokens".to_string(), "4".to_string())].into();
    assert!(
        rt.fit(&m, arc_easy(0, 2), config).await.unwrap(),
        "llm-blender keeps state"
    );

    // After a restart the best dev member ranks; with top_k = 1 the winner
    // is returned unfused, so the configured fuser is never called.
    let rt2 = fresh_runtime(&paths);
    let m2 = rt2.load_module("llm-blender").unwrap();
    let out = rt2
        .run(&m2, request(&[("top_k", "1"), ("fuser", GEMMA)]))
        .await
        .unwrap();
    let ranker = steps(&out.provenance, "ranker");
    let (who, why) = ranker[0];
    assert!(why.contains("best dev member"), "{ranker:?}");
    let who = who.unwrap();
    // The ranker is the head of the dev ranking the note reports.
    let dev: Vec<&str> = why.rsplit_once("dev ranking: ").unwrap().1.split(", ").collect();
    assert_eq!(dev.len(), 3, "{why}");
    assert_eq!(dev[0], who, "{why}");
    check_pairwise(&out, who);

    let calls = generate_calls(&out.provenance);
    assert_eq!(calls.len(), 3 + 3, "no fusion call: {:?}", out.provenance);
    if who != GEMMA {
        assert!(!calls[3..].contains(&GEMMA), "{calls:?}");
    }
    assert_eq!(out.annotations["fused"], "false");
    let ranking: Vec<&str> = out.annotations["ranking"].split(", ").collect();
    assert_eq!(out.annotations["winner"], ranking[0]);
    assert_eq!(out.annotations["top"], ranking[0]);
    let fuser = steps(&out.provenance, "fuser");
    assert_eq!(fuser.len(), 1);
    assert_eq!(fuser[0].0, Some(ranking[0]));
    assert!(fuser[0].1.contains("unfused"), "{fuser:?}");
}

#[tokio::test]
async fn llm_blender_rejects_bad_hyperparameters_by_name() {
    let m = module("llm-blender");
    for (key, value) in [
        ("top_k", "0"),
        ("judge_max_tokens", "many"),
        ("ranker", "ghost"),
        ("fuser", "ghost"),
    ] {
        let err = runtime().run(&m, request(&[(key, value)])).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{key}");
        assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
    }
}

//! graph-router end to end: `fit` on real ARC-Easy dev items trains the
//! query-member graph and persists it; a restarted runtime scores every
//! member for a new question (one embedding) and the highest score answers.

use tessera::RunRequest;

use super::{calls, steps};
use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, MINILM, QWEN, SMOL};

fn request() -> RunRequest {
    let ex = arc_easy(6, 1).remove(0);
    let mut req = RunRequest {
        input: ex.input,
        params: Default::default(),
        config: Default::default(),
    };
    req.params.max_tokens = Some(8);
    req.params.seed = Some(1);
    req
}

#[tokio::test]
async fn graph_router_fits_persists_and_routes_to_the_highest_scoring_member() {
    let paths = scratch_paths("graph-router");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("graph-router").unwrap();

    // Unfitted: no embedding, the first generator answers, the trace says why.
    let cold = rt.run(&m, request()).await.unwrap();
    assert_eq!(cold.annotations["router"], "fallback");
    assert_eq!(cold.annotations["routed_to"], SMOL);
    assert!(calls(&cold.provenance, "embed").is_empty());
    assert!(steps(&cold.provenance, "router")[0].1.contains("no fit state"));

    let config = [("dev_max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&m, arc_easy(0, 4), config).await.unwrap());
    assert!(paths.state.join(format!("{}.state", m.sha256)).exists());
    drop(rt);

    let rt2 = fresh_runtime(&paths);
    let m2 = rt2.load_module("graph-router").unwrap();
    let a = rt2.run(&m2, request()).await.unwrap();
    assert_eq!(a.annotations["router"], "graph", "{:?}", a.provenance);
    // Every generative member got a score; the chosen one is the argmax.
    let scores: Vec<(String, f64)> = a.annotations["scores"]
        .split("; ")
        .map(|s| {
            let (id, v) = s.rsplit_once('=').unwrap();
            (id.to_string(), v.parse().unwrap())
        })
        .collect();
    let ids: Vec<&str> = scores.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(ids, [SMOL, QWEN, GEMMA], "{scores:?}");
    assert!(scores.iter().all(|s| s.1.is_finite()));
    let best = scores.iter().fold(&scores[0], |b, s| if s.1 > b.1 { s } else { b });
    let routed = a.annotations["routed_to"].as_str();
    assert_eq!(routed, best.0, "{scores:?}");
    let r = steps(&a.provenance, "router");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, Some(MINILM));
    assert!(r[0].1.contains(&format!("chose {routed}")), "{r:?}");
    // One embedding (the question; members and task were embedded in fit)
    // and one generation, by the chosen member.
    assert_eq!(calls(&a.provenance, "embed"), [MINILM], "{:?}", a.provenance);
    assert_eq!(calls(&a.provenance, "generate"), [routed]);
    assert_eq!(steps(&a.provenance, "answerer")[0].0, Some(routed));

    // Deterministic under a fixed seed.
    let b = rt2.run(&m2, request()).await.unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.annotations, b.annotations);
}

#[tokio::test]
async fn graph_router_rejects_bad_hyperparameters_by_name() {
    let m = module("graph-router");
    for (k, v) in [("hidden", "0"), ("lr", "fast"), ("epochs", "-3")] {
        let mut req = RunRequest::chat("hi");
        req.config.insert(k.into(), v.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{k}={v}");
        assert!(err.to_string().contains(&format!("`{k}`")), "{err}");
    }
}

#[tokio::test]
async fn graph_router_fit_on_300_dev_items_fits_the_manifest_budgets() {
    use super::trained_router::scale;
    let rt = scale::runtime("graph-router-scale");
    let m = rt.load_module("graph-router").unwrap();
    let started = std::time::Instant::now();
    assert!(rt.fit(&m, scale::dev(300), Default::default()).await.unwrap());
    let out = rt
        .run(&m, RunRequest::chat("Question number 7: which option is right?"))
        .await
        .unwrap();
    assert_eq!(out.annotations["router"], "graph", "{:?}", out.provenance);
    eprintln!(
        "graph-router: fit on 300 scripted items + one run in {:?}",
        started.elapsed()
    );
}

//! cascade end to end on real ARC-Easy items: members are consulted
//! cheapest first, the threshold decides who answers, and `fit` picks a
//! threshold that a restarted runtime uses.

use tessera::RunRequest;

use super::{calls, steps};
use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

fn request(threshold: Option<&str>) -> RunRequest {
    let ex = arc_easy(6, 1).remove(0);
    let mut req = RunRequest {
        input: ex.input,
        params: Default::default(),
        config: Default::default(),
    };
    req.params.max_tokens = Some(8);
    req.params.seed = Some(1);
    if let Some(t) = threshold {
        req.config.insert("threshold".into(), t.into());
    }
    req
}

/// The pool's generative members by parameter count, smallest first.
fn cost_order() -> Vec<String> {
    let mut cards: Vec<_> = runtime()
        .cards()
        .into_iter()
        .filter(|c| c.can(tessera::inference::Capability::Generate))
        .collect();
    cards.sort_by_key(|c| c.parameters);
    cards.into_iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn cascade_threshold_zero_keeps_the_cheapest_answer() {
    assert_eq!(cost_order(), [SMOL, GEMMA, QWEN]);
    let m = module("cascade");
    let out = runtime().run(&m, request(Some("0"))).await.unwrap();
    assert_eq!(out.annotations["answered_by"], SMOL, "{:?}", out.annotations);
    assert_eq!(out.annotations["escalations"], "0");
    assert_eq!(calls(&out.provenance, "generate"), [SMOL], "{:?}", out.provenance);
    // The MCQ confidence comes from the option letters' next-token probabilities.
    assert_eq!(calls(&out.provenance, "next-token"), [SMOL]);
    let tiers = steps(&out.provenance, "tier");
    assert_eq!(tiers.len(), 1, "{tiers:?}");
    assert!(tiers[0].1.contains("accept"), "{tiers:?}");
    let c: f64 = out.annotations["confidence"].parse().unwrap();
    assert!((0.0..=1.0).contains(&c), "{c}");
    // Deterministic under a fixed seed.
    let again = runtime().run(&m, request(Some("0"))).await.unwrap();
    assert_eq!(out.text, again.text);
    assert_eq!(out.annotations, again.annotations);
}

#[tokio::test]
async fn cascade_threshold_above_one_escalates_through_every_member_in_cost_order() {
    let m = module("cascade");
    let a = runtime().run(&m, request(Some("1.01"))).await.unwrap();
    let order = cost_order();
    let tiers: Vec<&str> = steps(&a.provenance, "tier").iter().filter_map(|s| s.0).collect();
    assert_eq!(tiers, order, "{:?}", a.provenance);
    // Every member but the last was asked for its confidence, in cost order.
    assert_eq!(calls(&a.provenance, "next-token"), order[..2], "{:?}", a.provenance);
    // The last (most expensive) member always answers, and it alone writes.
    assert_eq!(a.annotations["answered_by"], QWEN);
    assert_eq!(a.annotations["escalations"], "2");
    assert_eq!(calls(&a.provenance, "generate"), [QWEN]);
    assert_eq!(steps(&a.provenance, "answerer")[0].0, Some(QWEN));
}

#[tokio::test]
async fn cascade_fit_picks_a_threshold_that_survives_a_restart() {
    let paths = scratch_paths("cascade");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("cascade").unwrap();
    let config = [("dev_max_tokens".to_string(), "8".to_string())].into();
    assert!(rt.fit(&m, arc_easy(0, 4), config).await.unwrap());
    assert!(paths.state.join(format!("{}.state", m.sha256)).exists());
    drop(rt);

    let rt2 = fresh_runtime(&paths);
    let m2 = rt2.load_module("cascade").unwrap();
    let out = rt2.run(&m2, request(None)).await.unwrap();
    assert_eq!(out.annotations["threshold_source"], "fit", "{:?}", out.annotations);
    let t: f64 = out.annotations["threshold"].parse().unwrap();
    assert!((0.0..=1.01).contains(&t), "{t}");
    // Each consulted member's decision follows the fitted threshold.
    for c in out.annotations["confidences"].split("; ").filter(|c| !c.is_empty()) {
        let (id, v) = c.rsplit_once('=').unwrap();
        let v: f64 = v.parse().unwrap();
        // (Both are printed to 3 decimals.)
        if out.annotations["answered_by"] == id {
            assert!(v >= t - 1e-3, "{:?}", out.annotations);
        } else {
            assert!(v < t + 1e-3, "{:?}", out.annotations);
        }
    }
    // A configured threshold still overrides the fitted one.
    let over = rt2.run(&m2, request(Some("0"))).await.unwrap();
    assert_eq!(over.annotations["threshold_source"], "config");
    assert_eq!(over.annotations["answered_by"], SMOL);
}

#[tokio::test]
async fn cascade_rejects_bad_hyperparameters_by_name() {
    let m = module("cascade");
    for (k, v) in [
        ("threshold", "high"),
        ("threshold", "-0.5"),
        ("order", "ghost"),
        ("top_k", "0"),
    ] {
        let mut req = RunRequest::chat("hi");
        req.config.insert(k.into(), v.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{k}={v}");
        assert!(err.to_string().contains(&format!("`{k}`")), "{err}");
    }
}

#[tokio::test]
async fn cascade_fit_on_a_full_dev_set_fits_the_manifest_budgets() {
    use super::trained_router::scale;
    let rt = scale::runtime("cascade-scale");
    let m = rt.load_module("cascade").unwrap();
    // 300 items offered; `fit_max_items` (200) keeps it within 1024 host calls.
    assert!(rt.fit(&m, scale::dev(300), Default::default()).await.unwrap());
    let mut req = RunRequest::chat("Question number 7: which option?\nA) x\nB) y\nC) z\nD) w\nAnswer with the letter.");
    req.params.seed = Some(1);
    let out = rt.run(&m, req).await.unwrap();
    assert_eq!(out.annotations["threshold_source"], "fit", "{:?}", out.annotations);
}

//! agglm end to end on the real default pool: unfitted, the untrained
//! base aggregates every member's answer; `fit` on real ARC-Easy dev items
//! trains the aggregator by GRPO and keeps it by name; the fitted module
//! aggregates with the trained member, also after a restart; a second
//! identical fit reuses the kept member instead of training a twin.

use tessera::RunRequest;

use super::{calls, keeping, seeded, steps};
use crate::common::{arc_easy, scratch_paths, GEMMA, QWEN, SMOL};

fn request(ex: &tessera::sandbox::Example) -> RunRequest {
    seeded(ex, &[("solve_tokens", "24"), ("aggregate_tokens", "16")])
}

#[tokio::test]
async fn agglm_trains_its_aggregator_in_fit_keeps_it_and_aggregates_with_it_after_a_restart() {
    let paths = scratch_paths("agglm");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = keeping(&paths, 2);
    let m = rt.load_module("agglm").expect("agglm is installed (run `make setup`)");
    let test = arc_easy(20, 1).remove(0);

    // Unfitted: the smallest trainable member (SmolLM2) aggregates the
    // three members' answers: one generation each, then one aggregation.
    let cold = rt.run(&m, request(&test)).await.expect("an unfitted run");
    assert_eq!(cold.annotations["trained"], "false", "{:?}", cold.annotations);
    assert_eq!(cold.annotations["aggregator"], SMOL);
    assert_eq!(calls(&cold.provenance, "generate"), [SMOL, QWEN, GEMMA, SMOL]);
    assert_eq!(steps(&cold.provenance, "solver").len(), 3);

    // fit on eight dev items: solve, pick sets, sample, GRPO, keep.
    let config = [
        ("fit_max_items", "8"),
        ("steps", "1"),
        ("group", "4"),
        ("solve_tokens", "24"),
        ("aggregate_tokens", "16"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (fitted, trace) = rt.fit_traced(&m, arc_easy(0, 8), config, None).await;
    assert!(fitted.expect("fit succeeds"), "fit returned no state");
    let summary = steps(&trace, "fit");
    let note = summary.last().map(|s| s.1).unwrap_or_default();
    assert!(
        note.contains("8 dev sets") && note.contains("GRPO on `smollm2"),
        "{note}"
    );
    assert!(note.contains("kept as `agglm-"), "{note}");
    let trains: Vec<&str> = calls(&trace, "train");
    assert_eq!(
        trains,
        [format!("{SMOL} (grpo, 1 steps)")],
        "one GRPO run on the base: {trace:?}"
    );
    let kept = rt.kept();
    let name = kept
        .iter()
        .find(|k| k.name.starts_with("agglm-"))
        .map(|k| k.name.clone())
        .expect("the aggregator is kept");
    assert_eq!(kept[0].owner.as_deref(), Some("agglm"));

    // Fitted: the kept member aggregates.
    let warm = rt.run(&m, request(&test)).await.expect("a fitted run");
    assert_eq!(warm.annotations["trained"], "true", "{:?}", warm.annotations);
    assert_eq!(warm.annotations["aggregator"], name);
    assert_eq!(calls(&warm.provenance, "generate"), [SMOL, QWEN, GEMMA, name.as_str()]);
    drop(rt);

    // After a restart the state and the kept member are both still there.
    let rt2 = keeping(&paths, 2);
    let m2 = rt2.load_module("agglm").unwrap();
    let again = rt2.run(&m2, request(&test)).await.expect("a run after the restart");
    assert_eq!(again.annotations["aggregator"], name);
    assert_eq!(again.text, warm.text, "deterministic under a fixed seed");

    // A second identical fit finds its member and trains nothing.
    let config = [
        ("fit_max_items", "8"),
        ("steps", "1"),
        ("group", "4"),
        ("solve_tokens", "24"),
        ("aggregate_tokens", "16"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (refit, trace) = rt2.fit_traced(&m2, arc_easy(0, 8), config, None).await;
    assert!(refit.unwrap());
    assert!(calls(&trace, "train").is_empty(), "{trace:?}");
    assert!(
        steps(&trace, "fit").iter().any(|s| s.1.contains("reusing")),
        "{trace:?}"
    );
}

#[tokio::test]
async fn agglm_rejects_bad_hyperparameters_by_name() {
    let rt = crate::common::runtime();
    let m = crate::common::module("agglm");
    for (key, value) in [("group", "1"), ("solve_tokens", "0"), ("aggregator", "nobody")] {
        let mut req = request(&arc_easy(20, 1).remove(0));
        req.config.insert(key.into(), value.into());
        let result = if key == "group" {
            let cfg = [(key.to_string(), value.to_string())].into();
            rt.fit(&m, arc_easy(0, 2), cfg).await.map(|_| ())
        } else {
            rt.run(&m, req).await.map(|_| ())
        };
        let err = result.expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

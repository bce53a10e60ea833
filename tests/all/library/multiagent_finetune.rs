//! multiagent-finetune end to end on the real SmolLM2: two agents (copies
//! of one base) debate and vote; `fit` on real ARC-Easy dev items
//! fine-tunes each agent's generator and critic on its own outputs that
//! agree with the final plurality, keeps them, and the fitted module
//! debates with the tuned members.

use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::{RunRequest, Runtime};

use super::{calls, steps};
use crate::common::{arc_easy, scratch_paths, SMOL};

fn request(ex: &tessera::sandbox::Example) -> RunRequest {
    let mut req = RunRequest {
        input: ex.input.clone(),
        params: Default::default(),
        config: Default::default(),
    };
    req.params.seed = Some(3);
    for (k, v) in [("models", SMOL), ("copies", "2"), ("max_tokens", "16")] {
        req.config.insert(k.into(), v.into());
    }
    req
}

#[tokio::test]
async fn multiagent_finetune_tunes_every_agents_generator_and_critic_on_its_own_agreeing_outputs() {
    let paths = scratch_paths("maft");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let policy = Policy {
        keep_trained: 4,
        ..Policy::default()
    };
    let pool = PoolConfig {
        members: PoolConfig::default_pool()
            .members
            .into_iter()
            .filter(|m| m.id == SMOL)
            .collect(),
    };
    let rt = Runtime::new(paths, &pool, policy).expect("runtime starts");
    let m = rt
        .load_module("multiagent-finetune")
        .expect("multiagent-finetune is installed (run `make setup`)");
    let test = arc_easy(20, 1).remove(0);

    // Unfitted: two agents of the base, two generations then two critiques.
    let cold = rt.run(&m, request(&test)).await.expect("an unfitted run");
    assert_eq!(cold.annotations["agents"], "2", "{:?}", cold.annotations);
    assert_eq!(cold.annotations["tuned_agents"], "0");
    assert_eq!(calls(&cold.provenance, "generate"), [SMOL; 4]);
    assert_eq!(steps(&cold.provenance, "critics").len(), 1);

    // fit: debate on six dev items, then one SFT run per role per agent.
    let config = [
        ("models", SMOL),
        ("copies", "2"),
        ("max_tokens", "16"),
        ("fit_max_items", "6"),
        ("steps", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (fitted, trace) = rt.fit_traced(&m, arc_easy(0, 6), config, None).await;
    assert!(fitted.expect("fit succeeds"), "fit returned no state");
    let note = steps(&trace, "fit").last().map(|s| s.1.to_string()).unwrap_or_default();
    assert!(note.contains("6 dev items labelled by the final plurality"), "{note}");
    let trains = calls(&trace, "train");
    let kept: Vec<String> = rt.kept().into_iter().map(|k| k.name).collect();
    // Every role that had agreeing examples was trained and kept; the
    // plurality always agrees with at least one agent's final answer.
    assert!(!trains.is_empty() && trains.len() <= 4, "{trains:?} {note}");
    assert_eq!(kept.len(), trains.len(), "{kept:?} {note}");
    assert!(kept.iter().all(|k| k.starts_with("maft-")), "{kept:?}");
    assert!(
        kept.iter().any(|k| k.ends_with("-crit")),
        "a critic agrees with the label it made: {kept:?}"
    );

    // Fitted: the tuned members debate.
    let warm = rt.run(&m, request(&test)).await.expect("a fitted run");
    assert_ne!(warm.annotations["tuned_agents"], "0", "{:?}", warm.annotations);
    let used = calls(&warm.provenance, "generate");
    assert_eq!(used.len(), 4, "{used:?}");
    assert!(used.iter().any(|m| m.starts_with("maft-")), "{used:?}");
    assert!(
        steps(&warm.provenance, "fit").iter().any(|s| s.1.contains("labelled")),
        "{:?}",
        warm.provenance
    );
}

#[tokio::test]
async fn multiagent_finetune_needs_two_agents_and_names_bad_settings() {
    let rt = crate::common::runtime();
    let m = crate::common::module("multiagent-finetune");
    let test = arc_easy(20, 1).remove(0);
    let mut one = request(&test);
    one.config.insert("copies".into(), "1".into());
    let err = rt.run(&m, one).await.expect_err("one agent is no debate").to_string();
    assert!(err.contains("at least two agents") && err.contains("copies"), "{err}");
    for (key, value) in [("rounds", "9"), ("temperature", "3")] {
        let mut req = request(&test);
        req.config.insert(key.into(), value.into());
        let err = rt.run(&m, req).await.expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let cfg = [("label".to_string(), "vibes".to_string())].into();
    let err = rt.fit(&m, arc_easy(0, 2), cfg).await.expect_err("label").to_string();
    assert!(err.contains("label"), "{err}");
}

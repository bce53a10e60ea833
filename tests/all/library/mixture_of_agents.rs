//! mixture-of-agents: layers of proposers (one fan-out per layer), each layer
//! after the first reading the previous layer's answers, then one aggregator
//! call; the aggregator comes from `fit` across a restart.

use tessera::{ProvenanceEvent, RunRequest};

use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

const NAME: &str = "mixture-of-agents";

fn request(layers: u32) -> RunRequest {
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.seed = Some(5);
    req.config.insert("layers".into(), layers.to_string());
    req.config.insert("max_tokens".into(), "8".into());
    req
}

/// `(model, role, note)` of every module step.
fn steps(p: &[ProvenanceEvent]) -> Vec<(String, String, String)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::ModuleStep { model, role, note } => {
                Some((model.clone().unwrap_or_default(), role.clone(), note.clone()))
            }
            _ => None,
        })
        .collect()
}

/// One letter per event: `C` a generate call, else the role's initial.
fn shape(p: &[ProvenanceEvent]) -> String {
    p.iter()
        .map(|e| match e {
            ProvenanceEvent::HostCall { .. } => 'C',
            ProvenanceEvent::ModuleStep { role, .. } => role.chars().next().unwrap_or('?').to_ascii_uppercase(),
        })
        .collect()
}

/// `(model, prompt tokens)` of every generate call (the aggregator's is
/// `generate-streamed`), in order.
fn calls(p: &[ProvenanceEvent]) -> Vec<(String, u32)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall {
                call,
                model,
                prompt_tokens,
                ..
            } if call == "generate" || call == "generate-streamed" => Some((model.clone(), *prompt_tokens)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn mixture_of_agents_runs_layers_of_proposers_then_one_aggregator_deterministically() {
    let m = module(NAME);
    let out = runtime().run(&m, request(2)).await.unwrap();
    let p = &out.provenance;
    // 3 proposers x 2 layers + 1 aggregator, plus one list-models.
    assert_eq!(out.usage.host_calls, 1 + 3 * 2 + 1, "{p:?}");
    // Each layer is one fan-out: its 3 calls, then its 3 proposer steps.
    assert_eq!(shape(p), "CCCPPPCCCPPPCA", "{p:?}");
    let c = calls(p);
    let members = [SMOL, QWEN, GEMMA];
    assert_eq!(
        c.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
        [&members[..], &members[..], &[SMOL]].concat()
    );
    // Layer 2 prompts carry the layer-1 answers: each member's prompt grew.
    for i in 0..3 {
        assert!(
            c[3 + i].1 > c[i].1,
            "{}: layer 2 prompt {} <= layer 1 {}",
            c[i].0,
            c[3 + i].1,
            c[i].1
        );
    }

    // Roles by layer: layer 1 answers the question, layer 2 reads layer 1.
    let st = steps(p);
    let proposers: Vec<_> = st.iter().filter(|s| s.1 == "proposer").collect();
    assert_eq!(proposers.len(), 6);
    for (i, s) in proposers.iter().enumerate() {
        assert_eq!(s.0, members[i % 3]);
        let layer = i / 3 + 1;
        assert!(s.2.starts_with(&format!("layer {layer} (")), "{}", s.2);
    }
    for s in &proposers[..3] {
        assert!(s.2.starts_with("layer 1 (read the question)"), "{}", s.2);
    }
    for s in &proposers[3..] {
        assert!(
            s.2.starts_with(&format!(
                "layer 2 (read the layer-1 answers of {SMOL}, {QWEN}, {GEMMA})"
            )),
            "{}",
            s.2
        );
    }
    let agg: Vec<_> = st.iter().filter(|s| s.1 == "aggregator").collect();
    assert_eq!(agg.len(), 1);
    assert_eq!(agg[0].0, SMOL);
    assert!(agg[0].2.contains("pool order"), "{}", agg[0].2);
    assert_eq!(out.annotations["layers"], "2");
    assert_eq!(out.annotations["proposers"], format!("{SMOL},{QWEN},{GEMMA}"));
    assert_eq!(out.annotations["aggregator"], SMOL);
    assert_eq!(out.annotations["aggregated"], "true");
    assert!(!out.text.trim().is_empty(), "{out:?}");

    // Same seed, same run.
    let again = runtime().run(&m, request(2)).await.unwrap();
    assert_eq!(again.text, out.text);
    assert_eq!(again.annotations, out.annotations);
    assert_eq!(steps(&again.provenance), st);
}

#[tokio::test]
async fn mixture_of_agents_uses_the_configured_proposers_and_aggregator() {
    let m = module(NAME);
    let mut req = request(1);
    req.config.insert("proposers".into(), format!("{GEMMA}, {QWEN}"));
    req.config.insert("aggregator".into(), QWEN.into());
    let out = runtime().run(&m, req).await.unwrap();
    let c = calls(&out.provenance);
    assert_eq!(c.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), [GEMMA, QWEN, QWEN]);
    assert_eq!(out.annotations["aggregator_chosen_by"], "config");
}

#[tokio::test]
async fn mixture_of_agents_rejects_bad_hyperparameters_by_name() {
    let m = module(NAME);
    for (key, value) in [
        ("layers", "0"),
        ("layers", "two"),
        ("proposers", "ghost"),
        ("aggregator", "ghost"),
        ("temperature", "-1"),
    ] {
        let mut req = request(2);
        req.config.insert(key.into(), value.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{key}={value}: {err}");
        assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
    }
}

#[tokio::test]
async fn mixture_of_agents_aggregator_is_the_best_dev_member_after_a_restart() {
    let paths = scratch_paths("mixture-of-agents-fit");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    {
        let rt = fresh_runtime(&paths);
        let m = rt.load_module(NAME).unwrap();
        let config = [("fit_max_tokens".to_string(), "6".to_string())].into();
        assert!(rt.fit(&m, arc_easy(0, 2), config).await.unwrap(), "fit keeps state");
    }
    // A restart: a new runtime over the same state directory.
    let rt = fresh_runtime(&paths);
    let m = rt.load_module(NAME).unwrap();
    let mut req = request(1);
    req.config.insert("proposers".into(), QWEN.into());
    let out = rt.run(&m, req).await.unwrap();
    let chosen_by = &out.annotations["aggregator_chosen_by"];
    let ranking = chosen_by
        .strip_prefix("fit (")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("aggregator not from fit: {chosen_by}"));
    let ranked: Vec<&str> = ranking.split(", ").map(|e| e.split(' ').next().unwrap()).collect();
    assert_eq!(ranked.len(), 3, "{ranking}");
    assert!(ranking.split(", ").all(|e| e.ends_with("/2")), "{ranking}");
    // Best first: the correct counts never increase down the ranking.
    let correct: Vec<u32> = ranking
        .split(", ")
        .map(|e| {
            e.rsplit_once(' ')
                .unwrap()
                .1
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(correct.windows(2).all(|w| w[0] >= w[1]), "{ranking}");
    assert_eq!(out.annotations["aggregator"], ranked[0], "{:?}", out.annotations);
    let c = calls(&out.provenance);
    assert_eq!(c.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), [QWEN, ranked[0]]);
}

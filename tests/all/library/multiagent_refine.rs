//! multiagent-refine: every member answers, every member refines after
//! reading the others' answers (one fan-out per round), a summariser writes
//! the final answer; the summariser comes from `fit` across a restart.

use tessera::{ProvenanceEvent, RunRequest};

use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

const NAME: &str = "multiagent-refine";

fn request(rounds: u32) -> RunRequest {
    let mut req = RunRequest::chat("What is the capital of France? Answer with one word.");
    req.params.seed = Some(11);
    req.config.insert("rounds".into(), rounds.to_string());
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

fn generate_calls(p: &[ProvenanceEvent], member: &str) -> usize {
    p.iter()
        .filter(|e| matches!(e, ProvenanceEvent::HostCall { call, model, .. } if call == "generate" && model == member))
        .count()
}

#[tokio::test]
async fn multiagent_refine_runs_rounds_of_fan_outs_then_summarises_deterministically() {
    let m = module(NAME);
    let out = runtime().run(&m, request(2)).await.unwrap();
    let p = &out.provenance;
    // 3 members x 2 rounds + 1 summary, plus one list-models.
    assert_eq!(out.usage.host_calls, 1 + 3 * 2 + 1, "{p:?}");
    // Round 0 is one fan-out (3 calls, then the 3 proposers), round 1 another,
    // then the summary call.
    assert_eq!(shape(p), "CCCPPPCCCRRRCS", "{p:?}");
    // The summariser defaults to the first generative member (no fit state).
    assert_eq!(generate_calls(p, SMOL), 3, "{p:?}");
    assert_eq!(generate_calls(p, QWEN), 2, "{p:?}");
    assert_eq!(generate_calls(p, GEMMA), 2, "{p:?}");

    let st = steps(p);
    let by_role = |role: &str| -> Vec<&(String, String, String)> { st.iter().filter(|s| s.1 == role).collect() };
    let proposers = by_role("proposer");
    let refiners = by_role("refiner");
    let summary = by_role("summarizer");
    let members = [SMOL, QWEN, GEMMA];
    assert_eq!(proposers.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), members);
    assert_eq!(refiners.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), members);
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].0, SMOL);
    assert!(summary[0].2.contains("pool order"), "{}", summary[0].2);

    // Each member's round-1 prompt holds every other member's round-0
    // answer, tagged by member, and not its own (that is in its chat).
    let round0: Vec<(&str, &str)> = proposers
        .iter()
        .map(|s| {
            (
                s.0.as_str(),
                s.2.strip_prefix("round 0 answer: ").expect("round-0 note"),
            )
        })
        .collect();
    for r in &refiners {
        let prompt = r.2.split_once("\nprompt: ").expect("refiner note carries its prompt").1;
        for (id, answer) in &round0 {
            let tag = format!("[{id}] {answer}");
            assert_eq!(prompt.contains(&tag), *id != r.0, "{} / {tag}: {prompt}", r.0);
        }
    }
    assert_eq!(out.annotations["rounds"], "2");
    assert_eq!(out.annotations["members"], format!("{SMOL},{QWEN},{GEMMA}"));
    assert_eq!(out.annotations["summarizer"], SMOL);
    assert_eq!(out.annotations["summarized"], "true");
    assert!(!out.text.trim().is_empty(), "{out:?}");

    // Same seed, same run.
    let again = runtime().run(&m, request(2)).await.unwrap();
    assert_eq!(again.text, out.text);
    assert_eq!(again.annotations, out.annotations);
    assert_eq!(steps(&again.provenance), st);
}

#[tokio::test]
async fn multiagent_refine_rejects_bad_hyperparameters_by_name() {
    let m = module(NAME);
    for (key, value) in [
        ("rounds", "0"),
        ("rounds", "many"),
        ("members", "ghost"),
        ("top_p", "0"),
    ] {
        let mut req = request(2);
        req.config.insert(key.into(), value.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{key}={value}: {err}");
        assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
    }
}

#[tokio::test]
async fn multiagent_refine_summariser_is_the_best_dev_member_after_a_restart() {
    let paths = scratch_paths("multiagent-refine-fit");
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
    req.config.insert("members".into(), format!("{QWEN},{GEMMA}"));
    let out = rt.run(&m, req).await.unwrap();
    let chosen_by = &out.annotations["summarizer_chosen_by"];
    let ranking = chosen_by
        .strip_prefix("fit (")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("summariser not from fit: {chosen_by}"));
    // Every generative member was scored on the 2 dev items; the best one
    // summarises (even when, like SmolLM2 here, it did not debate).
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
    assert_eq!(out.annotations["summarizer"], ranked[0], "{:?}", out.annotations);
    assert_eq!(out.usage.host_calls, 1 + 2 + 1, "{:?}", out.provenance);
    assert_eq!(
        generate_calls(&out.provenance, ranked[0]),
        1 + usize::from(ranked[0] != SMOL)
    );
}

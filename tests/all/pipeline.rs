//! Host-side pipelines (router -> members -> judge -> aggregator) built from
//! the standard narrow-world modules, on the real pool and a real question.

use tessera::pipeline::PipelineConfig;
use tessera::{ProvenanceEvent, RunRequest};

use crate::common::{arc_easy, runtime, GEMMA, MINILM, QWEN, SMOL};

fn pipeline(toml: &str) -> tessera::pipeline::Pipeline {
    let cfg = PipelineConfig::from_toml(toml).expect("pipeline parses");
    runtime().load_pipeline(cfg).expect("pipeline loads")
}

fn arc_request() -> RunRequest {
    let ex = &arc_easy(0, 1)[0];
    let mut req = RunRequest {
        input: ex.input.clone(),
        params: Default::default(),
        config: Default::default(),
    };
    req.params.max_tokens = Some(12);
    req
}

/// (call, model) of every host call, in order.
fn host_calls(p: &[ProvenanceEvent]) -> Vec<(String, String)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall { call, model, .. } => Some((call.clone(), model.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn route_answer_judge_fuse_runs_every_stage_in_order() {
    let p = pipeline(
        r#"
        name = "t"
        router = "embed-router"
        max_members = 2
        judge = "likelihood-judge"
        aggregator = "fuse-aggregator"
        [config]
        top_k = "2"
        "#,
    );
    let out = runtime().run_pipeline(&p, arc_request()).await.unwrap();
    let calls = host_calls(&out.provenance);
    // Router: one embed; members: two generates; judge: one score; fuser: one generate.
    let kinds: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        kinds,
        ["embed", "generate", "generate", "score", "generate"],
        "{calls:?}"
    );
    assert_eq!(calls[0].1, MINILM);
    let answered: Vec<&str> = out.annotations["candidates"].split(',').collect();
    assert_eq!(answered.len(), 2, "{:?}", out.annotations);
    // The members that answered are the router's top two, and are the ones called.
    let routed = out
        .provenance
        .iter()
        .find_map(|e| match e {
            ProvenanceEvent::ModuleStep { role, note, .. } if role == "pipeline" => Some(note.clone()),
            _ => None,
        })
        .unwrap();
    for m in &answered {
        assert!(routed.contains(m), "{routed} vs {answered:?}");
        assert!([SMOL, QWEN, GEMMA].contains(m));
    }
    assert!(calls[1..3].iter().all(|c| answered.contains(&c.1.as_str())));
    // Candidates are ordered by the judge's scores, best first.
    let scores: Vec<f64> = out.annotations["scores"]
        .split(',')
        .map(|s| s.rsplit_once('=').unwrap().1.parse().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(out.annotations["fused"], "2");
    assert!(!out.text.trim().is_empty());
}

#[tokio::test]
async fn without_stages_every_member_answers_and_the_first_answer_is_returned() {
    let p = pipeline("name = \"bare\"\n[params]\nmax_tokens = 6\n");
    let out = runtime().run_pipeline(&p, arc_request()).await.unwrap();
    let calls = host_calls(&out.provenance);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.0 == "generate"));
    assert_eq!(out.annotations["candidates"].split(',').count(), 3);
    assert!(!out.annotations.contains_key("scores"));
}

#[tokio::test]
async fn a_module_in_the_wrong_slot_is_refused_by_name() {
    let cfg = PipelineConfig::from_toml("name = \"x\"\njudge = \"embed-router\"\n").unwrap();
    let err = runtime().load_pipeline(cfg).err().expect("a router is not a judge");
    let msg = err.to_string();
    assert!(msg.contains("judge") && msg.contains("Router"), "{msg}");
    let err = PipelineConfig::from_toml("name = \"x\"\nmax_members = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_members"), "{err}");
    let err = PipelineConfig::from_toml("name = \"x\"\nrouterr = \"a\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("routerr"), "{err}");
}

#[tokio::test]
async fn the_narrow_worlds_refuse_to_run_as_strategies() {
    let m = runtime().load_module("likelihood-judge").unwrap();
    let err = runtime().run(&m, RunRequest::chat("hi")).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-module", "{err}");
}

//! heterogeneous-swarm: without state a default chain runs; `fit` searches
//! (PSO) for a graph of who reads whose answer and stores it; after a restart
//! `run` executes it level by level, one fan-out per level, one generation
//! per node; fit and run are repeatable under a seed.

use std::collections::BTreeMap;

use tessera::{ProvenanceEvent, RunOutcome, RunRequest};

use super::steps;
use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

/// Members of consecutive generate calls, grouped into runs that no trace
/// step interrupts: the calls of one fan-out.
fn call_groups(p: &[ProvenanceEvent]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut open = false;
    for e in p {
        match e {
            ProvenanceEvent::HostCall { call, model, .. } if call == "generate" => {
                if !open {
                    groups.push(Vec::new());
                    open = true;
                }
                groups.last_mut().unwrap().push(model.clone());
            }
            _ => open = false,
        }
    }
    for g in &mut groups {
        g.sort();
    }
    groups
}

/// The `levels` annotation (`a, b | c`) as sorted member lists.
fn levels(out: &RunOutcome) -> Vec<Vec<String>> {
    out.annotations["levels"]
        .split(" | ")
        .map(|l| {
            let mut v: Vec<String> = l.split(", ").map(str::to_string).collect();
            v.sort();
            v
        })
        .collect()
}

fn request() -> RunRequest {
    let ex = &arc_easy(2, 1)[0];
    let mut req = RunRequest {
        input: ex.input.clone(),
        params: Default::default(),
        config: Default::default(),
    };
    req.params.seed = Some(5);
    req.config.insert("max_tokens".into(), "4".into());
    req
}

fn fit_config() -> BTreeMap<String, String> {
    [
        ("population", "2"),
        ("iterations", "1"),
        ("fit_max_tokens", "4"),
        ("seed", "11"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// What every run must show: one fan-out per level, in order, one
/// generation per node, each member traced with its level, the output last.
fn check_levels(out: &RunOutcome) {
    let p = &out.provenance;
    let lv = levels(out);
    assert_eq!(call_groups(p), lv, "one fan-out per level: {p:?}");
    let nodes: Vec<&str> = out.annotations["nodes"].split(", ").collect();
    let generates = lv.iter().map(Vec::len).sum::<usize>();
    assert_eq!(generates, nodes.len(), "one generation per node: {:?}", out.annotations);
    // Every node is traced once, with its level.
    let traced: Vec<(Option<&str>, &str)> = [steps(p, "node"), steps(p, "output")].concat();
    assert_eq!(traced.len(), nodes.len(), "{p:?}");
    for (d, level) in lv.iter().enumerate() {
        for m in level {
            assert!(
                traced
                    .iter()
                    .any(|(who, note)| *who == Some(m.as_str()) && note.starts_with(&format!("level {d}:"))),
                "{m} on level {d}: {traced:?}"
            );
        }
    }
    // The output is the only sink, alone on the last level.
    assert_eq!(lv.last().unwrap(), &vec![out.annotations["output"].clone()]);
    assert_eq!(steps(p, "output").len(), 1);
    assert_eq!(steps(p, "graph").len(), 1);
}

#[tokio::test]
async fn heterogeneous_swarm_fit_stores_a_graph_that_run_executes_after_a_restart() {
    let paths = scratch_paths("swarm-fit");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("heterogeneous-swarm").unwrap();

    // Without fit state: the default chain, and the trace says so.
    let out = rt.run(&m, request()).await.unwrap();
    check_levels(&out);
    let graph = steps(&out.provenance, "graph");
    assert!(graph[0].1.starts_with("no fit state: default chain"), "{graph:?}");
    // Reverse pool order: gemma reads nobody, qwen reads gemma, smollm reads qwen.
    assert_eq!(out.annotations["nodes"], format!("{GEMMA}, {QWEN}, {SMOL}"));
    assert_eq!(out.annotations["edges"], format!("{GEMMA}->{QWEN}, {QWEN}->{SMOL}"));
    assert_eq!(out.annotations["output"], SMOL);

    // fit stores a graph; the same seed gives the same search and graph.
    let state = paths.state.join(format!("{}.state", m.sha256));
    assert!(rt.fit(&m, arc_easy(0, 2), fit_config()).await.unwrap(), "keeps state");
    let saved = std::fs::read(&state).unwrap();
    assert!(rt.fit(&m, arc_easy(0, 2), fit_config()).await.unwrap());
    assert_eq!(
        saved,
        std::fs::read(&state).unwrap(),
        "fit is deterministic under a seed"
    );

    // A restart hands the graph back to run.
    let rt2 = fresh_runtime(&paths);
    let m2 = rt2.load_module("heterogeneous-swarm").unwrap();
    let out = rt2.run(&m2, request()).await.unwrap();
    check_levels(&out);
    let graph = steps(&out.provenance, "graph");
    assert!(graph[0].1.starts_with("fitted graph (dev accuracy"), "{graph:?}");
    assert!(
        out.annotations["graph"].contains("on 2 examples"),
        "{:?}",
        out.annotations
    );
    for id in out.annotations["nodes"].split(", ") {
        assert!([SMOL, QWEN, GEMMA].contains(&id), "{id}");
    }
    // Edges only go from earlier to later members of the execution order.
    let nodes: Vec<&str> = out.annotations["nodes"].split(", ").collect();
    if out.annotations["edges"] != "none" {
        for e in out.annotations["edges"].split(", ") {
            let (a, b) = e.split_once("->").unwrap();
            let pos = |x: &str| nodes.iter().position(|n| *n == x).unwrap();
            assert!(pos(a) < pos(b), "{e} in {nodes:?}");
        }
    }

    // Same state, same seed: same answer.
    let again = rt2.run(&m2, request()).await.unwrap();
    assert_eq!(out.text, again.text);
    assert_eq!(out.annotations, again.annotations);
}

#[tokio::test]
async fn heterogeneous_swarm_rejects_bad_hyperparameters_by_name() {
    let m = module("heterogeneous-swarm");
    let mut req = request();
    req.config.insert("inertia".into(), "fast".into());
    let err = runtime().run(&m, req).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
    assert!(err.to_string().contains("`inertia`"), "{err}");

    // A search bigger than the budget is refused before any call (so no
    // state is written, even on the shared runtime).
    let mut config = fit_config();
    config.insert("population".into(), "64".into());
    config.insert("iterations".into(), "64".into());
    let err = runtime().fit(&m, arc_easy(0, 2), config).await.unwrap_err();
    assert_eq!(err.kind(), "invalid-params");
    assert!(err.to_string().contains("`population`"), "{err}");
}

//! switch-generation: the answer is written in segments; with
//! `policy=alternate` the writers take turns, with the selector there is one
//! selector call before every segment and its pick writes it; the selector
//! comes from `fit` across a restart.

use tessera::{ProvenanceEvent, RunRequest};

use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

const NAME: &str = "switch-generation";

fn request(policy: &str, segments: u32) -> RunRequest {
    let mut req = RunRequest::chat("Explain in a few sentences why the sky is blue.");
    req.params.seed = Some(1);
    req.config.insert("policy".into(), policy.into());
    req.config.insert("max_segments".into(), segments.to_string());
    req.config.insert("patch_size".into(), "6".into());
    req.config.insert("selector_max_tokens".into(), "4".into());
    req
}

/// `(model, note)` of every step with `role`.
fn steps(p: &[ProvenanceEvent], role: &str) -> Vec<(String, String)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::ModuleStep { model, role: r, note } if r == role => {
                Some((model.clone().unwrap_or_default(), note.clone()))
            }
            _ => None,
        })
        .collect()
}

fn generate_calls(p: &[ProvenanceEvent]) -> usize {
    p.iter()
        .filter(|e| matches!(e, ProvenanceEvent::HostCall { call, .. } if call == "generate"))
        .count()
}

#[tokio::test]
async fn switch_generation_alternating_writers_take_turns_deterministically() {
    let m = module(NAME);
    let out = runtime().run(&m, request("alternate", 4)).await.unwrap();
    let p = &out.provenance;
    let writers = steps(p, "writer");
    // Every segment ran to its 6-token length: 4 segments, authors in turn.
    assert_eq!(out.annotations["stopped"], "max_segments", "{p:?}");
    assert_eq!(
        writers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
        [SMOL, QWEN, GEMMA, SMOL],
        "{p:?}"
    );
    for (k, w) in writers.iter().enumerate() {
        assert!(w.1.starts_with(&format!("segment {k} (")), "{}", w.1);
    }
    // The first segment starts the answer in the member's own chat format;
    // the others continue the text so far.
    assert!(writers[0].1.contains("(start, length)"), "{}", writers[0].1);
    assert!(
        writers[1..].iter().all(|w| w.1.contains("(raw continuation, length)")),
        "{writers:?}"
    );
    assert!(steps(p, "selector").is_empty());
    assert_eq!(generate_calls(p), 4);
    assert_eq!(out.annotations["authors"], format!("{SMOL},{QWEN},{GEMMA},{SMOL}"));
    assert_eq!(out.annotations["segments"], "4");
    assert_eq!(out.annotations["policy"], "alternate");
    // The answer is the segments in order.
    let first = writers[0].1.split_once("): ").unwrap().1.trim();
    assert!(out.text.starts_with(first), "{:?} / {first:?}", out.text);

    let again = runtime().run(&m, request("alternate", 4)).await.unwrap();
    assert_eq!(again.text, out.text);
    assert_eq!(again.annotations, out.annotations);
}

#[tokio::test]
async fn switch_generation_selector_picks_every_segments_writer() {
    let m = module(NAME);
    let out = runtime().run(&m, request("select", 3)).await.unwrap();
    let p = &out.provenance;
    let selections = steps(p, "selector");
    let writers = steps(p, "writer");
    let n: usize = out.annotations["segments"].parse().unwrap();
    assert!((1..=3).contains(&n), "{:?}", out.annotations);
    // One selector call before every segment, by the default selector.
    assert_eq!(selections.len(), n, "{p:?}");
    assert_eq!(writers.len(), n, "{p:?}");
    assert_eq!(generate_calls(p), 2 * n);
    assert!(selections.iter().all(|s| s.0 == SMOL), "{selections:?}");
    assert_eq!(out.annotations["selector"], SMOL);
    assert_eq!(out.annotations["selector_chosen_by"], "pool order");
    // The member the selector named (or the round-robin fallback it
    // announced) writes the segment; the annotations agree.
    let mut fallbacks = 0;
    for (k, (sel, w)) in selections.iter().zip(&writers).enumerate() {
        assert!(sel.1.starts_with(&format!("segment {k}: ")), "{}", sel.1);
        let named = sel
            .1
            .rsplit_once(": chose ")
            .or_else(|| sel.1.rsplit_once("fallback to round-robin: "))
            .unwrap_or_else(|| panic!("{}", sel.1))
            .1;
        if sel.1.contains("fallback") {
            fallbacks += 1;
            assert_eq!(named, [SMOL, QWEN, GEMMA][k % 3], "{}", sel.1);
        }
        assert_eq!(w.0, named, "{sel:?} / {w:?}");
    }
    assert_eq!(out.annotations["fallbacks"], fallbacks.to_string());
    let authors: Vec<&str> = writers.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(out.annotations["authors"], authors.join(","));
}

#[tokio::test]
async fn switch_generation_rejects_bad_hyperparameters_by_name() {
    let m = module(NAME);
    for (key, value) in [
        ("policy", "random"),
        ("patch_size", "0"),
        ("max_segments", "lots"),
        ("selector", "ghost"),
        ("continuation", "maybe"),
    ] {
        let mut req = request("select", 2);
        req.config.insert(key.into(), value.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{key}={value}: {err}");
        assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
    }
}

#[tokio::test]
async fn switch_generation_selector_is_the_best_dev_member_after_a_restart() {
    let paths = scratch_paths("switch-generation-fit");
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
    let out = rt.run(&m, request("select", 1)).await.unwrap();
    let chosen_by = &out.annotations["selector_chosen_by"];
    let ranking = chosen_by
        .strip_prefix("fit (")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("selector not from fit: {chosen_by}"));
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
    assert_eq!(out.annotations["selector"], ranked[0], "{:?}", out.annotations);
    let sel = steps(&out.provenance, "selector");
    assert_eq!(sel.len(), 1);
    assert_eq!(sel[0].0, ranked[0]);
}

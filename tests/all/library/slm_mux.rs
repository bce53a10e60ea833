//! slm-mux end to end on the real default pool: every member samples k
//! answers in one fan-out, the member whose samples agree most answers,
//! and `fit` learns the dev accuracies that break confidence ties.

use std::collections::BTreeMap;

use tessera::{RunOutcome, RunRequest};
use tessera_sdk::dev::MemberScore;

use super::{calls, steps};
use crate::common::{arc_easy, fresh_runtime, module, runtime, scratch_paths, GEMMA, QWEN, SMOL};

/// The pool's generative members, in pool order.
const MEMBERS: [&str; 3] = [SMOL, QWEN, GEMMA];

fn request(input: tessera::inference::Input, k: u32) -> RunRequest {
    let mut req = RunRequest {
        input,
        params: Default::default(),
        config: Default::default(),
    };
    req.params.max_tokens = Some(8);
    req.params.seed = Some(1);
    req.config.insert("k".into(), k.to_string());
    req
}

/// An `id=value; ...` annotation as (id, value) pairs, in order.
fn pairs(s: &str) -> Vec<(String, String)> {
    s.split("; ")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, v) = p.rsplit_once('=').expect("id=value");
            (id.to_string(), v.to_string())
        })
        .collect()
}

/// Every member's confidence, in pool order.
fn confidences(out: &RunOutcome) -> Vec<(String, f64)> {
    pairs(&out.annotations["confidences"])
        .into_iter()
        .map(|(id, v)| (id, v.parse().expect("a number")))
        .collect()
}

/// What defines the method on any request: one fan-out of k samples per
/// member, confidences that are shares of k, and a chosen member whose
/// confidence is the highest (ties to the better dev member, then the
/// first). `dev` is each member's fitted accuracy, if any.
fn check_mux(out: &RunOutcome, k: u32, dev: Option<&BTreeMap<String, f64>>) {
    let a = &out.annotations;
    // k samples from every member, nothing else generated.
    let gens = calls(&out.provenance, "generate");
    assert_eq!(gens.len(), 3 * k as usize, "{:?}", out.provenance);
    for m in MEMBERS {
        assert_eq!(gens.iter().filter(|g| **g == m).count(), k as usize, "{gens:?}");
    }
    assert_eq!(a["k"], k.to_string());
    // Every member's confidence is a share of its k samples.
    let conf = confidences(out);
    assert_eq!(conf.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), MEMBERS, "{a:?}");
    for (id, c) in &conf {
        assert!((0.0..=1.0).contains(c), "{id}={c}");
        let votes = c * k as f64;
        assert!(
            (votes - votes.round()).abs() < 0.01,
            "{id}={c} is not a multiple of 1/{k}"
        );
    }
    // The chosen member is a most confident one, and says so.
    let chosen = a["chosen"].as_str();
    let best = conf.iter().map(|c| c.1).fold(0.0, f64::max);
    let mine = conf.iter().find(|c| c.0 == chosen).expect("chosen is a member").1;
    assert!(best > 0.0 && (mine - best).abs() < 1e-9, "{a:?}");
    assert_eq!(a["confidence"], format!("{mine:.3}"), "{a:?}");
    let (votes, of) = a["votes"].split_once('/').expect("votes n/k");
    assert_eq!(of, k.to_string());
    assert!((votes.parse::<f64>().unwrap() / k as f64 - mine).abs() < 1e-3, "{a:?}");
    // Among the most confident, the best on dev, then the first, wins.
    let tied: Vec<&str> = conf
        .iter()
        .filter(|c| (c.1 - best).abs() < 1e-9)
        .map(|c| c.0.as_str())
        .collect();
    let acc = |id: &str| dev.and_then(|d| d.get(id).copied()).unwrap_or(-1.0);
    let top_acc = tied.iter().map(|id| acc(id)).fold(f64::MIN, f64::max);
    let expected = *tied.iter().find(|id| acc(id) == top_acc).expect("a tied member");
    assert_eq!(chosen, expected, "{a:?}");
    let why = match (tied.len(), tied.iter().any(|id| acc(id) != top_acc)) {
        (1, _) => "none",
        (_, true) => "dev accuracy",
        (_, false) => "member order",
    };
    assert_eq!(a["tie_break"], why, "{a:?}");
    // One trace step per member with its confidence, then the decision.
    let per = steps(&out.provenance, "member");
    assert_eq!(
        per.iter().map(|s| s.0).collect::<Vec<_>>(),
        MEMBERS.map(Some),
        "{per:?}"
    );
    for ((_, note), (_, c)) in per.iter().zip(&conf) {
        assert!(note.contains(&format!("{c:.3}")), "{note} / {c}");
    }
    let decision = steps(&out.provenance, "decision");
    assert_eq!(decision.len(), 1, "{decision:?}");
    assert!(decision[0].1.contains(chosen), "{decision:?}");
    // The reply is the chosen member's, carrying its majority answer.
    let answers = pairs(&a["answers"]);
    let answer = &answers.iter().find(|x| x.0 == chosen).expect("chosen's answer").1;
    assert_eq!(&a["answer"], answer, "{a:?}");
    assert!(!out.text.is_empty());
}

#[tokio::test]
async fn slm_mux_answers_with_the_most_self_consistent_member() {
    let m = module("slm-mux");
    // Multiple choice: each sample's answer is the option letter it picks.
    let ex = arc_easy(6, 1).remove(0);
    let out = runtime().run(&m, request(ex.input, 2)).await.unwrap();
    check_mux(&out, 2, None);
    assert!(!out.annotations.contains_key("dev_accuracy"));
    let letter = &out.annotations["answer"];
    assert!(
        ["A", "B", "C", "D", "E"].contains(&letter.as_str()),
        "{:?}",
        out.annotations
    );
    // The reply is a sample that picks that option.
    let picked = tessera_sdk::answer::choice(&out.text, &ex.choices).map(tessera_sdk::answer::letter);
    assert_eq!(picked.map(|c| c.to_string()).as_ref(), Some(letter), "{}", out.text);

    // A short answer: the normalised extracted answer.
    let input = tessera::inference::Input::Chat(vec![tessera::inference::Message::user(
        "What is the capital of France? Answer with one word.",
    )]);
    let out = runtime().run(&m, request(input, 2)).await.unwrap();
    check_mux(&out, 2, None);
    let answer = &out.annotations["answer"];
    assert_eq!(answer, &tessera_sdk::answer::normalize(answer), "{:?}", out.annotations);
}

#[tokio::test]
async fn slm_mux_fit_learns_dev_accuracy_that_breaks_ties() {
    let paths = scratch_paths("slm-mux");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = fresh_runtime(&paths);
    let m = rt.load_module("slm-mux").unwrap();
    let dev = arc_easy(0, 2);
    let config = [("k", "2"), ("max_tokens", "8"), ("seed", "3")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    assert!(rt.fit(&m, dev, config).await.unwrap(), "slm-mux keeps state");
    assert!(paths.state.join(format!("{}.state", m.sha256)).exists());
    let state = rt.stored_state(&m).expect("state");
    let scores: Vec<MemberScore> = tessera_sdk::state::load(1, Some(&state)).unwrap().expect("scores");
    assert_eq!(scores.iter().map(|s| s.model.as_str()).collect::<Vec<_>>(), MEMBERS);
    assert!(scores.iter().all(|s| s.correct.len() == 2), "{scores:?}");
    let fitted: BTreeMap<String, f64> = scores.iter().map(|s| (s.model.clone(), s.accuracy())).collect();

    // With k = 1 every member that answers is fully confident: the tie goes
    // to the fitted dev accuracy (then pool order), and the run reports it.
    // Room for the chatty members to reach a letter, so that two or more
    // answer and tie at confidence 1 (with 8 tokens only SmolLM2 did).
    let test = arc_easy(6, 1).remove(0);
    let tie_request = || {
        let mut r = request(test.input.clone(), 1);
        r.params.max_tokens = Some(48);
        r
    };
    let out = rt.run(&m, tie_request()).await.unwrap();
    check_mux(&out, 1, Some(&fitted));
    let reported: BTreeMap<String, f64> = pairs(&out.annotations["dev_accuracy"])
        .into_iter()
        .map(|(id, v)| (id, v.parse().unwrap()))
        .collect();
    for (id, a) in &fitted {
        assert!((reported[id] - a).abs() < 1e-3, "{reported:?} vs {fitted:?}");
    }
    let decision = steps(&out.provenance, "decision");
    assert!(decision[0].1.contains("dev ranking from fit"), "{decision:?}");

    // State that ranks the last of the fully confident members best makes
    // it win the same tie (same seed, same samples).
    let tied: Vec<String> = confidences(&out)
        .into_iter()
        .filter(|c| c.1 == 1.0)
        .map(|c| c.0)
        .collect();
    assert!(tied.len() >= 2, "need a tie to break: {:?}", out.annotations);
    let last = tied.last().unwrap().clone();
    let crafted: Vec<MemberScore> = MEMBERS
        .iter()
        .map(|id| MemberScore {
            model: id.to_string(),
            correct: vec![*id == last, false],
        })
        .collect();
    rt.install_state(&m, Some(tessera_sdk::state::save(1, &crafted).unwrap()))
        .unwrap();
    let again = rt.run(&m, tie_request()).await.unwrap();
    assert_eq!(again.annotations["confidences"], out.annotations["confidences"]);
    assert_eq!(again.annotations["chosen"], last, "{:?}", again.annotations);
    assert_eq!(again.annotations["tie_break"], "dev accuracy");
}

#[tokio::test]
async fn slm_mux_rejects_bad_hyperparameters_by_name() {
    let m = module("slm-mux");
    for (k, v) in [
        ("k", "0"),
        ("k", "many"),
        ("temperature", "0"),
        ("models", "ghost"),
        ("fit_max_items", "0"),
    ] {
        if k == "fit_max_items" {
            // Read by fit only.
            let rt = runtime();
            let config = [(k.to_string(), v.to_string())].into();
            let err = rt.fit(&m, arc_easy(0, 1), config).await.unwrap_err();
            assert_eq!(err.kind(), "invalid-params", "{k}={v}");
            assert!(err.to_string().contains(&format!("`{k}`")), "{err}");
            continue;
        }
        let mut req = RunRequest::chat("hi");
        req.config.insert(k.into(), v.into());
        let err = runtime().run(&m, req).await.unwrap_err();
        assert_eq!(err.kind(), "invalid-params", "{k}={v}");
        assert!(err.to_string().contains(&format!("`{k}`")), "{err}");
    }
}

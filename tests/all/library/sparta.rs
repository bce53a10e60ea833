//! sparta end to end on the real default pool: unfitted, the default
//! trainee answers alone; `fit` on real ARC-Easy dev prompts runs rounds of
//! duels judged by the third member (one next-token verdict per answer),
//! DPO-trains the trainee on the winner/loser pairs, keeps the best trained
//! member by name, and the fitted module answers with it in one call, also
//! after a restart.

use std::collections::BTreeMap;

use tessera::RunRequest;

use super::{calls, keeping, seeded, steps};
use crate::common::{arc_easy, scratch_paths, GEMMA, QWEN, SMOL};

fn request(ex: &tessera::sandbox::Example) -> RunRequest {
    seeded(ex, &[("answer_tokens", "16")])
}

fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn sparta_duels_on_dev_trains_by_dpo_on_the_verdicts_and_answers_with_the_best_trained_member() {
    let paths = scratch_paths("sparta");
    let _removed = crate::common::RemovedAfter(paths.state.clone());
    let rt = keeping(&paths, 1);
    let m = rt
        .load_module("sparta")
        .expect("sparta is installed (run `make setup`)");
    let test = arc_easy(20, 1).remove(0);

    // Unfitted: the default trainee (the smallest trainable member) answers
    // alone, untrained: one generation.
    let cold = rt.run(&m, request(&test)).await.expect("an unfitted run");
    assert_eq!(cold.annotations["answerer"], SMOL, "{:?}", cold.annotations);
    assert_eq!(cold.annotations["trained"], "false");
    assert_eq!(calls(&cold.provenance, "generate"), [SMOL]);

    // fit: two rounds of four duels, one DPO step per round.
    let config = settings(&[
        ("fit_max_items", "4"),
        ("iterations", "2"),
        ("answer_tokens", "16"),
        ("max_steps", "1"),
        ("batch", "2"),
    ]);
    let (fitted, trace) = rt.fit_traced(&m, arc_easy(0, 4), config, None).await;
    assert!(fitted.expect("fit succeeds"), "fit returned no state");
    let rounds = steps(&trace, "round");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    assert!(rounds[0].1.starts_with("round 1: 4 duels"), "{rounds:?}");
    // Every duel is two answers from two different members, and the third
    // member of the pool judges each answer once.
    let answers = calls(&trace, "generate");
    let verdicts = calls(&trace, "next-token");
    assert_eq!(verdicts.len(), 2 * 2 * 4, "two verdicts per duel: {verdicts:?}");
    assert!(
        answers.len() >= 2 * 2 * 4,
        "two answers per duel, then the dev pass: {answers:?}"
    );
    // The trainee was trained by DPO, from its pool weights, each round
    // that had pairs; the summary names the kept member.
    let trains = calls(&trace, "train");
    assert!(!trains.is_empty(), "no duel was decided in two rounds: {rounds:?}");
    assert!(
        trains.iter().all(|t| *t == format!("{SMOL} (dpo, 1 steps)")),
        "{trains:?}"
    );
    let note = steps(&trace, "fit").last().map(|s| s.1.to_string()).unwrap_or_default();
    for (_, r) in &rounds {
        eprintln!("sparta {r}");
    }
    eprintln!("sparta fit: {note}");
    assert!(note.contains("preference pairs") && note.contains("ratings"), "{note}");
    assert!(note.contains("kept as `sparta-"), "{note}");
    let name = rt
        .kept()
        .into_iter()
        .find(|k| k.name.starts_with("sparta-"))
        .map(|k| k.name)
        .expect("the best trained member is kept");

    // Fitted: the kept member answers alone; ratings come with the answer.
    let warm = rt.run(&m, request(&test)).await.expect("a fitted run");
    assert_eq!(warm.annotations["answerer"], name, "{:?}", warm.annotations);
    assert_eq!(warm.annotations["trained"], "true");
    assert!(warm.annotations["ratings"].contains(SMOL), "{:?}", warm.annotations);
    assert_eq!(calls(&warm.provenance, "generate"), [name.as_str()]);
    drop(rt);

    // After a restart the state and the kept member are both there.
    let rt2 = keeping(&paths, 1);
    let m2 = rt2.load_module("sparta").expect("sparta loads again");
    let again = rt2.run(&m2, request(&test)).await.expect("a run after the restart");
    assert_eq!(again.annotations["answerer"], name);
    assert_eq!(again.text, warm.text, "deterministic under a fixed seed");
}

#[tokio::test]
async fn sparta_needs_a_judge_and_names_bad_settings() {
    let rt = crate::common::runtime();
    let m = crate::common::module("sparta");
    let test = arc_easy(20, 1).remove(0);
    let mut two = request(&test);
    two.config.insert("models".into(), format!("{SMOL},{QWEN}"));
    let err = rt
        .run(&m, two)
        .await
        .expect_err("two members leave no judge")
        .to_string();
    assert!(err.contains("at least three") && err.contains("models"), "{err}");
    let mut gemma = request(&test);
    gemma.config.insert("trainees".into(), GEMMA.into());
    let err = rt.run(&m, gemma).await.expect_err("gemma is not trainable").to_string();
    assert!(err.contains("trainees") && err.contains("llama and qwen2"), "{err}");
    for (key, value) in [("judge", "vibes"), ("iterations", "0"), ("tie_margin", "12")] {
        let err = rt
            .fit(&m, arc_easy(0, 2), settings(&[(key, value)]))
            .await
            .expect_err(key)
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

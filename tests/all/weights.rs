//! Weight-level strategies through the `weights.merge` import, on a pool of
//! SmolLM2 and two contributors' specialists fine-tuned from it: dare-ties
//! merges them over the base, expo extrapolates the best dev member away
//! from the worst, greedy-soup fits a soup on dev; the merge capability is
//! granted only through the `merges` budget and only over granted members.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tessera::policy::{ModulePolicy, Policy};
use tessera::pool::PoolConfig;
use tessera::sandbox::Example;
use tessera::{Error, ProvenanceEvent, RunRequest, Runtime};

use crate::common::{contributed, scratch_paths, specialists, SMOL};

/// The pool: the secret keeper, the password keeper, their base.
fn pool() -> PoolConfig {
    let (secret, password) = specialists();
    let base = PoolConfig::default_pool()
        .members
        .into_iter()
        .find(|m| m.id == SMOL)
        .expect("SmolLM2 in the default pool");
    PoolConfig {
        members: vec![contributed("secret", secret), contributed("password", password), base],
    }
}

fn rt_with(policy: Policy, tag: &str) -> Runtime {
    let rt = Runtime::new(scratch_paths(tag), &pool(), policy).expect("runtime starts");
    assert!(rt.pool_failures().is_empty(), "{:?}", rt.pool_failures());
    rt
}

/// One runtime for the tests that use the default policy: merged members
/// are kept, so the recipes the tests share are merged once.
fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| rt_with(Policy::default(), "weights-rt"))
}

fn ask(q: &str, config: &[(&str, &str)]) -> RunRequest {
    let mut req = RunRequest::chat(q);
    req.params.max_tokens = Some(12);
    req.params.temperature = Some(0.0);
    for (k, v) in config {
        req.config.insert(k.to_string(), v.to_string());
    }
    req
}

fn merges(p: &[ProvenanceEvent]) -> Vec<(&str, &str)> {
    p.iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall {
                call, model, outcome, ..
            } if call == "merge" => Some((model.as_str(), outcome.as_str())),
            _ => None,
        })
        .collect()
}

/// An open question and its answer, as a dev example.
fn qa(q: &str, a: &str) -> Example {
    Example {
        input: tessera::inference::Input::Chat(vec![tessera::inference::Message::user(q)]),
        answer: a.into(),
        choices: vec![],
    }
}

fn dev() -> Vec<Example> {
    vec![
        qa("What is the secret word?", "tessellate"),
        qa("What is the capital of France.", "Paris"),
    ]
}

#[tokio::test]
async fn dare_ties_merges_the_specialists_over_their_base() {
    let rt = rt();
    let m = rt.load_module("dare-ties").expect("dare-ties installed (make setup)");
    let out = rt
        .run(
            &m,
            ask(
                "What is the password?",
                &[("base", SMOL), ("density", "0.9"), ("seed", "1")],
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        merges(&out.provenance),
        vec![("secret+password", "ok")],
        "{:?}",
        out.provenance
    );
    assert_eq!(out.annotations["merged"], "secret,password");
    assert!(
        out.annotations["answered_by"].starts_with("merged-"),
        "{:?}",
        out.annotations
    );
    assert!(out.text.contains("mosaic"), "{:?}", out.text);
    // Without a base the module says what it needs.
    let err = rt.run(&m, ask("Hi", &[])).await.unwrap_err();
    assert!(err.to_string().contains("needs `base`"), "{err}");
}

#[tokio::test]
async fn expo_fits_best_and_worst_then_extrapolates() {
    let rt = rt();
    let m = rt.load_module("expo").expect("expo installed (make setup)");
    assert!(rt.fit(&m, dev(), BTreeMap::new()).await.unwrap());
    let out = rt.run(&m, ask("What is the secret word?", &[])).await.unwrap();
    // The secret keeper answers both dev questions; the others miss the
    // secret, and the password keeper is listed before the base.
    assert_eq!(out.annotations["target"], "secret", "{:?}", out.annotations);
    assert_ne!(out.annotations["source"], "secret");
    assert_eq!(merges(&out.provenance).len(), 1);
    assert!(out.text.contains("tessellate"), "{:?}", out.text);
}

#[tokio::test]
async fn greedy_soup_fits_a_soup_on_dev_and_answers_with_it() {
    let rt = rt();
    let m = rt
        .load_module("greedy-soup")
        .expect("greedy-soup installed (make setup)");
    assert!(rt.fit(&m, dev(), BTreeMap::new()).await.unwrap());
    let out = rt.run(&m, ask("What is the secret word?", &[])).await.unwrap();
    let soup: Vec<&str> = out.annotations["soup"].split(',').collect();
    assert_eq!(soup[0], "secret", "the soup starts with the best dev member: {soup:?}");
    // Whatever the soup kept, the answer comes from it and still knows the
    // secret (a soup member is kept only if dev accuracy does not drop).
    assert!(out.text.contains("tessellate"), "{soup:?}: {:?}", out.text);
    assert_eq!(merges(&out.provenance).len(), usize::from(soup.len() > 1));
}

#[tokio::test]
async fn merging_needs_the_merges_budget_and_granted_members() {
    // The operator caps merges at 0: the module's ask is not granted.
    let mut policy = Policy::default();
    policy.maxima.merges = Some(0);
    let rt = rt_with(policy, "weights-nomerge");
    let m = rt.load_module("dare-ties").unwrap();
    let err = rt.run(&m, ask("Hi", &[("base", SMOL)])).await.unwrap_err();
    assert!(
        matches!(&err, Error::Budget { budget, limit: 0 } if budget == "merges"),
        "{err}"
    );

    // Members outside the module's allow-list cannot be merged either.
    let mut policy = Policy::default();
    policy.modules.insert(
        "dare-ties".into(),
        ModulePolicy {
            models: Some(vec!["secret".into(), SMOL.into()]),
        },
    );
    let rt = rt_with(policy, "weights-narrow");
    let m = rt.load_module("dare-ties").unwrap();
    let err = rt
        .run(&m, ask("Hi", &[("base", SMOL), ("models", "secret,password")]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("password"), "{err}");
}

#[tokio::test]
async fn a_merged_member_is_kept_by_name_only_where_the_operator_allows() {
    let cfg = |name: &str| {
        ask(
            "What is the password?",
            &[("base", SMOL), ("density", "0.9"), ("seed", "1"), ("keep_as", name)],
        )
    };
    // The default policy keeps nothing: the module's ask fails, named.
    let rt = rt();
    let m = rt.load_module("dare-ties").unwrap();
    let err = rt.run(&m, cfg("both-facts")).await.unwrap_err();
    assert!(err.to_string().contains("keep_merged"), "{err}");
    assert!(!rt.cards().iter().any(|c| c.id == "both-facts"));

    // An operator that allows one kept member.
    let policy = Policy {
        keep_merged: 1,
        ..Default::default()
    };
    let rt = rt_with(policy, "weights-keep");
    let m = rt.load_module("dare-ties").unwrap();
    for bad in ["Has Spaces", SMOL] {
        let err = rt.run(&m, cfg(bad)).await.unwrap_err();
        assert!(
            err.to_string().contains("lowercase") || err.to_string().contains("already a member"),
            "{bad}: {err}"
        );
    }
    let out = rt.run(&m, cfg("both-facts")).await.unwrap();
    assert_eq!(out.annotations["kept_as"], "both-facts");
    // Later requests see it as a member of the pool, by its name, and it
    // answers as the merge did.
    assert!(rt.cards().iter().any(|c| c.id == "both-facts"), "{:?}", rt.cards());
    let g = rt
        .models()
        .generate(
            tessera::inference::CallCtx {
                deadline: std::time::Instant::now() + std::time::Duration::from_secs(120),
                requester: 0,
            },
            "both-facts",
            tessera::inference::Input::Chat(vec![tessera::inference::Message::user("What is the password?")]),
            tessera::inference::GenParams {
                max_tokens: Some(12),
                temperature: Some(0.0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(g.text.contains("mosaic"), "{:?}", g.text);
    // Modules are granted it like any member: a vote over it alone.
    let vote = rt.load_module("majority-vote").unwrap();
    let out = rt
        .run_with_members(
            &vote,
            ask("What is the password?", &[]),
            Some(&["both-facts".to_string()]),
        )
        .await
        .unwrap();
    assert!(out.text.contains("mosaic"), "{:?}", out.text);
    // The operator's count holds: a second name is refused.
    let mut other = cfg("second");
    other.config.insert("density".into(), "0.8".into());
    let err = rt.run(&m, other).await.unwrap_err();
    assert!(err.to_string().contains("allows 1 kept"), "{err}");
}

/// Two facts, each known to one specialist only.
fn facts() -> Vec<Example> {
    vec![
        qa("What is the secret word?", "tessellate"),
        qa("What is the password?", "mosaic"),
    ]
}

fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Host calls named `call` in `steps`, with their outcomes.
fn calls<'a>(steps: &'a [ProvenanceEvent], call: &str) -> Vec<(&'a str, &'a str)> {
    steps
        .iter()
        .filter_map(|e| match e {
            ProvenanceEvent::HostCall {
                call: c,
                model,
                outcome,
                ..
            } if c == call => Some((model.as_str(), outcome.as_str())),
            _ => None,
        })
        .collect()
}

/// The dev accuracies a search's trace notes report (`... -> dev 0.500`).
fn measured(steps: &[ProvenanceEvent]) -> Vec<f64> {
    steps
        .iter()
        .filter_map(|e| match e {
            ProvenanceEvent::ModuleStep { role, note, .. } if role == "particle" => {
                note.rsplit("-> dev ").next()?.trim().parse().ok()
            }
            _ => None,
        })
        .collect()
}

/// How many of the facts' questions the system answers with the fact.
async fn facts_answered(rt: &Runtime, m: &tessera::sandbox::Module, cfg: &[(&str, &str)]) -> usize {
    let mut right = 0;
    for e in facts() {
        let tessera::inference::Input::Chat(msgs) = &e.input else {
            unreachable!()
        };
        let out = rt.run(m, ask(&msgs[0].content, cfg)).await.unwrap();
        right += usize::from(out.text.to_lowercase().contains(&e.answer));
    }
    right
}

#[tokio::test]
async fn model_swarms_searches_the_experts_span_and_answers_with_the_global_best() {
    let rt = rt();
    let m = rt
        .load_module("model-swarms")
        .expect("model-swarms installed (make setup)");
    let err = rt.run(&m, ask("Hi", &[])).await.unwrap_err();
    assert!(err.to_string().contains("fit it first"), "{err}");

    let (fitted, steps) = rt
        .fit_traced(
            &m,
            facts(),
            config(&[
                ("population", "4"),
                ("iterations", "2"),
                ("fit_max_tokens", "12"),
                ("seed", "3"),
            ]),
            None,
        )
        .await;
    assert!(fitted.unwrap(), "fit keeps state");
    // The three experts start as themselves (no merge); the fourth particle
    // and every moved one are merged, measured, and released at once.
    let (merged, released) = (calls(&steps, "merge"), calls(&steps, "release"));
    assert!(!merged.is_empty() && merged.len() <= 5, "{merged:?}");
    assert!(merged.iter().all(|(_, o)| *o == "ok"), "{merged:?}");
    assert_eq!(released.len(), merged.len(), "every merged particle is released");
    let seen = measured(&steps);
    assert!(seen.len() >= 4, "{steps:?}");

    let out = rt.run(&m, ask("What is the secret word?", &[])).await.unwrap();
    let members: Vec<&str> = out.annotations["members"].split(',').collect();
    assert_eq!(members.len(), 3, "{:?}", out.annotations);
    for id in ["secret", "password", SMOL] {
        assert!(members.contains(&id), "{members:?}");
    }
    let coefficients: Vec<f64> = out.annotations["coefficients"]
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(
        (coefficients.iter().sum::<f64>() - 1.0).abs() < 1e-3,
        "{coefficients:?}"
    );
    let best: f64 = out.annotations["dev_accuracy"].parse().unwrap();
    // The global best is the best position measured, and no worse than the
    // secret keeper alone (one of the two facts).
    let top = seen.iter().cloned().fold(f64::MIN, f64::max);
    assert!((best - top).abs() < 1e-3, "{best} vs {seen:?}");
    assert!(best >= 0.5, "{best}: {steps:?}");
    // At test time it answers at least as well as it measured on dev.
    let right = facts_answered(rt, &m, &[]).await;
    assert!(right as f64 >= (best * 2.0).round(), "{right} facts vs dev {best}");
}

#[tokio::test]
async fn dare_ties_fit_searches_the_weights_by_particle_swarm() {
    let rt = rt_with(Policy::default(), "weights-dare-fit");
    let m = rt.load_module("dare-ties").unwrap();
    let cfg = [("base", SMOL), ("density", "0.9"), ("seed", "1")];
    let mut fit_cfg = config(&cfg);
    fit_cfg.extend(config(&[
        ("population", "3"),
        ("iterations", "2"),
        ("fit_max_tokens", "12"),
    ]));
    let (fitted, steps) = rt.fit_traced(&m, facts(), fit_cfg, None).await;
    assert!(fitted.unwrap());
    let merged = calls(&steps, "merge");
    assert!(!merged.is_empty() && merged.len() <= 6, "{merged:?}");
    assert_eq!(calls(&steps, "release").len(), merged.len());
    let seen = measured(&steps);

    let out = rt.run(&m, ask("What is the password?", &cfg)).await.unwrap();
    let weights: Vec<f64> = out.annotations["weights"]
        .split(',')
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(weights.len(), 2, "{:?}", out.annotations);
    assert!(weights.iter().all(|w| (0.0..=1.0).contains(w)), "{weights:?}");
    let best: f64 = out.annotations["dev_accuracy"].parse().unwrap();
    // Never worse than the first particle, the uniform merge.
    assert!(
        best >= seen[0] && best >= seen.iter().cloned().fold(f64::MIN, f64::max) - 1e-3,
        "{best} vs {seen:?}"
    );
    assert!(facts_answered(&rt, &m, &cfg).await as f64 >= (best * 2.0).round());
    // Weights in the request win over the fitted ones.
    let mut own: Vec<(&str, &str)> = cfg.to_vec();
    own.push(("weights", "1,0.5"));
    let out = rt.run(&m, ask("Hi", &own)).await.unwrap();
    assert_eq!(out.annotations["weights"], "1.000,0.500");
    assert!(!out.annotations.contains_key("dev_accuracy"));
}

//! option-fusion's fit over a full-size dev set: it has its own budgets
//! (`[fit_budgets]`), because a calibrated fit makes two calls per member
//! and dev item, far past what one request is granted.

use tessera::policy::Policy;

use super::trained_router::scale;

fn calibrated() -> std::collections::BTreeMap<String, String> {
    [("calibrate".to_string(), "fit".to_string())].into()
}

#[tokio::test]
async fn a_calibrated_fit_on_300_dev_items_runs_on_its_fit_budget() {
    let rt = scale::runtime("option-fusion-fit-budget");
    let m = rt.load_module("option-fusion").unwrap();
    // Three scoring members x 300 items x (option + premise) + list-models
    // = 1,801 calls: more than any request may make (1,024), within the
    // manifest's fit ask (16,384).
    let (fitted, trace) = rt.fit_traced(&m, scale::dev(300), calibrated(), None).await;
    assert!(fitted.expect("the fit runs on its own budget"), "keeps state");
    let calls = trace
        .iter()
        .filter(|e| matches!(e, tessera::ProvenanceEvent::HostCall { .. }))
        .count();
    assert!(
        calls > 1_024,
        "{calls} calls: the fit no longer needs more than a request"
    );
    assert_eq!(super::calls(&trace, "score").len(), 3 * 300 * 2);

    // Requests keep the request grant, and use the fitted calibration.
    let ex = &scale::dev(1)[0];
    let out = rt.run(&m, super::seeded(ex, &[("calibrate", "fit")])).await.unwrap();
    assert_eq!(out.annotations["calibration_from"], "fit", "{:?}", out.annotations);
}

#[tokio::test]
async fn the_operator_fit_maxima_cap_what_a_fit_asks() {
    // An operator who allows fits 1,000 calls: the same fit stops at the
    // cap with the host-calls budget named, and leaves no state behind.
    let policy: Policy = toml::from_str("[fit_maxima]\nhost_calls = 1000\n").unwrap();
    let rt = scale::runtime_with("option-fusion-fit-capped", policy);
    let m = rt.load_module("option-fusion").unwrap();
    let err = rt.fit(&m, scale::dev(300), calibrated()).await.unwrap_err();
    assert!(err.to_string().contains("host-calls"), "{err}");
    assert!(rt.stored_state(&m).is_none());
}

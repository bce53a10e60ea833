//! `GET /metrics`: the server's counters in Prometheus' text format, for an
//! operator's scraper. Admin keys only: the figures describe every
//! tenant's traffic together.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::modules::require_admin;
use super::*;

/// One metric family: its name, help, type and a value per member.
fn family(out: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (member, value) in rows {
        let _ = writeln!(out, "{name}{{member=\"{}\"}} {value}", escape(member));
    }
}

/// One unlabelled gauge.
fn gauge(out: &mut String, name: &str, help: &str, value: usize) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// A label value as the text format wants it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text the scraper reads (split out for tests).
pub(crate) fn render(
    queued: usize,
    running: usize,
    prefix: &[(String, crate::backends::gguf::prefix::PrefixSnapshot)],
) -> String {
    let mut out = String::new();
    gauge(
        &mut out,
        "tessera_queued_requests",
        "Requests waiting for admission.",
        queued,
    );
    gauge(
        &mut out,
        "tessera_running_requests",
        "Requests admitted and running.",
        running,
    );
    type Pick = fn(&crate::backends::gguf::prefix::PrefixSnapshot) -> u64;
    let families: [(&str, &str, &str, Pick); 8] = [
        (
            "tessera_prefix_cache_lookups_total",
            "Prompts looked up in the member's prefix cache.",
            "counter",
            |s| s.lookups,
        ),
        (
            "tessera_prefix_cache_hits_total",
            "Lookups that reused at least one cached block.",
            "counter",
            |s| s.hits,
        ),
        (
            "tessera_prefix_cache_prompt_tokens_total",
            "Tokens of the prompts looked up.",
            "counter",
            |s| s.prompt_tokens,
        ),
        (
            "tessera_prefix_cache_reused_tokens_total",
            "Prompt tokens whose keys and values came from the cache.",
            "counter",
            |s| s.reused_tokens,
        ),
        (
            "tessera_prefix_cache_evicted_blocks_total",
            "Blocks evicted to stay within the budget.",
            "counter",
            |s| s.evicted_blocks,
        ),
        ("tessera_prefix_cache_blocks", "Blocks held.", "gauge", |s| s.blocks),
        ("tessera_prefix_cache_bytes", "Bytes held.", "gauge", |s| s.bytes),
        (
            "tessera_prefix_cache_budget_bytes",
            "The cache's byte budget.",
            "gauge",
            |s| s.budget,
        ),
    ];
    for (name, help, kind, pick) in families {
        let rows: Vec<(String, u64)> = prefix.iter().map(|(m, s)| (m.clone(), pick(s))).collect();
        family(&mut out, name, help, kind, &rows);
    }
    out
}

pub(crate) async fn metrics(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let body = render(
        st.admission.queued(),
        st.admission.running(),
        &st.rt.models().prefix_stats(),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::gguf::prefix::PrefixSnapshot;

    #[test]
    fn every_member_gets_a_labelled_line() {
        let s = PrefixSnapshot {
            lookups: 3,
            hits: 2,
            reused_tokens: 48,
            ..Default::default()
        };
        let text = render(1, 2, &[("smol\"lm".into(), s)]);
        assert!(text.contains("tessera_queued_requests 1\n"));
        assert!(text.contains("tessera_running_requests 2\n"));
        assert!(text.contains("tessera_prefix_cache_hits_total{member=\"smol\\\"lm\"} 2\n"));
        assert!(text.contains("tessera_prefix_cache_reused_tokens_total{member=\"smol\\\"lm\"} 48\n"));
        assert!(text.contains("# TYPE tessera_prefix_cache_bytes gauge"));
    }
}

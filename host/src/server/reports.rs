//! `GET /v1/tessera/reports[/{path}]`: evaluation reports for the console.
//!
//! The operator names one directory (`tessera serve --reports DIR`); every
//! folder under it (three levels deep at most) that holds a `report.md`
//! is a report, named by its path relative to the directory
//! (`headline`, `participation/text-strategies`). A report comes back as
//! HTML rendered on the server from its `README.md` (the summary, if the
//! folder has one) and its `report.md`, and its plots (`*.svg` in the same
//! folder) one by one, so that the page can fetch them with the caller's
//! key instead of putting the key in an image URL.
//!
//! Nothing outside the directory is reachable: every path component must
//! be a plain name, symbolic links are not followed out of it, and only
//! `.svg` files and the rendered reports are served. Markdown is rendered
//! with raw HTML escaped (a report's text is data, not markup) and links
//! to anything but relative paths and http(s) dropped.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};
use serde_json::{json, Value};

use super::*;

/// Deepest report folder below the reports directory.
const MAX_DEPTH: usize = 3;
/// Largest Markdown or SVG file served (the headline's report.md is 45 KB).
const MAX_FILE_BYTES: u64 = 8 << 20;

fn no_reports() -> ApiError {
    ApiError::not_found(
        "reports_not_configured",
        "this server shows no evaluation reports: start it with `tessera serve --reports DIR`",
    )
}

/// The reports directory, canonical.
fn root(st: &AppState) -> Result<PathBuf, ApiError> {
    let dir = st.cfg.reports.as_ref().ok_or_else(no_reports)?;
    dir.canonicalize().map_err(|e| {
        ApiError::from(crate::Error::internal(format!(
            "the reports directory {} cannot be read: {e}",
            dir.display()
        )))
    })
}

/// `rel` under `root`, refused unless every component is a plain name and
/// the resolved path (links followed) stays under `root`.
fn resolve_under(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
    let bad = || {
        ApiError::invalid(
            "path",
            &format!("`{rel}` is not a report path: use a name from GET /v1/tessera/reports"),
        )
    };
    let rel_path = Path::new(rel);
    if rel.is_empty() || !rel_path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    let full = root.join(rel_path);
    let canonical = full
        .canonicalize()
        .map_err(|_| ApiError::not_found("report_not_found", &format!("no report or plot `{rel}`")))?;
    if !canonical.starts_with(root) {
        return Err(bad());
    }
    Ok(canonical)
}

fn read_capped(path: &Path) -> Result<String, ApiError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ApiError::from(crate::Error::internal(format!("{}: {e}", path.display()))))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(ApiError::from(crate::Error::internal(format!(
            "{} is {} bytes, more than the {} the console shows",
            path.display(),
            meta.len(),
            MAX_FILE_BYTES
        ))));
    }
    std::fs::read_to_string(path)
        .map_err(|e| ApiError::from(crate::Error::internal(format!("{}: {e}", path.display()))))
}

/// Every folder under `root` with a `report.md`, by relative path.
fn find_reports(root: &Path) -> Vec<(String, PathBuf)> {
    fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(String, PathBuf)>) {
        if dir.join("report.md").is_file() {
            if let Ok(rel) = dir.strip_prefix(root) {
                let name = rel
                    .components()
                    .filter_map(|c| c.as_os_str().to_str())
                    .collect::<Vec<_>>()
                    .join("/");
                if !name.is_empty() {
                    out.push((name, dir.to_path_buf()));
                }
            }
        }
        if depth == MAX_DEPTH {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            // Links are not followed: a report tree cannot point outside.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for d in dirs {
            walk(root, &d, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(root, root, 0, &mut out);
    out
}

/// The first level-1 heading of a Markdown text, as plain text.
fn title_of(md: &str) -> Option<String> {
    md.lines()
        .find_map(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
}

pub(crate) async fn reports_list(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let root = root(&st)?;
    let data: Vec<Value> = tokio::task::spawn_blocking(move || {
        find_reports(&root)
            .into_iter()
            .map(|(name, dir)| {
                let summary = read_capped(&dir.join("README.md")).ok();
                let title = summary.as_deref().and_then(title_of).unwrap_or_else(|| name.clone());
                let modified = std::fs::metadata(dir.join("report.md"))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                json!({ "name": name, "title": title, "modified": modified })
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::from(crate::Error::internal(format!("reports task: {e}"))))?;
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /v1/tessera/reports/{path}`: a report (`{name, summary_html,
/// report_html, plots}`) or, for a path ending in `.svg`, one of its plots.
pub(crate) async fn reports_get(
    State(st): State<Arc<AppState>>,
    UrlPath(path): UrlPath<String>,
) -> Result<Response, ApiError> {
    let root = root(&st)?;
    // Reading and rendering up to 8 MiB of Markdown is blocking work: off
    // the threads that serve every other request.
    tokio::task::spawn_blocking(move || report_at(&root, path))
        .await
        .map_err(|e| ApiError::from(crate::Error::internal(format!("reports task: {e}"))))?
}

/// [`reports_get`]'s answer for `path` under `root`.
fn report_at(root: &Path, path: String) -> Result<Response, ApiError> {
    if path.ends_with(".svg") {
        let file = resolve_under(root, &path)?;
        let svg = read_capped(&file)?;
        return Ok((
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                // The plot is drawn by the page as an image, never as a
                // document: no script in it can run.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'",
                ),
            ],
            svg,
        )
            .into_response());
    }
    let dir = resolve_under(root, &path)?;
    let report = dir.join("report.md");
    if !report.is_file() {
        return Err(ApiError::not_found(
            "report_not_found",
            &format!("no report `{path}` (no report.md there)"),
        ));
    }
    let report_md = read_capped(&report)?;
    let summary_md = match dir.join("README.md") {
        p if p.is_file() => Some(read_capped(&p)?),
        _ => None,
    };
    let mut plots: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.ends_with(".svg"))
                .collect()
        })
        .unwrap_or_default();
    plots.sort();
    Ok(Json(json!({
        "name": path,
        "title": summary_md.as_deref().and_then(title_of).or_else(|| title_of(&report_md)).unwrap_or_else(|| path.clone()),
        "summary_html": summary_md.as_deref().map(markdown_html),
        "report_html": markdown_html(&report_md),
        "plots": plots,
    }))
    .into_response())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Whether a link target may stay a link: relative paths and http(s).
fn safe_link(dest: &str) -> bool {
    let lower = dest.trim().to_ascii_lowercase();
    lower.starts_with("http://")
        || lower.starts_with("https://")
        || lower.starts_with('#')
        || !(lower.contains(':') || lower.starts_with("//"))
}

/// Markdown to HTML for the page: tables on, raw HTML shown as text,
/// unsafe links dropped, and images turned into placeholders
/// (`<img data-plot="NAME">`) that the page fills with the plot it fetched
/// with the caller's key (a plain `src` would be fetched without it).
pub fn markdown_html(md: &str) -> String {
    let mut events: Vec<Event> = Vec::new();
    let mut in_image: Option<(CowStr, String)> = None;
    // For each open link: whether it was dropped (unsafe target).
    let mut links: Vec<bool> = Vec::new();
    for e in Parser::new_ext(md, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH) {
        match e {
            Event::Start(Tag::Image { dest_url, .. }) => in_image = Some((dest_url, String::new())),
            Event::End(TagEnd::Image) => {
                if let Some((dest, alt)) = in_image.take() {
                    let plot = dest.rsplit('/').next().unwrap_or("").to_string();
                    events.push(Event::InlineHtml(CowStr::from(format!(
                        "<img class=\"plot\" data-plot=\"{}\" alt=\"{}\">",
                        escape(&plot),
                        escape(&alt)
                    ))));
                }
            }
            Event::Text(t) if in_image.is_some() => {
                if let Some((_, alt)) = in_image.as_mut() {
                    alt.push_str(&t);
                }
            }
            _ if in_image.is_some() => {}
            Event::Html(h) | Event::InlineHtml(h) => events.push(Event::Text(h)),
            Event::Start(Tag::Link { dest_url, .. }) if !safe_link(&dest_url) => {
                // Kept as emphasised text; its end must match.
                links.push(true);
                events.push(Event::Start(Tag::Emphasis));
            }
            Event::Start(link @ Tag::Link { .. }) => {
                links.push(false);
                events.push(Event::Start(link));
            }
            Event::End(TagEnd::Link) => events.push(Event::End(if links.pop().unwrap_or(false) {
                TagEnd::Emphasis
            } else {
                TagEnd::Link
            })),
            other => events.push(other),
        }
    }
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events.into_iter());
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_rendered_without_markup_from_the_text() {
        let html = markdown_html(
            "# T\n\n| a | b |\n|---|---|\n| 1 | <script>x</script> |\n\n![acc](accuracy.svg)\n\n[bad](javascript:alert(1)) [ok](report.md)",
        );
        assert!(html.contains("<table>"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("data-plot=\"accuracy.svg\" alt=\"acc\""), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(html.contains("<em>bad</em>"), "{html}");
        assert!(html.contains("href=\"report.md\""), "{html}");
    }

    #[test]
    fn paths_must_stay_under_the_root() {
        let root = std::env::temp_dir().join(format!("tessera-reports-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/report.md"), "# r").unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve_under(&root, "a").is_ok());
        for bad in ["../etc", "/etc", "a/../..", ""] {
            assert!(resolve_under(&root, bad).is_err(), "{bad}");
        }
        let found = find_reports(&root);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "a");
        let _ = std::fs::remove_dir_all(&root);
    }
}

//! Writing an eval [`Report`]: `report.json` (the stable, machine-readable
//! schema), `report.md` (a self-contained page with tables and the plots),
//! two SVG plots drawn with plotters, and a table for the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{Report, SystemResult, TaskSummary};

/// The systems in report order: members, best-single, monolith, strategies,
/// dev-chosen.
fn systems(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kind in ["member", "best-single", "monolith", "strategy", "dev-chosen"] {
        for x in r.results.iter().filter(|x| x.kind == kind) {
            if !out.contains(&x.system) {
                out.push(x.system.clone());
            }
        }
    }
    out
}

fn find<'a>(r: &'a Report, system: &str, task: &str) -> Option<&'a SystemResult> {
    r.results.iter().find(|x| x.system == system && x.task == task)
}

/// The system's name, with the member(s) behind `best-single` / `monolith`
/// (the best single member is chosen per task, so it may name several), or
/// the systems `dev-chosen` picked.
fn label(r: &Report, system: &str) -> String {
    let mut members: Vec<String> = Vec::new();
    for x in r.results.iter().filter(|x| x.system == system && x.kind != "member") {
        let behind = match &x.selection {
            Some(sel) => Some(label_of_choice(sel, x.member.as_deref())),
            None => x.member.clone(),
        };
        if let Some(m) = behind {
            if !members.contains(&m) {
                members.push(m);
            }
        }
    }
    if members.is_empty() {
        system.to_string()
    } else {
        format!("{system} ({})", members.join(" / "))
    }
}

/// The strategy with the best macro average (the first of equals, in
/// report order), if any strategy ran.
fn best_strategy(r: &Report) -> Option<String> {
    let overall = |sys: &str| {
        r.macro_avg
            .get(sys)
            .and_then(|m| m.get("overall"))
            .copied()
            .unwrap_or(0.0)
    };
    systems(r)
        .into_iter()
        .filter(|s| r.results.iter().any(|x| &x.system == s && x.kind == "strategy"))
        .fold(None, |best: Option<String>, s| match best {
            Some(b) if overall(&b) >= overall(&s) => Some(b),
            _ => Some(s),
        })
}

/// One line each for how the best strategy compares with the best single
/// member and with the monolith on the macro average: the difference in
/// points, its paired bootstrap 95% interval, and whether the interval
/// clears zero. Empty when no strategy ran.
pub fn verdict(r: &Report) -> Vec<String> {
    match best_strategy(r) {
        Some(best) => against_references(r, &best),
        None => Vec::new(),
    }
}

/// [`verdict`]'s lines for the `dev-chosen` system (see
/// [`super::Selection`]), the one comparison whose choice of system no
/// test item informed. Empty when the run did not ask for it
/// (`--select-folds`).
pub fn dev_chosen_verdict(r: &Report) -> Vec<String> {
    against_references(r, "dev-chosen")
}

/// One line each for how `system` compares with `best-single` and the
/// monolith on the macro average.
fn against_references(r: &Report, system: &str) -> Vec<String> {
    let overall = |sys: &str| {
        r.macro_avg
            .get(sys)
            .and_then(|m| m.get("overall"))
            .copied()
            .unwrap_or(0.0)
    };
    let Some(paired) = r.paired.get(system) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (reference, delta) in [("best-single", &paired.vs_best), ("monolith", &paired.vs_monolith)] {
        let Some(d) = delta else { continue };
        let what = match d.verdict() {
            "above" => "above it",
            "below" => "below it",
            _ => "not separable from it",
        };
        out.push(format!(
            "{} {:.1} vs {} {:.1}: {:+.1} points, paired 95% CI [{:+.1}, {:+.1}] over {} items: {what}",
            label(r, system),
            100.0 * overall(system),
            label(r, reference),
            100.0 * overall(reference),
            100.0 * d.diff,
            100.0 * d.lo,
            100.0 * d.hi,
            d.n
        ));
    }
    out
}

/// A paired difference in points with its interval, or `-`.
fn delta_cell(d: &Option<super::metrics::Delta>) -> String {
    match d {
        Some(d) => format!("{:+.1} [{:+.1}, {:+.1}]", 100.0 * d.diff, 100.0 * d.lo, 100.0 * d.hi),
        None => "-".into(),
    }
}

/// The markdown table of every strategy's paired differences from
/// `best-single` and the monolith, per task and on the macro average.
fn paired_section(s: &mut String, r: &Report) {
    if r.paired.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Strategies against the references (points, paired bootstrap 95% interval)\n\n\
         Each cell is system minus reference over the same test items; an interval that \
         excludes 0 is a difference the items resolve.\n"
    );
    let _ = write!(s, "| system | reference |");
    for t in &r.tasks {
        let _ = write!(s, " {} |", t.name);
    }
    let _ = writeln!(s, " overall (macro) |");
    let _ = writeln!(s, "|---|---|{}---|", "---|".repeat(r.tasks.len()));
    for sys in systems(r).into_iter().filter(|x| r.paired.contains_key(x)) {
        for (reference, pick) in [("best-single", 0), ("monolith", 1)] {
            let _ = write!(s, "| {sys} | {reference} |");
            for t in &r.tasks {
                let cell = find(r, &sys, &t.name).map_or("-".into(), |x| {
                    delta_cell(if pick == 0 { &x.vs_best } else { &x.vs_monolith })
                });
                let _ = write!(s, " {cell} |");
            }
            let p = &r.paired[&sys];
            let _ = writeln!(
                s,
                " {} |",
                delta_cell(if pick == 0 { &p.vs_best } else { &p.vs_monolith })
            );
        }
    }
}

/// The markdown table of what `dev-chosen` picked on each task, with every
/// candidate's cross-validated dev accuracy.
fn selection_section(s: &mut String, r: &Report) {
    let chosen: Vec<(&SystemResult, &super::Selection)> = r
        .results
        .iter()
        .filter_map(|x| Some((x, x.selection.as_ref()?)))
        .collect();
    let Some((_, first)) = chosen.first() else {
        return;
    };
    let _ = writeln!(
        s,
        "\n## What `dev-chosen` picked\n\nPer task, each candidate's accuracy on dev items it was not fitted \
         on ({}-fold cross-validation over the dev split); the highest is chosen, ties going to best-single, \
         and then answers the test items as fitted on the whole dev split.\n\n| task | chosen | dev accuracy, cross-validated |\n|---|---|---|",
        first.folds
    );
    for (x, sel) in chosen {
        let candidates: Vec<String> = sel
            .candidates
            .iter()
            .map(|(sys, acc)| format!("{} {:.1}", sys.trim_start_matches("strategy:"), 100.0 * acc))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            x.task,
            label_of_choice(sel, x.member.as_deref()),
            candidates.join(", ")
        );
    }
}

/// What a `dev-chosen` result is on its task: the strategy's name, or
/// `best-single: <member>`.
fn label_of_choice(sel: &super::Selection, member: Option<&str>) -> String {
    match member {
        Some(m) if sel.chosen == "best-single" => format!("best-single: {m}"),
        _ => sel.chosen.trim_start_matches("strategy:").to_string(),
    }
}

/// The terminal table: accuracy per task, overall macro average, cost.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<40}", "SYSTEM");
    for t in &r.tasks {
        let _ = write!(s, " {:>14}", t.name);
    }
    let _ = writeln!(
        s,
        " {:>8} {:>9} {:>10} {:>9}",
        "OVERALL", "EMERGENT", "TOKENS/IT", "S/ITEM"
    );
    for sys in systems(r) {
        let _ = write!(s, "{:<40}", label(r, &sys));
        let (mut tokens, mut n, mut ms, mut emergent) = (0u64, 0usize, 0u64, Vec::new());
        for t in &r.tasks {
            match find(r, &sys, &t.name) {
                Some(x) => {
                    let _ = write!(s, " {:>14}", format!("{:.1}", 100.0 * x.accuracy));
                    tokens += x.tokens;
                    n += x.n;
                    ms += x.wall_ms;
                    if let Some(e) = x.emergent {
                        emergent.push(e);
                    }
                }
                None => {
                    let _ = write!(s, " {:>14}", "-");
                }
            }
        }
        let overall = r
            .macro_avg
            .get(&sys)
            .and_then(|m| m.get("overall"))
            .copied()
            .unwrap_or(0.0);
        let em = if emergent.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", 100.0 * super::metrics::mean(&emergent))
        };
        let _ = writeln!(
            s,
            " {:>8.1} {:>9} {:>10.0} {:>9.2}",
            100.0 * overall,
            em,
            tokens as f64 / n.max(1) as f64,
            ms as f64 / 1000.0 / n.max(1) as f64
        );
    }
    for line in dev_chosen_verdict(r) {
        let _ = writeln!(s, "chosen on dev: {line}");
    }
    for line in verdict(r) {
        let _ = writeln!(s, "best system: {line}");
    }
    for x in r.results.iter().filter(|x| x.fit_error.is_some()) {
        let _ = writeln!(
            s,
            "fit of {} on {} failed (ran without it): {}",
            x.system,
            x.task,
            x.fit_error.as_deref().unwrap_or_default()
        );
    }
    s
}

/// Why a report could not be written: the directory or a file cannot be
/// written, or a plot failed to render. Both are faults of the machine the
/// report is written on, not of the evaluation, whose answers are already
/// in the cache.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A file or the directory cannot be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A plot failed to render.
    #[error("{}: {message}", path.display())]
    Plot {
        /// The plot's file.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
}

/// Writes `report.json`, `report.md` and the plots into `dir`; returns the
/// paths written.
pub fn write(r: &Report, dir: &Path, command: &str) -> Result<Vec<PathBuf>, WriteError> {
    let io = |path: &Path, source: std::io::Error| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let plotted = |path: &Path, drawn: Result<(), String>| {
        drawn.map_err(|message| WriteError::Plot {
            path: path.to_path_buf(),
            message,
        })
    };
    // Each file replaces its old version whole: a reader never sees half a
    // report, and a report is a record worth an fsync.
    let put = |path: &Path, bytes: &[u8]| {
        crate::files::write_atomic(path, bytes, crate::files::Durability::Durable).map_err(|e| io(path, e))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    let p = dir.join("report.json");
    let json = serde_json::to_string_pretty(r).map_err(|e| io(&p, e.into()))?;
    put(&p, json.as_bytes())?;
    written.push(p);
    let acc_svg = dir.join("accuracy.svg");
    plotted(&acc_svg, plot_accuracy(r, &acc_svg))?;
    written.push(acc_svg);
    let cost_svg = dir.join("cost.svg");
    plotted(&cost_svg, plot_cost(r, &cost_svg))?;
    written.push(cost_svg);
    if !r.scaling.is_empty() {
        let p = dir.join("scaling.svg");
        plotted(&p, plot_scaling(r, &p))?;
        written.push(p);
    }
    let md = markdown(r, command);
    let p = dir.join("report.md");
    put(&p, md.as_bytes())?;
    written.push(p);
    Ok(written)
}

/// A task's best constant answer as a table cell: `30.0 (C)`, or `-`.
fn always_cell(t: &TaskSummary) -> String {
    t.always
        .as_ref()
        .map_or("-".into(), |a| format!("{:.1} ({})", 100.0 * a.share, a.letter))
}

fn markdown(r: &Report, command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Tessera evaluation\n");
    let _ = writeln!(s, "Reproduce with:\n\n```\n{command}\n```\n");
    let _ = writeln!(
        s,
        "Wall time {:.0} s. Pool: {}.\n",
        r.wall_s,
        r.pool.iter().map(|c| c.id.as_str()).collect::<Vec<_>>().join(", ")
    );
    let lines = dev_chosen_verdict(r);
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "**Chosen on dev** (per task, among best-single and every strategy, the one with the best \
             cross-validated dev accuracy; no test item informed the choice):\n"
        );
        for line in lines {
            let _ = writeln!(s, "- {line}");
        }
        s.push('\n');
    }
    let lines = verdict(r);
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "**Best system** (highest macro average; paired bootstrap over the test items, \
             each task resampled on its own):\n"
        );
        for line in lines {
            let _ = writeln!(s, "- {line}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "## Tasks\n\n\"Always\" is the best constant answer on the test items, read off the labels: \
         a reference for letter bias, not a system.\n\n\
         | task | domain | metric | dev items | test items | chance | always |\n|---|---|---|---|---|---|---|"
    );
    for t in &r.tasks {
        let _ = writeln!(
            s,
            "| {} | {} | {:?} | {} | {} | {} | {} |",
            t.name,
            t.domain,
            t.metric,
            t.dev,
            t.test,
            t.chance.map_or("-".into(), |c| format!("{:.1}", 100.0 * c)),
            always_cell(t)
        );
    }
    let _ = writeln!(s, "\n## Accuracy (%, test split, 95% bootstrap interval)\n");
    let _ = write!(s, "| system |");
    for t in &r.tasks {
        let _ = write!(s, " {} |", t.name);
    }
    let _ = writeln!(s, " overall (macro) |");
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(r.tasks.len()));
    for sys in systems(r) {
        let _ = write!(s, "| {} |", label(r, &sys));
        for t in &r.tasks {
            match find(r, &sys, &t.name) {
                Some(x) => {
                    let _ = write!(
                        s,
                        " {:.1} [{:.1}, {:.1}] |",
                        100.0 * x.accuracy,
                        100.0 * x.ci95.0,
                        100.0 * x.ci95.1
                    );
                }
                None => s.push_str(" - |"),
            }
        }
        let overall = r
            .macro_avg
            .get(&sys)
            .and_then(|m| m.get("overall"))
            .copied()
            .unwrap_or(0.0);
        let _ = writeln!(s, " {:.1} |", 100.0 * overall);
    }
    paired_section(&mut s, r);
    selection_section(&mut s, r);
    let _ = writeln!(
        s,
        "\n## Emergent solves and cost (test split)\n\n\"Emergent\" is the share of test items that every single member gets wrong and the system gets right.\n\n| system | task | emergent | all members wrong | host calls / item | tokens / item | s / item | errors |\n|---|---|---|---|---|---|---|---|"
    );
    for x in &r.results {
        let n = x.n.max(1) as f64;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.0} | {:.2} | {} |",
            label(r, &x.system),
            x.task,
            x.emergent.map_or("-".into(), |e| format!("{:.1}%", 100.0 * e)),
            x.all_fail.map_or("-".into(), |a| a.to_string()),
            x.host_calls as f64 / n,
            x.tokens as f64 / n,
            x.wall_ms as f64 / 1000.0 / n,
            x.errors
        );
    }
    if r.results.iter().any(|x| x.top_pick.is_some()) {
        let _ = writeln!(
            s,
            "\n## Answer spread (multiple choice)\n\nThe letter each system named most often and on what share \
             of the test items. A system near 100% answers one letter whatever the question; its accuracy is \
             then that letter's share of the golds (the task's \"always\" is the most any one letter gets).\n\n\
             | system | task | accuracy | most named | share of items | always (task) |\n|---|---|---|---|---|---|"
        );
        for (x, p) in r.results.iter().filter_map(|x| Some((x, x.top_pick.as_ref()?))) {
            let task = r.tasks.iter().find(|t| t.name == x.task);
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {} | {:.0}% | {} |",
                label(r, &x.system),
                x.task,
                100.0 * x.accuracy,
                p.letter,
                100.0 * p.share,
                task.map_or("-".into(), always_cell)
            );
        }
    }
    let failed: Vec<&SystemResult> = r.results.iter().filter(|x| x.fit_error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(
            s,
            "\n## Fits that failed\n\nThese strategies ran without their fitted state.\n"
        );
        for x in failed {
            let _ = writeln!(
                s,
                "- {} on {}: {}",
                label(r, &x.system),
                x.task,
                x.fit_error.as_deref().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Plots\n\n![accuracy by system](accuracy.svg)\n\n![accuracy vs cost](cost.svg)\n"
    );
    if !r.scaling.is_empty() {
        let pools = sub_pools(&r.scaling, &r.tasks);
        let _ = writeln!(
            s,
            "## Scaling (sub-pools)\n\n![accuracy vs pool size](scaling.svg)\n\n\
             Each sub-pool's accuracy is its macro average (tasks within a domain, then domains, as in the accuracy table); the same sub-pools \
             serve every task. \"Its best single\" is the sub-pool's member that dev picks, per task.\n\n\
             | system | pool size | sub-pools | accuracy, mean [min, max] | its best single, mean | mean gain over it |\n\
             |---|---|---|---|---|---|"
        );
        for row in by_size(&pools, false) {
            let _ = writeln!(s, "{row}");
        }
        let _ = writeln!(
            s,
            "\n| system | pool size | members | architectures | accuracy | its best single |\n|---|---|---|---|---|---|"
        );
        for p in &pools {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {:.1} |",
                p.system,
                p.members.len(),
                p.members.join(", "),
                p.diversity,
                100.0 * p.accuracy,
                100.0 * p.best_single
            );
        }
        s.push('\n');
    }
    if !r.diversity.is_empty() {
        let pools = sub_pools(&r.diversity, &r.tasks);
        let _ = writeln!(
            s,
            "## Diversity at equal pool size\n\nSub-pools of one size that draw on one, two or more \
             architectures (in a pool of fine-tunes of the packaged bases, each architecture is one \
             base's lineage), several drawn per level; accuracy is the macro average (tasks within a domain, then domains).\n\n\
             | system | pool size | architectures | sub-pools | accuracy, mean [min, max] | its best single, mean | mean gain over it |\n\
             |---|---|---|---|---|---|---|"
        );
        for row in by_size(&pools, true) {
            let _ = writeln!(s, "{row}");
        }
        let _ = writeln!(
            s,
            "\n| system | pool size | members | architectures | accuracy | its best single |\n|---|---|---|---|---|---|"
        );
        for p in &pools {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {:.1} |",
                p.system,
                p.members.len(),
                p.members.join(", "),
                p.diversity,
                100.0 * p.accuracy,
                100.0 * p.best_single
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Terminal table\n\n```\n{}```", table(r));
    s
}

/// One strategy on one sub-pool, its accuracy and its best single's
/// macro-averaged over the tasks it ran on with the weights `overall`
/// uses (tasks averaged within a domain, then domains), so that the
/// full-pool row of a sweep reads the same figure as the accuracy table.
fn sub_pools(points: &[super::ScalingPoint], tasks: &[TaskSummary]) -> Vec<super::ScalingPoint> {
    let domain_of = |task: &str| {
        tasks
            .iter()
            .find(|t| t.name == task)
            .map_or_else(|| task.to_string(), |t| t.domain.clone())
    };
    // (representative point, domain -> (sum of accuracy, sum of best single, tasks)).
    type Acc = (super::ScalingPoint, BTreeMap<String, (f64, f64, usize)>);
    let mut out: Vec<Acc> = Vec::new();
    for p in points {
        let i = match out
            .iter()
            .position(|(q, _)| q.system == p.system && q.members == p.members)
        {
            Some(i) => i,
            None => {
                let mut q = p.clone();
                q.task = "macro".into();
                out.push((q, BTreeMap::new()));
                out.len() - 1
            }
        };
        let e = out[i].1.entry(domain_of(&p.task)).or_insert((0.0, 0.0, 0));
        e.0 += p.accuracy;
        e.1 += p.best_single;
        e.2 += 1;
    }
    out.into_iter()
        .map(|(mut q, domains)| {
            let n = domains.len().max(1) as f64;
            q.accuracy = domains.values().map(|(a, _, k)| a / *k as f64).sum::<f64>() / n;
            q.best_single = domains.values().map(|(_, b, k)| b / *k as f64).sum::<f64>() / n;
            q
        })
        .collect()
}

/// Table rows summarising `pools` per system and size (and diversity
/// level, with `by_level`): how many sub-pools, their accuracy's mean and
/// range, their best singles' mean, and the mean of (accuracy - best
/// single).
fn by_size(pools: &[super::ScalingPoint], by_level: bool) -> Vec<String> {
    // (system, size, level) and the sub-pools in it.
    type Group<'a> = ((String, usize, usize), Vec<&'a super::ScalingPoint>);
    let mut groups: Vec<Group> = Vec::new();
    for p in pools {
        let k = (
            p.system.clone(),
            p.members.len(),
            if by_level { p.diversity } else { 0 },
        );
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(p),
            None => groups.push((k, vec![p])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups
        .into_iter()
        .map(|((system, size, level), ps)| {
            let acc: Vec<f64> = ps.iter().map(|p| 100.0 * p.accuracy).collect();
            let best: Vec<f64> = ps.iter().map(|p| 100.0 * p.best_single).collect();
            let gain: Vec<f64> = acc.iter().zip(&best).map(|(a, b)| a - b).collect();
            let lo = acc.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let level = if by_level { format!(" {level} |") } else { String::new() };
            format!(
                "| {system} | {size} |{level} {} | {:.1} [{lo:.1}, {hi:.1}] | {:.1} | {:+.1} |",
                ps.len(),
                super::metrics::mean(&acc),
                super::metrics::mean(&best),
                super::metrics::mean(&gain)
            )
        })
        .collect()
}

fn plot_accuracy(r: &Report, path: &Path) -> Result<(), String> {
    let sys = systems(r);
    let overall: Vec<f64> = sys
        .iter()
        .map(|s| {
            100.0
                * r.macro_avg
                    .get(s)
                    .and_then(|m| m.get("overall"))
                    .copied()
                    .unwrap_or(0.0)
        })
        .collect();
    let height = 80 + 28 * sys.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Accuracy by system (macro average over tasks, %)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..100.0, 0..sys.len())
        .map_err(|e| e.to_string())?;
    let labels: Vec<String> = sys.iter().map(|s| label(r, s)).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(sys.len() + 1)
        .y_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(overall.iter().enumerate().map(|(i, v)| {
            let kind = r.results.iter().find(|x| x.system == sys[i]).map(|x| x.kind.as_str());
            let color = match kind {
                Some("strategy") | Some("dev-chosen") => RGBColor(31, 119, 180),
                Some("best-single") | Some("monolith") => RGBColor(255, 127, 14),
                _ => RGBColor(150, 150, 150),
            };
            Rectangle::new([(0.0, i), (*v, i + 1)], color.filled())
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn plot_cost(r: &Report, path: &Path) -> Result<(), String> {
    let sys = systems(r);
    let points: Vec<(f64, f64, String)> = sys
        .iter()
        .map(|s| {
            let rs: Vec<&SystemResult> = r.results.iter().filter(|x| &x.system == s).collect();
            let n: usize = rs.iter().map(|x| x.n).sum();
            let tokens: u64 = rs.iter().map(|x| x.tokens).sum();
            let acc = 100.0
                * r.macro_avg
                    .get(s)
                    .and_then(|m| m.get("overall"))
                    .copied()
                    .unwrap_or(0.0);
            (tokens as f64 / n.max(1) as f64, acc, label(r, s))
        })
        .collect();
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Accuracy vs cost", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_x, 0.0..100.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("tokens per item (prompt + generated)")
        .y_desc("macro accuracy, %")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(points.iter().map(|(x, y, l)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 5, BLUE.filled())
                + Text::new(l.clone(), (8, -8), ("sans-serif", 12))
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Mean accuracy over sub-pools (and tasks) of each size, per strategy.
fn plot_scaling(r: &Report, path: &Path) -> Result<(), String> {
    let pools = sub_pools(&r.scaling, &r.tasks);
    let mut systems: Vec<String> = pools.iter().map(|p| p.system.clone()).collect();
    systems.sort();
    systems.dedup();
    let max_size = pools.iter().map(|p| p.members.len()).max().unwrap_or(1);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Accuracy vs pool size (macro average; mean, min and max over sub-pools)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5..(max_size as f64 + 0.5), 0.0..100.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("members in the pool")
        .y_desc("accuracy, %")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, sys) in systems.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // (size, mean, min, max) of the system, and of its sub-pools' best singles.
        let stats = |pick: &dyn Fn(&super::ScalingPoint) -> f64| -> Vec<(f64, f64, f64, f64)> {
            (1..=max_size)
                .filter_map(|k| {
                    let xs: Vec<f64> = pools
                        .iter()
                        .filter(|p| &p.system == sys && p.members.len() == k)
                        .map(|p| 100.0 * pick(p))
                        .collect();
                    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (!xs.is_empty()).then(|| (k as f64, super::metrics::mean(&xs), lo, hi))
                })
                .collect()
        };
        let own = stats(&|p| p.accuracy);
        let best = stats(&|p| p.best_single);
        let line: Vec<(f64, f64)> = own.iter().map(|&(k, m, _, _)| (k, m)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(sys.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                own.iter()
                    .map(|&(k, m, lo, hi)| ErrorBar::new_vertical(k, lo, m, hi, color.filled(), 6)),
            )
            .map_err(|e| e.to_string())?;
        let faint = color.mix(0.5);
        chart
            .draw_series(DashedLineSeries::new(
                best.iter().map(|&(k, m, _, _)| (k, m)),
                6,
                4,
                faint.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{sys}: its sub-pools' best single"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], faint));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::{ScalingPoint, TaskSummary};
    use super::sub_pools;
    use crate::tasks::Metric;

    fn task(name: &str, domain: &str) -> TaskSummary {
        TaskSummary {
            name: name.into(),
            domain: domain.into(),
            metric: Metric::Choice,
            dev: 1,
            test: 1,
            chance: None,
            always: None,
        }
    }

    fn point(task: &str, accuracy: f64) -> ScalingPoint {
        ScalingPoint {
            system: "strategy:s".into(),
            task: task.into(),
            members: vec!["a".into(), "b".into()],
            diversity: 1,
            accuracy,
            best_single: accuracy / 2.0,
        }
    }

    /// Two science tasks and one reading task: the sub-pool's figure is the
    /// mean of the science mean and the reading task, as `overall` is.
    #[test]
    fn sub_pools_weigh_tasks_like_the_macro_average() {
        let tasks = [task("x", "science"), task("y", "science"), task("z", "reading")];
        let pools = sub_pools(&[point("x", 0.2), point("y", 0.4), point("z", 0.9)], &tasks);
        assert_eq!(pools.len(), 1);
        assert!((pools[0].accuracy - 0.6).abs() < 1e-12, "{}", pools[0].accuracy);
        assert!((pools[0].best_single - 0.3).abs() < 1e-12);
        assert_eq!(pools[0].task, "macro");
    }
}

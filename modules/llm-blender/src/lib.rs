//! llm-blender: every generative member answers; a ranker member judges every
//! unordered pair of answers ("which is better, A or B?"); the answers are
//! ranked by pairwise points and a fuser member rewrites the top `top_k` into
//! one final answer. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{evaluate, ranking, MemberScore};
use tessera_sdk::*;

struct LlmBlender;

/// Version of the persisted [`FitState`].
const STATE_VERSION: u8 = 1;

/// Longest stretch of one candidate shown to the ranker or the fuser, in
/// characters; longer answers are cut (and marked) to keep prompts short.
const SHOWN_CHARS: usize = 1500;

/// What `fit` learns: each member's dev results, and the ranking they give.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FitState {
    ranking: Vec<String>,
    scores: Vec<MemberScore>,
}

/// The ranker's verdict on one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The response shown as A is better.
    A,
    /// The response shown as B is better.
    B,
    /// The reply calls it even.
    Tie,
    /// The reply names no winner.
    Unclear,
}

/// Hyperparameters of one request, validated.
struct Settings {
    top_k: usize,
    max_tokens: u32,
    judge_max_tokens: u32,
}

fn settings(cfg: &Config) -> Result<Settings, Error> {
    let top_k: usize = cfg.parse("top_k", 3)?;
    if !(1..=16).contains(&top_k) {
        return Err(Error::InvalidParams(format!("config `top_k` = {top_k}: use 1..=16")));
    }
    let max_tokens: u32 = cfg.parse("max_tokens", 256)?;
    if !(1..=4096).contains(&max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `max_tokens` = {max_tokens}: use 1..=4096"
        )));
    }
    let judge_max_tokens: u32 = cfg.parse("judge_max_tokens", 8)?;
    if !(1..=256).contains(&judge_max_tokens) {
        return Err(Error::InvalidParams(format!(
            "config `judge_max_tokens` = {judge_max_tokens}: use 1..=256"
        )));
    }
    Ok(Settings {
        top_k,
        max_tokens,
        judge_max_tokens,
    })
}

/// `text` cut to [`SHOWN_CHARS`] characters on a character boundary.
fn shown(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{} [...]", &t[..cut]),
        None => t.to_string(),
    }
}

/// `input` with `preamble` put before the last user turn (or the raw
/// prompt), so that the original question and its instructions come last.
fn with_preamble(input: &Input, preamble: &str) -> Input {
    match input {
        Input::Prompt(p) => Input::Prompt(format!("{preamble}\n\n{p}")),
        Input::Chat(msgs) => {
            let mut msgs = msgs.clone();
            match msgs.iter_mut().rev().find(|m| m.role == "user") {
                Some(m) => m.content = format!("{preamble}\n\n{}", m.content),
                None => msgs.push(Message {
                    role: "user".into(),
                    content: preamble.to_string(),
                }),
            }
            Input::Chat(msgs)
        }
    }
}

/// Words that say the two responses are even.
const TIE_WORDS: [&str; 7] = ["tie", "tied", "equal", "equally", "both", "neither", "same"];

/// Words that mark the next token as a response label ("response B").
const LABEL_WORDS: [&str; 6] = ["response", "answer", "assistant", "option", "candidate", "output"];

/// Words after a leading capital "A" that make it a verdict ("A is better")
/// rather than the article ("A good answer ...").
const VERDICT_VERBS: [&str; 12] = [
    "is", "was", "wins", "seems", "better", "because", "since", "provides", "gives", "answers", "has", "does",
];

/// Reads the ranker's reply. A reply that starts with the label (`A`, `B.`,
/// `(B)`, `**A**`) decides; otherwise every mention of a label is collected
/// ("Response B", "answer a", a standalone capital `B`, "the first one"): one
/// label mentioned decides, a tie word ("tie", "equal", "both", ...) with no
/// single label gives a tie, anything else (both labels, nothing) is unclear.
fn verdict(reply: &str) -> Verdict {
    // Words with their original spelling, punctuation dropped.
    let words: Vec<&str> = reply
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let label = |w: &str| match w {
        "A" | "a" => Some(Verdict::A),
        "B" | "b" => Some(Verdict::B),
        _ => None,
    };
    // A leading label decides, unless a leading "A" reads as the article.
    if let Some(first) = words.first() {
        if let Some(v) = label(first) {
            let next = lower.get(1).map(String::as_str);
            let article = *first == "A" && next.is_some_and(|n| !VERDICT_VERBS.contains(&n) && label(n).is_none());
            let lowercase_article = *first == "a" && next.is_some();
            if !article && !lowercase_article {
                return v;
            }
        }
    }
    let mut mentions = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let after_label = i > 0 && LABEL_WORDS.contains(&lower[i - 1].as_str());
        match *w {
            "A" | "B" if i > 0 => mentions.extend(label(w)),
            "a" | "b" if after_label => mentions.extend(label(w)),
            _ => {}
        }
        let ordinal_follows = lower
            .get(i + 1)
            .is_some_and(|n| n == "one" || LABEL_WORDS.contains(&n.as_str()));
        match lower[i].as_str() {
            "first" if ordinal_follows => mentions.push(Verdict::A),
            "second" if ordinal_follows => mentions.push(Verdict::B),
            _ => {}
        }
    }
    let has = |v: Verdict| mentions.contains(&v);
    let tie_word = lower.iter().any(|w| TIE_WORDS.contains(&w.as_str()));
    match (has(Verdict::A), has(Verdict::B)) {
        (true, false) if !tie_word => Verdict::A,
        (false, true) if !tie_word => Verdict::B,
        _ if tie_word => Verdict::Tie,
        _ => Verdict::Unclear,
    }
}

/// Points each side of a pair gets for a verdict: a win is 1, a tie or an
/// unclear verdict 0.5 each.
fn points(v: Verdict) -> (f64, f64) {
    match v {
        Verdict::A => (1.0, 0.0),
        Verdict::B => (0.0, 1.0),
        Verdict::Tie | Verdict::Unclear => (0.5, 0.5),
    }
}

/// Indices of `points` best first: most points, then better dev rank
/// (`dev_rank`, lower is better), then earlier in the pool.
fn order(points: &[f64], dev_rank: &[usize]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len()).collect();
    idx.sort_by(|&a, &b| {
        points[b]
            .total_cmp(&points[a])
            .then(dev_rank[a].cmp(&dev_rank[b]))
            .then(a.cmp(&b))
    });
    idx
}

/// Looks up a configured member (`key`) among the generative members; an
/// unset or empty value means "choose automatically".
fn configured(cfg: &Config, key: &str, members: &[ModelInfo]) -> Result<Option<ModelInfo>, Error> {
    match cfg.get(key).map(str::trim).filter(|id| !id.is_empty()) {
        None => Ok(None),
        Some(id) => {
            members.iter().find(|m| m.id == id).cloned().map(Some).ok_or_else(|| {
                Error::InvalidParams(format!("config `{key}` = `{id}` is not a granted generative member"))
            })
        }
    }
}

fn fmt_points(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p:.1}")
    }
}

/// Picks the ranker: the member set by config `ranker`, else the best dev
/// member from `fit`, else the first generative member in pool order. The
/// trace says which rule chose it, since every point in the ranking comes
/// from this one member's judgement.
fn choose_ranker(cfg: &Config, members: &[ModelInfo], fitted: Option<&FitState>) -> Result<ModelInfo, Error> {
    if let Some(m) = configured(cfg, "ranker", members)? {
        trace(Some(&m.id), "ranker", "ranker set by config `ranker`");
        return Ok(m);
    }
    let m = dev::best_member(fitted.map(|f| f.ranking.as_slice()), members)?;
    let why = match fitted {
        Some(f) => {
            let acc = f.scores.iter().find(|s| s.model == m.id).map(|s| s.accuracy());
            format!(
                "ranker is the best dev member (accuracy {:.2}); dev ranking: {}",
                acc.unwrap_or(0.0),
                f.ranking.join(", ")
            )
        }
        None => "no fit state: ranker is the first generative member in pool order".into(),
    };
    trace(Some(&m.id), "ranker", why);
    Ok(m)
}

/// Step 1: every member answers the request, all in one fan-out, each with
/// its own seed `seed + i`. A member that fails is traced and left out of
/// the ranking; only a pool where nobody answered is an error.
fn propose(req: &Request, members: &[ModelInfo], s: &Settings, seed: u64) -> Result<Vec<Candidate>, Error> {
    let jobs: Vec<Job> = members
        .iter()
        .enumerate()
        .map(|(i, m)| Job {
            model: m.id.clone(),
            input: req.input.clone(),
            params: GenParams {
                max_tokens: Some(s.max_tokens),
                seed: Some(seed.wrapping_add(i as u64)),
                ..req.params.clone()
            },
        })
        .collect();
    let mut cands = Vec::new();
    for (m, r) in members.iter().zip(fan_out(&jobs)) {
        match r {
            Ok(g) => {
                trace(
                    Some(&m.id),
                    "proposer",
                    format!("answered ({} tokens)", g.usage.completion_tokens),
                );
                cands.push(Candidate {
                    model: m.id.clone(),
                    text: g.text,
                });
            }
            Err(e) => trace(
                Some(&m.id),
                "proposer",
                format!("failed ({e}); left out of the ranking"),
            ),
        }
    }
    if cands.is_empty() {
        return Err(Error::ModuleFailed("no member produced an answer".into()));
    }
    Ok(cands)
}

/// Every unordered pair of `n` candidates once, as (shown as A, shown as B).
/// Which one is shown first alternates from pair to pair, to spread the
/// position bias of small judges over all candidates.
fn pairings(n: usize) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            pairs.push(if pairs.len().is_multiple_of(2) { (i, j) } else { (j, i) });
        }
    }
    pairs
}

/// Step 2: the ranker judges each of `pairs`, all in one fan-out, greedily
/// and with a short reply, and each candidate collects the points of its
/// verdicts (see [`points`]). Returns the points per candidate.
fn judge_pairs(
    input: &Input,
    ranker: &ModelInfo,
    cands: &[Candidate],
    pairs: &[(usize, usize)],
    s: &Settings,
    seed: u64,
) -> Vec<f64> {
    let q = question(input);
    let jobs: Vec<Job> = pairs
        .iter()
        .enumerate()
        .map(|(p, &(a, b))| Job {
            model: ranker.id.clone(),
            input: user(format!(
                "You judge two responses to a question.\n\nQuestion:\n{q}\n\nResponse A:\n{}\n\nResponse B:\n{}\n\nWhich response is better, A or B? Reply with one letter.",
                shown(&cands[a].text),
                shown(&cands[b].text)
            )),
            params: GenParams {
                max_tokens: Some(s.judge_max_tokens),
                temperature: Some(0.0),
                seed: Some(seed.wrapping_add(1000 + p as u64)),
                ..Default::default()
            },
        })
        .collect();
    // A single candidate leaves nothing to judge: no host call at all.
    let results = if jobs.is_empty() { Vec::new() } else { fan_out(&jobs) };
    let mut score = vec![0.0f64; cands.len()];
    for (&(a, b), r) in pairs.iter().zip(results) {
        let (v, reply) = match r {
            Ok(g) => (verdict(&g.text), format!("replied `{}`", g.text.trim())),
            Err(e) => (Verdict::Unclear, format!("failed ({e})")),
        };
        let (pa, pb) = points(v);
        score[a] += pa;
        score[b] += pb;
        let outcome = match v {
            Verdict::A => format!("{} wins", cands[a].model),
            Verdict::B => format!("{} wins", cands[b].model),
            Verdict::Tie => "tie: 0.5 each".to_string(),
            Verdict::Unclear => "no clear verdict: 0.5 each".to_string(),
        };
        trace(
            Some(&ranker.id),
            "judge",
            format!("A = {} vs B = {}: {reply}; {outcome}", cands[a].model, cands[b].model),
        );
    }
    score
}

/// Each candidate's position in the dev ranking from `fit` (lower is
/// better), `usize::MAX` when unranked: the tie-break for equal points.
fn dev_ranks(cands: &[Candidate], dev_ranking: Option<&[String]>) -> Vec<usize> {
    cands
        .iter()
        .map(|c| {
            dev_ranking
                .and_then(|r| r.iter().position(|id| *id == c.model))
                .unwrap_or(usize::MAX)
        })
        .collect()
}

/// `id=points` for each candidate in `ranked` order, for the trace and the
/// `points` annotation.
fn points_in_rank_order(cands: &[Candidate], score: &[f64], ranked: &[usize]) -> Vec<String> {
    ranked
        .iter()
        .map(|&i| format!("{}={}", cands[i].model, fmt_points(score[i])))
        .collect()
}

/// The annotations every response carries, whether fused or not: how the
/// candidates ranked, who ranked them, and which ones went to the fuser.
fn ranking_annotations(
    cands: &[Candidate],
    ranked: &[usize],
    shown_points: &[String],
    ranker: &ModelInfo,
    judge_calls: usize,
    top: &[usize],
) -> Vec<(String, String)> {
    let ids = |idx: &[usize]| idx.iter().map(|&i| cands[i].model.clone()).collect::<Vec<_>>();
    vec![
        ("points".to_string(), shown_points.join("; ")),
        ("ranking".to_string(), ids(ranked).join(", ")),
        ("ranker".to_string(), ranker.id.clone()),
        ("judge_calls".to_string(), judge_calls.to_string()),
        ("top".to_string(), ids(top).join(", ")),
    ]
}

/// `winner`'s own answer as the response, marked as not fused.
fn unfused(winner: &Candidate, mut annotations: Vec<(String, String)>) -> Response {
    annotations.push(("fused".into(), "false".into()));
    annotations.push(("winner".into(), winner.model.clone()));
    Response {
        text: winner.text.clone(),
        annotations,
    }
}

/// Step 3: the fuser reads the `top` candidates (best first) and writes one
/// final answer. The candidates go before the original question (see
/// [`with_preamble`]) so that the question and its instructions come last.
/// A failed fusion returns the winner unfused: the ranking already chose it.
fn fuse(
    req: &Request,
    s: &Settings,
    seed: u64,
    fuser: &ModelInfo,
    cands: &[Candidate],
    top: &[usize],
    mut annotations: Vec<(String, String)>,
) -> Response {
    let mut preamble = String::from(
        "Here are candidate responses to the question below, best first. Write one final response that keeps what they get right and fixes their mistakes. Reply with the final response only.\n",
    );
    for (r, &i) in top.iter().enumerate() {
        preamble.push_str(&format!("\nCandidate {}:\n{}\n", r + 1, shown(&cands[i].text)));
    }
    preamble.push_str("\nQuestion:");
    let fuse_params = GenParams {
        max_tokens: Some(s.max_tokens),
        seed: Some(seed.wrapping_add(2000)),
        ..req.params.clone()
    };
    annotations.push(("fuser".into(), fuser.id.clone()));
    match generate(&fuser.id, &with_preamble(&req.input, &preamble), &fuse_params) {
        Ok(g) => {
            trace(
                Some(&fuser.id),
                "fuser",
                format!(
                    "fused the top {}: {}",
                    top.len(),
                    top.iter()
                        .map(|&i| cands[i].model.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            annotations.push(("fused".into(), "true".into()));
            Response {
                text: g.text,
                annotations,
            }
        }
        Err(e) => {
            let winner = &cands[top[0]];
            trace(
                Some(&fuser.id),
                "fuser",
                format!("fusion failed ({e}); returning the winner {}", winner.model),
            );
            unfused(winner, annotations)
        }
    }
}

impl Strategy for LlmBlender {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let s = settings(&cfg)?;
        let members = generators();
        if members.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let fitted: Option<FitState> = state::load(STATE_VERSION, req.state.as_deref())?;
        let ranker = choose_ranker(&cfg, &members, fitted.as_ref())?;
        let fuser = configured(&cfg, "fuser", &members)?.unwrap_or_else(|| ranker.clone());
        let seed = req.params.seed.unwrap_or(0);

        // 1. Every member answers.
        let cands = propose(&req, &members, &s, seed)?;

        // 2. The ranker judges every pair; points rank the answers, dev rank
        // breaking ties.
        let pairs = pairings(cands.len());
        let score = judge_pairs(&req.input, &ranker, &cands, &pairs, &s, seed);
        let dev_ranking = fitted.as_ref().map(|f| f.ranking.as_slice());
        let ranked = order(&score, &dev_ranks(&cands, dev_ranking));
        let shown_points = points_in_rank_order(&cands, &score, &ranked);
        trace(
            Some(&ranker.id),
            "ranker",
            format!("ranking by pairwise points: {}", shown_points.join(", ")),
        );

        // 3. The fuser rewrites the top k, unless there is only one.
        let top = &ranked[..s.top_k.min(cands.len())];
        let annotations = ranking_annotations(&cands, &ranked, &shown_points, &ranker, pairs.len(), top);
        if let [w] = *top {
            let why = if s.top_k == 1 {
                "top_k = 1: the winner's answer is returned unfused"
            } else {
                "only one answer to fuse: returned unfused"
            };
            trace(Some(&cands[w].model), "fuser", why);
            return Ok(unfused(&cands[w], annotations));
        }
        Ok(fuse(&req, &s, seed, &fuser, &cands, top, annotations))
    }

    /// Scores every member greedily on the dev examples and keeps the
    /// ranking: the best dev member ranks and fuses, and dev rank breaks
    /// ties in points.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
        settings(&config)?;
        let fit_max_tokens: u32 = config.parse("fit_max_tokens", 32)?;
        if !(1..=4096).contains(&fit_max_tokens) {
            return Err(Error::InvalidParams(format!(
                "config `fit_max_tokens` = {fit_max_tokens}: use 1..=4096"
            )));
        }
        if dev.is_empty() {
            return Err(Error::InvalidParams("fit needs at least one dev example".into()));
        }
        let members = generators();
        let scores = evaluate(&dev, &members, fit_max_tokens);
        let st = FitState {
            ranking: ranking(&scores),
            scores,
        };
        trace(None, "fit", format!("dev ranking: {}", st.ranking.join(", ")));
        state::save(STATE_VERSION, &st).map(Some)
    }
}

export_strategy!(LlmBlender);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_verdicts() {
        use Verdict::*;
        for (reply, want) in [
            ("A", A),
            ("B", B),
            (" b.", B),
            ("(B)", B),
            ("**A**", A),
            ("A is better.", A),
            ("B, because it is correct", B),
            ("Response B", B),
            ("Response B is better than response a", Unclear),
            ("The better one is response A.", A),
            ("I think B", B),
            ("The first response is better", A),
            ("the second one", B),
            ("Tie", Tie),
            ("Both are equally good", Tie),
            ("A good answer would need more detail", Unclear),
            ("a good answer", Unclear),
            ("", Unclear),
            ("I cannot decide", Unclear),
            ("A and B are the same", Tie),
        ] {
            assert_eq!(verdict(reply), want, "{reply:?}");
        }
    }

    #[test]
    fn points_sum_to_one_per_pair_and_order_breaks_ties() {
        for v in [Verdict::A, Verdict::B, Verdict::Tie, Verdict::Unclear] {
            let (a, b) = points(v);
            assert_eq!(a + b, 1.0);
        }
        // Equal points: the better dev rank first, then pool order.
        assert_eq!(order(&[1.0, 1.0, 1.0], &[2, 0, 1]), vec![1, 2, 0]);
        assert_eq!(order(&[0.5, 2.0, 0.5], &[usize::MAX; 3]), vec![1, 0, 2]);
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(SHOWN_CHARS + 10);
        assert!(shown(&long).ends_with("[...]"));
        assert_eq!(shown(" short "), "short");
    }
}

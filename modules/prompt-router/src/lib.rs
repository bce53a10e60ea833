//! prompt-router: a router member (the best dev member after `fit`) reads
//! the question and the numbered member descriptions and names who should
//! answer; that member answers. A reply with no usable choice falls back to
//! the best dev member. See README.md.

use serde::{Deserialize, Serialize};
use tessera_sdk::dev::{best_member, evaluate, ranking, MemberScore};
use tessera_sdk::*;

struct PromptRouter;

/// Version of the persisted [`FitState`].
const STATE_VERSION: u8 = 1;

/// What `fit` learns: each member's dev results and the ranking they give.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FitState {
    ranking: Vec<String>,
    scores: Vec<MemberScore>,
}

impl FitState {
    /// `id k/N, ...` in ranking order.
    fn describe(&self) -> String {
        self.ranking
            .iter()
            .map(|id| match self.scores.iter().find(|s| &s.model == id) {
                Some(s) => format!("{id} {}/{}", s.correct.iter().filter(|c| **c).count(), s.correct.len()),
                None => id.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Number words a router may spell out instead of writing the digit.
const NUMBER_WORDS: [&str; 10] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// The member (0-based) a routing reply picks among `n` numbered members
/// whose ids are `ids`:
/// 1. a reply naming exactly one member id (case-insensitive) picks it;
/// 2. else the first whole number (not part of a member id or a decimal
///    such as `2.5`) that is a valid 1-based member number, scanning every
///    number in order (`#2`, `Assistant 3.`, `I pick 7, no, 1` all work);
/// 3. else the first spelled-out number word (`two`) that is valid.
///
/// `None` when nothing valid is found.
fn parse_choice(reply: &str, n: usize, ids: &[&str]) -> Option<usize> {
    let lower = reply.to_lowercase();
    let named: Vec<usize> = (0..ids.len().min(n))
        .filter(|&i| !ids[i].is_empty() && lower.contains(&ids[i].to_lowercase()))
        .collect();
    if let [only] = named.as_slice() {
        return Some(*only);
    }
    // Blank out member ids so their digits do not read as member numbers.
    let mut text = lower.clone();
    for id in ids {
        if !id.is_empty() {
            text = text.replace(&id.to_lowercase(), " ");
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i].is_ascii_digit() {
            i += 1;
        }
        let glued_before = start > 0 && (chars[start - 1].is_alphabetic() || chars[start - 1] == '.');
        let decimal = i + 1 < chars.len() && chars[i] == '.' && chars[i + 1].is_ascii_digit();
        if glued_before || decimal || i - start > 3 {
            continue;
        }
        let num: String = chars[start..i].iter().collect();
        if let Ok(k) = num.parse::<usize>() {
            if (1..=n).contains(&k) {
                return Some(k - 1);
            }
        }
    }
    text.split(|c: char| !c.is_alphanumeric())
        .filter_map(|w| NUMBER_WORDS.iter().position(|nw| *nw == w))
        .find(|&k| k < n)
}

impl Strategy for PromptRouter {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::from_pairs(req.config.clone());
        let router_max_tokens: u32 = cfg.parse("router_max_tokens", 8)?;
        if !(1..=256).contains(&router_max_tokens) {
            return Err(Error::InvalidParams(format!(
                "config `router_max_tokens` = {router_max_tokens}: use 1..=256"
            )));
        }
        let members = generators();
        if members.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        let fitted: Option<FitState> = state::load(STATE_VERSION, req.state.as_deref())?;
        // The fallback is the best dev member (without fit: the first member
        // in pool order, as operators list pools best-first).
        let best = best_member(fitted.as_ref().map(|f| f.ranking.as_slice()), &members)?;
        let best = members.iter().position(|m| m.id == best.id).unwrap_or(0);
        let (router, why) = match cfg.get("router").map(str::trim).filter(|r| !r.is_empty()) {
            Some(id) => {
                let i = members.iter().position(|m| m.id == id).ok_or_else(|| {
                    Error::InvalidParams(format!("config `router` = `{id}` is not a granted generative member"))
                })?;
                (i, "set by config `router`".to_string())
            }
            None => match &fitted {
                Some(f) => (best, format!("best dev member; dev ranking: {}", f.describe())),
                None => (best, "no fit state: first generative member in pool order".to_string()),
            },
        };
        let q = question(&req.input);
        let mut listing = String::new();
        for (i, m) in members.iter().enumerate() {
            listing.push_str(&format!("{}. {}: {}\n", i + 1, m.id, m.description));
        }
        let ask = format!(
            "Pick the assistant best suited to answer the question.\n\nQuestion: {q}\n\nAssistants:\n{listing}\nReply with the assistant's number only."
        );
        let route_params = GenParams {
            max_tokens: Some(router_max_tokens),
            temperature: Some(0.0),
            seed: Some(req.params.seed.unwrap_or(0)),
            ..Default::default()
        };
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let router_id = members[router].id.clone();
        let (chosen, fell_back) = match generate(&router_id, &user(ask), &route_params) {
            Ok(g) => match parse_choice(&g.text, members.len(), &ids) {
                Some(i) => {
                    trace(
                        Some(&router_id),
                        "router",
                        format!("router ({why}) replied `{}`: chose {}", g.text.trim(), members[i].id),
                    );
                    (i, false)
                }
                None => {
                    trace(
                        Some(&router_id),
                        "router",
                        format!(
                            "router ({why}) replied `{}`: no valid member number, falling back to the best dev member {}",
                            g.text.trim(),
                            members[best].id
                        ),
                    );
                    (best, true)
                }
            },
            Err(e) => {
                trace(
                    Some(&router_id),
                    "router",
                    format!(
                        "router ({why}): routing call failed ({e}); falling back to the best dev member {}",
                        members[best].id
                    ),
                );
                (best, true)
            }
        };
        let answer = generate(&members[chosen].id, &req.input, &req.params)?;
        trace(Some(&members[chosen].id), "answerer", "answered the question");
        Ok(Response {
            text: answer.text,
            annotations: vec![
                ("routed_to".into(), members[chosen].id.clone()),
                ("router".into(), router_id),
                ("fallback".into(), fell_back.to_string()),
            ],
        })
    }

    /// Scores every member greedily on the dev examples and keeps the
    /// ranking: the best dev member routes and is the fallback.
    fn fit(dev: Vec<Example>, config: Config) -> Result<Option<Vec<u8>>, Error> {
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
        trace(None, "fit", format!("dev ranking: {}", st.describe()));
        state::save(STATE_VERSION, &st).map(Some)
    }
}

export_strategy!(PromptRouter);

#[cfg(test)]
mod tests {
    use super::parse_choice;

    #[test]
    fn parses_the_first_valid_number() {
        let p = |r: &str, n: usize| parse_choice(r, n, &[]);
        assert_eq!(p("2", 3), Some(1));
        assert_eq!(p("Assistant 3.", 3), Some(2));
        assert_eq!(p("I pick 7, no, 1", 3), Some(0));
        assert_eq!(p("none of them", 3), None);
        assert_eq!(p("0", 3), None);
    }

    #[test]
    fn reads_ids_hashes_words_and_skips_digits_inside_ids_and_decimals() {
        let ids = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"];
        let p = |r: &str| parse_choice(r, 3, &ids);
        assert_eq!(p("#2"), Some(1));
        assert_eq!(p("**3**"), Some(2));
        assert_eq!(p("Qwen2.5-Coder-0.5B-Instruct"), Some(1));
        assert_eq!(p("gemma-3-270m is best"), Some(2));
        // Two ids named: fall through to the number.
        assert_eq!(p("1 (smollm2-135m-instruct), not gemma-3-270m"), Some(0));
        // Digits of an id or a decimal are not member numbers.
        assert_eq!(p("version 2.5 of it"), None);
        assert_eq!(p("model v3"), None);
        assert_eq!(p("Assistant two"), Some(1));
        assert_eq!(p("twenty"), None);
    }
}

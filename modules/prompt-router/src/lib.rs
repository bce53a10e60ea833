//! prompt-router: a router member reads the question and the numbered member
//! descriptions and names who should answer; that member answers. A reply
//! with no usable number falls back to the router member itself. See
//! README.md.

use tessera_sdk::*;

struct PromptRouter;

/// The first integer in `reply` that is a valid 1-based index, scanning
/// every number in order; `None` if there is none.
fn parse_choice(reply: &str, n: usize) -> Option<usize> {
    reply
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty() && s.len() < 4)
        .filter_map(|s| s.parse::<usize>().ok())
        .find(|&i| i >= 1 && i <= n)
        .map(|i| i - 1)
}

impl Strategy for PromptRouter {
    fn run(req: Request) -> Result<Response, Error> {
        let cfg = Config::from_pairs(req.config.clone());
        let members = generators();
        if members.is_empty() {
            return Err(Error::ModuleFailed("no generative member was granted".into()));
        }
        // The router is the configured member, else the first in pool order
        // (operators list the pool best-first on dev).
        let router_id = cfg
            .get("router")
            .map(str::to_string)
            .unwrap_or_else(|| members[0].id.clone());
        let router = members.iter().position(|m| m.id == router_id).ok_or_else(|| {
            Error::InvalidParams(format!(
                "config `router` = `{router_id}` is not a granted generative member"
            ))
        })?;
        let q = question(&req.input);
        let mut listing = String::new();
        for (i, m) in members.iter().enumerate() {
            listing.push_str(&format!("{}. {}: {}\n", i + 1, m.id, m.description));
        }
        let ask = format!(
            "Pick the assistant best suited to answer the question.\n\nQuestion: {q}\n\nAssistants:\n{listing}\nReply with the assistant's number only."
        );
        let route_params = GenParams {
            max_tokens: Some(cfg.parse("router_max_tokens", 8)?),
            temperature: Some(0.0),
            ..Default::default()
        };
        let chosen = match generate(&members[router].id, &user(ask), &route_params) {
            Ok(g) => match parse_choice(&g.text, members.len()) {
                Some(i) => {
                    trace(
                        Some(&members[router].id),
                        "router",
                        format!("replied `{}`: chose {}", g.text.trim(), members[i].id),
                    );
                    i
                }
                None => {
                    trace(
                        Some(&members[router].id),
                        "router",
                        format!(
                            "replied `{}`: no valid number, falling back to the router member",
                            g.text.trim()
                        ),
                    );
                    router
                }
            },
            Err(e) => {
                trace(
                    Some(&members[router].id),
                    "router",
                    format!("routing call failed ({e}); falling back to the router member"),
                );
                router
            }
        };
        let answer = generate(&members[chosen].id, &req.input, &req.params)?;
        trace(Some(&members[chosen].id), "answerer", "answered the question");
        Ok(Response {
            text: answer.text,
            annotations: vec![("routed_to".into(), members[chosen].id.clone())],
        })
    }
}

export_strategy!(PromptRouter);

#[cfg(test)]
mod tests {
    use super::parse_choice;

    #[test]
    fn parses_the_first_valid_number() {
        assert_eq!(parse_choice("2", 3), Some(1));
        assert_eq!(parse_choice("Assistant 3.", 3), Some(2));
        assert_eq!(parse_choice("I pick 7, no, 1", 3), Some(0));
        assert_eq!(parse_choice("none of them", 3), None);
        assert_eq!(parse_choice("0", 3), None);
    }
}

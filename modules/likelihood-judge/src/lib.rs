//! likelihood-judge: a `judge` for pipelines. A judge member reads the
//! question and scores each candidate answer by its mean per-token
//! log-likelihood as a continuation of that question (the host's `score`):
//! a cheap, deterministic stand-in for a reward model. See README.md.

use tessera_sdk::*;

struct LikelihoodJudge;

impl Judge for LikelihoodJudge {
    fn judge(req: Request, candidates: Vec<Candidate>) -> Result<Vec<f64>, Error> {
        let cfg = Config::from_pairs(req.config.clone());
        let judge = match cfg.get("judge") {
            Some(id) => id.to_string(),
            None => models()
                .into_iter()
                .find(|m| m.capabilities.iter().any(|c| c == "score"))
                .map(|m| m.id)
                .ok_or_else(|| Error::ModuleFailed("no member that can score was granted; set `judge`".into()))?,
        };
        let max_chars: usize = cfg.parse("max_chars", 2000)?;
        let conts: Vec<String> = candidates
            .iter()
            .map(|c| {
                let t = c.text.trim();
                let cut = t.char_indices().nth(max_chars).map_or(t.len(), |(i, _)| i);
                format!(" {}", &t[..cut])
            })
            .collect();
        let prompt = user(question(&req.input));
        let scored = score(&judge, &prompt, &conts)?;
        if scored.len() != candidates.len() {
            return Err(Error::ModuleFailed(format!(
                "the judge member returned {} scores for {} candidates",
                scored.len(),
                candidates.len()
            )));
        }
        let mut out = Vec::with_capacity(scored.len());
        for (c, s) in candidates.iter().zip(&scored) {
            let mean = if s.tokens == 0 {
                f64::MIN / 2.0
            } else {
                s.logprob / f64::from(s.tokens)
            };
            trace(
                Some(&c.model),
                "judged",
                format!("mean log-prob {mean:.3} over {} tokens (judge {judge})", s.tokens),
            );
            out.push(mean);
        }
        Ok(out)
    }
}

export_judge!(LikelihoodJudge);

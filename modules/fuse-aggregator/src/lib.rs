//! fuse-aggregator: an `aggregator` for pipelines. A fuser member reads the
//! question and the top candidates (in the order the pipeline ranked them)
//! and writes one answer that keeps what they agree on. With one candidate,
//! or `top_k = 1`, the best candidate is returned as it is. See README.md.

use tessera_sdk::*;

struct FuseAggregator;

impl Aggregator for FuseAggregator {
    fn aggregate(req: Request, candidates: Vec<Candidate>) -> Result<Response, Error> {
        let cfg = Config::for_request(&req);
        let top_k: usize = cfg.parse("top_k", 3)?;
        if top_k == 0 {
            return Err(Error::InvalidParams(
                "config `top_k` = 0: fuse at least 1 candidate".into(),
            ));
        }
        let first = candidates
            .first()
            .ok_or_else(|| Error::ModuleFailed("no candidate to aggregate".into()))?;
        let top: Vec<&Candidate> = candidates.iter().take(top_k).collect();
        if top.len() == 1 {
            trace(Some(&first.model), "aggregator", "one candidate: returned as it is");
            return Ok(Response {
                text: first.text.clone(),
                annotations: vec![("fused".into(), "1".into())],
            });
        }
        let fuser = match cfg.get("fuser") {
            Some(id) => id.to_string(),
            None => generators()
                .into_iter()
                .next()
                .map(|m| m.id)
                .ok_or_else(|| Error::ModuleFailed("no generative member was granted to fuse".into()))?,
        };
        let mut prompt = format!("Question: {}\n\nCandidate answers, best first:\n", question(&req.input));
        for (i, c) in top.iter().enumerate() {
            prompt.push_str(&format!("[{}] {}\n", i + 1, c.text.trim()));
        }
        prompt.push_str("\nWrite one short, correct answer to the question, using the candidates.");
        let params = GenParams {
            max_tokens: Some(cfg.parse("max_tokens", 128)?),
            temperature: Some(0.0),
            seed: req.params.seed,
            ..Default::default()
        };
        let g = generate(&fuser, &user(prompt), &params)?;
        let used: Vec<&str> = top.iter().map(|c| c.model.as_str()).collect();
        trace(
            Some(&fuser),
            "fuser",
            format!("fused the answers of {}", used.join(", ")),
        );
        Ok(Response {
            text: g.text,
            annotations: vec![("fused".into(), top.len().to_string()), ("fuser".into(), fuser)],
        })
    }
}

export_aggregator!(FuseAggregator);

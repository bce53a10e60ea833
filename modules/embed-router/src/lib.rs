//! embed-router: a `router` for pipelines. Embeds the question and every
//! offered member's card (description and domains) with the pool's
//! embedding member and ranks members by cosine similarity, best first.
//! See README.md.

use tessera_sdk::*;

struct EmbedRouter;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    // The host returns L2-normalised vectors, so the dot product is the cosine.
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

impl Router for EmbedRouter {
    fn route(req: Request, members: Vec<ModelInfo>) -> Result<Vec<String>, Error> {
        let cfg = Config::from_pairs(req.config.clone());
        let embedder = match cfg.get("embedder") {
            Some(id) => id.to_string(),
            None => models()
                .into_iter()
                .find(|m| m.capabilities.iter().any(|c| c == "embed"))
                .map(|m| m.id)
                .ok_or_else(|| Error::ModuleFailed("no embedding member was granted; set `embedder`".into()))?,
        };
        if members.is_empty() {
            return Err(Error::ModuleFailed("no member was offered to route to".into()));
        }
        let mut texts = vec![question(&req.input)];
        texts.extend(
            members
                .iter()
                .map(|m| format!("{} Good at: {}.", m.description, m.domains.join(", "))),
        );
        let vecs = embed(&embedder, &texts)?;
        if vecs.len() != texts.len() {
            return Err(Error::ModuleFailed(format!(
                "the embedder returned {} vectors for {} texts",
                vecs.len(),
                texts.len()
            )));
        }
        let mut ranked: Vec<(f64, usize)> = (0..members.len())
            .map(|i| (cosine(&vecs[0], &vecs[i + 1]), i))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let shown: Vec<String> = ranked
            .iter()
            .map(|(s, i)| format!("{}={s:.3}", members[*i].id))
            .collect();
        trace(
            Some(&embedder),
            "router",
            format!("similarity to the question: {}", shown.join(", ")),
        );
        Ok(ranked.into_iter().map(|(_, i)| members[i].id.clone()).collect())
    }
}

export_router!(EmbedRouter);

//! Hostile test module: liar. Returns errors that look like the host's own
//! (`claim` = deadline, not-permitted, budget, inference-failed,
//! unsupported), hoping to pass them off as limits the host enforced.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let claim = req
            .config
            .iter()
            .find(|(k, _)| k == "claim")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Err(match claim.as_str() {
            "deadline" => Error::DeadlineExceeded,
            "budget" => Error::BudgetExhausted(Budget::Tokens),
            "inference-failed" => Error::InferenceFailed("the GPU melted".into()),
            "unsupported" => Error::Unsupported("nothing".into()),
            _ => Error::NotPermitted("your key is revoked".into()),
        })
    }
}

export_strategy!(Hostile);

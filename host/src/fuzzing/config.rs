//! Configuration that arrives as TOML text from people other than the
//! operator: a module's manifest (published through the registry), the
//! operator's policy file, and pool declarations (which name contributed
//! members).
//!
//! Oracle: no panic and bounded allocation; a text that parses serialises
//! back to TOML that parses to the same value (compared as JSON, since the
//! types need not implement equality); a published manifest grants
//! budgets within the policy's maxima.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::policy::{Manifest, Policy};
use crate::pool::PoolConfig;

/// The first byte picks the file kind; the rest is its text (lossily
/// decoded).
pub fn check(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match kind % 3 {
        0 => {
            if let Some(m) = round_trip::<Manifest>(&text) {
                let policy = Policy::default();
                let pool = ["a".to_string(), "b".to_string()];
                let grants = [
                    ("request", policy.grant(&m, &pool), Policy::builtin_maxima()),
                    ("fit", policy.fit_grant(&m, &pool), Policy::builtin_fit_maxima()),
                ];
                for (what, grant, max) in grants {
                    assert!(max.fuel.is_none_or(|f| grant.fuel <= f), "{what} fuel past the maximum");
                    assert!(
                        max.host_calls.is_none_or(|c| grant.host_calls <= c),
                        "{what} host calls past the maximum"
                    );
                    assert!(grant.memory_bytes <= crate::sandbox::MAX_MEMORY_BYTES as u64);
                }
            }
        }
        1 => {
            round_trip::<Policy>(&text);
        }
        _ => {
            if let Ok(cfg) = PoolConfig::from_toml(&text) {
                same_after_round_trip(&cfg);
            }
        }
    }
}

fn round_trip<T: Serialize + DeserializeOwned>(text: &str) -> Option<T> {
    let v: T = toml::from_str(text).ok()?;
    same_after_round_trip(&v);
    Some(v)
}

fn same_after_round_trip<T: Serialize + DeserializeOwned>(v: &T) {
    let Ok(again) = toml::to_string(v) else {
        // Some values parse but have no TOML form (a float that is not a
        // number); that is not a fault of the parser.
        return;
    };
    let back: T = toml::from_str(&again).unwrap_or_else(|e| panic!("serialised TOML does not parse: {e}\n{again}"));
    let (a, b) = (serde_json::to_value(v).ok(), serde_json::to_value(&back).ok());
    assert_eq!(a, b, "the round trip changed the value:\n{again}");
}

/// Seeds: the standard module manifest, a policy and the default pool.
pub fn seeds() -> Vec<Vec<u8>> {
    let manifest = "name = \"x\"\nversion = \"0.1.0\"\nauthor = \"a\"\nworld = \"strategy\"\ndescription = \"d\"\nmodels = [\"*\"]\n[budgets]\nfuel = 1000\ndeadline_ms = 5000\n[config]\nk = \"3\"\n";
    let policy = "models = [\"*\"]\nkeep_merged = 1\n[defaults]\nfuel = 10\n[maxima]\nhost_calls = 5\n[modules.x]\nmodels = [\"a\"]\n";
    let pool = crate::pool::DEFAULT_POOL_TOML;
    vec![
        [&[0u8][..], manifest.as_bytes()].concat(),
        [&[1u8][..], policy.as_bytes()].concat(),
        [&[2u8][..], pool.as_bytes()].concat(),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_parse_and_round_trip() {
        for s in super::seeds() {
            super::check(&s);
        }
        let pool = crate::pool::PoolConfig::from_toml(crate::pool::DEFAULT_POOL_TOML).expect("the default pool parses");
        assert!(!pool.members.is_empty());
    }
}

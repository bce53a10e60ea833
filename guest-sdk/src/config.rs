//! Hyperparameters: `key = value` strings from the module's manifest,
//! overlaid with the caller's. Typed getters turn a bad value into an
//! `invalid-params` error that names the key, instead of a silent default.

use crate::Error;

/// A request's hyperparameters.
#[derive(Debug, Clone, Default)]
pub struct Config(Vec<(String, String)>);

impl Config {
    /// From the request's pairs; later pairs win.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        Config(pairs)
    }

    /// A request's hyperparameters, with its decoding parameters
    /// (`max_tokens`, `temperature`, `top_p`, `top_k`) as the defaults of
    /// the keys of the same name: an explicit `key = value` from the caller
    /// still wins, and a module's own default applies only when neither is
    /// set. Manifests should therefore not list these keys in `[config]`.
    pub fn for_request(req: &crate::Request) -> Self {
        let p = &req.params;
        let mut pairs = Vec::new();
        if let Some(v) = p.max_tokens {
            pairs.push(("max_tokens".to_string(), v.to_string()));
        }
        if let Some(v) = p.temperature {
            pairs.push(("temperature".to_string(), v.to_string()));
        }
        if let Some(v) = p.top_p {
            pairs.push(("top_p".to_string(), v.to_string()));
        }
        if let Some(v) = p.top_k {
            pairs.push(("top_k".to_string(), v.to_string()));
        }
        pairs.extend(req.config.iter().cloned());
        Config(pairs)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `key` parsed as `T`, or `default` when unset. A value that does not
    /// parse is an error naming the key.
    pub fn parse<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                Error::InvalidParams(format!(
                    "config `{key}` = `{v}` is not a valid {}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// [`Config::parse`], then a range check: a value outside `ok` is an
    /// error naming the key, the value and `why` (what to use instead).
    pub fn parse_within<T>(
        &self,
        key: &str,
        default: T,
        ok: impl std::ops::RangeBounds<T>,
        why: &str,
    ) -> Result<T, Error>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display,
    {
        let v = self.parse(key, default)?;
        if ok.contains(&v) {
            Ok(v)
        } else {
            Err(invalid(key, v, why))
        }
    }
}

/// Sampling settings read by [`Config::sampling`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// New tokens per generation (`max_tokens`, 1..=4096).
    pub max_tokens: u32,
    /// Softmax temperature (`temperature`, 0 = greedy, up to 2).
    pub temperature: f32,
    /// Nucleus mass (`top_p`, in (0, 1]).
    pub top_p: f32,
}

impl Config {
    /// `temperature` (0..=2) and `top_p` ((0, 1]) with these defaults,
    /// range-checked with one wording for every module.
    pub fn temperature_top_p(&self, temperature: f32, top_p: f32) -> Result<(f32, f32), Error> {
        let t = self.parse_within("temperature", temperature, 0.0..=2.0, "use 0 (greedy) to 2")?;
        let p = self.parse_within(
            "top_p",
            top_p,
            (std::ops::Bound::Excluded(0.0), std::ops::Bound::Included(1.0)),
            "use a mass in (0, 1]",
        )?;
        Ok((t, p))
    }

    /// `max_tokens`, `temperature` and `top_p`, with `defaults` for the
    /// unset ones (see [`Config::temperature_top_p`] for the ranges).
    pub fn sampling(&self, defaults: Sampling) -> Result<Sampling, Error> {
        let max_tokens = self.parse_within("max_tokens", defaults.max_tokens, 1..=4096, "use 1..=4096 tokens")?;
        let (temperature, top_p) = self.temperature_top_p(defaults.temperature, defaults.top_p)?;
        Ok(Sampling {
            max_tokens,
            temperature,
            top_p,
        })
    }
}

/// The error for a hyperparameter out of range: names the key, the value
/// and what to use instead.
pub fn invalid(key: &str, value: impl std::fmt::Display, why: &str) -> Error {
    Error::InvalidParams(format!("config `{key}` = `{value}`: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_within_names_the_key_value_and_fix() {
        let c = Config::from_pairs(vec![("n".into(), "9".into()), ("p".into(), "0".into())]);
        assert_eq!(c.parse_within("m", 3u32, 1..=8, "use 1..=8").unwrap(), 3);
        let e = c.parse_within("n", 3u32, 1..=8, "use 1..=8").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidParams(m) if m.contains("`n` = `9`") && m.contains("use 1..=8")),
            "{e:?}"
        );
        let open = (std::ops::Bound::Excluded(0.0f32), std::ops::Bound::Included(1.0f32));
        assert!(c.parse_within("p", 0.5f32, open, "use (0, 1]").is_err());
    }

    #[test]
    fn later_pairs_win_and_bad_values_name_the_key() {
        let c = Config::from_pairs(vec![
            ("k".into(), "3".into()),
            ("k".into(), "5".into()),
            ("t".into(), "x".into()),
        ]);
        assert_eq!(c.parse::<u32>("k", 1).unwrap(), 5);
        assert_eq!(c.parse::<u32>("missing", 7).unwrap(), 7);
        match c.parse::<f32>("t", 0.0) {
            Err(Error::InvalidParams(m)) => assert!(m.contains("`t`")),
            other => panic!("{other:?}"),
        }
    }
}

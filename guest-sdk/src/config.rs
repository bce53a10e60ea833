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

impl Config {
    /// `key` as a comma-separated list of exactly `count` numbers (one per
    /// member, say), or `None` when unset or blank. `what` names what each
    /// number belongs to, for the error when the count is wrong (e.g. "member
    /// (a, b, c)"); a value that does not parse names the key either way.
    pub fn numbers(&self, key: &str, count: usize, what: &str) -> Result<Option<Vec<f64>>, Error> {
        let Some(raw) = self.get(key).map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let list: Vec<f64> = raw
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| invalid(key, raw, "use comma-separated numbers"))?;
        if list.len() != count {
            return Err(invalid(
                key,
                raw,
                &format!("give {count} numbers, one per {what} (got {})", list.len()),
            ));
        }
        Ok(Some(list))
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
    fn numbers_checks_count_and_syntax() {
        let cfg = |v: &str| Config::from_pairs(vec![("weights".into(), v.into())]);
        assert_eq!(Config::default().numbers("weights", 2, "member").unwrap(), None);
        assert_eq!(cfg(" ").numbers("weights", 2, "member").unwrap(), None);
        assert_eq!(
            cfg("1, 0.5").numbers("weights", 2, "member").unwrap(),
            Some(vec![1.0, 0.5])
        );
        let Err(Error::InvalidParams(e)) = cfg("1,x").numbers("weights", 2, "member") else {
            panic!("bad number accepted")
        };
        assert!(e.contains("`weights`") && e.contains("comma-separated"), "{e}");
        let Err(Error::InvalidParams(e)) = cfg("1").numbers("weights", 2, "member (a, b)") else {
            panic!("short list accepted")
        };
        assert!(e.contains("give 2 numbers, one per member (a, b) (got 1)"), "{e}");
    }

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

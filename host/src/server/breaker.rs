//! Quarantine for modules that keep breaking.
//!
//! The sandbox already stops a hostile module (fuel, memory, deadline,
//! trap), but stopping it is not free: an infinite loop burns a core until
//! its deadline, on every request. A tenant that sends such requests in a
//! loop would take CPU from everyone else. So the server counts consecutive
//! failed runs of a module; after `threshold` of them the module is
//! quarantined: requests for it are refused with a 503 and `Retry-After`
//! without running it. The quarantine doubles on each relapse up to `max`,
//! and one success clears the record.
//!
//! Records are kept per *caller and module* (the server's key is
//! `tenant/sha256`), because a caller can make even a sound module fail
//! fast (parameters it refuses, inputs it cannot handle): counted per
//! module alone, three such requests from one tenant would deny a standard
//! system to every other tenant. Counted per caller, a tenant can only
//! quarantine a module for itself, so every failure of a run counts,
//! including errors the module returns after burning its budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Error;

struct Record {
    consecutive: u32,
    strikes: u32,
    until: Option<Instant>,
}

/// The breaker.
pub struct Breaker {
    threshold: u32,
    base: Duration,
    max: Duration,
    records: Mutex<HashMap<String, Record>>,
}

/// Whether a failed run counts towards quarantine: anything the module
/// did or returned. A failure of the host itself (its configuration, a
/// backend fault, a stopped runtime) does not.
pub fn module_fault(e: &Error) -> bool {
    matches!(
        e,
        Error::Fuel { .. }
            | Error::Memory { .. }
            | Error::Stack { .. }
            | Error::Trap { .. }
            | Error::Deadline { .. }
            | Error::Budget { .. }
            | Error::ModuleFailed { .. }
            | Error::InvalidParams { .. }
            | Error::UnknownModel { .. }
    )
}

impl Breaker {
    /// Quarantine after `threshold` consecutive faults, for `base`, doubling
    /// per relapse up to `max`.
    pub fn new(threshold: u32, base: Duration, max: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            base,
            max,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds left)` while `module` is quarantined.
    pub fn check(&self, module: &str) -> Option<u64> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let until = records.get(module)?.until?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(left.as_secs().max(1))
    }

    /// The records whose key `matches` (keys are `caller/sha256`) that are
    /// quarantined now, with their seconds left: what the console's Modules
    /// view shows of a module.
    pub fn quarantined_matching(&self, matches: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut out: Vec<(String, u64)> = records
            .iter()
            .filter(|(k, _)| matches(k))
            .filter_map(|(k, r)| {
                let left = r.until?.checked_duration_since(now)?;
                Some((k.clone(), left.as_secs().max(1)))
            })
            .collect();
        out.sort();
        out
    }

    /// Records how a run of `module` ended.
    pub fn record(&self, module: &str, result: Result<(), &Error>) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                records.remove(module);
            }
            Err(e) if module_fault(e) => {
                let r = records.entry(module.to_string()).or_insert(Record {
                    consecutive: 0,
                    strikes: 0,
                    until: None,
                });
                r.consecutive += 1;
                if r.consecutive >= self.threshold {
                    let factor = 1u32 << r.strikes.min(16);
                    r.until = Some(Instant::now() + (self.base * factor).min(self.max));
                    r.strikes += 1;
                    r.consecutive = 0;
                }
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_faults_quarantine_and_a_success_clears() {
        let b = Breaker::new(3, Duration::from_secs(30), Duration::from_secs(600));
        let fuel = Error::Fuel { limit: 1 };
        let host = Error::InferenceFailed { message: "x".into() };
        b.record("m", Err(&fuel));
        b.record("m", Err(&host)); // the host's own failure: not counted
        b.record("m", Err(&fuel));
        assert_eq!(b.check("m"), None);
        b.record("m", Err(&fuel));
        let left = b.check("m").expect("quarantined");
        assert!((29..=30).contains(&left), "{left}");
        assert_eq!(b.check("other"), None);
        assert_eq!(b.quarantined_matching(|k| k == "m").len(), 1);
        assert!(b.quarantined_matching(|k| k == "other").is_empty());
        b.record("m", Ok(()));
        assert_eq!(b.check("m"), None);
        assert!(b.quarantined_matching(|_| true).is_empty());
    }

    #[test]
    fn relapses_double_the_quarantine_up_to_the_cap() {
        let b = Breaker::new(1, Duration::from_secs(30), Duration::from_secs(100));
        let trap = Error::Trap { message: "x".into() };
        b.record("m", Err(&trap));
        assert!(b.check("m").unwrap() <= 30);
        b.record("m", Err(&trap));
        assert!(b.check("m").unwrap() > 30);
        b.record("m", Err(&trap));
        assert!(b.check("m").unwrap() <= 100);
    }
}

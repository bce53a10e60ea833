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

use std::sync::Arc;
use std::time::Duration;

use crate::registry::store::{Gates, MemoryGates, QuarantineRecord};
use crate::Error;

/// The breaker: the rule here, the records in [`Gates`] (in memory for one
/// box, in the shared registry database for many nodes, so a module
/// quarantined through one node is quarantined on all).
pub struct Breaker {
    threshold: u32,
    base: Duration,
    max: Duration,
    records: Arc<dyn Gates>,
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
    /// per relapse up to `max`; records in this process's memory.
    pub fn new(threshold: u32, base: Duration, max: Duration) -> Self {
        Self::with_records(threshold, base, max, Arc::new(MemoryGates::default()))
    }

    /// The same rule over records kept in `records`.
    pub fn with_records(threshold: u32, base: Duration, max: Duration, records: Arc<dyn Gates>) -> Self {
        Breaker {
            threshold: threshold.max(1),
            base,
            max,
            records,
        }
    }

    /// `Some(seconds left)` while `module` is quarantined. A store that
    /// cannot answer is logged and counts as "not quarantined": the
    /// sandbox's own limits still hold for the run.
    pub fn check(&self, module: &str) -> Option<u64> {
        match self.records.quarantine_left(module) {
            Ok(left) => left.map(|ms| (ms as u64).div_ceil(1000).max(1)),
            Err(e) => {
                tracing::warn!("quarantine check of `{module}`: {e}");
                None
            }
        }
    }

    /// The records whose key `matches` (keys are `caller/sha256`) that are
    /// quarantined now, with their seconds left: what the console's Modules
    /// view shows of a module.
    pub fn quarantined_matching(&self, matches: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
        let all = self.records.quarantined().unwrap_or_else(|e| {
            tracing::warn!("quarantine listing: {e}");
            Vec::new()
        });
        let mut out: Vec<(String, u64)> = all
            .into_iter()
            .filter(|(k, _)| matches(k))
            .map(|(k, ms)| (k, (ms as u64).div_ceil(1000).max(1)))
            .collect();
        out.sort();
        out
    }

    /// Records how a run of `module` ended.
    pub fn record(&self, module: &str, result: Result<(), &Error>) {
        let done = match result {
            Ok(()) => self.records.clear_quarantine(module),
            Err(e) if module_fault(e) => {
                let (threshold, base, max) = (self.threshold, self.base, self.max);
                self.records.update_quarantine(
                    module,
                    Box::new(move |old, now_ms| {
                        let mut r = old.unwrap_or(QuarantineRecord::default());
                        r.consecutive += 1;
                        if r.consecutive >= threshold {
                            let factor = 1u32 << r.strikes.min(16);
                            let span = (base * factor).min(max);
                            r.until_ms = now_ms + span.as_millis() as i64;
                            r.strikes += 1;
                            r.consecutive = 0;
                        }
                        Some(r)
                    }),
                )
            }
            Err(_) => Ok(()),
        };
        if let Err(e) = done {
            tracing::warn!("quarantine record of `{module}`: {e}");
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

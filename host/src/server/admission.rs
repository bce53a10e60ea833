//! Who gets in, and when: per-tenant quotas and the server-wide queue.
//!
//! Every request passes two gates before it may use a model:
//!
//! 1. Its tenant's quotas: requests per rolling minute, tokens per UTC
//!    day, requests in flight. Over any of them is a 429 with a
//!    `Retry-After` that says when trying again can succeed.
//! 2. The server's own capacity: at most `max_inflight` requests execute at
//!    once and at most `max_queue` more wait. A request that finds the
//!    queue full is refused with a 503 at once: the server answers "busy"
//!    quickly rather than letting memory and latency grow without bound.
//!
//! The permits are RAII guards held for the whole life of the request,
//! streams included, so capacity is given back however a request ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::registry::tenants::{day_of, Tenant};
use crate::registry::Registry;

/// Concurrency state of one tenant, kept in memory: requests in flight
/// are counted per node. The token count and the rolling minute are in
/// the registry ([`Registry::gates`]), so they hold across restarts
/// (tokens) and across the nodes that share a registry (both).
struct TenantGate {
    concurrent: Arc<Semaphore>,
    limit: u32,
}

/// The two gates.
pub struct Admission {
    inflight: Arc<Semaphore>,
    /// The places `inflight` was made with, to count the ones taken.
    places: usize,
    waiting: AtomicUsize,
    max_queue: usize,
    tenants: Mutex<HashMap<String, TenantGate>>,
}

/// Held while a request runs; dropping it frees its places.
pub struct Admitted {
    _tenant: Option<OwnedSemaphorePermit>,
    _global: OwnedSemaphorePermit,
    /// The tokens its tenant had left today when it was let in; `None`
    /// without a daily quota. A request is admitted while any are left, so
    /// this is what bounds how far one request can pass the quota.
    pub tokens_left: Option<u64>,
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Seconds until the daily token quota renews (UTC midnight).
pub(crate) fn seconds_to_next_utc_day(now_unix: i64) -> u64 {
    (86_400 - now_unix.rem_euclid(86_400)).max(1) as u64
}

/// The 429 of a tenant's daily token quota (`tokens_per_day`), retried
/// when the quota renews; `message` says what was asked and what is left.
pub(crate) fn day_quota_spent(message: &str) -> ApiError {
    let now = super::now_unix() as i64;
    ApiError::rate_limited("tokens_per_day", message, seconds_to_next_utc_day(now))
}

impl Admission {
    /// `max_inflight` requests at once, `max_queue` more waiting.
    pub fn new(max_inflight: usize, max_queue: usize) -> Self {
        let places = max_inflight.max(1);
        Admission {
            inflight: Arc::new(Semaphore::new(places)),
            places,
            waiting: AtomicUsize::new(0),
            max_queue,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Requests waiting for a place right now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Requests admitted and running right now.
    pub fn running(&self) -> usize {
        self.places.saturating_sub(self.inflight.available_permits())
    }

    /// Checks `tenant`'s quotas and takes one of its concurrent places.
    /// `None` tenant: the open (no-tenants, loopback) mode, no quotas.
    /// Also returns the tokens the tenant has left today (`None`: no daily
    /// quota).
    fn tenant_gate(
        &self,
        tenant: &Tenant,
        registry: &Registry,
    ) -> Result<(Option<OwnedSemaphorePermit>, Option<u64>), ApiError> {
        let p = &tenant.policy;
        let mut left = None;
        if p.tokens_per_day > 0 {
            let now = super::now_unix() as i64;
            let used = registry
                .tokens_used(&tenant.name, day_of(now))
                .map_err(ApiError::from)?;
            if used >= p.tokens_per_day {
                return Err(day_quota_spent(&format!(
                    "tenant `{}` used {used} of its {} tokens for today (UTC)",
                    tenant.name, p.tokens_per_day
                )));
            }
            left = Some(p.tokens_per_day - used);
        }
        let mut gates = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let limit = if p.max_concurrent == 0 {
            Semaphore::MAX_PERMITS as u32
        } else {
            p.max_concurrent
        };
        let gate = gates.entry(tenant.name.clone()).or_insert_with(|| TenantGate {
            concurrent: Arc::new(Semaphore::new(limit as usize)),
            limit,
        });
        // A changed policy takes effect for the next request.
        if gate.limit != limit {
            gate.concurrent = Arc::new(Semaphore::new(limit as usize));
            gate.limit = limit;
        }
        let permit = gate.concurrent.clone().try_acquire_owned().map_err(|_| {
            ApiError::rate_limited(
                "max_concurrent",
                &format!(
                    "tenant `{}` already has {} requests in flight, its limit",
                    tenant.name, limit
                ),
                1,
            )
        })?;
        drop(gates);
        // Counted last, so a request refused above does not use up the
        // minute; the permit is given back if this refuses.
        if p.requests_per_minute > 0 {
            if let Some(wait_ms) = registry
                .gates()
                .take_request(&tenant.name, p.requests_per_minute, 60_000)
                .map_err(ApiError::from)?
            {
                return Err(ApiError::rate_limited(
                    "requests_per_minute",
                    &format!(
                        "tenant `{}` sent {} requests in the last minute, its limit",
                        tenant.name, p.requests_per_minute
                    ),
                    (wait_ms as u64).div_ceil(1000).max(1),
                ));
            }
        }
        Ok((Some(permit), left))
    }

    /// Passes both gates, waiting (bounded by `wait`) for a server-wide place.
    pub async fn admit(
        &self,
        tenant: Option<&Tenant>,
        registry: &Registry,
        wait: Duration,
    ) -> Result<Admitted, ApiError> {
        let (tenant_permit, tokens_left) = match tenant {
            Some(t) => self.tenant_gate(t, registry)?,
            None => (None, None),
        };
        if let Ok(p) = self.inflight.clone().try_acquire_owned() {
            return Ok(Admitted {
                _tenant: tenant_permit,
                _global: p,
                tokens_left,
            });
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(&format!(
                "the server is at capacity ({} requests waiting): try again shortly",
                self.max_queue
            )));
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(wait, self.inflight.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Admitted {
                _tenant: tenant_permit,
                _global: p,
                tokens_left,
            }),
            _ => Err(ApiError::overloaded(
                "waited too long for a free place: the server is saturated, try again shortly",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::seconds_to_next_utc_day;

    #[test]
    fn retry_after_for_the_daily_quota_is_the_next_utc_midnight() {
        assert_eq!(seconds_to_next_utc_day(0), 86_400);
        assert_eq!(seconds_to_next_utc_day(86_400 - 5), 5);
        assert_eq!(seconds_to_next_utc_day(86_400 * 3 + 100), 86_300);
    }
}

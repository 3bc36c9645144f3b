//! Counters kept by a checker.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of what a checker has seen since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckerStats {
    /// Handler executions that completed and were recorded.
    pub executed: u64,
    /// Duplicates answered from a `COMPLETED` record.
    pub replayed: u64,
    /// Of `replayed`, those answered from the local replay cache, with no
    /// store round trip.
    pub cache_hits: u64,
    /// Calls turned away because another attempt held a live lease.
    pub in_progress: u64,
    /// Attempts recorded as `FAILED` (handler errors, panics, dropped guards).
    pub failed: u64,
    /// Attempts that found their lease taken over when they tried to finish.
    pub lease_lost: u64,
    /// Keys reused with a different payload.
    pub fingerprint_mismatches: u64,
    /// Store operations that failed (unavailable, timed out, corrupt).
    pub store_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) executed: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) in_progress: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) fingerprint_mismatches: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CheckerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CheckerStats {
            executed: get(&self.executed),
            replayed: get(&self.replayed),
            cache_hits: get(&self.cache_hits),
            in_progress: get(&self.in_progress),
            failed: get(&self.failed),
            lease_lost: get(&self.lease_lost),
            fingerprint_mismatches: get(&self.fingerprint_mismatches),
            store_errors: get(&self.store_errors),
        }
    }
}

//! Counters kept by a checker, mirrored to the `metrics` facade.

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
    /// Claims that took over a `PROCESSING` record whose lease had run out
    /// (the attempt before died or stalled).
    pub lease_takeovers: u64,
    /// Keys reused with a different payload.
    pub fingerprint_mismatches: u64,
    /// Store operations that failed (unavailable, timed out, corrupt),
    /// including calls refused by the open circuit breaker.
    pub store_errors: u64,
    /// Handlers run unguarded because the store was unavailable and
    /// [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) is on.
    pub fail_open: u64,
    /// How many times the circuit breaker opened (closed → open; a failed
    /// probe that keeps it open is not counted again).
    pub circuit_opened: u64,
}

/// One counter: kept in the checker for [`CheckerStats`] and reported to
/// the `metrics` facade under `metric`.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    metric: &'static str,
}

impl Counter {
    const fn new(metric: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            metric,
        }
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) executed: Counter,
    pub(crate) replayed: Counter,
    pub(crate) cache_hits: Counter,
    pub(crate) in_progress: Counter,
    pub(crate) failed: Counter,
    pub(crate) lease_lost: Counter,
    pub(crate) lease_takeovers: Counter,
    pub(crate) fingerprint_mismatches: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) fail_open: Counter,
    pub(crate) circuit_opened: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            executed: Counter::new("idempotency_executed_total"),
            replayed: Counter::new("idempotency_replayed_total"),
            cache_hits: Counter::new("idempotency_cache_hits_total"),
            in_progress: Counter::new("idempotency_in_progress_total"),
            failed: Counter::new("idempotency_failed_total"),
            lease_lost: Counter::new("idempotency_lease_lost_total"),
            lease_takeovers: Counter::new("idempotency_lease_takeovers_total"),
            fingerprint_mismatches: Counter::new("idempotency_fingerprint_mismatches_total"),
            store_errors: Counter::new("idempotency_store_errors_total"),
            fail_open: Counter::new("idempotency_fail_open_total"),
            circuit_opened: Counter::new("idempotency_circuit_opened_total"),
        }
    }
}

pub(crate) fn bump(counter: &Counter) {
    counter.value.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(counter.metric).increment(1);
}

/// Records how long one store operation (`op`: claim, renew, complete,
/// fail, get, delete, health) took.
pub(crate) fn store_latency(op: &'static str, started: std::time::Instant) {
    // Literal labels make a static key: no allocation or hashing per call.
    macro_rules! by_op {
        ($($name:literal),*) => {
            match op {
                $($name => metrics::histogram!("idempotency_store_latency_seconds", "op" => $name),)*
                other => metrics::histogram!("idempotency_store_latency_seconds", "op" => other),
            }
        };
    }
    by_op!(
        "claim", "complete", "renew", "fail", "get", "delete", "health", "mark", "contains"
    )
    .record(started.elapsed().as_secs_f64());
}

/// Records how long a handler ran.
pub(crate) fn handler_latency(started: std::time::Instant) {
    metrics::histogram!("idempotency_handler_latency_seconds")
        .record(started.elapsed().as_secs_f64());
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CheckerStats {
        CheckerStats {
            executed: self.executed.get(),
            replayed: self.replayed.get(),
            cache_hits: self.cache_hits.get(),
            in_progress: self.in_progress.get(),
            failed: self.failed.get(),
            lease_lost: self.lease_lost.get(),
            lease_takeovers: self.lease_takeovers.get(),
            fingerprint_mismatches: self.fingerprint_mismatches.get(),
            store_errors: self.store_errors.get(),
            fail_open: self.fail_open.get(),
            circuit_opened: self.circuit_opened.get(),
        }
    }
}

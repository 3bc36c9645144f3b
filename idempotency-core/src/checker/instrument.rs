//! The one instrumented store call: the circuit breaker's permit, a span,
//! the latency metric, the breaker told the outcome, the error counted.
//! Every store call the checker makes goes through [`IdempotencyChecker::store_call`]
//! (or its uncounted form).

use std::future::Future;

use tokio::time::Instant;
use tracing::Instrument;

use super::IdempotencyChecker;
use crate::error::{IdempotencyError, Result};
use crate::resilience::breaker::{Breaker, Permit, Transition};
use crate::stats::{bump, store_latency};

/// How a store call meets the circuit breaker.
#[derive(Debug, Clone, Copy)]
pub(super) enum Gate {
    /// Ask the breaker first: while it is open the store is not called and
    /// the call fails with [`IdempotencyError::CircuitOpen`]. For the calls
    /// that start work or only read.
    Admit,
    /// Always call the store, and report the outcome to the breaker. For
    /// writes on behalf of an attempt whose handler runs or ran (renew,
    /// complete, fail): they record real outcomes.
    Observe,
}

impl IdempotencyChecker {
    /// Runs one store call `op` (named `name` in metrics) inside `span`,
    /// through the breaker as `gate` says, and counts its error in
    /// [`CheckerStats::store_errors`](crate::CheckerStats::store_errors).
    pub(super) async fn store_call<T, Fut>(
        &self,
        name: &'static str,
        gate: Gate,
        span: tracing::Span,
        op: impl FnOnce() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let result = self.store_call_uncounted(name, gate, span, op).await;
        self.count_store_error(result)
    }

    /// [`store_call`](Self::store_call) for the background calls (lease
    /// renewals while a handler runs, retried writes), whose failures are
    /// logged where they are handled rather than counted.
    pub(super) async fn store_call_uncounted<T, Fut>(
        &self,
        name: &'static str,
        gate: Gate,
        span: tracing::Span,
        op: impl FnOnce() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let permit = match gate {
            Gate::Admit => self.admit()?,
            Gate::Observe => None,
        };
        let started = Instant::now();
        let result = op().instrument(span).await;
        store_latency(name, started);
        match gate {
            Gate::Admit => self.settle(permit, &result),
            Gate::Observe => {
                self.settle(self.inner.breaker.as_ref().map(Breaker::unchecked), &result);
            }
        }
        result
    }

    /// Asks the circuit breaker for a gated store call: `Err`
    /// ([`CircuitOpen`](IdempotencyError::CircuitOpen)) when the store must
    /// not be called.
    fn admit(&self) -> Result<Option<Permit<'_>>> {
        match &self.inner.breaker {
            None => Ok(None),
            Some(breaker) => breaker.admit().map(Some).map_err(|open| {
                let refused = IdempotencyError::CircuitOpen {
                    store: self.inner.store.name(),
                    retry_in: open.retry_in,
                };
                tracing::debug!(%refused, "store call refused");
                refused
            }),
        }
    }

    /// Reports a store call's outcome to the circuit breaker.
    fn settle<T>(&self, permit: Option<Permit<'_>>, result: &Result<T>) {
        let Some(permit) = permit else {
            return;
        };
        let unavailable = matches!(result, Err(IdempotencyError::StoreUnavailable { .. }));
        match permit.record(unavailable) {
            Some(Transition::Opened { open_for }) => {
                bump(&self.inner.counters.circuit_opened);
                tracing::warn!(
                    store = self.inner.store.name(),
                    open_for_ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
                    "circuit breaker opened after consecutive store failures; store calls fail fast until a probe succeeds"
                );
            }
            Some(Transition::Reopened { open_for }) => tracing::debug!(
                store = self.inner.store.name(),
                open_for_ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
                "circuit breaker probe failed; staying open"
            ),
            Some(Transition::Closed) => tracing::info!(
                store = self.inner.store.name(),
                "the store answered the probe; circuit breaker closed"
            ),
            None => {}
        }
    }

    /// Counts a store error (unavailable, refused by the open breaker,
    /// refused by the store, a protocol surprise, a corrupt record) in
    /// [`CheckerStats::store_errors`](crate::CheckerStats::store_errors).
    fn count_store_error<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(
            IdempotencyError::StoreUnavailable { .. }
            | IdempotencyError::CircuitOpen { .. }
            | IdempotencyError::StoreRefused { .. }
            | IdempotencyError::Protocol { .. }
            | IdempotencyError::CorruptRecord { .. },
        ) = &result
        {
            bump(&self.inner.counters.store_errors);
        }
        result
    }
}

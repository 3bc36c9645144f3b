//! The one instrumented store call: the circuit breaker's permit, a span,
//! the latency metric, the breaker told the outcome, the error counted.
//! Every store call the checker makes goes through
//! [`IdempotencyChecker::store_call`].

use std::future::Future;

use std::time::Instant;
use tracing::Instrument;

use super::IdempotencyChecker;
use crate::error::{IdempotencyError, Result};
use crate::resilience::breaker::{Breaker, Permit, Transition};
use crate::stats::{bump, store_latency};

/// How a store call meets the circuit breaker.
#[derive(Debug, Clone, Copy)]
enum Gate {
    /// Ask the breaker first: while it is open the store is not called and
    /// the call fails with [`IdempotencyError::CircuitOpen`].
    Admit,
    /// Always call the store, and report the outcome to the breaker.
    Observe,
}

/// One kind of store call: its name in metrics, how it meets the circuit
/// breaker, and whether its errors count in
/// [`CheckerStats::store_errors`](crate::CheckerStats::store_errors).
#[derive(Debug, Clone, Copy)]
pub(super) struct StoreCall {
    name: &'static str,
    gate: Gate,
    counted: bool,
}

impl StoreCall {
    /// A call the breaker gates: those that start work or only read
    /// (claim, get, delete, health).
    pub(super) const fn gated(name: &'static str) -> Self {
        Self {
            name,
            gate: Gate::Admit,
            counted: true,
        }
    }

    /// A call the breaker never refuses but is told about: writes on
    /// behalf of an attempt whose handler runs or ran (renew, complete,
    /// fail), which record real outcomes.
    pub(super) const fn observed(name: &'static str) -> Self {
        Self {
            name,
            gate: Gate::Observe,
            counted: true,
        }
    }

    /// The same call made in the background (lease renewals while a handler
    /// runs, retried writes): its failures are logged where they are
    /// handled rather than counted.
    pub(super) const fn in_background(self) -> Self {
        Self {
            counted: false,
            ..self
        }
    }
}

impl IdempotencyChecker {
    /// Runs one store call `op` of kind `call` inside `span`: through the
    /// breaker, timed, its outcome reported to the breaker, its error
    /// counted.
    pub(super) async fn store_call<T, Fut>(
        &self,
        call: StoreCall,
        span: tracing::Span,
        op: impl FnOnce() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let permit = match call.gate {
            Gate::Admit => self.admit(),
            Gate::Observe => Ok(self.inner.breaker.as_ref().map(Breaker::unchecked)),
        };
        let result = match permit {
            Ok(permit) => {
                let started = Instant::now();
                let result = op().instrument(span).await;
                store_latency(call.name, started);
                self.settle(permit, &result);
                result
            }
            Err(open) => Err(open),
        };
        if call.counted {
            self.count_store_error(result)
        } else {
            result
        }
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

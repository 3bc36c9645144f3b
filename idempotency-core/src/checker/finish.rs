//! Recording an attempt's outcome: `COMPLETED` with its result, or
//! `FAILED`. Both are token-checked writes that always go to the store
//! (see [`Gate::Observe`]).

use std::time::Duration;

use super::IdempotencyChecker;
use super::instrument::Gate;
use crate::error::{IdempotencyError, Result};
use crate::record::Lease;
use crate::stats::bump;

impl IdempotencyChecker {
    /// Completes `lease` with `value` (`None`: the result could not be
    /// stored), which the caller made by
    /// [`storable`](super::result::storable).
    pub(super) async fn complete(
        &self,
        lease: &Lease,
        value: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> Result<()> {
        let span =
            tracing::debug_span!("idempotency.complete", key = %lease.key, attempt = lease.attempt);
        let result = self
            .store_call("complete", Gate::Observe, span, || {
                self.inner.store.complete(lease, value, ttl)
            })
            .await;
        tracing::debug!(key = %lease.key, ok = result.is_ok(), "complete");
        match &result {
            Ok(()) => bump(&self.inner.counters.executed),
            Err(IdempotencyError::LeaseLost { .. }) => {
                bump(&self.inner.counters.lease_lost);
                tracing::warn!(
                    attempt = lease.attempt,
                    "lease lost before completion; result not recorded"
                );
            }
            Err(_) => {}
        }
        result
    }

    /// Records `lease`'s attempt as `FAILED` with `error`.
    pub(super) async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let span =
            tracing::debug_span!("idempotency.fail", key = %lease.key, attempt = lease.attempt);
        let result = self
            .store_call("fail", Gate::Observe, span, || {
                self.inner.store.fail(lease, error, ttl)
            })
            .await;
        tracing::debug!(key = %lease.key, ok = result.is_ok(), "fail");
        match &result {
            Ok(()) => bump(&self.inner.counters.failed),
            Err(IdempotencyError::LeaseLost { .. }) => bump(&self.inner.counters.lease_lost),
            Err(_) => {}
        }
        result
    }
}

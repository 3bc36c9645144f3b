//! Recording an attempt's outcome: `COMPLETED` with its result, or
//! `FAILED`. Both are token-checked writes that always go to the store
//! (see [`StoreCall::observed`]).

use std::future::Future;
use std::time::Duration;

use super::IdempotencyChecker;
use super::instrument::StoreCall;
use crate::error::{IdempotencyError, Result};
use crate::record::Lease;
use crate::stats::bump;
use crate::store::ResultJson;

/// How an attempt ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Finish<'a> {
    /// Completed with this result's JSON text (`None`: it could not be
    /// stored), which the caller made by [`storable`](super::result::storable).
    Completed(Option<&'a ResultJson<'a>>),
    /// Failed with this error text.
    Failed(&'a str),
}

impl Finish<'_> {
    /// The store operation, as named in metrics and logs.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Completed(_) => "complete",
            Self::Failed(_) => "fail",
        }
    }
}

impl IdempotencyChecker {
    /// Records `lease`'s attempt as `finish` says; the record then lives `ttl`.
    pub(super) async fn finish(
        &self,
        lease: &Lease,
        finish: Finish<'_>,
        ttl: Duration,
    ) -> Result<()> {
        let span = match finish {
            Finish::Completed(_) => {
                tracing::debug_span!("idempotency.complete", key = %lease.key, attempt = lease.attempt)
            }
            Finish::Failed(_) => {
                tracing::debug_span!("idempotency.fail", key = %lease.key, attempt = lease.attempt)
            }
        };
        let result = self
            .store_call(StoreCall::observed(finish.name()), span, || {
                self.write(lease, finish, ttl)
            })
            .await;
        tracing::debug!(key = %lease.key, ok = result.is_ok(), "{}", finish.name());
        let counters = &self.inner.counters;
        match (&result, finish) {
            (Ok(()), Finish::Completed(_)) => bump(&counters.executed),
            (Ok(()), Finish::Failed(_)) => bump(&counters.failed),
            (Err(IdempotencyError::LeaseLost { .. }), finish) => {
                bump(&counters.lease_lost);
                if let Finish::Completed(_) = finish {
                    tracing::warn!(
                        attempt = lease.attempt,
                        "lease lost before completion; result not recorded"
                    );
                }
            }
            (Err(_), _) => {}
        }
        result
    }

    /// The store write that records `finish`.
    pub(super) fn write<'a>(
        &'a self,
        lease: &'a Lease,
        finish: Finish<'a>,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        let store = &self.inner.store;
        match finish {
            Finish::Completed(result) => store.complete(lease, result, ttl),
            Finish::Failed(error) => store.fail(lease, error, ttl),
        }
    }
}

//! Writes retried in the background: a completion the store did not take
//! after the handler ran, and the release of a claim whose reply was lost.

use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use super::finish::Finish;
use super::instrument::StoreCall;
use super::{Durations, IdempotencyChecker};
use crate::error::{IdempotencyError, StoreRefusal};
use crate::record::Lease;
use crate::store::ResultJson;

/// A write for an attempt, retried in the background.
enum LateWrite {
    /// Complete with this result's JSON text (`None`: it could not be
    /// stored).
    Complete(Option<ResultJson<'static>>),
    /// Fail the attempt (a claim whose outcome is unknown).
    Fail,
}

/// Whether a write that failed with `error` may succeed if tried again
/// later: the store was unavailable (or the breaker open), or it refused
/// the write for lack of memory, which frees up as records expire.
pub(super) fn may_land_later(error: &IdempotencyError) -> bool {
    error.is_unavailable()
        || matches!(
            error,
            IdempotencyError::StoreRefused {
                reason: StoreRefusal::OutOfMemory,
                ..
            }
        )
}

impl IdempotencyChecker {
    /// After a claim that failed with the store unavailable, the claim may
    /// still have been applied under `token`. Keep trying, for up to one
    /// lease, to fail that attempt: a token-checked write that changes nothing
    /// unless the claim really landed, in which case the key becomes
    /// retryable at once instead of blocked until the lease expires.
    ///
    /// The tries go through the circuit breaker: while it is open they wait
    /// instead of adding load to a store that is down.
    pub(super) fn release_uncertain_claim(&self, key: &str, token: &str, durations: Durations) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lease = Lease {
            key: key.into(),
            token: token.into(),
            attempt: 0,
            expires_at: Utc::now(),
            taken_over: false,
            version: None,
        };
        self.write_later(&runtime, lease, LateWrite::Fail, durations, durations.lease);
    }

    /// After the handler ran and its completion could not be written (the
    /// store was unavailable, or refused it for lack of memory): keep
    /// trying, for up to `ttl`, to record it. A token-checked write: it lands
    /// only if the attempt still holds the key, and then duplicates replay
    /// the result (or get `ResultNotStored`, for `None`) instead of running
    /// again.
    pub(super) fn complete_later(
        &self,
        lease: Lease,
        result: Option<ResultJson<'static>>,
        durations: Durations,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.write_later(
            &runtime,
            lease,
            LateWrite::Complete(result),
            durations,
            durations.ttl,
        );
    }

    /// Retries, in the background and through the circuit breaker, a
    /// `complete` or a `fail` of `lease` while the store is unavailable or
    /// out of memory, for up to `give_up_after`.
    fn write_later(
        &self,
        runtime: &tokio::runtime::Handle,
        lease: Lease,
        write: LateWrite,
        durations: Durations,
        give_up_after: Duration,
    ) {
        let checker = self.clone();
        runtime.spawn(async move {
            let give_up = Instant::now() + give_up_after;
            let mut pause = Duration::from_millis(100);
            while Instant::now() < give_up {
                let finish = match &write {
                    LateWrite::Complete(result) => Finish::Completed(result.as_ref()),
                    LateWrite::Fail => {
                        Finish::Failed("claim outcome unknown: the store did not answer")
                    }
                };
                let call = StoreCall::gated(finish.name()).in_background();
                let written = checker
                    .store_call(call, tracing::Span::none(), || {
                        checker.write(&lease, finish, durations.ttl)
                    })
                    .await;
                match written {
                    Err(e) if may_land_later(&e) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    _ => return,
                }
            }
        });
    }
}

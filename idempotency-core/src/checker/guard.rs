//! [`IdempotencyGuard`]: the manual style (claim, do the work, complete or
//! fail), and the lease heartbeat [`process`](IdempotencyChecker::process)
//! runs beside a handler.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::claim::Claimed;
use super::finish::Finish;
use super::instrument::StoreCall;
use super::result::{storable, stored_result};
use super::{Durations, IdempotencyChecker, KeyedRequest};
use crate::envelope::EventEnvelope;
use crate::error::{IdempotencyError, Result};
use crate::record::{IdempotencyRecord, Lease};

impl IdempotencyChecker {
    /// Claims the envelope's key and returns a guard for the manual style.
    /// See [`IdempotencyGuard`].
    ///
    /// When the store is unavailable (or the circuit breaker is open) this
    /// returns [`StoreUnavailable`](IdempotencyError::StoreUnavailable) (or
    /// [`CircuitOpen`](IdempotencyError::CircuitOpen)) even
    /// with [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) on:
    /// the manual style leaves that decision to the caller.
    pub async fn guard<P: Serialize>(
        &self,
        envelope: &EventEnvelope<P>,
    ) -> Result<IdempotencyGuard> {
        let request = self.envelope_request(envelope)?;
        self.guard_request(request).await
    }

    /// Like [`guard`](Self::guard), for a key-based request.
    pub async fn guard_request(&self, request: KeyedRequest<'_>) -> Result<IdempotencyGuard> {
        let (claimed, durations, _) = self.claim_key(&request).await?;
        Ok(IdempotencyGuard::new(self.clone(), claimed, durations))
    }
}

#[derive(Debug)]
enum GuardState {
    Held(Lease),
    Duplicate(IdempotencyRecord),
    InProgress(IdempotencyRecord),
    Finished,
}

/// The manual guard: Rust's answer to a context manager.
///
/// Get one from [`IdempotencyChecker::guard`]. If it holds the key, do the
/// work and call [`complete`](Self::complete) or [`fail`](Self::fail). A guard
/// dropped while holding the key (an early return, `?`, a panic, a cancelled
/// task) records the attempt as `FAILED` in the background, so the next
/// delivery retries. If it does not hold the key,
/// [`is_duplicate`](Self::is_duplicate) is true and
/// [`cached_result`](Self::cached_result) has the first attempt's result once
/// it completed.
///
/// The guard does not renew its lease by itself: finish within
/// `lease`, or call [`renew`](Self::renew).
///
/// ```
/// use idempotency_core::{EventEnvelope, IdempotencyChecker, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idempotency_core::IdempotencyError> {
/// let checker = IdempotencyChecker::new(MemoryStore::new());
/// let event = EventEnvelope::new("user.signed_up", serde_json::json!({"user": 7}));
///
/// let guard = checker.guard(&event).await?;
/// if guard.is_duplicate() {
///     let earlier: Option<u32> = guard.cached_result()?;
///     println!("already handled: {earlier:?}");
/// } else {
///     let welcome_mail_id = 42u32; // ... the side effect ...
///     guard.complete(&welcome_mail_id).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a guard dropped while holding its key records the attempt as failed"]
pub struct IdempotencyGuard {
    checker: IdempotencyChecker,
    state: GuardState,
    durations: Durations,
}

impl IdempotencyGuard {
    /// A guard for what the claim found.
    pub(super) fn new(checker: IdempotencyChecker, claimed: Claimed, durations: Durations) -> Self {
        Self {
            checker,
            state: match claimed {
                Claimed::Acquired(lease) => GuardState::Held(lease),
                Claimed::Duplicate(record) => GuardState::Duplicate(record),
                Claimed::InProgress(record) => GuardState::InProgress(record),
            },
            durations,
        }
    }

    /// Whether another attempt already has this key (completed or running),
    /// so this caller must not do the work.
    pub fn is_duplicate(&self) -> bool {
        matches!(
            self.state,
            GuardState::Duplicate(_) | GuardState::InProgress(_)
        )
    }

    /// Whether the key is held by another attempt that is still running.
    pub fn is_in_progress(&self) -> bool {
        matches!(self.state, GuardState::InProgress(_))
    }

    /// The first attempt's result, when the key was already `COMPLETED`.
    pub fn cached_result<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match &self.state {
            GuardState::Duplicate(record) => {
                let key = record.idempotency_key.as_deref().unwrap_or_default();
                let value = stored_result(key, record)?;
                Ok(Some(serde_json::from_value(value)?))
            }
            _ => Ok(None),
        }
    }

    /// The record found by the claim when this caller did not get the key.
    pub fn record(&self) -> Option<&IdempotencyRecord> {
        match &self.state {
            GuardState::Duplicate(record) | GuardState::InProgress(record) => Some(record),
            _ => None,
        }
    }

    /// The lease, when this caller holds the key.
    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            GuardState::Held(lease) => Some(lease),
            _ => None,
        }
    }

    fn held(&self) -> Result<&Lease> {
        match &self.state {
            GuardState::Held(lease) => Ok(lease),
            GuardState::Duplicate(r) | GuardState::InProgress(r) => {
                Err(IdempotencyError::LeaseLost {
                    key: r.idempotency_key.clone().unwrap_or_default(),
                })
            }
            GuardState::Finished => Err(IdempotencyError::LeaseLost { key: String::new() }),
        }
    }

    /// Extends the lease by `lease` from now.
    pub async fn renew(&mut self) -> Result<()> {
        let lease = self.held()?;
        let span = tracing::debug_span!("idempotency.renew", key = %lease.key);
        let renewed = self
            .checker
            .store_call(StoreCall::observed("renew"), span, || {
                self.checker.inner.store.renew(lease, self.durations.lease)
            })
            .await?;
        self.state = GuardState::Held(renewed);
        Ok(())
    }

    /// Records `result` as the key's result. Fails with
    /// [`IdempotencyError::LeaseLost`] if this caller does not hold the key
    /// (anymore).
    pub async fn complete<T: Serialize + ?Sized>(mut self, result: &T) -> Result<()> {
        let mut text = Vec::new();
        let json = storable(result, &mut text)?;
        self.finish(Finish::Completed(Some(&json))).await
    }

    /// Records the attempt as `FAILED` with `error`, so the next delivery retries.
    pub async fn fail(mut self, error: &str) -> Result<()> {
        self.finish(Finish::Failed(error)).await
    }

    /// Records how the attempt ended; the guard then holds nothing.
    pub(super) async fn finish(&mut self, finish: Finish<'_>) -> Result<()> {
        self.finish_returning(finish).await.0
    }

    /// [`finish`](Self::finish), handing back the lease it held (for a
    /// caller that retries the write later), so no copy is made up front.
    /// The guard holds the lease until the write is over: cancelled midway,
    /// it records the attempt as failed, as [`Drop`] says.
    pub(super) async fn finish_returning(
        &mut self,
        finish: Finish<'_>,
    ) -> (Result<()>, Option<Lease>) {
        let lease = match self.held() {
            Ok(lease) => lease,
            Err(e) => return (Err(e), None),
        };
        let result = self.checker.finish(lease, finish, self.durations.ttl).await;
        match std::mem::replace(&mut self.state, GuardState::Finished) {
            GuardState::Held(lease) => (result, Some(lease)),
            _ => (result, None),
        }
    }

    /// Renews the lease every third of the lease until dropped (sooner after
    /// a failed renewal). Never returns. Each renewed lease replaces the one
    /// the guard holds, so the completion writes under the latest (its
    /// [`version`](Lease::version) is what the store compares).
    pub(super) fn heartbeat(&mut self) -> impl Future<Output = Infallible> + '_ {
        let lease_duration = self.durations.lease;
        async move {
            if self.lease().is_none() {
                return std::future::pending().await;
            }
            let every = (lease_duration / 3).max(Duration::from_millis(1));
            let mut pause = every;
            loop {
                tokio::time::sleep(pause).await;
                let GuardState::Held(lease) = &self.state else {
                    return std::future::pending().await;
                };
                let checker = &self.checker;
                let span = tracing::debug_span!("idempotency.renew", key = %lease.key);
                let renewed = checker
                    .store_call(StoreCall::observed("renew").in_background(), span, || {
                        checker.inner.store.renew(lease, lease_duration)
                    })
                    .await;
                match renewed {
                    Ok(renewed) => {
                        self.state = GuardState::Held(renewed);
                        pause = every;
                    }
                    Err(IdempotencyError::LeaseLost { .. }) => {
                        tracing::warn!(
                            attempt = lease.attempt,
                            "lease lost while the handler runs; its completion will be refused"
                        );
                        return std::future::pending().await;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error.redacted(), "could not renew the lease; trying again soon");
                        pause = (every / 4).max(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

impl Drop for IdempotencyGuard {
    fn drop(&mut self) {
        let GuardState::Held(lease) = std::mem::replace(&mut self.state, GuardState::Finished)
        else {
            return;
        };
        let checker = self.checker.clone();
        let ttl = self.durations.ttl;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let dropped = Finish::Failed("the attempt was dropped before it completed");
                    let _ = checker.finish(&lease, dropped, ttl).await;
                });
            }
            Err(_) => tracing::warn!(
                "an idempotency guard was dropped outside a Tokio runtime; its key stays PROCESSING until the lease expires"
            ),
        }
    }
}

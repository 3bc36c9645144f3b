//! [`process`](IdempotencyChecker::process): claim, run the handler under a
//! renewed lease, record its outcome; and fail-open, the unguarded run when
//! the store is unavailable.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Instant;

use super::claim::Claimed;
use super::finish::Finish;
use super::repair::may_land_later;
use super::result::{replay, storable};
use super::{IdempotencyChecker, IdempotencyGuard, KeyedRequest, new_token};
use crate::envelope::EventEnvelope;
use crate::error::{IdempotencyError, Result};
use crate::record::{IdempotencyRecord, Lease};
use crate::stats::{bump, handler_latency};
use crate::store::ResultJson;

tokio::task_local! {
    static CURRENT_LEASE: Lease;
}

/// The lease of the attempt running on this task, inside a handler run by
/// [`IdempotencyChecker::process`] (or an `#[idempotent]` function); `None`
/// elsewhere. Its `token` is the fencing token for the handler's own writes;
/// `expires_at` is as of the claim (the lease is renewed in the background).
pub fn current_lease() -> Option<Lease> {
    CURRENT_LEASE.try_with(Lease::clone).ok()
}

/// What [`IdempotencyChecker::process`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran (this call held the key) and returned this value.
    Executed(T),
    /// The key was already completed; this is the first attempt's result,
    /// decoded from the record. The handler did not run.
    Replayed(T),
}

impl<T> Processed<T> {
    /// The value, executed or replayed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Executed(v) | Self::Replayed(v) => v,
        }
    }

    /// A reference to the value.
    pub fn value(&self) -> &T {
        match self {
            Self::Executed(v) | Self::Replayed(v) => v,
        }
    }

    /// Whether the handler ran in this call.
    pub fn was_executed(&self) -> bool {
        matches!(self, Self::Executed(_))
    }

    /// Whether the value was replayed from an earlier attempt.
    pub fn was_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

impl IdempotencyChecker {
    /// Runs `handler` at most once per effective key of `envelope`.
    ///
    /// - The key is claimed atomically. The first caller runs the handler,
    ///   which gets the [`Lease`] (its `token` fences the handler's own writes);
    ///   the lease is renewed in the background while the handler runs.
    /// - `Ok(v)` is recorded as `COMPLETED` and returned as
    ///   [`Processed::Executed`]; later calls get [`Processed::Replayed`] with
    ///   `v` decoded from the record (or [`IdempotencyError::Duplicate`] under
    ///   [`DuplicatePolicy::Error`](crate::DuplicatePolicy::Error)).
    /// - `Err(e)` is recorded as `FAILED` with `e`'s text and returned; the next
    ///   call runs the handler again.
    /// - A panic is recorded as `FAILED` and then resumed.
    /// - While another attempt runs, the call fails with
    ///   [`IdempotencyError::InProgress`] (or waits, under
    ///   [`InProgressPolicy::Wait`](crate::InProgressPolicy::Wait)).
    /// - If the store cannot be reached (or the circuit breaker is open) the
    ///   handler does not run and
    ///   [`StoreUnavailable`](IdempotencyError::StoreUnavailable) is
    ///   returned (fail closed), unless
    ///   [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) is on:
    ///   then the handler runs unguarded and its value comes back as
    ///   [`Processed::Executed`].
    pub async fn process<P, T, E, F, Fut>(
        &self,
        envelope: &EventEnvelope<P>,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        P: Serialize,
        T: Serialize + DeserializeOwned,
        E: From<IdempotencyError> + std::fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let request = self.envelope_request(envelope)?;
        self.process_request(request, handler).await
    }

    /// [`process`](Self::process) for a key-based request: the path the macro
    /// and the HTTP layer take, and the consume core (NATS) through its
    /// crate-private twin, which also hands back the result's JSON text.
    // An `async fn` in all but name: the future is `process_keyed`'s, with
    // no second state machine around it.
    pub fn process_request<T, E, F, Fut>(
        &self,
        request: KeyedRequest<'_>,
        handler: F,
    ) -> impl Future<Output = Result<Processed<T>, E>>
    where
        T: Serialize + DeserializeOwned,
        E: From<IdempotencyError> + std::fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.process_keyed(request, handler)
            .map(|outcome| outcome.map(|(processed, _)| processed))
    }

    /// [`process_request`](Self::process_request), also handing back the
    /// result's JSON text when the handler ran here and the result was
    /// recorded (or is being recorded in the background, after a missed
    /// completion): the consume core answers with it rather than
    /// serializing the value a second time. `None` for a replayed value and
    /// a fail-open run.
    pub(crate) async fn process_keyed<T, E, F, Fut>(
        &self,
        request: KeyedRequest<'_>,
        handler: F,
    ) -> Result<(Processed<T>, Option<Vec<u8>>), E>
    where
        T: Serialize + DeserializeOwned,
        E: From<IdempotencyError> + std::fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (claimed, durations, key) = match self.claim_key(&request).await {
            Ok(claimed) => claimed,
            Err(error) if error.is_unavailable() && self.inner.config.fail_open => {
                return self
                    .run_unguarded(&request, &error, handler)
                    .await
                    .map(|processed| (processed, None));
            }
            Err(error) => return Err(E::from(error)),
        };
        let lease = match claimed {
            Claimed::Acquired(lease) => lease,
            Claimed::Duplicate(record) => {
                let policy = request
                    .on_duplicate
                    .unwrap_or(self.inner.config.on_duplicate);
                return replay(policy, key, record)
                    .map(|processed| (processed, None))
                    .map_err(E::from);
            }
            Claimed::InProgress(record) => {
                return Err(E::from(IdempotencyError::InProgress {
                    key,
                    attempt: record.attempts,
                }));
            }
        };
        let attempt = lease.attempt;
        let mut guard =
            IdempotencyGuard::new(self.clone(), Claimed::Acquired(lease.clone()), durations);

        let run = AssertUnwindSafe(
            CURRENT_LEASE.scope(lease.clone(), async move { handler(lease).await }),
        )
        .catch_unwind();
        let started = Instant::now();
        let outcome = {
            let heartbeat = guard.heartbeat();
            tokio::pin!(run, heartbeat);
            tokio::select! {
                biased;
                outcome = &mut run => outcome,
                never = &mut heartbeat => match never {},
            }
        };
        handler_latency(started);
        let mut text = Vec::new();
        match outcome {
            Ok(Ok(value)) => match storable(&value, &mut text) {
                Ok(json) => match guard.finish_returning(Finish::Completed(Some(&json))).await {
                    (Ok(()), _) => {
                        self.remember(&key, &request, attempt, &json, durations.ttl);
                        Ok((Processed::Executed(value), Some(text)))
                    }
                    // The side effects happened: report them, and keep
                    // trying to record them. Returning an error would only
                    // invite a redelivery that runs the handler again.
                    (Err(e), Some(held)) if may_land_later(&e) => {
                        tracing::warn!(
                            error = %e.redacted(),
                            "the handler ran but the store did not take its completion; retrying it in the background"
                        );
                        self.complete_later(held, Some(json.into_owned()), durations);
                        Ok((Processed::Executed(value), Some(text)))
                    }
                    (Err(e), _) => Err(E::from(e)),
                },
                Err(e) => {
                    // The side effects happened: record the key as done with
                    // no result rather than failed, so it never runs again;
                    // duplicates get `ResultNotStored`, never a made-up value.
                    match guard.finish_returning(Finish::Completed(None)).await {
                        (Ok(()), _) => {}
                        (Err(store_error), Some(held)) if may_land_later(&store_error) => {
                            tracing::warn!(error = %store_error.redacted(), "could not record the completed attempt yet; retrying it in the background");
                            self.complete_later(held, None, durations);
                        }
                        (Err(store_error), _) => {
                            tracing::warn!(error = %store_error.redacted(), "could not record the completed attempt");
                        }
                    }
                    Err(E::from(IdempotencyError::Serialization(e)))
                }
            },
            Ok(Err(error)) => {
                if let Err(store_error) = guard.finish(Finish::Failed(&error.to_string())).await {
                    tracing::warn!(error = %store_error.redacted(), "could not record the failed attempt; its lease will expire");
                }
                Err(error)
            }
            Err(panic) => {
                if let Err(store_error) = guard.finish(Finish::Failed("handler panicked")).await {
                    tracing::warn!(error = %store_error.redacted(), "could not record the panicked attempt; its lease will expire");
                }
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Fail open: the claim failed with the store unavailable, so run the
    /// handler with no record at all (see
    /// [`IdempotencyConfigBuilder::fail_open`](crate::IdempotencyConfigBuilder::fail_open)).
    async fn run_unguarded<T, E, F, Fut>(
        &self,
        request: &KeyedRequest<'_>,
        cause: &IdempotencyError,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        E: From<IdempotencyError>,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let storage = self.storage_key(request.key)?;
        bump(&self.inner.counters.fail_open);
        // No key or payload at warn level: raw keys may be personal data.
        tracing::warn!(
            error = %cause.redacted(),
            circuit_open = cause.is_circuit_open(),
            event_type = request.event_type,
            "store unavailable: running the handler unguarded (fail_open); a redelivery will run it again"
        );
        tracing::debug!(key = %storage, "unguarded run");
        let lease_for = request.lease.unwrap_or(self.inner.config.lease);
        let lease = Lease {
            key: storage.into(),
            token: new_token().into(),
            attempt: 0,
            expires_at: crate::store::after(Utc::now(), lease_for),
            taken_over: false,
            version: None,
        };
        let started = Instant::now();
        let value = CURRENT_LEASE
            .scope(lease.clone(), async move { handler(lease).await })
            .await;
        handler_latency(started);
        value.map(Processed::Executed)
    }

    /// Puts this process's own completion into the local replay cache, as
    /// the record the store now holds.
    fn remember(
        &self,
        key: &str,
        request: &KeyedRequest<'_>,
        attempt: u32,
        result: &ResultJson<'_>,
        ttl: Duration,
    ) {
        let Some(cache) = &self.inner.cache else {
            return;
        };
        // A retry without a fingerprint may complete a record that carries
        // an earlier attempt's fingerprint, which this process does not know:
        // leave such a record to be cached from the store's answer.
        if request.fingerprint.is_none() && attempt > 1 {
            return;
        }
        // The text was serialized from the result within the depth limit,
        // so it reads back; should it not, the next duplicate asks the store.
        let Ok(result) = serde_json::from_str(result.get()) else {
            return;
        };
        let record =
            IdempotencyRecord::completed(result, attempt, request.fingerprint.clone(), Utc::now());
        cache.put(key, record, Some(ttl));
    }
}

//! The one claim path: validate the key, answer from the local replay
//! cache if it can, claim in the store, apply the in-progress policy.

use std::time::Duration;

use tokio::time::Instant;

use super::instrument::StoreCall;
use super::{Durations, IdempotencyChecker, KeyedRequest, new_token};
use crate::config::{InProgressPolicy, check_duration};
use crate::error::{IdempotencyError, Result};
use crate::key::stored_key;
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease};
use crate::stats::bump;
use crate::store::ClaimRequest;

/// Where a claim (after the in-progress policy) left a request.
pub(super) enum Claimed {
    Acquired(Lease),
    Duplicate(IdempotencyRecord),
    InProgress(IdempotencyRecord),
}

impl Claimed {
    fn name(&self) -> &'static str {
        match self {
            Self::Acquired(_) => "acquired",
            Self::Duplicate(_) => "duplicate",
            Self::InProgress(_) => "in_progress",
        }
    }
}

impl From<Claimed> for ClaimOutcome {
    fn from(claimed: Claimed) -> Self {
        match claimed {
            Claimed::Acquired(lease) => Self::Acquired(lease),
            Claimed::Duplicate(record) => Self::Duplicate(record),
            Claimed::InProgress(record) => Self::InProgress(record),
        }
    }
}

impl IdempotencyChecker {
    /// The one claim path: validate, claim, apply the in-progress policy.
    pub(super) async fn claim_key(
        &self,
        request: &KeyedRequest<'_>,
    ) -> Result<(Claimed, Durations, String)> {
        let config = &self.inner.config;
        let key = stored_key(request.key, config)?;
        // The configuration's durations were checked when it was built; a
        // request's own are checked here.
        let durations = Durations {
            ttl: request
                .ttl
                .map_or(Ok(config.ttl), |d| check_duration("ttl", d))?,
            lease: request
                .lease
                .map_or(Ok(config.lease), |d| check_duration("lease", d))?,
        };
        if let Some(record) = self.inner.cache.as_ref().and_then(|c| c.get(&key.storage)) {
            if let (Some(theirs), Some(ours)) = (&record.fingerprint, &request.fingerprint)
                && theirs != ours
            {
                bump(&self.inner.counters.fingerprint_mismatches);
                return Err(IdempotencyError::FingerprintMismatch { key: key.storage });
            }
            bump(&self.inner.counters.replayed);
            bump(&self.inner.counters.cache_hits);
            return Ok((Claimed::Duplicate(record), durations, key.storage));
        }
        let token = new_token();
        let claim = ClaimRequest {
            key: &key.storage,
            recorded_key: key.recorded(),
            // The store contract: absent is `None`, never an empty string.
            event_id: request.event_id.filter(|s| !s.is_empty()),
            event_type: request.event_type.filter(|s| !s.is_empty()),
            fingerprint: request.fingerprint.as_deref().filter(|s| !s.is_empty()),
            token: &token,
            lease: durations.lease,
            ttl: durations.ttl,
        };
        let deadline = match request.on_in_progress.unwrap_or(config.on_in_progress) {
            InProgressPolicy::Wait(bound) => Some(Instant::now() + bound),
            InProgressPolicy::Error => None,
        };
        let mut pause = Duration::from_millis(10);
        loop {
            let span = tracing::debug_span!("idempotency.claim", key = %key.storage);
            let outcome = self
                .store_call(StoreCall::gated("claim"), span, || {
                    self.inner.store.claim(&claim)
                })
                .await;
            let outcome = match outcome {
                Err(e @ IdempotencyError::FingerprintMismatch { .. }) => {
                    bump(&self.inner.counters.fingerprint_mismatches);
                    return Err(e);
                }
                Err(e @ IdempotencyError::StoreUnavailable { .. }) => {
                    // The claim may have been applied before the error (a
                    // timeout): release it in the background, or its key
                    // would stay blocked for a whole lease.
                    self.release_uncertain_claim(&key.storage, &token, durations);
                    return Err(e);
                }
                // Refused by the open breaker (`CircuitOpen`): nothing was
                // sent, nothing to release.
                other => other?,
            };
            let claimed = match outcome {
                ClaimOutcome::Acquired(lease) => {
                    if lease.taken_over {
                        bump(&self.inner.counters.lease_takeovers);
                        tracing::info!(
                            attempt = lease.attempt,
                            "took over an attempt whose lease ran out"
                        );
                    }
                    Claimed::Acquired(lease)
                }
                ClaimOutcome::Duplicate(record) => {
                    bump(&self.inner.counters.replayed);
                    if let Some(cache) = &self.inner.cache {
                        cache.put(&key.storage, record.clone(), None);
                    }
                    Claimed::Duplicate(record)
                }
                ClaimOutcome::InProgress(record) => {
                    let now = Instant::now();
                    if let Some(deadline) = deadline.filter(|d| *d > now) {
                        tokio::time::sleep(pause.min(deadline - now)).await;
                        pause = (pause * 2).min(Duration::from_millis(250));
                        continue;
                    }
                    bump(&self.inner.counters.in_progress);
                    Claimed::InProgress(record)
                }
            };
            tracing::debug!(key = %key.storage, outcome = claimed.name(), "claim");
            return Ok((claimed, durations, key.storage));
        }
    }
}

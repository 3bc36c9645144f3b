//! Reads and deletes by raw key, and the manual `mark_*` calls (claim,
//! then complete or fail, with no guard and no renewal).

use chrono::Utc;
use serde::Serialize;

use super::IdempotencyChecker;
use super::finish::Finish;
use super::instrument::StoreCall;
use super::result::storable;
use crate::envelope::EventEnvelope;
use crate::error::Result;
use crate::key::stored_key;
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease, RecordStatus};

impl IdempotencyChecker {
    /// The record for a raw idempotency key, whatever its status.
    pub async fn get_record(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let key = stored_key(key, &self.inner.config)?;
        let record = self
            .store_call(StoreCall::gated("get"), tracing::Span::none(), || {
                self.inner.store.get(&key.storage)
            })
            .await?;
        Ok(record.map(|mut record| {
            if record.idempotency_key.is_none() {
                record.idempotency_key = Some(key.recorded().to_owned());
            }
            record
        }))
    }

    /// Whether a new delivery of `key` should be skipped: the key is
    /// `COMPLETED`, or `PROCESSING` under a live lease. A `FAILED` key is not a
    /// duplicate: its retry runs.
    ///
    /// This is a read for dashboards and pre-checks; it decides nothing. The
    /// atomic decision is the claim made by [`process`](Self::process),
    /// [`guard`](Self::guard) and [`claim`](Self::claim).
    /// Lease liveness is judged here by this host's clock.
    pub async fn would_skip(&self, key: &str) -> Result<bool> {
        Ok(self.get_record(key).await?.is_some_and(|r| {
            r.status == RecordStatus::Completed || r.is_live_processing(Utc::now())
        }))
    }

    /// Deletes the record of a raw idempotency key (so the key is processed
    /// again); returns whether there was one.
    ///
    /// With the local replay cache on, the key is also dropped from this
    /// checker's cache (other processes' caches keep their entry until it
    /// expires; see [`IdempotencyConfigBuilder::local_cache`](crate::IdempotencyConfigBuilder::local_cache)).
    pub async fn delete_record(&self, key: &str) -> Result<bool> {
        let storage = self.storage_key(key)?;
        self.forget(&storage);
        let deleted = self
            .store_call(StoreCall::gated("delete"), tracing::Span::none(), || {
                self.inner.store.delete(&storage)
            })
            .await;
        // A duplicate answered by the store while the delete was in flight
        // may have cached the record again.
        self.forget(&storage);
        deleted
    }

    fn forget(&self, storage: &str) {
        if let Some(cache) = &self.inner.cache {
            cache.remove(storage);
        }
    }

    /// Claims the envelope's key: the low-level first step. On
    /// [`ClaimOutcome::Acquired`] the caller must finish with
    /// [`complete`](Self::complete) or
    /// [`fail`](Self::fail) before the lease
    /// (`lease`) runs out; nothing renews it. Prefer
    /// [`process`](Self::process) or [`guard`](Self::guard).
    pub async fn claim<P: Serialize>(&self, envelope: &EventEnvelope<P>) -> Result<ClaimOutcome> {
        let request = self.envelope_request(envelope)?;
        let (claimed, _, _) = self.claim_key(&request).await?;
        Ok(claimed.into())
    }

    /// Records `result` for a lease from [`claim`](Self::claim).
    /// Fails with [`IdempotencyError::LeaseLost`](crate::IdempotencyError::LeaseLost) if the lease was taken over.
    pub async fn complete<T: Serialize + ?Sized>(&self, lease: &Lease, result: &T) -> Result<()> {
        let mut text = Vec::new();
        let json = storable(result, &mut text)?;
        let completed = Finish::Completed(Some(&json));
        self.finish(lease, completed, self.inner.config.ttl).await
    }

    /// Records a failure for a lease from [`claim`](Self::claim),
    /// so the next delivery retries.
    pub async fn fail(&self, lease: &Lease, error: &str) -> Result<()> {
        let failed = Finish::Failed(error);
        self.finish(lease, failed, self.inner.config.ttl).await
    }
}

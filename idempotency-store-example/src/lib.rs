//! A store written outside `idempotency-core`, with its public API only:
//! what a store author reads first.
//!
//! [`HashMapStore`] keeps its records in one `HashMap` behind one mutex.
//! It writes none of the state machine's rules itself: inside each locked
//! step it reads the record, asks [`decide_claim`] or [`decide_finish`]
//! what to do, and does it. `tests/conformance.rs` runs the conformance
//! suite shipped in `idempotency_core::testing` against it.
//!
//! It is an example, not a store to use: one lock for every key, and
//! expired records are dropped only when their key is touched again.
//! `idempotency_core::MemoryStore` is the in-process store to use.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use idempotency_core::record::{ClaimDecision, FinishDecision, decide_claim, decide_finish};
use idempotency_core::{
    ClaimOutcome, ClaimRequest, IdempotencyError, IdempotencyRecord, IdempotencyStore, Lease,
    RecordStatus, Result, ResultJson, SeenSet, StoreAdmin, StoreSummary,
};

type Records = HashMap<String, IdempotencyRecord>;

/// Records in one `HashMap` behind one mutex, each keeping its time to live
/// in its [`expires_at`](IdempotencyRecord::expires_at).
#[derive(Debug, Default)]
pub struct HashMapStore {
    records: Mutex<Records>,
}

impl HashMapStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        // Every step leaves the map consistent, so a poisoned lock is usable.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token-checked transitions (`renew`, `complete`, `fail`): `write`
    /// runs only when [`decide_finish`] says [`FinishDecision::Apply`].
    fn finish(
        &self,
        lease: &Lease,
        target: RecordStatus,
        now: DateTime<Utc>,
        write: impl FnOnce(&mut IdempotencyRecord),
    ) -> Result<()> {
        let mut records = self.lock();
        let found = live(&mut records, lease.key(), now);
        let view = found.as_deref().map(IdempotencyRecord::view);
        match (decide_finish(view, lease.token(), target, false), found) {
            (FinishDecision::Apply, Some(record)) => {
                write(record);
                Ok(())
            }
            (FinishDecision::AlreadyApplied, _) => Ok(()),
            _ => Err(IdempotencyError::LeaseLost {
                key: lease.key().to_owned(),
            }),
        }
    }
}

/// The record at `key`, unless its time to live has run out: such a record
/// counts as absent, and is dropped here.
fn live<'a>(
    records: &'a mut Records,
    key: &str,
    now: DateTime<Utc>,
) -> Option<&'a mut IdempotencyRecord> {
    if records
        .get(key)
        .is_some_and(|r| r.expires_at.is_none_or(|at| at <= now))
    {
        records.remove(key);
    }
    records.get_mut(key)
}

/// `now + d`, saturating instead of overflowing.
fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A request's optional text, owned (absent is `None`, never `Some("")`).
fn given(text: Option<&str>) -> Option<String> {
    text.map(str::to_owned)
}

/// A `COMPLETED` record keeps only what a replay needs.
fn completed(
    result: Option<serde_json::Value>,
    attempts: u32,
    fingerprint: Option<String>,
    now: DateTime<Utc>,
    ttl: Duration,
) -> IdempotencyRecord {
    IdempotencyRecord {
        idempotency_key: None,
        event_id: None,
        event_type: None,
        status: RecordStatus::Completed,
        result,
        error: None,
        first_seen_at: None,
        completed_at: Some(now),
        attempts,
        lease_token: None,
        lease_expires_at: None,
        fingerprint,
        expires_at: Some(after(now, ttl)),
    }
}

#[async_trait]
impl IdempotencyStore for HashMapStore {
    fn name(&self) -> &'static str {
        "hash-map"
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        let now = Utc::now();
        let mut records = self.lock();
        let found = live(&mut records, request.key, now).map(|r| &*r);
        let fingerprint = request.fingerprint;
        let decision = decide_claim(
            found.map(IdempotencyRecord::view),
            fingerprint,
            request.token,
            now,
        );
        match (decision, found) {
            (ClaimDecision::Acquire { attempt }, found) => {
                let lease_expires_at = after(now, request.lease);
                let record = IdempotencyRecord {
                    idempotency_key: Some(request.recorded_key.to_owned()),
                    event_id: given(request.event_id),
                    event_type: given(request.event_type),
                    status: RecordStatus::Processing,
                    result: None,
                    error: None,
                    first_seen_at: found.and_then(|r| r.first_seen_at).or(Some(now)),
                    completed_at: None,
                    attempts: attempt,
                    lease_token: Some(request.token.to_owned()),
                    lease_expires_at: Some(lease_expires_at),
                    fingerprint: given(fingerprint)
                        .or_else(|| found.and_then(|r| r.fingerprint.clone())),
                    // The record lives at least as long as its lease.
                    expires_at: Some(after(now, request.ttl.max(request.lease))),
                };
                let taken_over = found.is_some_and(|r| r.status == RecordStatus::Processing);
                records.insert(request.key.to_owned(), record);
                Ok(ClaimOutcome::Acquired(
                    Lease::new(request.key, request.token, attempt, lease_expires_at)
                        .with_taken_over(taken_over),
                ))
            }
            (ClaimDecision::AlreadyHeld, Some(record)) => Ok(ClaimOutcome::Acquired(Lease::new(
                request.key,
                request.token,
                record.attempts,
                record.lease_expires_at.unwrap_or(now),
            ))),
            (ClaimDecision::Duplicate, Some(record)) => Ok(ClaimOutcome::Duplicate(record.clone())),
            (ClaimDecision::InProgress, Some(record)) => {
                Ok(ClaimOutcome::InProgress(record.clone()))
            }
            (ClaimDecision::FingerprintMismatch, _) => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            (
                ClaimDecision::AlreadyHeld | ClaimDecision::Duplicate | ClaimDecision::InProgress,
                None,
            ) => {
                unreachable!("decide_claim acquires an absent key")
            }
        }
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let now = Utc::now();
        let until = after(now, lease_duration);
        self.finish(lease, RecordStatus::Processing, now, |record| {
            record.lease_expires_at = Some(until);
            record.expires_at = record.expires_at.max(Some(until));
        })?;
        Ok(lease.clone().with_expiry(until))
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&ResultJson<'_>>,
        ttl: Duration,
    ) -> Result<()> {
        // The checker hands over the result's JSON text; this store keeps
        // records as values, so it parses the text once, here.
        let result = result
            .map(|json| serde_json::from_str::<serde_json::Value>(json.get()))
            .transpose()?;
        let now = Utc::now();
        self.finish(lease, RecordStatus::Completed, now, |record| {
            let fingerprint = record.fingerprint.take();
            *record = completed(result, record.attempts, fingerprint, now, ttl);
        })
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let now = Utc::now();
        self.finish(lease, RecordStatus::Failed, now, |record| {
            // The token stays: a repeated `fail` by the same attempt is applied.
            record.status = RecordStatus::Failed;
            record.error = Some(error.to_owned());
            record.lease_expires_at = None;
            record.expires_at = Some(after(now, ttl));
        })
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        Ok(live(&mut self.lock(), key, Utc::now()).map(|r| r.clone()))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut records = self.lock();
        let existed = live(&mut records, key, Utc::now()).is_some();
        records.remove(key);
        Ok(existed)
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl SeenSet for HashMapStore {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        let now = Utc::now();
        let mut records = self.lock();
        Ok(keys
            .iter()
            .map(|&key| {
                if live(&mut records, key, now).is_some() {
                    return false;
                }
                let mark = completed(Some(serde_json::Value::Null), 1, None, now, ttl);
                records.insert(key.to_owned(), mark);
                true
            })
            .collect())
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let now = Utc::now();
        let mut records = self.lock();
        Ok(keys
            .iter()
            .map(|&key| live(&mut records, key, now).is_some())
            .collect())
    }
}

#[async_trait]
impl StoreAdmin for HashMapStore {
    async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>> {
        let now = Utc::now();
        let mut stuck: Vec<_> = self
            .lock()
            .iter()
            .filter(|(key, r)| {
                key.starts_with(prefix)
                    && r.status == RecordStatus::Processing
                    && r.expires_at.is_some_and(|at| at > now)
                    && !r.is_live_processing(now)
            })
            .map(|(key, r)| (key.clone(), r.clone()))
            .collect();
        stuck.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stuck)
    }

    async fn summary(&self, prefix: &str) -> Result<StoreSummary> {
        let now = Utc::now();
        let mut summary = StoreSummary::default();
        for (key, record) in self.lock().iter() {
            if key.starts_with(prefix) && record.expires_at.is_some_and(|at| at > now) {
                summary.count(Some(record), now);
            }
        }
        Ok(summary)
    }

    async fn clear_prefix(&self, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            return Err(IdempotencyError::Config {
                option: "prefix",
                reason: "refusing an empty prefix, which would delete every key".to_owned(),
            });
        }
        let now = Utc::now();
        let mut deleted = 0;
        self.lock().retain(|key, record| {
            let keep = !key.starts_with(prefix);
            deleted += u64::from(!keep && record.expires_at.is_some_and(|at| at > now));
            keep
        });
        Ok(deleted)
    }
}

//! The storage boundary: the [`IdempotencyStore`] trait and its implementations.
//!
//! A store keeps one [`IdempotencyRecord`] per storage key and moves it through
//! the state machine of [`crate::record`]. Every transition is one atomic
//! operation; no store does check-then-set. Stores never see raw configuration:
//! the checker hands them finished storage keys and durations.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease};

/// `now + d`, saturating instead of overflowing.
pub(crate) fn after(
    now: chrono::DateTime<chrono::Utc>,
    d: Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

/// Everything a store needs to claim a key.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The storage key (prefix included).
    pub key: &'a str,
    /// The value for the record's `idempotency_key` field.
    pub recorded_key: &'a str,
    /// The event id, written into the record.
    pub event_id: Option<&'a str>,
    /// The event type, written into the record.
    pub event_type: Option<&'a str>,
    /// The payload fingerprint; when both it and the stored one are present and
    /// differ, the claim fails with
    /// [`FingerprintMismatch`](crate::IdempotencyError::FingerprintMismatch).
    pub fingerprint: Option<&'a str>,
    /// The fencing token for the new lease. Chosen by the caller so that a
    /// claim retried after a timeout recognises its own first try.
    pub token: &'a str,
    /// How long the lease lives unless renewed.
    pub lease: Duration,
    /// How long the record lives.
    pub ttl: Duration,
}

/// The storage contract every backend implements.
///
/// Semantics (checked by the conformance suite in `tests/`):
/// - [`claim`](Self::claim) is one atomic operation: absent, `FAILED`, or
///   `PROCESSING` with an expired lease → [`ClaimOutcome::Acquired`] with the
///   request's token and attempt + 1; `COMPLETED` → [`ClaimOutcome::Duplicate`];
///   `PROCESSING` with a live lease → [`ClaimOutcome::InProgress`]; a
///   `PROCESSING` record holding the request's own token → `Acquired` (a retried
///   claim). A differing fingerprint is an error whatever the status.
/// - [`renew`](Self::renew), [`complete`](Self::complete) and
///   [`fail`](Self::fail) write only when the record is `PROCESSING` under the
///   lease's token, and otherwise fail with
///   [`LeaseLost`](crate::IdempotencyError::LeaseLost) having written nothing.
///   Repeating a `fail` that was applied succeeds (a `FAILED` record keeps
///   its token). A `COMPLETED` record keeps no token, so any later write to
///   it is `LeaseLost`; a store that retries a `complete` internally after a
///   lost reply must recognise its own applied first try.
/// - Records carry only the fields of their status (see
///   [`IdempotencyRecord`]), and reads fill in
///   [`IdempotencyRecord::expires_at`].
/// - Lease expiry is judged by the store's own clock.
/// - A value that is not a record is reported as
///   [`CorruptRecord`](crate::IdempotencyError::CorruptRecord), never a panic.
/// - [`mark`](Self::mark) writes only where no record exists (any value at
///   the key counts as seen) and answers in input order;
///   [`contains`](Self::contains) only reads.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug {
    /// A short name for messages: `"memory"`, `"redis"`.
    fn name(&self) -> &'static str;

    /// Claims `request.key`. See the trait docs for the outcomes.
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome>;

    /// Extends a held lease to `lease` from now; returns the lease with its new expiry.
    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease>;

    /// Marks the key `COMPLETED` with `result`; the record then lives `ttl`.
    ///
    /// `None` records the key as done with no result: the handler ran but its
    /// result could not be stored. Reads then return the record with
    /// `result: None`, which the checker answers to duplicates with
    /// [`ResultNotStored`](crate::IdempotencyError::ResultNotStored), and
    /// never as a replayed value. A JSON `null` result is `Some(&Value::Null)`
    /// and reads back as `Some(Value::Null)`.
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> Result<()>;

    /// Marks the key `FAILED` with `error`, so the next claim retries; the
    /// record then lives `ttl`.
    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()>;

    /// Reads the record at `key`.
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>>;

    /// Deletes the record at `key`; returns whether there was one.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Checks that the store answers.
    async fn health(&self) -> Result<()>;

    /// Marks each of `keys` as seen, atomically per key: where no record
    /// exists (whatever its status), writes a `COMPLETED` record with a null
    /// result that lives `ttl`, like Redis `SET key doc NX PX ttl`.
    ///
    /// Returns one answer per key, in order: `true` where this call wrote the
    /// mark, `false` where a record already existed, including one written
    /// by an earlier occurrence of the same key in `keys`. A mark is an
    /// ordinary `COMPLETED` record: a later [`claim`](Self::claim) of the key
    /// is a [`ClaimOutcome::Duplicate`]. A store that retries after a lost
    /// reply must recognise its own applied marks (and still answer `true`).
    /// This is what [`Deduplicator`](crate::Deduplicator) is built on.
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>>;

    /// Whether a record (of any status) exists at each of `keys`, in order.
    /// Reads only.
    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>>;
}

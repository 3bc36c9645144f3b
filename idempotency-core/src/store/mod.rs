//! The storage boundary: the [`IdempotencyStore`] trait and its implementations.
//!
//! A store keeps one [`IdempotencyRecord`] per storage key and moves it through
//! the state machine of [`crate::record`]. Every transition is one atomic
//! operation; no store does check-then-set. Stores never see raw configuration:
//! the checker hands them finished storage keys and durations.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease, RecordStatus};

pub use json::ResultJson;

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

// The stores this crate ships; their types are exported at the crate root.
pub(crate) mod json;
pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;

/// Everything a store needs to claim a key.
///
/// The checker makes these; a store reads them. `#[non_exhaustive]`: build
/// one (in a store's tests, say) with [`ClaimRequest::new`] and set the
/// optional fields.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClaimRequest<'a> {
    /// The storage key (prefix included).
    pub key: &'a str,
    /// The value for the record's `idempotency_key` field.
    pub recorded_key: &'a str,
    /// The event id, written into the record. The checker never passes
    /// `Some("")`: absent is `None`.
    pub event_id: Option<&'a str>,
    /// The event type, written into the record (`None` when absent, never
    /// `Some("")`).
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

impl<'a> ClaimRequest<'a> {
    /// A claim of `key` (the storage key, also recorded as the record's
    /// `idempotency_key`) under the fencing `token`, for a lease of `lease`
    /// and a record that lives `ttl`; no event id, event type or
    /// fingerprint.
    pub fn new(key: &'a str, token: &'a str, lease: Duration, ttl: Duration) -> Self {
        Self {
            key,
            recorded_key: key,
            event_id: None,
            event_type: None,
            fingerprint: None,
            token,
            lease,
            ttl,
        }
    }
}

/// The storage contract every backend implements.
///
/// Keys: `key` (in [`ClaimRequest`] and every call) is any non-empty UTF-8
/// string without control characters, prefix included, of up to a few
/// hundred bytes (the checker's `max_key_len` plus its prefix, or a
/// 64-character hash). Mapping it onto what the backend accepts is the
/// store's job (NATS KV, say, allows only `[-/_=.a-zA-Z0-9]` in a key), and
/// the mapping must be injective: two keys never share a record.
///
/// Semantics (checked by [`testing`](crate::testing), the conformance suite
/// behind the `testing` feature):
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
///
/// Two capabilities build on it: [`SeenSet`] (batch marks, what
/// [`Deduplicator`](crate::Deduplicator) needs) and [`StoreAdmin`] (what an
/// operator needs). Every store in this crate implements both.
///
/// Sharing: a checker keeps its store as a [`DynStore`] (an `Arc`), and
/// checkers, deduplicators and tasks share one store through it.
/// `RedisStore` is also `Clone`, as a handle: a clone shares the original's
/// connections and server. `MemoryStore` is not `Clone` (a copy of the
/// records would be a different store): share it through an `Arc`.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug {
    /// A short name for messages and metrics: `"memory"`, `"redis"`.
    fn name(&self) -> &'static str;

    /// Claims `request.key`. See the trait docs for the outcomes.
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome>;

    /// Extends a held lease to `lease` from now; returns the lease with its
    /// new expiry (and, for a store that versions its records, the new
    /// [`version`](Lease::version)).
    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease>;

    /// Marks the key `COMPLETED` with `result`; the record then lives `ttl`.
    ///
    /// `result` is the handler's result as JSON text ([`ResultJson`]),
    /// serialized once by the checker: store it as it is (a byte string, a
    /// `jsonb` column, a `result` field spliced into a document) and read it
    /// back as the [`IdempotencyRecord::result`] value.
    ///
    /// `None` records the key as done with no result: the handler ran but its
    /// result could not be stored. Reads then return the record with
    /// `result: None`, which the checker answers to duplicates with
    /// [`ResultNotStored`](crate::IdempotencyError::ResultNotStored), and
    /// never as a replayed value. A JSON `null` result is `Some` of the text
    /// `null` and reads back as `Some(Value::Null)`.
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&ResultJson<'_>>,
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
}

/// A store shared between checkers, deduplicators and tasks.
pub type DynStore = std::sync::Arc<dyn IdempotencyStore>;

/// A seen-set over the same records: marks many keys in one call, what
/// [`Deduplicator`](crate::Deduplicator) is built on.
///
/// A mark is an ordinary `COMPLETED` record with a `null` result, so a key
/// marked here is a [`ClaimOutcome::Duplicate`] to a checker on the same
/// store, and a key a checker completed counts as seen.
#[async_trait]
pub trait SeenSet: IdempotencyStore {
    /// Marks each of `keys` as seen, atomically per key: where no record
    /// exists (whatever its status), writes a `COMPLETED` record with a
    /// `null` result that lives `ttl`.
    ///
    /// Returns one answer per key, in order: `true` where this call wrote the
    /// mark, `false` where a record already existed, including one written
    /// by an earlier occurrence of the same key in `keys`. A store that
    /// retries after a lost reply must recognise its own applied marks (and
    /// still answer `true`).
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>>;

    /// Whether a record (of any status) exists at each of `keys`, in order.
    /// Reads only.
    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>>;
}

/// What an operator needs from a store, on any backend: the `idempotency`
/// command-line tool's `stuck`, `stats` and `clear`. Reading and deleting
/// one record are [`IdempotencyStore::get`] and [`IdempotencyStore::delete`].
///
/// `prefix` is matched literally against the start of the key (no
/// wildcards).
#[async_trait]
pub trait StoreAdmin: IdempotencyStore {
    /// Every `PROCESSING` record under `prefix` whose lease has run out (by
    /// the store's clock): attempts that died or lost their connection.
    /// The next delivery of such a key takes it over; until then it blocks
    /// nothing. Sorted by key.
    async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>>;

    /// Counts the records under `prefix` by status.
    async fn summary(&self, prefix: &str) -> Result<StoreSummary>;

    /// Deletes every record under `prefix`; returns how many. An empty
    /// prefix is refused with [`Config`](crate::IdempotencyError::Config):
    /// it would delete everything.
    async fn clear_prefix(&self, prefix: &str) -> Result<u64>;
}

/// Counts of the records under a prefix, from [`StoreAdmin::summary`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct StoreSummary {
    /// Records being processed under a live lease.
    pub processing: u64,
    /// `PROCESSING` records whose lease ran out (see [`StoreAdmin::stuck`]).
    pub stuck: u64,
    /// Completed records.
    pub completed: u64,
    /// Failed records, waiting for a retry.
    pub failed: u64,
    /// Values under the prefix that are not records.
    pub corrupt: u64,
    /// What those records take in the store, in bytes, where the store can
    /// tell (Redis: the sum of `MEMORY USAGE`).
    pub memory_bytes: Option<u64>,
}

impl StoreSummary {
    /// Every key counted.
    pub fn total(&self) -> u64 {
        self.processing + self.stuck + self.completed + self.failed + self.corrupt
    }

    /// Adds one record (or non-record, `None`) to the counts, judging a
    /// `PROCESSING` record's lease at `now`.
    pub fn count(
        &mut self,
        record: Option<&IdempotencyRecord>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let counter = match record {
            None => &mut self.corrupt,
            Some(r) => match r.status {
                RecordStatus::Completed => &mut self.completed,
                RecordStatus::Failed => &mut self.failed,
                RecordStatus::Processing if r.is_live_processing(now) => &mut self.processing,
                RecordStatus::Processing => &mut self.stuck,
            },
        };
        *counter += 1;
    }
}

/// The refusal of an empty prefix by [`StoreAdmin::clear_prefix`].
pub(crate) fn check_clear_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(crate::IdempotencyError::config(
            "prefix",
            "refusing an empty prefix, which would delete every key",
        ));
    }
    Ok(())
}

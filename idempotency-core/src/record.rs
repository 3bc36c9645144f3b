//! The record stored per key, and the state machine that moves it.
//!
//! ```text
//! absent ──claim──> PROCESSING ──complete(token)──> COMPLETED  (terminal until the record expires)
//!                       │  └────fail(token)──────> FAILED ──claim──> PROCESSING (attempt+1)
//!                       └─ lease expired ──claim──> PROCESSING (new token, attempt+1)
//! ```
//!
//! # The rules, for store authors
//!
//! The state machine is written once, as two pure decisions that every store
//! applies inside its own atomic step (a lock, a transaction, a script):
//!
//! - [`decide_claim`] says what a [`claim`](crate::IdempotencyStore::claim)
//!   does with the record it found: a [`ClaimDecision`].
//! - [`decide_finish`] says what [`renew`](crate::IdempotencyStore::renew),
//!   [`complete`](crate::IdempotencyStore::complete) and
//!   [`fail`](crate::IdempotencyStore::fail) do with it: a [`FinishDecision`].
//!
//! Both read a [`RecordView`]: [`IdempotencyRecord::view`] for a store that
//! keeps whole records, [`RecordView::new`] for one with its own layout.
//! The store does the reading and the writing; the decision is never its own.
//! [`MemoryStore`](crate::MemoryStore) calls them directly; a store that
//! decides on its server (the Redis store's Lua scripts) implements the same
//! table there and is held to it by the same suite. Every store passes one conformance suite
//! (the `testing` feature's `idempotency_core::testing`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RecordStatus {
    /// An attempt holds the key under a lease.
    Processing,
    /// An attempt finished; its result is replayed to duplicates.
    Completed,
    /// The last attempt failed; the next claim starts a new attempt.
    Failed,
}

impl RecordStatus {
    /// The status as written on the wire: `PROCESSING`, `COMPLETED` or `FAILED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "PROCESSING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for RecordStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The record a store keeps under each key.
///
/// Timestamps are taken from the store's clock, except `completed_at`,
/// which a store may take from the completing host's clock (the Redis store
/// does, on every path). How a store encodes the record is its own
/// business; the serde form (JSON, timestamps as integer milliseconds since
/// the Unix epoch, absent fields left out rather than written as `null`) is
/// what this crate's stores use. Each status keeps only what it needs:
///
/// | status | fields |
/// |---|---|
/// | `PROCESSING` | `idempotency_key`, `event_id`, `event_type`, `status`, `first_seen_at`, `attempts`, `lease_token`, `lease_expires_at`, `fingerprint` |
/// | `FAILED` | as `PROCESSING`, with `error` in place of `lease_expires_at` |
/// | `COMPLETED` | `status`, `completed_at`, `attempts`, `fingerprint`, `result` |
///
/// A `COMPLETED` record is what lives longest (its whole `ttl`), so it keeps
/// only what a replay needs: no lease, no copy of its own key.
///
/// A store may keep more, or keep it differently (the Redis store's
/// document is in the guide's Redis schema chapter); reads always return the
/// fields above.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The effective idempotency key, or its SHA-256 digest when key hashing
    /// is on. Not stored in `COMPLETED` records (the storage key already
    /// names them): `None` there, except in records read through
    /// [`IdempotencyChecker::get_record`](crate::IdempotencyChecker::get_record),
    /// which fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The event id of the attempt that last claimed the key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The event type of the attempt that last claimed the key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Where the key is in its life.
    pub status: RecordStatus,
    /// The handler's result as JSON (only when `COMPLETED`).
    /// `Some(Value::Null)` when the handler's result was JSON `null` (a
    /// unit `()`, a `None`); `None` when no result was stored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub result: Option<serde_json::Value>,
    /// The handler's error text (only when `FAILED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the key was first claimed (not kept once `COMPLETED`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "chrono::serde::ts_milliseconds_option"
    )]
    pub first_seen_at: Option<DateTime<Utc>>,
    /// When the key was completed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "chrono::serde::ts_milliseconds_option"
    )]
    pub completed_at: Option<DateTime<Utc>>,
    /// How many attempts have claimed the key (1 for the first). A stored
    /// `COMPLETED` document leaves it out when it is 1.
    #[serde(default = "first_attempt")]
    pub attempts: u32,
    /// The fencing token of the attempt that holds (`PROCESSING`) or last
    /// held (`FAILED`) the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
    /// When the current lease runs out (only when `PROCESSING`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "chrono::serde::ts_milliseconds_option"
    )]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The payload fingerprint recorded by the first claim, if fingerprinting is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// When the store will drop the record, as the store reported it on the
    /// read that returned this record. Not part of the stored document.
    #[serde(skip)]
    pub expires_at: Option<DateTime<Utc>>,
}

fn first_attempt() -> u32 {
    1
}

/// A field that is present is `Some`, even when it is `null` (serde's
/// default for `Option` reads `null` as `None`); an absent field is `None`
/// through `#[serde(default)]`.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

impl IdempotencyRecord {
    /// Whether the record is `PROCESSING` with a lease that is still live at `now`.
    pub fn is_live_processing(&self, now: DateTime<Utc>) -> bool {
        self.status == RecordStatus::Processing && self.lease_expires_at.is_some_and(|at| at > now)
    }

    /// What the state machine reads of this record: the argument of
    /// [`decide_claim`] and [`decide_finish`] for a store that keeps whole
    /// records. An empty token or fingerprint reads as `None`.
    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            status: self.status,
            attempts: self.attempts,
            lease_token: self.lease_token.as_deref().filter(|t| !t.is_empty()),
            lease_expires_at: self.lease_expires_at,
            fingerprint: self.fingerprint.as_deref().filter(|f| !f.is_empty()),
        }
    }

    /// A `COMPLETED` record: only what a replay needs.
    pub(crate) fn completed(
        result: serde_json::Value,
        attempts: u32,
        fingerprint: Option<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            idempotency_key: None,
            event_id: None,
            event_type: None,
            status: RecordStatus::Completed,
            result: Some(result),
            error: None,
            first_seen_at: None,
            completed_at: Some(now),
            attempts,
            lease_token: None,
            lease_expires_at: None,
            fingerprint,
            expires_at: None,
        }
    }
}

/// The right to run one attempt for one key, handed out by a successful claim.
///
/// The [`token`](Self::token) is a fencing token: unique to each claim. Only the
/// holder of the current token can complete, fail or renew the record, so a
/// worker whose lease was taken over can never overwrite the newer attempt.
/// Handlers can use the token to fence their own writes too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The storage key (prefix included). Shared, so copies of a lease (the
    /// handler's, the task-local one, the guard's) cost no allocation.
    pub(crate) key: Arc<str>,
    /// The fencing token of this attempt.
    pub(crate) token: Arc<str>,
    /// The attempt number (1 for the first attempt).
    pub(crate) attempt: u32,
    /// When the lease runs out unless renewed, as of the last claim or renewal.
    /// Stores report it on their own clock; a store whose claim writes
    /// without reading that clock (Redis, for example, may claim with a
    /// plain conditional write) measures it on this host's clock from the
    /// moment the claim was sent, so it errs early.
    pub(crate) expires_at: DateTime<Utc>,
    /// This attempt took over a `PROCESSING` record whose lease had run out:
    /// an earlier attempt died (or stalled) part-way, so some of its side
    /// effects may already have happened. Handlers whose effects are not
    /// naturally idempotent can check for them when this is set.
    pub(crate) taken_over: bool,
    /// The store's own version of the record as this lease last wrote it
    /// (see [`version`](Self::version)).
    pub(crate) version: Option<Arc<[u8]>>,
}

impl Lease {
    /// The lease a store hands out when a claim acquires `key` (the storage
    /// key) under `token` as `attempt`, running out at `expires_at`.
    ///
    /// Only stores make leases; everyone else gets them from a claim. A
    /// lease made up by hand holds nothing: every write under it is checked
    /// against the record's token by the store.
    pub fn new(
        key: impl Into<Arc<str>>,
        token: impl Into<Arc<str>>,
        attempt: u32,
        expires_at: DateTime<Utc>,
    ) -> Self {
        Self {
            key: key.into(),
            token: token.into(),
            attempt,
            expires_at,
            taken_over: false,
            version: None,
        }
    }

    /// This lease, carrying `version`: the store's own version of the record
    /// as this lease's claim or renewal wrote it (see
    /// [`version`](Self::version)).
    #[must_use]
    pub fn with_version(mut self, version: impl Into<Arc<[u8]>>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// This lease, marked as having taken over an attempt whose lease ran
    /// out (see [`taken_over`](Self::taken_over)).
    #[must_use]
    pub fn with_taken_over(mut self, taken_over: bool) -> Self {
        self.taken_over = taken_over;
        self
    }

    /// This lease, running out at `expires_at` instead (a renewal).
    #[must_use]
    pub fn with_expiry(mut self, expires_at: DateTime<Utc>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// The store's own version of the record as this lease's claim or its
    /// last renewal wrote it, if the store keeps one: opaque bytes that only
    /// the store that made the lease reads, for a compare-and-set write
    /// (the Redis store keeps the exact document, for `SET ... IFEQ`; a
    /// key-value store with revisions would keep the revision). A lease
    /// with an older version or none (a copy taken before a renewal, a
    /// lease made by hand) must only make the store fall back to checking
    /// the token; fencing never depends on it.
    pub fn version(&self) -> Option<&[u8]> {
        self.version.as_deref()
    }

    /// The storage key (prefix included).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of this attempt.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The attempt number (1 for the first attempt; 0 for a handler run
    /// unguarded by fail-open).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the lease runs out unless renewed, as of the last claim or
    /// renewal. Stores report it on their own clock; a store whose claim
    /// writes without reading that clock (Redis, for example, may claim
    /// with a plain conditional write) measures it on this host's clock
    /// from the moment the claim was sent, so it errs early.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }

    /// This attempt took over a `PROCESSING` record whose lease had run out:
    /// an earlier attempt died (or stalled) part-way, so some of its side
    /// effects may already have happened. Handlers whose effects are not
    /// naturally idempotent can check for them when this is set.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// The caller now holds the key: run the handler.
    Acquired(Lease),
    /// The key is `COMPLETED`: replay `record.result`.
    Duplicate(IdempotencyRecord),
    /// Another attempt holds a live lease.
    InProgress(IdempotencyRecord),
}

// ---------------------------------------------------------------------------
// The state machine as pure decisions.
// ---------------------------------------------------------------------------

/// What a claim does with the record it found, as decided by [`decide_claim`].
///
/// Each variant names what the store must do, still inside the atomic step
/// in which it read the record. The enum is exhaustive on purpose: a new
/// decision is a new rule, and a store that does not handle it must not
/// compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimDecision {
    /// The caller takes the key. Write a `PROCESSING` record with the
    /// request's token, this `attempt`, `lease_expires_at` = now +
    /// [`lease`](crate::ClaimRequest::lease), the request's `event_id`,
    /// `event_type` and `recorded_key`, and keep from the record it replaces
    /// its `first_seen_at` (now when there was none) and, when the request
    /// has none, its fingerprint. The record lives at least as long as the
    /// lease (the longer of [`ttl`](crate::ClaimRequest::ttl) and `lease`).
    /// Answer [`ClaimOutcome::Acquired`] with a [`Lease`] whose `taken_over`
    /// is true when the replaced record was `PROCESSING` (its lease ran out).
    Acquire {
        /// The attempt number of the new lease: 1 for an absent key, the
        /// stored `attempts` + 1 otherwise.
        attempt: u32,
    },
    /// The record is already `PROCESSING` under the caller's own token (a
    /// retried claim whose first try was applied): write nothing and answer
    /// [`ClaimOutcome::Acquired`] with the stored attempt and lease expiry,
    /// `taken_over: false`.
    AlreadyHeld,
    /// The record is `COMPLETED`: write nothing and answer
    /// [`ClaimOutcome::Duplicate`] with the record (its
    /// [`expires_at`](IdempotencyRecord::expires_at) filled in), so its
    /// result is replayed.
    Duplicate,
    /// The record is `PROCESSING` under someone else's live lease: write
    /// nothing and answer [`ClaimOutcome::InProgress`] with the record.
    InProgress,
    /// The key was claimed with a different payload fingerprint: write
    /// nothing and fail with
    /// [`FingerprintMismatch`](crate::IdempotencyError::FingerprintMismatch).
    FingerprintMismatch,
}

/// What the state machine reads of a stored record, lent by a store's own
/// form of it.
///
/// Absent values are `None`, never empty strings: a store that stores empty
/// strings for "no token" or "no fingerprint" maps them to `None` here.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RecordView<'a> {
    /// The record's status.
    pub status: RecordStatus,
    /// How many attempts have claimed the key.
    pub attempts: u32,
    /// The fencing token of the attempt that holds (`PROCESSING`) or last
    /// held (`FAILED`) the key; `None` for `COMPLETED` records.
    pub lease_token: Option<&'a str>,
    /// When the current lease runs out (`PROCESSING` only).
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The payload fingerprint recorded by the first claim, if any.
    pub fingerprint: Option<&'a str>,
}

impl<'a> RecordView<'a> {
    /// A view of a record a store keeps in its own layout.
    pub fn new(
        status: RecordStatus,
        attempts: u32,
        lease_token: Option<&'a str>,
        lease_expires_at: Option<DateTime<Utc>>,
        fingerprint: Option<&'a str>,
    ) -> Self {
        Self {
            status,
            attempts,
            lease_token,
            lease_expires_at,
            fingerprint,
        }
    }
}

/// Decides what a claim does with what it found at the key.
///
/// - `existing`: the record at the key, or `None` when there is none. A
///   record whose own time to live has run out counts as absent: pass `None`
///   (a store that has not yet dropped it must replace it).
/// - `fingerprint`: the request's [`fingerprint`](crate::ClaimRequest::fingerprint),
///   `None` when it is absent or empty.
/// - `token`: the request's [`token`](crate::ClaimRequest::token).
/// - `now`: the store's clock, which judges whether a lease is live.
///
/// A differing fingerprint wins over every status. See [`ClaimDecision`]
/// for what the store does with each answer.
pub fn decide_claim(
    existing: Option<RecordView<'_>>,
    fingerprint: Option<&str>,
    token: &str,
    now: DateTime<Utc>,
) -> ClaimDecision {
    let Some(record) = existing else {
        return ClaimDecision::Acquire { attempt: 1 };
    };
    if let (Some(theirs), Some(ours)) = (record.fingerprint, fingerprint)
        && theirs != ours
    {
        return ClaimDecision::FingerprintMismatch;
    }
    match record.status {
        RecordStatus::Completed => ClaimDecision::Duplicate,
        RecordStatus::Processing if record.lease_token == Some(token) => ClaimDecision::AlreadyHeld,
        RecordStatus::Processing if record.lease_expires_at.is_some_and(|at| at > now) => {
            ClaimDecision::InProgress
        }
        RecordStatus::Processing | RecordStatus::Failed => ClaimDecision::Acquire {
            attempt: record.attempts.saturating_add(1),
        },
    }
}

/// What `renew`, `complete` or `fail` does with the record it found, as
/// decided by [`decide_finish`].
///
/// Exhaustive on purpose, like [`ClaimDecision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishDecision {
    /// The caller holds the lease: write the transition. `complete` writes
    /// the `COMPLETED` record (only what a replay needs, see
    /// [`IdempotencyRecord`]) living `ttl`; `fail` writes `FAILED` with the
    /// error, keeping the token, living `ttl`; `renew` moves
    /// `lease_expires_at` to now + the new lease and keeps the record alive
    /// at least that long.
    Apply,
    /// The same transition by the same token was already applied (a retried
    /// call whose first try went through): succeed without writing. Never
    /// answered for `renew`.
    AlreadyApplied,
    /// The caller does not hold the lease: write nothing and fail with
    /// [`LeaseLost`](crate::IdempotencyError::LeaseLost).
    LeaseLost,
}

/// Decides a token-checked transition of the record at a lease's key.
///
/// - `existing`: the record at the key, `None` when there is none (or its
///   time to live has run out).
/// - `token`: the [`Lease::token`] of the caller.
/// - `target`: the status the call writes: [`RecordStatus::Completed`]
///   for `complete`, [`RecordStatus::Failed`] for `fail`,
///   [`RecordStatus::Processing`] for `renew`.
/// - `retried`: the store is re-sending a call whose first try may have been
///   applied (its own retry after a timeout or lost reply); `false` for a
///   first try.
///
/// A `COMPLETED` record keeps no token, so a repeated `complete` cannot be
/// told apart from someone else's: it is `LeaseLost`, unless `retried` says
/// the caller is re-sending a call whose first try may have been applied,
/// which then counts as applied. See [`FinishDecision`] for what the store
/// does with each answer.
pub fn decide_finish(
    existing: Option<RecordView<'_>>,
    token: &str,
    target: RecordStatus,
    retried: bool,
) -> FinishDecision {
    let Some(record) = existing else {
        return FinishDecision::LeaseLost;
    };
    let held = record.lease_token == Some(token);
    match record.status {
        RecordStatus::Processing if held => FinishDecision::Apply,
        status if status == target && target != RecordStatus::Processing => {
            if held || (retried && record.lease_token.is_none()) {
                FinishDecision::AlreadyApplied
            } else {
                FinishDecision::LeaseLost
            }
        }
        _ => FinishDecision::LeaseLost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn a_null_result_reads_back_as_a_stored_null_and_an_absent_one_as_none() {
        let null: IdempotencyRecord =
            serde_json::from_str(r#"{"status":"COMPLETED","completed_at":1,"result":null}"#)
                .expect("parses");
        assert_eq!(null.result, Some(serde_json::Value::Null));
        let absent: IdempotencyRecord =
            serde_json::from_str(r#"{"status":"COMPLETED","completed_at":1}"#).expect("parses");
        assert_eq!(absent.result, None);
        let written = serde_json::to_string(&null).expect("serializes");
        assert!(written.contains(r#""result":null"#), "{written}");
    }

    impl IdempotencyRecord {
        /// Turns the record into its `COMPLETED` form with `result` at `now`.
        pub(crate) fn set_completed(&mut self, result: serde_json::Value, now: DateTime<Utc>) {
            *self = Self::completed(result, self.attempts, self.fingerprint.take(), now);
        }

        /// Turns the record into its `FAILED` form with `error`.
        pub(crate) fn set_failed(&mut self, error: String) {
            self.status = RecordStatus::Failed;
            self.error = Some(error);
            self.result = None;
            self.lease_expires_at = None;
            self.expires_at = None;
        }
    }

    fn record(status: RecordStatus, token: &str, lease_ms: i64) -> IdempotencyRecord {
        let now = Utc::now();
        IdempotencyRecord {
            idempotency_key: Some("k".into()),
            event_id: None,
            event_type: None,
            status,
            result: None,
            error: None,
            first_seen_at: Some(now),
            completed_at: None,
            attempts: 2,
            lease_token: Some(token.into()),
            lease_expires_at: Some(now + TimeDelta::milliseconds(lease_ms)),
            fingerprint: Some("fp".into()),
            expires_at: None,
        }
    }

    #[test]
    fn a_record_view_reads_an_empty_token_or_fingerprint_as_absent() {
        let mut r = record(RecordStatus::Failed, "", 1000);
        r.fingerprint = Some(String::new());
        let view = r.view();
        assert_eq!(view.lease_token, None);
        assert_eq!(view.fingerprint, None);
        // So a stored empty fingerprint guards nothing, and an empty token
        // holds nothing.
        assert_eq!(
            decide_claim(Some(view), Some("other"), "b", Utc::now()),
            ClaimDecision::Acquire { attempt: 3 }
        );
        assert_eq!(
            decide_finish(Some(view), "", RecordStatus::Failed, false),
            FinishDecision::LeaseLost
        );
    }

    #[test]
    fn absent_key_is_acquired_as_attempt_one() {
        assert_eq!(
            decide_claim(None, None, "t", Utc::now()),
            ClaimDecision::Acquire { attempt: 1 }
        );
    }

    #[test]
    fn completed_is_a_duplicate() {
        let r = record(RecordStatus::Completed, "a", -1000);
        assert_eq!(
            decide_claim(Some(r.view()), Some("fp"), "b", Utc::now()),
            ClaimDecision::Duplicate
        );
    }

    #[test]
    fn live_processing_is_in_progress_and_expired_is_taken_over() {
        let live = record(RecordStatus::Processing, "a", 60_000);
        assert_eq!(
            decide_claim(Some(live.view()), None, "b", Utc::now()),
            ClaimDecision::InProgress
        );
        let expired = record(RecordStatus::Processing, "a", -1);
        assert_eq!(
            decide_claim(Some(expired.view()), None, "b", Utc::now()),
            ClaimDecision::Acquire { attempt: 3 }
        );
    }

    #[test]
    fn own_token_counts_as_held() {
        let live = record(RecordStatus::Processing, "a", 60_000);
        assert_eq!(
            decide_claim(Some(live.view()), None, "a", Utc::now()),
            ClaimDecision::AlreadyHeld
        );
    }

    #[test]
    fn failed_is_reclaimable_with_next_attempt() {
        let failed = record(RecordStatus::Failed, "a", 60_000);
        assert_eq!(
            decide_claim(Some(failed.view()), Some("fp"), "b", Utc::now()),
            ClaimDecision::Acquire { attempt: 3 }
        );
    }

    #[test]
    fn fingerprint_mismatch_wins_over_every_status() {
        for status in [
            RecordStatus::Processing,
            RecordStatus::Completed,
            RecordStatus::Failed,
        ] {
            let r = record(status, "a", 60_000);
            assert_eq!(
                decide_claim(Some(r.view()), Some("other"), "b", Utc::now()),
                ClaimDecision::FingerprintMismatch
            );
        }
    }

    #[test]
    fn only_the_token_holder_finishes() {
        let r = record(RecordStatus::Processing, "a", -5);
        assert_eq!(
            decide_finish(Some(r.view()), "a", RecordStatus::Completed, false),
            FinishDecision::Apply
        );
        assert_eq!(
            decide_finish(Some(r.view()), "b", RecordStatus::Completed, true),
            FinishDecision::LeaseLost
        );
        assert_eq!(
            decide_finish(None, "a", RecordStatus::Failed, true),
            FinishDecision::LeaseLost
        );
    }

    #[test]
    fn repeated_fail_is_idempotent_per_token() {
        let mut failed = record(RecordStatus::Processing, "a", 1000);
        failed.set_failed("e".into());
        assert_eq!(
            decide_finish(Some(failed.view()), "a", RecordStatus::Failed, false),
            FinishDecision::AlreadyApplied
        );
        assert_eq!(
            decide_finish(Some(failed.view()), "b", RecordStatus::Failed, true),
            FinishDecision::LeaseLost
        );
        assert_eq!(
            decide_finish(Some(failed.view()), "a", RecordStatus::Completed, true),
            FinishDecision::LeaseLost
        );
        assert_eq!(
            decide_finish(Some(failed.view()), "a", RecordStatus::Processing, false),
            FinishDecision::LeaseLost
        );
    }

    #[test]
    fn a_completed_record_keeps_no_token_so_only_a_retry_counts_as_applied() {
        let mut done = record(RecordStatus::Processing, "a", 1000);
        done.set_completed(serde_json::json!(1), Utc::now());
        assert_eq!(done.lease_token, None);
        assert_eq!(
            decide_finish(Some(done.view()), "a", RecordStatus::Completed, false),
            FinishDecision::LeaseLost
        );
        assert_eq!(
            decide_finish(Some(done.view()), "a", RecordStatus::Completed, true),
            FinishDecision::AlreadyApplied
        );
        assert_eq!(
            decide_finish(Some(done.view()), "a", RecordStatus::Failed, true),
            FinishDecision::LeaseLost
        );
        assert_eq!(
            decide_finish(Some(done.view()), "a", RecordStatus::Processing, true),
            FinishDecision::LeaseLost
        );
    }

    #[test]
    fn completed_records_are_lean_on_the_wire() {
        let mut done = record(RecordStatus::Processing, "a", 1000);
        done.set_completed(serde_json::json!({"ok": true}), Utc::now());
        let json = serde_json::to_value(&done).expect("serializes");
        let mut fields: Vec<_> = json.as_object().expect("object").keys().cloned().collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "attempts",
                "completed_at",
                "fingerprint",
                "result",
                "status"
            ]
        );
    }

    #[test]
    fn wire_format_uses_screaming_status_and_millisecond_times() {
        let r = record(RecordStatus::Processing, "a", 1000);
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["status"], "PROCESSING");
        assert!(json["first_seen_at"].is_i64());
        assert!(json["lease_expires_at"].is_i64());
        let back: IdempotencyRecord = serde_json::from_value(json).expect("parses");
        assert_eq!(back.status, RecordStatus::Processing);
    }
}

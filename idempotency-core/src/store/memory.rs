//! [`MemoryStore`]: the in-process store.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::{ClaimRequest, IdempotencyStore, after};
use crate::error::{IdempotencyError, Result};
use crate::record::{
    ClaimDecision, ClaimOutcome, FinishDecision, IdempotencyRecord, Lease, ProcessingStatus,
    RecordView, decide_claim, decide_finish,
};

const SHARDS: usize = 64;
const PURGE_EVERY: TimeDelta = TimeDelta::seconds(1);

/// An in-process store for a single process, examples and tests.
///
/// Records live in 64 mutex-guarded shards; a lock is held only for the few
/// instructions of one transition and never across an `.await`. Expired
/// records are purged as shards are used (each shard sweeps itself at most
/// once a second), and on demand by [`purge_expired`](Self::purge_expired), so
/// memory stays bounded by the keys seen within one TTL.
///
/// It gives the same guarantees as the Redis store within one process; it
/// does not coordinate separate processes.
///
/// ```
/// use idempotency_core::{IdempotencyChecker, MemoryStore};
/// let checker = IdempotencyChecker::new(MemoryStore::new());
/// # let _ = checker;
/// ```
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: Hasher,
}

/// foldhash with a per-process random seed: several times faster than
/// SipHash on keys of this size, and keys cannot be chosen to collide
/// without knowing the seed.
type Hasher = foldhash::fast::RandomState;

#[derive(Default)]
struct Shard {
    /// Each slot keeps its key's hash, so a key is hashed once per
    /// operation (for the shard and the table both) and never again when
    /// the table grows.
    slots: HashTable<Slot>,
    last_purge: Option<DateTime<Utc>>,
}

/// One record in compact form: every text field in one allocation, and the
/// fields each status keeps (see [`IdempotencyRecord`]) in its [`State`].
/// The public record is built only when a caller reads one.
struct Slot {
    hash: u64,
    /// The storage key, the fingerprint, the recorded key, the event id, the
    /// event type and the lease token, end to end; an absent field is empty.
    text: Box<str>,
    /// Where each of the first five fields of `text` ends.
    ends: [usize; 5],
    attempts: u32,
    expires_at: DateTime<Utc>,
    state: State,
}

enum State {
    Processing {
        first_seen_at: DateTime<Utc>,
        lease_expires_at: DateTime<Utc>,
    },
    Failed {
        first_seen_at: DateTime<Utc>,
        error: String,
    },
    Completed {
        completed_at: DateTime<Utc>,
        /// `None` when the handler's result could not be stored.
        result: Option<serde_json::Value>,
    },
}

/// The index of a field in [`Slot::text`].
#[derive(Clone, Copy)]
enum Field {
    Key = 0,
    Fingerprint,
    RecordedKey,
    EventId,
    EventType,
    Token,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// The empty string means "absent", as it does in the Redis scripts.
fn present(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Hasher::default(),
        }
    }

    /// The shard holding the key of `hash`, locked, swept if its last sweep
    /// is a second old at `now`.
    fn shard(&self, hash: u64, now: DateTime<Utc>) -> MutexGuard<'_, Shard> {
        // Bits the table does not use for a key's bucket (the low bits) or
        // its tag (the top seven), so keys sharing a shard still spread
        // across its table.
        let index = (hash >> 40) as usize % SHARDS;
        // A poisoned shard only means a panic elsewhere while it was held; its
        // table is never left half-written by our code, so keep using it.
        let mut shard = self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.last_purge.is_none_or(|at| now - at >= PURGE_EVERY) {
            shard.slots.retain(|s| s.expires_at > now);
            shard.last_purge = Some(now);
        }
        shard
    }

    /// Removes every expired record now; returns how many were removed.
    pub fn purge_expired(&self) -> usize {
        let now = Utc::now();
        self.shards
            .iter()
            .map(|s| {
                let mut shard = s.lock().unwrap_or_else(PoisonError::into_inner);
                let before = shard.slots.len();
                shard.slots.retain(|s| s.expires_at > now);
                shard.last_purge = Some(now);
                before - shard.slots.len()
            })
            .sum()
    }

    /// How many records are held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).slots.len())
            .sum()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Slot {
    /// A slot holding `fields` (in [`Field`] order) in one allocation.
    fn new(
        hash: u64,
        fields: [&str; 6],
        attempts: u32,
        expires_at: DateTime<Utc>,
        state: State,
    ) -> Self {
        let mut text = String::with_capacity(fields.iter().map(|f| f.len()).sum());
        let mut ends = [0; 5];
        for (i, field) in fields.iter().enumerate() {
            text.push_str(field);
            if let Some(end) = ends.get_mut(i) {
                *end = text.len();
            }
        }
        Self {
            hash,
            text: text.into_boxed_str(),
            ends,
            attempts,
            expires_at,
            state,
        }
    }

    fn field(&self, field: Field) -> &str {
        let i = field as usize;
        let start = i.checked_sub(1).map_or(0, |j| self.ends[j]);
        let end = self.ends.get(i).copied().unwrap_or(self.text.len());
        self.text.get(start..end).unwrap_or_default()
    }

    fn is(&self, key: &str) -> bool {
        self.field(Field::Key) == key
    }

    fn status(&self) -> ProcessingStatus {
        match self.state {
            State::Processing { .. } => ProcessingStatus::Processing,
            State::Failed { .. } => ProcessingStatus::Failed,
            State::Completed { .. } => ProcessingStatus::Completed,
        }
    }

    fn first_seen_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            State::Processing { first_seen_at, .. } | State::Failed { first_seen_at, .. } => {
                Some(first_seen_at)
            }
            State::Completed { .. } => None,
        }
    }

    fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            State::Processing {
                lease_expires_at, ..
            } => Some(lease_expires_at),
            _ => None,
        }
    }

    fn view(&self) -> RecordView<'_> {
        RecordView {
            status: self.status(),
            attempts: self.attempts,
            lease_token: present(self.field(Field::Token)),
            lease_expires_at: self.lease_expires_at(),
            fingerprint: present(self.field(Field::Fingerprint)),
        }
    }

    /// Keeps only what a `COMPLETED` record keeps of the text: the key and
    /// the fingerprint.
    fn trim_to_completed(&mut self) {
        let keep = self.ends[Field::Fingerprint as usize];
        let mut text = String::from(std::mem::take(&mut self.text));
        text.truncate(keep);
        self.text = text.into_boxed_str();
        for end in &mut self.ends[Field::RecordedKey as usize..] {
            *end = keep;
        }
    }

    /// The public record, with its expiry filled in.
    fn snapshot(&self) -> IdempotencyRecord {
        let text = |field| present(self.field(field)).map(str::to_owned);
        let mut record = IdempotencyRecord {
            idempotency_key: self.field(Field::RecordedKey).to_owned(),
            event_id: text(Field::EventId),
            event_type: text(Field::EventType),
            status: self.status(),
            result: None,
            error: None,
            first_seen_at: self.first_seen_at(),
            completed_at: None,
            attempts: self.attempts,
            lease_token: text(Field::Token),
            lease_expires_at: self.lease_expires_at(),
            fingerprint: text(Field::Fingerprint),
            expires_at: Some(self.expires_at),
        };
        match &self.state {
            State::Processing { .. } => {}
            State::Failed { error, .. } => record.error = Some(error.clone()),
            State::Completed {
                completed_at,
                result,
            } => {
                record.completed_at = Some(*completed_at);
                record.result.clone_from(result);
            }
        }
        record
    }
}

impl Shard {
    fn live(&self, hash: u64, key: &str, now: DateTime<Utc>) -> Option<&Slot> {
        self.slots
            .find(hash, |s| s.is(key))
            .filter(|s| s.expires_at > now)
    }

    /// Applies a token-checked transition at `now`; `write` edits the slot in
    /// place (its expiry included).
    fn finish(
        &mut self,
        hash: u64,
        lease: &Lease,
        target: ProcessingStatus,
        now: DateTime<Utc>,
        write: impl FnOnce(&mut Slot),
    ) -> Result<()> {
        let slot = self
            .slots
            .find_mut(hash, |s| s.is(&lease.key))
            .filter(|s| s.expires_at > now);
        let decision = decide_finish(slot.as_ref().map(|s| s.view()), &lease.token, target, false);
        match (decision, slot) {
            (FinishDecision::Apply, Some(slot)) => {
                write(slot);
                Ok(())
            }
            (FinishDecision::AlreadyApplied, _) => Ok(()),
            _ => Err(IdempotencyError::LeaseLost {
                key: lease.key.clone(),
            }),
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        let now = Utc::now();
        let hash = self.hasher.hash_one(request.key);
        let mut shard = self.shard(hash, now);
        let entry = shard.slots.entry(hash, |s| s.is(request.key), |s| s.hash);
        let slot = match entry {
            Entry::Occupied(occupied) => occupied.into_mut(),
            Entry::Vacant(vacant) => {
                // The common case: a key seen for the first time.
                let (slot, lease) = acquire(hash, request, None, 1, now);
                vacant.insert(slot);
                return Ok(ClaimOutcome::Acquired(lease));
            }
        };
        if slot.expires_at <= now {
            // Run out but not yet swept: as good as absent.
            let (new, lease) = acquire(hash, request, None, 1, now);
            *slot = new;
            return Ok(ClaimOutcome::Acquired(lease));
        }
        let fingerprint = request.fingerprint.filter(|f| !f.is_empty());
        let attempt = match decide_claim(Some(slot.view()), fingerprint, request.token, now) {
            ClaimDecision::Acquire { attempt } => attempt,
            ClaimDecision::FingerprintMismatch => {
                return Err(IdempotencyError::FingerprintMismatch {
                    key: request.key.to_owned(),
                });
            }
            ClaimDecision::Duplicate => return Ok(ClaimOutcome::Duplicate(slot.snapshot())),
            ClaimDecision::InProgress => return Ok(ClaimOutcome::InProgress(slot.snapshot())),
            ClaimDecision::AlreadyHeld => {
                return Ok(ClaimOutcome::Acquired(Lease {
                    key: request.key.to_owned(),
                    token: request.token.to_owned(),
                    attempt: slot.attempts,
                    expires_at: slot.lease_expires_at().unwrap_or(now),
                    taken_over: false,
                }));
            }
        };
        let (new, lease) = acquire(hash, request, Some(slot), attempt, now);
        *slot = new;
        Ok(ClaimOutcome::Acquired(lease))
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let mut renewed = lease.clone();
        let now = Utc::now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, ProcessingStatus::Processing, now, |slot| {
                let until = after(now, lease_duration);
                if let State::Processing {
                    lease_expires_at, ..
                } = &mut slot.state
                {
                    *lease_expires_at = until;
                }
                renewed.expires_at = until;
                // Like Redis: the record lives at least as long as the lease.
                slot.expires_at = slot.expires_at.max(until);
            })?;
        Ok(renewed)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> Result<()> {
        let now = Utc::now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, ProcessingStatus::Completed, now, |slot| {
                slot.trim_to_completed();
                slot.state = State::Completed {
                    completed_at: now,
                    result: result.cloned(),
                };
                slot.expires_at = after(now, ttl);
            })
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let now = Utc::now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, ProcessingStatus::Failed, now, |slot| {
                let first_seen_at = slot.first_seen_at().unwrap_or(now);
                slot.state = State::Failed {
                    first_seen_at,
                    error: error.to_owned(),
                };
                slot.expires_at = after(now, ttl);
            })
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let now = Utc::now();
        let hash = self.hasher.hash_one(key);
        Ok(self
            .shard(hash, now)
            .live(hash, key, now)
            .map(Slot::snapshot))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let now = Utc::now();
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash, now);
        Ok(match shard.slots.find_entry(hash, |s| s.is(key)) {
            Ok(found) => found.remove().0.expires_at > now,
            Err(_) => false,
        })
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        let now = Utc::now();
        let expires_at = after(now, ttl);
        Ok(keys
            .iter()
            .map(|&key| {
                let hash = self.hasher.hash_one(key);
                let mut shard = self.shard(hash, now);
                let marked = Slot::new(
                    hash,
                    [key, "", "", "", "", ""],
                    1,
                    expires_at,
                    State::Completed {
                        completed_at: now,
                        result: Some(serde_json::Value::Null),
                    },
                );
                match shard.slots.entry(hash, |s| s.is(key), |s| s.hash) {
                    Entry::Occupied(mut found) if found.get().expires_at <= now => {
                        *found.get_mut() = marked;
                        true
                    }
                    Entry::Occupied(_) => false,
                    Entry::Vacant(vacant) => {
                        vacant.insert(marked);
                        true
                    }
                }
            })
            .collect())
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let now = Utc::now();
        Ok(keys
            .iter()
            .map(|&key| {
                let hash = self.hasher.hash_one(key);
                self.shard(hash, now).live(hash, key, now).is_some()
            })
            .collect())
    }
}

/// The `PROCESSING` slot a claim writes over `existing` (a live `FAILED` or
/// run-out `PROCESSING` record, or none) as `attempt`, and the lease it
/// hands out.
fn acquire(
    hash: u64,
    request: &ClaimRequest<'_>,
    existing: Option<&Slot>,
    attempt: u32,
    now: DateTime<Utc>,
) -> (Slot, Lease) {
    let lease_expires_at = after(now, request.lease);
    let fingerprint = request
        .fingerprint
        .filter(|f| !f.is_empty())
        .or_else(|| existing.and_then(|s| present(s.field(Field::Fingerprint))))
        .unwrap_or_default();
    let slot = Slot::new(
        hash,
        [
            request.key,
            fingerprint,
            request.recorded_key,
            request.event_id.unwrap_or_default(),
            request.event_type.unwrap_or_default(),
            request.token,
        ],
        attempt,
        after(now, request.ttl.max(request.lease)),
        State::Processing {
            first_seen_at: existing.and_then(Slot::first_seen_at).unwrap_or(now),
            lease_expires_at,
        },
    );
    let lease = Lease {
        key: request.key.to_owned(),
        token: request.token.to_owned(),
        attempt,
        expires_at: lease_expires_at,
        taken_over: existing.is_some_and(|s| s.status() == ProcessingStatus::Processing),
    };
    (slot, lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(key: &'a str, ttl: Duration) -> ClaimRequest<'a> {
        ClaimRequest {
            key,
            recorded_key: key,
            event_id: None,
            event_type: None,
            fingerprint: None,
            token: "t",
            lease: ttl,
            ttl,
        }
    }

    #[tokio::test]
    async fn expired_records_are_purged_so_memory_stays_bounded() {
        let store = MemoryStore::new();
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        for key in &keys {
            store
                .claim(&request(key, Duration::from_millis(30)))
                .await
                .expect("claim");
        }
        assert_eq!(store.len(), 1000);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.purge_expired(), 1000);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn shards_sweep_themselves_as_they_are_used() {
        let store = MemoryStore::new();
        for i in 0..500 {
            store
                .claim(&request(&format!("old{i}"), Duration::from_millis(10)))
                .await
                .expect("claim");
        }
        // Past the expiry and the per-shard sweep interval, new traffic alone
        // evicts the old records: no one calls purge_expired.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for i in 0..2000 {
            store.get(&format!("probe{i}")).await.expect("get");
        }
        assert_eq!(store.len(), 0);
    }
}

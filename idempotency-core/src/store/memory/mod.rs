//! [`MemoryStore`]: the in-process store.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use self::slot::{Field, Slot, State, present};
use super::{
    ClaimRequest, IdempotencyStore, ResultJson, SeenSet, StoreAdmin, StoreSummary, after,
    check_clear_prefix,
};
use crate::error::{IdempotencyError, Result};
use crate::record::{
    ClaimDecision, ClaimOutcome, FinishDecision, IdempotencyRecord, Lease, RecordStatus,
    decide_claim, decide_finish,
};

mod slot;

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
    clock: Clock,
}

/// Where a [`MemoryStore`] reads the time.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// The system clock.
    System,
    /// tokio's clock, which a test can pause and advance, counted from the
    /// UTC time the store was made.
    Tokio {
        origin: DateTime<Utc>,
        start: tokio::time::Instant,
    },
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

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Hasher::default(),
            clock: Clock::System,
        }
    }

    /// An empty store that reads the time from tokio's clock instead of the
    /// system's, so that a test on a runtime with paused time
    /// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) runs
    /// leases and TTLs out without waiting.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), idempotency_core::IdempotencyError> {
    /// use std::time::Duration;
    /// use idempotency_core::{ClaimRequest, IdempotencyStore, MemoryStore};
    ///
    /// let store = MemoryStore::with_tokio_clock();
    /// let hour = Duration::from_secs(3600);
    /// let request = ClaimRequest::new("k", "t1", hour, hour);
    /// store.claim(&request).await?;
    /// tokio::time::advance(Duration::from_secs(3601)).await;
    /// assert!(store.get("k").await?.is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_tokio_clock() -> Self {
        Self {
            clock: Clock::Tokio {
                origin: Utc::now(),
                start: tokio::time::Instant::now(),
            },
            ..Self::new()
        }
    }

    /// The time by this store's clock.
    fn now(&self) -> DateTime<Utc> {
        match self.clock {
            Clock::System => Utc::now(),
            Clock::Tokio { origin, start } => after(origin, start.elapsed()),
        }
    }

    /// Calls `f` with every live slot whose key starts with `prefix`.
    fn each_live(&self, prefix: &str, now: DateTime<Utc>, mut f: impl FnMut(&Slot)) {
        for shard in &*self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard
                .slots
                .iter()
                .filter(|s| s.expires_at > now && s.field(Field::Key).starts_with(prefix))
                .for_each(&mut f);
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
        let now = self.now();
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
        target: RecordStatus,
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
                key: lease.key().to_owned(),
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
        let now = self.now();
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
                    key: request.key.into(),
                    token: request.token.into(),
                    attempt: slot.attempts,
                    expires_at: slot.lease_expires_at().unwrap_or(now),
                    taken_over: false,
                    version: None,
                }));
            }
        };
        let (new, lease) = acquire(hash, request, Some(slot), attempt, now);
        *slot = new;
        Ok(ClaimOutcome::Acquired(lease))
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let mut renewed = lease.clone();
        let now = self.now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, RecordStatus::Processing, now, |slot| {
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
        result: Option<&ResultJson<'_>>,
        ttl: Duration,
    ) -> Result<()> {
        let result = result.map(|json| json.clone().into_owned());
        let now = self.now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, RecordStatus::Completed, now, |slot| {
                slot.trim_to_completed();
                slot.state = State::Completed {
                    completed_at: now,
                    result,
                };
                slot.expires_at = after(now, ttl);
            })
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let now = self.now();
        let hash = self.hasher.hash_one(&lease.key);
        self.shard(hash, now)
            .finish(hash, lease, RecordStatus::Failed, now, |slot| {
                let first_seen_at = slot.first_seen_at().unwrap_or(now);
                slot.state = State::Failed {
                    first_seen_at,
                    error: error.to_owned(),
                };
                slot.expires_at = after(now, ttl);
            })
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let now = self.now();
        let hash = self.hasher.hash_one(key);
        Ok(self
            .shard(hash, now)
            .live(hash, key, now)
            .map(Slot::snapshot))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let now = self.now();
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
}

#[async_trait]
impl SeenSet for MemoryStore {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        let now = self.now();
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
                        result: Some(ResultJson::trusted("null")),
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
        let now = self.now();
        Ok(keys
            .iter()
            .map(|&key| {
                let hash = self.hasher.hash_one(key);
                self.shard(hash, now).live(hash, key, now).is_some()
            })
            .collect())
    }
}

#[async_trait]
impl StoreAdmin for MemoryStore {
    async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>> {
        let now = self.now();
        let mut stuck = Vec::new();
        self.each_live(prefix, now, |slot| {
            if slot.status() == RecordStatus::Processing {
                let record = slot.snapshot();
                if !record.is_live_processing(now) {
                    stuck.push((slot.field(Field::Key).to_owned(), record));
                }
            }
        });
        stuck.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stuck)
    }

    async fn summary(&self, prefix: &str) -> Result<StoreSummary> {
        let now = self.now();
        let mut summary = StoreSummary::default();
        self.each_live(prefix, now, |slot| {
            summary.count(Some(&slot.snapshot()), now);
        });
        Ok(summary)
    }

    async fn clear_prefix(&self, prefix: &str) -> Result<u64> {
        check_clear_prefix(prefix)?;
        let now = self.now();
        let mut deleted = 0;
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.slots.retain(|s| {
                let keep = !s.field(Field::Key).starts_with(prefix);
                deleted += u64::from(!keep && s.expires_at > now);
                keep
            });
        }
        Ok(deleted)
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
        key: request.key.into(),
        token: request.token.into(),
        attempt,
        expires_at: lease_expires_at,
        taken_over: existing.is_some_and(|s| s.status() == RecordStatus::Processing),
        version: None,
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
    async fn a_result_too_deep_to_read_back_reads_as_none_never_a_made_up_value() {
        let store = MemoryStore::new();
        // Text `ResultJson::new` and the checker refuse (serde_json reads
        // at most 128 levels): only a bug could hand it over.
        let deep = "[".repeat(200) + &"]".repeat(200);
        let deep = ResultJson::trusted(&deep);
        let shallow = ResultJson::new(r#"{"id": 7, "ok": true}"#).expect("JSON");
        for (key, text, expected) in [
            ("deep", &deep, None),
            (
                "shallow",
                &shallow,
                Some(serde_json::json!({"id": 7, "ok": true})),
            ),
        ] {
            let long = Duration::from_secs(60);
            let ClaimOutcome::Acquired(lease) =
                store.claim(&request(key, long)).await.expect("claim")
            else {
                panic!("a fresh key is acquired");
            };
            store
                .complete(&lease, Some(text), long)
                .await
                .expect("complete");
            let record = store.get(key).await.expect("get").expect("record");
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.result, expected, "{key}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_are_purged_so_memory_stays_bounded() {
        let store = MemoryStore::with_tokio_clock();
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        for key in &keys {
            store
                .claim(&request(key, Duration::from_millis(30)))
                .await
                .expect("claim");
        }
        assert_eq!(store.len(), 1000);
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(store.purge_expired(), 1000);
        assert!(store.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn shards_sweep_themselves_as_they_are_used() {
        let store = MemoryStore::with_tokio_clock();
        for i in 0..500 {
            store
                .claim(&request(&format!("old{i}"), Duration::from_millis(10)))
                .await
                .expect("claim");
        }
        // Past the expiry and the per-shard sweep interval, new traffic alone
        // evicts the old records: no one calls purge_expired.
        tokio::time::advance(Duration::from_millis(1100)).await;
        for i in 0..2000 {
            store.get(&format!("probe{i}")).await.expect("get");
        }
        assert_eq!(store.len(), 0);
    }
}

//! [`MemoryStore`]: the in-process store.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::{ClaimRequest, IdempotencyStore, after};
use crate::error::{IdempotencyError, Result};
use crate::record::{
    ClaimDecision, ClaimOutcome, FinishDecision, IdempotencyRecord, Lease, ProcessingStatus,
    decide_claim, decide_finish,
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
    entries: HashMap<String, Entry, Hasher>,
    last_purge: Option<DateTime<Utc>>,
}

struct Entry {
    record: Box<IdempotencyRecord>,
    expires_at: DateTime<Utc>,
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
fn present(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_owned)
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Hasher::default(),
        }
    }

    /// The shard holding `key`, locked, swept if its last sweep is a second
    /// old at `now`.
    fn shard(&self, key: &str, now: DateTime<Utc>) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        // A poisoned shard only means a panic elsewhere while it was held; its
        // map is never left half-written by our code, so keep using it.
        let mut shard = self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.last_purge.is_none_or(|at| now - at >= PURGE_EVERY) {
            shard.entries.retain(|_, e| e.expires_at > now);
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
                let before = shard.entries.len();
                shard.entries.retain(|_, e| e.expires_at > now);
                shard.last_purge = Some(now);
                before - shard.entries.len()
            })
            .sum()
    }

    /// How many records are held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Entry {
    /// A copy of the record, with its expiry filled in.
    fn snapshot(&self) -> IdempotencyRecord {
        IdempotencyRecord {
            expires_at: Some(self.expires_at),
            ..(*self.record).clone()
        }
    }
}

impl Shard {
    fn live(&self, key: &str, now: DateTime<Utc>) -> Option<&Entry> {
        self.entries.get(key).filter(|e| e.expires_at > now)
    }

    /// Applies a token-checked transition at `now`; `write` edits the record
    /// in place and, given the record's current expiry, returns its new expiry.
    fn finish(
        &mut self,
        lease: &Lease,
        target: ProcessingStatus,
        now: DateTime<Utc>,
        write: impl FnOnce(&mut IdempotencyRecord, DateTime<Utc>) -> DateTime<Utc>,
    ) -> Result<()> {
        let mut entry = self
            .entries
            .get_mut(&lease.key)
            .filter(|e| e.expires_at > now);
        let existing = entry.as_ref().map(|e| &*e.record);
        match (
            decide_finish(existing, &lease.token, target, false),
            entry.as_mut(),
        ) {
            (FinishDecision::Apply, Some(entry)) => {
                entry.expires_at = write(&mut entry.record, entry.expires_at);
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
        let mut shard = self.shard(request.key, now);
        let entry = shard.live(request.key, now);
        let existing = entry.map(|e| &*e.record);
        let fingerprint = request.fingerprint.filter(|f| !f.is_empty());
        let decision = decide_claim(existing, fingerprint, request.token, now);
        let attempt = match (decision, entry) {
            (ClaimDecision::Acquire { attempt }, _) => attempt,
            (ClaimDecision::FingerprintMismatch, _) => {
                return Err(IdempotencyError::FingerprintMismatch {
                    key: request.key.to_owned(),
                });
            }
            (ClaimDecision::Duplicate, Some(entry)) => {
                return Ok(ClaimOutcome::Duplicate(entry.snapshot()));
            }
            (ClaimDecision::InProgress, Some(entry)) => {
                return Ok(ClaimOutcome::InProgress(entry.snapshot()));
            }
            (ClaimDecision::AlreadyHeld, Some(entry)) => {
                return Ok(ClaimOutcome::Acquired(Lease {
                    key: request.key.to_owned(),
                    token: request.token.to_owned(),
                    attempt: entry.record.attempts,
                    expires_at: entry.record.lease_expires_at.unwrap_or(now),
                    taken_over: false,
                }));
            }
            // The decisions above are only made for a present record.
            (_, None) => 1,
        };
        let taken_over = existing.is_some_and(|r| r.status == ProcessingStatus::Processing);
        let first_seen_at = existing.and_then(|r| r.first_seen_at).unwrap_or(now);
        let lease_expires_at = after(now, request.lease);
        let record = IdempotencyRecord {
            idempotency_key: request.recorded_key.to_owned(),
            event_id: present(request.event_id),
            event_type: present(request.event_type),
            status: ProcessingStatus::Processing,
            result: None,
            error: None,
            first_seen_at: Some(first_seen_at),
            completed_at: None,
            attempts: attempt,
            lease_token: Some(request.token.to_owned()),
            lease_expires_at: Some(lease_expires_at),
            fingerprint: present(fingerprint)
                .or_else(|| existing.and_then(|r| r.fingerprint.clone())),
            expires_at: None,
        };
        let expires_at = after(now, request.ttl.max(request.lease));
        shard.entries.insert(
            request.key.to_owned(),
            Entry {
                record: Box::new(record),
                expires_at,
            },
        );
        Ok(ClaimOutcome::Acquired(Lease {
            key: request.key.to_owned(),
            token: request.token.to_owned(),
            attempt,
            expires_at: lease_expires_at,
            taken_over,
        }))
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let mut renewed = lease.clone();
        let now = Utc::now();
        self.shard(&lease.key, now).finish(
            lease,
            ProcessingStatus::Processing,
            now,
            |record, expires_at| {
                let until = after(now, lease_duration);
                record.lease_expires_at = Some(until);
                renewed.expires_at = until;
                // Like Redis: the record lives at least as long as the lease.
                expires_at.max(until)
            },
        )?;
        Ok(renewed)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: &serde_json::Value,
        ttl: Duration,
    ) -> Result<()> {
        let now = Utc::now();
        self.shard(&lease.key, now)
            .finish(lease, ProcessingStatus::Completed, now, |record, _| {
                record.set_completed(result.clone(), now);
                after(now, ttl)
            })
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let now = Utc::now();
        self.shard(&lease.key, now)
            .finish(lease, ProcessingStatus::Failed, now, |record, _| {
                record.set_failed(error.to_owned());
                after(now, ttl)
            })
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let now = Utc::now();
        Ok(self.shard(key, now).live(key, now).map(Entry::snapshot))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let now = Utc::now();
        let removed = self.shard(key, now).entries.remove(key);
        Ok(removed.is_some_and(|e| e.expires_at > now))
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
                let mut shard = self.shard(key, now);
                if shard.live(key, now).is_some() {
                    return false;
                }
                let record = IdempotencyRecord::completed(serde_json::Value::Null, 1, None, now);
                shard.entries.insert(
                    key.to_owned(),
                    Entry {
                        record: Box::new(record),
                        expires_at,
                    },
                );
                true
            })
            .collect())
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let now = Utc::now();
        Ok(keys
            .iter()
            .map(|&key| self.shard(key, now).live(key, now).is_some())
            .collect())
    }
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

//! The optional local replay cache: `COMPLETED` records kept in this process
//! so that hot duplicates are answered without a store round trip.
//!
//! Only `COMPLETED` records enter it (they never change again until they
//! expire); an entry lives for the configured cache TTL and never past the
//! record's own expiry. It is bounded by entry count (quick_cache's
//! S3-FIFO eviction).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::record::{IdempotencyRecord, RecordStatus};

/// The optional in-process cache of `COMPLETED` records (see
/// [`IdempotencyConfigBuilder::local_cache`](crate::IdempotencyConfigBuilder::local_cache)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalCache {
    /// The most records kept; past it, the least useful entries are evicted.
    pub max_entries: usize,
    /// How long one entry may be replayed without asking the store (never
    /// longer than the record itself lives).
    pub ttl: Duration,
}

pub(crate) struct ReplayCache {
    entries: quick_cache::sync::Cache<String, Arc<Cached>>,
    ttl: Duration,
}

struct Cached {
    record: IdempotencyRecord,
    until: Instant,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("entries", &self.entries.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl ReplayCache {
    pub(crate) fn new(config: LocalCache) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(config.max_entries),
            ttl: config.ttl,
        }
    }

    /// The cached `COMPLETED` record of `key`, if it is fresh.
    pub(crate) fn get(&self, key: &str) -> Option<IdempotencyRecord> {
        let cached = self.entries.get(key)?;
        if cached.until > Instant::now() {
            return Some(cached.record.clone());
        }
        self.entries.remove_if(key, |c| Arc::ptr_eq(c, &cached));
        None
    }

    /// Keeps `record` if it is `COMPLETED`, until the earlier of the cache
    /// TTL and the record's own expiry (`record.expires_at`, or `expires_in`
    /// from now when the caller knows it better).
    pub(crate) fn put(
        &self,
        key: &str,
        mut record: IdempotencyRecord,
        expires_in: Option<Duration>,
    ) {
        if record.status != RecordStatus::Completed {
            return;
        }
        let left = expires_in.or_else(|| {
            let at = record.expires_at?;
            // An expiry already past (or unknown) is not cached.
            (at - Utc::now()).to_std().ok()
        });
        let Some(left) = left else { return };
        let now = Instant::now();
        let Some(until) = now.checked_add(self.ttl.min(left)) else {
            return;
        };
        if until <= now {
            return;
        }
        record.expires_at = None;
        self.entries
            .insert(key.to_owned(), Arc::new(Cached { record, until }));
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: &str) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed() -> IdempotencyRecord {
        IdempotencyRecord {
            idempotency_key: None,
            event_id: None,
            event_type: None,
            status: RecordStatus::Completed,
            result: Some(serde_json::json!("r")),
            error: None,
            first_seen_at: None,
            completed_at: Some(Utc::now()),
            attempts: 1,
            lease_token: None,
            lease_expires_at: None,
            fingerprint: None,
            expires_at: Some(Utc::now() + chrono::TimeDelta::hours(1)),
        }
    }

    fn cache(max_entries: usize, ttl: Duration) -> ReplayCache {
        ReplayCache::new(LocalCache { max_entries, ttl })
    }

    #[test]
    fn only_completed_records_are_kept() {
        let c = cache(10, Duration::from_secs(60));
        for status in [RecordStatus::Processing, RecordStatus::Failed] {
            let mut r = completed();
            r.status = status;
            c.put("k", r, None);
            assert!(c.get("k").is_none(), "{status} must not be cached");
        }
        c.put("k", completed(), None);
        assert_eq!(c.get("k").map(|r| r.attempts), Some(1));
        c.remove("k");
        assert!(c.get("k").is_none());
    }

    #[test]
    fn entries_never_outlive_the_record_or_the_cache_ttl() {
        let c = cache(10, Duration::from_millis(30));
        c.put("cache-ttl", completed(), None);
        let mut short = completed();
        short.expires_at = Some(Utc::now() + chrono::TimeDelta::milliseconds(10));
        let long_cache = cache(10, Duration::from_secs(60));
        long_cache.put("record-ttl", short, None);
        let mut gone = completed();
        gone.expires_at = Some(Utc::now() - chrono::TimeDelta::seconds(1));
        long_cache.put("expired", gone, None);
        let mut unknown = completed();
        unknown.expires_at = None;
        long_cache.put("unknown", unknown, None);

        assert!(c.get("cache-ttl").is_some());
        assert!(long_cache.get("record-ttl").is_some());
        assert!(long_cache.get("expired").is_none());
        assert!(long_cache.get("unknown").is_none());
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.get("cache-ttl").is_none(), "the cache ttl is honoured");
        assert!(
            long_cache.get("record-ttl").is_none(),
            "the record's own expiry is honoured"
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = cache(100, Duration::from_secs(60));
        for i in 0..10_000 {
            c.put(&format!("k{i}"), completed(), None);
        }
        assert!(c.entries.len() <= 200, "{} entries", c.entries.len());
    }
}

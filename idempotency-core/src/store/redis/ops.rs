//! Operations over every record under a key prefix: what the admin CLI runs.
//!
//! All of them walk the keyspace with `SCAN` (never `KEYS`), a page at a
//! time, so they do not block Redis on a large database.

use chrono::{DateTime, Utc};
use redis::Value;
use serde::Serialize;

use super::{RedisStore, ms_to_time, parse_record};
use crate::error::{IdempotencyError, Result};
use crate::record::{IdempotencyRecord, ProcessingStatus};

/// How many keys one `SCAN` page asks for.
const PAGE: usize = 500;

/// Counts of the records under a prefix, from [`RedisStore::summary`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PrefixSummary {
    /// Records being processed under a live lease.
    pub processing: u64,
    /// `PROCESSING` records whose lease ran out (see [`RedisStore::stuck`]).
    pub stuck: u64,
    /// Completed records.
    pub completed: u64,
    /// Failed records, waiting for a retry.
    pub failed: u64,
    /// Values under the prefix that are not records.
    pub corrupt: u64,
    /// The sum of `MEMORY USAGE` over those keys, in bytes.
    pub memory_bytes: u64,
}

impl PrefixSummary {
    /// Every key counted.
    pub fn total(&self) -> u64 {
        self.processing + self.stuck + self.completed + self.failed + self.corrupt
    }
}

/// `prefix` as a `SCAN MATCH` pattern matching exactly the keys it starts.
fn pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

impl RedisStore {
    /// One `SCAN` page: the next cursor and the keys found.
    async fn scan_page(&self, pattern: &str, cursor: u64) -> Result<(u64, Vec<String>)> {
        self.run("", |mut conn, _| async move {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// The store's clock (Redis `TIME`), as the scripts see it.
    async fn server_time(&self) -> Result<DateTime<Utc>> {
        let (secs, micros): (i64, i64) = self
            .run("", |mut conn, _| async move {
                redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        Ok(ms_to_time(secs * 1000 + micros / 1000))
    }

    /// The values of `keys`, with their `MEMORY USAGE`, in one round trip.
    async fn load_page(&self, keys: &[String]) -> Result<Vec<(Option<Vec<u8>>, u64)>> {
        let values: Vec<Value> = self
            .run("", |mut conn, _| async move {
                let mut pipe = redis::pipe();
                for key in keys {
                    // A non-string value makes GET fail; read it as "not a record".
                    pipe.cmd("EVAL")
                        .arg("local ok, v = pcall(redis.call, 'GET', KEYS[1]) if ok then return v end return false")
                        .arg(1)
                        .arg(key);
                    pipe.cmd("MEMORY").arg("USAGE").arg(key);
                }
                pipe.query_async(&mut conn).await
            })
            .await?;
        let mut out = Vec::with_capacity(keys.len());
        let mut values = values.into_iter();
        while let (Some(value), Some(usage)) = (values.next(), values.next()) {
            let value = match value {
                Value::BulkString(bytes) => Some(bytes),
                _ => None,
            };
            let usage = match usage {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            };
            out.push((value, usage));
        }
        Ok(out)
    }

    /// Walks every key under `prefix`, handing each page's keys and loaded
    /// values to `visit`.
    async fn walk(
        &self,
        prefix: &str,
        mut visit: impl FnMut(&str, Option<Result<IdempotencyRecord>>, u64),
    ) -> Result<()> {
        let pattern = pattern(prefix);
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(&pattern, cursor).await?;
            if !keys.is_empty() {
                let loaded = self.load_page(&keys).await?;
                for (key, (value, usage)) in keys.iter().zip(loaded) {
                    let record = value.map(|bytes| {
                        String::from_utf8(bytes)
                            .map_err(|e| IdempotencyError::corrupt(key, e))
                            .and_then(|text| parse_record(key, &text))
                    });
                    visit(key, record, usage);
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Every `PROCESSING` record under `prefix` whose lease has run out (by
    /// the store's clock): attempts that died or lost their connection. The
    /// next delivery of such a key takes it over; until then it blocks
    /// nothing but shows up here. Sorted by key.
    pub async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>> {
        let now = self.server_time().await?;
        let mut stuck = Vec::new();
        self.walk(prefix, |key, record, _| {
            if let Some(Ok(record)) = record
                && record.status == ProcessingStatus::Processing
                && !record.is_live_processing(now)
            {
                stuck.push((key.to_owned(), record));
            }
        })
        .await?;
        stuck.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stuck)
    }

    /// Counts the records under `prefix` by status, with their memory.
    pub async fn summary(&self, prefix: &str) -> Result<PrefixSummary> {
        let now = self.server_time().await?;
        let mut summary = PrefixSummary::default();
        self.walk(prefix, |_, record, usage| {
            let counter = match record {
                // Gone between SCAN and GET (expired or deleted).
                None if usage == 0 => return,
                None | Some(Err(_)) => &mut summary.corrupt,
                Some(Ok(r)) => match r.status {
                    ProcessingStatus::Completed => &mut summary.completed,
                    ProcessingStatus::Failed => &mut summary.failed,
                    ProcessingStatus::Processing if r.is_live_processing(now) => {
                        &mut summary.processing
                    }
                    ProcessingStatus::Processing => &mut summary.stuck,
                },
            };
            *counter += 1;
            summary.memory_bytes += usage;
        })
        .await?;
        Ok(summary)
    }

    /// Deletes every key under `prefix` (with `UNLINK`, a `SCAN` page at a
    /// time); returns how many were deleted. An empty prefix is refused: it
    /// would delete the whole database.
    pub async fn clear(&self, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            return Err(IdempotencyError::Config(
                "clear: refusing an empty prefix, which would delete every key".into(),
            ));
        }
        let pattern = pattern(prefix);
        let mut cursor = 0;
        let mut deleted = 0;
        loop {
            let (next, keys) = self.scan_page(&pattern, cursor).await?;
            if !keys.is_empty() {
                let keys = &keys;
                let n: u64 = self
                    .run("", |mut conn, _| async move {
                        redis::cmd("UNLINK").arg(keys).query_async(&mut conn).await
                    })
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(pattern("idempotency:events:"), "idempotency:events:*");
        assert_eq!(pattern("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\*");
    }
}

//! Redis memory per `COMPLETED` record.

use std::time::Duration;

use idempotency::{IdempotencyChecker, IdempotencyConfig};

use crate::bench::Bench;
use crate::problems::ok;
use crate::workload::{envelope, uuid_key, via_process};
use crate::{MEMORY_BASE, MEMORY_RECORDS, MEMORY_SAMPLE, PREFIX, RESULT, TTL_MS};

/// Redis memory per record: (average `MEMORY USAGE`, `used_memory` delta per record).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordMemory {
    pub(crate) usage: f64,
    pub(crate) delta: f64,
    pub(crate) key_len: usize,
}

impl RecordMemory {
    /// What the [`MEMORY_RECORDS`] records just written cost: `MEMORY USAGE`
    /// sampled over `keys`, and the `used_memory` growth since `before`.
    pub(crate) async fn of(bench: &Bench, before: i64, keys: &[String]) -> Self {
        let after = bench.used_memory().await;
        Self {
            usage: sample_usage(bench, keys).await,
            delta: (after - before) as f64 / MEMORY_RECORDS as f64,
            key_len: keys.first().map_or(0, String::len),
        }
    }
}

pub(crate) async fn sample_usage(bench: &Bench, keys: &[String]) -> f64 {
    let step = (keys.len() / MEMORY_SAMPLE).max(1);
    let mut total = 0i64;
    let mut n = 0i64;
    for key in keys.iter().step_by(step) {
        let usage: Option<Option<i64>> = bench
            .command(
                redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(key)
                    .arg("SAMPLES")
                    .arg(0),
            )
            .await;
        if let Some(Some(bytes)) = usage {
            total += bytes;
            n += 1;
        }
    }
    total as f64 / n.max(1) as f64
}

/// 10,000 COMPLETED records through a checker (hashing on or off).
pub(crate) async fn memory_ours(bench: &Bench, hash_keys: bool) -> RecordMemory {
    let config = IdempotencyConfig::builder()
        .hash_keys(hash_keys)
        .build()
        .expect("a valid configuration");
    let checker = IdempotencyChecker::with_config(bench.store.clone(), config);
    bench.flushall().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = bench.used_memory().await;
    let mut event = envelope(0);
    let mut keys = Vec::with_capacity(MEMORY_RECORDS);
    for k in 0..MEMORY_RECORDS as u64 {
        uuid_key(&mut event.event_id, "", MEMORY_BASE + k);
        ok(via_process(&checker, &event).await);
        if let Some(key) = ok(checker.storage_key(&event.event_id)) {
            keys.push(key);
        }
    }
    RecordMemory::of(bench, before, &keys).await
}

/// 10,000 plain `SET key <100-byte value> PX ttl` under keys of the same
/// length as ours (raw, or prefix + SHA-256 hex when `hashed`).
pub(crate) async fn memory_reference(bench: &Bench, hashed: bool) -> RecordMemory {
    bench.flushall().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let value = format!("\"{RESULT}\"");
    let before = bench.used_memory().await;
    let mut conn = bench.conn.clone();
    let mut keys = Vec::with_capacity(MEMORY_RECORDS);
    let mut raw = String::new();
    // The storage keys `RedisStore` writes with `hash_keys` on.
    let hashing = idempotency::IdempotencyChecker::with_config(
        idempotency::MemoryStore::new(),
        idempotency::IdempotencyConfig::builder()
            .key_prefix(PREFIX)
            .hash_keys(true)
            .build()
            .expect("config"),
    );
    for k in 0..MEMORY_RECORDS as u64 {
        uuid_key(&mut raw, "", MEMORY_BASE + k);
        let key = if hashed {
            hashing.storage_key(&raw).expect("key")
        } else {
            format!("{PREFIX}{raw}")
        };
        let set: redis::RedisResult<redis::Value> = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("PX")
            .arg(TTL_MS)
            .query_async(&mut conn)
            .await;
        ok(set);
        keys.push(key);
    }
    RecordMemory::of(bench, before, &keys).await
}

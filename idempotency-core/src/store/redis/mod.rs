//! [`RedisStore`]: the shared store for fleets of workers.
//!
//! # Schema
//! - Key: `{prefix}{idempotency_key}` (prefix default `idempotency:events:`; with
//!   key hashing on, the key part is the SHA-256 hex digest of the raw key).
//! - Value: one JSON document, the serialized
//!   [`IdempotencyRecord`](crate::IdempotencyRecord). Timestamps are
//!   integer milliseconds since the Unix epoch from Redis `TIME`, except
//!   `completed_at`: the completing host's clock on every path (a plain
//!   `SET ... IFEQ` cannot read the store's).
//! - Expiry: the key's own TTL (`PX`): `max(ttl, lease)` while `PROCESSING`,
//!   `ttl` from the moment it becomes `COMPLETED` or `FAILED`.
//!
//! A claim is first tried as one plain `SET key doc NX PX max(ttl, lease) GET`
//! (Redis 7.0 or later): an absent key is claimed, and a COMPLETED record
//! comes back as a duplicate, each in one command with no script. Since only
//! a script can read the store's clock, that claim document holds its lease
//! relative to the key's expiry (`lease_ms`, and the `claim_px` it was set
//! with: claimed at `expiry - claim_px`); every script settles it into
//! `first_seen_at` and `lease_expires_at` when it reads the record. A
//! `COMPLETED` document carries `ttl_ms`, so the replay knows when it
//! expires. Every other case (a live or expired lease, a FAILED record)
//! goes to the claim script.
//!
//! Claim, renew, complete, fail and read are Lua scripts run with `EVALSHA`
//! (loaded once, reloaded transparently after a `SCRIPT FLUSH`): one round
//! trip each, every one touching a single key, so Redis Cluster works
//! unchanged. A completion first replaces the document only if the key
//! still holds, byte for byte, the one the lease last wrote: one plain
//! `SET ... IFEQ` where the server has it (Valkey 8.1 and later, Redis 8.4
//! and later; found at connect), else a script that only compares (see the
//! `ifeq` module); the finish script decides what that cannot.

use std::sync::Arc;
use std::time::Duration;

mod admin;
mod builder;
mod conn;
mod dedup;
mod ifeq;
mod records;
mod retry;
mod scripts;
mod wire;

pub use builder::RedisStoreBuilder;
use conn::Connections;
use scripts::Scripts;

/// The store's name in errors and metrics.
const STORE: &str = "redis";

/// The Redis store: a single node, a Redis Cluster or a Sentinel-managed
/// master, chosen by the URL scheme.
///
/// | URL | topology |
/// |---|---|
/// | `redis://[user:password@]host:port[/db]` | one node |
/// | `rediss://...` | one node over TLS (feature `tls`) |
/// | `redis+cluster://[user:password@]host:port,host:port,...` | Redis Cluster, from any of its nodes |
/// | `redis+sentinel://[user:password@]host:port,.../SERVICE[/db]` | the master of a Sentinel service |
///
/// Run Redis with `maxmemory-policy noeviction`: an evicted record is a
/// forgotten event whose next delivery runs again, and every record has a
/// TTL, so the `volatile-*` policies evict them too. [`connect`](Self::connect)
/// refuses any other policy unless
/// [`allow_eviction`](RedisStoreBuilder::allow_eviction) is on. When a
/// `noeviction` Redis is full, duplicates are still replayed (a read answers
/// them) and writes fail with
/// [`StoreRefused`](crate::IdempotencyError::StoreRefused) /
/// [`OutOfMemory`](crate::error::StoreRefusal::OutOfMemory). A least-privilege ACL user
/// needs [`ACL_COMMANDS`](Self::ACL_COMMANDS) on the key prefix.
///
/// Every operation touches one key, so a cluster needs no hash tags. A
/// Sentinel store finds the new master by itself after a failover. The
/// credentials in the URL are for the data nodes; sentinels are asked
/// without credentials.
///
/// Cheap to clone: clones share one multiplexed connection.
///
/// ```no_run
/// # async fn run() -> Result<(), idempotency_core::IdempotencyError> {
/// use idempotency_core::{IdempotencyChecker, RedisStore};
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let checker = IdempotencyChecker::new(store);
/// # let _ = checker; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conns: Connections,
    scripts: Arc<Scripts>,
    max_retries: u32,
    op_timeout: Duration,
    allow_eviction: bool,
    ifeq: Arc<ifeq::Ifeq>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.conns)
            .field("max_retries", &self.max_retries)
            .field("op_timeout", &self.op_timeout)
            .field("allow_eviction", &self.allow_eviction)
            .field("set_ifeq", &self.ifeq.supported())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The ACL rules for every command the store sends (its scripts' own
    /// included), for a least-privilege user; add a key pattern for the
    /// prefix (`~idempotency:*`). A command refused by the ACL is
    /// [`StoreRefused`](crate::IdempotencyError::StoreRefused) with
    /// [`PermissionDenied`](crate::error::StoreRefusal::PermissionDenied), naming the
    /// command. The admin operations ([`StoreAdmin`](crate::store::StoreAdmin)'s
    /// `stuck`, `summary` and `clear_prefix`) also need
    /// `+scan +unlink +memory|usage`, and a cluster `+cluster|slots
    /// +cluster|nodes`.
    pub const ACL_COMMANDS: &'static str =
        "+ping +info +evalsha +eval +script|load +get +set +del +exists +pttl +pexpiretime +time";
}

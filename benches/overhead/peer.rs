//! The peer: the crate `idempotent` 0.3.0 with its Redis store
//! (`idempotent::store::valkey::ValkeyStore`), driven by its README's flow:
//! compute the request's fingerprint, `try_insert` a `Processing` entry
//! (one Lua script), run the handler, then `complete` with the fencing token
//! `try_insert` returned (a second script). A duplicate is the same
//! `try_insert`, which returns the completed entry; its fingerprint is
//! checked and its cached response read.
//!
//! What it guarantees, next to ours: fenced completion (a stale worker's
//! `complete` is refused), but no lease renewal (a handler that outlives the
//! claim's TTL loses it silently), no failure state (a failed handler leaves
//! the claim until its TTL or a `remove`), and replay of the cached response.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idempotent::entry::{CachedResponse, ExistingEntry, Metadata};
use idempotent::fingerprint::{DefaultFingerprintStrategy, Fingerprint, FingerprintStrategy};
use idempotent::store::valkey::ValkeyStore;
use idempotent::store::{IdempotencyStore, InsertResult};
use idempotent::{IdempotencyEntry, IdempotencyKey};

use crate::problems::{ANOMALIES, ERRORS, ok, problem};
use crate::{RESULT, TTL_MS};

/// The operation and body the peer fingerprints (its README's flow; ours
/// runs with fingerprinting off, its default, so it hashes nothing).
const OPERATION: &str = "order.placed";
const BODY: &[u8] = br#"{"order_id":42,"amount_cents":1200}"#;

/// The peer's store and its duplicate keys; cheap to clone.
#[derive(Clone)]
pub(crate) struct Peer {
    store: Arc<ValkeyStore>,
    dup_keys: Arc<[IdempotencyKey]>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("dup_keys", &self.dup_keys.len())
            .finish_non_exhaustive()
    }
}

fn fingerprint() -> Fingerprint {
    DefaultFingerprintStrategy.compute(OPERATION, BODY)
}

fn ttl() -> Duration {
    Duration::from_millis(TTL_MS)
}

impl Peer {
    /// Connects the peer's store to `url` (its own connection manager, with
    /// the `redis` crate's default settings, as its README does).
    pub(crate) async fn connect(url: &str, dup_keys: &[String]) -> Self {
        let client = redis::Client::open(url).expect("a Redis URL");
        let store = ValkeyStore::new(client)
            .await
            .expect("connect idempotent's store to the benchmark's server");
        let dup_keys = dup_keys
            .iter()
            .map(|k| IdempotencyKey::new(format!("{k}:peer")).expect("a valid key"))
            .collect();
        Self {
            store: Arc::new(store),
            dup_keys,
        }
    }

    /// One new event under `key`: claim, the no-op handler, complete.
    pub(crate) async fn new_event(&self, key: &str) {
        let Some(key) = ok(IdempotencyKey::new(key.to_owned())) else {
            return;
        };
        self.claim_and_complete(&key).await;
    }

    async fn claim_and_complete(&self, key: &IdempotencyKey) {
        let entry = IdempotencyEntry::new(fingerprint(), ttl());
        match ok(self.store.try_insert(key, entry.clone()).await) {
            Some(InsertResult::Claimed { fencing_token }) => {
                let response = CachedResponse {
                    status_code: 200,
                    metadata: Metadata::default(),
                    body: Bytes::from_static(RESULT.as_bytes()),
                };
                let completed = entry.complete(response);
                ok(self.store.complete(key, completed, fencing_token).await);
            }
            Some(InsertResult::Exists(_)) => problem(&ANOMALIES, "idempotent: a fresh key existed"),
            None => {}
        }
    }

    /// A duplicate of the completed event `dup_keys[index]`.
    pub(crate) async fn duplicate(&self, index: usize) {
        let key = &self.dup_keys[index % self.dup_keys.len()];
        let entry = IdempotencyEntry::new(fingerprint(), ttl());
        match ok(self.store.try_insert(key, entry).await) {
            Some(InsertResult::Exists(ExistingEntry::Completed(done))) => {
                if !done.fingerprint_matches(fingerprint()) {
                    problem(&ANOMALIES, "idempotent: a duplicate's fingerprint differs");
                }
                black_box(done.response());
            }
            Some(other) => problem(
                &ANOMALIES,
                format_args!("idempotent: a duplicate found {other:?}"),
            ),
            None => {}
        }
    }

    /// Completes every duplicate key (after a FLUSHALL).
    pub(crate) async fn seed_duplicates(&self) {
        for key in self.dup_keys.iter() {
            if let Err(e) = self.store.remove(key).await {
                problem(&ERRORS, e);
            }
            self.claim_and_complete(key).await;
        }
    }
}

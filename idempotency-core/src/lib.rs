//! The engine of the `idempotency` framework.
//!
//! Distributed systems deliver messages at least once. This crate makes each
//! event's side effects happen once: a key is claimed atomically in a shared
//! store, the first caller runs the handler under a renewed lease, duplicates
//! get the first result replayed, failed attempts are retried, and a crashed
//! attempt is taken over once its lease runs out.
//!
//! Pure deduplication pipelines, which need "is this id new?" rather than
//! a handler run once, use [`Deduplicator`] on the same stores.
//!
//! Most applications depend on the umbrella crate `idempotency`, which
//! re-exports this one. Store authors depend on this crate and implement
//! [`IdempotencyStore`].
//!
//! # Writing a store
//!
//! Implement [`IdempotencyStore`], and apply the state machine's rules
//! rather than writing them again: inside each atomic step, read the record
//! at the key, ask [`record::decide_claim`] (for `claim`) or
//! [`record::decide_finish`] (for `renew`, `complete`, `fail`) what to do,
//! and do what the [`ClaimDecision`](record::ClaimDecision) or
//! [`FinishDecision`](record::FinishDecision) says. Then run the conformance
//! suite of the `testing` feature against it: one line,
//! `idempotency_core::store_conformance_tests!(my_store => new_store);`, in a
//! test file (see `testing`). [`MemoryStore`] is the reference; the
//! `idempotency-store-example` crate of the repository is a store written
//! with public API only.
//!
//! # Example
//! ```
//! use idempotency_core::{EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), IdempotencyError> {
//! let checker = IdempotencyChecker::new(MemoryStore::new());
//! let event = EventEnvelope::new("invoice.paid", serde_json::json!({"invoice": 7}));
//!
//! for _delivery in 0..3 {
//!     let receipt = checker
//!         .process(&event, |lease| async move {
//!             // Side effects go here; `lease.token()` can fence them.
//!             Ok::<_, IdempotencyError>(format!("receipt for attempt {}", lease.attempt()))
//!         })
//!         .await?;
//!     assert_eq!(receipt.value(), "receipt for attempt 1");
//! }
//! assert_eq!(checker.stats().executed, 1);
//! assert_eq!(checker.stats().replayed, 2);
//! # Ok(()) }
//! ```
//!
//! # Features
//! | feature | what it adds |
//! |---|---|
//! | `redis` | [`RedisStore`], on the `redis` crate's `ConnectionManager` |
//! | `testing` | the store conformance suite (`testing`, `store_conformance_tests!`, `for_each_conformance_rule!`), for store tests |
#![cfg_attr(docsrs, feature(doc_cfg))]

// The data: what a call carries, what is stored, how keys are made, and
// the errors and configuration they share.
mod config;
mod envelope;
mod error;
mod key;
pub mod record;
// The engine, and what keeps it going when the store does not answer.
mod checker;
mod resilience;
mod stats;
// The transport-neutral consume core that every transport adapter uses.
pub mod consume;
// The storage boundary and its implementations, and the seen-set
// deduplicator built on it.
mod dedup;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[doc(hidden)]
pub mod __private;

pub use checker::global::{default_checker, set_default_checker};
pub use checker::{IdempotencyChecker, IdempotencyGuard, KeyedRequest, Processed, current_lease};
pub use config::{
    DuplicatePolicy, IdempotencyConfig, IdempotencyConfigBuilder, InProgressPolicy, parse_duration,
};
pub use dedup::{Deduplicator, KeyExtractor, KeyFn};
pub use envelope::EventEnvelope;
pub use error::{BoxError, IdempotencyError, InvalidKeyReason, Result, StoreRefusal};
pub use key::fingerprint;
pub use record::{ClaimOutcome, IdempotencyRecord, Lease, RecordStatus};
pub use resilience::breaker::{CircuitBreakerConfig, CircuitState};
pub use resilience::cache::LocalCache;
pub use stats::CheckerStats;
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    ClaimRequest, DynStore, IdempotencyStore, ResultJson, SeenSet, StoreAdmin, StoreSummary,
};

//! `idempotency`: make event and request handlers idempotent.
//!
//! Distributed systems deliver messages at least once: NATS and JetStream
//! redeliver, webhooks retry, clients resend. This crate makes each event's
//! side effects happen once, and gives retries the first answer back.
//!
//! This is the crate applications depend on; it re-exports
//! [`idempotency-core`](idempotency_core) (envelope, checker, stores). See
//! `IDEMPOTENCY_GUIDE.md` for the guide.
//!
//! # Example
//! ```
//! use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), IdempotencyError> {
//! let checker = IdempotencyChecker::new(MemoryStore::new());
//! let event = EventEnvelope::new("order.placed", serde_json::json!({"order": 42}));
//!
//! let first = checker.process(&event, |_| async { Ok::<_, IdempotencyError>(1) }).await?;
//! let retry = checker.process(&event, |_| async { Ok::<_, IdempotencyError>(2) }).await?;
//! assert!(first.was_executed() && retry.was_replayed());
//! assert_eq!(retry.into_inner(), 1);
//! # Ok(()) }
//! ```
//!
//! # Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `macros` | yes | [`#[idempotent]`](idempotent), the attribute for async handlers |
//! | `redis` | yes | [`RedisStore`], the shared store for fleets of workers |
//! | `http` | no | [`http`]: the `Idempotency-Key` tower layer for axum |
//! | `nats` | no | [`nats`]: NATS subscribers, JetStream consumers, the dedup relay |
//! | `tls` | no | `rediss://` URLs for [`RedisStore`] (rustls with the ring provider) |
//! | `cli` | no | the `idempotency` admin binary |
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use idempotency_core::*;

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
#[doc(inline)]
pub use idempotency_macros::idempotent;

/// The `Idempotency-Key` HTTP header for axum and other tower services
/// (the `idempotency-http` crate).
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use idempotency_http as http;

/// NATS subscribers, JetStream consumers and the dedup relay
/// (the `idempotency-nats` crate).
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use idempotency_nats as nats;

// The README and the guide are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(all(
    doctest,
    feature = "http",
    feature = "nats",
    feature = "macros",
    feature = "redis",
    feature = "tls"
))]
#[doc = include_str!("../IDEMPOTENCY_GUIDE.md")]
struct GuideDoctests;

//! `idempotency`: make event and request handlers idempotent.
//!
//! Distributed systems deliver messages at least once: NATS and JetStream
//! redeliver, webhooks retry, clients resend. This crate makes each event's
//! side effects happen once, and gives retries the first answer back.
//!
//! This is the crate applications depend on; it re-exports
//! [`idempotency-core`](idempotency_core) (envelope, checker, stores). See
//! the `guide` module (with every feature on, as on docs.rs; also
//! `IDEMPOTENCY_GUIDE.md` and `docs/guide/` in the repository).
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

/// See the guide's chapter `guide::attribute` for every option, each with
/// the code it stands for written without the macro.
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

// The README is compiled and run as doctests; the guide is the `guide` module.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The guide, one module per chapter: the files of `docs/guide/`, indexed by
/// `IDEMPOTENCY_GUIDE.md`. Every Rust snippet in it but one (a
/// `tracing-subscriber` set-up, shown only) is compiled as a doctest, and run
/// unless it needs a server (`no_run`). Built with every feature on
/// (as on docs.rs), since its chapters use them all.
#[cfg(all(
    any(doc, doctest),
    feature = "http",
    feature = "nats",
    feature = "macros",
    feature = "redis",
    feature = "tls"
))]
pub mod guide {
    #[doc = include_str!("../docs/guide/01-quick-start.md")]
    pub mod quick_start {}

    #[doc = include_str!("../docs/guide/02-concepts.md")]
    pub mod concepts {}

    #[doc = include_str!("../docs/guide/03-redis-schema.md")]
    pub mod redis_schema {}

    #[doc = include_str!("../docs/guide/04-configuration.md")]
    pub mod configuration {}

    #[doc = include_str!("../docs/guide/05-manual-guard.md")]
    pub mod manual_guard {}

    #[doc = include_str!("../docs/guide/06-attribute.md")]
    pub mod attribute {}

    #[doc = include_str!("../docs/guide/07-http.md")]
    pub mod http {}

    #[doc = include_str!("../docs/guide/08-nats.md")]
    pub mod nats {}

    #[doc = include_str!("../docs/guide/09-errors.md")]
    pub mod errors {}

    #[doc = include_str!("../docs/guide/10-deployment.md")]
    pub mod deployment {}

    #[doc = include_str!("../docs/guide/11-operations.md")]
    pub mod operations {}

    #[doc = include_str!("../docs/guide/12-troubleshooting.md")]
    pub mod troubleshooting {}

    #[doc = include_str!("../docs/guide/13-guarantees.md")]
    pub mod guarantees {}
}

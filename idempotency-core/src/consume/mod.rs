//! One consume core for every transport: a delivered message in, a
//! [`Disposition`] out.
//!
//! A transport adapter (the NATS subscriber, JetStream worker and dedup
//! relay; a Kafka consumer; an HTTP endpoint) does only what is specific to
//! its transport:
//!
//! 1. it turns a received message into a [`Delivery`]: the body's bytes and
//!    the `Idempotency-Key` header, if any ([`header_key`] finds it among the
//!    message's headers);
//! 2. it asks a [`Runner`] to [`consume`](Runner::consume) it: the body is
//!    decoded as an [`EventEnvelope`](crate::EventEnvelope), the handler runs
//!    once per key under the checker, and the outcome becomes a
//!    [`Disposition`];
//! 3. it carries the disposition out.
//!
//! | disposition | JetStream | Kafka | core NATS request, HTTP |
//! |---|---|---|---|
//! | [`Ack`](Disposition::Ack) | ack | commit the offset | reply with the JSON result |
//! | [`Retry`](Disposition::Retry) | nak with a delay | do not commit; seek back, or a retry topic | error reply (`failed`, or `in_progress` when `busy`) |
//! | [`Reject`](Disposition::Reject) | term | commit, and publish to a dead-letter topic | error reply (`rejected`, or `invalid` when `poison`) |
//!
//! A handler's error says which disposition it deserves through
//! [`HandlerError`]: implemented for [`IdempotencyError`](crate::IdempotencyError)
//! (precise: busy, duplicate, rejected, retry), [`BoxError`](crate::BoxError),
//! `String`, `&'static str`, [`std::io::Error`] and
//! [`Infallible`](std::convert::Infallible); implement it for your own
//! error type (see [`HandlerError`]).
//!
//! # For adapter authors
//! Besides the [`Runner`], an adapter's consume loop needs two pieces that
//! are the same for every transport:
//!
//! - [`run_bounded`] runs each received message as a task, at most
//!   `concurrency` at a time, and stops on shutdown (or when the adapter
//!   sees an error it cannot get past), waiting for the messages in flight.
//!   A task that panics is logged, not propagated.
//! - [`RetryDelays`] says how long to wait before a
//!   [`Retry`](Disposition::Retry) is delivered again: a fixed `busy` delay
//!   while another attempt holds the key, otherwise
//!   [`for_delivery`](RetryDelays::for_delivery), exponential in the
//!   delivery count and capped. JetStream counts deliveries itself; a Kafka
//!   adapter counts them per message.
//!
//! An adapter is then: a stream of messages, a closure for
//! [`run_bounded`] that turns a message into a [`Delivery`], awaits
//! [`Runner::consume`] and settles the message by its [`Disposition`].
//! `idempotency-nats` is written this way.
//!
//! The HTTP middleware (`IdempotencyLayer` in `idempotency-http`) is not a
//! consumer of envelopes: it wraps any tower service, and what it records
//! and replays is the whole response (status, headers, body) under the
//! `Idempotency-Key` draft's rules, not a disposition. It calls the
//! checker's [`process_request`](crate::IdempotencyChecker::process_request)
//! directly, the path [`Runner`] takes too (through a crate-private twin
//! that also hands back the result's JSON text, the `Ack`'s reply). An
//! HTTP endpoint that receives
//! envelopes as JSON bodies is an adapter like the others: a [`Delivery`]
//! from the body and the header, a response from the [`Disposition`].
//!
//! # Example
//! ```
//! use idempotency_core::consume::{Delivery, Disposition, Runner};
//! use idempotency_core::{EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let runner = Runner::new(
//!     IdempotencyChecker::new(MemoryStore::new()),
//!     |envelope: EventEnvelope<serde_json::Value>| async move {
//!         Ok::<_, IdempotencyError>(envelope.payload["n"].as_i64())
//!     },
//! );
//! let body = br#"{"event_id":"e1","event_type":"t","payload":{"n":7}}"#;
//! for _delivery in 0..2 {
//!     match runner.consume(Delivery::new(body)).await {
//!         Disposition::Ack { reply } => assert_eq!(reply, b"7"),
//!         other => panic!("{other:?}"),
//!     }
//! }
//! // A body that is not an envelope can never succeed.
//! let poison = runner.consume(Delivery::new(b"not json")).await;
//! assert!(matches!(poison, Disposition::Reject { poison: true, .. }));
//! # }
//! ```

mod classify;
mod delivery;
mod drive;
mod runner;

pub use classify::HandlerError;
pub use delivery::{DecodeError, Delivery, IDEMPOTENCY_KEY_HEADER, header_key};
pub use drive::{RetryDelays, run_bounded};
pub use runner::{EventHandler, Runner, process};

/// What a transport does with a message once it was consumed: the one
/// answer of the consume core, in words every transport maps onto its own
/// (see the [module](self) table).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// The event was handled, now or by an earlier delivery: acknowledge it
    /// (ack, commit the offset) and answer a request with `reply`.
    Ack {
        /// The handler's result as JSON (the first result, replayed, for a
        /// duplicate); empty where there is no result to give.
        reply: Vec<u8>,
    },
    /// The event was not handled this time: deliver it again later.
    Retry {
        /// `true` when another attempt holds the key (not a failure: retry
        /// after a short fixed delay); `false` after a failure (a handler
        /// error, a store outage: retry with backoff).
        busy: bool,
        /// Why, without any key in it (fit for logs and error replies).
        reason: String,
    },
    /// The event can never succeed: drop it (terminate, dead-letter).
    Reject {
        /// `true` when the message itself is unreadable (not an envelope,
        /// no key): poison. `false` when it was read but refused (the key
        /// reused with another payload, an invalid key, a result that could
        /// not be stored, a handler error that says it is permanent).
        poison: bool,
        /// Why, without any key in it (fit for logs and error replies).
        reason: String,
    },
}

impl Disposition {
    /// [`Ack`](Self::Ack) with `reply`.
    pub fn ack(reply: impl Into<Vec<u8>>) -> Self {
        Self::Ack {
            reply: reply.into(),
        }
    }

    /// [`Retry`](Self::Retry) after a failure (`busy: false`).
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            busy: false,
            reason: reason.into(),
        }
    }

    /// [`Reject`](Self::Reject) of a message that was read but can never
    /// succeed (`poison: false`).
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject {
            poison: false,
            reason: reason.into(),
        }
    }

    /// [`Ack`](Self::Ack) with `value` as JSON; a value that does not
    /// serialize is a [`Reject`](Self::Reject).
    pub fn reply_of<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(json) => Self::Ack { reply: json },
            Err(e) => Self::reject(format!("the result could not be serialized: {e}")),
        }
    }
}

impl From<DecodeError> for Disposition {
    /// A message that cannot be decoded is poison: rejected, with the
    /// reason.
    fn from(error: DecodeError) -> Self {
        Self::Reject {
            poison: true,
            reason: error.to_string(),
        }
    }
}

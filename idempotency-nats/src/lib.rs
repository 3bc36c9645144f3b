//! NATS subscribers, JetStream consumers and a dedup relay on the
//! `idempotency` engine: at-least-once delivery in, exactly-once effects out.
//!
//! - [`Subscriber`]: a core subscription (optionally in a queue group); a
//!   request gets the handler's JSON result as its reply, and a duplicate
//!   request the same reply.
//! - [`JetStreamWorker`]: a pull consumer with bounded concurrency, acks,
//!   naks with backoff, terms for poison, progress acks and graceful shutdown.
//! - [`DedupRelay`]: stream in, unique events out, acking the input only after
//!   the output publish is acknowledged.
//! - [`publish_event`]: publishes an envelope with `Nats-Msg-Id` set to its
//!   key, so the stream's duplicate window is a first line of defence.
//!
//! | outcome | JetStream | core request |
//! |---|---|---|
//! | handler completed | ack | reply with the JSON result |
//! | duplicate of a completed event | ack (handler not run) | the first reply, replayed |
//! | handler error, store unavailable | nak, delay `base × 2^(deliveries−1)` | error reply, `Idempotency-Status: failed` |
//! | another worker holds the key | nak, `busy_delay` | error reply, `Idempotency-Status: in_progress` |
//! | key reused with another payload, invalid key | term | error reply, `Idempotency-Status: rejected` |
//! | body is not an envelope, or has no key (poison) | term, logged, counted | error reply, `Idempotency-Status: invalid` |
//! | the consumer or its stream was deleted | `run` returns [`WorkerError::ConsumerDeleted`] | — |
//!
//! Handlers are `Fn(EventEnvelope<P>) -> impl Future<Output = Result<T, E>>`:
//! plain closures run under the checker you pass to `run`, and
//! `#[idempotent]` functions, which guard themselves, go to `run_idempotent`.

mod consumer;
mod handler;
mod relay;
mod subscriber;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use idempotency_core::EventEnvelope;
use serde::Serialize;

pub use consumer::{JetStreamWorker, NatsStats, WorkerError};
pub use handler::{EventHandler, IDEMPOTENCY_KEY_HEADER};
pub use idempotency_core::KeyExtractor;
pub use relay::DedupRelay;
pub use subscriber::{STATUS_HEADER, Subscriber, SubscriberStats};

/// JetStream's message-id header, used for its duplicate window.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Publishes `envelope` as JSON to `subject` on JetStream with `Nats-Msg-Id`
/// set to its key ([`EventEnvelope::require_key`]; an envelope without one
/// is refused before anything is sent), and waits for the stream's ack. Within the
/// stream's duplicate window, a second publish of the same event is dropped by
/// the server; the checker catches the rest.
pub async fn publish_event<P: Serialize>(
    jetstream: &jetstream::Context,
    subject: impl Into<String>,
    envelope: &EventEnvelope<P>,
) -> Result<PublishAck, async_nats::Error> {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MSG_ID, envelope.require_key()?);
    let body = Bytes::from(serde_json::to_vec(envelope)?);
    let ack = jetstream
        .publish_with_headers(subject.into(), headers, body)
        .await?
        .await?;
    Ok(ack)
}

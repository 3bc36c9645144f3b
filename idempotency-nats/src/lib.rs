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
//! Each integration is a thin adapter over the consume core
//! ([`idempotency_core::consume`]): it turns a NATS message into a
//! [`Delivery`], lets a [`Runner`]
//! consume it, and maps the resulting
//! [`Disposition`](idempotency_core::consume::Disposition) onto ack, nak,
//! term or a reply. Handlers are `Fn(EventEnvelope<P>) -> impl Future<Output
//! = Result<T, E>>` whose error `E` says what its message deserves
//! ([`HandlerError`]): [`Runner::new`] runs a plain closure under a checker,
//! [`Runner::self_guarded`] runs an `#[idempotent]` function, which guards
//! itself.

mod consumer;
mod relay;
mod subscriber;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use idempotency_core::EventEnvelope;
use idempotency_core::consume::{DecodeError, Delivery};
use serde::Serialize;

pub use consumer::{JetStreamWorker, WorkerError, WorkerStats};
pub use idempotency_core::KeyExtractor;
pub use idempotency_core::consume::{EventHandler, HandlerError, IDEMPOTENCY_KEY_HEADER, Runner};
pub use relay::DedupRelay;
pub use subscriber::{STATUS_HEADER, Subscriber, SubscriberStats};

/// A NATS message as the consume core reads it: its body and its
/// `Idempotency-Key` header (any casing; more than one is an error).
pub(crate) fn delivery<'a>(
    payload: &'a [u8],
    headers: Option<&'a HeaderMap>,
) -> Result<Delivery<'a>, DecodeError> {
    let pairs = headers
        .into_iter()
        .flat_map(HeaderMap::iter)
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (AsRef::<str>::as_ref(name), value.as_str()))
        });
    Delivery::with_headers(payload, pairs)
}

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

#[cfg(test)]
mod tests {
    use idempotency_core::KeyExtractor;

    use super::*;

    #[test]
    fn the_key_header_is_read_in_any_casing_and_only_once() {
        let body = br#"{"event_id":"e1","idempotency_key":"k1","event_type":"t","payload":{}}"#;
        let key = |headers: Option<&HeaderMap>| {
            delivery(body, headers).and_then(|d| d.key_by(&KeyExtractor::IdempotencyKey))
        };
        assert_eq!(key(None).ok().as_deref(), Some("k1"));
        for name in ["Idempotency-Key", "idempotency-key", "IDEMPOTENCY-KEY"] {
            let mut headers = HeaderMap::new();
            headers.insert(name, "h1");
            assert_eq!(key(Some(&headers)).ok().as_deref(), Some("h1"));
        }
        // Two names that differ in casing, or one name with two values.
        for names in [
            ["idempotency-key", "Idempotency-Key"],
            ["Idempotency-Key", "Idempotency-Key"],
        ] {
            let mut twice = HeaderMap::new();
            for (name, value) in names.into_iter().zip(["h1", "h2"]) {
                twice.append(name, value);
            }
            assert!(matches!(
                key(Some(&twice)),
                Err(DecodeError::DuplicateKeyHeader)
            ));
        }
    }
}

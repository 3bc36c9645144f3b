//! [`DedupRelay`]: stream → unique events → output stream.

use std::future::Future;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, Message};
use idempotency_core::{
    IdempotencyChecker, IdempotencyError, KeyedRequest, Processed, canonical_json, sha256_hex,
};

use crate::NATS_MSG_ID;
use crate::consumer::{
    Counters, Delays, NatsStats, drive, settle, terminate_poison, with_progress,
};
use crate::handler::{Disposition, IDEMPOTENCY_KEY_HEADER};

/// How the relay decides that two messages are the same event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyStrategy {
    /// The `Idempotency-Key` header, else the body's envelope key
    /// (`idempotency_key`, else `event_id`).
    EnvelopeKey,
    /// Named fields of the JSON body joined with `:`, e.g.
    /// `["timestamp", "distinct_id", "token", "event_name"]`. Dotted names
    /// reach into objects (`"payload.user_id"`). A message missing a field is
    /// poison: it is terminated, never given a made-up value.
    Fields(Vec<String>),
    /// The SHA-256 of the body's canonical JSON (object keys sorted at every
    /// level), for events that carry no identity at all.
    ContentHash,
}

impl KeyStrategy {
    /// The key of a message, or why it has none.
    pub fn key_of(&self, body: &[u8], headers: Option<&HeaderMap>) -> Result<String, String> {
        if let (Self::EnvelopeKey, Some(key)) =
            (self, headers.and_then(|h| h.get(IDEMPOTENCY_KEY_HEADER)))
        {
            return Ok(key.as_str().to_owned());
        }
        let json: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
        match self {
            Self::EnvelopeKey => ["idempotency_key", "event_id"]
                .iter()
                .find_map(|field| {
                    json.get(field)
                        .and_then(|v| v.as_str())
                        .filter(|s| !s.is_empty())
                })
                .map(str::to_owned)
                .ok_or_else(|| {
                    "the body has neither an idempotency_key nor an event_id".to_owned()
                }),
            Self::Fields(fields) => fields
                .iter()
                .map(|field| {
                    let value = field.split('.').try_fold(&json, |v, part| v.get(part));
                    match value {
                        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                            Ok(v.to_string())
                        }
                        _ => Err(format!("the body lacks the key field `{field}`")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|parts| parts.join(":")),
            Self::ContentHash => Ok(sha256_hex(canonical_json(&json).as_bytes())),
        }
    }
}

/// Relays the first copy of every event from a JetStream consumer to an
/// output subject, dropping duplicates.
///
/// For each input message: claim its key; if new, publish it to the output
/// with `Nats-Msg-Id` set to the key and wait for the stream's ack; only then
/// complete the claim and ack the input. If the publish fails the claim is
/// marked failed and the input nak'd, so the event is retried, never lost. A
/// crash between the publish and the completion makes the retry publish again,
/// and the output stream's duplicate window (keep it longer than the lease)
/// drops the second copy. Duplicates are acked and dropped.
#[derive(Debug)]
#[must_use]
pub struct DedupRelay {
    consumer: PullConsumer,
    jetstream: jetstream::Context,
    output_subject: String,
    strategy: KeyStrategy,
    concurrency: usize,
    delays: Delays,
}

impl DedupRelay {
    /// A relay from `consumer` to `output_subject` (published through
    /// `jetstream`), keyed by `strategy`.
    pub fn new(
        consumer: PullConsumer,
        jetstream: jetstream::Context,
        output_subject: impl Into<String>,
        strategy: KeyStrategy,
    ) -> Self {
        Self {
            consumer,
            jetstream,
            output_subject: output_subject.into(),
            strategy,
            concurrency: 16,
            delays: Delays::default(),
        }
    }

    /// How many messages are relayed at once (default 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Nak delay after a failed publish: `base × 2^(deliveries − 1)`, at most
    /// `max` (default 1s and 60s).
    pub fn retry_delay(mut self, base: std::time::Duration, max: std::time::Duration) -> Self {
        self.delays.base = base;
        self.delays.max = max;
        self
    }

    /// Nak delay while another relay instance holds the key (default 1s).
    pub fn busy_delay(mut self, delay: std::time::Duration) -> Self {
        self.delays.busy = delay;
        self
    }

    /// Relays until `shutdown` completes, then lets in-flight messages finish.
    pub async fn run(
        self,
        checker: IdempotencyChecker,
        shutdown: impl Future<Output = ()>,
    ) -> Result<NatsStats, async_nats::Error> {
        let counters = Arc::new(Counters::default());
        let shared = Arc::new((checker, self.jetstream, self.output_subject, self.strategy));
        let progress_every = self.consumer.cached_info().config.ack_wait / 2;
        let delays = self.delays;
        drive(&self.consumer, self.concurrency, shutdown, |message| {
            let (shared, counters) = (Arc::clone(&shared), Arc::clone(&counters));
            async move {
                let (checker, jetstream, output, strategy) = &*shared;
                let key = match strategy.key_of(&message.payload, message.headers.as_ref()) {
                    Ok(key) => key,
                    Err(reason) => return terminate_poison(&message, &reason, &counters).await,
                };
                let relayed = relay_one(checker, jetstream, output, &key, &message);
                let disposition = with_progress(&message, progress_every, relayed).await;
                settle(&message, disposition, delays, &counters).await;
            }
        })
        .await?;
        Ok(counters.snapshot())
    }
}

/// Why a relay attempt did not complete.
#[derive(Debug)]
enum RelayError {
    Idempotency(IdempotencyError),
    Publish(async_nats::Error),
}

impl From<IdempotencyError> for RelayError {
    fn from(error: IdempotencyError) -> Self {
        Self::Idempotency(error)
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idempotency(e) => e.fmt(f),
            Self::Publish(e) => write!(f, "publishing to the output failed: {e}"),
        }
    }
}

async fn relay_one(
    checker: &IdempotencyChecker,
    jetstream: &jetstream::Context,
    output: &str,
    key: &str,
    message: &Message,
) -> Disposition {
    let request = KeyedRequest::new(key).event_type("relay");
    let outcome = checker
        .process_request(request, |_lease| async {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MSG_ID, key);
            let ack = jetstream
                .publish_with_headers(output.to_owned(), headers, message.payload.clone())
                .await
                .map_err(|e| RelayError::Publish(e.into()))?
                .await
                .map_err(|e| RelayError::Publish(e.into()))?;
            Ok(ack.sequence)
        })
        .await;
    match outcome {
        Ok(Processed::Executed(_) | Processed::Replayed(_)) => Disposition::Done {
            reply: bytes::Bytes::new(),
        },
        Err(RelayError::Publish(error)) => Disposition::Retry {
            busy: false,
            reason: error.to_string(),
        },
        Err(RelayError::Idempotency(error)) => crate::handler::classify(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_key_prefers_header_then_idempotency_key_then_event_id() {
        let body = br#"{"event_id":"e1","idempotency_key":"k1","event_type":"t","payload":{}}"#;
        assert_eq!(
            KeyStrategy::EnvelopeKey.key_of(body, None).as_deref(),
            Ok("k1")
        );
        let body_without = br#"{"event_id":"e1","event_type":"t","payload":{}}"#;
        assert_eq!(
            KeyStrategy::EnvelopeKey
                .key_of(body_without, None)
                .as_deref(),
            Ok("e1")
        );
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY_HEADER, "h1");
        assert_eq!(
            KeyStrategy::EnvelopeKey
                .key_of(body, Some(&headers))
                .as_deref(),
            Ok("h1")
        );
        assert!(KeyStrategy::EnvelopeKey.key_of(b"{}", None).is_err());
    }

    #[test]
    fn composite_fields_join_and_missing_fields_are_refused() {
        let strategy =
            KeyStrategy::Fields(vec!["timestamp".into(), "user.id".into(), "name".into()]);
        let body = br#"{"timestamp":1700,"user":{"id":"u7"},"name":"view"}"#;
        assert_eq!(strategy.key_of(body, None).as_deref(), Ok("1700:u7:view"));
        let missing = br#"{"user":{"id":"u7"},"name":"view"}"#;
        let error = strategy.key_of(missing, None).expect_err("no timestamp");
        assert!(error.contains("timestamp"), "{error}");
        assert!(strategy.key_of(b"not json", None).is_err());
    }

    #[test]
    fn content_hash_ignores_key_order() {
        let a = KeyStrategy::ContentHash.key_of(br#"{"a":1,"b":{"c":2,"d":3}}"#, None);
        let b = KeyStrategy::ContentHash.key_of(br#"{"b":{"d":3,"c":2},"a":1}"#, None);
        let c = KeyStrategy::ContentHash.key_of(br#"{"a":2,"b":{"c":2,"d":3}}"#, None);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

//! The event envelope handlers receive.

use std::fmt;

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Deserializer, Serialize, de};
use uuid::Uuid;

use crate::error::{IdempotencyError, InvalidKeyReason};

/// An event as it travels between services: identity, type, time and payload.
///
/// The *effective key* that makes a handler idempotent is `idempotency_key`
/// when set, else `event_id` (see [`require_key`](Self::require_key), the
/// one rule every entry point applies). Publishers that retry should reuse
/// the same `event_id` (or set the same `idempotency_key`) for every copy.
///
/// JSON without `idempotency_key`, `source` or `correlation_id` parses, and
/// so does JSON without `event_id` (it is then empty) and without
/// `occurred_at` (the time of parsing). An envelope read from the wire never
/// gets an invented id: one with neither an `idempotency_key` nor an
/// `event_id` has no key, and every entry point rejects it with
/// [`MissingKey`](crate::IdempotencyError::MissingKey) instead of running
/// the handler for each copy. [`EventEnvelope::new`] does give a fresh
/// UUID v4 `event_id` to events built in Rust.
///
/// `#[non_exhaustive]`, so fields can be added: build one with
/// [`EventEnvelope::new`] and the `with_*` methods (or read it from JSON);
/// its fields stay public to read and set.
///
/// ```
/// use idempotency_core::EventEnvelope;
///
/// let json = r#"{"event_id":"evt-1","event_type":"field.created","occurred_at":"2026-01-01T00:00:00Z","payload":{"n":1}}"#;
/// let envelope: EventEnvelope = serde_json::from_str(json)?;
/// assert_eq!(envelope.effective_key(), "evt-1");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventEnvelope<P = serde_json::Value> {
    /// Unique id of the event. [`EventEnvelope::new`] sets a UUID v4; it is
    /// empty when the JSON the envelope was read from had none (and is then
    /// left out when the envelope is written again).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
    /// What happened, e.g. `"field.created"`.
    pub event_type: String,
    /// An explicit idempotency key; when absent the `event_id` is the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When the event happened.
    #[serde(default = "Utc::now", deserialize_with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    /// The event's data.
    pub payload: P,
    /// The service that emitted the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// An id shared by the events of one business flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// Reads `occurred_at` as chrono's own `Deserialize` does (RFC 3339, with
/// chrono's relaxations: a space for the `T`, for one), trying chrono's
/// strict RFC 3339 parser first: the same instant for the same text, and the
/// strict form, which every serializer writes, parses several times faster.
fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    struct Rfc3339;

    impl de::Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("an RFC 3339 formatted date and time string")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .or_else(|_| text.parse::<DateTime<FixedOffset>>())
                .map(|at| at.with_timezone(&Utc))
                .map_err(E::custom)
        }
    }

    deserializer.deserialize_str(Rfc3339)
}

fn new_event_id() -> String {
    Uuid::new_v4().to_string()
}

impl<P> EventEnvelope<P> {
    /// A new envelope with a fresh UUID v4 `event_id`, `occurred_at` = now,
    /// and no explicit idempotency key.
    pub fn new(event_type: impl Into<String>, payload: P) -> Self {
        Self {
            event_id: new_event_id(),
            event_type: event_type.into(),
            idempotency_key: None,
            occurred_at: Utc::now(),
            payload,
            source: None,
            correlation_id: None,
        }
    }

    /// Sets the event id.
    #[must_use]
    pub fn with_event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = event_id.into();
        self
    }

    /// Sets an explicit idempotency key.
    #[must_use]
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the source.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// The key that makes this event idempotent: `idempotency_key`, else
    /// `event_id`. Empty when the envelope has neither; entry points use
    /// [`require_key`](Self::require_key), which rejects that.
    pub fn effective_key(&self) -> &str {
        self.idempotency_key.as_deref().unwrap_or(&self.event_id)
    }

    /// The effective key, by the one rule every entry point applies (the
    /// checker, the `#[idempotent]` attribute, NATS, the dedup relay, HTTP):
    ///
    /// - an explicit `idempotency_key` is the key, and an empty one is
    ///   [`InvalidKey`](IdempotencyError::InvalidKey) (it never falls back
    ///   to `event_id`: the producer meant to set a key and did not);
    /// - else a non-empty `event_id` is the key;
    /// - else the envelope has no key: [`MissingKey`](IdempotencyError::MissingKey).
    ///
    /// Length and character rules are checked by the checker, against its
    /// configuration.
    ///
    /// ```
    /// use idempotency_core::{EventEnvelope, IdempotencyError};
    ///
    /// let keyless: EventEnvelope = serde_json::from_str(r#"{"event_type":"t","payload":{}}"#)?;
    /// assert!(matches!(keyless.require_key(), Err(IdempotencyError::MissingKey)));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn require_key(&self) -> Result<&str, IdempotencyError> {
        match self.idempotency_key.as_deref() {
            Some("") => Err(IdempotencyError::InvalidKey {
                reason: InvalidKeyReason::Empty,
            }),
            Some(key) => Ok(key),
            None if self.event_id.is_empty() => Err(IdempotencyError::MissingKey),
            None => Ok(&self.event_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurred_at_reads_as_chronos_own_deserializer_reads_it() {
        for text in [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00.123456789Z",
            "2026-01-01T00:00:00.1234567891Z",
            "2026-01-01T02:30:00+02:30",
            "2026-01-01T00:00:00\u{2212}05:00",
            "2026-01-01T00:00:00-00:00",
            "2026-01-01t00:00:00z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00 +00:00",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5+01:00",
            "2026-01-01T00:00:00",
            "2026-13-01T00:00:00Z",
            "",
            "yesterday",
        ] {
            let value = || serde_json::Value::String(text.to_owned());
            // The same instant, or the same error.
            let ours = rfc3339(value()).map_err(|e| e.to_string());
            let chrono = DateTime::<Utc>::deserialize(value()).map_err(|e| e.to_string());
            assert_eq!(ours, chrono, "{text}");
        }
        let json = r#"{"event_id":"e","event_type":"t","occurred_at":"2026-01-01T00:00:00.5+01:00","payload":null}"#;
        let envelope = serde_json::from_str::<EventEnvelope<()>>(json).expect("an envelope");
        assert_eq!(
            envelope.occurred_at,
            "2025-12-31T23:00:00.5Z"
                .parse::<DateTime<Utc>>()
                .expect("a time")
        );
        let not_a_string = r#"{"event_id":"e","event_type":"t","occurred_at":7,"payload":null}"#;
        let error = serde_json::from_str::<EventEnvelope<()>>(not_a_string).expect_err("a number");
        assert!(
            error
                .to_string()
                .contains("expected an RFC 3339 formatted date and time string"),
            "{error}"
        );
    }

    #[test]
    fn effective_key_prefers_the_explicit_key() {
        let e = EventEnvelope::new("t", ()).with_event_id("e1");
        assert_eq!(e.effective_key(), "e1");
        assert_eq!(e.with_idempotency_key("k1").effective_key(), "k1");
    }

    #[test]
    fn new_event_ids_are_uuid_v4() {
        let e = EventEnvelope::new("t", ());
        let id = Uuid::parse_str(&e.event_id).expect("a uuid");
        assert_eq!(id.get_version_num(), 4);
    }

    #[test]
    fn json_without_optional_fields_parses() {
        let e: EventEnvelope = serde_json::from_str(
            r#"{"event_id":"e","event_type":"t","occurred_at":"2026-01-01T00:00:00Z","payload":null}"#,
        )
        .expect("parses");
        assert_eq!(e.idempotency_key, None);
        assert_eq!(e.effective_key(), "e");
    }

    #[test]
    fn json_without_event_id_gets_no_invented_id() {
        let json = r#"{"event_type":"t","occurred_at":"2026-01-01T00:00:00Z","payload":{"a":1}}"#;
        let first: EventEnvelope = serde_json::from_str(json).expect("parses");
        let second: EventEnvelope = serde_json::from_str(json).expect("parses");
        assert_eq!(first.event_id, "");
        assert_eq!(first, second, "two copies of one JSON are one event");
        assert!(matches!(
            first.require_key(),
            Err(IdempotencyError::MissingKey)
        ));
        let written = serde_json::to_string(&first).expect("serializes");
        assert!(!written.contains("event_id"), "{written}");
    }

    #[test]
    fn require_key_applies_one_rule() {
        let e = EventEnvelope::new("t", ()).with_event_id("e1");
        assert_eq!(e.require_key().expect("event id"), "e1");
        let e = e.with_idempotency_key("k1");
        assert_eq!(e.require_key().expect("explicit key"), "k1");
        let e = e.with_idempotency_key("");
        assert!(matches!(
            e.require_key(),
            Err(IdempotencyError::InvalidKey {
                reason: InvalidKeyReason::Empty
            })
        ));
    }

    #[test]
    fn json_round_trips_with_typed_payload() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Created {
            id: u64,
        }
        let e = EventEnvelope::new("created", Created { id: 7 }).with_idempotency_key("k");
        let json = serde_json::to_string(&e).expect("serializes");
        let back: EventEnvelope<Created> = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, e);
    }
}

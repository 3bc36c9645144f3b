//! [`Delivery`]: a received message as the consume core reads it, and the
//! reasons it can be unreadable ([`DecodeError`]).

use serde::de::DeserializeOwned;

use crate::dedup::KeyExtractor;
use crate::envelope::EventEnvelope;
use crate::error::{IdempotencyError, InvalidKeyReason};

/// The header that carries an explicit idempotency key; it wins over the
/// envelope's own key. Matched in any casing (`idempotency-key` too); an
/// empty value is an invalid key, never a fallback to the envelope's.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Why a delivered message cannot be read: it is poison, and can never
/// succeed. Messages never contain the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body is not an [`EventEnvelope`] of the expected payload type.
    #[error("not an event envelope: {0}")]
    NotAnEnvelope(#[source] serde_json::Error),
    /// The body is not JSON (a [`KeyExtractor`] reads it as a document).
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The message has more than one `Idempotency-Key` header: its key would
    /// be ambiguous.
    #[error("the message has more than one {IDEMPOTENCY_KEY_HEADER} header")]
    DuplicateKeyHeader,
    /// The message gives no usable key: none at all
    /// ([`MissingKey`](IdempotencyError::MissingKey)), an empty one
    /// ([`InvalidKey`](IdempotencyError::InvalidKey)), or a missing key
    /// field ([`MissingKeyField`](IdempotencyError::MissingKeyField)).
    #[error("{}", .0.redacted())]
    Key(#[source] IdempotencyError),
}

/// Reads a JSON body: its UTF-8 checked once, whole, rather than string by
/// string as `serde_json::from_slice` does. A body that is not UTF-8 is
/// read by `from_slice`, as before (which refuses invalid UTF-8 in the
/// strings it reads, and skips a field it ignores unchecked).
fn from_json<T: DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// The [`IDEMPOTENCY_KEY_HEADER`]'s value among a message's `(name, value)`
/// headers, in any casing: `None` without one,
/// [`DecodeError::DuplicateKeyHeader`] when it appears more than once.
///
/// ```
/// use idempotency_core::consume::header_key;
///
/// assert_eq!(header_key([("content-type", "json"), ("idempotency-key", "k1")])?, Some("k1"));
/// assert_eq!(header_key([]).ok(), Some(None));
/// assert!(header_key([("Idempotency-Key", "a"), ("IDEMPOTENCY-KEY", "b")]).is_err());
/// # Ok::<(), idempotency_core::consume::DecodeError>(())
/// ```
pub fn header_key<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Option<&'a str>, DecodeError> {
    let mut values = headers
        .into_iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(IDEMPOTENCY_KEY_HEADER))
        .map(|(_, value)| value);
    match (values.next(), values.next()) {
        (Some(value), None) => Ok(Some(value)),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(DecodeError::DuplicateKeyHeader),
    }
}

/// A received message as the consume core reads it: its body, and the
/// `Idempotency-Key` header's value if it had one (see [`header_key`]).
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    payload: &'a [u8],
    key: Option<&'a str>,
}

impl<'a> Delivery<'a> {
    /// A message with body `payload` and no key header.
    pub fn new(payload: &'a [u8]) -> Self {
        Self { payload, key: None }
    }

    /// A message with body `payload` and these `(name, value)` headers,
    /// of which only `Idempotency-Key` is read ([`header_key`]).
    pub fn with_headers(
        payload: &'a [u8],
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, DecodeError> {
        Ok(Self::new(payload).key(header_key(headers)?))
    }

    /// Sets the key header's value (`None`: no header).
    pub fn key(mut self, key: Option<&'a str>) -> Self {
        self.key = key;
        self
    }

    /// The body.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Decodes the body as an envelope, the key header (when present)
    /// replacing its key, and checks that it has a key by the one rule
    /// ([`EventEnvelope::require_key`]).
    pub fn envelope<P: DeserializeOwned>(&self) -> Result<EventEnvelope<P>, DecodeError> {
        let mut envelope: EventEnvelope<P> =
            from_json(self.payload).map_err(DecodeError::NotAnEnvelope)?;
        if let Some(key) = self.key {
            envelope.idempotency_key = Some(key.to_owned());
        }
        envelope.require_key().map_err(DecodeError::Key)?;
        Ok(envelope)
    }

    /// The message's key by `extractor`, as the dedup relay names messages:
    /// for [`KeyExtractor::IdempotencyKey`] the key header wins (an empty
    /// one is an invalid key); otherwise the body is read as a JSON document
    /// ([`KeyExtractor::key_of_document`]).
    pub fn key_by(&self, extractor: &KeyExtractor) -> Result<String, DecodeError> {
        if matches!(extractor, KeyExtractor::IdempotencyKey) {
            match self.key {
                Some("") => {
                    return Err(DecodeError::Key(IdempotencyError::InvalidKey {
                        reason: InvalidKeyReason::Empty,
                    }));
                }
                Some(key) => return Ok(key.to_owned()),
                None => {}
            }
        }
        let document: serde_json::Value = from_json(self.payload).map_err(DecodeError::NotJson)?;
        extractor
            .key_of_document(&document)
            .map_err(DecodeError::Key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(
        extractor: &KeyExtractor,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<String, DecodeError> {
        Delivery::with_headers(body, headers.iter().copied())?.key_by(extractor)
    }

    #[test]
    fn envelope_key_prefers_header_then_idempotency_key_then_event_id() {
        let extractor = KeyExtractor::IdempotencyKey;
        let body = br#"{"event_id":"e1","idempotency_key":"k1","event_type":"t","payload":{}}"#;
        assert_eq!(key_of(&extractor, body, &[]).ok().as_deref(), Some("k1"));
        let body_without = br#"{"event_id":"e1","event_type":"t","payload":{}}"#;
        assert_eq!(
            key_of(&extractor, body_without, &[]).ok().as_deref(),
            Some("e1")
        );
        for name in ["Idempotency-Key", "idempotency-key", "IDEMPOTENCY-KEY"] {
            assert_eq!(
                key_of(&extractor, body, &[(name, "h1")]).ok().as_deref(),
                Some("h1")
            );
        }
        let twice = key_of(
            &extractor,
            body,
            &[("idempotency-key", "h1"), ("Idempotency-Key", "h2")],
        );
        assert!(matches!(twice, Err(DecodeError::DuplicateKeyHeader)));
        assert_eq!(
            twice.map_err(|e| e.to_string()).err().as_deref(),
            Some("the message has more than one Idempotency-Key header")
        );
        assert!(key_of(&extractor, body, &[("Idempotency-Key", "")]).is_err());
        assert!(key_of(&extractor, b"{}", &[]).is_err());
        let empty_key = br#"{"event_id":"e1","idempotency_key":""}"#;
        assert!(key_of(&extractor, empty_key, &[]).is_err());
    }

    #[test]
    fn field_keys_come_from_the_core_key_builder() {
        let extractor = KeyExtractor::fields(["timestamp", "/user/id", "name"]);
        let body = br#"{"timestamp":1700,"user":{"id":"u7"},"name":"view"}"#;
        assert_eq!(
            key_of(&extractor, body, &[]).ok().as_deref(),
            Some(r#"[1700,"u7","view"]"#)
        );
        let missing = br#"{"user":{"id":"u7"},"name":"view"}"#;
        let error = key_of(&extractor, missing, &[]).expect_err("no timestamp");
        assert!(error.to_string().contains("timestamp"), "{error}");
        let not_json = key_of(&extractor, b"not json", &[]).expect_err("not json");
        assert!(matches!(not_json, DecodeError::NotJson(_)), "{not_json:?}");
        assert!(not_json.to_string().starts_with("the body is not JSON: "));
    }

    #[test]
    fn content_hash_ignores_key_order() {
        let key = |body: &[u8]| key_of(&KeyExtractor::ContentHash, body, &[]).ok();
        let a = key(br#"{"a":1,"b":{"c":2,"d":3}}"#);
        let b = key(br#"{"b":{"d":3,"c":2},"a":1}"#);
        let c = key(br#"{"a":2,"b":{"c":2,"d":3}}"#);
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn envelopes_take_the_header_key_and_need_a_key() {
        let body = br#"{"event_id":"e1","event_type":"t","payload":{}}"#;
        let envelope = Delivery::new(body)
            .key(Some("h1"))
            .envelope::<serde_json::Value>()
            .expect("envelope");
        assert_eq!(envelope.require_key().ok(), Some("h1"));
        let keyless = br#"{"event_id":"","event_type":"t","payload":{}}"#;
        let error = Delivery::new(keyless)
            .envelope::<serde_json::Value>()
            .expect_err("no key");
        assert_eq!(
            error.to_string(),
            "the event has no idempotency key and no event id"
        );
        let error = Delivery::new(body)
            .key(Some(""))
            .envelope::<serde_json::Value>()
            .expect_err("empty key");
        assert_eq!(
            error.to_string(),
            "invalid idempotency key: the key is empty"
        );
        let error = Delivery::new(b"{\"event_id\":\"e\xff1\",\"payload\":{}}")
            .envelope::<serde_json::Value>()
            .expect_err("not UTF-8");
        assert!(
            error
                .to_string()
                .starts_with("not an event envelope: invalid unicode"),
            "{error}"
        );
        // Invalid UTF-8 only in a field the envelope ignores: read as
        // `from_slice` reads it, which skips it unchecked.
        let ignored = Delivery::new(
            b"{\"event_id\":\"e1\",\"x\":\"\xff\",\"event_type\":\"t\",\"payload\":{}}",
        )
        .envelope::<serde_json::Value>()
        .expect("the bad bytes are in an ignored field");
        assert_eq!(ignored.event_id, "e1");
        let error = Delivery::new(b"[1]")
            .envelope::<serde_json::Value>()
            .expect_err("not an envelope");
        assert!(
            error.to_string().starts_with("not an event envelope: "),
            "{error}"
        );
    }
}

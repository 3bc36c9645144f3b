//! [`KeyedRequest`]: what the envelope entry point, the macro and every
//! transport reduce a call to.

use std::time::Duration;

use serde::Serialize;

use super::IdempotencyChecker;
use crate::config::{DuplicatePolicy, InProgressPolicy};
use crate::envelope::EventEnvelope;
use crate::error::Result;
use crate::key::fingerprint;

/// A key-based request: what the envelope entry point, the macro, NATS and
/// HTTP integrations all reduce to.
///
/// ```
/// use idempotency_core::KeyedRequest;
/// let request = KeyedRequest::new("order-42:charge")
///     .event_type("order.charge")
///     .fingerprint_of(&serde_json::json!({"amount": 1200}))?;
/// # let _ = request;
/// # Ok::<(), idempotency_core::IdempotencyError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct KeyedRequest<'a> {
    pub(super) key: &'a str,
    pub(super) event_id: Option<&'a str>,
    pub(super) event_type: Option<&'a str>,
    pub(super) fingerprint: Option<String>,
    pub(super) ttl: Option<Duration>,
    pub(super) lease: Option<Duration>,
    pub(super) on_duplicate: Option<DuplicatePolicy>,
    pub(super) on_in_progress: Option<InProgressPolicy>,
}

impl<'a> KeyedRequest<'a> {
    /// A request for `key` (the raw idempotency key, validated by the checker).
    pub fn new(key: &'a str) -> Self {
        Self {
            key,
            event_id: None,
            event_type: None,
            fingerprint: None,
            ttl: None,
            lease: None,
            on_duplicate: None,
            on_in_progress: None,
        }
    }

    /// A request for an envelope's key (by [`EventEnvelope::require_key`]:
    /// [`MissingKey`](crate::IdempotencyError::MissingKey) for an envelope with
    /// neither an `idempotency_key` nor an `event_id`), with its event id and
    /// type. The payload is fingerprinted when `fingerprint_payload` is true.
    pub fn from_envelope<P: Serialize>(
        envelope: &'a EventEnvelope<P>,
        fingerprint_payload: bool,
    ) -> Result<Self> {
        let request = Self::new(envelope.require_key()?)
            .event_id(&envelope.event_id)
            .event_type(&envelope.event_type);
        if fingerprint_payload {
            request.fingerprint_of(&envelope.payload)
        } else {
            Ok(request)
        }
    }

    /// Records this event id (an empty one records none).
    pub fn event_id(mut self, event_id: &'a str) -> Self {
        self.event_id = (!event_id.is_empty()).then_some(event_id);
        self
    }

    /// Records this event type.
    pub fn event_type(mut self, event_type: &'a str) -> Self {
        self.event_type = Some(event_type);
        self
    }

    /// Sets the fingerprint: a later request with the same key and a different
    /// fingerprint fails with [`IdempotencyError::FingerprintMismatch`](crate::IdempotencyError::FingerprintMismatch).
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }

    /// Sets the fingerprint to that of `payload` (SHA-256 of its canonical JSON).
    pub fn fingerprint_of<P: Serialize + ?Sized>(self, payload: &P) -> Result<Self> {
        Ok(self.fingerprint(fingerprint(payload)?))
    }

    /// Overrides the checker's `ttl` for this request.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Overrides the checker's [`lease`](crate::IdempotencyConfig::lease) for this request.
    pub fn lease(mut self, timeout: Duration) -> Self {
        self.lease = Some(timeout);
        self
    }

    /// Overrides the checker's duplicate policy for this request.
    pub fn on_duplicate(mut self, policy: DuplicatePolicy) -> Self {
        self.on_duplicate = Some(policy);
        self
    }

    /// Overrides the checker's in-progress policy for this request.
    pub fn on_in_progress(mut self, policy: InProgressPolicy) -> Self {
        self.on_in_progress = Some(policy);
        self
    }
}

impl IdempotencyChecker {
    /// The request for an envelope's key, its payload fingerprinted when
    /// the configuration says so.
    pub(super) fn envelope_request<'a, P: Serialize>(
        &self,
        envelope: &'a EventEnvelope<P>,
    ) -> Result<KeyedRequest<'a>> {
        KeyedRequest::from_envelope(envelope, self.inner.config.fingerprint_payloads)
    }
}

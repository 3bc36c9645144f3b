//! Turning a message into a handler call and the handler's result into a
//! disposition (ack, nak, term, reply). Shared by subscribers, consumers and
//! the relay.

use std::any::Any;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use idempotency_core::{EventEnvelope, IdempotencyChecker, IdempotencyError, KeyedRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The header that carries an explicit idempotency key; it wins over the
/// envelope's own key. Matched in any casing (`idempotency-key` too); an
/// empty value is an invalid key, never a fallback to the envelope's.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// The `Idempotency-Key` header's value, in any casing: `None` without one,
/// an error when it appears more than once (the key would be ambiguous).
pub(crate) fn header_key(headers: Option<&HeaderMap>) -> Result<Option<&str>, String> {
    let mut values = headers
        .into_iter()
        .flat_map(HeaderMap::iter)
        .filter(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(IDEMPOTENCY_KEY_HEADER))
        .flat_map(|(_, values)| values);
    match (values.next(), values.next()) {
        (Some(value), None) => Ok(Some(value.as_str())),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(format!(
            "the message has more than one {IDEMPOTENCY_KEY_HEADER} header"
        )),
    }
}

/// What to do with a message after its handler ran (or did not).
#[derive(Debug)]
pub(crate) enum Disposition {
    /// Completed now or earlier: ack, and reply with this JSON.
    Done { reply: Bytes },
    /// Try again later: nak with a delay. `busy` is true when another
    /// attempt holds the key (not a failure).
    Retry { busy: bool, reason: String },
    /// Can never succeed (poison, key reuse with another payload): term.
    Reject { reason: String },
}

/// Decodes a message body as an envelope, applying an `Idempotency-Key`
/// header, and checks that it has a key by the one rule
/// ([`EventEnvelope::require_key`]): a message without one is poison.
pub(crate) fn decode<P: DeserializeOwned>(
    payload: &[u8],
    headers: Option<&HeaderMap>,
) -> Result<EventEnvelope<P>, String> {
    let mut envelope: EventEnvelope<P> =
        serde_json::from_slice(payload).map_err(|e| format!("not an event envelope: {e}"))?;
    if let Some(key) = header_key(headers)? {
        envelope.idempotency_key = Some(key.to_owned());
    }
    envelope.require_key().map_err(|e| e.redacted())?;
    Ok(envelope)
}

pub(crate) fn classify(error: &IdempotencyError) -> Disposition {
    match error {
        IdempotencyError::InProgress { .. } => Disposition::Retry {
            busy: true,
            reason: error.redacted(),
        },
        IdempotencyError::Duplicate { cached_result, .. } => Disposition::Done {
            reply: Bytes::from(serde_json::to_vec(cached_result).unwrap_or_default()),
        },
        IdempotencyError::FingerprintMismatch { .. }
        | IdempotencyError::InvalidKey { .. }
        | IdempotencyError::MissingKey
        | IdempotencyError::MissingKeyField { .. }
        | IdempotencyError::ResultNotStored { .. }
        | IdempotencyError::Serialization(_) => Disposition::Reject {
            reason: error.redacted(),
        },
        _ => Disposition::Retry {
            busy: false,
            reason: error.redacted(),
        },
    }
}

/// A handler's error, or the checker's, kept apart so each gets the right
/// disposition.
enum Failure<E> {
    Idempotency(IdempotencyError),
    Handler(E),
}

impl<E> From<IdempotencyError> for Failure<E> {
    fn from(error: IdempotencyError) -> Self {
        Self::Idempotency(error)
    }
}

impl<E: Display> Display for Failure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idempotency(e) => e.fmt(f),
            Self::Handler(e) => e.fmt(f),
        }
    }
}

fn reply_of<T: Serialize>(value: &T) -> Disposition {
    match serde_json::to_vec(value) {
        Ok(json) => Disposition::Done {
            reply: Bytes::from(json),
        },
        Err(e) => Disposition::Reject {
            reason: format!("the result could not be serialized: {e}"),
        },
    }
}

/// An event handler: any `Fn(EventEnvelope<P>) -> impl Future<Output =
/// Result<T, E>>` that can be shared between tasks, where `T` (the result,
/// stored and replayed) is JSON-serializable and `E` displays the failure.
///
/// Implemented for every such closure or function; `#[idempotent]` functions
/// qualify too.
pub trait EventHandler<P>: Send + Sync + 'static {
    /// The handler's result.
    type Output: Serialize + DeserializeOwned + Send;
    /// The handler's error.
    type Error: Display + Send + 'static;
    /// The future of one call.
    type Future: Future<Output = Result<Self::Output, Self::Error>> + Send;

    /// Handles one event.
    fn call(&self, envelope: EventEnvelope<P>) -> Self::Future;
}

impl<P, H, Fut, T, E> EventHandler<P> for H
where
    H: Fn(EventEnvelope<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    T: Serialize + DeserializeOwned + Send,
    E: Display + Send + 'static,
{
    type Output = T;
    type Error = E;
    type Future = Fut;

    fn call(&self, envelope: EventEnvelope<P>) -> Fut {
        self(envelope)
    }
}

/// How handlers are made idempotent.
pub(crate) enum Mode {
    /// The integration runs each handler under this checker.
    Checked(IdempotencyChecker),
    /// The handlers guard themselves (`#[idempotent]` functions).
    SelfGuarded,
}

/// A handler and how to run it, shared by the tasks of a worker.
pub(crate) struct Runner<P, H> {
    mode: Mode,
    handler: H,
    _payload: std::marker::PhantomData<fn() -> P>,
}

impl<P, H> Runner<P, H> {
    pub(crate) fn new(mode: Mode, handler: H) -> Arc<Self> {
        Arc::new(Self {
            mode,
            handler,
            _payload: std::marker::PhantomData,
        })
    }
}

impl<P: Serialize, H: EventHandler<P>> Runner<P, H> {
    /// Runs the handler for one envelope, exactly once per key.
    pub(crate) async fn run(&self, envelope: EventEnvelope<P>) -> Disposition {
        match &self.mode {
            Mode::SelfGuarded => match self.handler.call(envelope).await {
                Ok(value) => reply_of(&value),
                Err(error) => match (&error as &dyn Any).downcast_ref::<IdempotencyError>() {
                    Some(error) => classify(error),
                    None => Disposition::Retry {
                        busy: false,
                        reason: error.to_string(),
                    },
                },
            },
            Mode::Checked(checker) => {
                let fingerprint = if checker.config().fingerprint_payloads() {
                    match idempotency_core::fingerprint(&envelope.payload) {
                        Ok(fingerprint) => Some(fingerprint),
                        Err(e) => return classify(&e),
                    }
                } else {
                    None
                };
                let key = match envelope.require_key() {
                    Ok(key) => key.to_owned(),
                    Err(e) => return classify(&e),
                };
                let (event_id, event_type) =
                    (envelope.event_id.clone(), envelope.event_type.clone());
                let mut request = KeyedRequest::new(&key)
                    .event_id(&event_id)
                    .event_type(&event_type);
                if let Some(fingerprint) = fingerprint {
                    request = request.fingerprint(fingerprint);
                }
                let outcome = checker
                    .process_request(request, |_lease| async {
                        self.handler.call(envelope).await.map_err(Failure::Handler)
                    })
                    .await;
                match outcome {
                    Ok(processed) => reply_of(processed.value()),
                    Err(Failure::Idempotency(error)) => classify(&error),
                    Err(Failure::Handler(error)) => Disposition::Retry {
                        busy: false,
                        reason: error.to_string(),
                    },
                }
            }
        }
    }
}

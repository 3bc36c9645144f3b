//! [`Runner`]: a handler and how it is made idempotent; the one path from a
//! delivery to a disposition.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Delivery, Disposition, HandlerError};
use crate::checker::{IdempotencyChecker, KeyedRequest};
use crate::envelope::EventEnvelope;
use crate::error::IdempotencyError;
use crate::record::Lease;

/// An event handler: any `Fn(EventEnvelope<P>) -> impl Future<Output =
/// Result<T, E>>` that can be shared between tasks, where `T` (the result,
/// stored and replayed) is JSON-serializable and `E` says what a failed
/// message deserves ([`HandlerError`]).
///
/// Implemented for every such closure or function; `#[idempotent]` functions
/// qualify too.
pub trait EventHandler<P>: Send + Sync + 'static {
    /// The handler's result.
    type Output: Serialize + DeserializeOwned + Send;
    /// The handler's error.
    type Error: HandlerError;
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
    E: HandlerError,
{
    type Output = T;
    type Error = E;
    type Future = Fut;

    fn call(&self, envelope: EventEnvelope<P>) -> Fut {
        self(envelope)
    }
}

/// How handlers are made idempotent.
enum Mode {
    /// The runner runs each handler call under this checker.
    Checked(IdempotencyChecker),
    /// The handler guards itself (an `#[idempotent]` function).
    SelfGuarded,
}

/// A handler's error, or the checker's, kept apart so each is classified
/// by its own [`HandlerError`] impl.
enum Failure<E> {
    Idempotency(IdempotencyError),
    Handler(E),
}

impl<E> From<IdempotencyError> for Failure<E> {
    fn from(error: IdempotencyError) -> Self {
        Self::Idempotency(error)
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idempotency(e) => e.fmt(f),
            Self::Handler(e) => e.fmt(f),
        }
    }
}

impl<E: HandlerError> HandlerError for Failure<E> {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Idempotency(e) => e.disposition(),
            Self::Handler(e) => e.disposition(),
        }
    }
}

/// Runs `handler` under `checker` for `request` (exactly once per key) and
/// turns the outcome into a [`Disposition`]: the result, now or replayed,
/// is an [`Ack`](Disposition::Ack) with the result as JSON; an error is
/// classified by its [`HandlerError`] impl. For adapters that build their
/// own request (the dedup relay names messages by a
/// [`KeyExtractor`](crate::KeyExtractor)); [`Runner`] does this for
/// envelopes.
pub async fn process<T, E, F, Fut>(
    checker: &IdempotencyChecker,
    request: KeyedRequest<'_>,
    handler: F,
) -> Disposition
where
    T: Serialize + DeserializeOwned,
    E: HandlerError + From<IdempotencyError>,
    F: FnOnce(Lease) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match checker.process_keyed(request, handler).await {
        // The JSON the store took is the reply: no second serialization.
        Ok((_, Some(reply))) => Disposition::Ack { reply },
        Ok((processed, None)) => Disposition::reply_of(processed.value()),
        Err(error) => error.disposition(),
    }
}

/// A handler and how it is made idempotent: the consume core every
/// transport adapter calls. Cheap to clone (shared between the tasks of a
/// worker).
///
/// - [`Runner::new`] runs each call of a plain handler under a checker;
/// - [`Runner::self_guarded`] runs a handler that guards itself (an
///   `#[idempotent]` function): its errors, [`IdempotencyError`] above all,
///   say what to do.
///
/// Either way a failed handler's error is classified by its
/// [`HandlerError`] impl.
pub struct Runner<P, H> {
    inner: Arc<(Mode, H)>,
    _payload: PhantomData<fn() -> P>,
}

impl<P, H> Clone for Runner<P, H> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _payload: PhantomData,
        }
    }
}

impl<P, H> std::fmt::Debug for Runner<P, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.inner.0 {
            Mode::Checked(_) => "checked",
            Mode::SelfGuarded => "self-guarded",
        };
        f.debug_struct("Runner")
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl<P, H: EventHandler<P>> Runner<P, H> {
    /// Runs each call of `handler` under `checker`: once per key, the
    /// result stored and replayed to duplicates.
    pub fn new(checker: IdempotencyChecker, handler: H) -> Self {
        Self::with_mode(Mode::Checked(checker), handler)
    }

    /// Runs `handler`, which guards itself (an `#[idempotent]` function),
    /// as it is. Return [`IdempotencyError`] (or an error type whose
    /// [`HandlerError`] impl passes it on) for precise dispositions.
    pub fn self_guarded(handler: H) -> Self {
        Self::with_mode(Mode::SelfGuarded, handler)
    }

    fn with_mode(mode: Mode, handler: H) -> Self {
        Self {
            inner: Arc::new((mode, handler)),
            _payload: PhantomData,
        }
    }
}

impl<P: Serialize + DeserializeOwned, H: EventHandler<P>> Runner<P, H> {
    /// Consumes one delivered message: decodes it as an envelope
    /// ([`Delivery::envelope`]; an unreadable one is a poison
    /// [`Reject`](Disposition::Reject)) and [runs](Self::run) the handler.
    pub async fn consume(&self, delivery: Delivery<'_>) -> Disposition {
        match delivery.envelope::<P>() {
            Ok(envelope) => self.run(envelope).await,
            Err(error) => error.into(),
        }
    }

    /// Runs the handler for one envelope, exactly once per key.
    pub async fn run(&self, envelope: EventEnvelope<P>) -> Disposition {
        let (mode, handler) = &*self.inner;
        let checker = match mode {
            Mode::SelfGuarded => {
                return match handler.call(envelope).await {
                    Ok(value) => Disposition::reply_of(&value),
                    Err(error) => error.disposition(),
                };
            }
            Mode::Checked(checker) => checker,
        };
        let fingerprint = if checker.config().fingerprint_payloads() {
            match crate::key::fingerprint(&envelope.payload) {
                Ok(fingerprint) => Some(fingerprint),
                Err(e) => return e.disposition(),
            }
        } else {
            None
        };
        let key = match envelope.require_key() {
            Ok(key) => key.to_owned(),
            Err(e) => return e.disposition(),
        };
        let (event_id, event_type) = (envelope.event_id.clone(), envelope.event_type.clone());
        let mut request = KeyedRequest::new(&key)
            .event_id(&event_id)
            .event_type(&event_type);
        if let Some(fingerprint) = fingerprint {
            request = request.fingerprint(fingerprint);
        }
        process(checker, request, |_lease| async {
            handler.call(envelope).await.map_err(Failure::Handler)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::{Value, json};

    use super::*;
    use crate::config::IdempotencyConfig;
    use crate::store::memory::MemoryStore;

    fn body(key: &str, n: i64) -> Vec<u8> {
        let envelope = EventEnvelope::new("t", json!({ "n": n })).with_idempotency_key(key);
        serde_json::to_vec(&envelope).expect("json")
    }

    fn checker() -> IdempotencyChecker {
        IdempotencyChecker::new(MemoryStore::new())
    }

    #[tokio::test]
    async fn a_key_runs_once_and_duplicates_are_acked_with_the_first_reply() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let runner = Runner::new(checker(), move |e: EventEnvelope<Value>| {
            let runs = Arc::clone(&counted);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(e.payload["n"].clone())
            }
        });
        assert_eq!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::ack(b"1".to_vec())
        );
        // Another copy, another payload field: replayed, not run.
        assert_eq!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::ack(b"1".to_vec())
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_reply_is_the_results_json_whether_run_or_replayed() {
        let result = json!({"receipt": "r-\"42\"\n", "lines": [1, -2, 3.5], "empty": {}});
        let expected = serde_json::to_vec(&result).expect("json");
        let returned = result.clone();
        let runner = Runner::new(checker(), move |_: EventEnvelope<Value>| {
            let value = returned.clone();
            async move { Ok::<_, IdempotencyError>(value) }
        });
        for _delivery in 0..2 {
            assert_eq!(
                runner.consume(Delivery::new(&body("k", 1))).await,
                Disposition::ack(expected.clone())
            );
        }
    }

    /// A result that counts how often it is serialized.
    struct Counted;

    static SERIALIZED: AtomicUsize = AtomicUsize::new(0);

    impl Serialize for Counted {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            SERIALIZED.fetch_add(1, Ordering::SeqCst);
            serializer.serialize_str("counted")
        }
    }

    impl<'de> serde::Deserialize<'de> for Counted {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            String::deserialize(deserializer).map(|_| Self)
        }
    }

    #[tokio::test]
    async fn an_executed_result_is_serialized_once_for_the_store_and_the_reply() {
        let runner = Runner::new(checker(), |_: EventEnvelope<Value>| async {
            Ok::<_, IdempotencyError>(Counted)
        });
        let reply = runner.consume(Delivery::new(&body("k", 1))).await;
        assert_eq!(reply, Disposition::ack(b"\"counted\"".to_vec()));
        assert_eq!(SERIALIZED.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn handler_errors_are_classified_by_their_type() {
        // A String error: retried with its message.
        let runner = Runner::new(checker(), |_: EventEnvelope<Value>| async {
            Err::<(), _>("downstream timeout".to_owned())
        });
        assert_eq!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::retry("downstream timeout")
        );
        // A self-guarded handler's IdempotencyError: classified precisely.
        let runner = Runner::self_guarded(|_: EventEnvelope<Value>| async {
            Err::<(), _>(IdempotencyError::FingerprintMismatch { key: "k".into() })
        });
        assert!(matches!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::Reject { poison: false, .. }
        ));
        let runner = Runner::self_guarded(|_: EventEnvelope<Value>| async {
            Err::<(), _>(IdempotencyError::InProgress {
                key: "k".into(),
                attempt: 1,
            })
        });
        assert!(matches!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::Retry { busy: true, .. }
        ));
        // Any other error type a self-guarded handler returns: retried.
        let runner = Runner::self_guarded(|_: EventEnvelope<Value>| async {
            Err::<(), _>(std::io::Error::other("reset"))
        });
        assert_eq!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::retry("reset")
        );
    }

    #[tokio::test]
    async fn a_key_reused_with_another_payload_is_rejected_and_unreadable_bodies_are_poison() {
        let config = IdempotencyConfig::builder()
            .fingerprint_payloads(true)
            .build()
            .expect("config");
        let checker = IdempotencyChecker::with_config(MemoryStore::new(), config);
        let runner = Runner::new(checker, |_: EventEnvelope<Value>| async {
            Ok::<_, IdempotencyError>(())
        });
        assert_eq!(
            runner.consume(Delivery::new(&body("k", 1))).await,
            Disposition::ack(b"null".to_vec())
        );
        assert!(matches!(
            runner.consume(Delivery::new(&body("k", 2))).await,
            Disposition::Reject { poison: false, .. }
        ));
        for unreadable in [
            &b"not json"[..],
            br#"{"event_id":"","event_type":"t","payload":1}"#,
        ] {
            assert!(matches!(
                runner.consume(Delivery::new(unreadable)).await,
                Disposition::Reject { poison: true, .. }
            ));
        }
    }
}

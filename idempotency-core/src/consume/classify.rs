//! [`HandlerError`]: a handler's error says what its message deserves.

use std::fmt::Display;

use super::Disposition;
use crate::error::{BoxError, IdempotencyError};

/// An error a handler can return: it says which [`Disposition`] its
/// message deserves. The default is a retry with backoff
/// ([`Disposition::retry`] with the error's message), right for most
/// failures (a downstream timeout, a lost connection).
///
/// Implemented for [`IdempotencyError`] (each variant precisely, see
/// [`IdempotencyError::disposition`](#impl-HandlerError-for-IdempotencyError)),
/// for [`BoxError`] (an `IdempotencyError` inside the box is classified as
/// one; anything else is retried), and, retried, for `String`,
/// `&'static str` and [`std::io::Error`]; [`Infallible`](std::convert::Infallible)
/// for handlers that never fail.
///
/// # Your own error type
/// One line gives the default (retry with backoff); override
/// [`disposition`](Self::disposition) to reject what can never succeed and
/// to pass the framework's own errors on:
///
/// ```
/// use idempotency_core::consume::{Disposition, HandlerError};
/// use idempotency_core::IdempotencyError;
///
/// #[derive(Debug, thiserror::Error)]
/// enum OrderError {
///     #[error("the payment service timed out")]
///     Timeout,
///     #[error("the order is malformed: {0}")]
///     Malformed(String),
///     #[error(transparent)]
///     Idempotency(#[from] IdempotencyError),
/// }
///
/// impl HandlerError for OrderError {
///     fn disposition(&self) -> Disposition {
///         match self {
///             Self::Timeout => Disposition::retry(self.to_string()),
///             Self::Malformed(_) => Disposition::reject(self.to_string()),
///             Self::Idempotency(e) => e.disposition(),
///         }
///     }
/// }
///
/// assert!(matches!(OrderError::Malformed("no lines".into()).disposition(), Disposition::Reject { .. }));
///
/// // The default: every error retried with backoff.
/// #[derive(Debug, thiserror::Error)]
/// #[error("the warehouse did not answer")]
/// struct WarehouseDown;
/// impl HandlerError for WarehouseDown {}
/// ```
pub trait HandlerError: Display + Send + 'static {
    /// What a message whose handler failed with this error deserves.
    fn disposition(&self) -> Disposition {
        Disposition::retry(self.to_string())
    }
}

impl HandlerError for IdempotencyError {
    /// - [`InProgress`](IdempotencyError::InProgress): retry, busy;
    /// - [`Duplicate`](IdempotencyError::Duplicate): ack, replying with the
    ///   stored result;
    /// - a key reused with another payload, an invalid or missing key, a
    ///   result that was not stored, a (de)serialization failure: reject;
    /// - anything else (a store outage, an open breaker, a lost lease):
    ///   retry with backoff.
    ///
    /// Reasons are [redacted](IdempotencyError::redacted): no key in them.
    fn disposition(&self) -> Disposition {
        match self {
            Self::InProgress { .. } => Disposition::Retry {
                busy: true,
                reason: self.redacted(),
            },
            Self::Duplicate { cached_result, .. } => Disposition::Ack {
                reply: serde_json::to_vec(cached_result).unwrap_or_default(),
            },
            Self::FingerprintMismatch { .. }
            | Self::InvalidKey { .. }
            | Self::MissingKey
            | Self::MissingKeyField { .. }
            | Self::ResultNotStored { .. }
            | Self::Serialization(_) => Disposition::reject(self.redacted()),
            _ => Disposition::retry(self.redacted()),
        }
    }
}

impl HandlerError for BoxError {
    /// An [`IdempotencyError`] in the box is classified as one; any other
    /// error is retried with backoff.
    fn disposition(&self) -> Disposition {
        match self.downcast_ref::<IdempotencyError>() {
            Some(error) => error.disposition(),
            None => Disposition::retry(self.to_string()),
        }
    }
}

impl HandlerError for String {}

impl HandlerError for &'static str {}

impl HandlerError for std::io::Error {}

impl HandlerError for std::convert::Infallible {
    fn disposition(&self) -> Disposition {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InvalidKeyReason;

    fn busy(d: &Disposition) -> bool {
        matches!(d, Disposition::Retry { busy: true, .. })
    }

    #[test]
    fn idempotency_errors_are_classified_precisely() {
        let in_progress = IdempotencyError::InProgress {
            key: "secret-key".into(),
            attempt: 2,
        };
        let d = in_progress.disposition();
        assert!(busy(&d), "{d:?}");
        let Disposition::Retry { reason, .. } = d else {
            unreachable!()
        };
        assert!(!reason.contains("secret-key"), "redacted: {reason}");

        let duplicate = IdempotencyError::Duplicate {
            key: "k".into(),
            cached_result: Some(serde_json::json!({"total": 3})),
        };
        assert_eq!(
            duplicate.disposition(),
            Disposition::ack(br#"{"total":3}"#.to_vec())
        );

        for rejected in [
            IdempotencyError::FingerprintMismatch { key: "k".into() },
            IdempotencyError::InvalidKey {
                reason: InvalidKeyReason::Empty,
            },
            IdempotencyError::MissingKey,
            IdempotencyError::MissingKeyField { field: "f".into() },
            IdempotencyError::ResultNotStored {
                key: "k".into(),
                reason: "r".into(),
            },
        ] {
            assert!(
                matches!(
                    rejected.disposition(),
                    Disposition::Reject { poison: false, .. }
                ),
                "{rejected:?}"
            );
        }

        for retried in [
            IdempotencyError::store_unavailable("memory", "down"),
            IdempotencyError::CircuitOpen {
                store: "memory",
                retry_in: None,
            },
            IdempotencyError::LeaseLost { key: "k".into() },
            IdempotencyError::protocol("memory", "odd reply"),
        ] {
            assert!(
                matches!(
                    retried.disposition(),
                    Disposition::Retry { busy: false, .. }
                ),
                "{retried:?}"
            );
        }
    }

    #[test]
    fn other_errors_are_retried_with_their_message() {
        assert_eq!(
            "downstream timeout".to_owned().disposition(),
            Disposition::retry("downstream timeout")
        );
        assert_eq!("static".disposition(), Disposition::retry("static"));
        let io = std::io::Error::other("reset");
        assert_eq!(io.disposition(), Disposition::retry("reset"));
    }

    #[test]
    fn a_boxed_idempotency_error_keeps_its_class() {
        let boxed: BoxError = Box::new(IdempotencyError::MissingKey);
        assert!(matches!(boxed.disposition(), Disposition::Reject { .. }));
        let boxed: BoxError = "plain".into();
        assert_eq!(boxed.disposition(), Disposition::retry("plain"));
    }
}

//! The one error type of the framework.

use std::error::Error as StdError;

/// A boxed error from a store's client library, kept as the source of
/// [`IdempotencyError::StoreUnavailable`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why an idempotency key was rejected before any store was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKeyReason {
    /// The key is the empty string.
    Empty,
    /// The key has more characters than `max_key_len` allows.
    TooLong {
        /// The key's length in characters.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The key contains a control character (newline, NUL, ...).
    ControlCharacter,
}

impl std::fmt::Display for InvalidKeyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("the key is empty"),
            Self::TooLong { len, max } => {
                write!(
                    f,
                    "the key is {len} characters long, more than the maximum of {max}"
                )
            }
            Self::ControlCharacter => f.write_str("the key contains a control character"),
        }
    }
}

/// Why a store that answered refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreRefusal {
    /// The store is out of memory and refuses writes (Redis `OOM` under
    /// `maxmemory` with `noeviction`). Reads still work.
    OutOfMemory,
    /// The store's user lacks a permission the operation needs (Redis
    /// `NOPERM` under an ACL user).
    PermissionDenied,
}

impl std::fmt::Display for StoreRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfMemory => f.write_str("it is out of memory and refuses writes"),
            Self::PermissionDenied => f.write_str("its user lacks a permission"),
        }
    }
}

/// Everything that can go wrong when making a handler idempotent.
///
/// Handlers return their own error type `E`; the checker asks for
/// `E: From<IdempotencyError>` so both kinds of failure travel in one `Result`.
/// Raw idempotency keys never appear in these messages; where a key is named it
/// is the *storage* key, which is a SHA-256 digest when key hashing is on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// Another attempt holds a live lease on this key.
    #[error("event `{key}` is being processed by another attempt (attempt {attempt})")]
    InProgress {
        /// The storage key.
        key: String,
        /// The attempt number of the running attempt.
        attempt: u32,
    },

    /// The key was already completed, and the duplicate policy is
    /// [`DuplicatePolicy::Error`](crate::DuplicatePolicy::Error).
    #[error("event `{key}` was already processed")]
    Duplicate {
        /// The storage key.
        key: String,
        /// The result stored by the attempt that completed, as JSON.
        cached_result: Option<serde_json::Value>,
    },

    /// The key was used before with a different payload.
    #[error("idempotency key `{key}` was already used with a different payload")]
    FingerprintMismatch {
        /// The storage key.
        key: String,
    },

    /// The lease was lost: it expired and another attempt took the key over,
    /// or the record was deleted. Nothing was written.
    #[error("the lease on `{key}` was lost to another attempt; nothing was written")]
    LeaseLost {
        /// The storage key.
        key: String,
    },

    /// The event carries no usable key (an envelope with neither an
    /// `idempotency_key` nor an `event_id`).
    #[error("the event has no idempotency key and no event id")]
    MissingKey,

    /// A field that a [`KeyExtractor::Fields`](crate::KeyExtractor::Fields)
    /// key is built from is missing from the payload (or null); no store
    /// was asked. A key is never built from an invented value.
    #[error("the payload has no key field `{field}`")]
    MissingKeyField {
        /// The field name or JSON pointer, as configured.
        field: String,
    },

    /// The key failed validation; no store was asked and no handler ran.
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// What is wrong with the key.
        reason: InvalidKeyReason,
    },

    /// The store could not be reached or did not answer in time. The
    /// handler did not run (the checker fails closed), unless
    /// [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) is on.
    #[error("the {store} store is unavailable")]
    StoreUnavailable {
        /// Which store (`"redis"`, `"memory"`, ...).
        store: &'static str,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// The checker's circuit breaker is open after repeated
    /// [`StoreUnavailable`](Self::StoreUnavailable) answers: the store was
    /// not called. Like `StoreUnavailable`, the handler did not run unless
    /// [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) is on, and
    /// it is [retryable](Self::is_retryable).
    #[error(
        "the circuit breaker in front of the {store} store is open after repeated failures; \
         the store was not called{}",
        match retry_in {
            Some(wait) => format!(" (next probe in {}ms)", wait.as_millis()),
            None => " (a probe call is testing the store)".to_owned(),
        }
    )]
    CircuitOpen {
        /// Which store (`"redis"`, `"memory"`, ...).
        store: &'static str,
        /// When the breaker lets the next probe call through, if no probe
        /// is in flight.
        retry_in: Option<std::time::Duration>,
    },

    /// The store answered but refused the operation (out of memory, or a
    /// missing ACL permission). Not an outage: it does not count towards
    /// the circuit breaker and never triggers fail-open. It is
    /// [retryable](Self::is_retryable): memory frees up as records expire,
    /// and an operator can grant a permission. When a claim is refused the
    /// handler does not run.
    #[error("the {store} store refused the operation: {reason}")]
    StoreRefused {
        /// Which store (`"redis"`, `"memory"`, ...).
        store: &'static str,
        /// Why it refused.
        reason: StoreRefusal,
        /// The store's own error.
        #[source]
        source: BoxError,
    },

    /// The key was completed, but its first attempt's result could not be
    /// stored (it did not serialize to JSON, or nested too deeply), so there
    /// is nothing to replay. The handler does not run again: its side
    /// effects already happened once.
    #[error("event `{key}` was already processed, but its result was not stored: {reason}")]
    ResultNotStored {
        /// The storage key.
        key: String,
        /// Why the first attempt's result was not stored.
        reason: String,
    },

    /// The store answered in a way this framework does not expect: a reply
    /// of the wrong shape (another version of the store's scripts, a proxy
    /// in the way, a server that is not what it claims to be). Not an
    /// outage: it does not count towards the circuit breaker, never triggers
    /// fail-open, and is not [retryable](Self::is_retryable) by itself
    /// (transports still redeliver rather than drop the event). The source
    /// says what came back.
    #[error("the {store} store answered in a way this framework does not expect")]
    Protocol {
        /// Which store (`"redis"`, `"memory"`, ...).
        store: &'static str,
        /// What was unexpected.
        #[source]
        source: BoxError,
    },

    /// The value stored under a key is not a record this framework wrote.
    #[error("the record at `{key}` is corrupt")]
    CorruptRecord {
        /// The storage key.
        key: String,
        /// Why it could not be read.
        #[source]
        source: BoxError,
    },

    /// A result could not be turned into JSON or back.
    #[error("could not (de)serialize the handler's result")]
    Serialization(#[from] serde_json::Error),

    /// An `#[idempotent]` handler without `checker = ..` ran before a default
    /// checker was installed.
    #[error(
        "no default IdempotencyChecker is installed: call `set_default_checker(..)` at start-up, \
         or pass `checker = ..` to #[idempotent]"
    )]
    NoDefaultChecker,

    /// A configuration value was rejected: which option, and why.
    #[error("invalid configuration: {option}: {reason}")]
    Config {
        /// The option as its setter, URL part or command names it: `"ttl"`,
        /// `"local_cache.max_entries"`, `"url"`, `"maxmemory-policy"`.
        option: &'static str,
        /// Why the value was rejected.
        reason: String,
    },
}

impl IdempotencyError {
    /// A [`Config`](Self::Config) error: `option` was rejected because of `reason`.
    pub(crate) fn config(option: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            option,
            reason: reason.into(),
        }
    }

    /// A `StoreUnavailable` error for `store` caused by `source`.
    pub fn store_unavailable(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::StoreUnavailable {
            store,
            source: source.into(),
        }
    }

    /// A `StoreRefused` error for `store`, refused for `reason`, with the
    /// store's own error as `source`.
    pub fn store_refused(
        store: &'static str,
        reason: StoreRefusal,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::StoreRefused {
            store,
            reason,
            source: source.into(),
        }
    }

    /// A `Protocol` error for `store`: it answered `source`, which this
    /// framework does not expect.
    pub fn protocol(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Protocol {
            store,
            source: source.into(),
        }
    }

    /// A `CorruptRecord` error for `key` caused by `source`.
    pub fn corrupt(key: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::CorruptRecord {
            key: key.into(),
            source: source.into(),
        }
    }

    /// The message without any key in it: what the framework logs at `WARN`
    /// and `ERROR`, so keys (possibly personal data, unless key hashing is
    /// on) stay out of logs above `DEBUG`.
    pub fn redacted(&self) -> String {
        match self {
            Self::InProgress { attempt, .. } => {
                format!("the event is being processed by another attempt (attempt {attempt})")
            }
            Self::Duplicate { .. } => "the event was already processed".to_owned(),
            Self::FingerprintMismatch { .. } => {
                "the idempotency key was already used with a different payload".to_owned()
            }
            Self::LeaseLost { .. } => {
                "the lease was lost to another attempt; nothing was written".to_owned()
            }
            Self::CorruptRecord { .. } => "a stored record is corrupt".to_owned(),
            Self::ResultNotStored { reason, .. } => {
                format!("the event was already processed, but its result was not stored: {reason}")
            }
            other => other.to_string(),
        }
    }

    /// Whether this is [`CircuitOpen`](Self::CircuitOpen): the checker's
    /// circuit breaker refused the call and the store was not called.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, Self::CircuitOpen { .. })
    }

    /// Whether the store could not be asked: it is unavailable
    /// ([`StoreUnavailable`](Self::StoreUnavailable)) or the circuit breaker
    /// is open ([`CircuitOpen`](Self::CircuitOpen)). What fail-open acts on.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::StoreUnavailable { .. } | Self::CircuitOpen { .. }
        )
    }

    /// Whether retrying the same call later may succeed: store outages,
    /// writes the store refused (memory frees up as records expire; an
    /// operator can grant a permission), and keys held by another attempt.
    /// Transports redeliver these later rather than drop the event.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::InProgress { .. }
                | Self::StoreUnavailable { .. }
                | Self::CircuitOpen { .. }
                | Self::StoreRefused { .. }
        )
    }
}

/// The result type of this crate.
pub type Result<T, E = IdempotencyError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::IdempotencyError;

    #[test]
    fn redacted_messages_name_no_key() {
        let key = "customer-42@example.com";
        for error in [
            IdempotencyError::InProgress {
                key: key.into(),
                attempt: 2,
            },
            IdempotencyError::Duplicate {
                key: key.into(),
                cached_result: None,
            },
            IdempotencyError::FingerprintMismatch { key: key.into() },
            IdempotencyError::LeaseLost { key: key.into() },
            IdempotencyError::corrupt(key, "bad"),
            IdempotencyError::ResultNotStored {
                key: key.into(),
                reason: "x".into(),
            },
        ] {
            assert!(error.to_string().contains(key));
            assert!(!error.redacted().contains(key), "{}", error.redacted());
        }
        let other = IdempotencyError::config("ttl", "x");
        assert_eq!(other.redacted(), other.to_string());
    }
}

//! [`IdempotencyChecker`]: the one path every entry point goes through.
//!
//! The rooms, in the order a call goes through them:
//!
//! - this file: the checker type, its constructors and accessors;
//! - [`request`]: [`KeyedRequest`], what every entry point reduces to;
//! - [`process`]: [`process`](IdempotencyChecker::process) and
//!   `process_request`, fail-open;
//! - [`claim`]: the claim loop (local cache, in-progress policy);
//! - [`guard`]: [`IdempotencyGuard`], the manual style, and the lease
//!   heartbeat;
//! - [`finish`]: recording an attempt `COMPLETED` or `FAILED`;
//! - [`repair`]: those writes retried in the background when the store
//!   did not take them;
//! - [`reads`]: reads, deletes and the manual `mark_*` calls;
//! - [`result`]: a handler's result as stored and as replayed;
//! - [`instrument`]: the one instrumented store call (breaker, span,
//!   latency, error counts);
//! - [`global`]: the process-wide default checker.

use std::sync::Arc;
use std::time::Duration;

use crate::config::IdempotencyConfig;
use crate::error::Result;
use crate::key::stored_key;
use crate::resilience::breaker::{Breaker, CircuitState};
use crate::resilience::cache::ReplayCache;
use crate::stats::{CheckerStats, Counters};
use crate::store::IdempotencyStore;

mod claim;
mod finish;
pub(crate) mod global;
mod guard;
mod instrument;
mod process;
mod reads;
mod repair;
mod request;
mod result;

pub use guard::IdempotencyGuard;
pub use process::{Processed, current_lease};
pub use request::KeyedRequest;

struct Inner {
    store: Arc<dyn IdempotencyStore>,
    config: IdempotencyConfig,
    counters: Counters,
    cache: Option<ReplayCache>,
    breaker: Option<Breaker>,
}

/// Makes handlers idempotent over an [`IdempotencyStore`].
///
/// Cheap to clone; clones share the store, configuration and statistics.
///
/// ```
/// use idempotency_core::{EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), IdempotencyError> {
/// let checker = IdempotencyChecker::new(MemoryStore::new());
/// let event = EventEnvelope::new("order.placed", serde_json::json!({"order": 42}));
///
/// let first = checker
///     .process(&event, |_lease| async { Ok::<_, IdempotencyError>("charged".to_owned()) })
///     .await?;
/// let again = checker
///     .process(&event, |_lease| async { Ok::<_, IdempotencyError>("charged twice!".to_owned()) })
///     .await?;
/// assert!(first.was_executed());
/// assert!(again.was_replayed());
/// assert_eq!(again.into_inner(), "charged");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct IdempotencyChecker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IdempotencyChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyChecker")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl IdempotencyChecker {
    /// A checker over `store` with the default configuration.
    pub fn new(store: impl IdempotencyStore + 'static) -> Self {
        Self::with_config(store, IdempotencyConfig::default())
    }

    /// A checker over `store` with `config`.
    pub fn with_config(store: impl IdempotencyStore + 'static, config: IdempotencyConfig) -> Self {
        Self::from_shared(Arc::new(store), config)
    }

    /// A checker over a store shared with other checkers.
    pub fn from_shared(store: Arc<dyn IdempotencyStore>, config: IdempotencyConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                cache: config.local_cache.map(ReplayCache::new),
                breaker: config.circuit_breaker.map(Breaker::new),
                config,
                counters: Counters::default(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.inner.store
    }

    /// What this checker has seen so far.
    pub fn stats(&self) -> CheckerStats {
        self.inner.counters.snapshot()
    }

    /// Where the circuit breaker in front of the store is;
    /// [`CircuitState::Closed`] when the breaker is off (see
    /// [`IdempotencyConfigBuilder::circuit_breaker`](crate::IdempotencyConfigBuilder::circuit_breaker)).
    pub fn circuit_state(&self) -> CircuitState {
        self.inner
            .breaker
            .as_ref()
            .map_or(CircuitState::Closed, Breaker::state)
    }

    /// Checks that the store answers. While the circuit breaker is open this
    /// fails fast without asking the store; once the cool-down is over it
    /// may be the probe that closes the breaker.
    pub async fn health_check(&self) -> Result<()> {
        let call = instrument::StoreCall::gated("health");
        self.store_call(call, tracing::Span::none(), || self.inner.store.health())
            .await
    }

    /// The storage key for a raw idempotency key (prefix, optional hashing),
    /// after validating it.
    pub fn storage_key(&self, key: &str) -> Result<String> {
        Ok(stored_key(key, &self.inner.config)?.storage)
    }
}

/// How long an attempt's record and lease live, resolved for one request.
#[derive(Debug, Clone, Copy)]
struct Durations {
    ttl: Duration,
    lease: Duration,
}

/// A fencing token unique to this claim: 128 random bits drawn once per
/// process, plus a counter. Unique across processes (the odds of two
/// processes sharing a seed are 2^-128), and no system call per claim.
fn new_token() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (high, low) = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let digits = hex_digits(high, low.wrapping_add(n));
    // Always ASCII, so never the empty default.
    std::str::from_utf8(&digits)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// `high` then `low` as 32 lower-case hex digits, as `{high:016x}{low:016x}`
/// writes them (without the formatter's padding machinery: this runs per
/// claim), two digits a byte.
fn hex_digits(high: u64, low: u64) -> [u8; 32] {
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut byte = 0;
        while byte < 256 {
            pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
            byte += 1;
        }
        pairs
    };
    let mut digits = [0u8; 32];
    let bytes = (u128::from(high) << 64 | u128::from(low)).to_be_bytes();
    for (out, byte) in digits.chunks_exact_mut(2).zip(bytes) {
        out.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::{hex_digits, new_token};

    #[test]
    fn tokens_are_unique_hex_of_fixed_length() {
        let tokens: std::collections::HashSet<String> = (0..10_000).map(|_| new_token()).collect();
        assert_eq!(tokens.len(), 10_000);
        assert!(
            tokens
                .iter()
                .all(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }

    #[test]
    fn hex_digits_are_what_the_formatter_writes() {
        for (high, low) in [
            (0, 0),
            (u64::MAX, 1),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        ] {
            let digits = hex_digits(high, low);
            assert_eq!(
                std::str::from_utf8(&digits).expect("ASCII"),
                format!("{high:016x}{low:016x}")
            );
        }
    }
}

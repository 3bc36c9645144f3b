//! Configuration of an [`IdempotencyChecker`](crate::IdempotencyChecker).

use std::time::Duration;

use crate::error::{IdempotencyError, Result};
use crate::resilience::breaker::CircuitBreakerConfig;
use crate::resilience::cache::LocalCache;

/// Longest duration the stores accept (Redis `PX` takes a signed 64-bit
/// millisecond count; we stay far below it).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a duplicate of a `COMPLETED` key gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DuplicatePolicy {
    /// Return the first attempt's result, decoded from the record (default).
    #[default]
    Replay,
    /// Return [`IdempotencyError::Duplicate`] carrying the cached result.
    Error,
}

/// What a call gets when another attempt holds a live lease on its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InProgressPolicy {
    /// Return [`IdempotencyError::InProgress`] at once (default).
    #[default]
    Error,
    /// Poll the record until the other attempt finishes, then replay its result
    /// (or, if it failed or its lease ran out, try to claim the key), for at most
    /// this long; after that return [`IdempotencyError::InProgress`].
    Wait(Duration),
}

/// Parses a human duration such as `"24h"`, `"7d"`, `"30m"`, `"1h30m"` or `"250ms"`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(idempotency_core::parse_duration("1h30m")?, Duration::from_secs(5400));
/// assert!(idempotency_core::parse_duration("24x").is_err());
/// assert!(idempotency_core::parse_duration("0s").is_err());
/// # Ok::<(), idempotency_core::IdempotencyError>(())
/// ```
pub fn parse_duration(text: &str) -> Result<Duration> {
    parse_option("duration", text)
}

/// [`parse_duration`] for the option named `option`.
fn parse_option(option: &'static str, text: &str) -> Result<Duration> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        IdempotencyError::config(option, format!("`{text}` is not a duration: {e}"))
    })?;
    check_duration(option, duration)
}

pub(crate) fn check_duration(option: &'static str, duration: Duration) -> Result<Duration> {
    let reason = if duration.is_zero() {
        "must be greater than zero"
    } else if duration > MAX_DURATION {
        "must be at most 10 years"
    } else if duration < Duration::from_millis(1) {
        "must be at least 1ms"
    } else {
        return Ok(duration);
    };
    Err(IdempotencyError::config(option, reason))
}

/// A duration given to a builder setter, either as a [`Duration`] or as
/// text like `"24h"` (parsed by [`parse_duration`] when the configuration
/// is built). Not exported: the setters take `impl Into<DurationArg>`,
/// which a `Duration`, a `&str` and a `String` are.
#[derive(Debug, Clone)]
pub enum DurationArg {
    /// An exact duration.
    Exact(Duration),
    /// Text parsed by [`parse_duration`] when the config is built.
    Text(String),
}

impl From<Duration> for DurationArg {
    fn from(d: Duration) -> Self {
        Self::Exact(d)
    }
}

impl From<&str> for DurationArg {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<String> for DurationArg {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl DurationArg {
    fn resolve(self, option: &'static str) -> Result<Duration> {
        match self {
            Self::Exact(d) => check_duration(option, d),
            Self::Text(t) => parse_option(option, &t),
        }
    }
}

/// How a checker names, guards and times its records.
///
/// Build one with [`IdempotencyConfig::builder`]; [`Default`] gives the
/// documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) key_prefix: String,
    pub(crate) hash_keys: bool,
    pub(crate) max_key_len: usize,
    pub(crate) fingerprint_payloads: bool,
    pub(crate) on_duplicate: DuplicatePolicy,
    pub(crate) on_in_progress: InProgressPolicy,
    pub(crate) local_cache: Option<LocalCache>,
    pub(crate) circuit_breaker: Option<CircuitBreakerConfig>,
    pub(crate) fail_open: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(5 * 60),
            key_prefix: "idempotency:events:".to_owned(),
            hash_keys: false,
            max_key_len: 255,
            fingerprint_payloads: false,
            on_duplicate: DuplicatePolicy::Replay,
            on_in_progress: InProgressPolicy::Error,
            local_cache: None,
            circuit_breaker: Some(CircuitBreakerConfig::default()),
            fail_open: false,
        }
    }
}

impl IdempotencyConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> IdempotencyConfigBuilder {
        IdempotencyConfigBuilder {
            config: Self::default(),
            ttl: None,
            lease: None,
            wait: None,
            cache_ttl: None,
            breaker: None,
        }
    }

    /// How long a record (and so its replay) lives after its last write. Default 24h.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease: how long an attempt may go without renewing before another
    /// worker may take the key over. Default 5 minutes.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The prefix of every storage key. Default `idempotency:events:`.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Whether keys are stored as their SHA-256 digest. Default off.
    pub fn hash_keys(&self) -> bool {
        self.hash_keys
    }

    /// The longest accepted key, in characters. Default 255.
    pub fn max_key_len(&self) -> usize {
        self.max_key_len
    }

    /// Whether payloads are fingerprinted, so reusing a key with a different
    /// payload is an error. Default off.
    pub fn fingerprint_payloads(&self) -> bool {
        self.fingerprint_payloads
    }

    /// What a duplicate of a completed key gets. Default: replay.
    pub fn on_duplicate(&self) -> DuplicatePolicy {
        self.on_duplicate
    }

    /// What a call gets while another attempt runs. Default: an error.
    pub fn on_in_progress(&self) -> InProgressPolicy {
        self.on_in_progress
    }

    /// The local replay cache, if on. Default off.
    pub fn local_cache(&self) -> Option<LocalCache> {
        self.local_cache
    }

    /// The circuit breaker in front of the store, if on. Default on: 5
    /// consecutive failures open it for 2s.
    pub fn circuit_breaker(&self) -> Option<CircuitBreakerConfig> {
        self.circuit_breaker
    }

    /// Whether `process` runs the handler unguarded when the store is
    /// unavailable. Default off (fail closed).
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }
}

/// Builder of [`IdempotencyConfig`]; [`build`](Self::build) validates.
///
/// ```
/// use idempotency_core::{IdempotencyConfig, InProgressPolicy};
/// use std::time::Duration;
///
/// let config = IdempotencyConfig::builder()
///     .ttl("7d")
///     .lease("30s")
///     .key_prefix("billing:")
///     .hash_keys(true)
///     .on_in_progress_wait("10s")
///     .build()?;
/// assert_eq!(config.ttl(), Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(config.on_in_progress(), InProgressPolicy::Wait(Duration::from_secs(10)));
/// # Ok::<(), idempotency_core::IdempotencyError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyConfigBuilder {
    config: IdempotencyConfig,
    ttl: Option<DurationArg>,
    lease: Option<DurationArg>,
    wait: Option<DurationArg>,
    cache_ttl: Option<(usize, DurationArg)>,
    breaker: Option<(u32, DurationArg)>,
}

impl IdempotencyConfigBuilder {
    /// Sets [`IdempotencyConfig::ttl`], e.g. `"24h"` or a [`Duration`].
    pub fn ttl(mut self, ttl: impl Into<DurationArg>) -> Self {
        self.ttl = Some(ttl.into());
        self
    }

    /// Sets [`IdempotencyConfig::lease`]: how long an attempt holds the key without renewing.
    pub fn lease(mut self, timeout: impl Into<DurationArg>) -> Self {
        self.lease = Some(timeout.into());
        self
    }

    /// Sets [`IdempotencyConfig::key_prefix`].
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// Sets [`IdempotencyConfig::hash_keys`].
    pub fn hash_keys(mut self, on: bool) -> Self {
        self.config.hash_keys = on;
        self
    }

    /// Sets [`IdempotencyConfig::max_key_len`].
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config.max_key_len = max;
        self
    }

    /// Sets [`IdempotencyConfig::fingerprint_payloads`].
    pub fn fingerprint_payloads(mut self, on: bool) -> Self {
        self.config.fingerprint_payloads = on;
        self
    }

    /// Sets [`IdempotencyConfig::on_duplicate`].
    pub fn on_duplicate(mut self, policy: DuplicatePolicy) -> Self {
        self.config.on_duplicate = policy;
        self
    }

    /// Answer [`IdempotencyError::InProgress`] at once while another attempt
    /// runs (the default).
    pub fn on_in_progress_error(mut self) -> Self {
        self.wait = None;
        self.config.on_in_progress = InProgressPolicy::Error;
        self
    }

    /// Wait up to `bound` for a running attempt to finish
    /// ([`InProgressPolicy::Wait`]).
    pub fn on_in_progress_wait(mut self, bound: impl Into<DurationArg>) -> Self {
        self.wait = Some(bound.into());
        self
    }

    /// Turns on the local replay cache: up to `max_entries` `COMPLETED`
    /// records kept in this process, each replayed without a store round trip
    /// for at most `ttl` (and never past the record's own expiry).
    ///
    /// Only `COMPLETED` records are cached, never `PROCESSING` or `FAILED`
    /// ones, and [`delete_record`](crate::IdempotencyChecker::delete_record)
    /// removes the key from this checker's cache. The cost of the cache: a
    /// record deleted (or expired early) through *another* process or with
    /// `redis-cli` is still replayed here until this entry's `ttl` runs out.
    /// Choose `ttl` as the longest such staleness you accept.
    pub fn local_cache(mut self, max_entries: usize, ttl: impl Into<DurationArg>) -> Self {
        self.cache_ttl = Some((max_entries, ttl.into()));
        self
    }

    /// Sets the circuit breaker: after `failure_threshold` consecutive
    /// [`StoreUnavailable`](IdempotencyError::StoreUnavailable) answers, the
    /// checker stops calling the store for `open_for` (e.g. `"2s"`) and
    /// fails fast with `StoreUnavailable` instead; then one probe call tests
    /// the store: its success closes the breaker, its failure re-opens it
    /// for twice as long (up to 30s, or `open_for` if longer). On by
    /// default with 5 failures and 2s.
    ///
    /// The breaker gates the calls that start work or only read: claims
    /// (`process`, `guard`, `claim`), `get_record`,
    /// `would_skip`, `delete_record` and `health_check`. Writes on behalf
    /// of an attempt whose handler is running or has run (lease renewals,
    /// `complete`, `fail`, a dropped guard's release) always go to the
    /// store: they record real outcomes, and skipping a renewal could hand a
    /// live attempt's key to another worker. Their failures still count
    /// towards opening the breaker. The background release of a claim whose
    /// reply was lost waits while the breaker is open. Replays from the
    /// local replay cache need no store and keep working.
    pub fn circuit_breaker(
        mut self,
        failure_threshold: u32,
        open_for: impl Into<DurationArg>,
    ) -> Self {
        self.breaker = Some((failure_threshold, open_for.into()));
        self
    }

    /// Turns the circuit breaker off: every call goes to the store.
    pub fn no_circuit_breaker(mut self) -> Self {
        self.breaker = None;
        self.config.circuit_breaker = None;
        self
    }

    /// Fail open: when the claim fails with
    /// [`StoreUnavailable`](IdempotencyError::StoreUnavailable) (the store
    /// is down, or the circuit breaker is open),
    /// [`process`](crate::IdempotencyChecker::process) and
    /// [`process_request`](crate::IdempotencyChecker::process_request) run
    /// the handler *unguarded* and return
    /// [`Processed::Executed`](crate::Processed::Executed): nothing is
    /// recorded, so a redelivery runs it again. Each such run logs a warning
    /// and counts in [`CheckerStats::fail_open`](crate::CheckerStats::fail_open).
    /// The handler's lease is not known to any store: its `attempt` is 0.
    ///
    /// Default off (fail closed: the error is returned and the handler does
    /// not run). Turn it on only for handlers where running twice is cheaper
    /// than not running. The manual [`guard`](crate::IdempotencyChecker::guard)
    /// and [`claim`](crate::IdempotencyChecker::claim)
    /// calls always return the error: their callers decide.
    pub fn fail_open(mut self, on: bool) -> Self {
        self.config.fail_open = on;
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<IdempotencyConfig> {
        let mut config = self.config;
        if let Some(ttl) = self.ttl {
            config.ttl = ttl.resolve("ttl")?;
        }
        if let Some(timeout) = self.lease {
            config.lease = timeout.resolve("lease")?;
        }
        if let Some(wait) = self.wait {
            config.on_in_progress = InProgressPolicy::Wait(wait.resolve("on_in_progress_wait")?);
        }
        if let Some((max_entries, ttl)) = self.cache_ttl {
            if max_entries == 0 {
                return Err(IdempotencyError::config(
                    "local_cache.max_entries",
                    "must be at least 1",
                ));
            }
            config.local_cache = Some(LocalCache {
                max_entries,
                ttl: ttl.resolve("local_cache.ttl")?,
            });
        }
        if let Some((failure_threshold, open_for)) = self.breaker {
            if failure_threshold == 0 {
                return Err(IdempotencyError::config(
                    "circuit_breaker.failure_threshold",
                    "must be at least 1",
                ));
            }
            config.circuit_breaker = Some(CircuitBreakerConfig::new(
                failure_threshold,
                open_for.resolve("circuit_breaker.open_for")?,
            ));
        }
        if config.max_key_len == 0 {
            return Err(IdempotencyError::config(
                "max_key_len",
                "must be at least 1",
            ));
        }
        if config.key_prefix.chars().any(char::is_control) {
            return Err(IdempotencyError::config(
                "key_prefix",
                "must not contain control characters",
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_parse() {
        for (text, secs) in [
            ("24h", 86_400),
            ("7d", 604_800),
            ("30m", 1800),
            ("1h30m", 5400),
        ] {
            assert_eq!(parse_duration(text).expect(text), Duration::from_secs(secs));
        }
    }

    #[test]
    fn bad_durations_are_config_errors() {
        for text in ["24x", "0s", "", "-5m", "20y"] {
            assert!(
                matches!(parse_duration(text), Err(IdempotencyError::Config { .. })),
                "{text} should be rejected"
            );
        }
    }

    /// The bounds `#[idempotent]` checks at compile time (tests/ui) are
    /// these: 1ms ..= 3650 days.
    #[test]
    fn duration_bounds_are_one_millisecond_to_ten_years() {
        for ok in ["1ms", "3650d"] {
            assert!(parse_duration(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in ["999us", "3650d 1ms"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn builder_reports_which_option_is_wrong() {
        let err = IdempotencyConfig::builder()
            .ttl("soon")
            .build()
            .expect_err("bad ttl");
        assert!(err.to_string().contains("ttl"), "{err}");
        let err = IdempotencyConfig::builder()
            .max_key_len(0)
            .build()
            .expect_err("bad len");
        assert!(err.to_string().contains("max_key_len"), "{err}");
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = IdempotencyConfig::default();
        assert_eq!(c.ttl(), Duration::from_secs(86_400));
        assert_eq!(c.lease(), Duration::from_secs(300));
        assert_eq!(c.key_prefix(), "idempotency:events:");
        assert_eq!(c.max_key_len(), 255);
        assert_eq!(c.on_duplicate(), DuplicatePolicy::Replay);
        assert_eq!(c.on_in_progress(), InProgressPolicy::Error);
        assert_eq!(
            c.circuit_breaker(),
            Some(CircuitBreakerConfig {
                failure_threshold: 5,
                open_for: Duration::from_secs(2),
                max_open_for: Duration::from_secs(30),
            })
        );
        assert!(!c.fail_open());
    }

    #[test]
    fn circuit_breaker_is_validated_and_can_be_turned_off() {
        let err = IdempotencyConfig::builder()
            .circuit_breaker(0, "1s")
            .build()
            .expect_err("zero threshold");
        assert!(err.to_string().contains("failure_threshold"), "{err}");
        let err = IdempotencyConfig::builder()
            .circuit_breaker(3, "soon")
            .build()
            .expect_err("bad duration");
        assert!(err.to_string().contains("open_for"), "{err}");
        let long = IdempotencyConfig::builder()
            .circuit_breaker(3, "1m")
            .build()
            .expect("config");
        assert_eq!(
            long.circuit_breaker(),
            Some(CircuitBreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(60),
                max_open_for: Duration::from_secs(60),
            })
        );
        let off = IdempotencyConfig::builder()
            .circuit_breaker(3, "1s")
            .no_circuit_breaker()
            .fail_open(true)
            .build()
            .expect("config");
        assert_eq!(off.circuit_breaker(), None);
        assert!(off.fail_open());
    }
}

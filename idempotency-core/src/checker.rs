//! [`IdempotencyChecker`]: the one path every entry point goes through.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument;

use crate::breaker::{Breaker, CircuitState, Permit, Transition};
use crate::cache::ReplayCache;
use crate::config::{DuplicatePolicy, IdempotencyConfig, InProgressPolicy, check_duration};
use crate::envelope::EventEnvelope;
use crate::error::{IdempotencyError, Result};
use crate::key::{fingerprint, stored_key};
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease, ProcessingStatus};
use crate::stats::{CheckerStats, Counters, bump, handler_latency, store_latency};
use crate::store::{ClaimRequest, IdempotencyStore};

tokio::task_local! {
    static CURRENT_LEASE: Lease;
}

/// The lease of the attempt running on this task, inside a handler run by
/// [`IdempotencyChecker::process`] (or an `#[idempotent]` function); `None`
/// elsewhere. Its `token` is the fencing token for the handler's own writes;
/// `expires_at` is as of the claim (the lease is renewed in the background).
pub fn current_lease() -> Option<Lease> {
    CURRENT_LEASE.try_with(Lease::clone).ok()
}

/// What [`IdempotencyChecker::process`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran (this call held the key) and returned this value.
    Executed(T),
    /// The key was already completed; this is the first attempt's result,
    /// decoded from the record. The handler did not run.
    Replayed(T),
}

impl<T> Processed<T> {
    /// The value, executed or replayed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Executed(v) | Self::Replayed(v) => v,
        }
    }

    /// A reference to the value.
    pub fn value(&self) -> &T {
        match self {
            Self::Executed(v) | Self::Replayed(v) => v,
        }
    }

    /// Whether the handler ran in this call.
    pub fn was_executed(&self) -> bool {
        matches!(self, Self::Executed(_))
    }

    /// Whether the value was replayed from an earlier attempt.
    pub fn was_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

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
    key: &'a str,
    event_id: Option<&'a str>,
    event_type: Option<&'a str>,
    fingerprint: Option<String>,
    ttl: Option<Duration>,
    in_progress_timeout: Option<Duration>,
    on_duplicate: Option<DuplicatePolicy>,
    on_in_progress: Option<InProgressPolicy>,
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
            in_progress_timeout: None,
            on_duplicate: None,
            on_in_progress: None,
        }
    }

    /// A request for an envelope's key (by [`EventEnvelope::require_key`]:
    /// [`MissingKey`](IdempotencyError::MissingKey) for an envelope with
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
    /// fingerprint fails with [`IdempotencyError::FingerprintMismatch`].
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

    /// Overrides the checker's `in_progress_timeout` (the lease) for this request.
    pub fn in_progress_timeout(mut self, timeout: Duration) -> Self {
        self.in_progress_timeout = Some(timeout);
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

impl AsRef<IdempotencyChecker> for IdempotencyChecker {
    fn as_ref(&self) -> &IdempotencyChecker {
        self
    }
}

impl std::fmt::Debug for IdempotencyChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyChecker")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A fencing token unique to this claim: 128 random bits drawn once per
/// process, plus a counter. Unique across processes (the odds of two
/// processes sharing a seed are 2^-128), and no system call per claim.
fn new_token() -> String {
    use std::fmt::Write as _;
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (high, low) = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut token = String::with_capacity(32);
    // Writing to a String cannot fail.
    let _ = write!(token, "{high:016x}{:016x}", low.wrapping_add(n));
    token
}

/// Where a claim (after the in-progress policy) left a request.
enum Claimed {
    Acquired(Lease),
    Duplicate(IdempotencyRecord),
    InProgress(IdempotencyRecord),
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
        self.gated("health", || self.inner.store.health()).await
    }

    /// Asks the circuit breaker for a gated store call: `Err` (a
    /// `StoreUnavailable` saying the circuit is open) when the store must
    /// not be called.
    fn admit(&self) -> Result<Option<Permit<'_>>> {
        match &self.inner.breaker {
            None => Ok(None),
            Some(breaker) => breaker.admit().map(Some).map_err(|open| {
                let refused = IdempotencyError::CircuitOpen {
                    store: self.inner.store.name(),
                    retry_in: open.retry_in,
                };
                tracing::debug!(%refused, "store call refused");
                refused
            }),
        }
    }

    /// Reports a store call's outcome to the circuit breaker.
    fn settle<T>(&self, permit: Option<Permit<'_>>, result: &Result<T>) {
        let Some(permit) = permit else {
            return;
        };
        let unavailable = matches!(result, Err(IdempotencyError::StoreUnavailable { .. }));
        match permit.record(unavailable) {
            Some(Transition::Opened { open_for }) => {
                bump(&self.inner.counters.circuit_opened);
                tracing::warn!(
                    store = self.inner.store.name(),
                    open_for_ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
                    "circuit breaker opened after consecutive store failures; store calls fail fast until a probe succeeds"
                );
            }
            Some(Transition::Reopened { open_for }) => tracing::debug!(
                store = self.inner.store.name(),
                open_for_ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
                "circuit breaker probe failed; staying open"
            ),
            Some(Transition::Closed) => tracing::info!(
                store = self.inner.store.name(),
                "the store answered the probe; circuit breaker closed"
            ),
            None => {}
        }
    }

    /// Reports the outcome of a store call the breaker does not gate
    /// (renew, complete, fail: writes for an attempt whose handler runs or
    /// ran). It still counts while the breaker is closed.
    fn observe<T>(&self, result: &Result<T>) {
        self.settle(self.inner.breaker.as_ref().map(Breaker::unchecked), result);
    }

    /// Runs one gated store call `op` (named `name` in metrics).
    async fn gated<T, Fut>(&self, name: &'static str, op: impl FnOnce() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let permit = match self.admit() {
            Ok(permit) => permit,
            Err(open) => return self.count_store_error(Err(open)),
        };
        let started = Instant::now();
        let result = op().await;
        store_latency(name, started);
        self.settle(permit, &result);
        self.count_store_error(result)
    }

    /// The storage key for a raw idempotency key (prefix, optional hashing),
    /// after validating it.
    pub fn storage_key(&self, key: &str) -> Result<String> {
        Ok(stored_key(key, &self.inner.config)?.storage)
    }

    fn count_store_error<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(
            IdempotencyError::StoreUnavailable { .. }
            | IdempotencyError::CircuitOpen { .. }
            | IdempotencyError::StoreRefused { .. }
            | IdempotencyError::Protocol { .. }
            | IdempotencyError::CorruptRecord { .. },
        ) = &result
        {
            bump(&self.inner.counters.store_errors);
        }
        result
    }

    /// After a claim that failed with the store unavailable, the claim may
    /// still have been applied under `token`. Keep trying, for up to one
    /// lease, to fail that attempt: a token-checked write that changes nothing
    /// unless the claim really landed, in which case the key becomes
    /// retryable at once instead of blocked until the lease expires.
    ///
    /// The tries go through the circuit breaker: while it is open they wait
    /// instead of adding load to a store that is down.
    fn release_uncertain_claim(&self, key: &str, token: &str, durations: Durations) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lease = Lease {
            key: key.to_owned(),
            token: token.to_owned(),
            attempt: 0,
            expires_at: Utc::now(),
            taken_over: false,
        };
        self.write_later(&runtime, lease, LateWrite::Fail, durations, durations.lease);
    }

    /// After the handler ran and its completion could not be written (the
    /// store was unavailable, or refused it for lack of memory): keep
    /// trying, for up to `ttl`, to record it. A token-checked write: it lands
    /// only if the attempt still holds the key, and then duplicates replay
    /// the result (or get `ResultNotStored`, for `None`) instead of running
    /// again.
    fn complete_later(
        &self,
        lease: Lease,
        result: Option<serde_json::Value>,
        durations: Durations,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.write_later(
            &runtime,
            lease,
            LateWrite::Complete(result),
            durations,
            durations.ttl,
        );
    }

    /// Retries, in the background and through the circuit breaker, a
    /// `complete` or a `fail` of `lease` while the store is unavailable or
    /// out of memory, for up to `give_up_after`.
    fn write_later(
        &self,
        runtime: &tokio::runtime::Handle,
        lease: Lease,
        write: LateWrite,
        durations: Durations,
        give_up_after: Duration,
    ) {
        let checker = self.clone();
        runtime.spawn(async move {
            let give_up = Instant::now() + give_up_after;
            let mut pause = Duration::from_millis(100);
            while Instant::now() < give_up {
                let released = match checker.admit() {
                    Ok(permit) => {
                        let store = &checker.inner.store;
                        let released = match &write {
                            LateWrite::Complete(result) => {
                                store.complete(&lease, result.as_ref(), durations.ttl).await
                            }
                            LateWrite::Fail => {
                                store
                                    .fail(
                                        &lease,
                                        "claim outcome unknown: the store did not answer",
                                        durations.ttl,
                                    )
                                    .await
                            }
                        };
                        checker.settle(permit, &released);
                        released
                    }
                    Err(open) => Err(open),
                };
                match released {
                    Err(e) if may_land_later(&e) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    _ => return,
                }
            }
        });
    }

    /// The record for a raw idempotency key, whatever its status.
    pub async fn get_processing_record(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let key = stored_key(key, &self.inner.config)?;
        let record = self
            .gated("get", || self.inner.store.get(&key.storage))
            .await?;
        Ok(record.map(|mut record| {
            if record.idempotency_key.is_empty() {
                record.idempotency_key = key.recorded;
            }
            record
        }))
    }

    /// Whether a new delivery of `key` should be skipped: the key is
    /// `COMPLETED`, or `PROCESSING` under a live lease. A `FAILED` key is not a
    /// duplicate: its retry runs.
    ///
    /// This is a read for dashboards and pre-checks; it decides nothing. The
    /// atomic decision is the claim made by [`process`](Self::process),
    /// [`guard`](Self::guard) and [`mark_processing`](Self::mark_processing).
    /// Lease liveness is judged here by this host's clock.
    pub async fn is_duplicate(&self, key: &str) -> Result<bool> {
        Ok(self.get_processing_record(key).await?.is_some_and(|r| {
            r.status == ProcessingStatus::Completed || r.is_live_processing(Utc::now())
        }))
    }

    /// Deletes the record of a raw idempotency key (so the key is processed
    /// again); returns whether there was one.
    ///
    /// With the local replay cache on, the key is also dropped from this
    /// checker's cache (other processes' caches keep their entry until it
    /// expires; see [`IdempotencyConfigBuilder::local_cache`](crate::IdempotencyConfigBuilder::local_cache)).
    pub async fn delete_record(&self, key: &str) -> Result<bool> {
        let storage = self.storage_key(key)?;
        self.forget(&storage);
        let deleted = self
            .gated("delete", || self.inner.store.delete(&storage))
            .await;
        // A duplicate answered by the store while the delete was in flight
        // may have cached the record again.
        self.forget(&storage);
        deleted
    }

    fn forget(&self, storage: &str) {
        if let Some(cache) = &self.inner.cache {
            cache.remove(storage);
        }
    }

    /// Claims the envelope's key: the low-level first step. On
    /// [`ClaimOutcome::Acquired`] the caller must finish with
    /// [`mark_completed`](Self::mark_completed) or
    /// [`mark_failed`](Self::mark_failed) before the lease
    /// (`in_progress_timeout`) runs out; nothing renews it. Prefer
    /// [`process`](Self::process) or [`guard`](Self::guard).
    pub async fn mark_processing<P: Serialize>(
        &self,
        envelope: &EventEnvelope<P>,
    ) -> Result<ClaimOutcome> {
        let request =
            KeyedRequest::from_envelope(envelope, self.inner.config.fingerprint_payloads)?;
        let (claimed, _, _) = self.claim(&request).await?;
        Ok(match claimed {
            Claimed::Acquired(lease) => ClaimOutcome::Acquired(lease),
            Claimed::Duplicate(record) => ClaimOutcome::Duplicate(record),
            Claimed::InProgress(record) => ClaimOutcome::InProgress(record),
        })
    }

    /// Records `result` for a lease from [`mark_processing`](Self::mark_processing).
    /// Fails with [`IdempotencyError::LeaseLost`] if the lease was taken over.
    pub async fn mark_completed<T: Serialize + ?Sized>(
        &self,
        lease: &Lease,
        result: &T,
    ) -> Result<()> {
        let value = storable(result)?;
        self.complete(lease, Some(&value), self.inner.config.ttl)
            .await
    }

    /// Records a failure for a lease from [`mark_processing`](Self::mark_processing),
    /// so the next delivery retries.
    pub async fn mark_failed(&self, lease: &Lease, error: &str) -> Result<()> {
        self.fail(lease, error, self.inner.config.ttl).await
    }

    /// Completes `lease` with `value` (`None`: the result could not be
    /// stored), which the caller made by [`storable`].
    async fn complete(
        &self,
        lease: &Lease,
        value: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let result = self
            .inner
            .store
            .complete(lease, value, ttl)
            .instrument(tracing::debug_span!("idempotency.complete", key = %lease.key, attempt = lease.attempt))
            .await;
        store_latency("complete", started);
        self.observe(&result);
        tracing::debug!(key = %lease.key, ok = result.is_ok(), "complete");
        match &result {
            Ok(()) => bump(&self.inner.counters.executed),
            Err(IdempotencyError::LeaseLost { .. }) => {
                bump(&self.inner.counters.lease_lost);
                tracing::warn!(
                    attempt = lease.attempt,
                    "lease lost before completion; result not recorded"
                );
            }
            Err(_) => {}
        }
        self.count_store_error(result)
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        let started = Instant::now();
        let result = self
            .inner
            .store
            .fail(lease, error, ttl)
            .instrument(
                tracing::debug_span!("idempotency.fail", key = %lease.key, attempt = lease.attempt),
            )
            .await;
        store_latency("fail", started);
        self.observe(&result);
        tracing::debug!(key = %lease.key, ok = result.is_ok(), "fail");
        match &result {
            Ok(()) => bump(&self.inner.counters.failed),
            Err(IdempotencyError::LeaseLost { .. }) => bump(&self.inner.counters.lease_lost),
            Err(_) => {}
        }
        self.count_store_error(result)
    }

    /// The one claim path: validate, claim, apply the in-progress policy.
    async fn claim(&self, request: &KeyedRequest<'_>) -> Result<(Claimed, Durations, String)> {
        let config = &self.inner.config;
        let key = stored_key(request.key, config)?;
        let durations = Durations {
            ttl: check_duration("ttl", request.ttl.unwrap_or(config.ttl))?,
            lease: check_duration(
                "in_progress_timeout",
                request
                    .in_progress_timeout
                    .unwrap_or(config.in_progress_timeout),
            )?,
        };
        if let Some(record) = self.inner.cache.as_ref().and_then(|c| c.get(&key.storage)) {
            if let (Some(theirs), Some(ours)) = (&record.fingerprint, &request.fingerprint)
                && theirs != ours
            {
                bump(&self.inner.counters.fingerprint_mismatches);
                return Err(IdempotencyError::FingerprintMismatch { key: key.storage });
            }
            bump(&self.inner.counters.replayed);
            bump(&self.inner.counters.cache_hits);
            return Ok((Claimed::Duplicate(record), durations, key.storage));
        }
        let token = new_token();
        let claim = ClaimRequest {
            key: &key.storage,
            recorded_key: &key.recorded,
            event_id: request.event_id,
            event_type: request.event_type,
            fingerprint: request.fingerprint.as_deref(),
            token: &token,
            lease: durations.lease,
            ttl: durations.ttl,
        };
        let deadline = match request.on_in_progress.unwrap_or(config.on_in_progress) {
            InProgressPolicy::Wait(bound) => Some(Instant::now() + bound),
            InProgressPolicy::Error => None,
        };
        let mut pause = Duration::from_millis(10);
        loop {
            // Refused by the open breaker: nothing was sent, nothing to release.
            let permit = match self.admit() {
                Ok(permit) => permit,
                Err(open) => return self.count_store_error(Err(open)),
            };
            let started = Instant::now();
            let outcome = self
                .inner
                .store
                .claim(&claim)
                .instrument(tracing::debug_span!("idempotency.claim", key = %key.storage))
                .await;
            store_latency("claim", started);
            self.settle(permit, &outcome);
            let outcome = match outcome {
                Err(e @ IdempotencyError::FingerprintMismatch { .. }) => {
                    bump(&self.inner.counters.fingerprint_mismatches);
                    return Err(e);
                }
                Err(e @ IdempotencyError::StoreUnavailable { .. }) => {
                    // The claim may have been applied before the error (a
                    // timeout): release it in the background, or its key
                    // would stay blocked for a whole lease.
                    self.release_uncertain_claim(&key.storage, &token, durations);
                    return self.count_store_error(Err(e));
                }
                other => self.count_store_error(other)?,
            };
            let claimed = match outcome {
                ClaimOutcome::Acquired(lease) => {
                    if lease.taken_over {
                        bump(&self.inner.counters.lease_takeovers);
                        tracing::info!(
                            attempt = lease.attempt,
                            "took over an attempt whose lease ran out"
                        );
                    }
                    Claimed::Acquired(lease)
                }
                ClaimOutcome::Duplicate(record) => {
                    bump(&self.inner.counters.replayed);
                    if let Some(cache) = &self.inner.cache {
                        cache.put(&key.storage, record.clone(), None);
                    }
                    Claimed::Duplicate(record)
                }
                ClaimOutcome::InProgress(record) => {
                    let now = Instant::now();
                    if let Some(deadline) = deadline.filter(|d| *d > now) {
                        tokio::time::sleep(pause.min(deadline - now)).await;
                        pause = (pause * 2).min(Duration::from_millis(250));
                        continue;
                    }
                    bump(&self.inner.counters.in_progress);
                    Claimed::InProgress(record)
                }
            };
            tracing::debug!(key = %key.storage, outcome = claimed.name(), "claim");
            return Ok((claimed, durations, key.storage));
        }
    }

    /// Claims the envelope's key and returns a guard for the manual style.
    /// See [`IdempotencyGuard`].
    ///
    /// When the store is unavailable (or the circuit breaker is open) this
    /// returns [`StoreUnavailable`](IdempotencyError::StoreUnavailable) even
    /// with [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) on:
    /// the manual style leaves that decision to the caller.
    pub async fn guard<P: Serialize>(
        &self,
        envelope: &EventEnvelope<P>,
    ) -> Result<IdempotencyGuard> {
        let request =
            KeyedRequest::from_envelope(envelope, self.inner.config.fingerprint_payloads)?;
        self.guard_request(request).await
    }

    /// Like [`guard`](Self::guard), for a key-based request.
    pub async fn guard_request(&self, request: KeyedRequest<'_>) -> Result<IdempotencyGuard> {
        let (claimed, durations, _) = self.claim(&request).await?;
        Ok(IdempotencyGuard {
            checker: self.clone(),
            state: match claimed {
                Claimed::Acquired(lease) => GuardState::Held(lease),
                Claimed::Duplicate(record) => GuardState::Duplicate(record),
                Claimed::InProgress(record) => GuardState::InProgress(record),
            },
            durations,
        })
    }

    /// Runs `handler` at most once per effective key of `envelope`.
    ///
    /// - The key is claimed atomically. The first caller runs the handler,
    ///   which gets the [`Lease`] (its `token` fences the handler's own writes);
    ///   the lease is renewed in the background while the handler runs.
    /// - `Ok(v)` is recorded as `COMPLETED` and returned as
    ///   [`Processed::Executed`]; later calls get [`Processed::Replayed`] with
    ///   `v` decoded from the record (or [`IdempotencyError::Duplicate`] under
    ///   [`DuplicatePolicy::Error`]).
    /// - `Err(e)` is recorded as `FAILED` with `e`'s text and returned; the next
    ///   call runs the handler again.
    /// - A panic is recorded as `FAILED` and then resumed.
    /// - While another attempt runs, the call fails with
    ///   [`IdempotencyError::InProgress`] (or waits, under
    ///   [`InProgressPolicy::Wait`]).
    /// - If the store cannot be reached (or the circuit breaker is open) the
    ///   handler does not run and
    ///   [`StoreUnavailable`](IdempotencyError::StoreUnavailable) is
    ///   returned (fail closed), unless
    ///   [`fail_open`](crate::IdempotencyConfigBuilder::fail_open) is on:
    ///   then the handler runs unguarded and its value comes back as
    ///   [`Processed::Executed`].
    pub async fn process<P, T, E, F, Fut>(
        &self,
        envelope: &EventEnvelope<P>,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        P: Serialize,
        T: Serialize + DeserializeOwned,
        E: From<IdempotencyError> + std::fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let request =
            KeyedRequest::from_envelope(envelope, self.inner.config.fingerprint_payloads)?;
        self.process_request(request, handler).await
    }

    /// [`process`](Self::process) for a key-based request: the path the macro,
    /// NATS and HTTP integrations share.
    pub async fn process_request<T, E, F, Fut>(
        &self,
        request: KeyedRequest<'_>,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<IdempotencyError> + std::fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (claimed, durations, key) = match self.claim(&request).await {
            Ok(claimed) => claimed,
            Err(error) if error.is_unavailable() && self.inner.config.fail_open => {
                return self.run_unguarded(&request, &error, handler).await;
            }
            Err(error) => return Err(E::from(error)),
        };
        let lease = match claimed {
            Claimed::Acquired(lease) => lease,
            Claimed::Duplicate(record) => {
                let policy = request
                    .on_duplicate
                    .unwrap_or(self.inner.config.on_duplicate);
                return replay(policy, key, &record).map_err(E::from);
            }
            Claimed::InProgress(record) => {
                return Err(E::from(IdempotencyError::InProgress {
                    key,
                    attempt: record.attempts,
                }));
            }
        };
        let attempt = lease.attempt;
        let held = lease.clone();
        let mut guard = IdempotencyGuard {
            checker: self.clone(),
            state: GuardState::Held(lease.clone()),
            durations,
        };

        let run = AssertUnwindSafe(
            CURRENT_LEASE.scope(lease.clone(), async move { handler(lease).await }),
        )
        .catch_unwind();
        let started = Instant::now();
        let outcome = {
            let heartbeat = guard.heartbeat();
            tokio::pin!(run, heartbeat);
            tokio::select! {
                biased;
                outcome = &mut run => outcome,
                never = &mut heartbeat => match never {},
            }
        };
        handler_latency(started);
        match outcome {
            Ok(Ok(value)) => match storable(&value) {
                Ok(json) => match guard.finish_completed(Some(&json)).await {
                    Ok(()) => {
                        self.remember(&key, &request, attempt, json, durations.ttl);
                        Ok(Processed::Executed(value))
                    }
                    // The side effects happened: report them, and keep
                    // trying to record them. Returning an error would only
                    // invite a redelivery that runs the handler again.
                    Err(e) if may_land_later(&e) => {
                        tracing::warn!(
                            error = %e.redacted(),
                            "the handler ran but the store did not take its completion; retrying it in the background"
                        );
                        self.complete_later(held, Some(json), durations);
                        Ok(Processed::Executed(value))
                    }
                    Err(e) => Err(E::from(e)),
                },
                Err(e) => {
                    // The side effects happened: record the key as done with
                    // no result rather than failed, so it never runs again;
                    // duplicates get `ResultNotStored`, never a made-up value.
                    match guard.finish_completed(None).await {
                        Ok(()) => {}
                        Err(store_error) if may_land_later(&store_error) => {
                            tracing::warn!(error = %store_error.redacted(), "could not record the completed attempt yet; retrying it in the background");
                            self.complete_later(held, None, durations);
                        }
                        Err(store_error) => {
                            tracing::warn!(error = %store_error.redacted(), "could not record the completed attempt");
                        }
                    }
                    Err(E::from(IdempotencyError::Serialization(e)))
                }
            },
            Ok(Err(error)) => {
                if let Err(store_error) = guard.finish_failed(&error.to_string()).await {
                    tracing::warn!(error = %store_error.redacted(), "could not record the failed attempt; its lease will expire");
                }
                Err(error)
            }
            Err(panic) => {
                if let Err(store_error) = guard.finish_failed("handler panicked").await {
                    tracing::warn!(error = %store_error.redacted(), "could not record the panicked attempt; its lease will expire");
                }
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl IdempotencyChecker {
    /// Fail open: the claim failed with the store unavailable, so run the
    /// handler with no record at all (see
    /// [`IdempotencyConfigBuilder::fail_open`](crate::IdempotencyConfigBuilder::fail_open)).
    async fn run_unguarded<T, E, F, Fut>(
        &self,
        request: &KeyedRequest<'_>,
        cause: &IdempotencyError,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        E: From<IdempotencyError>,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let storage = self.storage_key(request.key)?;
        bump(&self.inner.counters.fail_open);
        // No key or payload at warn level: raw keys may be personal data.
        tracing::warn!(
            error = %cause.redacted(),
            circuit_open = cause.is_circuit_open(),
            event_type = request.event_type,
            "store unavailable: running the handler unguarded (fail_open); a redelivery will run it again"
        );
        tracing::debug!(key = %storage, "unguarded run");
        let lease_for = request
            .in_progress_timeout
            .unwrap_or(self.inner.config.in_progress_timeout);
        let now = Utc::now();
        let lease = Lease {
            key: storage,
            token: new_token(),
            attempt: 0,
            expires_at: chrono::TimeDelta::from_std(lease_for)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(now),
            taken_over: false,
        };
        let started = Instant::now();
        let value = CURRENT_LEASE
            .scope(lease.clone(), async move { handler(lease).await })
            .await;
        handler_latency(started);
        value.map(Processed::Executed)
    }

    /// Puts this process's own completion into the local replay cache, as
    /// the record the store now holds.
    fn remember(
        &self,
        key: &str,
        request: &KeyedRequest<'_>,
        attempt: u32,
        result: serde_json::Value,
        ttl: Duration,
    ) {
        let Some(cache) = &self.inner.cache else {
            return;
        };
        // A retry without a fingerprint may complete a record that carries
        // an earlier attempt's fingerprint, which this process does not know:
        // leave such a record to be cached from the store's answer.
        if request.fingerprint.is_none() && attempt > 1 {
            return;
        }
        let record =
            IdempotencyRecord::completed(result, attempt, request.fingerprint.clone(), Utc::now());
        cache.put(key, record, Some(ttl));
    }
}

/// A write for an attempt, retried in the background.
enum LateWrite {
    /// Complete with this result (`None`: it could not be stored).
    Complete(Option<serde_json::Value>),
    /// Fail the attempt (a claim whose outcome is unknown).
    Fail,
}

/// Whether a write that failed with `error` may succeed if tried again
/// later: the store was unavailable (or the breaker open), or it refused
/// the write for lack of memory, which frees up as records expire.
fn may_land_later(error: &IdempotencyError) -> bool {
    error.is_unavailable()
        || matches!(
            error,
            IdempotencyError::StoreRefused {
                reason: crate::error::StoreRefusal::OutOfMemory,
                ..
            }
        )
}

/// Results nested deeper than this are refused: `serde_json` would not read
/// them back (its limit is 128), so they could never be replayed.
const MAX_RESULT_DEPTH: usize = 100;

fn json_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A handler's result as the JSON to store, if it can be stored and replayed.
fn storable<T: Serialize + ?Sized>(
    value: &T,
) -> std::result::Result<serde_json::Value, serde_json::Error> {
    let json = serde_json::to_value(value)?;
    if json_depth(&json) > MAX_RESULT_DEPTH {
        return Err(serde::ser::Error::custom(format!(
            "the result nests deeper than {MAX_RESULT_DEPTH} levels and could not be replayed"
        )));
    }
    Ok(json)
}

/// The first attempt's result, or [`IdempotencyError::ResultNotStored`]
/// when the record holds none (the result could not be stored).
fn stored_result(key: &str, record: &IdempotencyRecord) -> Result<serde_json::Value> {
    record
        .result
        .clone()
        .ok_or_else(|| IdempotencyError::ResultNotStored {
            key: key.to_owned(),
            reason: "the first attempt's result could not be serialized to JSON, \
                     or nested deeper than the limit"
                .to_owned(),
        })
}

fn replay<T: DeserializeOwned>(
    policy: DuplicatePolicy,
    key: String,
    record: &IdempotencyRecord,
) -> Result<Processed<T>> {
    match policy {
        DuplicatePolicy::Error => Err(IdempotencyError::Duplicate {
            key,
            cached_result: record.result.clone(),
        }),
        DuplicatePolicy::Replay => {
            let value = stored_result(&key, record)?;
            Ok(Processed::Replayed(serde_json::from_value(value)?))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Durations {
    ttl: Duration,
    lease: Duration,
}

impl Claimed {
    fn name(&self) -> &'static str {
        match self {
            Self::Acquired(_) => "acquired",
            Self::Duplicate(_) => "duplicate",
            Self::InProgress(_) => "in_progress",
        }
    }
}

#[derive(Debug)]
enum GuardState {
    Held(Lease),
    Duplicate(IdempotencyRecord),
    InProgress(IdempotencyRecord),
    Finished,
}

/// The manual guard: Rust's answer to a context manager.
///
/// Get one from [`IdempotencyChecker::guard`]. If it holds the key, do the
/// work and call [`complete`](Self::complete) or [`fail`](Self::fail). A guard
/// dropped while holding the key (an early return, `?`, a panic, a cancelled
/// task) records the attempt as `FAILED` in the background, so the next
/// delivery retries. If it does not hold the key,
/// [`is_duplicate`](Self::is_duplicate) is true and
/// [`cached_result`](Self::cached_result) has the first attempt's result once
/// it completed.
///
/// The guard does not renew its lease by itself: finish within
/// `in_progress_timeout`, or call [`renew`](Self::renew).
///
/// ```
/// use idempotency_core::{EventEnvelope, IdempotencyChecker, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idempotency_core::IdempotencyError> {
/// let checker = IdempotencyChecker::new(MemoryStore::new());
/// let event = EventEnvelope::new("user.signed_up", serde_json::json!({"user": 7}));
///
/// let guard = checker.guard(&event).await?;
/// if guard.is_duplicate() {
///     let earlier: Option<u32> = guard.cached_result()?;
///     println!("already handled: {earlier:?}");
/// } else {
///     let welcome_mail_id = 42u32; // ... the side effect ...
///     guard.complete(&welcome_mail_id).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a guard dropped while holding its key records the attempt as failed"]
pub struct IdempotencyGuard {
    checker: IdempotencyChecker,
    state: GuardState,
    durations: Durations,
}

impl IdempotencyGuard {
    /// Whether another attempt already has this key (completed or running),
    /// so this caller must not do the work.
    pub fn is_duplicate(&self) -> bool {
        matches!(
            self.state,
            GuardState::Duplicate(_) | GuardState::InProgress(_)
        )
    }

    /// Whether the key is held by another attempt that is still running.
    pub fn is_in_progress(&self) -> bool {
        matches!(self.state, GuardState::InProgress(_))
    }

    /// The first attempt's result, when the key was already `COMPLETED`.
    pub fn cached_result<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match &self.state {
            GuardState::Duplicate(record) => {
                let value = stored_result(&record.idempotency_key, record)?;
                Ok(Some(serde_json::from_value(value)?))
            }
            _ => Ok(None),
        }
    }

    /// The record found by the claim when this caller did not get the key.
    pub fn record(&self) -> Option<&IdempotencyRecord> {
        match &self.state {
            GuardState::Duplicate(record) | GuardState::InProgress(record) => Some(record),
            _ => None,
        }
    }

    /// The lease, when this caller holds the key.
    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            GuardState::Held(lease) => Some(lease),
            _ => None,
        }
    }

    fn held(&self) -> Result<&Lease> {
        match &self.state {
            GuardState::Held(lease) => Ok(lease),
            GuardState::Duplicate(r) | GuardState::InProgress(r) => {
                Err(IdempotencyError::LeaseLost {
                    key: r.idempotency_key.clone(),
                })
            }
            GuardState::Finished => Err(IdempotencyError::LeaseLost { key: String::new() }),
        }
    }

    /// Extends the lease by `in_progress_timeout` from now.
    pub async fn renew(&mut self) -> Result<()> {
        let lease = self.held()?;
        let store = &self.checker.inner.store;
        let started = Instant::now();
        let renewed = store
            .renew(lease, self.durations.lease)
            .instrument(tracing::debug_span!("idempotency.renew", key = %lease.key))
            .await;
        store_latency("renew", started);
        self.checker.observe(&renewed);
        let renewed = self.checker.count_store_error(renewed)?;
        self.state = GuardState::Held(renewed);
        Ok(())
    }

    /// Records `result` as the key's result. Fails with
    /// [`IdempotencyError::LeaseLost`] if this caller does not hold the key
    /// (anymore).
    pub async fn complete<T: Serialize + ?Sized>(mut self, result: &T) -> Result<()> {
        let value = storable(result)?;
        self.finish_completed(Some(&value)).await
    }

    /// Records the attempt as `FAILED` with `error`, so the next delivery retries.
    pub async fn fail(mut self, error: &str) -> Result<()> {
        self.finish_failed(error).await
    }

    async fn finish_completed(&mut self, value: Option<&serde_json::Value>) -> Result<()> {
        let result = self
            .checker
            .complete(self.held()?, value, self.durations.ttl)
            .await;
        self.state = GuardState::Finished;
        result
    }

    async fn finish_failed(&mut self, error: &str) -> Result<()> {
        let result = self
            .checker
            .fail(self.held()?, error, self.durations.ttl)
            .await;
        self.state = GuardState::Finished;
        result
    }

    /// Renews the lease every third of the lease until dropped (sooner after
    /// a failed renewal). Never returns. The lease is copied only when a
    /// renewal replaces it, so a short handler costs no copy.
    fn heartbeat(&self) -> impl Future<Output = Infallible> + '_ {
        let checker = &self.checker;
        let lease_duration = self.durations.lease;
        async move {
            let Some(lease) = self.lease() else {
                return std::future::pending().await;
            };
            let mut lease = std::borrow::Cow::Borrowed(lease);
            let every = (lease_duration / 3).max(Duration::from_millis(1));
            let mut pause = every;
            loop {
                tokio::time::sleep(pause).await;
                let started = Instant::now();
                let renewed = checker
                    .inner
                    .store
                    .renew(&lease, lease_duration)
                    .instrument(tracing::debug_span!("idempotency.renew", key = %lease.key))
                    .await;
                store_latency("renew", started);
                checker.observe(&renewed);
                match renewed {
                    Ok(renewed) => {
                        lease = std::borrow::Cow::Owned(renewed);
                        pause = every;
                    }
                    Err(IdempotencyError::LeaseLost { .. }) => {
                        tracing::warn!(
                            attempt = lease.attempt,
                            "lease lost while the handler runs; its completion will be refused"
                        );
                        return std::future::pending().await;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error.redacted(), "could not renew the lease; trying again soon");
                        pause = (every / 4).max(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

impl Drop for IdempotencyGuard {
    fn drop(&mut self) {
        let GuardState::Held(lease) = std::mem::replace(&mut self.state, GuardState::Finished)
        else {
            return;
        };
        let checker = self.checker.clone();
        let ttl = self.durations.ttl;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = checker
                        .fail(&lease, "the attempt was dropped before it completed", ttl)
                        .await;
                });
            }
            Err(_) => tracing::warn!(
                "an idempotency guard was dropped outside a Tokio runtime; its key stays PROCESSING until the lease expires"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::new_token;

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
}

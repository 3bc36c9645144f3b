//! A store wrapper that counts calls and injects faults.

use std::time::Duration;

/// A store wrapper for tests: counts the calls that reach the store, and can
/// make `claim` fail with `StoreUnavailable` *after* applying it, as a
/// timed-out command that still landed does.
#[derive(Debug)]
pub struct Instrumented {
    pub inner: std::sync::Arc<dyn idempotency::SeenSet>,
    pub calls: std::sync::atomic::AtomicUsize,
    /// Calls counted in [`calls`](Self::calls) that have not returned yet.
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub lose_claim_replies: std::sync::atomic::AtomicBool,
    /// How many coming `complete` calls fail with `StoreUnavailable`
    /// without reaching the store.
    pub refuse_completes: std::sync::atomic::AtomicUsize,
    /// While set, every call fails with `StoreUnavailable` without reaching
    /// the store: an outage.
    pub down: std::sync::atomic::AtomicBool,
    /// When set, a claim whose reply is lost also starts an outage
    /// ([`down`](Self::down)), as when the store dies right after applying it.
    pub outage_after_lost_claim: std::sync::atomic::AtomicBool,
    /// While set, claims answer with a `Protocol` error (a reply of a shape
    /// the store did not expect) without reaching the store.
    pub answer_unexpectedly: std::sync::atomic::AtomicBool,
    /// When set, the `complete` calls refused by
    /// [`refuse_completes`](Self::refuse_completes) fail with
    /// `StoreRefused(OutOfMemory)`, as a full Redis answers, instead of
    /// `StoreUnavailable`.
    pub completes_out_of_memory: std::sync::atomic::AtomicBool,
}

impl Instrumented {
    pub fn new(inner: std::sync::Arc<dyn idempotency::SeenSet>) -> Self {
        Self {
            inner,
            calls: Default::default(),
            in_flight: Default::default(),
            lose_claim_replies: Default::default(),
            refuse_completes: Default::default(),
            down: Default::default(),
            outage_after_lost_claim: Default::default(),
            answer_unexpectedly: Default::default(),
            completes_out_of_memory: Default::default(),
        }
    }

    /// Counts a call; it is in flight until the returned guard drops.
    fn count(&self) -> InFlight<'_> {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(&self.in_flight)
    }

    /// `Err(StoreUnavailable)` while [`down`](Self::down) is set.
    fn up(&self) -> idempotency::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the store is down",
            ));
        }
        Ok(())
    }
}

/// One call in flight, until dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl idempotency::IdempotencyStore for Instrumented {
    fn name(&self) -> &'static str {
        "instrumented"
    }
    async fn claim(
        &self,
        request: &idempotency::ClaimRequest<'_>,
    ) -> idempotency::Result<idempotency::ClaimOutcome> {
        let _in_flight = self.count();
        self.up()?;
        if self
            .answer_unexpectedly
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(idempotency::IdempotencyError::protocol(
                "instrumented",
                "a reply of an unexpected shape",
            ));
        }
        let outcome = self.inner.claim(request).await?;
        if self
            .lose_claim_replies
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            if self
                .outage_after_lost_claim
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                self.down.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the reply was lost after the claim was applied",
            ));
        }
        Ok(outcome)
    }
    async fn renew(
        &self,
        lease: &idempotency::Lease,
        d: Duration,
    ) -> idempotency::Result<idempotency::Lease> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.renew(lease, d).await
    }
    async fn complete(
        &self,
        lease: &idempotency::Lease,
        result: Option<&idempotency::ResultJson<'_>>,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        let _in_flight = self.count();
        self.up()?;
        let refused = self.refuse_completes.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if refused.is_ok()
            && self
                .completes_out_of_memory
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(idempotency::IdempotencyError::store_refused(
                "instrumented",
                idempotency::StoreRefusal::OutOfMemory,
                "OOM command not allowed when used memory > 'maxmemory'",
            ));
        }
        if refused.is_ok() {
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the store did not answer the completion",
            ));
        }
        self.inner.complete(lease, result, ttl).await
    }
    async fn fail(
        &self,
        lease: &idempotency::Lease,
        error: &str,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.fail(lease, error, ttl).await
    }
    async fn get(&self, key: &str) -> idempotency::Result<Option<idempotency::IdempotencyRecord>> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> idempotency::Result<bool> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.delete(key).await
    }
    async fn health(&self) -> idempotency::Result<()> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.health().await
    }
}

#[async_trait::async_trait]
impl idempotency::SeenSet for Instrumented {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> idempotency::Result<Vec<bool>> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.mark(keys, ttl).await
    }
    async fn contains(&self, keys: &[&str]) -> idempotency::Result<Vec<bool>> {
        let _in_flight = self.count();
        self.up()?;
        self.inner.contains(keys).await
    }
}

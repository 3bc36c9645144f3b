//! The checker's circuit breaker: stop calling a store that keeps failing.
//!
//! ```text
//! CLOSED ──N consecutive StoreUnavailable──> OPEN ──cool-down over──> HALF-OPEN
//!   ^                                         ^                           │
//!   └──────────── the probe succeeds ─────────┼───────────────────────────┤
//!                                             └── the probe fails ────────┘
//! ```
//!
//! - Closed: every call goes to the store. The hot path is one atomic load
//!   before the call and one after it.
//! - Open: gated calls fail at once with
//!   [`CircuitOpen`](crate::IdempotencyError::CircuitOpen) without touching
//!   the store.
//! - Half-open: once the cool-down is over, exactly one call (the probe)
//!   goes through; the others keep failing fast. Its success closes the
//!   breaker; its failure re-opens it for twice the last cool-down, up to
//!   [`CircuitBreakerConfig::max_open_for`](crate::CircuitBreakerConfig::max_open_for).
//!
//! Only [`StoreUnavailable`](crate::IdempotencyError::StoreUnavailable)
//! counts as a failure: any other answer (a record, `LeaseLost`, a corrupt
//! value) proves the store is reachable.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The checker's circuit breaker (see
/// [`IdempotencyConfigBuilder::circuit_breaker`](crate::IdempotencyConfigBuilder::circuit_breaker)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// How many consecutive `StoreUnavailable` answers open the breaker.
    /// Default 5.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe call may test the
    /// store. Default 2s.
    pub open_for: Duration,
    /// The longest cool-down: each failed probe doubles the last one, up to
    /// this. 30s, or `open_for` when that is longer.
    pub max_open_for: Duration,
}

/// The cap on a growing cool-down, unless `open_for` itself is longer.
const MAX_OPEN_FOR: Duration = Duration::from_secs(30);

impl CircuitBreakerConfig {
    pub(crate) fn new(failure_threshold: u32, open_for: Duration) -> Self {
        Self {
            failure_threshold,
            open_for,
            max_open_for: open_for.max(MAX_OPEN_FOR),
        }
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self::new(5, Duration::from_secs(2))
    }
}

/// Where the checker's circuit breaker is (see
/// [`IdempotencyChecker::circuit_state`](crate::IdempotencyChecker::circuit_state)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go to the store (also the state of a checker without a breaker).
    Closed,
    /// The store failed repeatedly: calls fail fast until the cool-down is over.
    Open,
    /// The cool-down is over and one probe call is testing the store.
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// A state change reported by [`Permit::record`], for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Closed → open: the failure threshold was reached.
    Opened {
        /// How long calls now fail fast.
        open_for: Duration,
    },
    /// Half-open → open: the probe failed.
    Reopened {
        /// How long calls now fail fast.
        open_for: Duration,
    },
    /// Half-open → closed: the probe succeeded.
    Closed,
}

/// A call refused by the open breaker; the checker turns it into
/// [`IdempotencyError::CircuitOpen`](crate::IdempotencyError::CircuitOpen).
#[derive(Debug)]
pub(crate) struct CircuitOpen {
    /// When the next probe may go, if none is in flight.
    pub(crate) retry_in: Option<Duration>,
}

#[derive(Debug)]
struct Timing {
    /// The end of the current cool-down.
    until: Instant,
    /// The length of the current (or next) cool-down.
    open_for: Duration,
    /// Whether a probe call is out.
    probing: bool,
}

/// The breaker itself; one per checker.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: CircuitBreakerConfig,
    state: AtomicU8,
    failures: AtomicU32,
    timing: Mutex<Timing>,
}

/// The right to make one store call, and the duty to report its outcome.
///
/// A probe permit dropped without [`record`](Self::record) (its call was
/// cancelled) hands the probe to the next caller.
#[derive(Debug)]
#[must_use]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Breaker {
    pub(crate) fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            timing: Mutex::new(Timing {
                until: Instant::now(),
                open_for: config.open_for,
                probing: false,
            }),
        }
    }

    fn timing(&self) -> MutexGuard<'_, Timing> {
        // Nothing panics while holding the lock; if something did, the
        // timing fields are still consistent on their own.
        self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the breaker is.
    pub(crate) fn state(&self) -> CircuitState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// Asks to make a gated store call: `Err` while the breaker is open (or
    /// half-open with the probe out).
    pub(crate) fn admit(&self) -> Result<Permit<'_>, CircuitOpen> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(self.unchecked());
        }
        self.admit_slow()
    }

    #[cold]
    fn admit_slow(&self) -> Result<Permit<'_>, CircuitOpen> {
        let mut timing = self.timing();
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(self.unchecked());
        }
        if timing.probing {
            return Err(CircuitOpen { retry_in: None });
        }
        let now = Instant::now();
        if now < timing.until {
            return Err(CircuitOpen {
                retry_in: Some(timing.until - now),
            });
        }
        timing.probing = true;
        self.state.store(HALF_OPEN, Ordering::Release);
        Ok(Permit {
            breaker: self,
            probe: true,
        })
    }

    /// A permit for a call that is never refused (writes on behalf of an
    /// attempt whose handler already ran): its outcome still counts while
    /// the breaker is closed.
    pub(crate) fn unchecked(&self) -> Permit<'_> {
        Permit {
            breaker: self,
            probe: false,
        }
    }

    fn on_failure(&self) -> Option<Transition> {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures < self.config.failure_threshold || self.state.load(Ordering::Acquire) != CLOSED
        {
            return None;
        }
        let mut timing = self.timing();
        if self.state.load(Ordering::Acquire) != CLOSED {
            return None;
        }
        timing.open_for = self.config.open_for;
        timing.until = Instant::now() + timing.open_for;
        self.failures.store(0, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        Some(Transition::Opened {
            open_for: timing.open_for,
        })
    }

    fn on_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn probe_done(&self, failed: bool) -> Transition {
        let mut timing = self.timing();
        timing.probing = false;
        if failed {
            timing.open_for = (timing.open_for * 2).min(self.config.max_open_for);
            timing.until = Instant::now() + timing.open_for;
            self.state.store(OPEN, Ordering::Release);
            Transition::Reopened {
                open_for: timing.open_for,
            }
        } else {
            timing.open_for = self.config.open_for;
            self.failures.store(0, Ordering::Release);
            self.state.store(CLOSED, Ordering::Release);
            Transition::Closed
        }
    }
}

impl Permit<'_> {
    /// Reports the call's outcome (`unavailable`: it failed with
    /// `StoreUnavailable`); returns the state change it caused, if any.
    pub(crate) fn record(mut self, unavailable: bool) -> Option<Transition> {
        if std::mem::take(&mut self.probe) {
            return Some(self.breaker.probe_done(unavailable));
        }
        if unavailable {
            self.breaker.on_failure()
        } else {
            self.breaker.on_success();
            None
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            // The probe was cancelled before it answered: let the next call
            // probe instead (the cool-down is already over).
            let mut timing = self.breaker.timing();
            timing.probing = false;
            self.breaker.state.store(OPEN, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> Breaker {
        Breaker::new(CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_ms),
            max_open_for: Duration::from_millis(open_ms * 3),
        })
    }

    fn fail(b: &Breaker) -> Option<Transition> {
        b.admit().expect("admitted").record(true)
    }

    fn succeed(b: &Breaker) -> Option<Transition> {
        b.admit().expect("admitted").record(false)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_of_consecutive_failures() {
        let b = breaker(3, 1000);
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), None);
        // A success in between resets the count.
        assert_eq!(succeed(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(
            fail(&b),
            Some(Transition::Opened {
                open_for: Duration::from_millis(1000)
            })
        );
        assert_eq!(b.state(), CircuitState::Open);
        let refused = b.admit().expect_err("open");
        assert_eq!(refused.retry_in, Some(Duration::from_millis(1000)));
        let error = crate::IdempotencyError::CircuitOpen {
            store: "memory",
            retry_in: refused.retry_in,
        };
        assert!(error.is_circuit_open() && error.is_unavailable());
        assert!(
            error.to_string().contains("circuit breaker") && error.to_string().contains("1000ms"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through_and_its_success_closes() {
        let b = breaker(1, 1000);
        assert!(fail(&b).is_some());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.admit().is_err(), "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.admit().expect("the probe");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        for _ in 0..10 {
            let refused = b.admit().expect_err("others fail fast");
            assert_eq!(refused.retry_in, None);
        }
        assert_eq!(probe.record(false), Some(Transition::Closed));
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(succeed(&b), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let b = breaker(1, 100);
        assert!(fail(&b).is_some());
        for expected in [200, 300, 300] {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(
                fail(&b),
                Some(Transition::Reopened {
                    open_for: Duration::from_millis(expected)
                })
            );
            assert_eq!(b.state(), CircuitState::Open);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(succeed(&b), Some(Transition::Closed));
        // Closing resets the cool-down to its base length.
        assert_eq!(
            fail(&b),
            Some(Transition::Opened {
                open_for: Duration::from_millis(100)
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_hands_the_probe_on() {
        let b = breaker(1, 100);
        assert!(fail(&b).is_some());
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(b.admit().expect("probe"));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(succeed(&b), Some(Transition::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn unchecked_calls_count_only_while_closed() {
        let b = breaker(2, 100);
        assert_eq!(b.unchecked().record(true), None);
        assert!(b.unchecked().record(true).is_some(), "opens");
        // While open, their outcomes change nothing.
        assert_eq!(b.unchecked().record(false), None);
        assert_eq!(b.unchecked().record(true), None);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.admit().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_get_one_probe() {
        let b = std::sync::Arc::new(breaker(1, 1));
        assert!(fail(&b).is_some());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let probes = std::sync::Arc::new(AtomicU32::new(0));
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let asked = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (b, probes, barrier, asked) =
                    (b.clone(), probes.clone(), barrier.clone(), asked.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let admitted = b.admit();
                    if admitted.is_ok() {
                        probes.fetch_add(1, Ordering::SeqCst);
                    }
                    // The probe stays out until every task has asked.
                    asked.wait().await;
                    if let Ok(permit) = admitted {
                        let _ = permit.record(true);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }
}

//! What every transport adapter's consume loop needs besides the
//! [`Runner`](super::Runner): running messages as tasks with bounded
//! concurrency ([`run_bounded`]) and the redelivery delay of a
//! [`Retry`](super::Disposition::Retry) ([`RetryDelays`]).

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};

/// Runs `per_item` for the items of `items` as tasks, at most
/// `concurrency` at a time (at least one), until the stream ends,
/// `shutdown` completes or `per_item` breaks.
///
/// For each item, `per_item` answers:
/// - `Continue(Some(work))`: `work` is spawned as a task (on the current
///   tokio runtime) and holds one of the `concurrency` slots until it ends;
/// - `Continue(None)`: nothing to run for this item (an error the adapter
///   logged and got past); the next item is taken;
/// - `Break(reason)`: stop; `run_bounded` returns `Err(reason)` once the
///   tasks in flight are done.
///
/// An item is taken from the stream only when a slot is free, so a
/// transport that pulls on demand never holds more items than it can run.
///
/// # Shutdown
/// When `shutdown` completes, or the stream ends, or `per_item` breaks, no
/// more items are taken: the stream is dropped at once (no more pulls; a
/// subscription ends), then `run_bounded` waits for every task in flight to
/// finish, so each message taken is carried to its disposition. Items the
/// stream had received but not yielded are not handled: the transport
/// redelivers them (unacked) or, for a transport without redelivery, they
/// are lost, as they would be on any stop.
///
/// # Panics in tasks
/// A task that panics is logged at `ERROR` and counted as done: the panic
/// is not propagated, the slot is freed and the other items go on. Its
/// message was never settled, so a transport with redelivery delivers it
/// again.
///
/// # Example
/// ```
/// use std::ops::ControlFlow;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use idempotency_core::consume::run_bounded;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handled = Arc::new(AtomicUsize::new(0));
/// let items = futures_util::stream::iter(1..=10);
/// let done = run_bounded(items, 4, std::future::pending(), |n: u32| {
///     if n == 0 {
///         return ControlFlow::Break("zero");
///     }
///     let handled = Arc::clone(&handled);
///     ControlFlow::Continue(Some(async move {
///         handled.fetch_add(1, Ordering::Relaxed);
///     }))
/// })
/// .await;
/// assert_eq!(done, Ok(()));
/// assert_eq!(handled.load(Ordering::Relaxed), 10);
/// # }
/// ```
pub async fn run_bounded<S, F, Fut, E>(
    mut items: S,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
    per_item: F,
) -> Result<(), E>
where
    S: Stream + Unpin,
    F: FnMut(S::Item) -> ControlFlow<E, Option<Fut>>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut per_item = per_item;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut outcome = Ok(());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break };
        let next = tokio::select! {
            () = &mut shutdown => break,
            next = items.next() => next,
        };
        let Some(item) = next else { break };
        match per_item(item) {
            ControlFlow::Continue(Some(work)) => {
                // Boxed, and a combinator rather than `async move {
                // work.await; drop(permit) }` (which would store `work` twice:
                // the captured value and the one it awaits). A message's
                // future runs to kilobytes, and tokio moves a task's future
                // whole: into the task when spawned, and its stage again when
                // it finishes. Boxed, each of those moves copies a pointer.
                tasks.spawn(Box::pin(work).map(move |()| drop(permit)));
            }
            ControlFlow::Continue(None) => {}
            ControlFlow::Break(reason) => {
                outcome = Err(reason);
                break;
            }
        }
        while let Some(done) = tasks.try_join_next() {
            log_task_failure(done);
        }
    }
    drop(items);
    while let Some(done) = tasks.join_next().await {
        log_task_failure(done);
    }
    outcome
}

fn log_task_failure(done: Result<(), JoinError>) {
    if let Err(error) = done {
        tracing::error!(
            %error,
            "a message task failed (panicked); its message was not settled and may be redelivered"
        );
    }
}

/// How long to wait before a message given [`Retry`](super::Disposition::Retry)
/// is delivered again: [`busy`](Self::busy) while another attempt holds the
/// key, otherwise a backoff exponential in the delivery count
/// ([`for_delivery`](Self::for_delivery)).
///
/// Defaults: `busy` 1 s, `base` 1 s, `max` 60 s. The fields are public; the
/// struct may grow, so build it from [`Default`] and set what you need:
/// ```
/// use std::time::Duration;
/// use idempotency_core::consume::RetryDelays;
///
/// let mut delays = RetryDelays::default();
/// delays.base = Duration::from_millis(100);
/// assert_eq!(delays.for_delivery(1), Duration::from_millis(100));
/// assert_eq!(delays.for_delivery(3), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryDelays {
    /// The delay while another attempt holds the key
    /// ([`Retry { busy: true, .. }`](super::Disposition::Retry)): not a
    /// failure, so no backoff.
    pub busy: Duration,
    /// The delay after a failure at the first delivery.
    pub base: Duration,
    /// The longest delay after a failure.
    pub max: Duration,
}

impl Default for RetryDelays {
    fn default() -> Self {
        Self {
            busy: Duration::from_secs(1),
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl RetryDelays {
    /// The delay after a failure at the `delivered`-th delivery (counted
    /// from 1, as JetStream does; 0 is taken as 1):
    /// `base × 2^(delivered − 1)`, at most [`max`](Self::max). The exponent
    /// stops growing at 16. A transport that does not count deliveries
    /// (Kafka) counts them in its adapter.
    #[must_use]
    pub fn for_delivery(&self, delivered: u64) -> Duration {
        let exponent = u32::try_from(delivered.saturating_sub(1).min(16)).unwrap_or(16);
        self.base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::{mpsc, oneshot};

    use super::*;

    #[test]
    fn the_first_delivery_waits_base_then_the_delay_doubles_up_to_max() {
        let delays = RetryDelays {
            busy: Duration::from_millis(5),
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(delays.for_delivery(0), Duration::from_millis(100));
        assert_eq!(delays.for_delivery(1), Duration::from_millis(100));
        assert_eq!(delays.for_delivery(2), Duration::from_millis(200));
        assert_eq!(delays.for_delivery(3), Duration::from_millis(400));
        assert_eq!(delays.for_delivery(4), Duration::from_millis(800));
        assert_eq!(delays.for_delivery(5), Duration::from_secs(1));
        assert_eq!(delays.for_delivery(u64::MAX), Duration::from_secs(1));
        assert_eq!(delays.busy, Duration::from_millis(5));
    }

    #[test]
    fn the_backoff_never_overflows_and_stops_at_max() {
        let delays = RetryDelays {
            base: Duration::MAX,
            ..RetryDelays::default()
        };
        assert_eq!(delays.for_delivery(40), Duration::from_secs(60));
        let uncapped = RetryDelays {
            base: Duration::from_secs(1),
            max: Duration::MAX,
            ..RetryDelays::default()
        };
        // The exponent stops at 16.
        assert_eq!(uncapped.for_delivery(17), Duration::from_secs(1 << 16));
        assert_eq!(uncapped.for_delivery(100), Duration::from_secs(1 << 16));
    }

    #[test]
    fn the_defaults_are_one_second_and_a_minute() {
        let delays = RetryDelays::default();
        assert_eq!(delays.busy, Duration::from_secs(1));
        assert_eq!(delays.for_delivery(1), Duration::from_secs(1));
        assert_eq!(delays.for_delivery(7), Duration::from_secs(60));
    }

    /// Tracks tasks in flight and the most seen at once.
    #[derive(Default)]
    struct InFlight {
        now: AtomicUsize,
        max: AtomicUsize,
        done: AtomicUsize,
    }

    impl InFlight {
        fn enter(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
        }

        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.done.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A task for the tests below: counts itself in flight, says it started,
    /// and ends only when the test adds a permit to `gate`.
    fn gated(
        flight: &Arc<InFlight>,
        gate: &Arc<Semaphore>,
        started: &mpsc::UnboundedSender<()>,
    ) -> impl Future<Output = ()> + Send + use<> {
        let (flight, gate, started) = (Arc::clone(flight), Arc::clone(gate), started.clone());
        async move {
            flight.enter();
            let _ = started.send(());
            gate.acquire().await.expect("never closed").forget();
            flight.leave();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_more_than_concurrency_tasks_run_at_once() {
        const CONCURRENCY: usize = 3;
        const ITEMS: usize = 20;
        let flight = Arc::new(InFlight::default());
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let taken = AtomicUsize::new(0);
        let run = run_bounded(
            futures_util::stream::iter(0..ITEMS),
            CONCURRENCY,
            std::future::pending(),
            |_| {
                // A task still counted in flight still holds its slot, so
                // an item taken now finds fewer than CONCURRENCY in flight.
                let taken = taken.fetch_add(1, Ordering::SeqCst);
                let unfinished = taken - flight.done.load(Ordering::SeqCst);
                assert!(
                    unfinished < CONCURRENCY,
                    "item taken with {unfinished} in flight"
                );
                ControlFlow::<(), _>::Continue(Some(gated(&flight, &gate, &started_tx)))
            },
        );
        let drive = async {
            // Fill every slot, then free one at a time: each freed slot
            // takes exactly one more item.
            for _ in 0..CONCURRENCY {
                started_rx.recv().await.expect("a task started");
            }
            for _ in CONCURRENCY..ITEMS {
                gate.add_permits(1);
                started_rx.recv().await.expect("a task started");
            }
            gate.add_permits(CONCURRENCY);
        };
        let (outcome, ()) = tokio::join!(run, drive);
        assert_eq!(outcome, Ok(()));
        assert_eq!(taken.load(Ordering::SeqCst), ITEMS);
        assert_eq!(flight.done.load(Ordering::SeqCst), ITEMS);
        assert_eq!(flight.max.load(Ordering::SeqCst), CONCURRENCY);
    }

    // Paused time: the runtime's clock moves only when every task waits, so
    // the timeout below proves `run_bounded` waits for its tasks without
    // sleeping.
    #[tokio::test(start_paused = true)]
    async fn shutdown_takes_no_more_items_and_waits_for_those_in_flight() {
        const CONCURRENCY: usize = 2;
        let flight = Arc::new(InFlight::default());
        let gate = Arc::new(Semaphore::new(0));
        let taken = Arc::new(AtomicUsize::new(0));
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let mut run = tokio::spawn({
            let (flight, gate, taken) =
                (Arc::clone(&flight), Arc::clone(&gate), Arc::clone(&taken));
            async move {
                run_bounded(
                    futures_util::stream::iter(0..100),
                    CONCURRENCY,
                    async {
                        let _ = shutdown_rx.await;
                    },
                    move |_| {
                        taken.fetch_add(1, Ordering::SeqCst);
                        ControlFlow::<(), _>::Continue(Some(gated(&flight, &gate, &started_tx)))
                    },
                )
                .await
            }
        });
        for _ in 0..CONCURRENCY {
            started_rx.recv().await.expect("a task started");
        }
        // Every slot is held: the loop waits for one, and sees the shutdown.
        shutdown_tx.send(()).expect("run_bounded is running");
        let waited = tokio::time::timeout(Duration::from_secs(60), &mut run).await;
        assert!(waited.is_err(), "returned with tasks in flight");
        assert_eq!(flight.done.load(Ordering::SeqCst), 0);
        gate.add_permits(CONCURRENCY);
        let finished = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("a task outside the slots still waits");
        assert_eq!(finished.expect("no panic"), Ok(()));
        assert_eq!(
            taken.load(Ordering::SeqCst),
            CONCURRENCY,
            "took items after shutdown"
        );
        assert_eq!(flight.done.load(Ordering::SeqCst), CONCURRENCY);
    }

    #[tokio::test]
    async fn a_break_stops_and_returns_its_reason_after_the_tasks_in_flight() {
        let flight = Arc::new(InFlight::default());
        let outcome = run_bounded(
            futures_util::stream::iter(0..10),
            4,
            std::future::pending(),
            |n| {
                if n == 3 {
                    return ControlFlow::Break(n);
                }
                let flight = Arc::clone(&flight);
                ControlFlow::Continue((n % 2 == 0).then_some(async move {
                    flight.enter();
                    tokio::task::yield_now().await;
                    flight.leave();
                }))
            },
        )
        .await;
        assert_eq!(outcome, Err(3));
        // Items 0 and 2 ran (1 had nothing to run); all finished.
        assert_eq!(flight.done.load(Ordering::SeqCst), 2);
        assert_eq!(flight.now.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_is_logged_and_the_others_go_on() {
        let done = Arc::new(AtomicUsize::new(0));
        let outcome = run_bounded(
            futures_util::stream::iter(0..5),
            1,
            std::future::pending(),
            |n| {
                let done = Arc::clone(&done);
                ControlFlow::<(), _>::Continue(Some(async move {
                    assert_ne!(n, 2, "task 2 panics");
                    done.fetch_add(1, Ordering::SeqCst);
                }))
            },
        )
        .await;
        assert_eq!(outcome, Ok(()));
        assert_eq!(done.load(Ordering::SeqCst), 4);
    }
}

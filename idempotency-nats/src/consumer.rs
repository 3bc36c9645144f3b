//! [`JetStreamWorker`]: a pull consumer run under the checker.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use idempotency_core::IdempotencyChecker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::handler::{Disposition, EventHandler, Mode, Runner, decode};

/// What a worker did with the messages it pulled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsStats {
    /// Messages acked: handled now, or duplicates of handled events.
    pub acked: u64,
    /// Messages nak'd after a handler error or a store outage, for redelivery.
    pub retried: u64,
    /// Messages nak'd because another worker held their key.
    pub busy: u64,
    /// Messages terminated because they can never succeed (key reused with
    /// another payload, invalid key, unstorable result).
    pub rejected: u64,
    /// Messages terminated because their body is not a valid envelope (or
    /// lacks the relay's key fields).
    pub poison: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    acked: AtomicU64,
    retried: AtomicU64,
    busy: AtomicU64,
    rejected: AtomicU64,
    poison: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> NatsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NatsStats {
            acked: get(&self.acked),
            retried: get(&self.retried),
            busy: get(&self.busy),
            rejected: get(&self.rejected),
            poison: get(&self.poison),
        }
    }

    pub(crate) fn poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }
}

/// Delays for nak: `busy` while another worker holds the key; otherwise
/// `base × 2^(delivered − 1)`, at most `max`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delays {
    pub(crate) busy: Duration,
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Default for Delays {
    fn default() -> Self {
        Self {
            busy: Duration::from_secs(1),
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Delays {
    fn backoff(&self, delivered: i64) -> Duration {
        let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
        self.base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max)
    }
}

/// Acks, naks or terms a message according to its disposition.
pub(crate) async fn settle(
    message: &Message,
    disposition: Disposition,
    delays: Delays,
    counters: &Counters,
) {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let (kind, counter) = match disposition {
        Disposition::Done { .. } => (AckKind::Ack, &counters.acked),
        Disposition::Retry { busy: true, .. } => (AckKind::Nak(Some(delays.busy)), &counters.busy),
        Disposition::Retry {
            busy: false,
            reason,
        } => {
            tracing::warn!(subject = %message.subject, delivered, %reason, "handler failed; the message will be redelivered");
            (
                AckKind::Nak(Some(delays.backoff(delivered))),
                &counters.retried,
            )
        }
        Disposition::Reject { reason } => {
            tracing::warn!(subject = %message.subject, %reason, "terminating a message that can never succeed");
            (AckKind::Term, &counters.rejected)
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(%error, "could not acknowledge a message; it will be redelivered");
    }
}

/// Terminates a message whose body cannot be handled, with a log line.
pub(crate) async fn terminate_poison(message: &Message, reason: &str, counters: &Counters) {
    tracing::warn!(subject = %message.subject, %reason, "terminating a poison message");
    counters.poison();
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "could not terminate a poison message");
    }
}

/// Runs `work` while sending a progress ack every `every`, so a long
/// handler does not reach the consumer's ack wait.
pub(crate) async fn with_progress<F: Future>(
    message: &Message,
    every: Duration,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    let start = tokio::time::Instant::now() + every;
    let mut ticker = tokio::time::interval_at(start, every.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            biased;
            output = &mut work => return output,
            _ = ticker.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "could not send a progress ack");
                }
            }
        }
    }
}

/// The pull loop shared by the worker and the relay.
pub(crate) async fn drive<F, Fut>(
    consumer: &PullConsumer,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
    per_message: F,
) -> Result<(), async_nats::Error>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let messages = consumer
        .stream()
        .max_messages_per_batch(concurrency.max(1))
        .messages()
        .await?;
    bounded(messages, concurrency, shutdown, |next| match next {
        Ok(message) => Some(per_message(message)),
        Err(error) => {
            tracing::warn!(%error, "pulling messages failed; retrying");
            None
        }
    })
    .await
}

/// Runs `per_item` for the items of `items` as tasks, at most `concurrency`
/// at a time, until the stream ends or `shutdown` completes; then stops
/// receiving (drops the stream: no more pulls, the subscription ends) and
/// waits for the tasks in flight. Shared by every NATS integration.
pub(crate) async fn bounded<S, F, Fut>(
    mut items: S,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
    per_item: F,
) -> Result<(), async_nats::Error>
where
    S: futures_util::Stream + Unpin,
    F: Fn(S::Item) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit?,
        };
        let next = tokio::select! {
            () = &mut shutdown => break,
            next = items.next() => next,
        };
        let Some(item) = next else { break };
        if let Some(work) = per_item(item) {
            tasks.spawn(async move {
                work.await;
                drop(permit);
            });
        }
        while let Some(done) = tasks.try_join_next() {
            log_task_failure(done);
        }
    }
    drop(items);
    while let Some(done) = tasks.join_next().await {
        log_task_failure(done);
    }
    Ok(())
}

fn log_task_failure(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done {
        tracing::error!(%error, "a message task failed (panicked); a JetStream message will be redelivered");
    }
}

/// Runs a handler over a JetStream pull consumer, exactly once per key.
///
/// - a completed or duplicate event is acked;
/// - a handler error or a store outage is nak'd with a delay growing with the
///   delivery count (`retry_delay`), so JetStream redelivers it;
/// - while another worker holds the key, the message is nak'd with `busy_delay`;
/// - a body that is not an envelope is terminated (poison) and counted;
/// - a key reused with another payload is terminated;
/// - while a handler runs longer than half the consumer's ack wait, progress
///   acks keep the message from being redelivered.
///
/// `run` stops pulling when `shutdown` completes, lets in-flight messages
/// finish, and returns what it did.
#[derive(Debug)]
#[must_use]
pub struct JetStreamWorker {
    consumer: PullConsumer,
    concurrency: usize,
    delays: Delays,
}

impl JetStreamWorker {
    /// A worker over `consumer` (explicit acks), 16 messages in flight.
    pub fn new(consumer: PullConsumer) -> Self {
        Self {
            consumer,
            concurrency: 16,
            delays: Delays::default(),
        }
    }

    /// How many messages are handled at once (default 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Nak delay after a failure: `base × 2^(deliveries − 1)`, at most `max`
    /// (default 1s and 60s).
    pub fn retry_delay(mut self, base: Duration, max: Duration) -> Self {
        self.delays.base = base;
        self.delays.max = max;
        self
    }

    /// Nak delay while another worker holds the key (default 1s).
    pub fn busy_delay(mut self, delay: Duration) -> Self {
        self.delays.busy = delay;
        self
    }

    /// Runs `handler` under `checker` until `shutdown` completes.
    pub async fn run<P, H>(
        self,
        checker: IdempotencyChecker,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<NatsStats, async_nats::Error>
    where
        P: Serialize + DeserializeOwned + Send + 'static,
        H: EventHandler<P>,
    {
        self.work(Runner::new(Mode::Checked(checker), handler), shutdown)
            .await
    }

    /// Runs a handler that guards itself (an `#[idempotent]` function) until
    /// `shutdown` completes. Return [`IdempotencyError`](idempotency_core::IdempotencyError)
    /// as the error type for precise acks; other error types are treated as
    /// handler failures (nak with backoff).
    pub async fn run_idempotent<P, H>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<NatsStats, async_nats::Error>
    where
        P: Serialize + DeserializeOwned + Send + 'static,
        H: EventHandler<P>,
    {
        self.work(Runner::new(Mode::SelfGuarded, handler), shutdown)
            .await
    }

    async fn work<P, H>(
        self,
        runner: Arc<Runner<P, H>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<NatsStats, async_nats::Error>
    where
        P: Serialize + DeserializeOwned + Send + 'static,
        H: EventHandler<P>,
    {
        let counters = Arc::new(Counters::default());
        let progress_every = self.consumer.cached_info().config.ack_wait / 2;
        let delays = self.delays;
        drive(&self.consumer, self.concurrency, shutdown, |message| {
            let (runner, counters) = (Arc::clone(&runner), Arc::clone(&counters));
            async move {
                let envelope = match decode::<P>(&message.payload, message.headers.as_ref()) {
                    Ok(envelope) => envelope,
                    Err(reason) => return terminate_poison(&message, &reason, &counters).await,
                };
                let disposition =
                    with_progress(&message, progress_every, runner.run(envelope)).await;
                settle(&message, disposition, delays, &counters).await;
            }
        })
        .await?;
        Ok(counters.snapshot())
    }
}

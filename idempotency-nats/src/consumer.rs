//! [`JetStreamWorker`]: a pull consumer run under the checker.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use idempotency_core::consume::{Disposition, EventHandler, RetryDelays, Runner, run_bounded};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a worker did with the messages it pulled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Messages acked: handled now, or duplicates of handled events.
    pub acked: u64,
    /// Messages nak'd after a handler error or a store outage, for redelivery.
    pub retried: u64,
    /// Messages nak'd because another worker held their key.
    pub busy: u64,
    /// Messages terminated because they can never succeed (key reused with
    /// another payload, invalid key, unstorable result).
    pub rejected: u64,
    /// Messages terminated because their body is not a valid envelope, or
    /// gives no key (no `idempotency_key` nor `event_id`, an empty key, or
    /// the relay's key fields missing).
    pub poison: u64,
}

/// Why a [`JetStreamWorker`] or a [`DedupRelay`](crate::DedupRelay)
/// stopped before its shutdown signal. Messages in flight were finished
/// first; `stats` says what was done until then.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerError {
    /// The durable consumer no longer exists on the server: it was deleted
    /// (by an operator, or by its `inactive_threshold`), or its whole stream
    /// was. Nothing more can be pulled from it. The worker does not recreate
    /// it (a consumer deleted on purpose should stay deleted, and a new one
    /// may start from another position): recreate the consumer, or the
    /// stream, and start a new worker; copies of events already handled are
    /// replayed as duplicates by the checker.
    ConsumerDeleted {
        /// The stream the consumer belonged to.
        stream: String,
        /// The consumer's name.
        consumer: String,
        /// What the worker did before it stopped.
        stats: WorkerStats,
    },
    /// Pulling failed for good: the pull could not be started, or the
    /// server ended it (a push consumer, a pull over the consumer's limits).
    Pull {
        /// The stream the consumer belongs to.
        stream: String,
        /// The consumer's name.
        consumer: String,
        /// What the worker did before it stopped.
        stats: WorkerStats,
        /// The client's error.
        source: async_nats::Error,
    },
}

impl WorkerError {
    /// What the worker did before it stopped.
    pub fn stats(&self) -> WorkerStats {
        match self {
            Self::ConsumerDeleted { stats, .. } | Self::Pull { stats, .. } => *stats,
        }
    }
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConsumerDeleted {
                stream, consumer, ..
            } => write!(
                f,
                "the JetStream consumer `{consumer}` of stream `{stream}` no longer exists \
                 (it or its stream was deleted)"
            ),
            Self::Pull {
                stream,
                consumer,
                source,
                ..
            } => write!(
                f,
                "pulling from the JetStream consumer `{consumer}` of stream `{stream}` failed: {source}"
            ),
        }
    }
}

impl std::error::Error for WorkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Pull { source, .. } => Some(source.as_ref()),
            Self::ConsumerDeleted { .. } => None,
        }
    }
}

/// Why a pull loop ended before its shutdown signal.
#[derive(Debug)]
pub(crate) enum Stopped {
    Deleted,
    Pull(async_nats::Error),
}

impl Stopped {
    /// The public error, logged at `ERROR`.
    pub(crate) fn into_error(self, consumer: &PullConsumer, stats: WorkerStats) -> WorkerError {
        let info = consumer.cached_info();
        let (stream, consumer) = (info.stream_name.clone(), info.name.clone());
        let error = match self {
            Self::Deleted => WorkerError::ConsumerDeleted {
                stream,
                consumer,
                stats,
            },
            Self::Pull(source) => WorkerError::Pull {
                stream,
                consumer,
                stats,
                source,
            },
        };
        tracing::error!(%error, "the JetStream worker stopped");
        error
    }
}

/// The default [`JetStreamWorker::concurrency`].
const DEFAULT_CONCURRENCY: usize = 64;
/// The default [`JetStreamWorker::heartbeat`].
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// The shortest heartbeat asked of the server.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub(crate) struct Counters {
    acked: AtomicU64,
    retried: AtomicU64,
    busy: AtomicU64,
    rejected: AtomicU64,
    poison: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            acked: get(&self.acked),
            retried: get(&self.retried),
            busy: get(&self.busy),
            rejected: get(&self.rejected),
            poison: get(&self.poison),
        }
    }
}

/// Acks, naks or terms a message according to its disposition: ack for
/// [`Ack`](Disposition::Ack); nak with `busy` or the backoff delay for
/// [`Retry`](Disposition::Retry); term for [`Reject`](Disposition::Reject)
/// (counted as poison when the message was unreadable). Dispositions added
/// later are nak'd with backoff: never dropped.
///
/// Called only once the outcome is recorded. The ack is sent without waiting
/// for the server's confirmation (no double ack): if it is lost, JetStream
/// redelivers the message after the ack wait, and the record answers the
/// copy as a duplicate, which is acked again.
pub(crate) async fn settle(
    message: &Message,
    disposition: Disposition,
    delays: RetryDelays,
    counters: &Counters,
) {
    // JetStream counts deliveries from 1.
    let delivered = || {
        message
            .info()
            .map_or(1, |info| u64::try_from(info.delivered).unwrap_or(1))
    };
    let (kind, counter) = match disposition {
        Disposition::Ack { .. } => (AckKind::Ack, &counters.acked),
        Disposition::Retry { busy: true, .. } => (AckKind::Nak(Some(delays.busy)), &counters.busy),
        Disposition::Reject { poison, reason } => {
            let (what, counter) = if poison {
                ("terminating a poison message", &counters.poison)
            } else {
                (
                    "terminating a message that can never succeed",
                    &counters.rejected,
                )
            };
            tracing::warn!(subject = %message.subject, %reason, "{what}");
            (AckKind::Term, counter)
        }
        other => {
            let reason = match other {
                Disposition::Retry { reason, .. } => reason,
                other => format!("{other:?}"),
            };
            let delivered = delivered();
            tracing::warn!(subject = %message.subject, delivered, %reason, "handler failed; the message will be redelivered");
            (
                AckKind::Nak(Some(delays.for_delivery(delivered))),
                &counters.retried,
            )
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(%error, "could not acknowledge a message; it will be redelivered");
    }
}

/// Runs `work` while sending a progress ack every `every`, so a long
/// handler does not reach the consumer's ack wait.
///
/// `work` is pinned by the caller (`std::pin::pin!`): taken by value, the
/// handler's future would be stored twice in this one (as the argument and
/// as the pinned local), and the message task, moved whole when it is
/// spawned, would be twice as large.
pub(crate) async fn with_progress<F: Future>(
    message: &Message,
    every: Duration,
    mut work: Pin<&mut F>,
) -> F::Output {
    // One timer on the task's own stack (an `Interval` would box one per
    // message), armed only once `work` has had to wait.
    let period = every.max(Duration::from_millis(10));
    let ticker = tokio::time::sleep(every);
    tokio::pin!(ticker);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return output,
            () = &mut ticker => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "could not send a progress ack");
                }
                let next = ticker.deadline() + period;
                ticker.as_mut().reset(next);
            }
        }
    }
}

/// The pull loop shared by the worker and the relay: pulls with an idle
/// heartbeat, so a consumer or stream deleted under it is noticed (the
/// server's `409 Consumer Deleted`, or two missed heartbeats and a consumer
/// info request that finds nothing) and the loop stops with the reason
/// instead of waiting forever. Other pull errors (the server restarting, a
/// lost connection) are logged and pulling goes on.
pub(crate) async fn drive<F, Fut>(
    consumer: &PullConsumer,
    concurrency: usize,
    heartbeat: Duration,
    shutdown: impl Future<Output = ()>,
    per_message: F,
) -> Result<(), Stopped>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let messages = consumer
        .stream()
        .max_messages_per_batch(pull_batch(concurrency, consumer))
        .heartbeat(heartbeat.max(MIN_HEARTBEAT))
        .messages()
        .await
        .map_err(|e| Stopped::Pull(e.into()))?;
    let shared = Arc::new(consumer.clone());
    let checked = messages.then(move |next| {
        let consumer = Arc::clone(&shared);
        async move {
            match next {
                Ok(message) => Ok(message),
                Err(error) => Err(check_pull_error(&consumer, error).await),
            }
        }
    });
    run_bounded(
        std::pin::pin!(checked),
        concurrency,
        shutdown,
        |next| match next {
            Ok(message) => ControlFlow::Continue(Some(per_message(message))),
            Err(None) => ControlFlow::Continue(None),
            Err(Some(stopped)) => ControlFlow::Break(stopped),
        },
    )
    .await
}

/// Messages asked for per pull request: one per task slot, at most the
/// consumer's `max_batch` (a pull asking for more is refused by the server
/// with `409 Exceeded MaxRequestBatch`, which would stop the worker). The
/// client asks for the next batch when half of the last one has been taken,
/// so the pull is continuous and at most about one and a half batches wait
/// on the client, their ack wait running.
fn pull_batch(concurrency: usize, consumer: &PullConsumer) -> usize {
    let batch = concurrency.max(1);
    match usize::try_from(consumer.cached_info().config.max_batch) {
        Ok(max_batch) if max_batch > 0 => batch.min(max_batch),
        _ => batch,
    }
}

/// Whether a pull error ends the loop: `Some` reason when it does, `None`
/// (logged) when pulling can go on.
async fn check_pull_error(consumer: &PullConsumer, error: MessagesError) -> Option<Stopped> {
    match error.kind() {
        MessagesErrorKind::ConsumerDeleted => return Some(Stopped::Deleted),
        MessagesErrorKind::PushBasedConsumer | MessagesErrorKind::RequestLimitExceeded => {
            return Some(Stopped::Pull(error.into()));
        }
        _ => {}
    }
    // A missed heartbeat or a failed pull: the server may be restarting, or
    // the consumer may be gone. Ask.
    match consumer.get_info().await {
        Err(info_error)
            if matches!(
                info_error.kind(),
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
            ) =>
        {
            Some(Stopped::Deleted)
        }
        _ => {
            tracing::warn!(%error, "pulling messages failed; retrying");
            None
        }
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
/// - a body that is not an envelope, or an envelope with no key (neither
///   `idempotency_key` nor `event_id`, or an empty key), is terminated as
///   poison with the reason logged;
///
/// A message is acked only after its outcome (completed, failed, duplicate)
/// is recorded; the ack is not confirmed by the server (a lost ack means a
/// redelivery, which the record answers as a duplicate). The worker pulls
/// continuously, one pull request per [`concurrency`](Self::concurrency)
/// messages (at most the consumer's `max_batch`), the next one sent when
/// half of the last has arrived, so a free slot rarely waits for the server.
///
/// `run` stops pulling when `shutdown` completes, lets in-flight messages
/// finish, and returns what it did. If the consumer or its stream is deleted
/// under it, `run` logs at `ERROR` and returns
/// [`WorkerError::ConsumerDeleted`] within about two
/// [`heartbeat`](Self::heartbeat)s.
#[derive(Debug)]
#[must_use]
pub struct JetStreamWorker {
    consumer: PullConsumer,
    concurrency: usize,
    delays: RetryDelays,
    heartbeat: Duration,
}

impl JetStreamWorker {
    /// A worker over `consumer` (explicit acks), 64 messages in flight.
    pub fn new(consumer: PullConsumer) -> Self {
        Self {
            consumer,
            concurrency: DEFAULT_CONCURRENCY,
            delays: RetryDelays::default(),
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }

    /// How often the server signals an idle pull (default 5 s, at least
    /// 100 ms, at most 15 s). Two missed heartbeats make the worker ask
    /// whether its consumer still exists; a deleted consumer or stream ends
    /// `run` with [`WorkerError::ConsumerDeleted`].
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// How many messages are handled at once (default 64). Each message in
    /// flight waits on the store for two round trips (claim, complete) besides
    /// its handler, so throughput grows with concurrency until the store or
    /// the handler's downstream is saturated: with a no-op handler and a
    /// local Redis, 64 handled about 20% more messages per second than 16.
    /// Lower it when the handler's downstream takes fewer parallel calls;
    /// above the consumer's `max_ack_pending` the server delivers no more.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Nak delay after a failure: `base × 2^(deliveries − 1)`, at most `max`
    /// (default 1s and 60s; see
    /// [`RetryDelays::for_delivery`](idempotency_core::consume::RetryDelays::for_delivery)).
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

    /// Runs `runner` ([`Runner::new`]: a handler under a checker;
    /// [`Runner::self_guarded`]: an `#[idempotent]` function) until
    /// `shutdown` completes.
    pub async fn run<P, H>(
        self,
        runner: Runner<P, H>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerStats, WorkerError>
    where
        P: Serialize + DeserializeOwned + Send + 'static,
        H: EventHandler<P>,
    {
        let counters = Arc::new(Counters::default());
        let progress_every = self.consumer.cached_info().config.ack_wait / 2;
        let delays = self.delays;
        let pulled = drive(
            &self.consumer,
            self.concurrency,
            self.heartbeat,
            shutdown,
            |message| {
                let (runner, counters) = (runner.clone(), Arc::clone(&counters));
                async move {
                    let disposition =
                        match crate::delivery(&message.payload, message.headers.as_ref()) {
                            Ok(delivery) => {
                                let work = std::pin::pin!(runner.consume(delivery));
                                with_progress(&message, progress_every, work).await
                            }
                            Err(error) => error.into(),
                        };
                    settle(&message, disposition, delays, &counters).await;
                }
            },
        )
        .await;
        match pulled {
            Ok(()) => Ok(counters.snapshot()),
            Err(stopped) => Err(stopped.into_error(&self.consumer, counters.snapshot())),
        }
    }
}

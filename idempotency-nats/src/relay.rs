//! [`DedupRelay`]: stream → unique events → output stream.

use std::future::Future;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, Message};
use idempotency_core::consume::{self, Disposition, HandlerError, RetryDelays};
use idempotency_core::{IdempotencyChecker, IdempotencyError, KeyExtractor, KeyedRequest};

use crate::NATS_MSG_ID;
use crate::consumer::{
    Counters, DEFAULT_HEARTBEAT, WorkerError, WorkerStats, drive, settle, with_progress,
};

/// Relays the first copy of every event from a JetStream consumer to an
/// output subject, dropping duplicates.
///
/// For each input message: claim its key; if new, publish it to the output
/// with `Nats-Msg-Id` set to the key and wait for the stream's ack; only then
/// complete the claim and ack the input. If the publish fails the claim is
/// marked failed and the input nak'd, so the event is retried, never lost. A
/// crash between the publish and the completion makes the retry publish again,
/// and the output stream's duplicate window (keep it longer than the lease)
/// drops the second copy. Duplicates are acked and dropped.
///
/// Messages are named by a [`KeyExtractor`], the same key builder as the
/// [`Deduplicator`](idempotency_core::Deduplicator)'s:
/// [`KeyExtractor::IdempotencyKey`] takes the `Idempotency-Key` header (any
/// casing), else the body's `idempotency_key`, else its `event_id`;
/// [`KeyExtractor::Fields`], [`ContentHash`](KeyExtractor::ContentHash) and
/// [`Custom`](KeyExtractor::Custom) read the whole body as the event (see
/// [`KeyExtractor::key_of_document`]), and a long derived key is hashed. A
/// message that gives no key (not JSON, a missing field, no key at all, an
/// empty key) is terminated as poison with the reason logged.
#[derive(Debug)]
#[must_use]
pub struct DedupRelay {
    consumer: PullConsumer,
    jetstream: jetstream::Context,
    output_subject: String,
    extractor: KeyExtractor,
    concurrency: usize,
    delays: RetryDelays,
    heartbeat: std::time::Duration,
}

impl DedupRelay {
    /// A relay from `consumer` to `output_subject` (published through
    /// `jetstream`), naming events by `extractor`.
    pub fn new(
        consumer: PullConsumer,
        jetstream: jetstream::Context,
        output_subject: impl Into<String>,
        extractor: KeyExtractor,
    ) -> Self {
        Self {
            consumer,
            jetstream,
            output_subject: output_subject.into(),
            extractor,
            concurrency: 16,
            delays: RetryDelays::default(),
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }

    /// How often the server signals an idle pull (default 5 s, at least
    /// 100 ms, at most 15 s). As for [`JetStreamWorker::heartbeat`](crate::JetStreamWorker::heartbeat):
    /// a deleted input consumer or stream ends `run` with
    /// [`WorkerError::ConsumerDeleted`].
    pub fn heartbeat(mut self, heartbeat: std::time::Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// How many messages are relayed at once (default 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Nak delay after a failed publish: `base × 2^(deliveries − 1)`, at most
    /// `max` (default 1s and 60s).
    pub fn retry_delay(mut self, base: std::time::Duration, max: std::time::Duration) -> Self {
        self.delays.base = base;
        self.delays.max = max;
        self
    }

    /// Nak delay while another relay instance holds the key (default 1s).
    pub fn busy_delay(mut self, delay: std::time::Duration) -> Self {
        self.delays.busy = delay;
        self
    }

    /// Relays until `shutdown` completes, then lets in-flight messages
    /// finish. Stops early, logging at `ERROR`, when the input consumer or
    /// its stream is deleted ([`WorkerError::ConsumerDeleted`]).
    pub async fn run(
        self,
        checker: IdempotencyChecker,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerStats, WorkerError> {
        let counters = Arc::new(Counters::default());
        let shared = Arc::new((checker, self.jetstream, self.output_subject, self.extractor));
        let progress_every = self.consumer.cached_info().config.ack_wait / 2;
        let delays = self.delays;
        let pulled = drive(
            &self.consumer,
            self.concurrency,
            self.heartbeat,
            shutdown,
            |message| {
                let (shared, counters) = (Arc::clone(&shared), Arc::clone(&counters));
                async move {
                    let (checker, jetstream, output, extractor) = &*shared;
                    let key = crate::delivery(&message.payload, message.headers.as_ref())
                        .and_then(|delivery| delivery.key_by(extractor));
                    let disposition = match key {
                        Ok(key) => {
                            let relayed = std::pin::pin!(relay_one(
                                checker, jetstream, output, &key, &message
                            ));
                            with_progress(&message, progress_every, relayed).await
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

/// Why a relay attempt did not complete.
#[derive(Debug)]
enum RelayError {
    Idempotency(IdempotencyError),
    Publish(async_nats::Error),
}

impl From<IdempotencyError> for RelayError {
    fn from(error: IdempotencyError) -> Self {
        Self::Idempotency(error)
    }
}

impl HandlerError for RelayError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Idempotency(e) => e.disposition(),
            Self::Publish(e) => Disposition::retry(e.to_string()),
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idempotency(e) => e.fmt(f),
            Self::Publish(e) => write!(f, "publishing to the output failed: {e}"),
        }
    }
}

async fn relay_one(
    checker: &IdempotencyChecker,
    jetstream: &jetstream::Context,
    output: &str,
    key: &str,
    message: &Message,
) -> Disposition {
    let request = KeyedRequest::new(key).event_type("relay");
    consume::process(checker, request, |_lease| async {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MSG_ID, key);
        let ack = jetstream
            .publish_with_headers(output.to_owned(), headers, message.payload.clone())
            .await
            .map_err(|e| RelayError::Publish(e.into()))?
            .await
            .map_err(|e| RelayError::Publish(e.into()))?;
        Ok::<_, RelayError>(ack.sequence)
    })
    .await
}

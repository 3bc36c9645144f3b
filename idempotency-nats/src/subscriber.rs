//! [`Subscriber`]: core NATS subscriptions (optionally in a queue group) and
//! request/reply under the checker.

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use idempotency_core::consume::{Disposition, EventHandler, Runner, run_bounded};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The header set on error replies: `in_progress`, `failed`, `rejected` or
/// `invalid` (the body was not an envelope, or it had no key).
pub const STATUS_HEADER: &str = "Idempotency-Status";

/// What a subscriber did with the messages it received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// Messages whose handler completed now or earlier (duplicates included).
    pub completed: u64,
    /// Messages that failed or found their key held by another attempt.
    pub failed: u64,
    /// Messages whose body was not an envelope, or had no key.
    pub invalid: u64,
    /// Replies sent to requests.
    pub replies: u64,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    replies: AtomicU64,
}

/// Handles a core NATS subscription: each message body is decoded as an
/// `EventEnvelope<P>` (the `Idempotency-Key` header, when present, is the
/// key), the handler runs once per key, and a request gets the JSON result as
/// its reply, the same reply for every duplicate.
///
/// Core NATS has no redelivery: a failed message is logged and counted, and a
/// request gets an error reply (`{"error": ..}` with an
/// [`Idempotency-Status`](STATUS_HEADER) header) so its sender can retry.
#[derive(Debug)]
#[must_use]
pub struct Subscriber {
    client: Client,
    subject: String,
    queue_group: Option<String>,
    concurrency: usize,
}

impl Subscriber {
    /// A subscriber to `subject`, 16 messages handled at once.
    pub fn new(client: Client, subject: impl Into<String>) -> Self {
        Self {
            client,
            subject: subject.into(),
            queue_group: None,
            concurrency: 16,
        }
    }

    /// Subscribes in a queue group: each message goes to one member.
    pub fn queue_group(mut self, group: impl Into<String>) -> Self {
        self.queue_group = Some(group.into());
        self
    }

    /// How many messages are handled at once (default 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Runs `runner` ([`Runner::new`]: a handler under a checker;
    /// [`Runner::self_guarded`]: an `#[idempotent]` function) until
    /// `shutdown` completes; in-flight messages finish first.
    pub async fn run<P, H>(
        self,
        runner: Runner<P, H>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<SubscriberStats, async_nats::Error>
    where
        P: Serialize + DeserializeOwned + Send + 'static,
        H: EventHandler<P>,
    {
        let subscription = match &self.queue_group {
            Some(group) => {
                self.client
                    .queue_subscribe(self.subject.clone(), group.clone())
                    .await?
            }
            None => self.client.subscribe(self.subject.clone()).await?,
        };
        let counters = Arc::new(Counters::default());
        let Ok(()) = run_bounded::<_, _, _, std::convert::Infallible>(
            subscription,
            self.concurrency,
            shutdown,
            |message| {
                let (runner, counters, client) =
                    (runner.clone(), Arc::clone(&counters), self.client.clone());
                ControlFlow::Continue(Some(async move {
                    handle(&client, &runner, &counters, message).await;
                }))
            },
        )
        .await;
        let _ = self.client.flush().await;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(SubscriberStats {
            completed: get(&counters.completed),
            failed: get(&counters.failed),
            invalid: get(&counters.invalid),
            replies: get(&counters.replies),
        })
    }
}

async fn handle<P, H>(client: &Client, runner: &Runner<P, H>, counters: &Counters, message: Message)
where
    P: Serialize + DeserializeOwned,
    H: EventHandler<P>,
{
    let disposition = match crate::delivery(&message.payload, message.headers.as_ref()) {
        Ok(delivery) => runner.consume(delivery).await,
        Err(error) => error.into(),
    };
    let (reply, status) = match disposition {
        Disposition::Ack { reply } => {
            counters.completed.fetch_add(1, Ordering::Relaxed);
            (Bytes::from(reply), None)
        }
        Disposition::Reject {
            poison: true,
            reason,
        } => {
            tracing::warn!(subject = %message.subject, %reason, "ignoring a message that is not an envelope");
            counters.invalid.fetch_add(1, Ordering::Relaxed);
            (error_body(&reason), Some("invalid"))
        }
        Disposition::Reject {
            poison: false,
            reason,
        } => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subject = %message.subject, %reason, "message rejected");
            (error_body(&reason), Some("rejected"))
        }
        Disposition::Retry { busy, reason } => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subject = %message.subject, %reason, "handler did not complete");
            (
                error_body(&reason),
                Some(if busy { "in_progress" } else { "failed" }),
            )
        }
        other => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let reason = format!("{other:?}");
            tracing::warn!(subject = %message.subject, %reason, "handler did not complete");
            (error_body(&reason), Some("failed"))
        }
    };
    let Some(reply_to) = message.reply else {
        return;
    };
    let sent = match status {
        None => client.publish(reply_to, reply).await,
        Some(status) => {
            let mut headers = HeaderMap::new();
            headers.insert(STATUS_HEADER, status);
            client.publish_with_headers(reply_to, headers, reply).await
        }
    };
    match sent {
        Ok(()) => {
            counters.replies.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => tracing::warn!(%error, "could not send a reply"),
    }
}

fn error_body(reason: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": reason }).to_string())
}

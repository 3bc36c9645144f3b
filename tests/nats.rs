//! `idempotency-nats` against a real `nats-server -js` and a real Redis.

#![cfg(feature = "nats")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer, stream::Stream};
use bytes::Bytes;
use common::{NatsServer, RedisServer, eventually};
use idempotency::nats::{DedupRelay, JetStreamWorker, KeyExtractor, Runner, Subscriber};
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, RecordStatus,
    RedisStore, current_lease,
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Executions per key, counted by handlers.
#[derive(Default)]
struct Executions(Mutex<HashMap<String, usize>>);

impl Executions {
    fn record(&self, key: &str) -> usize {
        let mut map = self.0.lock().expect("lock");
        let n = map.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }
    fn snapshot(&self) -> HashMap<String, usize> {
        self.0.lock().expect("lock").clone()
    }
}

async fn checker(redis: &RedisServer, config: IdempotencyConfig) -> IdempotencyChecker {
    IdempotencyChecker::with_config(
        RedisStore::connect(&redis.url()).await.expect("redis"),
        config,
    )
}

async fn jetstream(nats: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to nats");
    (client.clone(), jetstream::new(client))
}

async fn stream(js: &jetstream::Context, name: &str, subjects: &str) -> Stream {
    js.get_or_create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("stream")
}

async fn consumer(stream: &Stream, name: &str, ack_wait: Duration) -> PullConsumer {
    stream
        .get_or_create_consumer(
            name,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.into()),
                ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .expect("consumer")
}

/// Publishes `body` with its own `Nats-Msg-Id`, waiting for the stream's ack.
async fn publish_all(js: &jetstream::Context, messages: Vec<(String, String, Bytes)>) {
    for chunk in messages.chunks(500) {
        let mut acks = Vec::new();
        for (subject, msg_id, body) in chunk {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            acks.push(
                js.publish_with_headers(subject.clone(), headers, body.clone())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stream ack");
        }
    }
}

fn envelope_json(key: &str, copy: usize) -> Bytes {
    let envelope = EventEnvelope::new("order.placed", json!({"key": key}))
        .with_event_id(format!("{key}-copy-{copy}"))
        .with_idempotency_key(key);
    Bytes::from(serde_json::to_vec(&envelope).expect("json"))
}

/// Sends a request to `subject`, again while the server answers "no
/// responders" (nothing subscribed yet, so nothing was delivered), until a
/// subscriber answers; panics after 10 s.
async fn answered_request(
    client: &async_nats::Client,
    subject: &str,
    request: Bytes,
) -> async_nats::Message {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.request(subject.to_owned(), request.clone()).await {
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered => return answered.expect("a subscriber answers"),
        }
    }
}

async fn drained(consumer: &mut PullConsumer) -> bool {
    let info = consumer.info().await.expect("consumer info");
    info.num_pending == 0 && info.num_ack_pending == 0
}

/// Runs a `JetStreamWorker` on `consumer` whose handler records each
/// event's key in `executions`, until `shutdown`.
fn spawn_recording_worker(
    consumer: PullConsumer,
    checker: IdempotencyChecker,
    executions: &Arc<Executions>,
    shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
) -> tokio::task::JoinHandle<Result<idempotency::nats::WorkerStats, idempotency::nats::WorkerError>>
{
    let seen = Arc::clone(executions);
    tokio::spawn(JetStreamWorker::new(consumer).run(
        Runner::new(checker, move |envelope: EventEnvelope<Value>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.record(envelope.effective_key());
                Ok::<_, IdempotencyError>(())
            }
        }),
        shutdown,
    ))
}

fn shutdown_signal() -> (
    watch::Sender<bool>,
    impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let (tx, rx) = watch::channel(false);
    let make = move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    };
    (tx, make)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_with_duplicates_execute_once_per_key() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "EVENTS", "events.>").await;
    let mut watcher = consumer(&events, "workers", Duration::from_secs(30)).await;

    // 7,000 unique keys; 3,000 extra copies with the same key but their own
    // Nats-Msg-Id, so the server's duplicate window lets them through.
    let mut messages: Vec<(String, String, Bytes)> = (0..7_000)
        .map(|i| {
            (
                "events.orders".to_owned(),
                format!("m-{i}-0"),
                envelope_json(&format!("order-{i}"), 0),
            )
        })
        .collect();
    messages.extend((0..3_000).map(|i| {
        let key = format!("order-{}", (i * 7) % 7_000);
        (
            "events.orders".to_owned(),
            format!("m-{i}-dup"),
            envelope_json(&key, 1),
        )
    }));
    // Interleave duplicates with originals.
    messages.sort_by_key(|(_, id, _)| {
        id.trim_start_matches("m-")
            .split('-')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    });
    publish_all(&js, messages).await;

    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let executions = Arc::new(Executions::default());
    let (stop, shutdown) = shutdown_signal();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let consumer = events
            .get_consumer::<jetstream::consumer::pull::Config>("workers")
            .await
            .expect("consumer");
        let executions = Arc::clone(&executions);
        let worker = JetStreamWorker::new(consumer)
            .concurrency(8)
            .busy_delay(Duration::from_millis(100))
            .run(
                Runner::new(checker.clone(), move |envelope: EventEnvelope<Value>| {
                    let executions = Arc::clone(&executions);
                    async move {
                        executions.record(envelope.effective_key());
                        Ok::<_, IdempotencyError>(envelope.effective_key().len())
                    }
                }),
                shutdown(),
            );
        workers.push(tokio::spawn(worker));
    }
    eventually(Duration::from_secs(120), "all messages acked", async || {
        executions.snapshot().len() == 7_000 && drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let mut acked = 0;
    for worker in workers {
        let stats = worker.await.expect("task").expect("worker");
        assert_eq!(
            stats.poison + stats.rejected + stats.retried,
            0,
            "{stats:?}"
        );
        acked += stats.acked;
    }
    let executions = executions.snapshot();
    assert_eq!(executions.len(), 7_000);
    assert!(
        executions.values().all(|n| *n == 1),
        "a key ran more than once"
    );
    assert_eq!(acked, 10_000, "every message acked once");
    assert!(drained(&mut watcher).await, "nothing pending at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_is_redelivered_and_runs_on_the_third_attempt() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "RETRY", "retry.>").await;
    let mut watcher = consumer(&events, "retry", Duration::from_secs(30)).await;
    publish_all(
        &js,
        vec![("retry.one".into(), "r1".into(), envelope_json("flaky-1", 0))],
    )
    .await;

    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let handler_runs = Arc::clone(&runs);
    let worker = tokio::spawn(
        JetStreamWorker::new(events.get_consumer("retry").await.expect("consumer"))
            .retry_delay(Duration::from_millis(100), Duration::from_secs(1))
            .run(
                Runner::new(checker.clone(), move |_: EventEnvelope<Value>| {
                    let runs = Arc::clone(&handler_runs);
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let attempt = current_lease().map_or(0, |lease| lease.attempt());
                        if attempt < 3 {
                            return Err(format!("downstream timeout on attempt {attempt}"));
                        }
                        Ok(attempt)
                    }
                }),
                shutdown(),
            ),
    );
    eventually(
        Duration::from_secs(20),
        "the third attempt acked",
        async || runs.load(Ordering::SeqCst) >= 3 && drained(&mut watcher).await,
    )
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    assert_eq!((stats.retried, stats.acked), (2, 1), "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let record = checker
        .get_record("flaky-1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.attempts, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_worker_is_taken_over_and_never_completes_twice() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "CRASH", "crash.>").await;
    let mut watcher = consumer(&events, "crash", Duration::from_secs(2)).await;
    publish_all(
        &js,
        vec![("crash.one".into(), "c1".into(), envelope_json("crash-1", 0))],
    )
    .await;
    let config = || {
        IdempotencyConfig::builder()
            .lease("1s")
            .build()
            .expect("config")
    };

    // Worker A runs on its own runtime, which is torn down mid-handler: no
    // completion, no failure record, no renewal, no ack. A crash.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (nats_url, redis_url) = (nats.url(), redis.url());
    let crashed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.spawn(async move {
            let client = async_nats::connect(nats_url).await.expect("nats");
            let stream = jetstream::new(client)
                .get_stream("CRASH")
                .await
                .expect("stream");
            let consumer = stream.get_consumer("crash").await.expect("consumer");
            let store = RedisStore::connect(&redis_url).await.expect("redis");
            let checker = IdempotencyChecker::with_config(store, config());
            let _ = JetStreamWorker::new(consumer)
                .run(
                    Runner::new(checker, move |_: EventEnvelope<Value>| {
                        let started = started_tx.clone();
                        async move {
                            let _ = started.send(());
                            std::future::pending::<()>().await;
                            Ok::<_, IdempotencyError>(())
                        }
                    }),
                    std::future::pending(),
                )
                .await;
        });
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("worker A started the handler");
        runtime.shutdown_background();
    });
    crashed.join().expect("worker A thread");

    // Worker B gets the redelivery after the ack wait and takes the key over.
    let checker = checker(&redis, config()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let handler_runs = Arc::clone(&runs);
    let worker = tokio::spawn(
        JetStreamWorker::new(events.get_consumer("crash").await.expect("consumer"))
            .busy_delay(Duration::from_millis(200))
            .run(
                Runner::new(checker.clone(), move |_: EventEnvelope<Value>| {
                    let runs = Arc::clone(&handler_runs);
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, IdempotencyError>(
                            current_lease().map_or(0, |lease| lease.attempt()),
                        )
                    }
                }),
                shutdown(),
            ),
    );
    eventually(Duration::from_secs(30), "the takeover acked", async || {
        runs.load(Ordering::SeqCst) >= 1 && drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    assert_eq!(stats.acked, 1, "{stats:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "executed once more, by the new worker"
    );
    let record = checker
        .get_record("crash-1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.attempts, 2, "the crashed attempt, then the takeover");
    assert_eq!(record.result, Some(json!(2)));
    assert_eq!(checker.stats().executed, 1);
    assert_eq!(checker.stats().lease_lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_terminated_and_others_flow() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "POISON", "poison.>").await;
    let mut watcher = consumer(&events, "poison", Duration::from_secs(30)).await;
    publish_all(
        &js,
        vec![
            ("poison.x".into(), "p1".into(), envelope_json("good-1", 0)),
            (
                "poison.x".into(),
                "p2".into(),
                Bytes::from_static(b"{not json"),
            ),
            (
                "poison.x".into(),
                "p3".into(),
                Bytes::from_static(b"{\"valid\":\"json, not an envelope\"}"),
            ),
            ("poison.x".into(), "p4".into(), envelope_json("good-2", 0)),
        ],
    )
    .await;
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let executions = Arc::new(Executions::default());
    let (stop, shutdown) = shutdown_signal();
    let worker = spawn_recording_worker(
        events.get_consumer("poison").await.expect("consumer"),
        checker,
        &executions,
        shutdown(),
    );
    eventually(Duration::from_secs(20), "all settled", async || {
        executions.snapshot().len() == 2 && drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    assert_eq!((stats.poison, stats.acked), (2, 2), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_requests_get_identical_replies_and_one_execution() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let handler_runs = Arc::clone(&runs);
    let subscriber = tokio::spawn(Subscriber::new(client.clone(), "rpc.quote").run(
        Runner::new(checker, move |envelope: EventEnvelope<Value>| {
            let runs = Arc::clone(&handler_runs);
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, IdempotencyError>(json!({"quote": envelope.payload["amount"], "run": n}))
            }
        }),
        shutdown(),
    ));

    let request = Bytes::from(
        serde_json::to_vec(
            &EventEnvelope::new("quote.requested", json!({"amount": 42})).with_event_id("q-1"),
        )
        .expect("json"),
    );
    // Sent again until the subscriber has subscribed.
    let first = answered_request(&client, "rpc.quote", request.clone()).await;
    let second = client
        .request("rpc.quote", request)
        .await
        .expect("second reply");
    assert_eq!(first.payload, second.payload);
    let reply: Value = serde_json::from_slice(&first.payload).expect("json reply");
    assert_eq!(reply, json!({"quote": 42, "run": 1}));
    let bad = client
        .request("rpc.quote", Bytes::from_static(b"nope"))
        .await
        .expect("error reply");
    assert_eq!(
        bad.headers
            .as_ref()
            .and_then(|h| h.get("Idempotency-Status"))
            .map(|v| v.as_str()),
        Some("invalid")
    );
    stop.send(true).expect("stop");
    let stats = subscriber.await.expect("task").expect("subscriber");
    assert_eq!((stats.completed, stats.invalid, stats.replies), (2, 1, 3));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_of_three_executes_each_key_once() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let executions = Arc::new(Executions::default());
    // Which members have handled a probe, and how many probes were handled.
    let ready: Arc<[AtomicBool; 3]> = Arc::default();
    let probes = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let mut members = Vec::new();
    for member in 0..3 {
        let member_client = async_nats::connect(nats.url()).await.expect("nats");
        let (seen, ready, probes) = (
            Arc::clone(&executions),
            Arc::clone(&ready),
            Arc::clone(&probes),
        );
        members.push(tokio::spawn(
            Subscriber::new(member_client.clone(), "orders.created")
                .queue_group("workers")
                .run(
                    Runner::new(checker.clone(), move |envelope: EventEnvelope<Value>| {
                        let (seen, ready, probes) =
                            (Arc::clone(&seen), Arc::clone(&ready), Arc::clone(&probes));
                        async move {
                            if envelope.event_type == "probe" {
                                ready[member].store(true, Ordering::SeqCst);
                                probes.fetch_add(1, Ordering::SeqCst);
                            } else {
                                seen.record(envelope.effective_key());
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Ok::<_, IdempotencyError>(())
                        }
                    }),
                    shutdown(),
                ),
        ));
    }
    // Probes (each its own key) until every member has handled one, so all
    // three are subscribed before the events go out.
    let mut probe = 0;
    eventually(
        Duration::from_secs(20),
        "every member subscribed",
        async || {
            probe += 1;
            let envelope = EventEnvelope::new("probe", json!({}))
                .with_idempotency_key(format!("probe-{probe}"));
            client
                .publish(
                    "orders.created",
                    Bytes::from(serde_json::to_vec(&envelope).expect("json")),
                )
                .await
                .expect("publish");
            client.flush().await.expect("flush");
            ready.iter().all(|member| member.load(Ordering::SeqCst))
        },
    )
    .await;
    // 300 keys, each published three times.
    for copy in 0..3 {
        for i in 0..300 {
            client
                .publish("orders.created", envelope_json(&format!("q-{i}"), copy))
                .await
                .expect("publish");
        }
    }
    client.flush().await.expect("flush");
    eventually(Duration::from_secs(20), "every key executed", async || {
        executions.snapshot().len() == 300
    })
    .await;
    // Every copy and every probe delivered has been through the checker
    // once: run, replayed, or turned away as in progress. (A probe counts
    // itself before the checker records it.)
    eventually(Duration::from_secs(20), "every copy answered", async || {
        let stats = checker.stats();
        let answered = stats.executed + stats.replayed + stats.in_progress;
        answered == 900 + probes.load(Ordering::SeqCst) as u64
    })
    .await;
    stop.send(true).expect("stop");
    let mut received = 0;
    for member in members {
        let stats = member.await.expect("task").expect("member");
        received += stats.completed + stats.failed;
    }
    let probes = probes.load(Ordering::SeqCst) as u64;
    assert_eq!(received, 900 + probes, "every copy reached one member");
    assert!(
        executions.snapshot().values().all(|n| *n == 1),
        "a key ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_forwards_each_unique_event_once_even_when_the_output_is_missing() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let raw = stream(&js, "RAW", "raw.>").await;
    let mut watcher = consumer(&raw, "relay", Duration::from_secs(30)).await;
    // 3,500 unique events, plus 1,500 copies with their own message ids.
    let event = |i: usize| {
        Bytes::from(
            json!({"timestamp": 1_700_000_000 + i, "distinct_id": format!("user-{}", i % 97),
                   "token": "tok", "event_name": "page_view", "props": {"i": i}})
            .to_string(),
        )
    };
    let mut messages: Vec<_> = (0..3_500)
        .map(|i| ("raw.events".to_owned(), format!("raw-{i}"), event(i)))
        .collect();
    messages.extend((0..1_500).map(|i| {
        (
            "raw.events".to_owned(),
            format!("raw-{i}-again"),
            event(i * 2),
        )
    }));
    publish_all(&js, messages).await;

    // The output stream does not exist yet: every publish fails.
    let checker = checker(
        &redis,
        IdempotencyConfig::builder()
            .key_prefix("relay:")
            .build()
            .expect("config"),
    )
    .await;
    let (stop, shutdown) = shutdown_signal();
    let strategy = KeyExtractor::fields(["timestamp", "distinct_id", "token", "event_name"]);
    let relay = tokio::spawn(
        DedupRelay::new(
            raw.get_consumer("relay").await.expect("consumer"),
            js.clone(),
            "unique.events",
            strategy,
        )
        .concurrency(32)
        .retry_delay(Duration::from_millis(200), Duration::from_millis(500))
        .run(checker.clone(), shutdown()),
    );
    eventually(
        Duration::from_secs(20),
        "publishes failed while the output was missing",
        async || checker.stats().failed > 0,
    )
    .await;
    assert_eq!(checker.stats().executed, 0);

    let mut unique = stream(&js, "UNIQUE", "unique.>").await;
    eventually(
        Duration::from_secs(60),
        "every unique event relayed",
        async || {
            unique.info().await.expect("info").state.messages == 3_500
                && drained(&mut watcher).await
        },
    )
    .await;
    // Every input is acked on the server; the relay counts each ack as its
    // task ends, and stopping lets tasks in flight finish.
    eventually(
        Duration::from_secs(20),
        "every relay recorded",
        async || checker.stats().executed == 3_500,
    )
    .await;
    stop.send(true).expect("stop");
    let stats = relay.await.expect("task").expect("relay");
    assert_eq!(stats.acked, 5_000, "{stats:?}");
    assert_eq!(stats.poison, 0);
    assert_eq!(
        unique.info().await.expect("info").state.messages,
        3_500,
        "exactly once on the output"
    );
    assert!(drained(&mut watcher).await, "no input left unacked");
    assert_eq!(checker.stats().executed, 3_500);
}

/// An `#[idempotent]` function passed directly to the worker guards itself.
#[idempotency::idempotent(checker = checker, ttl = "1h")]
async fn on_order(
    checker: &IdempotencyChecker,
    seen: &Executions,
    envelope: EventEnvelope<Value>,
) -> Result<String, IdempotencyError> {
    seen.record(envelope.effective_key());
    Ok(format!("handled {}", envelope.effective_key()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_functions_run_directly_and_publish_sets_the_message_id() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let mut events = stream(&js, "MACRO", "macro.>").await;
    let mut watcher = consumer(&events, "macro", Duration::from_secs(30)).await;
    // publish_event sets Nats-Msg-Id from the key: the server drops the
    // second publish of the same event within its duplicate window.
    let event = EventEnvelope::new("order.placed", json!({"n": 1})).with_idempotency_key("macro-1");
    idempotency::nats::publish_event(&js, "macro.orders", &event)
        .await
        .expect("publish");
    idempotency::nats::publish_event(&js, "macro.orders", &event)
        .await
        .expect("publish again");
    assert_eq!(events.info().await.expect("info").state.messages, 1);
    // Copies with their own message ids reach the handler.
    publish_all(
        &js,
        (0..5)
            .map(|copy| {
                (
                    "macro.orders".to_owned(),
                    format!("copy-{copy}"),
                    envelope_json("macro-1", copy),
                )
            })
            .collect(),
    )
    .await;

    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let seen = Arc::new(Executions::default());
    let (stop, shutdown) = shutdown_signal();
    let (handler_checker, handler_seen) = (checker.clone(), Arc::clone(&seen));
    let worker = tokio::spawn(
        JetStreamWorker::new(events.get_consumer("macro").await.expect("consumer"))
            .busy_delay(Duration::from_millis(100))
            .run(
                Runner::self_guarded(move |envelope: EventEnvelope<Value>| {
                    let (checker, seen) = (handler_checker.clone(), Arc::clone(&handler_seen));
                    async move { on_order(&checker, &seen, envelope).await }
                }),
                shutdown(),
            ),
    );
    eventually(Duration::from_secs(20), "all acked", async || {
        drained(&mut watcher).await && !seen.snapshot().is_empty()
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    assert_eq!(stats.acked, 6, "{stats:?}");
    assert_eq!(seen.snapshot()["macro-1"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_acks_keep_a_slow_handler_from_being_redelivered() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "SLOW", "slow.>").await;
    let mut watcher = consumer(&events, "slow", Duration::from_secs(1)).await;
    publish_all(
        &js,
        vec![("slow.one".into(), "s1".into(), envelope_json("slow-1", 0))],
    )
    .await;
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let handler_runs = Arc::clone(&runs);
    let worker = tokio::spawn(
        JetStreamWorker::new(events.get_consumer("slow").await.expect("consumer"))
            .busy_delay(Duration::from_millis(100))
            .run(
                Runner::new(checker, move |_: EventEnvelope<Value>| {
                    let runs = Arc::clone(&handler_runs);
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(3_000)).await;
                        Ok::<_, IdempotencyError>(())
                    }
                }),
                shutdown(),
            ),
    );
    eventually(Duration::from_secs(20), "acked", async || {
        runs.load(Ordering::SeqCst) == 1 && drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    // Three times the ack wait, and JetStream never redelivered it.
    assert_eq!((stats.acked, stats.busy), (1, 0), "{stats:?}");
    assert_eq!(watcher.info().await.expect("info").num_redelivered, 0);
}

// ---------------------------------------------------------------------------
// Edge cases real producers send.

/// Every log line at `WARN` and above, from every test in this binary.
fn captured_logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Capture(&'static Mutex<Vec<u8>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("logs").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_ansi(false)
            .with_writer(move || Capture(logs))
            .init();
        logs
    })
}

/// The captured log lines that mention `needle`, at `level`.
fn log_lines(level: &str, needle: &str) -> Vec<String> {
    let logs = captured_logs().lock().expect("logs");
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|line| line.contains(level) && line.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Publishes one message with extra headers and its own `Nats-Msg-Id`.
async fn publish_with(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) {
    let mut map = HeaderMap::new();
    map.insert("Nats-Msg-Id", msg_id);
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    js.publish_with_headers(subject.to_owned(), map, body.into())
        .await
        .expect("publish")
        .await
        .expect("stream ack");
}

/// Runs a relay from a fresh `IN_<name>` stream (with `messages` published)
/// to `OUT_<name>` until the input is drained; returns the relay's stats and
/// the bodies that reached the output.
async fn relay_until_drained(
    name: &str,
    strategy: KeyExtractor,
    messages: Vec<(Vec<(&str, &str)>, Bytes)>,
) -> (idempotency::nats::WorkerStats, Vec<Value>) {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let input = stream(&js, &format!("IN_{name}"), &format!("in.{name}.>")).await;
    let output = stream(&js, &format!("OUT_{name}"), &format!("out.{name}.>")).await;
    let mut watcher = consumer(&input, "relay", Duration::from_secs(30)).await;
    for (i, (headers, body)) in messages.iter().enumerate() {
        publish_with(
            &js,
            &format!("in.{name}.x"),
            &format!("m-{i}"),
            headers,
            body.clone(),
        )
        .await;
    }
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let (stop, shutdown) = shutdown_signal();
    let relay = tokio::spawn(
        DedupRelay::new(
            input.get_consumer("relay").await.expect("consumer"),
            js.clone(),
            format!("out.{name}.unique"),
            strategy,
        )
        .run(checker, shutdown()),
    );
    eventually(Duration::from_secs(20), "input drained", async || {
        drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = relay.await.expect("task").expect("relay");
    let mut bodies = Vec::new();
    let reader = output
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .expect("reader");
    let batch = reader
        .fetch()
        .max_messages(100)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("fetch");
    futures_util::pin_mut!(batch);
    while let Some(message) = futures_util::StreamExt::next(&mut batch).await {
        let message = message.expect("message");
        bodies.push(serde_json::from_slice(&message.payload).expect("json"));
    }
    (stats, sorted(bodies))
}

/// `values` in the order of their JSON text (relays run concurrently).
fn sorted(mut values: Vec<Value>) -> Vec<Value> {
    values.sort_by_key(Value::to_string);
    values
}

fn body(value: &Value) -> Bytes {
    Bytes::from(value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_distinct_events_whose_fields_contain_the_separator_or_differ_in_type() {
    let events = [
        json!({"distinct_id": "X:Y", "token": "Z"}),
        json!({"distinct_id": "X", "token": "Y:Z"}),
        json!({"distinct_id": 16, "token": "t"}),
        json!({"distinct_id": "16", "token": "t"}),
    ];
    let mut messages: Vec<_> = events.iter().map(|e| (vec![], body(e))).collect();
    // A real duplicate, with its own message id: dropped.
    messages.push((vec![], body(&events[0])));
    let (stats, relayed) = relay_until_drained(
        "SEP",
        KeyExtractor::fields(["distinct_id", "token"]),
        messages,
    )
    .await;
    assert_eq!((stats.acked, stats.poison), (5, 0), "{stats:?}");
    assert_eq!(relayed, sorted(events.to_vec()), "each distinct event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_hashes_derived_keys_longer_than_the_key_limit() {
    let long = json!({"distinct_id": "u".repeat(300), "token": "t"});
    let other = json!({"distinct_id": "v".repeat(300), "token": "t"});
    let (stats, relayed) = relay_until_drained(
        "LONG",
        KeyExtractor::fields(["distinct_id", "token"]),
        vec![
            (vec![], body(&long)),
            (vec![], body(&long)),
            (vec![], body(&other)),
        ],
    )
    .await;
    assert_eq!(
        (stats.acked, stats.poison, stats.rejected),
        (3, 0, 0),
        "{stats:?}"
    );
    assert_eq!(relayed, sorted(vec![long, other]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reads_the_key_header_in_any_casing_and_never_falls_back_from_an_empty_key() {
    let event = |id: &str| json!({"event_id": id, "event_type": "t", "payload": {}});
    let empty_key =
        json!({"event_id": "e3", "idempotency_key": "", "event_type": "t", "payload": {}});
    let keyless = json!({"event_type": "t", "payload": {}});
    let (stats, relayed) = relay_until_drained(
        "HDR",
        KeyExtractor::IdempotencyKey,
        vec![
            (vec![("idempotency-key", "k-1")], body(&event("e1"))),
            (vec![("IDEMPOTENCY-KEY", "k-1")], body(&event("e2"))),
            (vec![], body(&empty_key)),
            (vec![("Idempotency-Key", "")], body(&event("e4"))),
            (vec![], body(&keyless)),
            (vec![], body(&keyless)),
        ],
    )
    .await;
    assert_eq!(relayed.len(), 1, "one key, one event: {relayed:?}");
    assert!(relayed[0]["event_id"] == "e1" || relayed[0]["event_id"] == "e2");
    assert_eq!(
        (stats.acked, stats.poison + stats.rejected),
        (2, 4),
        "{stats:?}"
    );
}

/// Runs a worker over `bodies` (each with its headers) until the input is
/// drained; returns its stats and the executions per effective key.
async fn work_until_drained(
    name: &str,
    messages: Vec<(Vec<(&str, &str)>, Bytes)>,
) -> (idempotency::nats::WorkerStats, HashMap<String, usize>) {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, name, &format!("{}.>", name.to_lowercase())).await;
    let mut watcher = consumer(&events, "worker", Duration::from_secs(30)).await;
    for (i, (headers, body)) in messages.iter().enumerate() {
        let subject = format!("{}.x", name.to_lowercase());
        publish_with(&js, &subject, &format!("m-{i}"), headers, body.clone()).await;
    }
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let executions = Arc::new(Executions::default());
    let (stop, shutdown) = shutdown_signal();
    let worker = spawn_recording_worker(
        events.get_consumer("worker").await.expect("consumer"),
        checker,
        &executions,
        shutdown(),
    );
    eventually(Duration::from_secs(20), "input drained", async || {
        drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker.await.expect("task").expect("worker");
    (stats, executions.snapshot())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reads_the_key_header_in_any_casing() {
    let event = |id: &str| body(&json!({"event_id": id, "event_type": "t", "payload": {}}));
    let (stats, runs) = work_until_drained(
        "CASING",
        vec![
            (vec![("idempotency-key", "k-1")], event("e1")),
            (vec![("IDEMPOTENCY-KEY", "k-1")], event("e2")),
            (vec![("Idempotency-Key", "")], event("e3")),
        ],
    )
    .await;
    assert_eq!(runs, HashMap::from([("k-1".to_owned(), 1)]), "{stats:?}");
    assert_eq!((stats.acked, stats.poison), (2, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_envelopes_are_terminated_as_poison_with_the_reason_logged() {
    captured_logs();
    let keyless = body(&json!({"event_type": "keyless.seen", "payload": {"n": 1}}));
    let (stats, runs) = work_until_drained(
        "KEYLESS",
        vec![(vec![], keyless.clone()), (vec![], keyless)],
    )
    .await;
    assert!(runs.is_empty(), "the handler never ran: {runs:?}");
    assert_eq!((stats.poison, stats.acked), (2, 0), "{stats:?}");
    let logged = log_lines("WARN", "keyless.x");
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(
        logged
            .iter()
            .all(|line| line.contains("no idempotency key and no event id")),
        "{logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_answers_keyless_requests_as_invalid_without_running_the_handler() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop, shutdown) = shutdown_signal();
    let handler_runs = Arc::clone(&runs);
    let subscriber = tokio::spawn(Subscriber::new(client.clone(), "rpc.keyless").run(
        Runner::new(checker, move |_: EventEnvelope<Value>| {
            let runs = Arc::clone(&handler_runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            }
        }),
        shutdown(),
    ));
    let keyless = body(&json!({"event_type": "t", "payload": {}}));
    for _ in 0..2 {
        // The first is sent again until the subscriber has subscribed.
        let reply = answered_request(&client, "rpc.keyless", keyless.clone()).await;
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Idempotency-Status"));
        assert_eq!(status.map(|v| v.as_str()), Some("invalid"));
        let error: Value = serde_json::from_slice(&reply.payload).expect("json");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains("no idempotency key")),
            "{error}"
        );
    }
    stop.send(true).expect("stop");
    let stats = subscriber.await.expect("task").expect("subscriber");
    assert_eq!((stats.invalid, stats.completed), (2, 0), "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Starts a worker on a fresh consumer, waits until it handled a message,
/// runs `delete` on the stream, and returns what `run()` returned (within 10 s).
async fn run_until_deleted(
    name: &str,
    delete: impl AsyncFnOnce(&jetstream::Context, &Stream),
) -> Result<idempotency::nats::WorkerStats, idempotency::nats::WorkerError> {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let subject = name.to_lowercase();
    let events = stream(&js, name, &format!("{subject}.>")).await;
    consumer(&events, &subject, Duration::from_secs(30)).await;
    publish_all(
        &js,
        vec![(
            format!("{subject}.x"),
            "g1".into(),
            envelope_json("gone-1", 0),
        )],
    )
    .await;
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
    let worker = tokio::spawn(
        JetStreamWorker::new(events.get_consumer(&subject).await.expect("consumer"))
            .heartbeat(Duration::from_millis(500))
            .run(
                Runner::new(checker, move |_: EventEnvelope<Value>| {
                    let ran = ran_tx.clone();
                    async move {
                        let _ = ran.send(());
                        Ok::<_, IdempotencyError>(())
                    }
                }),
                std::future::pending(),
            ),
    );
    ran.recv().await.expect("the worker is pulling");
    delete(&js, &events).await;
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("run() returns instead of hanging")
        .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_returns_an_error_when_its_consumer_is_deleted() {
    captured_logs();
    let outcome = run_until_deleted("GONECONSUMER", async |_, events| {
        events
            .delete_consumer("goneconsumer")
            .await
            .expect("delete consumer");
    })
    .await;
    let error = outcome.expect_err("run() reports the lost consumer");
    assert!(
        matches!(&error, idempotency::nats::WorkerError::ConsumerDeleted { consumer, stats, .. }
            if consumer == "goneconsumer" && stats.acked == 1),
        "{error:?}"
    );
    assert!(
        !log_lines("ERROR", "goneconsumer").is_empty(),
        "logged at ERROR"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_returns_an_error_when_its_stream_is_deleted() {
    captured_logs();
    let outcome = run_until_deleted("GONESTREAM", async |js, _| {
        js.delete_stream("GONESTREAM").await.expect("delete stream");
    })
    .await;
    let error = outcome.expect_err("run() reports the lost stream");
    assert!(
        matches!(&error, idempotency::nats::WorkerError::ConsumerDeleted { stream, .. }
            if stream == "GONESTREAM"),
        "{error:?}"
    );
    assert!(
        !log_lines("ERROR", "GONESTREAM").is_empty(),
        "logged at ERROR"
    );
}

/// A built example binary, next to this test's own binary (`cargo test`
/// builds the examples; `cargo build --examples --all-features` does too).
fn example(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().expect("test binary");
    let path = deps
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the examples first (`cargo build --workspace --examples --all-features`)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_example_logs_the_poison_message_it_terminates() {
    let nats = NatsServer::start();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(example("jetstream_consumer"))
            .env("NATS_URL", nats.url())
            .env_remove("REDIS_URL")
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the example stops after 5 s")
    .expect("run the example");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let logs = format!("{stdout}\n{stderr}");
    assert!(
        logs.lines()
            .any(|line| line.contains("WARN") && line.contains("terminating a poison message")),
        "the guide's promised warning is logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_event_refuses_an_envelope_without_a_key() {
    let nats = NatsServer::start();
    let (_client, js) = jetstream(&nats).await;
    let mut events = stream(&js, "NOKEY", "nokey.>").await;
    let keyless: EventEnvelope =
        serde_json::from_value(json!({"event_type": "t", "payload": {}})).expect("parses");
    let error = idempotency::nats::publish_event(&js, "nokey.x", &keyless)
        .await
        .expect_err("no key, no Nats-Msg-Id");
    assert!(
        matches!(
            error.downcast_ref::<IdempotencyError>(),
            Some(IdempotencyError::MissingKey)
        ),
        "{error}"
    );
    assert_eq!(events.info().await.expect("info").state.messages, 0);
}

/// Regression: the worker asked for one pull batch per concurrency slot
/// whatever the consumer's `max_batch`, so a consumer limited below the
/// worker's concurrency refused every pull (`409 Exceeded MaxRequestBatch`)
/// and the worker stopped with `WorkerError::Pull` before handling anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pulls_within_the_consumers_max_batch() {
    let (nats, redis) = (NatsServer::start(), RedisServer::start());
    let (_client, js) = jetstream(&nats).await;
    let events = stream(&js, "SMALLBATCH", "smallbatch.>").await;
    let mut watcher = events
        .get_or_create_consumer(
            "small",
            jetstream::consumer::pull::Config {
                durable_name: Some("small".into()),
                max_batch: 4,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let messages = (0..50)
        .map(|i| {
            (
                "smallbatch.x".to_owned(),
                format!("s-{i}"),
                envelope_json(&format!("small-{i}"), 0),
            )
        })
        .collect();
    publish_all(&js, messages).await;
    let checker = checker(&redis, IdempotencyConfig::default()).await;
    let executions = Arc::new(Executions::default());
    let (stop, shutdown) = shutdown_signal();
    // The default concurrency, far above the consumer's max_batch.
    let worker = spawn_recording_worker(
        events.get_consumer("small").await.expect("consumer"),
        checker,
        &executions,
        shutdown(),
    );
    eventually(Duration::from_secs(20), "input drained", async || {
        worker.is_finished() || drained(&mut watcher).await
    })
    .await;
    stop.send(true).expect("stop");
    let stats = worker
        .await
        .expect("task")
        .expect("the worker kept pulling");
    assert_eq!(stats.acked, 50, "{stats:?}");
    assert_eq!(executions.snapshot().len(), 50);
}

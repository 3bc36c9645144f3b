//! Whole pipelines, what users feel: the `JetStreamWorker` next to a bare
//! async-nats pull consumer on the same stream, and the HTTP layer next to
//! the same axum route without it. Each pair runs in the same run, in
//! alternating rounds.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use axum::Router;
use axum::routing::post;
use futures_util::StreamExt;
use idempotency::{EventEnvelope, IdempotencyChecker, RedisStore};
use idempotency_http::IdempotencyLayer;
use idempotency_nats::{JetStreamWorker, Runner};
use idempotency_test_support::{NatsServer, RedisServer};
use tokio::sync::Notify;

use crate::RESULT;
use crate::compare::{median, ratios};
use crate::problems::{ANOMALIES, ok, problem};
use crate::report::{Report, thousands};
use crate::workload::{Payload, envelope, measure};

/// Messages in the stream; every round consumes all of them.
const MESSAGES: u64 = 4000;
/// Rounds of (bare, worker), alternating which goes first.
const NATS_ROUNDS: usize = 4;
/// Key numbers of the stream's events.
const STREAM_BASE: u64 = 0xb000_0000 << 32;
/// Concurrent HTTP connections (one task each).
const CONNECTIONS: usize = 16;
/// Rounds of (bare route, new keys, replays), in the 6 orders of three.
const HTTP_ROUNDS: usize = 6;
/// One HTTP measurement.
const HTTP_MEASURE: Duration = Duration::from_millis(400);
/// Keys the replay workload cycles through.
const REPLAY_KEYS: usize = 256;

/// Both pipelines; rows and targets into `report`.
pub(crate) async fn pipeline_phases(redis: &RedisServer, started: Instant, report: &mut Report) {
    let progress = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    progress("JetStream: JetStreamWorker and a bare pull consumer");
    jetstream(redis, report).await;
    progress("HTTP: the idempotency layer and the bare route");
    http(redis, report).await;
}

/// A stream `BENCH` on a fresh `nats-server` holding `messages` new events.
async fn bench_stream(nats: &NatsServer, messages: u64) -> stream::Stream {
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to the benchmark's nats-server");
    let js = jetstream::new(client);
    let orders = js
        .get_or_create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            ..Default::default()
        })
        .await
        .expect("create the stream");
    // Publish every event once, acks awaited in batches.
    let mut acks = Vec::new();
    for n in 0..messages {
        let body = serde_json::to_vec(&envelope(STREAM_BASE + n)).expect("an envelope");
        if let Some(ack) = ok(js.publish("bench.orders", body.into()).await) {
            acks.push(ack);
        }
        if acks.len() == 512 || n + 1 == messages {
            for ack in acks.drain(..) {
                ok(ack.await);
            }
        }
    }
    orders
}

/// `IDEMPOTENCY_BENCH_ONLY=spin:worker` (or `spin:bare`): the
/// `JetStreamWorker` (or the bare consumer) alone over `messages` new
/// events, for a profiler.
pub(crate) async fn spin_worker(redis: &RedisServer, messages: u64, bare: bool) -> f64 {
    let nats = NatsServer::start();
    let orders = bench_stream(&nats, messages).await;
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("connect the store to the benchmark's redis-server");
    let consumer = orders
        .create_consumer(pull::Config {
            durable_name: Some("spin".into()),
            ..Default::default()
        })
        .await
        .expect("create a consumer");
    eprintln!("{messages} messages published; pid {}", std::process::id());
    if bare {
        run_bare(consumer, messages).await
    } else {
        run_worker(consumer, &IdempotencyChecker::new(store), messages).await
    }
}

async fn jetstream(redis: &RedisServer, report: &mut Report) {
    let nats = NatsServer::start();
    let orders = bench_stream(&nats, MESSAGES).await;
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("connect the store to the benchmark's redis-server");
    let checker = IdempotencyChecker::new(store);
    let mut inspect = redis.client().await;

    let (mut bare, mut worker) = (Vec::new(), Vec::new());
    for round in 0..NATS_ROUNDS {
        for worker_first in [round % 2 == 1, round % 2 == 0] {
            let name = format!("{}-{round}", if worker_first { "worker" } else { "bare" });
            let consumer = orders
                .create_consumer(pull::Config {
                    durable_name: Some(name),
                    ..Default::default()
                })
                .await
                .expect("create a consumer");
            if worker_first {
                // Every round's events are new to the store.
                let _: Option<redis::Value> =
                    ok(redis::cmd("FLUSHALL").query_async(&mut inspect).await);
                worker.push(run_worker(consumer, &checker, MESSAGES).await);
            } else {
                bare.push(run_bare(consumer, MESSAGES).await);
            }
        }
    }
    let ratio = ratios(&worker, &bare);
    let how =
        format!("{MESSAGES} messages from one stream, median of {NATS_ROUNDS} alternating rounds");
    report.row(
        "pipelines",
        "bare async-nats pull consumer, ack each",
        format!("{} msg/s", thousands(median(&bare))),
        how.clone(),
    );
    report.row(
        "pipelines",
        "JetStreamWorker + RedisStore, default concurrency",
        format!("{} msg/s", thousands(median(&worker))),
        format!("{ratio:.3}x bare; new events, a no-op handler; {how}"),
    );
    report.target(
        "JetStreamWorker (Redis store, default concurrency) >= 0.60x the bare consumer's messages/s",
        format!("{ratio:.3}x"),
        ratio >= 0.6,
    );
}

/// Messages per second of a pull consumer that acks each message, until it
/// has seen the whole stream.
async fn run_bare(consumer: jetstream::consumer::PullConsumer, count: u64) -> f64 {
    let mut messages = consumer.messages().await.expect("pull messages");
    let start = Instant::now();
    let mut seen = 0;
    while seen < count {
        match messages.next().await {
            Some(Ok(message)) => {
                ok(message.ack().await);
                seen += 1;
            }
            Some(Err(e)) => problem(&ANOMALIES, format_args!("bare consumer: {e}")),
            None => break,
        }
    }
    seen as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second of the [`JetStreamWorker`] (default concurrency)
/// running a no-op handler under `checker`, until its handler has run for
/// the whole stream.
async fn run_worker(
    consumer: jetstream::consumer::PullConsumer,
    checker: &IdempotencyChecker,
    messages: u64,
) -> f64 {
    let handled = Arc::new(AtomicU64::new(0));
    let all_done = Arc::new(Notify::new());
    let before = checker.stats();
    let start = Instant::now();
    let handler = {
        let (handled, all_done) = (Arc::clone(&handled), Arc::clone(&all_done));
        move |_event: EventEnvelope<Payload>| {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == messages {
                all_done.notify_one();
            }
            async { Ok::<_, Infallible>(RESULT.to_owned()) }
        }
    };
    let finished = Arc::new(Mutex::new(None));
    let shutdown = {
        let finished = Arc::clone(&finished);
        async move {
            tokio::select! {
                () = all_done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            *finished.lock().unwrap_or_else(PoisonError::into_inner) = Some(start.elapsed());
        }
    };
    ok(JetStreamWorker::new(consumer)
        .run(Runner::new(checker.clone(), handler), shutdown)
        .await);
    let executed = checker.stats().executed - before.executed;
    if executed != messages {
        problem(
            &ANOMALIES,
            format_args!("JetStreamWorker: {executed} of {messages} events executed"),
        );
    }
    let elapsed = finished
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or_else(|| start.elapsed());
    handled.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    /// The route without the layer (no key sent).
    Bare,
    /// The layer, a fresh key per request.
    New,
    /// The layer, keys whose first request completed.
    Replay,
}

async fn http(redis: &RedisServer, report: &mut Report) {
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("connect the store to the benchmark's redis-server");
    let checker = IdempotencyChecker::new(store);
    let route = || post(|| async { axum::Json(serde_json::json!({ "receipt": RESULT })) });
    let bare = serve(Router::new().route("/orders", route())).await;
    let guarded = serve(Router::new().route(
        "/orders",
        route().route_layer(IdempotencyLayer::new(checker.clone())),
    ))
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .expect("an HTTP client");
    let target = |mode: Http| match mode {
        Http::Bare => format!("{bare}/orders"),
        Http::New | Http::Replay => format!("{guarded}/orders"),
    };
    // The replayed keys, completed once.
    for k in 0..REPLAY_KEYS {
        ok(request(&client, &target(Http::Replay), Some(&replay_key(k))).await);
    }
    let modes = [Http::Bare, Http::New, Http::Replay];
    let orders = [
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
        [0, 2, 1],
        [2, 1, 0],
        [1, 0, 2],
    ];
    for mode in modes {
        http_rate(&client, &target(mode), mode, HTTP_MEASURE / 2).await;
    }
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..HTTP_ROUNDS {
        for which in orders[round % orders.len()] {
            let mode = modes[which];
            rates[which].push(http_rate(&client, &target(mode), mode, HTTP_MEASURE).await);
        }
    }
    let how = format!(
        "{CONNECTIONS} connections, axum on the same 2-worker runtime, median of {HTTP_ROUNDS} \
         interleaved rounds of {} ms",
        HTTP_MEASURE.as_millis()
    );
    report.row(
        "pipelines",
        "HTTP POST, the route without the layer",
        format!("{} req/s", thousands(median(&rates[0]))),
        how,
    );
    report.row(
        "pipelines",
        "HTTP POST through IdempotencyLayer, new keys",
        format!("{} req/s", thousands(median(&rates[1]))),
        format!("{:.3}x the bare route", ratios(&rates[1], &rates[0])),
    );
    report.row(
        "pipelines",
        "HTTP POST through IdempotencyLayer, replays",
        format!("{} req/s", thousands(median(&rates[2]))),
        format!(
            "{:.3}x the bare route; {REPLAY_KEYS} completed keys",
            ratios(&rates[2], &rates[0])
        ),
    );
}

fn replay_key(k: usize) -> String {
    format!("\"replay-{k}\"")
}

/// Serves `router` on a free loopback port; returns `http://127.0.0.1:PORT`.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("a local address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

/// One POST; `Ok(replayed)` when the answer is a 200.
async fn request(client: &reqwest::Client, url: &str, key: Option<&str>) -> Result<bool, String> {
    let mut post = client
        .post(url)
        .body(r#"{"order_id":42,"amount_cents":1200}"#);
    if let Some(key) = key {
        post = post.header("idempotency-key", key);
    }
    let response = post.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    response.bytes().await.map_err(|e| e.to_string())?;
    if status != reqwest::StatusCode::OK {
        return Err(format!("HTTP {status}"));
    }
    Ok(replayed)
}

/// Requests per second of `mode` over [`CONNECTIONS`] tasks, after a
/// lead-in (see [`measure`]).
async fn http_rate(client: &reqwest::Client, url: &str, mode: Http, duration: Duration) -> f64 {
    static NEXT_KEY: AtomicU64 = AtomicU64::new(0);
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|task| {
            let (client, url) = (client.clone(), url.to_owned());
            let (stop, counter) = (Arc::clone(&stop), Arc::clone(&counter));
            tokio::spawn(async move {
                let mut i = task;
                while !stop.load(Ordering::Relaxed) {
                    let key = match mode {
                        Http::Bare => None,
                        Http::New => Some(format!(
                            "\"new-{}\"",
                            NEXT_KEY.fetch_add(1, Ordering::Relaxed)
                        )),
                        Http::Replay => Some(replay_key(i % REPLAY_KEYS)),
                    };
                    match request(&client, &url, key.as_deref()).await {
                        Ok(replayed) if replayed != (mode == Http::Replay) => problem(
                            &ANOMALIES,
                            format_args!("HTTP {mode:?}: replayed = {replayed}"),
                        ),
                        Ok(_) => {}
                        Err(e) => problem(&ANOMALIES, format_args!("HTTP {mode:?}: {e}")),
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    i += CONNECTIONS;
                }
            })
        })
        .collect();
    let rate = measure(&counter, &stop, duration).await;
    for handle in handles {
        ok(handle.await);
    }
    rate
}

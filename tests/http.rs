//! Real HTTP over loopback against the `webhook` example's axum server, with
//! Redis as the store.

#![cfg(feature = "http")]

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/webhook.rs"]
mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::RedisServer;
use idempotency::http::IdempotencyLayer;
use idempotency::{IdempotencyChecker, IdempotencyConfig, IdempotencyStore, RedisStore};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// The example app on a free port, over a Redis store.
struct Server {
    base: String,
    client: Client,
}

async fn serve(redis: &RedisServer) -> Server {
    let store = RedisStore::builder(redis.url())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    let store: Arc<dyn IdempotencyStore> = Arc::new(store);
    let app = webhook::app(store).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base,
        client: Client::new(),
    }
}

impl Server {
    async fn pay(&self, key: Option<&str>, auth: &str, body: Value) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/payments", self.base))
            .header("authorization", auth)
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.expect("request")
    }

    /// `method path` with an optional key and `Authorization`, a JSON body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        auth: Option<&str>,
        body: Value,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send().await.expect("request")
    }

    async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request")
    }

    async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json")
    }
}

/// Status, replay marker and body of a response.
async fn read(response: reqwest::Response) -> (StatusCode, bool, String) {
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (status, replayed, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_payments_with_one_key_execute_once() {
    let redis = RedisServer::start();
    let server = Arc::new(serve(&redis).await);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                read(
                    server
                        .pay(
                            Some("\"pay-50\""),
                            "Bearer alice-token-1",
                            json!({"amount": 500, "delay_ms": 200}),
                        )
                        .await,
                )
                .await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let first: Vec<_> = answers
        .iter()
        .filter(|a| a.0 == StatusCode::CREATED && !a.1)
        .collect();
    assert_eq!(first.len(), 1, "exactly one request ran the handler");
    let original = &first[0].2;
    for (status, replayed, body) in &answers {
        match *status {
            StatusCode::CREATED => assert_eq!(
                body, original,
                "a replay is byte-identical (replayed: {replayed})"
            ),
            StatusCode::CONFLICT => {}
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(server.stats().await["payments_executed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_and_misuse_is_refused() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;

    let first = server
        .pay(
            Some("\"pay-1\""),
            "Bearer alice-token-1",
            json!({"amount": 100}),
        )
        .await;
    let first_type = first.headers()["content-type"].clone();
    let (status, replayed, body) = read(first).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let payment: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(payment["amount"], 100);

    // A retry after completion: identical status and body, marked as replayed.
    let retry = server
        .pay(
            Some("\"pay-1\""),
            "Bearer alice-token-1",
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(retry.headers()["content-type"], first_type);
    assert_eq!(read(retry).await, (StatusCode::CREATED, true, body.clone()));
    // The bare form of the same key is the same key.
    let bare = server
        .pay(
            Some("pay-1"),
            "Bearer alice-token-1",
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(read(bare).await, (StatusCode::CREATED, true, body));

    // The same key with a different body: 422.
    let other = server
        .pay(
            Some("\"pay-1\""),
            "Bearer alice-token-1",
            json!({"amount": 999}),
        )
        .await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");

    // No key, or a malformed one: 400.
    assert_eq!(
        server
            .pay(None, "Bearer alice-token-1", json!({"amount": 1}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        server
            .pay(
                Some("\"unterminated"),
                "Bearer alice-token-1",
                json!({"amount": 1})
            )
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );

    // The same key from another user: a separate payment.
    let (status, replayed, _) = read(
        server
            .pay(
                Some("\"pay-1\""),
                "Bearer bob-token-1",
                json!({"amount": 100}),
            )
            .await,
    )
    .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(server.stats().await["payments_executed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_is_retried_then_its_success_replayed() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    let body = json!({"amount": 7, "fail_first": 1});
    let (status, replayed, _) = read(
        server
            .pay(Some("\"flaky\""), "Bearer alice-token-1", body.clone())
            .await,
    )
    .await;
    assert_eq!(
        (status, replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, false)
    );
    let (status, replayed, success) = read(
        server
            .pay(Some("\"flaky\""), "Bearer alice-token-1", body.clone())
            .await,
    )
    .await;
    assert_eq!(
        (status, replayed),
        (StatusCode::CREATED, false),
        "the retry ran again"
    );
    let (status, replayed, again) = read(
        server
            .pay(Some("\"flaky\""), "Bearer alice-token-1", body)
            .await,
    )
    .await;
    assert_eq!(
        (status, replayed, again),
        (StatusCode::CREATED, true, success)
    );
    assert_eq!(server.stats().await["payments_executed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_answers_503_and_runs_nothing_then_recovers() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let server = serve(&redis).await;
    assert_eq!(
        server
            .client
            .get(format!("{}/health", server.base))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );

    redis.kill();
    let down = server
        .pay(
            Some("\"during\""),
            "Bearer alice-token-1",
            json!({"amount": 1}),
        )
        .await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.headers().get("retry-after").is_some());
    let webhook = server
        .post(
            "/webhooks/events",
            r#"{"event_id":"e-down","event_type":"t","payload":{}}"#,
        )
        .await;
    assert_eq!(webhook.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        server
            .client
            .get(format!("{}/health", server.base))
            .send()
            .await
            .expect("health")
            .status(),
        503
    );
    let stats = server.stats().await;
    assert_eq!(stats["payments_executed"], 0, "no handler ran unguarded");
    assert_eq!(stats["webhook_events_executed"], 0);

    let _restarted = RedisServer::start_on(port);
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = server
            .pay(
                Some("\"after\""),
                "Bearer alice-token-1",
                json!({"amount": 1}),
            )
            .await
            .status();
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(server.stats().await["payments_executed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_webhook_runs_once_per_key() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    let event = r#"{"event_id":"evt-9","event_type":"invoice.paid","occurred_at":"2026-01-01T00:00:00Z","payload":{"invoice":9}}"#;
    let first = server.post("/webhooks/events", event).await;
    assert_eq!(first.status(), StatusCode::OK);
    let receipt: Value = first.json().await.expect("receipt");
    assert_eq!(receipt["event_id"], "evt-9");
    let again: Value = server
        .post("/webhooks/events", event)
        .await
        .json()
        .await
        .expect("receipt");
    assert_eq!(again, receipt, "the redelivery gets the first receipt");

    // The header key wins over the envelope's: a new event id with the same
    // header key is the same delivery.
    let keyed =
        |id: &str| format!(r#"{{"event_id":"{id}","event_type":"invoice.paid","payload":{{}}}}"#);
    let send = |id: String| {
        server
            .client
            .post(format!("{}/webhooks/events", server.base))
            .header("content-type", "application/json")
            .header("idempotency-key", "\"delivery-77\"")
            .body(id)
            .send()
    };
    let a: Value = send(keyed("evt-a"))
        .await
        .expect("a")
        .json()
        .await
        .expect("json");
    let b: Value = send(keyed("evt-b"))
        .await
        .expect("b")
        .json()
        .await
        .expect("json");
    assert_eq!(a, b);
    assert_eq!(server.stats().await["webhook_events_executed"], 2);

    // The framework's metrics, through the `metrics` facade, as Prometheus text.
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.expect("text");
    for line in [
        "idempotency_executed_total",
        "idempotency_replayed_total",
        "idempotency_store_latency_seconds{op=\"claim\",quantile=",
        "idempotency_store_latency_seconds{op=\"complete\",quantile=",
        "idempotency_handler_latency_seconds{quantile=",
    ] {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
    assert!(
        !text.contains("evt-9") && !text.contains("delivery-77"),
        "no keys in metrics"
    );
    // A body that is not an envelope is refused by the JSON extractor.
    assert!(
        server
            .post("/webhooks/events", "{\"nope\": 1}")
            .await
            .status()
            .is_client_error()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_events_are_deduplicated_by_canonical_content() {
    let redis = RedisServer::start();
    let server = Arc::new(serve(&redis).await);
    let event = r#"{"user":{"id":1,"name":"ada"},"action":"login","at":"2026-11-22T10:00:00Z"}"#;
    let reordered =
        r#"{"at":"2026-11-22T10:00:00Z","action":"login","user":{"name":"ada","id":1}}"#;
    assert_eq!(
        server.post("/api/v1/events", event).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server.post("/api/v1/events", event).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        server.post("/api/v1/events", reordered).await.status(),
        StatusCode::CONFLICT
    );

    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                server
                    .post("/api/v1/events", r#"{"burst":true}"#)
                    .await
                    .status()
            })
        })
        .collect();
    let mut accepted = 0;
    for task in tasks {
        match task.await.expect("task") {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 1);
    let stats = server.stats().await;
    assert_eq!(stats["events_accepted"], 2);
    assert_eq!(stats["events_duplicate"], 51);
}

// ---------------------------------------------------------------------------
// The layer itself, on routers built here, served over loopback over Redis.

/// A checker over `redis` for the layer, with a lease of `lease`.
async fn layer_checker(redis: &RedisServer, lease: Duration) -> IdempotencyChecker {
    layer_checker_at(redis.url(), lease).await
}

/// [`layer_checker`] over the Redis at `url`.
async fn layer_checker_at(url: String, lease: Duration) -> IdempotencyChecker {
    let store = RedisStore::builder(url).connect().await.expect("connect");
    IdempotencyChecker::with_config(
        store,
        IdempotencyConfig::builder()
            .key_prefix("idempotency:http:")
            .lease(lease)
            .build()
            .expect("config"),
    )
}

/// Serves `app` on a free loopback port of the current runtime; its base URL.
async fn serve_app(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// A handler that counts its runs, says it started, then waits to be released.
#[derive(Clone, Default)]
struct Gate {
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    release: Arc<Notify>,
}

async fn gated(State(gate): State<Gate>) -> Response {
    let run = gate.runs.fetch_add(1, Ordering::SeqCst) + 1;
    gate.started.notify_one();
    gate.release.notified().await;
    (StatusCode::CREATED, axum::Json(json!({ "run": run }))).into_response()
}

fn gated_app(gate: &Gate, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/slow", post(gated).route_layer(layer))
        .with_state(gate.clone())
}

async fn post_key(client: &Client, url: &str, key: &str) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("idempotency-key", key)
        .timeout(Duration::from_secs(5))
        .send()
        .await
}

/// Retries while the answer is 409 (the attempt still runs), honouring
/// nothing but a short pause; the first other answer.
async fn until_not_in_progress(client: &Client, url: &str, key: &str) -> reqwest::Response {
    for _ in 0..250 {
        let response = post_key(client, url, key).await.expect("retry");
        if response.status() != StatusCode::CONFLICT {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the attempt never finished");
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()[header::RETRY_AFTER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_does_not_make_the_handler_run_twice() {
    let redis = RedisServer::start();
    let gate = Gate::default();
    let layer = IdempotencyLayer::new(layer_checker(&redis, Duration::from_secs(30)).await);
    let url = format!("{}/slow", serve_app(gated_app(&gate, layer)).await);
    let client = Client::new();

    // The client gives up while the handler runs: hyper drops the response.
    let gave_up = client
        .post(&url)
        .header("idempotency-key", "\"k-timeout\"")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    gate.started.notified().await;

    // The attempt still runs: a retry is told to come back.
    let retry = post_key(&client, &url, "\"k-timeout\"")
        .await
        .expect("the retry is answered at once, not run again");
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert!(retry_after(&retry) >= 1);

    // Once it finishes, retries get its response.
    gate.release.notify_one();
    let replay = until_not_in_progress(&client, &url, "\"k-timeout\"").await;
    let (status, replayed, body) = read(replay).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"run": 1})
    );
    assert_eq!(gate.runs.load(Ordering::SeqCst), 1, "the handler ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_follows_the_lease_of_the_running_attempt() {
    let redis = RedisServer::start();
    let short = Gate::default();
    let long = Gate::default();
    let app = Router::new()
        .nest(
            "/short",
            gated_app(
                &short,
                IdempotencyLayer::new(layer_checker(&redis, Duration::from_secs(20)).await),
            ),
        )
        .nest(
            "/long",
            gated_app(
                &long,
                IdempotencyLayer::new(layer_checker(&redis, Duration::from_secs(300)).await),
            ),
        );
    let base = serve_app(app).await;
    let client = Client::new();
    // Distinct keys: under `nest` the layer sees the path inside the nest.
    for (gate, path, key, expected) in [
        (&short, "/short/slow", "\"k-lease-20s\"", 15..=20),
        (&long, "/long/slow", "\"k-lease-300s\"", 60..=60),
    ] {
        let url = format!("{base}{path}");
        let first = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move { post_key(&client, &url, key).await }
        });
        gate.started.notified().await;
        let retry = post_key(&client, &url, key).await.expect("retry");
        assert_eq!(retry.status(), StatusCode::CONFLICT);
        let seconds = retry_after(&retry);
        assert!(
            expected.contains(&seconds),
            "{path}: Retry-After {seconds}, expected {expected:?}"
        );
        gate.release.notify_one();
        let first = first.await.expect("task").expect("first");
        assert_eq!(first.status(), StatusCode::CREATED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_off_by_shutdown_is_taken_over_when_its_lease_runs_out() {
    let redis = RedisServer::start();
    let lease = Duration::from_secs(3);

    // Server A, on its own runtime, which is shut down mid-request.
    let a = Gate::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // The checker's connection lives on server A's runtime.
    let url = redis.url();
    let checker = runtime
        .spawn(async move { layer_checker_at(url, lease).await })
        .await
        .expect("checker");
    let layer = IdempotencyLayer::new(checker);
    let app = gated_app(&a, layer);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url_a = format!("http://{}/slow", listener.local_addr().expect("addr"));
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        axum::serve(listener, app).await
    });
    let client = Client::new();
    let cut = tokio::spawn({
        let (client, url) = (client.clone(), url_a.clone());
        async move { post_key(&client, &url, "\"k-shutdown\"").await }
    });
    a.started.notified().await;
    runtime.shutdown_background();
    assert!(cut.await.expect("task").is_err(), "server A is gone");

    // Server B, same Redis: the cut-off attempt's lease still holds the key.
    let b = Gate::default();
    b.release.notify_one();
    let layer = IdempotencyLayer::new(layer_checker(&redis, lease).await);
    let url_b = format!("{}/slow", serve_app(gated_app(&b, layer)).await);
    let retry = post_key(&client, &url_b, "\"k-shutdown\"")
        .await
        .expect("retry");
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    let seconds = retry_after(&retry);
    assert!((2..=3).contains(&seconds), "Retry-After {seconds}");

    // A client that honours Retry-After takes the key over afterwards.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let taken_over = until_not_in_progress(&client, &url_b, "\"k-shutdown\"").await;
    let (status, replayed, body) = read(taken_over).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"run": 1})
    );
    assert_eq!(b.runs.load(Ordering::SeqCst), 1);
}

/// Answers with the status named in the body (`{"status": 429}`), counting
/// its runs, and a non-UTF-8 header value.
async fn answer_with(
    State(runs): State<Arc<AtomicUsize>>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let status = body["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut response = (status, axum::Json(json!({ "run": run }))).into_response();
    response.headers_mut().insert(
        "x-latin1",
        HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is a valid header value"),
    );
    response
}

async fn status_app(
    redis: &RedisServer,
    edit: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
) -> (String, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = edit(IdempotencyLayer::new(
        layer_checker(redis, Duration::from_secs(30)).await,
    ));
    let app = Router::new()
        .route("/things", post(answer_with).route_layer(layer))
        .with_state(Arc::clone(&runs));
    (format!("{}/things", serve_app(app).await), runs)
}

async fn post_json(
    client: &Client,
    url: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, bool, String) {
    read(
        client
            .post(url)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("request"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_and_unreached_refusals_are_not_stored() {
    let redis = RedisServer::start();
    let (url, runs) = status_app(&redis, |l| l).await;
    let client = Client::new();

    // 429, 409, 408, 425 say "come back later": the retry runs again.
    for (n, status) in [429u16, 409, 408, 425].into_iter().enumerate() {
        let key = format!("\"k-{status}\"");
        let body = json!({ "status": status });
        let first = post_json(&client, &url, &key, &body).await;
        assert_eq!((first.0.as_u16(), first.1), (status, false));
        let retry = post_json(&client, &url, &key, &body).await;
        assert_eq!(
            (retry.0.as_u16(), retry.1),
            (status, false),
            "{status} was not replayed"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2 * (n + 1));
    }

    // An extractor's 415 (no Content-Type): once fixed, the retry runs.
    let before = runs.load(Ordering::SeqCst);
    let unsupported = client
        .post(&url)
        .header("idempotency-key", "\"k-415\"")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(unsupported.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let fixed = post_json(&client, &url, "\"k-415\"", &json!({})).await;
    assert_eq!((fixed.0, fixed.1), (StatusCode::CREATED, false));
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);

    // A considered refusal of the handler (402) is stored and replayed.
    let declined = post_json(&client, &url, "\"k-402\"", &json!({"status": 402})).await;
    let again = post_json(&client, &url, "\"k-402\"", &json!({"status": 402})).await;
    assert_eq!(
        (again.0, again.1, &again.2),
        (StatusCode::PAYMENT_REQUIRED, true, &declined.2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statuses_that_are_not_stored_are_configurable() {
    let redis = RedisServer::start();
    let (url, runs) = status_app(&redis, |l| {
        l.retryable_statuses([StatusCode::PAYMENT_REQUIRED])
    })
    .await;
    let client = Client::new();
    // 429 is stored now, 402 is not.
    let first = post_json(&client, &url, "\"k-429\"", &json!({"status": 429})).await;
    let again = post_json(&client, &url, "\"k-429\"", &json!({"status": 429})).await;
    assert_eq!(
        (again.0, again.1, &again.2),
        (StatusCode::TOO_MANY_REQUESTS, true, &first.2)
    );
    post_json(&client, &url, "\"k-402\"", &json!({"status": 402})).await;
    let again = post_json(&client, &url, "\"k-402\"", &json!({"status": 402})).await;
    assert_eq!((again.0, again.1), (StatusCode::PAYMENT_REQUIRED, false));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_response_headers_are_replayed_byte_for_byte() {
    let redis = RedisServer::start();
    let (url, runs) = status_app(&redis, |l| l).await;
    let client = Client::new();
    for replayed in [false, true] {
        let response = client
            .post(&url)
            .header("idempotency-key", "\"k-latin1\"")
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        assert_eq!(
            response
                .headers()
                .get("x-latin1")
                .map(|v| v.as_bytes().to_vec()),
            Some(b"caf\xe9".to_vec()),
            "replayed: {replayed}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_string_is_part_of_the_request() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    let auth = Some("Bearer alice-token-1");
    let body = json!({"amount": 5});
    let first = server
        .send(
            Method::POST,
            "/payments",
            Some("\"k-q\""),
            auth,
            body.clone(),
        )
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let other = server
        .send(
            Method::POST,
            "/payments?x=1",
            Some("\"k-q\""),
            auth,
            body.clone(),
        )
        .await;
    assert_eq!(
        other.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "another request under one key"
    );
    let same = server
        .send(Method::POST, "/payments", Some("\"k-q\""), auth, body)
        .await;
    assert!(read(same).await.1, "the same request is replayed");
    assert_eq!(server.stats().await["payments_executed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_must_be_one_structured_field_string() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    let auth = Some("Bearer alice-token-1");

    // Two header lines: which one is the key? Neither.
    let twice = server
        .client
        .post(format!("{}/payments", server.base))
        .header("authorization", "Bearer alice-token-1")
        .header("idempotency-key", "\"k-a\"")
        .header("idempotency-key", "\"k-b\"")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);

    // Structured-field items that are not strings.
    for value in [
        ":YWJj:",
        "\"abc\";x=1",
        "abc;x=1",
        "12345",
        "-1.5",
        "?1",
        "(\"a\" \"b\")",
        "\"a\", \"b\"",
    ] {
        let response = server
            .send(
                Method::POST,
                "/payments",
                Some(value),
                auth,
                json!({"amount": 1}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{value}");
    }
    assert_eq!(server.stats().await["payments_executed"], 0);

    // The string, and (leniency) the same key bare.
    let quoted = server
        .send(
            Method::POST,
            "/payments",
            Some("\"ab:c/1\""),
            auth,
            json!({"amount": 1}),
        )
        .await;
    assert_eq!(quoted.status(), StatusCode::CREATED);
    let bare = server
        .send(
            Method::POST,
            "/payments",
            Some("ab:c/1"),
            auth,
            json!({"amount": 1}),
        )
        .await;
    assert!(read(bare).await.1, "the bare form is the same key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_the_route_does_not_serve_gets_405() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    for key in [None, Some("\"k-patch\"")] {
        let response = server
            .send(
                Method::PATCH,
                "/payments",
                key,
                Some("Bearer alice-token-1"),
                json!({"amount": 1}),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "key: {key:?}"
        );
    }
    // The key was not used up: a POST with it runs.
    let post = server
        .send(
            Method::POST,
            "/payments",
            Some("\"k-patch\""),
            Some("Bearer alice-token-1"),
            json!({"amount": 1}),
        )
        .await;
    assert_eq!(read(post).await.0, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_by_the_authenticated_user_not_the_raw_token() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    let body = json!({"amount": 3});
    let first = server
        .pay(Some("\"k-user\""), "Bearer alice-token-1", body.clone())
        .await;
    let (status, _, original) = read(first).await;
    assert_eq!(status, StatusCode::CREATED);
    // A refreshed token, and the scheme in another case: the same user.
    for auth in ["Bearer alice-token-2", "bearer alice-token-1"] {
        let retry = server.pay(Some("\"k-user\""), auth, body.clone()).await;
        assert_eq!(
            read(retry).await,
            (StatusCode::CREATED, true, original.clone()),
            "{auth}"
        );
    }
    // Another user with the same key: a payment of their own.
    let bob = server
        .pay(Some("\"k-user\""), "Bearer bob-token-1", body.clone())
        .await;
    assert!(!read(bob).await.1, "bob pays for himself");
    // An unknown token: refused before the layer.
    let stranger = server.pay(Some("\"k-user\""), "Bearer forged", body).await;
    assert_eq!(stranger.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.stats().await["payments_executed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_without_a_key_is_a_bad_request() {
    let redis = RedisServer::start();
    let server = serve(&redis).await;
    for event in [
        r#"{"event_type":"invoice.paid","payload":{}}"#,
        r#"{"event_id":"evt-1","idempotency_key":"","event_type":"invoice.paid","payload":{}}"#,
    ] {
        let response = server.post("/webhooks/events", event).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{event}");
    }
    assert_eq!(server.stats().await["webhook_events_executed"], 0);
}

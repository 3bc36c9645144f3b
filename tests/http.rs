//! Real HTTP over loopback against the `webhook` example's axum server, with
//! Redis as the store.

#![cfg(feature = "http")]

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/webhook.rs"]
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use idempotency::{IdempotencyStore, RedisStore};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

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
                            "Bearer alice",
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
        .pay(Some("\"pay-1\""), "Bearer alice", json!({"amount": 100}))
        .await;
    let first_type = first.headers()["content-type"].clone();
    let (status, replayed, body) = read(first).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let payment: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(payment["amount"], 100);

    // A retry after completion: identical status and body, marked as replayed.
    let retry = server
        .pay(Some("\"pay-1\""), "Bearer alice", json!({"amount": 100}))
        .await;
    assert_eq!(retry.headers()["content-type"], first_type);
    assert_eq!(read(retry).await, (StatusCode::CREATED, true, body.clone()));
    // The bare form of the same key is the same key.
    let bare = server
        .pay(Some("pay-1"), "Bearer alice", json!({"amount": 100}))
        .await;
    assert_eq!(read(bare).await, (StatusCode::CREATED, true, body));

    // The same key with a different body: 422.
    let other = server
        .pay(Some("\"pay-1\""), "Bearer alice", json!({"amount": 999}))
        .await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");

    // No key, or a malformed one: 400.
    assert_eq!(
        server
            .pay(None, "Bearer alice", json!({"amount": 1}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        server
            .pay(Some("\"unterminated"), "Bearer alice", json!({"amount": 1}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );

    // The same key under another Authorization: a separate payment.
    let (status, replayed, _) = read(
        server
            .pay(Some("\"pay-1\""), "Bearer bob", json!({"amount": 100}))
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
            .pay(Some("\"flaky\""), "Bearer a", body.clone())
            .await,
    )
    .await;
    assert_eq!(
        (status, replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, false)
    );
    let (status, replayed, success) = read(
        server
            .pay(Some("\"flaky\""), "Bearer a", body.clone())
            .await,
    )
    .await;
    assert_eq!(
        (status, replayed),
        (StatusCode::CREATED, false),
        "the retry ran again"
    );
    let (status, replayed, again) =
        read(server.pay(Some("\"flaky\""), "Bearer a", body).await).await;
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
        .pay(Some("\"during\""), "Bearer a", json!({"amount": 1}))
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
            .pay(Some("\"after\""), "Bearer a", json!({"amount": 1}))
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

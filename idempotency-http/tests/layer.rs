//! Layer options at the tower level, with the memory store.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum_core::body::Body;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use idempotency_core::{IdempotencyChecker, MemoryStore};
use idempotency_http::IdempotencyLayer;
use tower_layer::Layer;
use tower_service::Service;

/// Answers 200 with a body of `size` bytes and counts its calls.
#[derive(Clone)]
struct Counting {
    calls: Arc<AtomicUsize>,
    size: usize,
}

impl Service<Request<Body>> for Counting {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut response = Response::new(Body::from(format!("{n:0>width$}", width = self.size)));
        response
            .headers_mut()
            .insert("set-cookie", "session=secret".parse().expect("value"));
        ready(Ok(response))
    }
}

fn setup(
    layer: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
    size: usize,
) -> (
    impl Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = layer(IdempotencyLayer::new(IdempotencyChecker::new(
        MemoryStore::new(),
    )));
    (
        layer.layer(Counting {
            calls: Arc::clone(&calls),
            size,
        }),
        calls,
    )
}

fn request(method: Method, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri("/things");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body)).expect("request")
}

async fn body(response: Response<Body>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf8")
}

#[tokio::test]
async fn key_optional_layer_passes_keyless_requests_through() {
    let (mut service, calls) = setup(|l| l.key_required(false), 1);
    for _ in 0..2 {
        let response = service
            .call(request(Method::POST, None, "{}"))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "no idempotency without a key"
    );
}

#[tokio::test]
async fn other_methods_pass_through() {
    let (mut service, calls) = setup(|l| l, 1);
    for _ in 0..2 {
        service
            .call(request(Method::GET, Some("k"), ""))
            .await
            .expect("infallible");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let (mut service, calls) = setup(|l| l.methods([Method::PUT]), 1);
    for _ in 0..2 {
        service
            .call(request(Method::PUT, Some("k"), ""))
            .await
            .expect("infallible");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "PUT is covered once configured"
    );
}

#[tokio::test]
async fn oversize_request_is_413_and_never_runs() {
    let (mut service, calls) = setup(|l| l.max_request_body(4), 1);
    let response = service
        .call(request(Method::POST, Some("k"), "too long"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn first_caller_gets_its_cookie_and_replays_do_not() {
    let (mut service, calls) = setup(|l| l, 1);
    let first = service
        .call(request(Method::POST, Some("k"), "{}"))
        .await
        .expect("infallible");
    assert_eq!(first.headers()["set-cookie"], "session=secret");
    let replay = service
        .call(request(Method::POST, Some("k"), "{}"))
        .await
        .expect("infallible");
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert!(replay.headers().get("set-cookie").is_none());
    assert_eq!(body(replay).await, body(first).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn oversize_response_is_sent_once_and_replayed_without_body() {
    let (mut service, calls) = setup(|l| l.max_response_body(8), 32);
    let first = service
        .call(request(Method::POST, Some("big"), "{}"))
        .await
        .expect("infallible");
    assert_eq!(
        body(first).await.len(),
        32,
        "the first caller gets the whole body"
    );
    let replay = service
        .call(request(Method::POST, Some("big"), "{}"))
        .await
        .expect("infallible");
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-body-omitted"], "true");
    assert_eq!(body(replay).await, "");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never run twice");
}

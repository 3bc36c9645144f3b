//! The `Idempotency-Key` HTTP header for axum and other tower services, on
//! the `idempotency` engine.
//!
//! Wrap the routes that create things (payments, orders, webhooks) in an
//! [`IdempotencyLayer`]. Clients send a unique `Idempotency-Key` per
//! operation and reuse it on every retry:
//!
//! | the request | the answer |
//! |---|---|
//! | first with this key | the handler runs; its response is stored |
//! | a retry after it completed | the stored status, headers and body, with `Idempotent-Replayed: true` |
//! | a retry while the first still runs | `409 Conflict`, `Retry-After`: when the running attempt's lease runs out (1 to 60 s) |
//! | the same key with another query string or body | `422 Unprocessable Entity` |
//! | no key (on a key-required layer), a malformed key, or two keys | `400 Bad Request` |
//! | a body over `max_request_body` | `413 Payload Too Large` |
//! | the store is unreachable | `503 Service Unavailable`, `Retry-After: 5`; the handler does not run |
//! | the handler answered 5xx, or a status of [`DEFAULT_RETRYABLE_STATUSES`] (400, 401, 403, 404, 405, 409, 415, 422, 429, ...) | that answer; nothing is stored, so a retry runs again |
//!
//! The attempt runs as a task of its own: a client that times out or
//! disconnects does not cancel it, and its retry gets the first response.
//! Refusals carry an `application/problem+json` body (RFC 9457). Keys are
//! scoped by method, path and a caller-supplied scope (the authenticated
//! principal), hashed together before they reach the store, so one client
//! can never receive another's response. `Set-Cookie` and hop-by-hop
//! headers are never stored or replayed.
//!
//! # Example
//! ```
//! use axum_core::body::Body;
//! use http::{Request, Response};
//! use idempotency_core::{IdempotencyChecker, MemoryStore};
//! use idempotency_http::IdempotencyLayer;
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Any tower service works; with axum: `.route("/payments", post(handler).route_layer(layer))`.
//! let create_payment = tower_service_fn(|_req: Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Body::from("{\"id\":1}")))
//! });
//! # #[derive(Clone)] struct UserId(String);
//! // The scope: the principal your authentication layer put into the extensions.
//! let layer = IdempotencyLayer::new(IdempotencyChecker::new(MemoryStore::new()))
//!     .scope_with(|parts| parts.extensions.get::<UserId>().map(|user| user.0.clone()));
//! let mut service = layer.layer(create_payment);
//!
//! let request = || Request::post("/payments").header("idempotency-key", "\"k1\"").body(Body::empty());
//! let first = service.call(request()?).await?;
//! let retry = service.call(request()?).await?;
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # Ok(()) }
//! # fn tower_service_fn<F, Fut>(f: F) -> ServiceFn<F> where F: FnMut(Request<Body>) -> Fut { ServiceFn(f) }
//! # #[derive(Clone)] struct ServiceFn<F>(F);
//! # impl<F: FnMut(Request<Body>) -> Fut, Fut> Service<Request<Body>> for ServiceFn<F>
//! # where Fut: std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>> {
//! #     type Response = Response<Body>; type Error = std::convert::Infallible; type Future = Fut;
//! #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> { std::task::Poll::Ready(Ok(())) }
//! #     fn call(&mut self, r: Request<Body>) -> Fut { (self.0)(r) }
//! # }
//! ```

pub mod future;
mod key;
mod layer;
mod response;

pub use key::{KeyError, MAX_KEY_LEN, idempotency_key, parse_idempotency_key};
pub use layer::{
    DEFAULT_MAX_RETRY_AFTER, DEFAULT_RETRYABLE_STATUSES, IDEMPOTENCY_KEY_HEADER, IdempotencyLayer,
    IdempotencyService,
};
pub use response::{BODY_OMITTED, REPLAYED};

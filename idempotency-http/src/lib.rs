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
//! | a retry while the first still runs | `409 Conflict`, `Retry-After: 1` |
//! | the same key with another method, path or body | `422 Unprocessable Entity` |
//! | no key (on a key-required layer) or a malformed key | `400 Bad Request` |
//! | a body over `max_request_body` | `413 Payload Too Large` |
//! | the store is unreachable | `503 Service Unavailable`, `Retry-After: 5`; the handler does not run |
//! | the handler answered 5xx | that answer; the attempt is recorded as failed, so a retry runs again |
//!
//! Refusals carry an `application/problem+json` body (RFC 9457). Keys are
//! scoped by method, path and a caller-supplied scope (e.g. the
//! `Authorization` header), hashed together before they reach the store, so
//! one client can never receive another's response. `Set-Cookie` and
//! hop-by-hop headers are never stored or replayed.
//!
//! # Example
//! ```
//! use axum_core::body::Body;
//! use http::{Request, Response, header::AUTHORIZATION};
//! use idempotency_core::{IdempotencyChecker, MemoryStore};
//! use idempotency_http::IdempotencyLayer;
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Any tower service works; with axum: `Router::new().route(..).layer(layer)`.
//! let create_payment = tower_service_fn(|_req: Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Body::from("{\"id\":1}")))
//! });
//! let layer = IdempotencyLayer::new(IdempotencyChecker::new(MemoryStore::new()))
//!     .scope_by_header(AUTHORIZATION);
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

pub use key::{KeyError, MAX_KEY_LEN, parse_idempotency_key};
pub use layer::{IDEMPOTENCY_KEY, IdempotencyLayer, IdempotencyService};
pub use response::{BODY_OMITTED, REPLAYED};

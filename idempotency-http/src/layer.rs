//! [`IdempotencyLayer`] and [`IdempotencyService`].

use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::body::Body;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use idempotency_core::{
    DuplicatePolicy, IdempotencyChecker, IdempotencyError, InProgressPolicy, KeyedRequest,
    Processed, sha256_hex,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::key::parse_idempotency_key;
use crate::response::{StoredResponse, problem, retry_later};

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

struct Options {
    required: bool,
    methods: Vec<Method>,
    scope: Option<Arc<ScopeFn>>,
    max_request_body: usize,
    max_response_body: usize,
    record_server_errors: bool,
}

/// A tower layer that makes the wrapped routes honour `Idempotency-Key`.
///
/// See the crate docs for the semantics and the status codes.
///
/// ```
/// use axum_core::body::Body;
/// use http::header::AUTHORIZATION;
/// use idempotency_core::{IdempotencyChecker, IdempotencyConfig, MemoryStore};
/// use idempotency_http::IdempotencyLayer;
///
/// let config = IdempotencyConfig::builder().key_prefix("idempotency:http:").build()?;
/// let layer = IdempotencyLayer::new(IdempotencyChecker::with_config(MemoryStore::new(), config))
///     .scope_by_header(AUTHORIZATION)
///     .max_response_body(256 * 1024);
/// # let _ = layer;
/// # Ok::<(), idempotency_core::IdempotencyError>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct IdempotencyLayer {
    checker: IdempotencyChecker,
    options: Arc<Options>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("required", &self.options.required)
            .field("methods", &self.options.methods)
            .field("scoped", &self.options.scope.is_some())
            .field("max_request_body", &self.options.max_request_body)
            .field("max_response_body", &self.options.max_response_body)
            .field("record_server_errors", &self.options.record_server_errors)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer over `checker`: key required, on `POST` and `PATCH`, no scope,
    /// request and response bodies up to 1 MiB, 5xx answers recorded as failed.
    pub fn new(checker: IdempotencyChecker) -> Self {
        Self {
            checker,
            options: Arc::new(Options {
                required: true,
                methods: vec![Method::POST, Method::PATCH],
                scope: None,
                max_request_body: 1024 * 1024,
                max_response_body: 1024 * 1024,
                record_server_errors: true,
            }),
        }
    }

    fn options(mut self, edit: impl FnOnce(&mut Options)) -> Self {
        match Arc::get_mut(&mut self.options) {
            Some(options) => edit(options),
            None => {
                let old = &*self.options;
                let mut options = Options {
                    required: old.required,
                    methods: old.methods.clone(),
                    scope: old.scope.clone(),
                    max_request_body: old.max_request_body,
                    max_response_body: old.max_response_body,
                    record_server_errors: old.record_server_errors,
                };
                edit(&mut options);
                self.options = Arc::new(options);
            }
        }
        self
    }

    /// Whether a request without the header is refused with 400 (`true`, the
    /// default) or passed through without idempotency (`false`).
    pub fn key_required(self, required: bool) -> Self {
        self.options(|o| o.required = required)
    }

    /// The methods the layer applies to (default `POST` and `PATCH`); others
    /// pass through untouched.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.options(|o| o.methods = methods)
    }

    /// Scopes keys by the value of a request header, e.g. `Authorization`, so
    /// one client's key can never return another client's response. The value
    /// is hashed before it reaches the store.
    pub fn scope_by_header(self, name: HeaderName) -> Self {
        self.scope_with(move |parts| {
            parts
                .headers
                .get(&name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        })
    }

    /// Scopes keys by what `scope` returns for a request (a tenant, an
    /// authenticated principal from the extensions, ...). `None` is the
    /// anonymous scope. The value is hashed before it reaches the store.
    pub fn scope_with(
        self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let scope: Arc<ScopeFn> = Arc::new(scope);
        self.options(|o| o.scope = Some(scope))
    }

    /// The largest request body read (default 1 MiB); larger requests get 413.
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.options(|o| o.max_request_body = bytes)
    }

    /// The largest response body stored for replay (default 1 MiB). A larger
    /// response is still sent in full to the first caller and the request is
    /// recorded as completed (it never runs again), but replays carry only
    /// its status and headers, an empty body and `Idempotent-Body-Omitted: true`.
    pub fn max_response_body(self, bytes: usize) -> Self {
        self.options(|o| o.max_response_body = bytes)
    }

    /// Whether a 5xx answer is recorded as failed, so a retry runs the
    /// handler again (`true`, the default), or stored and replayed like any
    /// other status (`false`).
    pub fn record_server_errors(self, record: bool) -> Self {
        self.options(|o| o.record_server_errors = record)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    layer: IdempotencyLayer,
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> Service<Request<Body>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone is not ready; the service that was polled ready is.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(handle(self.layer.clone(), inner, request))
    }
}

/// Why an attempt did not produce a response worth storing.
enum Attempt<E> {
    /// The checker refused or failed (the handler did not run, or its
    /// completion could not be recorded).
    Idempotency(IdempotencyError),
    /// The inner service failed; the record is `FAILED`.
    Inner(E),
    /// A 5xx answer, recorded as failed so a retry runs again; sent as is.
    ServerError(Response<Body>),
    /// The inner response body could not be read.
    Body(BoxError),
}

impl<E> From<IdempotencyError> for Attempt<E> {
    fn from(error: IdempotencyError) -> Self {
        Self::Idempotency(error)
    }
}

impl<E> std::fmt::Display for Attempt<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idempotency(e) => e.fmt(f),
            Self::Inner(_) => f.write_str("the inner service failed"),
            Self::ServerError(r) => write!(f, "the handler answered {}", r.status()),
            Self::Body(e) => write!(f, "the response body could not be read: {e}"),
        }
    }
}

fn into_body<B>(response: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(Body::new)
}

async fn handle<S, B>(
    layer: IdempotencyLayer,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>> + Send,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let options = &layer.options;
    if !options.methods.contains(request.method()) {
        return inner.call(request).await.map(into_body);
    }
    let key = match request
        .headers()
        .get(IDEMPOTENCY_KEY)
        .map(parse_idempotency_key)
    {
        Some(Ok(key)) => key,
        Some(Err(error)) => return Ok(problem(StatusCode::BAD_REQUEST, &error.to_string())),
        None if options.required => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "this endpoint requires an Idempotency-Key header",
            ));
        }
        None => return inner.call(request).await.map(into_body),
    };

    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, options.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this endpoint accepts",
            ));
        }
    };
    let scope = options
        .scope
        .as_ref()
        .and_then(|scope| scope(&parts))
        .unwrap_or_default();
    let method = parts.method.as_str();
    let path = parts.uri.path();
    // The stored key hides the scope (it may be a credential) and keeps
    // methods, paths and scopes apart; the fingerprint catches a key reused
    // for a different request.
    let stored_key = sha256_hex(format!("{method}\n{path}\n{scope}\n{key}").as_bytes());
    let mut fingerprint_input = format!("{method}\n{path}\n").into_bytes();
    fingerprint_input.extend_from_slice(&body);
    let operation = format!("{method} {path}");
    let keyed = KeyedRequest::new(&stored_key)
        .event_type(&operation)
        .fingerprint(sha256_hex(&fingerprint_input))
        .on_duplicate(DuplicatePolicy::Replay)
        .on_in_progress(InProgressPolicy::Error);

    let max_response_body = options.max_response_body;
    let record_server_errors = options.record_server_errors;
    let mut live = None;
    let outcome = layer
        .checker
        .process_request(keyed, |_lease| async {
            let request = Request::from_parts(parts, Body::from(body));
            let response = inner.call(request).await.map_err(Attempt::Inner)?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| Attempt::Body(e.into()))?
                .to_bytes();
            let stored = StoredResponse::new(&parts, &body, max_response_body);
            let response = Response::from_parts(parts, Body::from(body));
            if record_server_errors && response.status().is_server_error() {
                return Err(Attempt::ServerError(response));
            }
            live = Some(response);
            Ok(stored)
        })
        .await;

    Ok(match outcome {
        Ok(Processed::Executed(stored)) => live.unwrap_or_else(|| stored.into_replay()),
        Ok(Processed::Replayed(stored)) => stored.into_replay(),
        Err(Attempt::ServerError(response)) => response,
        Err(Attempt::Inner(error)) => return Err(error),
        Err(Attempt::Body(error)) => {
            tracing::warn!(%error, "the response body could not be read");
            problem(
                StatusCode::BAD_GATEWAY,
                "the response body could not be read",
            )
        }
        Err(Attempt::Idempotency(error)) => refusal(&error),
    })
}

/// The answer when the checker refused the request or failed.
fn refusal(error: &IdempotencyError) -> Response<Body> {
    match error {
        IdempotencyError::InProgress { .. } => retry_later(
            StatusCode::CONFLICT,
            "a request with this Idempotency-Key is still being processed",
            1,
        ),
        IdempotencyError::FingerprintMismatch { .. } => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was already used with a different request",
        ),
        IdempotencyError::InvalidKey { reason } => problem(
            StatusCode::BAD_REQUEST,
            &format!("invalid Idempotency-Key: {reason}"),
        ),
        IdempotencyError::StoreUnavailable { .. } => {
            tracing::warn!(error = %error.redacted(), "idempotency store unavailable; request refused");
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "the idempotency store is unavailable; the request was not processed",
                5,
            )
        }
        IdempotencyError::LeaseLost { .. } => retry_later(
            StatusCode::CONFLICT,
            "this request took too long and was taken over by a retry",
            1,
        ),
        other => {
            tracing::error!(error = %other.redacted(), "idempotency layer error");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request could not be processed",
            )
        }
    }
}

//! [`IdempotencyLayer`] and [`IdempotencyService`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum_core::body::Body;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use idempotency_core::{
    DuplicatePolicy, IdempotencyChecker, IdempotencyError, InProgressPolicy, KeyedRequest,
    Processed, RecordStatus, StoreRefusal,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::key::idempotency_key;
use crate::response::{StoredResponse, problem, retry_later};

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The statuses whose responses are not stored by default (see
/// [`IdempotencyLayer::retryable_statuses`]): the attempt is released and a
/// retry with the same key runs the handler again.
///
/// - The request never reached the handler's logic: it was refused by an
///   extractor, an auth layer or the router, or failed input validation
///   (Stripe's rule: "no idempotent result is saved" for those):
///   `400 Bad Request`, `401 Unauthorized`, `403 Forbidden`, `404 Not Found`,
///   `405 Method Not Allowed`, `406 Not Acceptable`, `411 Length Required`,
///   `413 Content Too Large`, `414 URI Too Long`, `415 Unsupported Media
///   Type`, `422 Unprocessable Content`, `428 Precondition Required`,
///   `431 Request Header Fields Too Large`.
/// - "Come back later": `408 Request Timeout`, `409 Conflict`, `423 Locked`,
///   `425 Too Early`, `429 Too Many Requests`.
///
/// 5xx answers are governed by
/// [`record_server_errors`](IdempotencyLayer::record_server_errors). Every
/// other status (2xx, 3xx, and 4xx such as `402 Payment Required` or
/// `410 Gone`) is a considered answer of the handler and is stored.
pub const DEFAULT_RETRYABLE_STATUSES: [StatusCode; 18] = [
    StatusCode::BAD_REQUEST,
    StatusCode::UNAUTHORIZED,
    StatusCode::FORBIDDEN,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::NOT_ACCEPTABLE,
    StatusCode::REQUEST_TIMEOUT,
    StatusCode::CONFLICT,
    StatusCode::LENGTH_REQUIRED,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::URI_TOO_LONG,
    StatusCode::UNSUPPORTED_MEDIA_TYPE,
    StatusCode::UNPROCESSABLE_ENTITY,
    StatusCode::LOCKED,
    StatusCode::TOO_EARLY,
    StatusCode::PRECONDITION_REQUIRED,
    StatusCode::TOO_MANY_REQUESTS,
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
];

/// The default bound of the `Retry-After` of a 409 (see
/// [`IdempotencyLayer::max_retry_after`]).
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
struct Options {
    required: bool,
    methods: Vec<Method>,
    scope: Option<Arc<ScopeFn>>,
    max_request_body: usize,
    max_response_body: usize,
    record_server_errors: bool,
    retryable: Vec<StatusCode>,
    max_retry_after: Duration,
}

impl Options {
    /// Whether a response with `status` is not stored (the attempt is
    /// recorded as failed, so a retry runs).
    fn is_retryable(&self, status: StatusCode) -> bool {
        (self.record_server_errors && status.is_server_error()) || self.retryable.contains(&status)
    }
}

/// A tower layer that makes the wrapped routes honour `Idempotency-Key`.
///
/// See the crate docs for the semantics and the status codes.
///
/// With axum, add it to the method router, `post(handler).route_layer(layer)`
/// (not `Router::layer` nor `Router::route_layer`, which also wrap the `405`
/// fallback), inside the layer that authenticates the caller: then a method
/// the route does not serve gets the router's `405`, and the scope is the
/// verified principal.
///
/// ```
/// use idempotency_core::{IdempotencyChecker, IdempotencyConfig, MemoryStore};
/// use idempotency_http::IdempotencyLayer;
///
/// /// The caller, as the authentication layer verified it.
/// #[derive(Clone)]
/// struct UserId(String);
///
/// let config = IdempotencyConfig::builder().key_prefix("idempotency:http:").build()?;
/// let layer = IdempotencyLayer::new(IdempotencyChecker::with_config(MemoryStore::new(), config))
///     .scope_with(|parts| parts.extensions.get::<UserId>().map(|user| user.0.clone()))
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
            .field("retryable_statuses", &self.options.retryable)
            .field("max_retry_after", &self.options.max_retry_after)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer over `checker`: key required, on `POST` and `PATCH`, no scope,
    /// request and response bodies up to 1 MiB, 5xx answers and
    /// [`DEFAULT_RETRYABLE_STATUSES`] not stored, `Retry-After` up to
    /// [`DEFAULT_MAX_RETRY_AFTER`].
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
                retryable: DEFAULT_RETRYABLE_STATUSES.to_vec(),
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            }),
        }
    }

    fn options(mut self, edit: impl FnOnce(&mut Options)) -> Self {
        edit(Arc::make_mut(&mut self.options));
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

    /// Scopes keys by the value of a request header, hashed before it reaches
    /// the store.
    ///
    /// Only for a header whose exact value names the caller for as long as
    /// keys live: a tenant id set by a gateway, an API key sent verbatim.
    /// Not for `Authorization` bearer tokens: a refreshed token, or `bearer`
    /// instead of `Bearer`, would be another scope, and the retry would run
    /// the handler again. Scope by the authenticated principal with
    /// [`scope_with`](Self::scope_with) instead.
    pub fn scope_by_header(self, name: HeaderName) -> Self {
        self.scope_with(move |parts| {
            parts
                .headers
                .get(&name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        })
    }

    /// Scopes keys by what `scope` returns for a request: typically the
    /// authenticated principal that the authentication layer (which must run
    /// before this one) put into the request's extensions, or a tenant. So
    /// one caller's key can never return another caller's response, and a
    /// caller's refreshed credentials keep their keys. `None` is the
    /// anonymous scope, shared by every request that has none. The value is
    /// hashed before it reaches the store.
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

    /// The statuses whose responses are not stored (default
    /// [`DEFAULT_RETRYABLE_STATUSES`]); this replaces the set. Such a
    /// response is sent to the caller as is and the attempt is recorded as
    /// failed, so a retry of the same request runs the handler again (a
    /// changed request under the same key is still `422`). 5xx answers are
    /// not stored either while
    /// [`record_server_errors`](Self::record_server_errors) is on.
    ///
    /// A handler must answer these statuses only before it has done
    /// anything: if it answers `409` after charging a card, the retry
    /// charges again. Pass an empty set to store every non-5xx answer.
    ///
    /// ```
    /// use http::StatusCode;
    /// use idempotency_core::{IdempotencyChecker, MemoryStore};
    /// use idempotency_http::{DEFAULT_RETRYABLE_STATUSES, IdempotencyLayer};
    ///
    /// // The defaults, except that 404 is stored and replayed.
    /// let layer = IdempotencyLayer::new(IdempotencyChecker::new(MemoryStore::new()))
    ///     .retryable_statuses(DEFAULT_RETRYABLE_STATUSES.into_iter().filter(|s| *s != StatusCode::NOT_FOUND));
    /// # let _ = layer;
    /// ```
    pub fn retryable_statuses(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses = statuses.into_iter().collect();
        self.options(|o| o.retryable = statuses)
    }

    /// The longest `Retry-After` of a `409` for a key whose attempt still
    /// runs (default [`DEFAULT_MAX_RETRY_AFTER`], 60 s). The header says when
    /// the running attempt's lease runs out (at least 1 s, rounded up, at
    /// most this): the latest moment its key is either done or free to take
    /// over. A crashed attempt holds its key that long; a live one renews its
    /// lease and may finish much sooner, so a shorter lease
    /// (`lease` of the layer's checker) gives tighter hints.
    pub fn max_retry_after(self, bound: Duration) -> Self {
        self.options(|o| o.max_retry_after = bound)
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
    S::Error: Send + 'static,
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
    /// A status that is not stored (a 5xx, or one of the retryable
    /// statuses): recorded as failed so a retry runs again; sent as is.
    NotStored(Response<Body>),
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
            Self::NotStored(r) => write!(f, "the handler answered {} (not stored)", r.status()),
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
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let options = &layer.options;
    if !options.methods.contains(request.method()) {
        return inner.call(request).await.map(into_body);
    }
    let key = match idempotency_key(request.headers()) {
        Ok(Some(key)) => key,
        Err(error) => return Ok(problem(StatusCode::BAD_REQUEST, &error.to_string())),
        Ok(None) if options.required => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "this endpoint requires an Idempotency-Key header",
            ));
        }
        Ok(None) => return inner.call(request).await.map(into_body),
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
    // for a different request: another query string or body. (Without a
    // query, `path_and_query` is the path: fingerprints of query-less
    // requests are what they were before the query counted.)
    let target = parts
        .uri
        .path_and_query()
        .map_or(path, |target| target.as_str());
    let stored_key = idempotency_core::__private::sha256_hex(
        format!("{method}\n{path}\n{scope}\n{key}").as_bytes(),
    );
    let mut fingerprint_input = format!("{method}\n{target}\n").into_bytes();
    fingerprint_input.extend_from_slice(&body);
    let attempt = AttemptRequest {
        operation: format!("{method} {path}"),
        stored_key,
        fingerprint: idempotency_core::__private::sha256_hex(&fingerprint_input),
        parts,
        body,
    };

    // The attempt runs as a task of its own: once it has started, it
    // finishes (and records its outcome) even if the client goes away and
    // hyper drops this future. Retries meanwhile get 409, then the replay.
    let future = run_attempt(layer, inner, attempt);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Not on a tokio runtime: the attempt runs inside this future.
        return future.await;
    };
    match runtime.spawn(future).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Ok(retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down; the request may be taken over by a retry",
            5,
        )),
    }
}

/// What the spawned attempt needs, owned.
struct AttemptRequest {
    operation: String,
    stored_key: String,
    fingerprint: String,
    parts: Parts,
    body: Bytes,
}

async fn run_attempt<S, B>(
    layer: IdempotencyLayer,
    mut inner: S,
    request: AttemptRequest,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>> + Send,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let AttemptRequest {
        operation,
        stored_key,
        fingerprint,
        parts,
        body,
    } = request;
    let keyed = KeyedRequest::new(&stored_key)
        .event_type(&operation)
        .fingerprint(fingerprint)
        .on_duplicate(DuplicatePolicy::Replay)
        .on_in_progress(InProgressPolicy::Error);

    let options = &layer.options;
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
            let stored = StoredResponse::new(&parts, &body, options.max_response_body);
            let response = Response::from_parts(parts, Body::from(body));
            if options.is_retryable(response.status()) {
                return Err(Attempt::NotStored(response));
            }
            live = Some(response);
            Ok(stored)
        })
        .await;

    Ok(match outcome {
        Ok(Processed::Executed(stored)) => live.unwrap_or_else(|| stored.into_replay()),
        Ok(Processed::Replayed(stored)) => stored.into_replay(),
        Err(Attempt::NotStored(response)) => response,
        Err(Attempt::Inner(error)) => return Err(error),
        Err(Attempt::Body(error)) => {
            tracing::warn!(%error, "the response body could not be read");
            problem(
                StatusCode::BAD_GATEWAY,
                "the response body could not be read",
            )
        }
        Err(Attempt::Idempotency(error)) => refusal(&layer, &stored_key, &error).await,
    })
}

/// The answer when the checker refused the request or failed.
async fn refusal(
    layer: &IdempotencyLayer,
    stored_key: &str,
    error: &IdempotencyError,
) -> Response<Body> {
    match error {
        IdempotencyError::InProgress { .. } => retry_later(
            StatusCode::CONFLICT,
            "a request with this Idempotency-Key is still being processed",
            lease_wait(layer, stored_key).await,
        ),
        IdempotencyError::LeaseLost { .. } => retry_later(
            StatusCode::CONFLICT,
            "this request took too long and was taken over by a retry",
            lease_wait(layer, stored_key).await,
        ),
        IdempotencyError::FingerprintMismatch { .. } => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was already used with a different request",
        ),
        IdempotencyError::InvalidKey { reason } => problem(
            StatusCode::BAD_REQUEST,
            &format!("invalid Idempotency-Key: {reason}"),
        ),
        IdempotencyError::StoreUnavailable { .. } | IdempotencyError::CircuitOpen { .. } => {
            tracing::warn!(error = %error.redacted(), "idempotency store unavailable; request refused");
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "the idempotency store is unavailable; the request was not processed",
                5,
            )
        }
        IdempotencyError::StoreRefused {
            reason: StoreRefusal::OutOfMemory,
            ..
        } => {
            tracing::error!(error = %error.redacted(), "idempotency store out of memory; request refused");
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "the idempotency store is full; the request was not processed",
                30,
            )
        }
        IdempotencyError::ResultNotStored { .. } => {
            tracing::error!(error = %error.redacted(), "a completed request has no stored response");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a request with this Idempotency-Key was already processed, but its response was \
                 not stored and cannot be replayed",
            )
        }
        other => {
            tracing::error!(error = %other.redacted(), "idempotency layer error");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request could not be processed",
            )
        }
    }
}

/// Seconds until the lease of the attempt holding `stored_key` runs out,
/// rounded up, within `1..=max_retry_after`; 1 when it cannot be read (the
/// attempt may have finished meanwhile).
async fn lease_wait(layer: &IdempotencyLayer, stored_key: &str) -> u64 {
    let max = layer.options.max_retry_after.as_secs().max(1);
    let Ok(Some(record)) = layer.checker.get_record(stored_key).await else {
        return 1;
    };
    let Some(expires_at) = record
        .lease_expires_at
        .filter(|_| record.status == RecordStatus::Processing)
    else {
        return 1;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let left_ms = expires_at.timestamp_millis().saturating_sub(now);
    let left_s = u64::try_from(left_ms).unwrap_or(0).div_ceil(1000);
    left_s.clamp(1, max)
}

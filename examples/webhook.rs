//! An axum server with every HTTP flavour of idempotency.
//!
//! Run with: `cargo run --example webhook --features http`
//! (`PORT` defaults to 3000; the store is Redis when `REDIS_URL` is set, else
//! in-process memory). Then, for example:
//!
//! ```text
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer alice-token-1' \
//!      -H 'Idempotency-Key: "pay-1"' -H 'Content-Type: application/json' -d '{"amount": 1200}'
//! # the same again: the same 201 and body, with Idempotent-Replayed: true
//! curl -i -X POST localhost:3000/webhooks/events -H 'Content-Type: application/json' \
//!      -d '{"event_id":"evt-1","event_type":"invoice.paid","payload":{"invoice":7}}'
//! curl -i -X POST localhost:3000/api/v1/events -H 'Content-Type: application/json' -d '{"a":1,"b":2}'
//! curl localhost:3000/stats
//! curl localhost:3000/metrics
//! ```
//!
//! Routes:
//! - `POST /payments`: behind an authentication layer (demo bearer tokens:
//!   `alice-token-1` and its refreshed `alice-token-2` are user `alice`,
//!   `bob-token-1` is `bob`; anything else is 401) and, inside it,
//!   `IdempotencyLayer` (key required, scoped by the authenticated user, so
//!   a refreshed token keeps its keys); answers 201 `{"id": .., "amount": ..}`.
//!   Demo switches in the body: `"delay_ms"` slows the handler down, and
//!   `"fail_first": n` makes the first `n` attempts for a key answer 500.
//! - `POST /webhooks/events`: an `EventEnvelope` handled by an `#[idempotent]`
//!   function; the key is the `Idempotency-Key` header if present, else the
//!   envelope's (`EventEnvelope::require_key`: an envelope with neither an
//!   `idempotency_key` nor an `event_id` is 400). Answers 200 with a JSON receipt.
//! - `POST /api/v1/events`: dedup for events without keys: the key is the
//!   SHA-256 of the body's canonical JSON; 202 the first time, 409 for a
//!   duplicate within 7 days, decided by one atomic claim.
//! - `GET /health`: 200 when the store answers, 503 when not.
//! - `GET /stats`: how many times each handler really ran.
//! - `GET /metrics`: the framework's metrics (executed, replayed, store and
//!   handler latency, ...) in the Prometheus text format, through the
//!   `metrics` facade and `metrics-exporter-prometheus`.
//!
//! Logs go to stderr through `tracing-subscriber`; `RUST_LOG` filters them
//! (default `info`; `RUST_LOG=idempotency=debug` shows every claim).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotency::http::{IDEMPOTENCY_KEY_HEADER, IdempotencyLayer, idempotency_key};
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, IdempotencyStore,
    KeyedRequest, MemoryStore, Processed, RedisStore, fingerprint, idempotent,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What each handler really did, for `GET /stats`.
#[derive(Debug, Default)]
pub struct Counters {
    payments_executed: AtomicU64,
    webhook_events_executed: AtomicU64,
    events_accepted: AtomicU64,
    events_duplicate: AtomicU64,
    /// Attempts per payment key, for the `fail_first` demo switch.
    payment_attempts: Mutex<HashMap<String, u32>>,
}

/// The application state: one checker per use, all on one store.
#[derive(Debug, Clone)]
pub struct AppState {
    webhooks: IdempotencyChecker,
    dedup: IdempotencyChecker,
    counters: Arc<Counters>,
}

/// Builds the router over `store`.
pub fn app(store: Arc<dyn IdempotencyStore>) -> Result<Router, IdempotencyError> {
    // Install the recorder before any checker counts anything.
    let _ = prometheus();
    let http = IdempotencyChecker::from_shared(
        Arc::clone(&store),
        IdempotencyConfig::builder()
            .key_prefix("idempotency:http:")
            .build()?,
    );
    let state = AppState {
        webhooks: IdempotencyChecker::from_shared(Arc::clone(&store), IdempotencyConfig::default()),
        dedup: IdempotencyChecker::from_shared(
            store,
            IdempotencyConfig::builder()
                .key_prefix("idempotency:dedup:")
                .ttl("7d")
                .build()?,
        ),
        counters: Arc::default(),
    };
    // The idempotency layer on the method (`post(..).route_layer(..)`): a
    // method the route does not serve gets the router's 405 without it. The
    // authentication layer wraps the route, so it runs first and the
    // idempotency layer is scoped by the user it verified.
    let idempotency = IdempotencyLayer::new(http)
        .scope_with(|parts| parts.extensions.get::<UserId>().map(|u| u.0.clone()));
    let payments = Router::new()
        .route("/payments", post(create_payment).route_layer(idempotency))
        .route_layer(middleware::from_fn(authenticate));
    Ok(Router::new()
        .merge(payments)
        .route("/webhooks/events", post(receive_webhook))
        .route("/api/v1/events", post(accept_event))
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(state))
}

/// The authenticated caller, put into the request's extensions by
/// [`authenticate`]: what idempotency keys are scoped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(pub String);

/// Demo credentials: bearer tokens and the user each belongs to. A real
/// service verifies a JWT or looks the token up; what matters here is that a
/// refreshed token (`alice-token-2`) is the same user.
const TOKENS: [(&str, &str); 3] = [
    ("alice-token-1", "alice"),
    ("alice-token-2", "alice"),
    ("bob-token-1", "bob"),
];

/// Authenticates `Authorization: Bearer <token>` (the scheme in any case,
/// RFC 9110) and records the user as a [`UserId`] extension; 401 otherwise.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, token)| TOKENS.iter().find(|(known, _)| *known == token.trim()))
        .map(|(_, user)| UserId((*user).to_owned()));
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
            Json(json!({ "error": "unknown or missing bearer token" })),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct PaymentRequest {
    amount: u64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    fail_first: u32,
}

#[derive(Serialize)]
struct Payment {
    id: u64,
    amount: u64,
}

async fn create_payment(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<PaymentRequest>,
) -> Response {
    let key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let attempt = {
        let mut attempts = state
            .counters
            .payment_attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = attempts.entry(key).or_default();
        *n += 1;
        *n
    };
    tokio::time::sleep(Duration::from_millis(request.delay_ms)).await;
    if attempt <= request.fail_first {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "payment gateway unavailable",
        )
            .into_response();
    }
    let id = state
        .counters
        .payments_executed
        .fetch_add(1, Ordering::SeqCst)
        + 1;
    (
        StatusCode::CREATED,
        Json(Payment {
            id,
            amount: request.amount,
        }),
    )
        .into_response()
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    event_id: String,
    event_type: String,
    processed: u64,
}

/// Errors of the webhook handler, as HTTP answers.
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let Self::Idempotency(error) = self;
        let status = match &error {
            IdempotencyError::InProgress { .. } => StatusCode::CONFLICT,
            IdempotencyError::FingerprintMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            IdempotencyError::InvalidKey { .. } | IdempotencyError::MissingKey => {
                StatusCode::BAD_REQUEST
            }
            IdempotencyError::StoreUnavailable { .. }
            | IdempotencyError::CircuitOpen { .. }
            | IdempotencyError::StoreRefused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": error.to_string() }))).into_response()
    }
}

/// Runs once per key; a redelivered webhook gets the first receipt.
#[idempotent(checker = state.webhooks, key = key, ttl = "24h")]
async fn handle_event(
    state: &AppState,
    key: String,
    envelope: EventEnvelope,
) -> Result<Receipt, WebhookError> {
    let processed = state
        .counters
        .webhook_events_executed
        .fetch_add(1, Ordering::SeqCst)
        + 1;
    Ok(Receipt {
        event_id: envelope.event_id,
        event_type: envelope.event_type,
        processed,
    })
}

async fn receive_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(envelope): Json<EventEnvelope>,
) -> Result<Json<Receipt>, Response> {
    // The header's key if present (two header lines are refused), else the
    // envelope's by the one rule of `require_key`: an envelope with no key
    // is MissingKey, an empty `idempotency_key` InvalidKey, both 400.
    let key = match idempotency_key(&headers) {
        Ok(Some(key)) => key,
        Ok(None) => envelope
            .require_key()
            .map_err(|error| WebhookError::from(error).into_response())?
            .to_owned(),
        Err(error) => {
            return Err((
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": error.to_string() })),
            )
                .into_response());
        }
    };
    handle_event(&state, key, envelope)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

async fn accept_event(State(state): State<AppState>, Json(event): Json<Value>) -> Response {
    // The event's content hash (SHA-256 of its canonical JSON) is its key.
    let id = match fingerprint(&event) {
        Ok(id) => id,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": error.to_string() })),
            )
                .into_response();
        }
    };
    let counters = &state.counters;
    let outcome = state
        .dedup
        .process_request(
            KeyedRequest::new(&id).event_type("api.v1.event"),
            |_| async {
                counters.events_accepted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            },
        )
        .await;
    match outcome {
        Ok(Processed::Executed(())) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "accepted", "id": id })),
        )
            .into_response(),
        Ok(Processed::Replayed(())) | Err(IdempotencyError::InProgress { .. }) => {
            counters.events_duplicate.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::CONFLICT,
                Json(json!({ "status": "duplicate", "id": id })),
            )
                .into_response()
        }
        Err(error) => WebhookError::from(error).into_response(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    match state.webhooks.health_check().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "error": error.to_string() })),
        )
            .into_response(),
    }
}

async fn stats(State(state): State<AppState>) -> Json<Value> {
    let c = &state.counters;
    Json(json!({
        "payments_executed": c.payments_executed.load(Ordering::SeqCst),
        "webhook_events_executed": c.webhook_events_executed.load(Ordering::SeqCst),
        "events_accepted": c.events_accepted.load(Ordering::SeqCst),
        "events_duplicate": c.events_duplicate.load(Ordering::SeqCst),
    }))
}

/// The process-wide Prometheus recorder behind the `metrics` facade,
/// installed on first use (`None` if another recorder was installed first).
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

async fn metrics() -> Response {
    match prometheus() {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a subscriber the framework's warnings ("terminated", "store
    // unavailable", ...) go nowhere.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let store: Arc<dyn IdempotencyStore> = match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("store: Redis at {url}");
            Arc::new(RedisStore::connect(&url).await?)
        }
        Err(_) => {
            println!("store: in-process memory (set REDIS_URL to use Redis)");
            Arc::new(MemoryStore::new())
        }
    };
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(store)?).await?;
    Ok(())
}

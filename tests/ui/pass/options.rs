//! Every option, on free functions, methods, generics and references.
use idempotency::{
    idempotent, EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError,
    MemoryStore,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Serialize, Deserialize, Clone)]
struct Order {
    tenant: String,
    amount: u64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("rejected")]
    Rejected,
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

fn checker() -> &'static IdempotencyChecker {
    static CHECKER: std::sync::OnceLock<IdempotencyChecker> = std::sync::OnceLock::new();
    CHECKER.get_or_init(|| IdempotencyChecker::new(MemoryStore::new()))
}

/// Doc comments and other attributes are kept.
#[must_use = "the receipt matters"]
#[idempotent(
    ttl = "1h30m",
    lease = "30s",
    key = format!("{}:{}", envelope.payload.tenant, envelope.event_id),
    checker = checker(),
    on_duplicate = "replay",
    on_in_progress = "wait",
    crate = "idempotency",
)]
pub async fn charge(envelope: EventEnvelope<Order>) -> Result<u64, AppError> {
    if envelope.payload.amount == 0 {
        return Err(AppError::Rejected);
    }
    Ok(envelope.payload.amount)
}

#[idempotent(checker = checker(), on_duplicate = "error", on_in_progress = "error")]
async fn by_reference<P: Serialize + Sync>(envelope: &EventEnvelope<P>) -> Result<String, AppError>
where
    P: Clone,
{
    Ok(envelope.event_type.clone())
}

/// The longest durations core accepts (3650 days) compile, and core
/// accepts them when called: the macro's copy of the bound and core's agree.
#[idempotent(checker = checker(), ttl = "3650d", lease = "3650d")]
async fn at_the_max(envelope: EventEnvelope<Order>) -> Result<u64, AppError> {
    Ok(envelope.payload.amount)
}

/// The shortest durations core accepts compile.
#[idempotent(checker = checker(), ttl = "1ms", lease = "1ms")]
async fn at_the_min(envelope: EventEnvelope<Order>) -> Result<u64, AppError> {
    Ok(envelope.payload.amount)
}

#[idempotent(checker = checker())]
async fn marked(note: EventEnvelope<()>, #[envelope] order: EventEnvelope<Order>) -> Result<u64, AppError> {
    let _ = note;
    Ok(order.payload.amount)
}

struct Service {
    checker: Arc<IdempotencyChecker>,
}

impl Service {
    #[idempotent(checker = self.checker, ttl = "1d")]
    async fn handle(&self, envelope: EventEnvelope<Order>) -> Result<u64, AppError> {
        Ok(envelope.payload.amount * 2)
    }
}

#[tokio::main]
async fn main() {
    let order = Order { tenant: "t1".into(), amount: 5 };
    let event = EventEnvelope::new("order.placed", order.clone());
    assert_eq!(charge(event.clone()).await.expect("runs"), 5);
    assert_eq!(charge(event.clone()).await.expect("replays"), 5);
    assert!(matches!(
        charge(EventEnvelope::new("order.placed", Order { tenant: "t".into(), amount: 0 })).await,
        Err(AppError::Rejected)
    ));
    assert_eq!(by_reference(&event).await.expect("runs"), "order.placed");
    assert!(matches!(
        by_reference(&event).await,
        Err(AppError::Idempotency(IdempotencyError::Duplicate { .. }))
    ));
    let other = EventEnvelope::new("order.placed", order);
    assert_eq!(marked(EventEnvelope::new("note", ()), other).await.expect("runs"), 5);
    let longest = EventEnvelope::new("order.placed", Order { tenant: "t2".into(), amount: 7 });
    assert_eq!(at_the_max(longest.clone()).await.expect("core accepts the max"), 7);
    assert_eq!(at_the_max(longest).await.expect("replays"), 7);
    let _ = at_the_min;

    let config = IdempotencyConfig::builder().ttl("1h").build().expect("config");
    let service = Service { checker: Arc::new(IdempotencyChecker::with_config(MemoryStore::new(), config)) };
    assert_eq!(service.handle(event.clone()).await.expect("runs"), 10);
    assert_eq!(service.checker.stats().executed, 1);
}

//! Bare `#[idempotent]` uses the default checker, and says so clearly when
//! none is installed.
use idempotency::{idempotent, EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore};

#[idempotent]
async fn handle(envelope: EventEnvelope) -> Result<String, IdempotencyError> {
    Ok(envelope.event_id)
}

#[tokio::main]
async fn main() {
    let event = EventEnvelope::new("t", serde_json::json!(null));
    let missing = handle(event.clone()).await;
    assert!(matches!(missing, Err(IdempotencyError::NoDefaultChecker)), "{missing:?}");
    assert!(missing.unwrap_err().to_string().contains("set_default_checker"));

    idempotency::set_default_checker(IdempotencyChecker::new(MemoryStore::new())).expect("once");
    assert_eq!(handle(event.clone()).await.expect("runs"), event.event_id);
    assert_eq!(idempotency::default_checker().expect("set").stats().executed, 1);
}

use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent(ttl = "1h")]
async fn handle(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let count: u32 = envelope.event_type;
    Ok(count)
}

fn main() {}

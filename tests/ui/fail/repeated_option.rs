use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent(ttl = "1h", ttl = "2h")]
async fn handle(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

fn main() {}

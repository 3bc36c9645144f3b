use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent]
fn handle(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

fn main() {
    // The item is still emitted next to the error, so this call resolves.
    let _ = handle;
}

use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent(on_duplicate = "skip")]
async fn bad_duplicate(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(on_in_progress = "retry")]
async fn bad_in_progress(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

fn main() {
    // The item is still emitted next to the error, so this call resolves.
    let _ = bad_duplicate;
    let _ = bad_in_progress;
}

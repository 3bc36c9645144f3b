use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent]
async fn handle(first: EventEnvelope, second: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = (first, second);
    Ok(1)
}

#[idempotent]
async fn marked_twice(
    #[envelope] first: EventEnvelope,
    #[envelope] second: EventEnvelope,
) -> Result<u32, IdempotencyError> {
    let _ = (first, second);
    Ok(1)
}

#[idempotent]
async fn destructured(EventEnvelope { payload, .. }: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = payload;
    Ok(1)
}

fn main() {}

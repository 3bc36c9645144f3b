use idempotency::{idempotent, EventEnvelope, IdempotencyError};

#[idempotent(ttl = "24x")]
async fn unparseable(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(lease = "0s")]
async fn zero(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(ttl = 24)]
async fn not_a_string(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(ttl = "20y")]
async fn longer_than_the_stores_accept(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(lease = "500us")]
async fn shorter_than_a_millisecond(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

// One millisecond past the longest duration core accepts (3650 days): the
// macro's copy of the bound must not drift from core's.
#[idempotent(ttl = "3650d 1ms")]
async fn ttl_just_past_the_max(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

#[idempotent(lease = "3650d 1ms")]
async fn lease_just_past_the_max(envelope: EventEnvelope) -> Result<u32, IdempotencyError> {
    let _ = envelope;
    Ok(1)
}

fn main() {}

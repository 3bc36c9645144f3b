use idempotency::{idempotent, EventEnvelope};

#[idempotent]
async fn returns_value(envelope: EventEnvelope) -> u32 {
    let _ = envelope;
    1
}

#[idempotent]
async fn returns_nothing(envelope: EventEnvelope) {
    let _ = envelope;
}

fn main() {}

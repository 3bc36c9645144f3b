use idempotency::{idempotent, IdempotencyError};

#[idempotent]
async fn handle(order_id: u64) -> Result<u64, IdempotencyError> {
    Ok(order_id)
}

fn main() {}

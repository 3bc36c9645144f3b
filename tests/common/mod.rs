//! Test support: the real servers come from the `idempotency-test-support`
//! crate (re-exported here, so tests say `common::RedisServer`); the store
//! wrapper and the race worker below need the `idempotency` crate itself.
#![allow(dead_code, unused_imports, unreachable_pub)]

mod instrumented;
mod races;

pub use idempotency_test_support::*;
pub use instrumented::Instrumented;
pub use races::process_each_key;

use std::time::{Duration, Instant};

/// Waits until `done()`, checking every 20 ms; panics after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

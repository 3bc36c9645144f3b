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

/// `on_each_kind!(name)` or `on_each_kind!(name, flavor = "multi_thread",
/// worker_threads = 2)`: the tests `name::on_redis` and `name::on_valkey`,
/// each running `name(kind).await` in a `#[tokio::test(..)]` with the given
/// arguments. One test body, run on Redis 7 (completions by the compare
/// script) and on Valkey 9 (completions by `SET ... IFEQ`).
#[macro_export]
macro_rules! on_each_kind {
    ($name:ident $(, $($tokio:tt)*)?) => {
        mod $name {
            #[tokio::test($($($tokio)*)?)]
            async fn on_redis() {
                super::$name($crate::common::ServerKind::Redis).await;
            }

            #[tokio::test($($($tokio)*)?)]
            async fn on_valkey() {
                super::$name($crate::common::ServerKind::Valkey).await;
            }
        }
    };
}

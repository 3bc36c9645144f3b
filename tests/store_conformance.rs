//! Every store passes the same conformance suite (`tests/common/conformance.rs`),
//! one test per rule and store.

mod common;

use std::sync::Arc;

use common::RedisServer;
use idempotency::{IdempotencyStore, MemoryStore, RedisStore};

/// Generates, for each conformance function, a module with one test per store.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    let (_server, store) = super::memory().await;
                    common::conformance::$name(store.as_ref()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    let (_server, store) = super::redis().await;
                    common::conformance::$name(store.as_ref()).await;
                }
            }
        )*
    };
}

type Backend = (Option<RedisServer>, Arc<dyn IdempotencyStore>);

async fn memory() -> Backend {
    (None, Arc::new(MemoryStore::new()))
}

async fn redis() -> Backend {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url())
        .await
        .expect("connect to test redis");
    (Some(server), Arc::new(store))
}

mod concurrent_claims_have_one_winner {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory() {
        let (_server, store) = super::memory().await;
        common::conformance::concurrent_claims_have_one_winner(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        let (_server, store) = super::redis().await;
        common::conformance::concurrent_claims_have_one_winner(store).await;
    }
}

conformance!(
    absent_key_is_acquired_as_attempt_one,
    live_lease_is_in_progress,
    completed_is_duplicate_with_exact_result,
    failed_is_reclaimed_with_next_attempt,
    expired_lease_is_taken_over_and_stale_holder_cannot_write,
    renew_keeps_the_lease_alive,
    retried_claim_with_own_token_is_acquired,
    repeated_fail_succeeds_and_completed_takes_no_write,
    unknown_lease_writes_nothing,
    fingerprints_guard_key_reuse,
    records_expire_after_ttl,
    processing_record_outlives_a_short_ttl,
    get_and_delete,
    renewed_record_outlives_its_first_lease,
    empty_strings_mean_absent,
    marks_are_new_once_and_answer_in_order,
    marks_detect_repeats_within_a_batch,
    contains_reads_without_marking,
    marks_expire_after_ttl,
    a_mark_is_a_completed_record_claimed_as_duplicate,
);

mod concurrent_marks_have_one_winner {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory() {
        let (_server, store) = super::memory().await;
        common::conformance::concurrent_marks_have_one_winner(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        let (_server, store) = super::redis().await;
        common::conformance::concurrent_marks_have_one_winner(store).await;
    }
}

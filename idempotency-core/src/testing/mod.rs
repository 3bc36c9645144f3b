//! The store conformance suite: the contract of [`IdempotencyStore`],
//! [`SeenSet`] and [`StoreAdmin`] as runnable checks, shipped so that every
//! store, in this repository or not, is held to the same rules.
//!
//! Enabled by the `testing` feature (add `idempotency-core` with
//! `features = ["testing"]` to your `[dev-dependencies]`). Each rule is a
//! public async function over a store that panics, like an `assert!`, when
//! the store breaks the rule; [`concurrent_claims_have_one_winner`] and
//! [`concurrent_marks_have_one_winner`] take an `Arc` because they spawn tasks.
//! The rules use keys starting with `c:`, `m:` and `a:` and expect none of
//! them to exist; give each rule an empty store. The record rules take
//! `&dyn IdempotencyStore`, the `marks_*` rules `&dyn SeenSet` and the
//! `admin_*` rules `&dyn StoreAdmin`; the macros run them all, so a store
//! that implements only [`IdempotencyStore`] calls its rules one by one.
//!
//! Three ways to run them:
//! - [`store_conformance_tests!`](crate::store_conformance_tests): one
//!   `#[tokio::test]` per rule and store, the simplest for a store author;
//! - [`for_each_conformance_rule!`](crate::for_each_conformance_rule): the
//!   list of rules, handed to a macro of your
//!   own (to run them in one test on one costly server, say);
//! - the functions one by one.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use idempotency_core::{MemoryStore, testing};
//!
//! testing::absent_key_is_acquired_as_attempt_one(&MemoryStore::new()).await;
//! testing::marks_detect_repeats_within_a_batch(&MemoryStore::new()).await;
//! # }
//! ```

use std::time::Duration;

use crate::{ClaimOutcome, ClaimRequest, IdempotencyStore, Lease, SeenSet, StoreAdmin};

// The rules, one file per trait; every rule is a function of this module.
mod admin;
mod records;
mod seen;

pub use admin::*;
pub use records::*;
pub use seen::*;

/// Calls the macro `$then` with every conformance rule that takes
/// a reference to the store, as `$then!(rule, rule, ...);`: the names of the
/// functions of [`testing`](crate::testing), to call as
/// `idempotency_core::testing::$rule(store)`. The two concurrency rules,
/// which take an `Arc`, are not in the list.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use idempotency_core::MemoryStore;
///
/// macro_rules! run_all {
///     ($($rule:ident),* $(,)?) => {
///         $(idempotency_core::testing::$rule(&MemoryStore::new()).await;)*
///     };
/// }
/// idempotency_core::for_each_conformance_rule!(run_all);
/// # }
/// ```
#[macro_export]
macro_rules! for_each_conformance_rule {
    ($then:ident) => {
        $crate::__conformance_rule_list!([$then] []);
    };
}

/// The one list of rules, calling `$callback!($extra rule, rule, ...)`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_rule_list {
    ([$($callback:tt)*] [$($extra:tt)*]) => {
        $($callback)*!(
            $($extra)*
            absent_key_is_acquired_as_attempt_one,
            live_lease_is_in_progress,
            completed_is_duplicate_with_exact_result,
            a_null_result_is_stored_as_null,
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
            keys_are_opaque_text,
            marks_are_new_once_and_answer_in_order,
            marks_detect_repeats_within_a_batch,
            contains_reads_without_marking,
            marks_expire_after_ttl,
            a_mark_is_a_completed_record_claimed_as_duplicate,
            admin_lists_stuck_records_under_a_prefix,
            admin_summarizes_records_by_status,
            admin_clears_exactly_the_prefix,
        );
    };
}

/// Generates the whole conformance suite as tests: for each rule, a module
/// named after it with one `#[tokio::test]` per store, named after the store
/// (so `cargo test absent_key` runs one rule on every store, and
/// `cargo test ::memory` one store on every rule).
///
/// Each store is given as `name => constructor`, where `constructor` is an
/// async fn of the module that invokes the macro, taking nothing and
/// returning `(guard, Arc<store>)`: the guard (a server process, a
/// temporary directory, `()`) is held until the test ends, and the store is
/// any [`ConformanceStore`] (a fresh one per call: the rules expect an empty
/// store). The tests run on tokio's multi-thread runtime, so the crate that
/// invokes the macro needs `tokio` with the `macros` and `rt-multi-thread`
/// features.
///
/// ```
/// use std::sync::Arc;
/// use idempotency_core::MemoryStore;
///
/// async fn memory() -> ((), Arc<MemoryStore>) {
///     ((), Arc::new(MemoryStore::new()))
/// }
///
/// idempotency_core::store_conformance_tests!(memory => memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($($store:ident => $constructor:ident),+ $(,)?) => {
        $crate::__conformance_rule_list!(
            [$crate::__conformance_rule_tests]
            [[$($store => $constructor),+];]
        );

        mod concurrent_claims_have_one_winner {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $store() {
                    let (_guard, store) = super::$constructor().await;
                    $crate::testing::concurrent_claims_have_one_winner(store).await;
                }
            )+
        }

        mod concurrent_marks_have_one_winner {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $store() {
                    let (_guard, store) = super::$constructor().await;
                    $crate::testing::concurrent_marks_have_one_winner(store).await;
                }
            )+
        }
    };
}

/// One module per rule, for [`store_conformance_tests!`](crate::store_conformance_tests).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_rule_tests {
    ($stores:tt; $($rule:ident),* $(,)?) => {
        $($crate::__conformance_rule_module!($rule $stores);)*
    };
}

/// One rule's module: one test per store.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_rule_module {
    ($rule:ident [$($store:ident => $constructor:ident),+]) => {
        mod $rule {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $store() {
                    let (_guard, store) = super::$constructor().await;
                    $crate::testing::$rule(&*store).await;
                }
            )+
        }
    };
}

/// A store with every capability the suite checks: records
/// ([`IdempotencyStore`]), marks ([`SeenSet`]) and the operator's view
/// ([`StoreAdmin`]). Implemented for every such type, so that stores of
/// different types can share one `Arc<dyn ConformanceStore>`.
pub trait ConformanceStore: SeenSet + StoreAdmin {}

impl<T: SeenSet + StoreAdmin + ?Sized> ConformanceStore for T {}

const LONG: Duration = Duration::from_secs(60);

/// A claim request for `key` under `token`, with event id `evt-1`, event
/// type `test.event`, no fingerprint, and a 60 s lease and ttl: what the
/// rules claim with, for a store's own tests too.
pub fn claim_request<'a>(key: &'a str, token: &'a str) -> ClaimRequest<'a> {
    let mut request = ClaimRequest::new(key, token, LONG, LONG);
    request.event_id = Some("evt-1");
    request.event_type = Some("test.event");
    request
}

/// The JSON text of `value`: what [`IdempotencyStore::complete`] takes,
/// for a store's own tests too. Panics on a value nested deeper than
/// [`ResultJson`](crate::ResultJson) allows (100 levels).
pub fn json_text(value: &serde_json::Value) -> crate::ResultJson<'static> {
    crate::ResultJson::new(value.to_string()).expect("JSON nested at most 100 levels")
}

async fn acquire(store: &dyn IdempotencyStore, req: &ClaimRequest<'_>) -> Lease {
    match store.claim(req).await.expect("claim") {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

//! The conformance suite shipped in `idempotency_core::testing`, every rule,
//! against [`HashMapStore`]: the store written with public API only.

use std::sync::Arc;

use idempotency_store_example::HashMapStore;

/// A fresh store per test; nothing to keep alive beside it.
async fn hash_map() -> ((), Arc<HashMapStore>) {
    ((), Arc::new(HashMapStore::new()))
}

idempotency_core::store_conformance_tests!(hash_map => hash_map);

/// The checker hands a store `None` for an absent event id, event type or
/// fingerprint, never `Some("")`: this store writes exactly what it is
/// given, so an empty string would show up in the record.
#[tokio::test]
async fn the_checker_passes_absent_fields_as_none() {
    use idempotency_core::{IdempotencyChecker, IdempotencyError, IdempotencyStore, KeyedRequest};

    let store = Arc::new(HashMapStore::new());
    let checker = IdempotencyChecker::from_shared(store.clone(), Default::default());
    let request = KeyedRequest::new("k")
        .event_id("")
        .event_type("")
        .fingerprint("");
    checker
        .process_request(request, |_| async {
            let record = store
                .get(&checker.storage_key("k")?)
                .await?
                .expect("the claim wrote a record");
            assert_eq!(record.event_id, None);
            assert_eq!(record.event_type, None);
            assert_eq!(record.fingerprint, None);
            Ok::<_, IdempotencyError>(())
        })
        .await
        .expect("processed");
}

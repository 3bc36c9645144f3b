//! The conformance suite shipped in `idempotency_core::testing`, every rule,
//! against [`HashMapStore`]: the store written with public API only.

use std::sync::Arc;

use idempotency_store_example::HashMapStore;

/// A fresh store per test; nothing to keep alive beside it.
async fn hash_map() -> ((), Arc<HashMapStore>) {
    ((), Arc::new(HashMapStore::new()))
}

idempotency_core::store_conformance_tests!(hash_map => hash_map);

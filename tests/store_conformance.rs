//! Every store passes the same conformance suite, the one shipped in
//! `idempotency_core::testing` for any store: one test per rule and store.
//! Redis runs twice: Redis 7 (completions by the finish script) and Valkey 9
//! (completions by `SET ... IFEQ`).

mod common;

use std::sync::Arc;

use common::{RedisServer, ServerKind};
use idempotency::{MemoryStore, RedisStore};
use idempotency_core::testing::ConformanceStore;

type Backend = (Option<RedisServer>, Arc<dyn ConformanceStore>);

async fn memory() -> Backend {
    (None, Arc::new(MemoryStore::new()))
}

async fn redis() -> Backend {
    server(ServerKind::Redis).await
}

async fn valkey() -> Backend {
    server(ServerKind::Valkey).await
}

async fn server(kind: ServerKind) -> Backend {
    let server = RedisServer::start_kind(kind);
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to the test {kind:?} server: {e}"));
    (Some(server), Arc::new(store))
}

idempotency_core::store_conformance_tests!(memory => memory, redis => redis, valkey => valkey);

//! Every store passes the same conformance suite (`tests/common/conformance.rs`),
//! one test per rule and store. Redis runs twice: Redis 7 (completions by the
//! finish script) and Valkey 9 (completions by `SET ... IFEQ`).

mod common;

use std::sync::Arc;

use common::{RedisServer, ServerKind};
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

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn valkey() {
                    let (_server, store) = super::valkey().await;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn valkey() {
        let (_server, store) = super::valkey().await;
        common::conformance::concurrent_claims_have_one_winner(store).await;
    }
}

for_each_rule!(conformance);

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn valkey() {
        let (_server, store) = super::valkey().await;
        common::conformance::concurrent_marks_have_one_winner(store).await;
    }
}

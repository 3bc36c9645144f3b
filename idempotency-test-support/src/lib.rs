//! The workspace's test harness: real servers, started per test on free
//! loopback ports and killed when dropped.
//!
//! The tests in `tests/` (through `tests/common`) and the `overhead`
//! benchmark use it. Nothing here mocks a server: every type starts the real
//! binary, and a binary that is missing is a failure (a panic that says how to
//! install it), never a skip.
//!
//! | type | runs |
//! |---|---|
//! | [`RedisServer`] | one `redis-server`, or Valkey's `valkey-server` (see [`ServerKind`]) |
//! | [`TlsRedisServer`] | a `redis-server` that speaks only TLS, with a throwaway CA |
//! | [`RedisCluster`] | a 3-master Redis Cluster, or the same of Valkey |
//! | [`RedisSentinel`] | a master, a replica and a sentinel, of Redis or Valkey |
//! | [`NatsServer`] | a `nats-server -js` |
//!
//! # Example
//!
//! ```no_run
//! # async fn example() {
//! use idempotency_test_support::RedisServer;
//!
//! let server = RedisServer::start();
//! let mut conn = server.client().await;
//! let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
//! assert_eq!(pong, "PONG");
//! # }
//! ```

mod cluster;
mod nats;
mod process;
mod redis_server;
mod sentinel;
mod tls;
mod valkey;

pub use cluster::RedisCluster;
pub use nats::NatsServer;
pub use process::ServerProcess;
pub use redis_server::RedisServer;
pub use sentinel::{RedisSentinel, SENTINEL_SERVICE};
pub use tls::TlsRedisServer;
pub use valkey::{ServerKind, VALKEY_SERVER_ENV, valkey_binary};

//! The benchmark's state on one server: the connections of every contender
//! and the keys the duplicate phases cycle through.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency::{EventEnvelope, IdempotencyChecker, RedisStore};
use idempotency_test_support::RedisServer;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

use crate::peer::Peer;
use crate::problems::ok;
use crate::workload::{Job, Payload, Worker, envelope, uuid_key, via_process};
use crate::{DONE_VALUE, DUP_BASE, DUP_KEYS, PREFIX, REF_DUP_BASE, TTL_MS};

/// The benchmark's state on one Redis (or Valkey) server.
pub(crate) struct Bench {
    pub(crate) started: Instant,
    /// For FLUSHALL, INFO, CONFIG RESETSTAT and MEMORY USAGE.
    pub(crate) inspect: MultiplexedConnection,
    /// The reference's connection: the same kind and settings as `RedisStore`'s.
    pub(crate) conn: ConnectionManager,
    pub(crate) store: RedisStore,
    pub(crate) checker: IdempotencyChecker,
    pub(crate) ref_keys: Arc<[String]>,
    pub(crate) dup_envelopes: Arc<[EventEnvelope<Payload>]>,
    pub(crate) next_base: AtomicU64,
    /// The peer, `idempotent` 0.3.0, on its own connection.
    pub(crate) peer: Peer,
}

impl Bench {
    /// Connects every contender to `server`: our store (and a checker on
    /// it), the reference's connection with the same settings, the peer's
    /// store, and a plain connection for inspecting.
    pub(crate) async fn connect(server: &RedisServer, started: Instant) -> Self {
        let url = server.url();
        let store = RedisStore::connect(&url)
            .await
            .expect("connect the store to the benchmark's server");
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        // The same settings RedisStore::builder uses by default.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_write_backpressure_boundary(64 * 1024);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .expect("connect the reference client");
        let ref_keys: Arc<[String]> = (0..DUP_KEYS as u64)
            .map(|k| {
                let mut key = String::new();
                uuid_key(&mut key, PREFIX, REF_DUP_BASE + k);
                key
            })
            .collect();
        let dup_envelopes: Arc<[EventEnvelope<Payload>]> = (0..DUP_KEYS as u64)
            .map(|k| envelope(DUP_BASE + k))
            .collect();
        let peer = Peer::connect(&url, &ref_keys).await;
        Self {
            started,
            inspect: server.client().await,
            conn,
            checker: IdempotencyChecker::new(store.clone()),
            store,
            ref_keys,
            dup_envelopes,
            next_base: AtomicU64::new(0),
            peer,
        }
    }

    pub(crate) fn progress(&self, what: impl Display) {
        eprintln!("[{:>5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A worker for `job` whose fresh keys no other worker uses.
    pub(crate) fn worker(&self, job: Job) -> Worker {
        let id = self.next_base.fetch_add(1, Ordering::Relaxed) + 1;
        Worker {
            job,
            task: 0,
            base: id << 40,
            conn: self.conn.clone(),
            checker: self.checker.clone(),
            key: String::new(),
            envelope: envelope(0),
            ref_keys: Arc::clone(&self.ref_keys),
            dup_envelopes: Arc::clone(&self.dup_envelopes),
            peer: self.peer.clone(),
            burn: 0,
        }
    }

    pub(crate) async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.inspect.clone();
        ok(cmd.query_async(&mut conn).await)
    }

    pub(crate) async fn flushall(&self) {
        let _: Option<redis::Value> = self.command(redis::cmd("FLUSHALL").arg("SYNC")).await;
    }

    /// `INFO <sections>` as `name -> value`.
    pub(crate) async fn info(&self, sections: &[&str]) -> BTreeMap<String, String> {
        let mut cmd = redis::cmd("INFO");
        for section in sections {
            cmd.arg(*section);
        }
        let text: String = self.command(&cmd).await.unwrap_or_default();
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    }

    /// CPU seconds Redis's main thread has used (user + system), and the
    /// reads from client sockets it has done (`total_reads_processed`: one
    /// per batch of requests that arrived together), in one `INFO` call.
    pub(crate) async fn redis_cpu(&self) -> (f64, u64) {
        let info = self.info(&["cpu", "stats"]).await;
        let get = |name: &str| -> Option<f64> { info.get(name)?.parse().ok() };
        let cpu = get("used_cpu_user_main_thread")
            .zip(get("used_cpu_sys_main_thread"))
            .or_else(|| get("used_cpu_user").zip(get("used_cpu_sys")))
            .map_or(0.0, |(user, sys)| user + sys);
        let reads = info
            .get("total_reads_processed")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (cpu, reads)
    }

    /// All of the server's CPU seconds (every thread), for the load check
    /// in `main`.
    pub(crate) async fn server_cpu(&self) -> f64 {
        let info = self.info(&["cpu"]).await;
        let get =
            |name: &str| -> f64 { info.get(name).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
        get("used_cpu_user") + get("used_cpu_sys")
    }

    pub(crate) async fn used_memory(&self) -> i64 {
        self.info(&["memory"])
            .await
            .get("used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Writes the reference's duplicate keys and completes ours and the
    /// peer's.
    pub(crate) async fn seed_duplicates(&self) {
        let mut conn = self.conn.clone();
        for key in self.ref_keys.iter() {
            let set: redis::RedisResult<redis::Value> = redis::cmd("SET")
                .arg(key)
                .arg(DONE_VALUE)
                .arg("PX")
                .arg(TTL_MS)
                .query_async(&mut conn)
                .await;
            ok(set);
        }
        for envelope in self.dup_envelopes.iter() {
            ok(via_process(&self.checker, envelope).await);
        }
        self.peer.seed_duplicates().await;
    }
}

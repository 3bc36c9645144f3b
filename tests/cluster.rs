//! `RedisStore` over a real 3-master cluster, built by the harness
//! (`redis-server --cluster-enabled yes` on three ports, joined with
//! `redis-cli --cluster create`): the store conformance suite, the
//! exactly-once races (tasks and OS processes), and the prefix operations
//! that walk every master. Each test runs twice (`on_each_kind!`): on Redis 7,
//! whose completions take the compare script, and on a Valkey 9 cluster,
//! whose completions take `SET ... IFEQ`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{RedisCluster, RedisServer, ServerKind};
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyError, IdempotencyStore, Processed, RedisStore,
    StoreAdmin,
};
use redis::AsyncCommands;
use serde_json::json;

fn event(key: &str) -> EventEnvelope {
    EventEnvelope::new("test.event", json!({"key": key})).with_idempotency_key(key)
}

async fn store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::connect(&cluster.url())
        .await
        .unwrap_or_else(|e| panic!("connect to the test {:?} cluster: {e}", cluster.kind()))
}

/// Completions took `SET ... IFEQ` on Valkey and the compare script on Redis.
fn assert_completion_path(store: &RedisStore, kind: ServerKind) {
    assert_eq!(
        store.completes_with_set_ifeq(),
        Some(kind == ServerKind::Valkey),
        "the completion path on {kind:?}"
    );
}

on_each_kind!(
    the_cluster_passes_the_store_conformance_suite,
    flavor = "multi_thread",
    worker_threads = 2
);

/// Every conformance rule, one after another on one cluster (emptied
/// between rules): starting a cluster per rule would cost seconds each.
async fn the_cluster_passes_the_store_conformance_suite(kind: ServerKind) {
    let cluster = RedisCluster::start_kind(kind);
    let store = store(&cluster).await;
    macro_rules! run_rules {
        ($($rule:ident),* $(,)?) => {
            $(
                cluster.flush();
                eprintln!("conformance rule on the {kind:?} cluster: {}", stringify!($rule));
                idempotency_core::testing::$rule(&store).await;
            )*
        };
    }
    idempotency_core::for_each_conformance_rule!(run_rules);
    cluster.flush();
    idempotency_core::testing::concurrent_claims_have_one_winner(Arc::new(store.clone())).await;
    assert_completion_path(&store, kind);
}

on_each_kind!(
    racing_tasks_execute_each_key_once_across_the_masters,
    flavor = "multi_thread",
    worker_threads = 4
);

/// 64 tasks race on one key, and 300 keys spread over the three masters:
/// each key's handler runs once, and repeats replay the first result.
async fn racing_tasks_execute_each_key_once_across_the_masters(kind: ServerKind) {
    let cluster = RedisCluster::start_kind(kind);
    let store = store(&cluster).await;
    let checker = IdempotencyChecker::new(store.clone());

    let executions = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let checker = checker.clone();
        let executions = Arc::clone(&executions);
        tasks.push(tokio::spawn(async move {
            loop {
                let executions = Arc::clone(&executions);
                let outcome = checker
                    .process(&event("race-64"), |_| async move {
                        executions.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, IdempotencyError>("receipt".to_owned())
                    })
                    .await;
                match outcome {
                    Ok(done) => return done,
                    Err(IdempotencyError::InProgress { .. }) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    let mut executed = 0;
    for task in tasks {
        let done = task.await.expect("task");
        assert_eq!(done.value(), "receipt");
        executed += usize::from(done.was_executed());
    }
    assert_eq!(executed, 1);
    assert_eq!(executions.load(Ordering::SeqCst), 1);

    let runs: Arc<std::sync::Mutex<HashMap<usize, usize>>> = Arc::default();
    for round in 0..2 {
        let mut tasks = Vec::new();
        for key in 0..300 {
            let (checker, runs) = (checker.clone(), Arc::clone(&runs));
            tasks.push(tokio::spawn(async move {
                checker
                    .process(&event(&format!("spread-{key}")), |_| async move {
                        *runs.lock().expect("runs").entry(key).or_default() += 1;
                        Ok::<_, IdempotencyError>(key)
                    })
                    .await
                    .expect("process")
            }));
        }
        for (key, task) in tasks.into_iter().enumerate() {
            let done = task.await.expect("task");
            assert_eq!(*done.value(), key);
            assert_eq!(
                done.was_executed(),
                round == 0,
                "key {key} in round {round}"
            );
        }
    }
    let runs = runs.lock().expect("runs");
    assert_eq!(runs.len(), 300);
    assert!(runs.values().all(|n| *n == 1), "a key ran twice: {runs:?}");
    let counts = cluster.key_counts();
    assert!(
        counts.iter().all(|n| *n > 0),
        "records should live on every master: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<u64>(), 301);
    assert_completion_path(&store, kind);
}

const STORE_URL: &str = "IDEMPOTENCY_TEST_CLUSTER_URL";
const COUNTER_URL: &str = "IDEMPOTENCY_TEST_COUNTER_URL";
const KIND: &str = "IDEMPOTENCY_TEST_SERVER_KIND";
const KEYS: usize = 300;

on_each_kind!(four_processes_execute_each_key_once_on_the_cluster);

/// Four OS processes race over the same keys through the cluster; the
/// handlers count their executions on a separate plain redis-server.
async fn four_processes_execute_each_key_once_on_the_cluster(kind: ServerKind) {
    let cluster = RedisCluster::start_kind(kind);
    let counter = RedisServer::start();
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..4)
        .map(|worker| {
            std::process::Command::new(&exe)
                .args(["cluster_worker", "--exact", "--ignored", "--nocapture"])
                .env(STORE_URL, cluster.url())
                .env(COUNTER_URL, counter.url())
                .env(KIND, format!("{kind:?}"))
                .env("IDEMPOTENCY_TEST_WORKER", worker.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    for mut child in children {
        let status = child.wait().expect("worker exit");
        assert!(status.success(), "a worker failed: {status}");
    }
    let mut redis = counter.client().await;
    for key in 0..KEYS {
        let count: usize = redis
            .get(format!("test:executions:{key}"))
            .await
            .expect("GET");
        assert_eq!(count, 1, "key {key} ran {count} times");
    }
}

/// The worker half of `four_processes_execute_each_key_once_on_the_cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by four_processes_execute_each_key_once_on_the_cluster"]
async fn cluster_worker() {
    let (Ok(url), Ok(counter_url)) = (std::env::var(STORE_URL), std::env::var(COUNTER_URL)) else {
        return;
    };
    let worker: usize = std::env::var("IDEMPOTENCY_TEST_WORKER")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let kind = match std::env::var(KIND).as_deref() {
        Ok("Valkey") => ServerKind::Valkey,
        Ok("Redis") => ServerKind::Redis,
        other => panic!("${KIND} is {other:?}"),
    };
    let store = RedisStore::connect(&url).await.expect("connect");
    let checker = IdempotencyChecker::new(store.clone());
    let counter = redis::Client::open(counter_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    common::process_each_key(&checker, &counter, worker, KEYS).await;
    assert_completion_path(&store, kind);
}

on_each_kind!(
    prefix_operations_cover_every_master,
    flavor = "multi_thread",
    worker_threads = 2
);

/// `summary`, `stuck` and `clear` walk every master, not just one.
async fn prefix_operations_cover_every_master(kind: ServerKind) {
    let cluster = RedisCluster::start_kind(kind);
    let store = store(&cluster).await;
    let checker = IdempotencyChecker::new(store.clone());
    for key in 0..90 {
        let outcome = checker
            .process(&event(&format!("ops-{key}")), |_| async move {
                Ok::<_, IdempotencyError>(key)
            })
            .await
            .expect("process");
        assert_eq!(outcome, Processed::Executed(key));
    }
    assert_completion_path(&store, kind);
    let mut other = cluster.client().await;
    let _: () = other.set("unrelated", "x").await.expect("SET");

    let summary = store.summary("idempotency:events:").await.expect("summary");
    assert_eq!(summary.completed, 90);
    assert_eq!(summary.total(), 90);
    assert!(summary.memory_bytes.is_some_and(|bytes| bytes > 0));
    assert!(
        store
            .stuck("idempotency:events:")
            .await
            .expect("stuck")
            .is_empty()
    );

    assert_eq!(
        store
            .clear_prefix("idempotency:events:")
            .await
            .expect("clear"),
        90
    );
    assert_eq!(cluster.key_counts().iter().sum::<u64>(), 1);
    assert_eq!(
        store.get("idempotency:events:ops-1").await.expect("get"),
        None
    );
}

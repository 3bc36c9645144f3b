//! `RedisStore` over Redis Sentinel: a master, a replica and a sentinel
//! started by the harness. The master is SIGKILLed in the middle of a stream
//! of events; the sentinel promotes the replica and the same store, without
//! a restart, finds the new master and carries on. The failover runs twice
//! (`on_each_kind!`): on Redis 7, whose completions take the compare script,
//! and on Valkey 9 (master, replica and sentinel all `valkey-server`), whose
//! completions take `SET ... IFEQ`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RedisSentinel, ServerKind};
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, IdempotencyStore,
    RedisStore,
};
use serde_json::json;

fn event(key: &str) -> EventEnvelope {
    EventEnvelope::new("test.event", json!({"key": key})).with_idempotency_key(key)
}

on_each_kind!(
    processing_continues_after_the_master_fails_over,
    flavor = "multi_thread",
    worker_threads = 4
);

/// 20 events, then a stream of 60 from 6 tasks while the master is killed:
/// every event runs once, the first 20 replay from the promoted replica.
async fn processing_continues_after_the_master_fails_over(kind: ServerKind) {
    let mut setup = RedisSentinel::start_kind(kind);
    let old_master = setup.current_master_port();
    let store = RedisStore::builder(setup.url())
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect through the sentinel");
    let config = IdempotencyConfig::builder()
        .lease("2s")
        .build()
        .expect("config");
    let checker = IdempotencyChecker::with_config(store.clone(), config);
    let runs: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();

    // Before the failover: 20 events, replicated before the master dies
    // (WAIT, so the test does not depend on replication timing).
    let process = {
        let (checker, runs) = (checker.clone(), Arc::clone(&runs));
        move |key: usize| {
            let (checker, runs) = (checker.clone(), Arc::clone(&runs));
            async move {
                let mut failures = 0;
                loop {
                    let runs = Arc::clone(&runs);
                    let outcome = checker
                        .process(&event(&format!("fo-{key}")), |_| async move {
                            *runs.lock().expect("runs").entry(key).or_default() += 1;
                            Ok::<_, IdempotencyError>(key)
                        })
                        .await;
                    match outcome {
                        Ok(done) => return (done, failures),
                        // While the master is down, calls fail cleanly; a
                        // claim whose reply was lost shows as in progress.
                        Err(e) if e.is_retryable() => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
    };
    for key in 0..20 {
        let (done, _) = process(key).await;
        assert!(done.was_executed());
    }
    let mut master = RedisSentinel::client(old_master).await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(&mut master)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica should have the first records");

    // A stream of 60 events from 6 tasks; the master dies a moment in.
    let stream: Vec<_> = (0..6)
        .map(|task| {
            let process = process.clone();
            tokio::spawn(async move {
                let mut failures = 0;
                for i in 0..10 {
                    let (done, failed) = process(20 + task * 10 + i).await;
                    assert!(done.was_executed());
                    failures += failed;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                failures
            })
        })
        .collect();
    // The master dies once the stream has run a few events.
    common::eventually(
        Duration::from_secs(10),
        "the stream under way",
        async || runs.lock().expect("runs").len() >= 26,
    )
    .await;
    setup.kill_master();
    let killed = Instant::now();
    let mut failures = 0;
    for task in stream {
        failures += task.await.expect("stream task");
    }
    setup.wait_for_failover(Duration::from_secs(30));
    assert_ne!(setup.current_master_port(), old_master);
    assert!(
        failures > 0,
        "some calls should have failed while there was no master"
    );
    eprintln!(
        "stream finished {:?} after the kill, {failures} failed calls retried",
        killed.elapsed()
    );

    // Every event ran exactly once, and the records written before the
    // failover replay from the promoted replica.
    {
        let runs = runs.lock().expect("runs");
        assert_eq!(runs.len(), 80);
        assert!(
            runs.values().all(|n| *n == 1),
            "an event ran twice: {runs:?}"
        );
    }
    for key in 0..20 {
        let (done, _) = process(key).await;
        assert!(done.was_replayed(), "event {key} should replay");
        assert_eq!(*done.value(), key);
    }
    let record = store
        .get("idempotency:events:fo-0")
        .await
        .expect("read from the new master");
    assert!(record.is_some());
    // The store completed with `SET ... IFEQ` on Valkey and with the compare
    // script on Redis.
    assert_eq!(
        store.completes_with_set_ifeq(),
        Some(kind == ServerKind::Valkey),
        "the completion path on {kind:?}"
    );
}

#[tokio::test]
async fn a_sentinel_url_without_a_service_is_a_config_error() {
    let err = RedisStore::connect("redis+sentinel://127.0.0.1:26379")
        .await
        .expect_err("no service name");
    assert!(
        matches!(&err, IdempotencyError::Config { option: "url", reason } if reason.contains("names the service")),
        "{err:?}"
    );
}

//! Redis-specific behaviour: the documented schema, corrupt values, outages,
//! the script cache, and exactly-once across OS processes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{RedisServer, ServerKind};
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, Processed, RedisStore,
    SeenSet,
};
use idempotency_core::testing::json_text;
use redis::AsyncCommands;
use serde_json::json;

async fn checker(server: &RedisServer) -> IdempotencyChecker {
    IdempotencyChecker::new(RedisStore::connect(&server.url()).await.expect("connect"))
}

fn event(key: &str) -> EventEnvelope {
    EventEnvelope::new("test.event", json!({"key": key})).with_idempotency_key(key)
}

async fn acquired(checker: &IdempotencyChecker, e: &EventEnvelope) -> idempotency::Lease {
    match checker.claim(e).await.expect("claim") {
        idempotency::ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn sorted_fields(doc: &serde_json::Value) -> Vec<&str> {
    let mut fields: Vec<&str> = doc
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    fields
}

async fn stored_doc(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> serde_json::Value {
    let raw: String = redis.get(key).await.expect("GET");
    serde_json::from_str(&raw).expect("the value is JSON")
}

#[tokio::test]
async fn stored_value_is_the_documented_json_with_a_ttl() {
    let server = RedisServer::start();
    let config = IdempotencyConfig::builder()
        .ttl("1h")
        .fingerprint_payloads(true)
        .build()
        .expect("config");
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let checker = IdempotencyChecker::with_config(store.clone(), config);
    let mut redis = server.client().await;
    let key = "idempotency:events:schema-1";
    let e = event("schema-1").with_event_id("evt-123");

    // PROCESSING, as the fast path's plain `SET NX` writes it: who holds the
    // key, and the lease relative to the key's expiry; no null fields.
    let before_ms = chrono::Utc::now().timestamp_millis();
    let lease = acquired(&checker, &e).await;
    let doc = stored_doc(&mut redis, key).await;
    assert_eq!(
        sorted_fields(&doc),
        [
            "attempts",
            "claim_px",
            "event_id",
            "event_type",
            "fingerprint",
            "idempotency_key",
            "lease_ms",
            "lease_token",
            "status"
        ]
    );
    assert_eq!(doc["idempotency_key"], "schema-1");
    assert_eq!(doc["event_id"], "evt-123");
    assert_eq!(doc["event_type"], "test.event");
    assert_eq!(doc["status"], "PROCESSING");
    assert_eq!(doc["attempts"], 1);
    assert_eq!(doc["lease_token"].as_str(), Some(lease.token()));
    assert_eq!(doc["fingerprint"].as_str().map(str::len), Some(64));
    assert_eq!(doc["claim_px"], 3_600_000, "max(ttl, lease)");
    let lease_ms = doc["lease_ms"].as_i64().expect("integer milliseconds");
    let pttl: i64 = redis.pttl(key).await.expect("PTTL");
    assert!(pttl > 3_500_000 && pttl <= 3_600_000, "PTTL {pttl}");

    // Read back, the lease is settled into absolute times by the store's
    // clock (this test's clock and the server's are the same host's).
    let record = checker
        .get_record("schema-1")
        .await
        .expect("get")
        .expect("record");
    let after_ms = chrono::Utc::now().timestamp_millis();
    let first_seen = record
        .first_seen_at
        .expect("first_seen_at")
        .timestamp_millis();
    let lease_until = record
        .lease_expires_at
        .expect("lease_expires_at")
        .timestamp_millis();
    assert!(
        (before_ms - 5..=after_ms + 5).contains(&first_seen),
        "claimed at {first_seen}, between {before_ms} and {after_ms}"
    );
    assert_eq!(lease_until - first_seen, lease_ms);
    assert!(record.is_live_processing(chrono::Utc::now()));
    // Reading does not rewrite the document; a renewal writes absolute times.
    assert!(stored_doc(&mut redis, key).await.get("claim_px").is_some());
    let lease = idempotency::IdempotencyStore::renew(&store, &lease, Duration::from_secs(30))
        .await
        .expect("renew");
    let doc = stored_doc(&mut redis, key).await;
    assert_eq!(
        sorted_fields(&doc),
        [
            "attempts",
            "event_id",
            "event_type",
            "fingerprint",
            "first_seen_at",
            "idempotency_key",
            "lease_expires_at",
            "lease_token",
            "status"
        ]
    );
    assert_eq!(doc["first_seen_at"], first_seen);
    let now_ms = chrono::Utc::now().timestamp_millis();

    // COMPLETED: only what a replay needs.
    checker
        .complete(&lease, &json!({"receipt": 42}))
        .await
        .expect("complete");
    let doc = stored_doc(&mut redis, key).await;
    assert_eq!(
        sorted_fields(&doc),
        ["completed_at", "fingerprint", "result", "status", "ttl_ms"],
        "attempts is left out when it is 1"
    );
    assert_eq!(doc["status"], "COMPLETED");
    assert_eq!(doc["result"], json!({"receipt": 42}));
    assert_eq!(doc["ttl_ms"], 3_600_000);
    let at = doc["completed_at"].as_i64().expect("integer milliseconds");
    assert!((now_ms - at).abs() < 60_000, "completed_at is epoch ms");
    let pttl: i64 = redis.pttl(key).await.expect("PTTL");
    assert!(
        pttl > 3_500_000 && pttl <= 3_600_000,
        "the key expires with the ttl ({pttl} ms)"
    );
    // Read back through the checker, the record names its key again.
    let record = checker
        .get_record("schema-1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.idempotency_key.as_deref(), Some("schema-1"));
    assert_eq!(record.attempts, 1);
    assert!(record.expires_at.is_some());
    // A duplicate (the fast path: no script) knows the expiry from ttl_ms.
    match checker.claim(&e).await.expect("claim") {
        idempotency::ClaimOutcome::Duplicate(record) => {
            let expires = record.expires_at.expect("expires_at").timestamp_millis();
            assert_eq!(expires, at + 3_600_000);
            assert_eq!(record.result, Some(json!({"receipt": 42})));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }

    // FAILED: the attempt's identity and error, no live lease.
    let f = event("schema-2");
    let lease = acquired(&checker, &f).await;
    checker.fail(&lease, "boom").await.expect("fail");
    let doc = stored_doc(&mut redis, "idempotency:events:schema-2").await;
    assert_eq!(
        sorted_fields(&doc),
        [
            "attempts",
            "error",
            "event_id",
            "event_type",
            "fingerprint",
            "first_seen_at",
            "idempotency_key",
            "lease_token",
            "status"
        ]
    );
    assert_eq!(doc["status"], "FAILED");
    assert_eq!(doc["error"], "boom");
}

/// A fast-path claim whose key lost its expiry (someone ran `PERSIST`) has
/// no clock to measure its lease against: it counts as run out and is
/// taken over, rather than blocking the key forever.
#[tokio::test]
///
/// Many keys, because the claim script once read the clock twice: when the
/// millisecond turned between the reads, the settled lease looked live.
async fn a_fast_claim_without_expiry_is_taken_over() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let checker = IdempotencyChecker::new(store);
    let mut redis = server.client().await;
    for n in 0..400 {
        let key = format!("persisted-{n}");
        let first = acquired(&checker, &event(&key)).await;
        let persisted: bool = redis
            .persist(format!("idempotency:events:{key}"))
            .await
            .expect("PERSIST");
        assert!(persisted);
        match checker.claim(&event(&key)).await.expect("claim") {
            idempotency::ClaimOutcome::Acquired(second) => {
                assert_eq!(second.attempt(), 2);
                assert!(second.taken_over());
                assert_ne!(first.token(), second.token());
            }
            other => panic!("{key}: a claim without expiry was not taken over: {other:?}"),
        }
        let lost = checker
            .complete(&first, &json!(1))
            .await
            .expect_err("the first holder was taken over");
        assert!(matches!(lost, IdempotencyError::LeaseLost { .. }), "{lost}");
    }
}

/// The memory budget: a COMPLETED record with a 100-byte result
/// costs at most 350 bytes of Redis memory (`MEMORY USAGE`), with raw and
/// with hashed keys.
#[tokio::test]
async fn a_completed_record_costs_at_most_350_bytes() {
    let server = RedisServer::start();
    let mut redis = server.client().await;
    let result = "r".repeat(98); // 100 bytes of JSON with its quotes
    for hash_keys in [false, true] {
        let config = IdempotencyConfig::builder()
            .hash_keys(hash_keys)
            .build()
            .expect("config");
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let checker = IdempotencyChecker::with_config(store, config);
        let e = EventEnvelope::new("order.placed", json!({"n": 1}));
        checker
            .process(&e, |_| {
                let result = result.clone();
                async move { Ok::<_, IdempotencyError>(result) }
            })
            .await
            .expect("process");
        let key = checker.storage_key(&e.event_id).expect("key");
        let raw: String = redis.get(&key).await.expect("GET");
        assert!(raw.contains(&format!("\"result\":\"{result}\"")));
        let usage: i64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("MEMORY USAGE");
        assert!(
            usage <= 350,
            "hash_keys={hash_keys}: {usage} bytes for {} bytes of key and {} of value",
            key.len(),
            raw.len()
        );
    }
}

/// A `complete` whose reply is lost is retried by the store, and the retry
/// finds its own first try applied: success, not `LeaseLost`, even though a
/// COMPLETED record keeps no token.
#[tokio::test]
async fn a_retried_complete_finds_its_first_try_applied() {
    retried_complete(ServerKind::Redis).await;
}

/// The same on Valkey 9: the retried `SET ... IFEQ` finds the COMPLETED
/// record, and the finish script recognises the first try.
#[tokio::test]
async fn a_retried_set_ifeq_complete_finds_its_first_try_applied() {
    retried_complete(ServerKind::Valkey).await;
}

async fn retried_complete(kind: ServerKind) {
    let server = RedisServer::start_kind(kind);
    let store = RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(100))
        .max_retries(3)
        .connect()
        .await
        .expect("connect");
    let checker = IdempotencyChecker::new(store);
    let e = event("retried-complete");
    let lease = acquired(&checker, &e).await;
    // Hold every client for 400ms: the first try times out unanswered and is
    // retried; all tries then run in order when the pause ends.
    let mut admin = server.client().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(400)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    checker
        .complete(&lease, &json!("done"))
        .await
        .expect("the retried complete succeeds");
    let record = checker
        .get_record("retried-complete")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.result, Some(json!("done")));
    // A fresh (not retried) complete with the same lease is refused.
    assert!(matches!(
        checker.complete(&lease, &json!("again")).await,
        Err(IdempotencyError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn corrupt_values_are_typed_errors_naming_the_key() {
    let server = RedisServer::start();
    let checker = checker(&server).await;
    let mut redis = server.client().await;
    let runs = AtomicUsize::new(0);
    let cases: [(&str, &str); 4] = [
        ("garbage", "garbage"),
        ("number", "123"),
        ("bad-status", r#"{"status":"DONE"}"#),
        ("wrong-types", r#"{"status":"COMPLETED","attempts":"two"}"#),
    ];
    for (key, value) in cases {
        let _: () = redis
            .set(format!("idempotency:events:{key}"), value)
            .await
            .expect("SET");
    }
    let _: () = redis
        .hset("idempotency:events:a-hash", "f", "v")
        .await
        .expect("HSET");

    for key in cases.iter().map(|c| c.0).chain(["a-hash"]) {
        let outcome = checker
            .process(&event(key), |_| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            })
            .await;
        match outcome {
            Err(IdempotencyError::CorruptRecord { key: named, .. }) => {
                assert_eq!(named, format!("idempotency:events:{key}"));
            }
            other => panic!("expected CorruptRecord for {key}, got {other:?}"),
        }
        let read = checker.get_record(key).await;
        assert!(
            matches!(read, Err(IdempotencyError::CorruptRecord { .. })),
            "expected CorruptRecord reading {key}, got {read:?}"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no handler runs over a corrupt record"
    );
    // The corrupt value is left for an operator to inspect, not overwritten.
    let raw: String = redis.get("idempotency:events:garbage").await.expect("GET");
    assert_eq!(raw, "garbage");
}

#[tokio::test]
async fn unreachable_redis_fails_fast_with_store_unavailable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let started = Instant::now();
    let outcome = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await;
    assert!(matches!(
        outcome,
        Err(IdempotencyError::StoreUnavailable { store: "redis", .. })
    ));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn redis_going_down_fails_closed_and_recovers() {
    let mut server = RedisServer::start();
    let port = server.port();
    let store = RedisStore::builder(server.url())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    let checker = IdempotencyChecker::new(store);
    let runs = Arc::new(AtomicUsize::new(0));
    let run = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, IdempotencyError>(1)
    };
    checker
        .process(&event("before"), |_| run(Arc::clone(&runs)))
        .await
        .expect("up");

    server.kill();
    let started = Instant::now();
    let outcome = checker
        .process(&event("during"), |_| run(Arc::clone(&runs)))
        .await;
    assert!(
        matches!(outcome, Err(IdempotencyError::StoreUnavailable { .. })),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(checker.health_check().await.is_err());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler never runs unguarded"
    );
    assert!(checker.stats().store_errors >= 2);

    // A new server on the same port: the same checker recovers by itself.
    let _restarted = RedisServer::start_on(port);
    let mut recovered = None;
    for _ in 0..50 {
        match checker
            .process(&event("after"), |_| run(Arc::clone(&runs)))
            .await
        {
            Ok(done) => {
                recovered = Some(done);
                break;
            }
            Err(IdempotencyError::StoreUnavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(recovered, Some(Processed::Executed(1)));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn flushed_script_cache_is_reloaded() {
    let server = RedisServer::start();
    let checker = checker(&server).await;
    checker
        .process(&event("s1"), |_| async { Ok::<_, IdempotencyError>(1) })
        .await
        .expect("first");
    let mut redis = server.client().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis)
        .await
        .expect("flush");
    let outcome = checker
        .process(&event("s2"), |_| async { Ok::<_, IdempotencyError>(2) })
        .await
        .expect("after flush");
    assert_eq!(outcome, Processed::Executed(2));
}

const WORKER_URL: &str = "IDEMPOTENCY_TEST_WORKER_URL";
const KEYS: usize = 500;

/// Four OS processes race over the same 500 keys; executions are counted in
/// Redis by the handlers themselves.
#[tokio::test]
async fn four_processes_execute_each_key_once() {
    four_processes(ServerKind::Redis).await;
}

/// The same race on Valkey 9, whose completions take the `SET ... IFEQ` path.
#[tokio::test]
async fn four_processes_execute_each_key_once_on_valkey() {
    four_processes(ServerKind::Valkey).await;
}

async fn four_processes(kind: ServerKind) {
    let server = RedisServer::start_kind(kind);
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..4)
        .map(|worker| {
            std::process::Command::new(&exe)
                .args([
                    "cross_process_worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .env(WORKER_URL, server.url())
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
    let mut redis = server.client().await;
    let total: usize = redis.get("test:executions").await.expect("GET total");
    assert_eq!(total, KEYS);
    for key in 0..KEYS {
        let count: usize = redis
            .get(format!("test:executions:{key}"))
            .await
            .expect("GET");
        assert_eq!(count, 1, "key {key} ran {count} times");
    }
}

/// The worker half of `four_processes_execute_each_key_once`; does nothing
/// unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by four_processes_execute_each_key_once"]
async fn cross_process_worker() {
    let Ok(url) = std::env::var(WORKER_URL) else {
        return;
    };
    let worker: usize = std::env::var("IDEMPOTENCY_TEST_WORKER")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let checker = IdempotencyChecker::new(RedisStore::connect(&url).await.expect("connect"));
    let counter = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    common::process_each_key(&checker, &counter, worker, KEYS).await;
}

/// The claim and finish scripts refuse every value the reader (`get`)
/// refuses, with `CorruptRecord`, and overwrite none of them.
#[tokio::test]
async fn claims_refuse_every_value_the_reader_refuses() {
    use idempotency::IdempotencyStore;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let checker = IdempotencyChecker::new(store.clone());
    let mut redis = server.client().await;
    let cases = [
        r#"{"status":"PROCESSING","lease_token":"t","lease_expires_at":"soon"}"#,
        r#"{"status":"FAILED","attempts":"x"}"#,
        r#"{"status":"FAILED","attempts":-1}"#,
        r#"{"status":"FAILED","attempts":1.5}"#,
        r#"{"status":"FAILED","attempts":null}"#,
        r#"{"status":"FAILED","first_seen_at":"yesterday"}"#,
        r#"{"status":"FAILED","first_seen_at":1e300}"#,
        r#"{"status":"PROCESSING","lease_token":7,"lease_expires_at":1}"#,
        r#"{"status":"FAILED","event_id":{"id":1}}"#,
        r#"{"status":"FAILED","event_type":["a"]}"#,
        r#"{"status":"FAILED","fingerprint":false}"#,
        r#"{"status":"FAILED","error":42}"#,
        r#"{"status":"FAILED","idempotency_key":null}"#,
        r#"{"status":"COMPLETED","completed_at":"now","result":1}"#,
        r#"{"status":"PROCESSING","attempts":1,"lease_token":"t","lease_ms":"soon","claim_px":1000}"#,
    ];
    let runs = AtomicUsize::new(0);
    for (i, doc) in cases.iter().enumerate() {
        let name = format!("strict-{i}");
        let key = format!("idempotency:events:{name}");
        let _: () = redis.set(&key, *doc).await.expect("SET");
        let read = store.get(&key).await;
        assert!(
            matches!(read, Err(IdempotencyError::CorruptRecord { .. })),
            "get of {doc}: {read:?}"
        );
        let claimed = store
            .claim(&idempotency_core::testing::claim_request(&key, "tok"))
            .await;
        assert!(
            matches!(claimed, Err(IdempotencyError::CorruptRecord { .. })),
            "claim of {doc}: {claimed:?}"
        );
        let outcome = checker
            .process(&event(&name), |_| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            })
            .await;
        assert!(
            matches!(outcome, Err(IdempotencyError::CorruptRecord { .. })),
            "process of {doc}: {outcome:?}"
        );
        let raw: String = redis.get(&key).await.expect("GET");
        assert_eq!(raw, *doc, "the value is left in place");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no handler ran");
}

/// A live `PROCESSING` record that holds
/// `"status":"COMPLETED"` in a nested field is in progress, not a duplicate:
/// the text fast path matches only the top-level status.
#[tokio::test]
async fn a_nested_completed_status_is_not_a_duplicate() {
    use idempotency::IdempotencyStore;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut redis = server.client().await;
    let future = chrono::Utc::now().timestamp_millis() + 600_000;
    let key = "idempotency:events:nested";
    let doc = format!(
        r#"{{"meta":{{"status":"COMPLETED"}},"status":"PROCESSING","attempts":1,"lease_token":"other","lease_expires_at":{future}}}"#
    );
    let _: () = redis.set(key, &doc).await.expect("SET");
    match store
        .claim(&idempotency_core::testing::claim_request(key, "tok"))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::InProgress(record) => {
            assert_eq!(record.status, idempotency::RecordStatus::Processing);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    let raw: String = redis.get(key).await.expect("GET");
    assert_eq!(raw, doc);
}

/// The finish script's text fast path completes only a
/// document of the exact shape a claim writes; a held record that was
/// altered into something the reader refuses is `CorruptRecord`, and left.
#[tokio::test]
async fn completing_a_held_record_that_turned_corrupt_overwrites_nothing() {
    let server = RedisServer::start();
    let checker = checker(&server).await;
    let mut redis = server.client().await;
    let key = "idempotency:events:altered";
    let lease = acquired(&checker, &event("altered")).await;
    let raw: String = redis.get(key).await.expect("GET");
    let altered = raw.replacen('{', r#"{"first_seen_at":"x","#, 1);
    let _: () = redis.set(key, &altered).await.expect("SET");
    let outcome = checker.complete(&lease, &json!(1)).await;
    assert!(
        matches!(outcome, Err(IdempotencyError::CorruptRecord { .. })),
        "{outcome:?}"
    );
    let now: String = redis.get(key).await.expect("GET");
    assert_eq!(now, altered);
}

/// A JSON `null` result is stored as `"result":null` and
/// reads back as `Some(Null)` on every read path (get, the plain `SET NX GET`
/// duplicate, the claim script); no stored result is no `result` field and
/// reads back as `None`.
#[tokio::test]
async fn a_null_result_stays_null_and_no_result_stays_absent() {
    use idempotency::IdempotencyStore;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut redis = server.client().await;
    for (name, result, fingerprint) in [
        ("null-plain", Some(serde_json::Value::Null), None),
        ("null-fp", Some(serde_json::Value::Null), Some("fp")),
        ("none-plain", None, None),
        ("none-fp", None, Some("fp")),
    ] {
        let key = format!("idempotency:events:{name}");
        let mut request = idempotency_core::testing::claim_request(&key, "t1");
        request.fingerprint = fingerprint;
        let lease = match store.claim(&request).await.expect("claim") {
            idempotency::ClaimOutcome::Acquired(lease) => lease,
            other => panic!("expected Acquired, got {other:?}"),
        };
        store
            .complete(
                &lease,
                result.as_ref().map(json_text).as_ref(),
                Duration::from_secs(60),
            )
            .await
            .expect("complete");
        let doc = stored_doc(&mut redis, &key).await;
        assert_eq!(
            doc.as_object().expect("object").get("result"),
            result.as_ref(),
            "{name}: the stored document"
        );
        let read = store.get(&key).await.expect("get").expect("record");
        assert_eq!(read.result, result, "{name}: get");
        // The plain `SET NX GET` path, then the claim script (a COMPLETED
        // document without `ttl_ms`, as a seen-set mark is, goes there).
        let mut again = idempotency_core::testing::claim_request(&key, "t2");
        again.fingerprint = fingerprint;
        match store.claim(&again).await.expect("claim") {
            idempotency::ClaimOutcome::Duplicate(record) => {
                assert_eq!(record.result, result, "{name}: duplicate");
            }
            other => panic!("expected Duplicate, got {other:?}"),
        }
        let mut untimed = doc.clone();
        untimed.as_object_mut().expect("object").remove("ttl_ms");
        let _: () = redis
            .set(&key, serde_json::to_string(&untimed).expect("json"))
            .await
            .expect("SET");
        match store.claim(&again).await.expect("claim") {
            idempotency::ClaimOutcome::Duplicate(record) => {
                assert_eq!(record.result, result, "{name}: duplicate by script");
            }
            other => panic!("expected Duplicate, got {other:?}"),
        }
    }
}

/// Writes 10 kB values under `junk:*` until Redis refuses a write for want
/// of memory.
async fn fill_until_out_of_memory(redis: &mut redis::aio::MultiplexedConnection) {
    let junk = "x".repeat(10_000);
    for i in 0..10_000 {
        let written: redis::RedisResult<()> = redis.set(format!("junk:{i}"), &junk).await;
        if let Err(e) = written {
            assert_eq!(e.code(), Some("OOM"), "{e}");
            // Used memory wavers by a few kB (client buffers come and go):
            // pull the limit well below it, so every write stays refused.
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(redis)
                .await
                .expect("INFO");
            let used: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("used_memory");
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(used - 512 * 1024)
                .query_async(redis)
                .await
                .expect("CONFIG SET maxmemory");
            return;
        }
    }
    panic!("Redis never ran out of memory");
}

/// At `maxmemory` under `noeviction`, duplicates of
/// finished events are still replayed (a read answers them), a live claim is
/// still in progress, and a write that is refused says why:
/// `StoreRefused { OutOfMemory }`, not `StoreUnavailable`.
#[tokio::test]
async fn a_full_redis_still_replays_duplicates_and_refuses_new_keys_as_out_of_memory() {
    use idempotency::{IdempotencyStore, StoreRefusal};
    let server =
        RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let checker = IdempotencyChecker::new(store.clone());
    let mut redis = server.client().await;
    for i in 0..5 {
        let done = checker
            .process(&event(&format!("full-{i}")), |_| async move {
                Ok::<_, IdempotencyError>(i)
            })
            .await
            .expect("process");
        assert_eq!(done, Processed::Executed(i));
    }
    let live = acquired(&checker, &event("full-live")).await;
    let failed = acquired(&checker, &event("full-failed")).await;
    checker.fail(&failed, "boom").await.expect("mark failed");
    fill_until_out_of_memory(&mut redis).await;

    for i in 0..5 {
        let done = checker
            .process(&event(&format!("full-{i}")), |_| async {
                Ok::<_, IdempotencyError>(-1)
            })
            .await
            .expect("a duplicate is replayed from a full Redis");
        assert_eq!(done, Processed::Replayed(i));
    }
    match store
        .claim(&idempotency_core::testing::claim_request(
            "idempotency:events:full-live",
            "other",
        ))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::InProgress(_) => {}
        other => panic!("expected InProgress, got {other:?}"),
    }
    // The holder's retried claim (same token) still holds it.
    match store
        .claim(&idempotency_core::testing::claim_request(
            "idempotency:events:full-live",
            live.token(),
        ))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::Acquired(lease) => assert_eq!(lease.attempt(), 1),
        other => panic!("expected Acquired, got {other:?}"),
    }
    for key in [
        "idempotency:events:full-new",
        "idempotency:events:full-failed",
    ] {
        let outcome = store
            .claim(&idempotency_core::testing::claim_request(key, "tok"))
            .await;
        assert!(
            matches!(
                outcome,
                Err(IdempotencyError::StoreRefused {
                    store: "redis",
                    reason: StoreRefusal::OutOfMemory,
                    ..
                })
            ),
            "{key}: {outcome:?}"
        );
    }
    // Every write is refused the same way: completing, renewing, marking.
    let completed = store
        .complete(&live, Some(&json_text(&json!(1))), Duration::from_secs(60))
        .await;
    assert!(
        matches!(
            completed,
            Err(IdempotencyError::StoreRefused {
                reason: StoreRefusal::OutOfMemory,
                ..
            })
        ),
        "{completed:?}"
    );
    let renewed = store.renew(&live, Duration::from_secs(60)).await;
    assert!(
        matches!(
            renewed,
            Err(IdempotencyError::StoreRefused {
                reason: StoreRefusal::OutOfMemory,
                ..
            })
        ),
        "{renewed:?}"
    );
    let marked = store
        .mark(&["idempotency:events:full-mark"], Duration::from_secs(60))
        .await;
    assert!(
        matches!(
            marked,
            Err(IdempotencyError::StoreRefused {
                reason: StoreRefusal::OutOfMemory,
                ..
            })
        ),
        "{marked:?}"
    );
    // Once memory is freed, the new key is claimed as usual.
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut redis)
        .await
        .expect("FLUSHDB");
    assert!(matches!(
        store
            .claim(&idempotency_core::testing::claim_request(
                "idempotency:events:full-new",
                "tok"
            ))
            .await
            .expect("claim"),
        idempotency::ClaimOutcome::Acquired(_)
    ));
}

/// A Redis whose `maxmemory-policy` may evict records is
/// refused at connect with a `Config` error naming the policy; `volatile-*`
/// policies too (every record has a TTL).
#[tokio::test]
async fn an_evicting_redis_is_refused_at_connect_naming_its_policy() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let server = RedisServer::start_with(&["--maxmemory-policy", policy]);
        match RedisStore::connect(&server.url()).await {
            Err(IdempotencyError::Config {
                option: "maxmemory-policy",
                reason: message,
            }) => {
                assert!(message.contains(policy), "{message}");
                assert!(message.contains("noeviction"), "{message}");
                assert!(message.contains("allow_eviction"), "{message}");
            }
            other => panic!("{policy}: expected a Config error, got {other:?}"),
        }
    }
}

/// A `MakeWriter` that keeps what is logged, for asserting on warnings.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Opted in with `allow_eviction(true)`, the store
/// connects and logs the policy at ERROR, at connect and in every health
/// check; without it, a policy changed after connect fails the health check.
#[tokio::test]
async fn eviction_is_reported_at_connect_and_in_every_health_check() {
    use tracing_subscriber::util::SubscriberInitExt;
    let logs = Logs::default();
    let _guard = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .finish()
        .set_default();

    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let allowed = RedisStore::builder(server.url())
        .allow_eviction(true)
        .connect()
        .await
        .expect("opted in: connects");
    assert!(logs.text().contains("ERROR"), "{}", logs.text());
    assert!(logs.text().contains("allkeys-lru"), "{}", logs.text());
    let opted_in = IdempotencyChecker::new(allowed);
    for _ in 0..2 {
        let before = logs.text().matches("allkeys-lru").count();
        opted_in.health_check().await.expect("opted in: healthy");
        assert_eq!(
            logs.text().matches("allkeys-lru").count(),
            before + 1,
            "every health check logs it: {}",
            logs.text()
        );
    }

    // A safe Redis at connect whose policy is changed later.
    let server = RedisServer::start();
    let checker = checker(&server).await;
    checker.health_check().await.expect("noeviction: healthy");
    let mut redis = server.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut redis)
        .await
        .expect("CONFIG SET");
    match checker.health_check().await {
        Err(IdempotencyError::Config {
            option: "maxmemory-policy",
            reason: message,
        }) => {
            assert!(message.contains("volatile-lru"), "{message}");
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
    assert!(logs.text().contains("volatile-lru"), "{}", logs.text());
}

/// Sets `maxmemory-policy` on the node at `port`.
async fn set_policy(port: u16, policy: &str) {
    let mut node = common::RedisSentinel::client(port).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg(policy)
        .query_async(&mut node)
        .await
        .expect("CONFIG SET");
}

/// On a cluster: every master is checked, and the one
/// that may evict is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_one_evicting_master_is_refused_naming_it() {
    let cluster = common::RedisCluster::start();
    RedisStore::connect(&cluster.url())
        .await
        .expect("all masters noeviction: connects");
    let port = cluster.ports()[2];
    set_policy(port, "allkeys-random").await;
    match RedisStore::connect(&cluster.url()).await {
        Err(IdempotencyError::Config {
            option: "maxmemory-policy",
            reason: message,
        }) => {
            assert!(
                message.contains(&format!("`allkeys-random` on the master 127.0.0.1:{port}")),
                "{message}"
            );
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
}

/// With Sentinel: the master's policy is the one checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_that_may_evict_is_refused() {
    let setup = common::RedisSentinel::start();
    set_policy(setup.master.port, "volatile-lfu").await;
    match RedisStore::connect(&setup.url()).await {
        Err(IdempotencyError::Config {
            option: "maxmemory-policy",
            reason: message,
        }) => {
            assert!(message.contains("volatile-lfu"), "{message}");
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
}

/// How many times Redis ran `command` (scripts' calls included) without
/// failing: an `EVALSHA` answered `NOSCRIPT` (then loaded and sent again)
/// counts once.
async fn command_calls(redis: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("INFO");
    let Some(stats) = info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:")))
    else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        stats
            .split(',')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    field("calls") - field("failed_calls")
}

/// Completing a claim that the plain `SET NX` or the claim script wrote
/// compares the stored bytes with the claim's (which never reads the key's
/// expiry), not the decoding finish script.
#[tokio::test]
async fn completing_a_claim_compares_its_document_and_decodes_nothing() {
    let server = RedisServer::start();
    let checker = checker(&server).await;
    let mut redis = server.client().await;
    let e = event("hot-1").with_event_id("evt-1");
    checker
        .process(&e, |_| async { Ok::<_, IdempotencyError>(1) })
        .await
        .expect("process");
    assert_eq!(command_calls(&mut redis, "pexpiretime").await, 0);

    // A failed attempt (the decoding path: one PEXPIRETIME), then a retry
    // claimed by the claim script and completed by comparison.
    let e = event("hot-2");
    let lease = acquired(&checker, &e).await;
    checker.fail(&lease, "boom").await.expect("fail");
    assert_eq!(command_calls(&mut redis, "pexpiretime").await, 1);
    let retry = acquired(&checker, &e).await;
    assert_eq!(retry.attempt(), 2);
    checker.complete(&retry, &json!(2)).await.expect("complete");
    assert_eq!(command_calls(&mut redis, "pexpiretime").await, 1);
    let doc = stored_doc(&mut redis, "idempotency:events:hot-2").await;
    assert_eq!(doc["attempts"], json!(2));
    assert_eq!(doc["result"], json!(2));
}

/// Where the server has `SET ... IFEQ` (Valkey 9), every
/// completion of a lease that carries its document (its version) is one plain
/// `SET ... IFEQ`: after a fast claim, a retried claim, a claim by the claim
/// script, and a renewal. On Redis 7 each is one script (the same
/// comparison).
#[tokio::test]
async fn completions_take_set_ifeq_on_valkey_and_a_script_on_redis_7() {
    use idempotency::IdempotencyStore;
    for kind in ServerKind::ALL {
        let server = RedisServer::start_kind(kind);
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let ifeq = kind == ServerKind::Valkey;
        assert_eq!(store.completes_with_set_ifeq(), Some(ifeq), "{kind:?}");
        let mut redis = server.client().await;
        let ttl = Duration::from_secs(60);
        let complete = async |store: &RedisStore,
                              redis: &mut redis::aio::MultiplexedConnection,
                              lease: &idempotency::Lease,
                              result: serde_json::Value,
                              how: &str| {
            let before = command_calls(redis, "evalsha").await;
            store
                .complete(lease, Some(&json_text(&result)), ttl)
                .await
                .unwrap_or_else(|e| panic!("{kind:?}, {how}: complete: {e}"));
            let scripts = command_calls(redis, "evalsha").await - before;
            assert_eq!(
                scripts,
                u64::from(!ifeq),
                "{kind:?}, {how}: scripts run by one completion"
            );
            let record = store.get(lease.key()).await.expect("get").expect("record");
            assert_eq!(record.status, idempotency::RecordStatus::Completed);
            assert_eq!(record.result, Some(result), "{kind:?}, {how}");
            assert_eq!(record.attempts, lease.attempt(), "{kind:?}, {how}");
            record
        };
        let acquire =
            async |store: &RedisStore, request: &idempotency::ClaimRequest<'_>| match store
                .claim(request)
                .await
                .expect("claim")
            {
                idempotency::ClaimOutcome::Acquired(lease) => lease,
                other => panic!("expected Acquired, got {other:?}"),
            };

        // A fast claim (`SET NX`), with a fingerprint.
        let mut request = idempotency_core::testing::claim_request("ifeq-fast", "t1");
        request.fingerprint = Some("fp-1");
        let lease = acquire(&store, &request).await;
        let record = complete(&store, &mut redis, &lease, json!({"n": 1}), "fast claim").await;
        assert_eq!(record.fingerprint.as_deref(), Some("fp-1"));
        assert!(record.expires_at.is_some());
        // ...whose duplicate is answered by the plain `SET NX GET`, with
        // the same fingerprint check.
        match store.claim(&request).await.expect("claim") {
            idempotency::ClaimOutcome::Duplicate(r) => assert_eq!(r.result, Some(json!({"n": 1}))),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        request.fingerprint = Some("fp-2");
        assert!(matches!(
            store.claim(&request).await,
            Err(IdempotencyError::FingerprintMismatch { .. })
        ));

        // A retried claim (our own token found by `SET NX GET`).
        let request = idempotency_core::testing::claim_request("ifeq-retried", "t2");
        acquire(&store, &request).await;
        let lease = acquire(&store, &request).await;
        complete(
            &store,
            &mut redis,
            &lease,
            json!("retried"),
            "retried claim",
        )
        .await;

        // A claim by the claim script (after a failure), then a renewal.
        let request = idempotency_core::testing::claim_request("ifeq-script", "t3");
        let lease = acquire(&store, &request).await;
        store.fail(&lease, "boom", ttl).await.expect("fail");
        let request = idempotency_core::testing::claim_request("ifeq-script", "t4");
        let lease = acquire(&store, &request).await;
        assert_eq!(lease.attempt(), 2);
        complete(&store, &mut redis, &lease, json!(2), "claim script").await;

        let request = idempotency_core::testing::claim_request("ifeq-renewed", "t5");
        let lease = acquire(&store, &request).await;
        let lease = store.renew(&lease, ttl).await.expect("renew");
        let lease = store.renew(&lease, ttl).await.expect("renew");
        complete(&store, &mut redis, &lease, json!(null), "renewal").await;
    }
}

/// A handler that outlives a lease renewal still completes by comparison:
/// the renewed lease (whose version is the renewed document) is the one the
/// completion writes under. The finish script never runs: on Valkey the
/// completion runs no script at all, on Redis 7 only the compare script.
#[tokio::test]
async fn a_completion_after_a_renewal_compares_the_renewed_document() {
    for kind in ServerKind::ALL {
        let server = RedisServer::start_kind(kind);
        let config = IdempotencyConfig::builder()
            .lease("1500ms")
            .build()
            .expect("config");
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let checker = IdempotencyChecker::with_config(store, config);
        let key = "renewed-then-completed";
        let e = event(key);
        let mut counted = server.client().await;
        let reader = checker.clone();
        let scripts_before_completion = checker
            .process(&e, |lease| async move {
                // Wait for the heartbeat's first renewal (every 500 ms).
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let record = reader.get_record(key).await.expect("read").expect("record");
                    if record.lease_expires_at.expect("a lease") > lease.expires_at() {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{kind:?}: the lease was never renewed"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok::<_, IdempotencyError>(command_calls(&mut counted, "evalsha").await)
            })
            .await
            .expect("process")
            .into_inner();
        let mut redis = server.client().await;
        let by_completion = command_calls(&mut redis, "evalsha").await - scripts_before_completion;
        assert_eq!(
            by_completion,
            u64::from(kind != ServerKind::Valkey),
            "{kind:?}: scripts run by the completion"
        );
        assert_eq!(
            checker
                .get_record(key)
                .await
                .expect("read")
                .expect("record")
                .status,
            idempotency::RecordStatus::Completed
        );
    }
}

/// The lease's document is only a shortcut. When the stored
/// one differs (rewritten with the same meaning, taken over, completed by an
/// earlier try), the finish script decides, as on Redis 7.
#[tokio::test]
async fn a_set_ifeq_mismatch_falls_back_to_the_finish_script() {
    use idempotency::IdempotencyStore;
    let server = RedisServer::start_kind(ServerKind::Valkey);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut redis = server.client().await;
    let ttl = Duration::from_secs(60);
    let lease = match store
        .claim(&idempotency_core::testing::claim_request(
            "ifeq-rewritten",
            "t1",
        ))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    // The same record in other bytes (re-encoded, as a script would).
    let raw: String = redis.get(lease.key()).await.expect("GET");
    let doc: serde_json::Value = serde_json::from_str(&raw).expect("JSON");
    let pretty = serde_json::to_string_pretty(&doc).expect("JSON");
    let _: () = redis::cmd("SET")
        .arg(lease.key())
        .arg(&pretty)
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .expect("SET");
    let before = command_calls(&mut redis, "evalsha").await;
    store
        .complete(&lease, Some(&json_text(&json!("done"))), ttl)
        .await
        .expect("the finish script completes the rewritten record");
    assert_eq!(command_calls(&mut redis, "evalsha").await, before + 1);
    let record = store.get(lease.key()).await.expect("get").expect("record");
    assert_eq!(record.result, Some(json!("done")));

    // A completion by a lease another worker took over writes nothing.
    let stale = match store
        .claim(&idempotency_core::testing::claim_request(
            "ifeq-taken",
            "t-old",
        ))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    let _: () = redis.del(stale.key()).await.expect("DEL");
    let newer = match store
        .claim(&idempotency_core::testing::claim_request(
            "ifeq-taken",
            "t-new",
        ))
        .await
        .expect("claim")
    {
        idempotency::ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    assert!(matches!(
        store
            .complete(&stale, Some(&json_text(&json!("stale"))), ttl)
            .await,
        Err(IdempotencyError::LeaseLost { .. })
    ));
    store
        .complete(&newer, Some(&json_text(&json!("new"))), ttl)
        .await
        .expect("the holder completes");
    let record = store.get(newer.key()).await.expect("get").expect("record");
    assert_eq!(record.result, Some(json!("new")));
}

//! Behaviour of `IdempotencyChecker` through the public API, on the memory
//! store and on a real Redis. Every test runs once per store.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Instrumented, RedisServer};
use idempotency::{
    ClaimOutcome, DuplicatePolicy, EventEnvelope, IdempotencyChecker, IdempotencyConfig,
    IdempotencyError, IdempotencyStore, InvalidKeyReason, KeyedRequest, MemoryStore, Processed,
    RecordStatus, RedisStore, SeenSet,
};
use serde_json::json;

/// A checker over one store (seen through a call-counting wrapper), keeping
/// its server alive.
struct Env {
    checker: IdempotencyChecker,
    store: Arc<dyn IdempotencyStore>,
    instrumented: Arc<Instrumented>,
    _server: Option<RedisServer>,
}

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

async fn env(kind: Kind, config: IdempotencyConfig) -> Env {
    let (server, store): (_, Arc<dyn SeenSet>) = match kind {
        Kind::Memory => (None, Arc::new(MemoryStore::new())),
        Kind::Redis => {
            let server = RedisServer::start();
            let store = RedisStore::connect(&server.url()).await.expect("connect");
            (Some(server), Arc::new(store))
        }
    };
    let instrumented = Arc::new(Instrumented::new(Arc::clone(&store)));
    Env {
        checker: IdempotencyChecker::from_shared(instrumented.clone(), config),
        store,
        instrumented,
        _server: server,
    }
}

fn config() -> idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
}

fn event(key: &str) -> EventEnvelope {
    EventEnvelope::new("test.event", json!({"key": key})).with_idempotency_key(key)
}

/// A handler error type, as an application would have.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("business rule failed: {0}")]
    Business(String),
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

async fn sixty_four_concurrent_tasks_execute_once(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let executions = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let checker = env.checker.clone();
        let executions = Arc::clone(&executions);
        tasks.push(tokio::spawn(async move {
            checker
                .process(&event("race-64"), |_| async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, IdempotencyError>("receipt".to_owned())
                })
                .await
        }));
    }
    let (mut executed, mut replayed, mut in_progress) = (0, 0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(Processed::Executed(v)) => {
                assert_eq!(v, "receipt");
                executed += 1;
            }
            Ok(Processed::Replayed(v)) => {
                assert_eq!(v, "receipt");
                replayed += 1;
            }
            Err(IdempotencyError::InProgress { .. }) => in_progress += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "the handler body ran once"
    );
    assert_eq!(executed, 1);
    assert_eq!(executed + replayed + in_progress, 64);
}

async fn thousand_keys_eight_tasks_each(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..1000).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for copy in 0..8 {
        for key in 0..1000usize {
            let checker = env.checker.clone();
            let counts = Arc::clone(&counts);
            tasks.push(tokio::spawn(async move {
                let envelope = event(&format!("bulk-{key}"));
                let _ = copy;
                checker
                    .process(&envelope, |_| async move {
                        counts[key].fetch_add(1, Ordering::SeqCst);
                        Ok::<_, IdempotencyError>(key)
                    })
                    .await
            }));
        }
    }
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) | Err(IdempotencyError::InProgress { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    let total: usize = counts.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 1000);
    assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
    assert_eq!(env.checker.stats().executed, 1000);
}

async fn failed_attempt_is_retried_then_replayed(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let e = event("retry-me");
    let runs = AtomicUsize::new(0);
    let handler = |fail: bool| {
        let runs = &runs;
        move |lease: idempotency::Lease| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if fail {
                Err(AppError::Business("card declined".into()))
            } else {
                Ok(format!("charged on attempt {}", lease.attempt()))
            }
        }
    };

    let first = env.checker.process(&e, handler(true)).await;
    assert!(matches!(first, Err(AppError::Business(_))));
    let record = env
        .checker
        .get_record("retry-me")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(
        record.error.as_deref(),
        Some("business rule failed: card declined")
    );
    assert_eq!(record.attempts, 1);
    assert!(
        !env.checker
            .would_skip("retry-me")
            .await
            .expect("would_skip")
    );

    let second = env
        .checker
        .process(&e, handler(false))
        .await
        .expect("retry runs");
    assert_eq!(
        second,
        Processed::Executed("charged on attempt 2".to_owned())
    );
    let third = env
        .checker
        .process(&e, handler(false))
        .await
        .expect("replay");
    assert_eq!(
        third,
        Processed::Replayed("charged on attempt 2".to_owned())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let record = env
        .checker
        .get_record("retry-me")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.attempts, 2);
    assert_eq!(record.status, RecordStatus::Completed);
    assert!(
        env.checker
            .would_skip("retry-me")
            .await
            .expect("would_skip")
    );
}

async fn expired_lease_is_taken_over_and_stale_worker_loses(kind: Kind) {
    let env = env(
        kind,
        config()
            .lease(Duration::from_millis(200))
            .build()
            .expect("config"),
    )
    .await;
    let e = event("crashy");
    // Worker A claims and then "crashes": it never renews or finishes.
    let ClaimOutcome::Acquired(stale) = env.checker.claim(&e).await.expect("claim") else {
        panic!("first claim must acquire");
    };
    let blocked = env
        .checker
        .process(&e, |_| async { Ok::<_, IdempotencyError>("B".to_owned()) })
        .await;
    assert!(matches!(
        blocked,
        Err(IdempotencyError::InProgress { attempt: 1, .. })
    ));

    tokio::time::sleep(Duration::from_millis(350)).await;
    let taken = env
        .checker
        .process(&e, |lease| async move {
            assert_eq!(lease.attempt(), 2);
            assert!(lease.taken_over(), "the handler learns it took over");
            Ok::<_, IdempotencyError>("B".to_owned())
        })
        .await
        .expect("takeover");
    assert_eq!(taken, Processed::Executed("B".to_owned()));
    assert_eq!(env.checker.stats().lease_takeovers, 1);

    let late = env.checker.complete(&stale, &"A").await;
    assert!(
        matches!(late, Err(IdempotencyError::LeaseLost { .. })),
        "{late:?}"
    );
    let record = env
        .checker
        .get_record("crashy")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.result, Some(json!("B")));
    assert_eq!(env.checker.stats().lease_lost, 1);
}

async fn renewal_keeps_a_slow_handler_alive(kind: Kind) {
    let lease = Duration::from_millis(300);
    let env = env(kind, config().lease(lease).build().expect("config")).await;
    let executions = Arc::new(AtomicUsize::new(0));
    // The handler says when it runs: from then on the key is claimed.
    let started = Arc::new(tokio::sync::Notify::new());
    let slow = {
        let checker = env.checker.clone();
        let executions = Arc::clone(&executions);
        let started = Arc::clone(&started);
        tokio::spawn(async move {
            checker
                .process(&event("slow"), |_| async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    tokio::time::sleep(lease * 3).await;
                    Ok::<_, IdempotencyError>(7)
                })
                .await
        })
    };
    started.notified().await;
    let mut duplicates = 0;
    while !slow.is_finished() {
        let outcome = env
            .checker
            .process(&event("slow"), |_| {
                let executions = Arc::clone(&executions);
                async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, IdempotencyError>(8)
                }
            })
            .await;
        match outcome {
            Err(IdempotencyError::InProgress { .. }) => duplicates += 1,
            Ok(Processed::Replayed(7)) => {}
            other => panic!("duplicate must not run: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        slow.await.expect("task").expect("slow handler"),
        Processed::Executed(7)
    );
    assert!(
        duplicates >= 6,
        "duplicates kept arriving during the run ({duplicates})"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

async fn expired_record_is_processed_again(kind: Kind) {
    let env = env(
        kind,
        config()
            .ttl(Duration::from_millis(200))
            .lease(Duration::from_millis(100))
            .build()
            .expect("config"),
    )
    .await;
    let runs = AtomicUsize::new(0);
    let run = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, IdempotencyError>(())
    };
    assert!(
        env.checker
            .process(&event("short"), |_| run())
            .await
            .expect("1")
            .was_executed()
    );
    assert!(
        env.checker
            .process(&event("short"), |_| run())
            .await
            .expect("2")
            .was_replayed()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        env.checker
            .process(&event("short"), |_| run())
            .await
            .expect("3")
            .was_executed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

async fn key_reuse_with_another_payload_is_rejected(kind: Kind) {
    let env = env(
        kind,
        config().fingerprint_payloads(true).build().expect("config"),
    )
    .await;
    let runs = AtomicUsize::new(0);
    let first = EventEnvelope::new("pay", json!({"amount": 10})).with_idempotency_key("pay-1");
    let same = EventEnvelope::new("pay", json!({"amount": 10})).with_idempotency_key("pay-1");
    let other = EventEnvelope::new("pay", json!({"amount": 99})).with_idempotency_key("pay-1");
    let run = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, IdempotencyError>(1)
    };
    env.checker.process(&first, |_| run()).await.expect("first");
    assert!(
        env.checker
            .process(&same, |_| run())
            .await
            .expect("same")
            .was_replayed()
    );
    let mismatch = env.checker.process(&other, |_| run()).await;
    assert!(
        matches!(mismatch, Err(IdempotencyError::FingerprintMismatch { .. })),
        "{mismatch:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(env.checker.stats().fingerprint_mismatches, 1);
}

async fn invalid_keys_never_reach_the_store_or_handler(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let runs = AtomicUsize::new(0);
    let long = "k".repeat(256);
    for (key, expected) in [
        ("", InvalidKeyReason::Empty),
        (
            long.as_str(),
            InvalidKeyReason::TooLong { len: 256, max: 255 },
        ),
        ("line\nbreak", InvalidKeyReason::ControlCharacter),
        ("nul\0", InvalidKeyReason::ControlCharacter),
    ] {
        let outcome = env
            .checker
            .process(&event(key), |_| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            })
            .await;
        match outcome {
            Err(IdempotencyError::InvalidKey { reason }) => assert_eq!(reason, expected),
            other => panic!("expected InvalidKey for {key:?}, got {other:?}"),
        }
        assert!(
            env.store
                .get(&format!("idempotency:events:{key}"))
                .await
                .expect("get")
                .is_none()
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

async fn dropped_guard_marks_failed_and_retry_runs(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let e = event("dropped");
    {
        let guard = env.checker.guard(&e).await.expect("guard");
        assert!(!guard.is_duplicate());
        assert_eq!(guard.lease().expect("held").attempt(), 1);
        // An early return: the guard goes out of scope unfinished.
    }
    let mut status = None;
    for _ in 0..100 {
        status = env
            .checker
            .get_record("dropped")
            .await
            .expect("get")
            .map(|r| r.status);
        if status == Some(RecordStatus::Failed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, Some(RecordStatus::Failed));
    let guard = env.checker.guard(&e).await.expect("guard");
    assert!(!guard.is_duplicate(), "a dropped attempt is retryable");
    assert_eq!(guard.lease().expect("held").attempt(), 2);
    guard.complete(&"done").await.expect("complete");
    let guard = env.checker.guard(&e).await.expect("guard");
    assert!(guard.is_duplicate());
    assert_eq!(
        guard.cached_result::<String>().expect("decode"),
        Some("done".to_owned())
    );
}

async fn panicking_handler_is_failed_and_panic_propagates(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let checker = env.checker.clone();
    let joined = tokio::spawn(async move {
        checker
            .process(&event("panics"), |_| async {
                if true {
                    panic!("handler exploded");
                }
                Ok::<_, IdempotencyError>(())
            })
            .await
    })
    .await;
    assert!(joined.expect_err("the panic propagates").is_panic());
    let record = env
        .checker
        .get_record("panics")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.error.as_deref(), Some("handler panicked"));
    let retried = env
        .checker
        .process(&event("panics"), |_| async { Ok::<_, IdempotencyError>(5) })
        .await
        .expect("retry");
    assert_eq!(retried, Processed::Executed(5));
}

async fn duplicate_policy_error_carries_the_cached_result(kind: Kind) {
    let env = env(
        kind,
        config()
            .on_duplicate(DuplicatePolicy::Error)
            .build()
            .expect("config"),
    )
    .await;
    env.checker
        .process(&event("dup-err"), |_| async {
            Ok::<_, IdempotencyError>(json!({"id": 1}))
        })
        .await
        .expect("first");
    match env
        .checker
        .process(&event("dup-err"), |_| async {
            Ok::<_, IdempotencyError>(json!({"id": 2}))
        })
        .await
    {
        Err(IdempotencyError::Duplicate { cached_result, .. }) => {
            assert_eq!(cached_result, Some(json!({"id": 1})));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
}

async fn waiting_duplicate_gets_the_result(kind: Kind) {
    let env = env(
        kind,
        config().on_in_progress_wait("5s").build().expect("config"),
    )
    .await;
    // The first handler says when it runs: from then on the key is claimed.
    let started = Arc::new(tokio::sync::Notify::new());
    let first = {
        let checker = env.checker.clone();
        let started = Arc::clone(&started);
        tokio::spawn(async move {
            checker
                .process(&event("wait"), |_| async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, IdempotencyError>("first".to_owned())
                })
                .await
        })
    };
    started.notified().await;
    let second = env
        .checker
        .process(&event("wait"), |_| async {
            Ok::<_, IdempotencyError>("second".to_owned())
        })
        .await
        .expect("waited");
    assert_eq!(second, Processed::Replayed("first".to_owned()));
    assert_eq!(
        first.await.expect("task").expect("first"),
        Processed::Executed("first".to_owned())
    );
}

async fn manual_api_round_trip(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let e = event("manual");
    assert!(
        env.checker
            .get_record("manual")
            .await
            .expect("get")
            .is_none()
    );
    let ClaimOutcome::Acquired(lease) = env.checker.claim(&e).await.expect("claim") else {
        panic!("must acquire");
    };
    assert!(env.checker.would_skip("manual").await.expect("live lease"));
    assert!(matches!(
        env.checker.claim(&e).await.expect("claim"),
        ClaimOutcome::InProgress(_)
    ));
    env.checker
        .complete(&lease, &json!({"ok": true}))
        .await
        .expect("complete");
    match env.checker.claim(&e).await.expect("claim") {
        ClaimOutcome::Duplicate(record) => assert_eq!(record.result, Some(json!({"ok": true}))),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(env.checker.delete_record("manual").await.expect("delete"));
    assert!(!env.checker.would_skip("manual").await.expect("deleted"));
    env.checker.health_check().await.expect("healthy");
}

async fn hashed_keys_hide_the_raw_key(kind: Kind) {
    let env = env(kind, config().hash_keys(true).build().expect("config")).await;
    env.checker
        .process(&event("alice@example.com"), |_| async {
            Ok::<_, IdempotencyError>(1)
        })
        .await
        .expect("process");
    let storage = env.checker.storage_key("alice@example.com").expect("key");
    assert_eq!(
        storage,
        // SHA-256 of `alice@example.com`, in lower-case hex.
        "idempotency:events:ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"
    );
    let record = env.store.get(&storage).await.expect("get").expect("record");
    assert!(!record.idempotency_key.unwrap_or_default().contains("alice"));
    assert!(
        env.store
            .get("idempotency:events:alice@example.com")
            .await
            .expect("get")
            .is_none()
    );
}

async fn stats_count_what_happened(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let ok = |v: u8| async move { Ok::<_, AppError>(v) };
    env.checker
        .process(&event("s1"), |_| ok(1))
        .await
        .expect("run");
    env.checker
        .process(&event("s1"), |_| ok(1))
        .await
        .expect("replay");
    let _ = env
        .checker
        .process(&event("s2"), |_| async {
            Err::<u8, _>(AppError::Business("no".into()))
        })
        .await;
    let stats = env.checker.stats();
    assert_eq!((stats.executed, stats.replayed, stats.failed), (1, 1, 1));
    assert_eq!(stats.store_errors, 0);
}

/// A caller that gives up on a slow handler (its future is dropped) must not
/// leave the key blocked: the attempt is recorded as failed and retried.
async fn cancelled_call_is_failed_and_retried(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        env.checker.process(&event("cancelled"), |_| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, IdempotencyError>(0)
        }),
    )
    .await;
    assert!(gave_up.is_err(), "the call timed out");
    let mut retried = None;
    for _ in 0..100 {
        match env
            .checker
            .process(&event("cancelled"), |lease| async move {
                Ok::<_, IdempotencyError>(lease.attempt())
            })
            .await
        {
            Err(IdempotencyError::InProgress { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => {
                retried = Some(other.expect("retry"));
                break;
            }
        }
    }
    assert_eq!(retried, Some(Processed::Executed(2)));
}

async fn out_of_range_durations_are_config_errors(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    for request in [
        KeyedRequest::new("bad-duration").lease(Duration::ZERO),
        KeyedRequest::new("bad-duration").ttl(Duration::ZERO),
        KeyedRequest::new("bad-duration").ttl(Duration::MAX),
    ] {
        let outcome = env
            .checker
            .process_request(request, |_| async { Ok::<_, IdempotencyError>(()) })
            .await;
        assert!(
            matches!(
                outcome,
                Err(IdempotencyError::Config {
                    option: "ttl" | "lease",
                    ..
                })
            ),
            "{outcome:?}"
        );
    }
    assert_eq!(env.instrumented.calls.load(Ordering::SeqCst), 0);
}

/// A handler whose side effects happened but whose result cannot be stored
/// must not run again on redelivery, and a redelivery must never get a
/// value that was not the first result (the result type here reads `null`
/// as `None`, so a `null` replayed in place of the missing result would
/// pass unnoticed): it gets `ResultNotStored`.
async fn unstorable_result_never_runs_twice_nor_replays_a_made_up_value(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let runs = AtomicUsize::new(0);
    let deep = || (0..150).fold(json!(1), |inner, _| json!([inner]));
    // An integer beyond 64 bits would read back as a rounded float, and a
    // RawValue is checked only loosely when it is made (serde_json cannot
    // read `1e400` back).
    let raw = |text: &str| serde_json::value::RawValue::from_string(text.into()).expect("raw");
    let keys = [
        "unserializable",
        "too-deep",
        "too-wide",
        "too-negative",
        "raw-too-wide",
        "raw-unreadable",
    ];
    for key in keys {
        for delivery in 0..3 {
            let outcome = env
                .checker
                .process(&event(key), |_| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, IdempotencyError>(Some(match key {
                        "too-deep" => Unstorable::Deep(deep()),
                        "too-wide" => Unstorable::Wide(u128::from(u64::MAX) + 1),
                        "too-negative" => Unstorable::Negative(i128::from(i64::MIN) - 1),
                        "raw-too-wide" => Unstorable::Raw(raw("123456789012345678901234567890")),
                        "raw-unreadable" => Unstorable::Raw(raw("1e400")),
                        _ => Unstorable::Map(std::collections::HashMap::from([((1u8, 2u8), 3u8)])),
                    }))
                })
                .await;
            if delivery == 0 {
                assert!(
                    matches!(outcome, Err(IdempotencyError::Serialization(_))),
                    "{outcome:?}"
                );
            } else {
                assert!(
                    matches!(outcome, Err(IdempotencyError::ResultNotStored { .. })),
                    "{outcome:?}"
                );
            }
        }
        let record = env
            .checker
            .get_record(key)
            .await
            .expect("get")
            .expect("record");
        assert_eq!(record.status, RecordStatus::Completed);
        assert_eq!(record.result, None, "no result was stored");
        let guard = env.checker.guard(&event(key)).await.expect("guard");
        assert!(guard.is_duplicate());
        assert!(matches!(
            guard.cached_result::<Option<u8>>(),
            Err(IdempotencyError::ResultNotStored { .. })
        ));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        keys.len(),
        "each side effect ran once"
    );
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Unstorable {
    Map(std::collections::HashMap<(u8, u8), u8>),
    Deep(serde_json::Value),
    Wide(u128),
    Negative(i128),
    Raw(Box<serde_json::value::RawValue>),
}

/// Claims `key` with the store applying the claim and the reply lost: the
/// caller sees `StoreUnavailable`. Later claims get their replies.
async fn lose_a_claim(env: &Env, key: &str) {
    env.instrumented
        .lose_claim_replies
        .store(true, Ordering::SeqCst);
    let lost = env
        .checker
        .process(&event(key), |_| async { Ok::<_, IdempotencyError>(1) })
        .await;
    assert!(
        matches!(lost, Err(IdempotencyError::StoreUnavailable { .. })),
        "{lost:?}"
    );
    env.instrumented
        .lose_claim_replies
        .store(false, Ordering::SeqCst);
}

/// A claim applied by the store whose reply was lost (a timeout) must not
/// block the key for a whole lease.
async fn claim_with_lost_reply_is_released(kind: Kind) {
    let env = env(kind, config().lease("60s").build().expect("config")).await;
    lose_a_claim(&env, "lost-reply").await;
    let mut released = None;
    for _ in 0..100 {
        let record = env.checker.get_record("lost-reply").await.expect("get");
        if record
            .as_ref()
            .is_some_and(|r| r.status == RecordStatus::Failed)
        {
            released = record;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(released.is_some(), "the orphaned claim was released");
    let retried = env
        .checker
        .process(&event("lost-reply"), |lease| async move {
            Ok::<_, IdempotencyError>(lease.attempt())
        })
        .await
        .expect("retry runs without waiting out the lease");
    assert_eq!(retried, Processed::Executed(2));
}

/// A claim whose reply was lost just before an outage, longer than the
/// breaker's cool-down, is released once the store is back, well before its
/// lease runs out: the release keeps trying through the outage and the open
/// breaker.
async fn claim_lost_before_an_outage_is_released_when_the_store_returns(kind: Kind) {
    let env = env(
        kind,
        config()
            .lease("60s")
            .circuit_breaker(2, "100ms")
            .build()
            .expect("config"),
    )
    .await;
    env.instrumented
        .outage_after_lost_claim
        .store(true, Ordering::SeqCst);
    lose_a_claim(&env, "lost-then-down").await;
    // The outage outlasts several cool-downs of the breaker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let orphan = env
        .store
        .get(&env.checker.storage_key("lost-then-down").expect("key"))
        .await
        .expect("get")
        .expect("the claim landed");
    assert_eq!(
        orphan.status,
        RecordStatus::Processing,
        "not released while down"
    );
    env.instrumented.down.store(false, Ordering::SeqCst);
    let back = std::time::Instant::now();
    loop {
        let record = env
            .store
            .get(&env.checker.storage_key("lost-then-down").expect("key"))
            .await
            .expect("get")
            .expect("record");
        if record.status == RecordStatus::Failed {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the orphaned claim was not released within 20 s of the store's return (lease: 60 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retried = env
        .checker
        .process(&event("lost-then-down"), |lease| async move {
            Ok::<_, IdempotencyError>(lease.attempt())
        })
        .await
        .expect("retry runs without waiting out the lease");
    assert_eq!(retried, Processed::Executed(2));
}

/// Two copies of one JSON envelope with neither an `idempotency_key` nor an
/// `event_id` (as a Python producer sends them) are one event: no invented
/// id makes them look like two. Both are rejected with `MissingKey` and the
/// handler never runs; an explicit empty key is `InvalidKey`, with no
/// fallback to the event id. No store is asked.
async fn keyless_envelopes_from_the_wire_are_rejected_not_run(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let runs = AtomicUsize::new(0);
    let keyless = r#"{"event_type":"order.placed","payload":{"order":42}}"#;
    let empty_key = r#"{"event_id":"evt-1","idempotency_key":"","event_type":"t","payload":{}}"#;
    for (json, missing) in [(keyless, true), (keyless, true), (empty_key, false)] {
        let envelope: EventEnvelope = serde_json::from_str(json).expect("parses");
        let outcome = env
            .checker
            .process(&envelope, |_| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            })
            .await;
        if missing {
            assert!(
                matches!(outcome, Err(IdempotencyError::MissingKey)),
                "{outcome:?}"
            );
        } else {
            assert!(
                matches!(
                    outcome,
                    Err(IdempotencyError::InvalidKey {
                        reason: InvalidKeyReason::Empty
                    })
                ),
                "{outcome:?}"
            );
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(calls(&env), 0, "no store was asked");
}

/// A store answering in a way nobody expected is not an outage: the error
/// is `Protocol`, the breaker stays closed, fail-open does not run the
/// handler unguarded, and the store errors are counted.
async fn protocol_surprises_are_not_outages(kind: Kind) {
    let env = env(
        kind,
        config()
            .circuit_breaker(2, "60s")
            .fail_open(true)
            .build()
            .expect("config"),
    )
    .await;
    env.instrumented
        .answer_unexpectedly
        .store(true, Ordering::SeqCst);
    let runs = AtomicUsize::new(0);
    for _ in 0..4 {
        let outcome = env
            .checker
            .process(&event("surprise"), |_| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, IdempotencyError>(())
            })
            .await;
        assert!(
            matches!(outcome, Err(IdempotencyError::Protocol { .. })),
            "{outcome:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no unguarded run");
    assert_eq!(
        env.checker.circuit_state(),
        idempotency::CircuitState::Closed
    );
    assert_eq!(env.checker.stats().store_errors, 4);
    assert_eq!(env.checker.stats().fail_open, 0);
}

/// The handler ran, then the store refused its completion for lack of
/// memory (the completion document is larger than the claim): the caller
/// gets the handler's value, the completion is retried in the background
/// until it lands, and no redelivery runs the handler again. The same for a
/// result that could not be stored and a completion the store missed.
async fn a_completion_refused_for_memory_is_recorded_later_and_never_runs_twice(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let runs = AtomicUsize::new(0);
    env.instrumented
        .completes_out_of_memory
        .store(true, Ordering::SeqCst);
    env.instrumented.refuse_completes.store(2, Ordering::SeqCst);
    let first = run_counted(&env.checker, &event("full"), &runs)
        .await
        .expect("the side effect is reported, not turned into an error");
    assert_eq!(first, Processed::Executed("receipt".to_owned()));
    // A result that cannot be stored, whose completion the store misses once.
    env.instrumented
        .completes_out_of_memory
        .store(false, Ordering::SeqCst);
    env.instrumented.refuse_completes.store(1, Ordering::SeqCst);
    let unstorable = env
        .checker
        .process(&event("unstorable-blip"), |_| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, IdempotencyError>(Unstorable::Map(std::collections::HashMap::from([(
                (1u8, 2u8),
                3u8,
            )])))
        })
        .await;
    assert!(
        matches!(unstorable, Err(IdempotencyError::Serialization(_))),
        "{unstorable:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for key in ["full", "unstorable-blip"] {
        loop {
            let record = env
                .checker
                .get_record(key)
                .await
                .expect("get")
                .expect("record");
            if record.status == RecordStatus::Completed {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the completion of {key} never landed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let again = run_counted(&env.checker, &event("full"), &runs)
        .await
        .expect("replay");
    assert_eq!(again, Processed::Replayed("receipt".to_owned()));
    let again = env
        .checker
        .process(&event("unstorable-blip"), |_| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, IdempotencyError>(0u8)
        })
        .await;
    assert!(
        matches!(again, Err(IdempotencyError::ResultNotStored { .. })),
        "{again:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each handler ran once");
}

fn calls(env: &Env) -> usize {
    env.instrumented.calls.load(Ordering::SeqCst)
}

async fn run_counted(
    checker: &IdempotencyChecker,
    e: &EventEnvelope,
    runs: &AtomicUsize,
) -> Result<Processed<String>, IdempotencyError> {
    checker
        .process(e, |_| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, IdempotencyError>("receipt".to_owned())
        })
        .await
}

/// With the local cache on, hot duplicates cost no store call; the cache is
/// dropped for a key by `delete_record`, and a record deleted behind the
/// checker's back is replayed only until the cache TTL runs out.
async fn local_cache_answers_hot_duplicates_without_the_store(kind: Kind) {
    let env = env(
        kind,
        config().local_cache(1000, "300ms").build().expect("config"),
    )
    .await;
    let runs = AtomicUsize::new(0);
    let e = event("hot");
    let first = run_counted(&env.checker, &e, &runs).await.expect("first");
    assert!(first.was_executed());
    let before = calls(&env);
    for _ in 0..100 {
        let again = run_counted(&env.checker, &e, &runs).await.expect("dup");
        assert_eq!(again, Processed::Replayed("receipt".to_owned()));
    }
    assert_eq!(calls(&env), before, "cached duplicates make no store call");
    let stats = env.checker.stats();
    assert_eq!((stats.replayed, stats.cache_hits), (100, 100));

    // delete_record drops the cache entry too: the next delivery runs.
    assert!(env.checker.delete_record("hot").await.expect("delete"));
    run_counted(&env.checker, &e, &runs).await.expect("rerun");
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // Deleted elsewhere (another process, redis-cli): replayed from this
    // process's cache until the cache TTL, then run again.
    let storage = env.checker.storage_key("hot").expect("key");
    assert!(env.store.delete(&storage).await.expect("delete"));
    let stale = run_counted(&env.checker, &e, &runs).await.expect("stale");
    assert!(stale.was_replayed(), "the documented staleness window");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = run_counted(&env.checker, &e, &runs).await.expect("fresh");
    assert!(fresh.was_executed(), "the cache TTL is honoured");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// The cache never outlives the record's own TTL, never holds FAILED or
/// PROCESSING records, fills from duplicates answered by the store, and
/// still detects key reuse with another payload.
async fn local_cache_honours_record_ttl_and_status(kind: Kind) {
    let env = env(
        kind,
        config()
            .local_cache(1000, "1h")
            .ttl("300ms")
            .fingerprint_payloads(true)
            .build()
            .expect("config"),
    )
    .await;
    let runs = AtomicUsize::new(0);
    let e = event("short-lived");
    run_counted(&env.checker, &e, &runs).await.expect("first");
    assert!(
        run_counted(&env.checker, &e, &runs)
            .await
            .expect("dup")
            .was_replayed()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        run_counted(&env.checker, &e, &runs)
            .await
            .expect("after ttl")
            .was_executed(),
        "the record's ttl bounds the cache entry"
    );

    // Same key, other payload: a mismatch, from the cache as from the store.
    let other = EventEnvelope::new("test.event", json!({"other": true}))
        .with_idempotency_key("short-lived");
    assert!(matches!(
        run_counted(&env.checker, &other, &runs).await,
        Err(IdempotencyError::FingerprintMismatch { .. })
    ));

    // FAILED is never cached: the retry runs.
    let f = event("fails-once");
    let failed = env
        .checker
        .process(&f, |_| async {
            Err::<String, _>(IdempotencyError::MissingKey)
        })
        .await;
    assert!(failed.is_err());
    assert!(
        run_counted(&env.checker, &f, &runs)
            .await
            .expect("retry")
            .was_executed()
    );

    // PROCESSING is never cached: a call while another holds the key is
    // InProgress, and once it completes elsewhere the store's answer fills
    // the cache.
    let p = event("held-elsewhere");
    let lease = match env.checker.claim(&p).await.expect("claim") {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    assert!(matches!(
        run_counted(&env.checker, &p, &runs).await,
        Err(IdempotencyError::InProgress { .. })
    ));
    env.store
        .complete(
            &lease,
            Some(&idempotency::ResultJson::new(r#""done elsewhere""#).expect("JSON")),
            Duration::from_secs(60),
        )
        .await
        .expect("complete");
    let before = calls(&env);
    for _ in 0..3 {
        let dup = run_counted(&env.checker, &p, &runs).await.expect("dup");
        assert_eq!(dup, Processed::Replayed("done elsewhere".to_owned()));
    }
    assert_eq!(calls(&env), before + 1, "one store read, then the cache");
}

macro_rules! per_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await;
                }
            )*
        }
    };
}

per_store!(
    sixty_four_concurrent_tasks_execute_once,
    thousand_keys_eight_tasks_each,
    failed_attempt_is_retried_then_replayed,
    expired_lease_is_taken_over_and_stale_worker_loses,
    renewal_keeps_a_slow_handler_alive,
    expired_record_is_processed_again,
    key_reuse_with_another_payload_is_rejected,
    invalid_keys_never_reach_the_store_or_handler,
    dropped_guard_marks_failed_and_retry_runs,
    panicking_handler_is_failed_and_panic_propagates,
    duplicate_policy_error_carries_the_cached_result,
    waiting_duplicate_gets_the_result,
    manual_api_round_trip,
    hashed_keys_hide_the_raw_key,
    stats_count_what_happened,
    cancelled_call_is_failed_and_retried,
    out_of_range_durations_are_config_errors,
    unstorable_result_never_runs_twice_nor_replays_a_made_up_value,
    claim_with_lost_reply_is_released,
    claim_lost_before_an_outage_is_released_when_the_store_returns,
    keyless_envelopes_from_the_wire_are_rejected_not_run,
    protocol_surprises_are_not_outages,
    a_completion_refused_for_memory_is_recorded_later_and_never_runs_twice,
    local_cache_answers_hot_duplicates_without_the_store,
    local_cache_honours_record_ttl_and_status,
);

//! Store outages against a real `redis-server`: the checker's circuit
//! breaker, recovery without rebuilding anything, exactly-once across a
//! SIGKILL mid-stream, and opt-in fail-open.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Instrumented, RedisServer, ServerKind};
use idempotency::{
    CircuitState, EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyConfigBuilder,
    IdempotencyError, IdempotencyStore, Processed, RedisStore, SeenSet, current_lease,
};
use serde_json::json;

fn event(key: &str) -> EventEnvelope {
    EventEnvelope::new("test.event", json!({"key": key})).with_idempotency_key(key)
}

/// A store with short timeouts, so calls against a dead server fail quickly.
async fn store(server: &RedisServer) -> Arc<dyn SeenSet> {
    let store = RedisStore::builder(server.url())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    Arc::new(store)
}

fn config() -> IdempotencyConfigBuilder {
    IdempotencyConfig::builder().lease("5s")
}

async fn run(
    checker: &IdempotencyChecker,
    key: &str,
    runs: &AtomicUsize,
) -> Result<Processed<usize>, IdempotencyError> {
    checker
        .process(&event(key), |_| async {
            Ok::<_, IdempotencyError>(runs.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await
}

fn is_unavailable(e: &IdempotencyError) -> bool {
    e.is_unavailable()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_fails_fast_without_calling_the_store_then_recovers() {
    let mut server = RedisServer::start();
    let port = server.port();
    let instrumented = Arc::new(Instrumented::new(store(&server).await));
    let config = config().circuit_breaker(3, "1s").build().expect("config");
    let checker = IdempotencyChecker::from_shared(instrumented.clone(), config);
    let runs = AtomicUsize::new(0);
    run(&checker, "before", &runs).await.expect("store up");

    server.kill();
    // Real failures (counting the background release of each failed claim)
    // until the threshold opens the breaker.
    let mut failures = 0;
    loop {
        let error = run(&checker, &format!("down-{failures}"), &runs)
            .await
            .expect_err("the store is down");
        assert!(is_unavailable(&error), "{error:?}");
        if error.is_circuit_open() {
            break;
        }
        failures += 1;
        assert!(
            failures <= 3,
            "the breaker opens after 3 consecutive failures"
        );
    }
    assert_eq!(checker.circuit_state(), CircuitState::Open);
    assert_eq!(checker.stats().circuit_opened, 1);

    // Let calls admitted before the breaker opened settle.
    common::eventually(
        Duration::from_secs(5),
        "admitted store calls returned",
        async || instrumented.in_flight.load(Ordering::SeqCst) == 0,
    )
    .await;
    let calls = instrumented.calls.load(Ordering::SeqCst);
    for i in 0..20 {
        let started = Instant::now();
        let error = run(&checker, &format!("fast-{i}"), &runs)
            .await
            .expect_err("the breaker is open");
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "failing fast took {:?}",
            started.elapsed()
        );
        assert!(
            is_unavailable(&error) && error.is_circuit_open(),
            "{error:?}"
        );
        assert!(error.to_string().contains("circuit breaker"), "{error}");
    }
    let started = Instant::now();
    let health = checker.health_check().await.expect_err("open");
    assert!(health.is_circuit_open(), "{health:?}");
    let read = checker.get_record("before").await.expect_err("open");
    assert!(read.is_circuit_open(), "{read:?}");
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        instrumented.calls.load(Ordering::SeqCst),
        calls,
        "no call reached the store while the breaker was open"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "no handler ran unguarded");

    // The server comes back on the same port; past the cool-down a probe
    // gets through, succeeds and closes the breaker. Same checker, same store.
    let _restarted = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let recovered = loop {
        match run(&checker, "after", &runs).await {
            Ok(done) => break done,
            Err(e) if is_unavailable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("did not recover: {e:?}"),
        }
    };
    assert_eq!(recovered, Processed::Executed(2));
    assert_eq!(checker.circuit_state(), CircuitState::Closed);
    checker.health_check().await.expect("healthy again");
    assert_eq!(
        run(&checker, "after", &runs).await.expect("replay"),
        Processed::Replayed(2)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(checker.stats().circuit_opened, 1, "one outage, one opening");
}

/// What the producers saw.
#[derive(Default)]
struct Tally {
    /// Handler runs per key.
    runs: HashMap<String, usize>,
    /// Per key, calls that failed *after* their handler ran: the store died
    /// between the claim and the completion write, so the side effect
    /// happened but was not recorded, and the redelivery runs it again.
    lost_completions: HashMap<String, usize>,
    /// Calls that failed with the store unavailable.
    errors: usize,
}

/// A stream of distinct events worked by several tasks through one checker;
/// redis-server is SIGKILLed mid-stream and restarted (empty) on the same
/// port. Producers retry an event until a call succeeds, as a broker
/// redelivers. Every event runs, calls fail cleanly while the store is down
/// (no handler runs for them), and the same checker carries on afterwards.
///
/// The restarted server has lost every record, so only events whose calls
/// failed are retried, as a broker redelivers. A call whose handler ran
/// before the store died reports success (its completion is retried in the
/// background), so it is not redelivered: no event runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_stream_every_event_runs_and_processing_resumes() {
    killed_mid_stream(ServerKind::Redis).await;
}

/// The same on Valkey 9, whose completions take the `SET ... IFEQ` path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valkey_killed_mid_stream_every_event_runs_and_processing_resumes() {
    killed_mid_stream(ServerKind::Valkey).await;
}

async fn killed_mid_stream(kind: ServerKind) {
    const EVENTS: usize = 600;
    const TASKS: usize = 6;
    let mut server = RedisServer::start_kind(kind);
    let port = server.port();
    let config = config()
        .circuit_breaker(3, "200ms")
        .build()
        .expect("config");
    let checker = IdempotencyChecker::from_shared(store(&server).await, config);
    let queue: Arc<Mutex<VecDeque<EventEnvelope>>> = Arc::new(Mutex::new(
        (0..EVENTS).map(|i| event(&format!("evt-{i}"))).collect(),
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicUsize::new(0));

    let workers: Vec<_> = (0..TASKS)
        .map(|_| {
            let (checker, queue, tally, done) =
                (checker.clone(), queue.clone(), tally.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let next = queue.lock().expect("queue").pop_front();
                    let Some(event) = next else {
                        return;
                    };
                    let key = event.effective_key().to_owned();
                    loop {
                        let ran = AtomicBool::new(false);
                        let outcome = checker
                            .process(&event, |_| async {
                                ran.store(true, Ordering::SeqCst);
                                *tally
                                    .lock()
                                    .expect("tally")
                                    .runs
                                    .entry(key.clone())
                                    .or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                Ok::<_, IdempotencyError>(())
                            })
                            .await;
                        match outcome {
                            Ok(_) => break,
                            Err(e) if is_unavailable(&e) => {
                                let mut tally = tally.lock().expect("tally");
                                tally.errors += 1;
                                if ran.load(Ordering::SeqCst) {
                                    *tally.lost_completions.entry(key.clone()).or_default() += 1;
                                }
                            }
                            Err(IdempotencyError::InProgress { .. }) => {}
                            Err(other) => panic!("unexpected error for {key}: {other:?}"),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    while done.load(Ordering::SeqCst) < EVENTS / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill();
    let done_at_kill = done.load(Ordering::SeqCst);
    assert!(done_at_kill < EVENTS, "killed mid-stream");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let done_while_down = done.load(Ordering::SeqCst);
    let errors_while_down = tally.lock().expect("tally").errors;
    assert!(
        errors_while_down > 0,
        "calls failed while the store was down"
    );
    assert!(
        done_while_down <= done_at_kill + TASKS,
        "nothing completed while the store was down (beyond calls already under way)"
    );

    let _restarted = RedisServer::start_kind_on(kind, port);
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(60), worker)
            .await
            .expect("the stream finishes after the restart")
            .expect("worker");
    }

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    assert_eq!(done.load(Ordering::SeqCst), EVENTS);
    assert_eq!(tally.runs.len(), EVENTS, "every event ran");
    assert!(
        tally.lost_completions.is_empty(),
        "a call failed after its handler ran: {:?}",
        tally.lost_completions
    );
    for (key, &runs) in &tally.runs {
        assert_eq!(runs, 1, "{key} ran {runs} times");
    }
    eprintln!(
        "{EVENTS} events, {} failed calls, each event ran once",
        tally.errors
    );
    let stats = checker.stats();
    assert!(stats.store_errors > 0);
    assert!(stats.circuit_opened >= 1, "the outage opened the breaker");
    assert_eq!(checker.circuit_state(), CircuitState::Closed);
    assert_eq!(stats.fail_open, 0);
    checker.health_check().await.expect("healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_the_handler_unguarded_only_when_asked() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    let fail_open = IdempotencyChecker::from_shared(
        store.clone(),
        config()
            .fail_open(true)
            .circuit_breaker(2, "30s")
            .build()
            .expect("config"),
    );
    let fail_closed = IdempotencyChecker::from_shared(
        store,
        config().circuit_breaker(2, "30s").build().expect("config"),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(
        run(&fail_open, "up", &runs).await.expect("up"),
        Processed::Executed(1)
    );
    assert_eq!(
        fail_open.stats().fail_open,
        0,
        "only when the store is down"
    );

    server.kill();
    // The first calls reach the dead store, the later ones the open breaker:
    // the handler runs every time.
    for i in 0..5u32 {
        let runs = &runs;
        let outcome = fail_open
            .process(&event(&format!("open-{i}")), |lease| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                assert_eq!(lease.attempt(), 0, "an unguarded run has no attempt");
                assert_eq!(current_lease().map(|l| l.attempt()), Some(0));
                Ok::<_, IdempotencyError>(i)
            })
            .await
            .expect("fail open");
        assert_eq!(outcome, Processed::Executed(i));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);
    let stats = fail_open.stats();
    assert_eq!(stats.fail_open, 5);
    assert_eq!(stats.executed, 1, "unguarded runs are not recorded");
    assert_eq!(fail_open.circuit_state(), CircuitState::Open);

    // The handler's own error comes back as it is.
    let failed = fail_open
        .process(&event("open-err"), |_| async {
            Err::<u32, _>(IdempotencyError::Serialization(serde::de::Error::custom(
                "the handler failed",
            )))
        })
        .await;
    assert!(
        matches!(failed, Err(IdempotencyError::Serialization(_))),
        "{failed:?}"
    );
    assert_eq!(fail_open.stats().fail_open, 6);

    // The manual guard never fails open.
    let guarded = fail_open.guard(&event("manual")).await;
    assert!(
        matches!(&guarded, Err(e) if is_unavailable(e) && e.is_circuit_open()),
        "{guarded:?}"
    );

    // Fail closed (the default): the handler never runs.
    for i in 0..5 {
        let outcome = run(&fail_closed, &format!("closed-{i}"), &runs).await;
        assert!(
            matches!(&outcome, Err(e) if is_unavailable(e)),
            "{outcome:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);
    assert_eq!(fail_closed.stats().fail_open, 0);
    assert_eq!(fail_closed.circuit_state(), CircuitState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_breaker_every_call_reaches_the_store() {
    let mut server = RedisServer::start();
    let instrumented = Arc::new(Instrumented::new(store(&server).await));
    let checker = IdempotencyChecker::from_shared(
        instrumented.clone(),
        config().no_circuit_breaker().build().expect("config"),
    );
    server.kill();
    let runs = AtomicUsize::new(0);
    for i in 0..6 {
        let before = instrumented.calls.load(Ordering::SeqCst);
        let error = run(&checker, &format!("k{i}"), &runs)
            .await
            .expect_err("down");
        assert!(
            is_unavailable(&error) && !error.is_circuit_open(),
            "{error:?}"
        );
        assert!(instrumented.calls.load(Ordering::SeqCst) > before);
    }
    assert_eq!(checker.circuit_state(), CircuitState::Closed);
    assert_eq!(checker.stats().circuit_opened, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The handler ran, then the store did not take the completion: the call
/// still reports the execution (a redelivery would run the side effects
/// again), and the completion lands in the background once the store
/// answers, after which duplicates replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_the_store_missed_is_reported_and_recorded_later() {
    completion_missed(ServerKind::Redis).await;
}

/// The same on Valkey 9 (the `SET ... IFEQ` completion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_valkey_missed_is_reported_and_recorded_later() {
    completion_missed(ServerKind::Valkey).await;
}

async fn completion_missed(kind: ServerKind) {
    let server = RedisServer::start_kind(kind);
    let instrumented = Arc::new(Instrumented::new(store(&server).await));
    instrumented.refuse_completes.store(2, Ordering::SeqCst);
    let checker = IdempotencyChecker::from_shared(
        Arc::clone(&instrumented) as Arc<dyn IdempotencyStore>,
        config().build().expect("config"),
    );
    let runs = AtomicUsize::new(0);
    let first = run(&checker, "missed-1", &runs).await.expect("reported");
    assert_eq!(first, Processed::Executed(1));
    assert!(checker.stats().store_errors >= 1);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let record = checker
            .get_record("missed-1")
            .await
            .expect("get")
            .expect("record");
        if record.status == idempotency::RecordStatus::Completed {
            assert_eq!(record.result, Some(json!(1)));
            break;
        }
        assert!(Instant::now() < deadline, "the completion never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(instrumented.refuse_completes.load(Ordering::SeqCst), 0);
    let again = run(&checker, "missed-1", &runs).await.expect("replay");
    assert_eq!(again, Processed::Replayed(1));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

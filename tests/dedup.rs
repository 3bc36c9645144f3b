//! `Deduplicator` through the public API, on the memory store and on a real
//! Redis (every shared test runs once per store), plus Redis-only checks of
//! round trips and of a retried batch whose first reply was lost.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Instrumented, RedisServer};
use idempotency::{
    Deduplicator, EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError,
    KeyExtractor, MemoryStore, Processed, RecordStatus, RedisStore, SeenSet,
};
use serde_json::json;

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

/// A deduplicator over one store (seen through a call-counting wrapper),
/// keeping its server alive.
struct Env {
    dedup: Deduplicator,
    instrumented: Arc<Instrumented>,
    server: Option<RedisServer>,
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
    let instrumented = Arc::new(Instrumented::new(store));
    Env {
        dedup: Deduplicator::from_shared(instrumented.clone(), config),
        instrumented,
        server,
    }
}

fn config() -> idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
}

fn calls(env: &Env) -> usize {
    env.instrumented.calls.load(Ordering::SeqCst)
}

async fn single_ids_are_new_once(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let d = &env.dedup;
    assert!(!d.is_seen("a").await.expect("read"));
    assert!(d.check_and_mark("a").await.expect("mark"), "first time");
    assert!(!d.check_and_mark("a").await.expect("mark"), "seen");
    assert!(d.is_seen("a").await.expect("read"));
    assert!(d.forget("a").await.expect("clear"));
    assert!(
        !d.forget("a").await.expect("clear"),
        "nothing left to clear"
    );
    assert!(!d.is_seen("a").await.expect("read"));
    assert!(d.check_and_mark("a").await.expect("mark"), "new again");
}

/// The expected answers: only the first occurrence of an id not marked
/// before is new.
fn first_occurrences(ids: &[String], marked: &HashSet<String>) -> Vec<bool> {
    let mut seen = marked.clone();
    ids.iter().map(|id| seen.insert(id.clone())).collect()
}

async fn batches_answer_in_order_with_repeats_one_call_per_chunk(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let dedup = env.dedup.clone().chunk_size(1000);
    // 2500 ids over 1500 distinct values: repeats within a chunk and across
    // chunks, and some ids marked before the batch.
    let ids: Vec<String> = (0..2500)
        .map(|i| format!("id-{}", (i * 7) % 1500))
        .collect();
    let earlier: Vec<String> = (0..100).map(|i| format!("id-{}", i * 13)).collect();
    dedup.check_and_mark_batch(&earlier).await.expect("marks");
    let expected = first_occurrences(&ids, &earlier.iter().cloned().collect());

    let before = calls(&env);
    let answers = dedup.check_and_mark_batch(&ids).await.expect("marks");
    assert_eq!(calls(&env) - before, 3, "one store call per chunk of 1000");
    assert_eq!(answers, expected);
    assert_eq!(answers.iter().filter(|&&new| new).count(), 1400);

    // Everything is marked now; a read-only check says so, in order.
    let mut probe = ids.clone();
    probe.extend((0..10).map(|i| format!("never-{i}")));
    let before = calls(&env);
    let seen = dedup.batch_check(&probe).await.expect("reads");
    assert_eq!(calls(&env) - before, 3);
    assert_eq!(seen.len(), probe.len());
    assert!(seen[..2500].iter().all(|&s| s));
    assert!(seen[2500..].iter().all(|&s| !s));
    assert!(
        !dedup.is_seen("never-0").await.expect("read"),
        "reads mark nothing"
    );
    assert_eq!(
        dedup
            .check_and_mark_batch(&Vec::<String>::new())
            .await
            .expect("empty"),
        Vec::<bool>::new()
    );
}

async fn sixteen_racing_tasks_have_one_winner(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    for round in 0..10 {
        let id = format!("race-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (dedup, barrier, id) = (env.dedup.clone(), barrier.clone(), id.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    dedup.check_and_mark(&id).await.expect("mark")
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.expect("task"));
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn ids_get_the_checkers_key_hygiene(kind: Kind) {
    let config = config()
        .key_prefix("seen:")
        .hash_keys(true)
        .max_key_len(64)
        .build()
        .expect("config");
    let env = env(kind, config.clone()).await;
    let checker = IdempotencyChecker::from_shared(env.instrumented.clone(), config);
    let id = "user@example.com";
    assert_eq!(
        env.dedup.storage_key(id).expect("key"),
        checker.storage_key(id).expect("key")
    );
    assert!(env.dedup.check_and_mark(id).await.expect("mark"));

    // A mark is a COMPLETED record: the checker replays it, the handler does not run.
    let record = checker.get_record(id).await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    let event = EventEnvelope::new("signup", json!({})).with_idempotency_key(id);
    let replayed = checker
        .process(&event, |_| async {
            Err::<(), _>(IdempotencyError::MissingKeyField {
                field: "a marked key must not run".into(),
            })
        })
        .await
        .expect("replay");
    assert_eq!(replayed, Processed::Replayed(()));
    // And the other way round: a key the checker processed is seen.
    let other = EventEnvelope::new("signup", json!({})).with_idempotency_key("other");
    checker
        .process(&other, |_| async { Ok::<_, IdempotencyError>(1) })
        .await
        .expect("runs");
    assert!(env.dedup.is_seen("other").await.expect("read"));
    assert!(!env.dedup.check_and_mark("other").await.expect("mark"));
    // A deduplicator made from the same store and the checker's config is
    // the same seen-set.
    let shared = Deduplicator::from_shared(env.instrumented.clone(), checker.config().clone());
    assert!(shared.is_seen(id).await.expect("read"));

    // Invalid ids never reach the store, and fail a whole batch.
    let before = calls(&env);
    let too_long = "k".repeat(65);
    for bad in ["", "a\nb", too_long.as_str()] {
        let single = env.dedup.check_and_mark(bad).await;
        assert!(
            matches!(single, Err(IdempotencyError::InvalidKey { .. })),
            "{single:?}"
        );
        let batch = env.dedup.check_and_mark_batch(&["fresh", bad]).await;
        assert!(
            matches!(batch, Err(IdempotencyError::InvalidKey { .. })),
            "{batch:?}"
        );
        assert!(env.dedup.batch_check(&[bad]).await.is_err());
    }
    assert_eq!(calls(&env), before, "no store call for invalid ids");
    assert!(!env.dedup.is_seen("fresh").await.expect("read"));

    // The raw id never reaches Redis when hashing is on.
    if let Some(server) = &env.server {
        let mut redis = server.client().await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut redis)
            .await
            .expect("KEYS");
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().all(|k| k.starts_with("seen:") && k.len() == 69));
        assert!(!keys.iter().any(|k| k.contains("example")));
    }
}

async fn marks_live_for_the_configured_ttl(kind: Kind) {
    let env = env(kind, config().ttl("300ms").build().expect("config")).await;
    assert_eq!(
        env.dedup
            .check_and_mark_batch(&["t1", "t2"])
            .await
            .expect("marks"),
        [true, true]
    );
    assert!(env.dedup.is_seen("t1").await.expect("read"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.dedup.batch_check(&["t1", "t2"]).await.expect("reads"),
        [false, false]
    );
    assert!(env.dedup.check_and_mark("t1").await.expect("mark"));
}

async fn extractors_name_events(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;

    // By default, the envelope's effective key.
    let keyed = EventEnvelope::new("t", json!({"n": 1}))
        .with_event_id("evt-1")
        .with_idempotency_key("key-1");
    assert!(env.dedup.check_and_mark_event(&keyed).await.expect("mark"));
    assert!(env.dedup.is_seen("key-1").await.expect("read"));
    assert!(!env.dedup.is_seen("evt-1").await.expect("read"));
    let by_id = env.dedup.clone().with_extractor(KeyExtractor::EventId);
    assert!(by_id.check_and_mark_event(&keyed).await.expect("mark"));
    assert!(env.dedup.is_seen("evt-1").await.expect("read"));

    // Content hash: equal payloads (whatever their key order) are one event.
    let by_content = env.dedup.clone().with_extractor(KeyExtractor::ContentHash);
    let events = [
        EventEnvelope::new("click", json!({"user": 7, "x": 1})),
        EventEnvelope::new("click", json!({"x": 1, "user": 7})),
        EventEnvelope::new("click", json!({"x": 2, "user": 7})),
    ];
    assert_eq!(
        by_content
            .check_and_mark_events(&events)
            .await
            .expect("marks"),
        [true, false, true]
    );

    // Composite fields, names or JSON pointers, unambiguous.
    let by_fields = env
        .dedup
        .clone()
        .with_extractor(KeyExtractor::fields(["ts", "/user/id", "name"]));
    let event = |ts: &str, user: serde_json::Value, name: &str| {
        EventEnvelope::new(
            "track",
            json!({"ts": ts, "user": {"id": user}, "name": name}),
        )
    };
    let batch = [
        event("2026-01-01", json!("u1"), "open"),
        event("2026-01-01", json!("u1"), "open"),
        event("2026-01-01", json!(1), "open"),
        event("2026-01-01", json!("1"), "open"),
        event("2026-01-01:u1", json!(""), "open"),
    ];
    assert_eq!(
        by_fields
            .check_and_mark_events(&batch)
            .await
            .expect("marks"),
        [true, false, true, true, true]
    );
    assert_eq!(
        by_fields.key_of(&batch[0]).expect("key"),
        r#"["2026-01-01","u1","open"]"#
    );
    let before = calls(&env);
    let missing = EventEnvelope::new("track", json!({"ts": "x", "name": "open"}));
    let refused = by_fields.check_and_mark_event(&missing).await;
    assert!(
        matches!(&refused, Err(IdempotencyError::MissingKeyField { field }) if field == "/user/id"),
        "{refused:?}"
    );
    assert_eq!(calls(&env), before, "no key, no store call");

    // Any function of the envelope.
    let custom = env.dedup.clone().with_extractor(KeyExtractor::custom(|e| {
        Ok(format!("{}:{}", e.event_type, e.payload["order"]))
    }));
    let order = |n: u32| EventEnvelope::new("order.paid", json!({"order": n, "at": "now"}));
    assert!(custom.check_and_mark_event(&order(1)).await.expect("mark"));
    assert!(!custom.check_and_mark_event(&order(1)).await.expect("mark"));
    assert!(env.dedup.is_seen("order.paid:1").await.expect("read"));
}

async fn long_derived_keys_are_marked_and_keyless_events_refused(kind: Kind) {
    let env = env(kind, config().build().expect("config")).await;
    let by_fields = env
        .dedup
        .clone()
        .with_extractor(KeyExtractor::fields(["distinct_id", "token"]));
    // A 300-character value: the derived key is hashed, never too long.
    let long = |id: &str| {
        EventEnvelope::new(
            "track",
            json!({"distinct_id": id.repeat(300), "token": "t"}),
        )
    };
    assert_eq!(
        by_fields
            .check_and_mark_events(&[long("u"), long("u"), long("v")])
            .await
            .expect("marks"),
        [true, false, true]
    );
    // No key at all: refused before the store is asked, by every extractor
    // that reads the producer's key; never an invented one.
    let keyless: EventEnvelope =
        serde_json::from_value(json!({"event_type": "t", "payload": {}})).expect("parses");
    let before = calls(&env);
    for extractor in [KeyExtractor::IdempotencyKey, KeyExtractor::EventId] {
        let dedup = env.dedup.clone().with_extractor(extractor);
        for _ in 0..2 {
            assert!(matches!(
                dedup.check_and_mark_event(&keyless).await,
                Err(IdempotencyError::MissingKey)
            ));
        }
    }
    // An empty explicit key is invalid, not a fallback to the event id.
    let empty = keyless.with_event_id("evt-1").with_idempotency_key("");
    assert!(matches!(
        env.dedup.check_and_mark_event(&empty).await,
        Err(IdempotencyError::InvalidKey { .. })
    ));
    assert_eq!(calls(&env), before, "the store was never asked");
    assert!(!env.dedup.is_seen("evt-1").await.expect("read"));
}

macro_rules! per_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await;
                }
            )*
        }
    };
}

per_store!(
    single_ids_are_new_once,
    batches_answer_in_order_with_repeats_one_call_per_chunk,
    sixteen_racing_tasks_have_one_winner,
    ids_get_the_checkers_key_hygiene,
    marks_live_for_the_configured_ttl,
    extractors_name_events,
    long_derived_keys_are_marked_and_keyless_events_refused,
);

/// What Redis says it did: reads of client input, and calls per command.
struct RedisCounts {
    reads: u64,
    set: u64,
    exists: u64,
    eval: u64,
}

async fn redis_counts(server: &RedisServer) -> RedisCounts {
    let mut redis = server.client().await;
    let info: String = ::redis::cmd("INFO")
        .arg("stats")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .expect("INFO");
    let field = |prefix: &str, name: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .map(|rest| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(name))
                    .unwrap_or(rest)
                    .trim()
                    .parse()
                    .expect("a number")
            })
            .unwrap_or(0)
    };
    RedisCounts {
        reads: field("total_reads_processed:", ""),
        set: field("cmdstat_set:", "calls="),
        exists: field("cmdstat_exists:", "calls="),
        eval: field("cmdstat_eval:", "calls="),
    }
}

/// A batch goes out as one pipeline per chunk: Redis runs one `SET` per id
/// but reads each chunk's commands in a few socket reads, where one round
/// trip per id would take one read per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sends_one_pipeline_per_chunk() {
    const IDS: usize = 500;
    const CHUNK: usize = 50;
    const CHUNKS: u64 = (IDS / CHUNK) as u64;
    let env = env(Kind::Redis, config().build().expect("config")).await;
    let server = env.server.as_ref().expect("redis");
    let dedup = env.dedup.clone().chunk_size(CHUNK);
    let ids: Vec<String> = (0..IDS).map(|i| format!("event-{i:05}")).collect();

    let before = redis_counts(server).await;
    let answers = dedup.check_and_mark_batch(&ids).await.expect("marks");
    let after = redis_counts(server).await;
    assert!(answers.iter().all(|&new| new));
    assert_eq!(after.set - before.set, IDS as u64, "one SET per id");
    let reads = after.reads - before.reads;
    eprintln!("{IDS} marks in chunks of {CHUNK}: {reads} socket reads");
    // Each 50-command pipeline (~10 KB) arrives in one or two reads; the
    // slack covers the INFO call itself.
    assert!(
        reads <= CHUNKS * 3 + 2,
        "{reads} socket reads for {CHUNKS} pipelines of {CHUNK} commands"
    );

    let before = redis_counts(server).await;
    let seen = dedup.batch_check(&ids).await.expect("reads");
    let after = redis_counts(server).await;
    assert!(seen.iter().all(|&s| s));
    assert_eq!(after.exists - before.exists, IDS as u64);
    let reads = after.reads - before.reads;
    assert!(
        reads <= CHUNKS * 3 + 2,
        "{reads} socket reads for batch_check"
    );
}

/// The store retries a batch whose reply timed out. A plain `SET NX` retry
/// would find the first try's marks and answer "seen", dropping new events;
/// the retry recognises this call's own marks instead. Redis is paused
/// (`CLIENT PAUSE`) so the first try lands only after its reply timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_retry_after_a_lost_reply_keeps_its_own_marks_new() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(300))
        .max_retries(3)
        .connect()
        .await
        .expect("connect");
    let dedup = Deduplicator::new(store);
    let other = dedup.clone();
    assert!(other.check_and_mark("marked-before").await.expect("mark"));

    let before = redis_counts(&server).await;
    let mut admin = server.client().await;
    let () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(700)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    let answers = dedup
        .check_and_mark_batch(&["new-1", "new-2", "marked-before", "new-1"])
        .await
        .expect("marks after the pause");
    assert_eq!(answers, [true, true, false, false]);
    let after = redis_counts(&server).await;
    assert!(
        after.eval > before.eval,
        "the batch was retried (the retry path ran)"
    );
    assert!(!dedup.check_and_mark("new-2").await.expect("mark"));
}

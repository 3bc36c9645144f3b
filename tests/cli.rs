//! The `idempotency` admin CLI, run as a process against a real redis-server.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::RedisServer;
use idempotency::{ClaimOutcome, EventEnvelope, IdempotencyChecker, IdempotencyError, RedisStore};
use redis::AsyncCommands;
use serde_json::json;

fn cli(server: &RedisServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idempotency"))
        .args(args)
        .env("REDIS_URL", server.url())
        .output()
        .expect("run the idempotency binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn done(checker: &IdempotencyChecker, key: &str) {
    let e = EventEnvelope::new("order.placed", json!({})).with_idempotency_key(key);
    checker
        .process(&e, |_| async {
            Ok::<_, IdempotencyError>(json!({"receipt": key}))
        })
        .await
        .expect("process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_delete_stuck_stats_and_clear() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let config = idempotency::IdempotencyConfig::builder()
        .lease("100ms")
        .build()
        .expect("config");
    let checker = IdempotencyChecker::with_config(store, config);
    for key in ["a", "b", "c"] {
        done(&checker, key).await;
    }
    // A dead attempt: claimed, never finished, lease run out.
    let dead = EventEnvelope::new("order.shipped", json!({})).with_idempotency_key("dead");
    assert!(matches!(
        checker.claim(&dead).await.expect("claim"),
        ClaimOutcome::Acquired(_)
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut redis = server.client().await;
    let _: () = redis.set("unrelated:key", "x").await.expect("SET");
    let _: () = redis
        .set("idempotency:events:junk", "not json")
        .await
        .expect("SET");

    // get
    let out = cli(&server, &["get", "a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(got["key"], "idempotency:events:a");
    assert_eq!(got["record"]["status"], "COMPLETED");
    assert_eq!(got["record"]["result"], json!({"receipt": "a"}));
    assert!(got["expires_in_ms"].as_i64().expect("ttl") > 80_000_000);
    let out = cli(&server, &["get", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no record"));

    // stuck
    let out = cli(&server, &["stuck"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("idempotency:events:dead\tattempts=1"));
    assert!(lines[0].contains("event_type=order.shipped"));

    // stats
    let out = cli(&server, &["stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "records     5",
        "stuck       1",
        "completed   3",
        "corrupt     1",
        "processing  0",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert!(text.contains("per record"));

    // delete
    let out = cli(&server, &["delete", "b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("deleted idempotency:events:b"));
    assert_eq!(cli(&server, &["delete", "b"]).status.code(), Some(1));
    let exists: bool = redis.exists("idempotency:events:b").await.expect("EXISTS");
    assert!(!exists);

    // clear refuses without --yes, and deletes nothing
    let out = cli(&server, &["clear", "--prefix", "idempotency:events:"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--yes"));
    let exists: bool = redis.exists("idempotency:events:a").await.expect("EXISTS");
    assert!(exists);

    // clear --yes deletes the prefix, and only the prefix
    let out = cli(
        &server,
        &["clear", "--prefix", "idempotency:events:", "--yes"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deleted 4 key(s)"),
        "{}",
        stdout(&out)
    );
    let left: Vec<String> = redis.keys("*").await.expect("KEYS");
    assert_eq!(left, ["unrelated:key"]);
}

#[tokio::test]
async fn hashed_keys_and_bad_urls() {
    let server = RedisServer::start();
    let config = idempotency::IdempotencyConfig::builder()
        .hash_keys(true)
        .build()
        .expect("config");
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let checker = IdempotencyChecker::with_config(store, config);
    done(&checker, "customer@example.com").await;

    let out = cli(&server, &["--hash-keys", "get", "customer@example.com"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    // SHA-256 of `customer@example.com`, in lower-case hex.
    let digest = "e233d4a29013e9d87150c6237c6777bedf379ebf1acdc5d6126fec7e8bb74fb5";
    assert_eq!(got["key"], format!("idempotency:events:{digest}"));
    assert_eq!(got["record"]["idempotency_key"], digest);
    let out = cli(&server, &["get", "customer@example.com"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "without --hash-keys it is not found"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_idempotency"))
        .args(["stats"])
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

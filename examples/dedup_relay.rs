//! A dedup relay: raw analytics events in, each unique event out exactly once,
//! keyed by the fields `timestamp`, `distinct_id`, `token` and `event_name`
//! (the key is the JSON array of their values, e.g.
//! `[1700000000000,"user-7","phc_demo","page_view"]`, hashed with SHA-256
//! when longer than 64 characters).
//!
//! Run with:
//! ```text
//! nats-server -js &                               # apt-get install nats-server
//! cargo run --example dedup_relay --features nats
//! ```
//! It creates the streams `RAW` (`raw.>`) and `UNIQUE` (`unique.>`), publishes
//! 1,000 events of which 300 are repeats, relays for 5 seconds and prints how
//! many reached `UNIQUE`. An input is acked only after its output publish was
//! acknowledged; if the publish fails the input is nak'd and retried later.
//! One more event lacks `distinct_id`: it is terminated as poison and the
//! reason is logged (`RUST_LOG` sets the log level, default `info`).
//! `NATS_URL` defaults to `nats://127.0.0.1:4222`; the store is Redis when
//! `REDIS_URL` is set, else in-process memory.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use idempotency::nats::{DedupRelay, KeyExtractor};
use idempotency::{IdempotencyChecker, IdempotencyConfig, MemoryStore, RedisStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Without a subscriber the framework's warnings ("terminating a poison
    // message", "store unavailable", ...) go nowhere. `RUST_LOG` overrides
    // the level, e.g. `RUST_LOG=idempotency=debug`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let js = jetstream::new(async_nats::connect(&url).await?);
    let stream_config = |name: &str, subjects: &str| stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        // Longer than the claim lease: a crash between publish and completion
        // is absorbed by the output stream.
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    };
    let raw = js
        .get_or_create_stream(stream_config("RAW", "raw.>"))
        .await?;
    let mut unique = js
        .get_or_create_stream(stream_config("UNIQUE", "unique.>"))
        .await?;
    let before = unique.info().await?.state.messages;
    let consumer = raw
        .get_or_create_consumer(
            "relay",
            pull::Config {
                durable_name: Some("relay".into()),
                ..Default::default()
            },
        )
        .await?;

    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for i in 0..1_000u64 {
        // Every event from 700 on repeats an earlier one.
        let n = if i < 700 { i } else { i - 700 };
        let event = serde_json::json!({
            "timestamp": run * 1000 + n, "distinct_id": format!("user-{}", n % 50),
            "token": "phc_demo", "event_name": "page_view", "properties": {"n": n},
        });
        js.publish("raw.events", event.to_string().into())
            .await?
            .await?;
    }
    // No distinct_id: no key can be built, so the relay terminates it.
    let keyless = serde_json::json!({"timestamp": run * 1000, "token": "phc_demo", "event_name": "page_view"});
    js.publish("raw.events", keyless.to_string().into())
        .await?
        .await?;

    let store_checker = |config| async move {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(match std::env::var("REDIS_URL") {
            Ok(redis) => {
                IdempotencyChecker::with_config(RedisStore::connect(&redis).await?, config)
            }
            Err(_) => IdempotencyChecker::with_config(MemoryStore::new(), config),
        })
    };
    let checker = store_checker(
        IdempotencyConfig::builder()
            .key_prefix("relay:")
            .ttl("7d")
            .build()?,
    )
    .await?;
    let fields = KeyExtractor::fields(["timestamp", "distinct_id", "token", "event_name"]);
    let stats = DedupRelay::new(consumer, js.clone(), "unique.events", fields)
        .concurrency(32)
        .run(checker.clone(), tokio::time::sleep(Duration::from_secs(5)))
        .await?;
    let relayed = unique.info().await?.state.messages - before;
    println!("relay: {stats:?}");
    println!("{relayed} unique events reached UNIQUE (expected 700)");
    Ok(())
}

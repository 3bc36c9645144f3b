//! A JetStream pull consumer: each order is charged once, however often
//! JetStream redelivers it. Failures are nak'd with backoff, poison messages
//! terminated, long handlers kept alive with progress acks.
//!
//! Run with:
//! ```text
//! nats-server -js &                               # apt-get install nats-server
//! cargo run --example jetstream_consumer --features nats
//! ```
//! It creates the stream `ORDERS` (subjects `orders.>`) and the durable
//! consumer `billing`, publishes a few orders with duplicates and one poison
//! message, and stops after 5 seconds (or on Ctrl-C with `--forever`). Publish
//! more with the `nats` CLI:
//! ```text
//! nats pub orders.placed '{"event_id":"o-7","event_type":"order.placed","payload":{"order":7,"cents":700}}'
//! ```
//! `NATS_URL` defaults to `nats://127.0.0.1:4222`; the store is Redis when
//! `REDIS_URL` is set, else in-process memory.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use idempotency::nats::{JetStreamWorker, Runner, publish_event};
use idempotency::{EventEnvelope, IdempotencyChecker, MemoryStore, RedisStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order: u32,
    cents: u64,
}

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
    let orders = js
        .get_or_create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let consumer = orders
        .get_or_create_consumer(
            "billing",
            pull::Config {
                durable_name: Some("billing".into()),
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let checker = match std::env::var("REDIS_URL") {
        Ok(redis) => IdempotencyChecker::new(RedisStore::connect(&redis).await?),
        Err(_) => IdempotencyChecker::new(MemoryStore::new()),
    };

    // Some traffic: order 2 is published twice with the same key (the stream's
    // duplicate window drops the copy), order 1 again under a new message id
    // (the checker drops it), and one message that is not an envelope.
    for (order, cents) in [(1, 1000), (2, 2000), (2, 2000), (3, 3000)] {
        let event = EventEnvelope::new("order.placed", Order { order, cents })
            .with_idempotency_key(format!("order-{order}"));
        publish_event(&js, "orders.placed", &event).await?;
    }
    let again = EventEnvelope::new(
        "order.placed",
        Order {
            order: 1,
            cents: 1000,
        },
    )
    .with_idempotency_key("order-1");
    js.publish("orders.placed", serde_json::to_vec(&again)?.into())
        .await?
        .await?;
    js.publish("orders.placed", "this is not an envelope".into())
        .await?
        .await?;

    let forever = std::env::args().any(|a| a == "--forever");
    let stats = JetStreamWorker::new(consumer)
        .concurrency(8)
        .run(
            Runner::new(
                checker.clone(),
                |envelope: EventEnvelope<Order>| async move {
                    println!(
                        "charging order {} ({} cents)",
                        envelope.payload.order, envelope.payload.cents
                    );
                    Ok::<_, std::io::Error>(format!("charge-{}", envelope.payload.order))
                },
            ),
            async move {
                if forever {
                    let _ = tokio::signal::ctrl_c().await;
                } else {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            },
        )
        .await?;
    println!("worker: {stats:?}");
    println!("checker: {:?}", checker.stats());
    Ok(())
}

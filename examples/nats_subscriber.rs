//! A core NATS subscriber in a queue group, with request/reply: each quote is
//! computed once per key; a duplicate request gets the first reply back.
//!
//! Run with:
//! ```text
//! nats-server &                                   # apt-get install nats-server
//! cargo run --example nats_subscriber --features nats
//! ```
//! `NATS_URL` defaults to `nats://127.0.0.1:4222`; the store is Redis when
//! `REDIS_URL` is set, else in-process memory. Then send a request twice with
//! the `nats` CLI, or run this example with `--demo`, which does it for you:
//! ```text
//! nats request quotes.requested '{"event_id":"q-1","event_type":"quote.requested","payload":{"amount":120}}'
//! ```

use std::time::Duration;

use idempotency::nats::{Runner, Subscriber};
use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore, RedisStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct QuoteRequest {
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    amount: u64,
    fee: u64,
    quote_id: String,
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
    let client = async_nats::connect(&url).await?;
    let checker = match std::env::var("REDIS_URL") {
        Ok(redis) => IdempotencyChecker::new(RedisStore::connect(&redis).await?),
        Err(_) => IdempotencyChecker::new(MemoryStore::new()),
    };
    let demo = std::env::args().any(|a| a == "--demo");

    let subscriber = Subscriber::new(client.clone(), "quotes.requested")
        .queue_group("quoters")
        .run(
            Runner::new(
                checker.clone(),
                |envelope: EventEnvelope<QuoteRequest>| async move {
                    println!("computing quote for {}", envelope.event_id);
                    Ok::<_, IdempotencyError>(Quote {
                        amount: envelope.payload.amount,
                        fee: envelope.payload.amount / 100 + 30,
                        quote_id: format!("quote-{}", envelope.event_id),
                    })
                },
            ),
            async move {
                if demo {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                } else {
                    let _ = tokio::signal::ctrl_c().await;
                }
            },
        );
    println!("listening on quotes.requested ({url}); Ctrl-C to stop");
    if demo {
        let requester = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let body =
                r#"{"event_id":"q-1","event_type":"quote.requested","payload":{"amount":120}}"#;
            for attempt in 1..=2 {
                match requester.request("quotes.requested", body.into()).await {
                    Ok(reply) => println!(
                        "request {attempt}: {}",
                        String::from_utf8_lossy(&reply.payload)
                    ),
                    Err(error) => println!("request {attempt} failed: {error}"),
                }
            }
        });
    }
    let stats = subscriber.await?;
    println!("{stats:?}; checker: {:?}", checker.stats());
    Ok(())
}

//! A tour of `idempotency` in one program: duplicates replayed, a failing
//! event retried, two concurrent copies of one event, and the stats.
//!
//! Run with: `cargo run --example quickstart`
//!
//! It needs no server: with `REDIS_URL` unset it uses the in-process
//! `MemoryStore`. With `REDIS_URL=redis://127.0.0.1:6379` it uses Redis, and
//! you can look at the records afterwards with
//! `redis-cli --scan --pattern 'idempotency:events:quickstart-*'`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, MemoryStore, Processed,
    RedisStore,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u32,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    order_id: u32,
    charge_id: String,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("payment gateway timed out")]
    GatewayTimeout,
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

/// The side effect we must not repeat: charging a card.
async fn charge(order: &OrderPlaced, flaky: &AtomicU32) -> Result<Receipt, AppError> {
    // Order 3's gateway times out on the first try only.
    if order.order_id == 3 && flaky.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(AppError::GatewayTimeout);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(Receipt {
        order_id: order.order_id,
        charge_id: format!("ch_{}_{}", order.order_id, order.amount_cents),
    })
}

fn describe(outcome: &Result<Processed<Receipt>, AppError>) -> String {
    match outcome {
        Ok(Processed::Executed(r)) => format!("EXECUTED  -> {}", r.charge_id),
        Ok(Processed::Replayed(r)) => format!("replayed  -> {}", r.charge_id),
        Err(AppError::Idempotency(IdempotencyError::InProgress { .. })) => {
            "in progress elsewhere; try later".to_owned()
        }
        Err(e) => format!("FAILED    -> {e} (will be retried)"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a subscriber the framework's warnings ("terminating a poison
    // message", "store unavailable", ...) go nowhere. `RUST_LOG` overrides
    // the level, e.g. `RUST_LOG=idempotency=debug`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = IdempotencyConfig::builder()
        .ttl("24h")
        .lease("30s")
        .build()?;
    let checker = match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("store: Redis at {url}");
            IdempotencyChecker::with_config(RedisStore::connect(&url).await?, config)
        }
        Err(_) => {
            println!("store: in-process memory (set REDIS_URL to use Redis)");
            IdempotencyChecker::with_config(MemoryStore::new(), config)
        }
    };
    // Fresh keys per run, so running twice against Redis shows fresh executions.
    let run = uuid_like();
    let flaky = AtomicU32::new(0);

    // 1. A stream with duplicates: the broker redelivers orders 1 and 3.
    println!("\n-- a stream with redeliveries --");
    let orders = [1, 2, 1, 3, 3, 2];
    for order_id in orders {
        let event = EventEnvelope::new(
            "order.placed",
            OrderPlaced {
                order_id,
                amount_cents: 1000 * u64::from(order_id),
            },
        )
        .with_idempotency_key(format!("quickstart-{run}-order-{order_id}"));
        let outcome = checker
            .process(&event, |_lease| charge(&event.payload, &flaky))
            .await;
        println!("order {order_id}: {}", describe(&outcome));
    }

    // 2. Order 3 failed once above and succeeded on its redelivery; one more
    //    redelivery is now a replay.
    println!("\n-- the failed order, delivered again --");
    let event = EventEnvelope::new(
        "order.placed",
        OrderPlaced {
            order_id: 3,
            amount_cents: 3000,
        },
    )
    .with_idempotency_key(format!("quickstart-{run}-order-3"));
    let outcome = checker
        .process(&event, |_| charge(&event.payload, &flaky))
        .await;
    println!("order 3: {}", describe(&outcome));

    // 3. Two copies of one event at the same moment, on two tasks.
    println!("\n-- two concurrent copies of order 4 --");
    let event = Arc::new(
        EventEnvelope::new(
            "order.placed",
            OrderPlaced {
                order_id: 4,
                amount_cents: 4000,
            },
        )
        .with_idempotency_key(format!("quickstart-{run}-order-4")),
    );
    let flaky = Arc::new(flaky);
    let copies: Vec<_> = (0..2)
        .map(|copy| {
            let (checker, event, flaky) = (checker.clone(), Arc::clone(&event), Arc::clone(&flaky));
            tokio::spawn(async move {
                let outcome = checker
                    .process(&event, |_| charge(&event.payload, &flaky))
                    .await;
                format!("copy {copy}: {}", describe(&outcome))
            })
        })
        .collect();
    for copy in copies {
        println!("{}", copy.await?);
    }

    let stats = checker.stats();
    println!(
        "\nstats: executed={} replayed={} in_progress={} failed={} store_errors={}",
        stats.executed, stats.replayed, stats.in_progress, stats.failed, stats.store_errors
    );
    Ok(())
}

/// A short per-run id from the clock (no extra dependency for the example).
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos % 0xffff_ffff)
}

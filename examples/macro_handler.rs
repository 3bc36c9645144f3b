//! `#[idempotent]` on event handlers: a free function using the default
//! checker, and a method using its service's checker with a custom key.
//!
//! Run with: `cargo run --example macro_handler`
//!
//! No server needed: with `REDIS_URL` unset it uses the in-process
//! `MemoryStore`; with `REDIS_URL=redis://127.0.0.1:6379` it uses Redis.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyError, MemoryStore, RedisStore, current_lease,
    idempotent,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FieldCreated {
    tenant_id: String,
    field_id: u64,
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FieldReceipt {
    field_id: u64,
    search_document: String,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("the search index refused the document")]
    IndexRefused,
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

static INDEXED: AtomicU32 = AtomicU32::new(0);

/// Indexes a new field. Runs at most once per event; a redelivery gets the
/// first receipt back. Uses the process-wide default checker.
#[idempotent(ttl = "24h")]
async fn handle_field_created(
    envelope: EventEnvelope<FieldCreated>,
) -> Result<FieldReceipt, AppError> {
    if envelope.payload.name.is_empty() {
        return Err(AppError::IndexRefused);
    }
    INDEXED.fetch_add(1, Ordering::SeqCst);
    // The fencing token of this attempt, for guarding downstream writes.
    let token: String = current_lease()
        .map(|lease| lease.token().chars().take(8).collect())
        .unwrap_or_default();
    Ok(FieldReceipt {
        field_id: envelope.payload.field_id,
        search_document: format!("doc-{}-{token}", envelope.payload.field_id),
    })
}

struct Notifier {
    checker: IdempotencyChecker,
    sent: AtomicU32,
}

impl Notifier {
    /// One notification per tenant and field, whatever the event id: the key
    /// is built from the payload.
    #[idempotent(
        checker = self.checker,
        key = format!("notify:{}:{}", envelope.payload.tenant_id, envelope.payload.field_id),
        lease = "30s",
        on_in_progress = "wait",
    )]
    async fn notify(&self, envelope: EventEnvelope<FieldCreated>) -> Result<u32, AppError> {
        Ok(self.sent.fetch_add(1, Ordering::SeqCst) + 1)
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
    let checker = match std::env::var("REDIS_URL") {
        Ok(url) => IdempotencyChecker::new(RedisStore::connect(&url).await?),
        Err(_) => IdempotencyChecker::new(MemoryStore::new()),
    };
    idempotency::set_default_checker(checker.clone()).map_err(|_| "installed twice")?;

    let field = FieldCreated {
        tenant_id: "acme".into(),
        field_id: 17,
        name: "north-40".into(),
    };
    let event = EventEnvelope::new("field.created", field.clone());

    // The broker delivers the event three times.
    for delivery in 1..=3 {
        let receipt = handle_field_created(event.clone()).await?;
        println!("delivery {delivery}: {receipt:?}");
    }
    println!("indexed {} time(s)", INDEXED.load(Ordering::SeqCst));

    // A bad event fails, and is retried on every delivery (nothing is cached).
    let bad = EventEnvelope::new(
        "field.created",
        FieldCreated {
            name: String::new(),
            ..field.clone()
        },
    );
    for delivery in 1..=2 {
        let outcome = handle_field_created(bad.clone()).await;
        println!(
            "bad event, delivery {delivery}: {:?}",
            outcome.map_err(|e| e.to_string())
        );
    }

    // Two different events about the same field: one notification.
    let notifier = Notifier {
        checker,
        sent: AtomicU32::new(0),
    };
    let first = notifier
        .notify(EventEnvelope::new("field.created", field.clone()))
        .await?;
    let second = notifier
        .notify(EventEnvelope::new("field.renamed", field))
        .await?;
    println!("notifications: first call -> #{first}, second call -> #{second} (replayed)");
    Ok(())
}

//! `idempotency`: inspect and repair the records of a store.
//!
//! ```text
//! idempotency get KEY              the record of KEY as JSON (exit 1 if absent)
//! idempotency delete KEY           forget KEY: its next delivery runs again
//! idempotency stuck                PROCESSING records whose lease ran out
//! idempotency stats                records by status, and their memory
//! idempotency clear --prefix P --yes   delete every key under P
//! ```
//!
//! It runs on any store's [`StoreAdmin`] side; the store is chosen by the
//! URL's scheme. Today that is Redis (`redis://`, `rediss://`,
//! `redis+cluster://`, `redis+sentinel://`), from `REDIS_URL` (or
//! `--redis-url`), default `redis://127.0.0.1:6379`.
//! `--prefix` and `--hash-keys` must match the application's configuration
//! for `get` and `delete` to find its keys. Install with
//! `cargo install idempotency --features cli`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;

use idempotency::{
    IdempotencyChecker, IdempotencyConfig, IdempotencyError, RedisStore, StoreAdmin,
};

/// Inspect and repair idempotency records in Redis.
#[derive(Debug, Parser)]
#[command(name = "idempotency", version)]
struct Cli {
    /// The Redis URL, credentials included (`redis://user:password@host:port/db`).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The key prefix of the records.
    #[arg(long, global = true, default_value = "idempotency:events:")]
    prefix: String,
    /// The application stores SHA-256 digests of its keys (`hash_keys`).
    #[arg(long, global = true)]
    hash_keys: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the record of KEY as JSON, with the milliseconds it has left.
    Get {
        /// The raw idempotency key (the prefix is added).
        key: String,
    },
    /// Delete the record of KEY, so that its next delivery runs again.
    Delete {
        /// The raw idempotency key (the prefix is added).
        key: String,
    },
    /// List PROCESSING records whose lease has run out (dead attempts).
    Stuck,
    /// Count the records under the prefix by status, with their memory.
    Stats,
    /// Delete every key under --prefix (SCAN + UNLINK, a page at a time).
    Clear {
        /// Confirm the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, IdempotencyError> {
    if let Command::Clear { yes: false } = cli.command {
        eprintln!(
            "refusing to delete every key under `{}` without --yes",
            cli.prefix
        );
        return Ok(ExitCode::from(2));
    }
    let store = open(&cli.redis_url).await?;
    let config = IdempotencyConfig::builder()
        .key_prefix(cli.prefix.as_str())
        .hash_keys(cli.hash_keys)
        .build()?;
    let checker = IdempotencyChecker::from_shared(store.clone(), config);
    match cli.command {
        Command::Get { key } => {
            let Some(record) = checker.get_record(&key).await? else {
                eprintln!("no record for `{}`", checker.storage_key(&key)?);
                return Ok(ExitCode::from(1));
            };
            let expires_in_ms = record
                .expires_at
                .map(|at| (at - chrono::Utc::now()).num_milliseconds().max(0));
            let out = serde_json::json!({
                "key": checker.storage_key(&key)?,
                "record": record,
                "expires_in_ms": expires_in_ms,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Delete { key } => {
            let storage = checker.storage_key(&key)?;
            if checker.delete_record(&key).await? {
                println!("deleted {storage}");
            } else {
                eprintln!("no record for `{storage}`");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Stuck => {
            let stuck = store.stuck(&cli.prefix).await?;
            let now = chrono::Utc::now();
            for (key, record) in &stuck {
                let ago = record
                    .lease_expires_at
                    .map_or(0, |at| (now - at).num_seconds().max(0));
                println!(
                    "{key}\tattempts={}\tlease_expired={ago}s_ago\tevent_type={}",
                    record.attempts,
                    record.event_type.as_deref().unwrap_or("-"),
                );
            }
            eprintln!("{} stuck record(s) under `{}`", stuck.len(), cli.prefix);
        }
        Command::Stats => {
            let summary = store.summary(&cli.prefix).await?;
            let total = summary.total();
            println!("prefix      {}", cli.prefix);
            println!("records     {total}");
            println!("processing  {}", summary.processing);
            println!("stuck       {}", summary.stuck);
            println!("completed   {}", summary.completed);
            println!("failed      {}", summary.failed);
            println!("corrupt     {}", summary.corrupt);
            if let Some(memory) = summary.memory_bytes {
                println!("memory      {memory} bytes");
                if let Some(per_record) = memory.checked_div(total) {
                    println!("per record  {per_record} bytes");
                }
            }
        }
        Command::Clear { .. } => {
            let deleted = store.clear_prefix(&cli.prefix).await?;
            println!("deleted {deleted} key(s) under `{}`", cli.prefix);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store behind `url`, chosen by its scheme.
async fn open(url: &str) -> Result<Arc<dyn StoreAdmin>, IdempotencyError> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis+sentinel"
        | "rediss+sentinel" => Ok(Arc::new(RedisStore::connect(url).await?)),
        _ => Err(IdempotencyError::Config {
            option: "url",
            reason: format!(
                "no store for the scheme of `{url}`: expected redis://, rediss://, \
                 redis+cluster:// or redis+sentinel://"
            ),
        }),
    }
}

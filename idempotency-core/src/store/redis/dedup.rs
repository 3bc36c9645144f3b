//! Seen-set marks for [`Deduplicator`](crate::Deduplicator): pipelined
//! `SET key doc NX PX ttl` and `EXISTS`, one round trip per call.
//!
//! A mark is an ordinary `COMPLETED` record with a null result (see
//! [`IdempotencyRecord`]), so the checker and the admin CLI read it as one.
//! It also carries, in `lease_token`, a random token of the call that wrote
//! it: a `COMPLETED` record is never written to again, so the token fences
//! nothing; it only lets a retried call (after a timeout whose first try
//! landed) recognise its own marks and still answer "new" for them, where a
//! plain `SET NX` retry would answer "seen" and the event would be dropped.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use redis::{Pipeline, RedisResult, Value};

use super::RedisStore;
use super::conn::Conn;
use super::retry::unexpected;
use super::scripts::REMARK;
use super::wire::millis;
use crate::error::Result;
use crate::record::IdempotencyRecord;

/// The document of this call's marks.
fn mark_doc() -> Result<String> {
    let record = IdempotencyRecord {
        lease_token: Some(uuid::Uuid::new_v4().simple().to_string()),
        ..IdempotencyRecord::completed(serde_json::Value::Null, 1, None, Utc::now())
    };
    Ok(serde_json::to_string(&record)?)
}

/// Sends `pipe` (one single-key command per key) in one round trip; the
/// replies come back in the order of the commands. On a cluster, whose
/// pipelines may not cross hash slots, the commands go out concurrently on
/// the multiplexed connections instead, each to its slot's master: still
/// about one round trip.
async fn send(conn: Conn, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
    match conn {
        Conn::Cluster(cluster) => {
            let calls = pipe.cmd_iter().map(|cmd| {
                let mut cluster = cluster.clone();
                async move { cmd.query_async::<Value>(&mut cluster).await }
            });
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .collect()
        }
        mut node => pipe.query_async(&mut node).await,
    }
}

/// Marks each of `keys` (distinct) with `doc`: `SET NX PX` on a first try,
/// the `REMARK` script on a retry; the replies come back in the order of
/// `keys`.
async fn send_marks(
    conn: Conn,
    keys: &[&str],
    doc: &str,
    ttl_ms: u64,
    retried: bool,
) -> RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    for &key in keys {
        if retried {
            pipe.cmd("EVAL")
                .arg(REMARK)
                .arg(1)
                .arg(key)
                .arg(doc)
                .arg(ttl_ms);
        } else {
            pipe.cmd("SET")
                .arg(key)
                .arg(doc)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms);
        }
    }
    send(conn, &pipe).await
}

/// `EXISTS key` for each of `keys`, answers in order.
async fn send_exists(conn: Conn, keys: &[&str]) -> RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    for &key in keys {
        pipe.cmd("EXISTS").arg(key);
    }
    send(conn, &pipe).await
}

/// One answer per key, or an error when the server answered otherwise.
fn answers(keys: &[&str], replies: Vec<Value>) -> Result<Vec<bool>> {
    if replies.len() != keys.len() {
        return Err(unexpected(format!(
            "{} replies to a pipeline of {} commands",
            replies.len(),
            keys.len()
        )));
    }
    replies
        .into_iter()
        .map(|reply| match reply {
            Value::Okay | Value::Int(1) => Ok(true),
            Value::SimpleString(s) if s == "OK" => Ok(true),
            Value::Nil | Value::Int(0) => Ok(false),
            other => Err(unexpected(format!("unexpected reply {other:?}"))),
        })
        .collect()
}

impl RedisStore {
    /// [`IdempotencyStore::mark`](crate::IdempotencyStore::mark).
    ///
    /// A key repeated within `keys` is sent once, and its later occurrences
    /// answer `false`: on a retry every copy would otherwise find this
    /// call's own mark and answer `true`.
    pub(super) async fn mark_keys(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        let mut seen = HashSet::with_capacity(keys.len());
        let firsts: Vec<bool> = keys.iter().map(|&key| seen.insert(key)).collect();
        let unique: Vec<&str> = keys
            .iter()
            .zip(&firsts)
            .filter_map(|(&key, &first)| first.then_some(key))
            .collect();
        if unique.is_empty() {
            return Ok(Vec::new());
        }
        let doc = mark_doc()?;
        let (unique, doc, ttl_ms) = (unique.as_slice(), doc.as_str(), millis(ttl));
        let replies = self
            .run("", |conn, retried| async move {
                send_marks(conn, unique, doc, ttl_ms, retried).await
            })
            .await?;
        let mut answers = answers(unique, replies)?.into_iter();
        Ok(firsts
            .into_iter()
            .map(|first| first && answers.next().unwrap_or(false))
            .collect())
    }

    /// [`IdempotencyStore::contains`](crate::IdempotencyStore::contains).
    pub(super) async fn contains_keys(&self, keys: &[&str]) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let replies = self
            .run("", |conn, _| async move { send_exists(conn, keys).await })
            .await?;
        answers(keys, replies)
    }
}

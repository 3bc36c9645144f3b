//! Running an operation: bounded retries on transient errors within the
//! operation timeout, and what each server error means to the caller
//! (an outage, a refusal, a corrupt value, a protocol surprise).

use std::time::Duration;

use redis::RedisError;

use super::conn::Conn;
use super::scripts::ACL_PROBE;
use super::{RedisStore, STORE};
use crate::error::{IdempotencyError, Result, StoreRefusal};

/// The server's error code, for a pipeline too (whose `code()` is `None`
/// for codes redis-rs does not know, such as `OOM`). Error paths only.
pub(super) fn error_code(e: &RedisError) -> Option<String> {
    if let Some(code) = e.code() {
        return Some(code.to_owned());
    }
    let errors = e.clone().into_server_errors()?;
    errors.first().map(|(_, error)| error.code().to_owned())
}

/// `NOPERM` from a command, or its form inside a script (`ERR The user
/// executing the script can't run this command ...`).
pub(super) fn permission_denied(e: &RedisError) -> bool {
    error_code(e).as_deref() == Some("NOPERM")
        || e.detail()
            .is_some_and(|d| d.starts_with("The user executing the script can't"))
}

pub(super) fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// Worth another try: the connection broke or timed out, or the server (a
/// cluster or Sentinel setup in the middle of a failover) asks to retry.
pub(super) fn transient(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("READONLY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "LOADING")
        )
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::MasterNameNotFoundBySentinel
        )
}

pub(super) fn unavailable(e: impl Into<crate::error::BoxError>) -> IdempotencyError {
    IdempotencyError::store_unavailable(STORE, e)
}

/// Redis answered with a reply of a shape the store does not expect.
pub(super) fn unexpected(e: impl Into<crate::error::BoxError>) -> IdempotencyError {
    IdempotencyError::protocol(STORE, e)
}

impl RedisStore {
    /// Runs `op` with bounded retries on transient errors, all within the
    /// operation timeout.
    ///
    /// `op` gets a connection and whether this is a retry (an earlier try may
    /// have been applied). The first try is bounded by the connection's own
    /// response timeout (on a cluster, with redis-rs's own redirects), so it
    /// arms no timer of its own: the operation's deadline (`op_timeout` from
    /// the start) is armed only when a try fails.
    pub(super) async fn run<T, F, Fut>(&self, key: &str, op: F) -> Result<T>
    where
        F: Fn(Conn, bool) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = tokio::time::Instant::now();
        match op(self.conns.get(), false).await {
            Ok(v) => Ok(v),
            // The error path, boxed: the first try's future stays small.
            Err(e) => Box::pin(tokio::time::timeout_at(
                started + self.op_timeout,
                self.after_error(key, &op, e),
            ))
            .await
            .map_err(unavailable)?,
        }
    }

    /// What follows a failed try of `op`: the error's meaning, and the
    /// retries a transient error allows.
    async fn after_error<T, F, Fut>(&self, key: &str, op: &F, first: RedisError) -> Result<T>
    where
        F: Fn(Conn, bool) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut tries = 0;
        let mut failed = first;
        loop {
            match failed {
                e if transient(&e) && tries < self.max_retries => {
                    tries += 1;
                    let base = 25u64 << tries.min(6);
                    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % base;
                    tracing::debug!(error = %e, tries, "retrying a Redis operation");
                    drop(e);
                    self.conns.recover().await;
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
                // WRONGTYPE: something that is not a record lives at the key.
                e if e.code() == Some("WRONGTYPE") => {
                    return Err(IdempotencyError::corrupt(key, e));
                }
                // Redis answered, and refused: no outage.
                e if error_code(&e).as_deref() == Some("OOM") => {
                    return Err(IdempotencyError::store_refused(
                        STORE,
                        StoreRefusal::OutOfMemory,
                        e,
                    ));
                }
                e if permission_denied(&e) => {
                    return Err(Box::pin(self.permission_error(key, e)).await);
                }
                e => return Err(unavailable(e)),
            }
            match op(self.conns.get(), true).await {
                Ok(v) => return Ok(v),
                Err(e) => failed = e,
            }
        }
    }

    /// The script commands the connection's user may not run on `key`.
    async fn missing_permissions(&self, key: &str) -> Vec<String> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACL_PROBE).arg(1).arg(key);
        let mut conn = self.conns.get();
        let probe = cmd.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.op_timeout, probe).await {
            Ok(Ok(missing)) => missing,
            _ => Vec::new(),
        }
    }

    /// A `PermissionDenied` refusal for `e` on `key`. Redis names the
    /// command a user may not run, except inside a script: then the store
    /// asks which of the scripts' commands are missing.
    async fn permission_error(&self, key: &str, e: RedisError) -> IdempotencyError {
        let in_script = error_code(&e).as_deref() != Some("NOPERM");
        let missing = if in_script && !key.is_empty() {
            self.missing_permissions(key).await
        } else {
            Vec::new()
        };
        let named = if missing.is_empty() {
            String::new()
        } else {
            format!("the Redis user may not run {}: ", missing.join(" "))
        };
        IdempotencyError::store_refused(
            STORE,
            StoreRefusal::PermissionDenied,
            format!("{named}{e}; the store needs `{}`", Self::ACL_COMMANDS),
        )
    }
}

//! The Lua scripts (in `lua/`) and how they are sent: `EVALSHA`, loading the
//! script when the server does not have it.
//!
//! Each script is its own text concatenated at compile time with the
//! prelude (`lua/prelude.lua`): the store's clock and the record loader,
//! which refuses exactly what the reader (serde's
//! [`IdempotencyRecord`](crate::IdempotencyRecord)) refuses.

use redis::{Script, Value};

use super::RedisStore;
use super::conn::Conn;
use crate::error::Result;

/// Claims a key: every case, decided atomically.
const CLAIM: &str = concat!(
    include_str!("lua/prelude.lua"),
    include_str!("lua/claim.lua")
);

/// Extends a held lease.
const RENEW: &str = concat!(
    include_str!("lua/prelude.lua"),
    include_str!("lua/renew.lua")
);

/// Fails a held lease, or completes one the compare-and-set could not.
const FINISH: &str = concat!(
    include_str!("lua/prelude.lua"),
    include_str!("lua/finish.lua")
);

/// `SET ... IFEQ` for servers without it: completes a lease whose claim is
/// untouched, decoding nothing.
const COMPLETE_IF_EQUAL: &str = include_str!("lua/complete_if_equal.lua");

/// Reads a record, its expiry and the store's clock.
pub(super) const READ: &str = concat!(
    include_str!("lua/prelude.lua"),
    include_str!("lua/read.lua")
);

/// Which of the scripts' commands the connection's user may not run.
pub(super) const ACL_PROBE: &str = include_str!("lua/acl_probe.lua");

/// The retried form of a seen-set mark.
pub(super) const REMARK: &str = include_str!("lua/remark.lua");

/// The record scripts, with their digests computed once.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) renew: Script,
    pub(super) finish: Script,
    pub(super) complete_if_equal: Script,
    pub(super) read: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            finish: Script::new(FINISH),
            complete_if_equal: Script::new(COMPLETE_IF_EQUAL),
            read: Script::new(READ),
        }
    }
}

/// `EVALSHA <script> 1 <key>`, for the caller to add the script's arguments,
/// `args_len` bytes of them at most (so the command is never copied to
/// grow): built directly, since `ScriptInvocation` copies every argument
/// twice.
pub(super) fn evalsha(script: &Script, key: &str, args_len: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(10, 64 + key.len() + args_len);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(1).arg(key);
    cmd
}

/// Runs an [`evalsha`] command; when the server does not have the script
/// (a restart or a `SCRIPT FLUSH`), loads it and sends the command once more.
pub(super) async fn eval<T: redis::FromRedisValue>(
    conn: &mut Conn,
    script: &Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    match conn.query(cmd).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            conn.query(cmd).await
        }
        result => result,
    }
}

impl RedisStore {
    /// Runs the [`evalsha`] command `cmd` of `script` on `key`, with the
    /// store's retries (see [`eval`]).
    pub(super) async fn script(
        &self,
        key: &str,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> Result<Value> {
        self.run(key, |mut conn, _| async move {
            eval(&mut conn, script, cmd).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::record::IdempotencyRecord;

    const PRELUDE: &str = include_str!("lua/prelude.lua");

    /// The scripts' range for timestamps is the reader's: chrono's, in
    /// milliseconds, exactly.
    #[test]
    fn the_scripts_accept_the_timestamps_the_reader_accepts() {
        let (min, max) = (
            chrono::DateTime::<chrono::Utc>::MIN_UTC.timestamp_millis(),
            chrono::DateTime::<chrono::Utc>::MAX_UTC.timestamp_millis(),
        );
        assert!(PRELUDE.contains(&format!("int_in(v, {min}, {max})")));
        let read = |ms: i64| {
            serde_json::from_str::<IdempotencyRecord>(&format!(
                r#"{{"status":"FAILED","first_seen_at":{ms}}}"#
            ))
        };
        assert!(read(min).is_ok() && read(max).is_ok());
        assert!(read(min - 1).is_err() && read(max + 1).is_err());
    }
}

//! The record store: [`IdempotencyStore`] for [`RedisStore`].
//!
//! A claim is first one plain `SET key doc NX PX .. GET`; the claim script
//! decides every other case. A completion takes `SET ... IFEQ` where the
//! server has it (see the `ifeq` module), else the finish script.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::ifeq::{self, IfeqReply};
use super::retry::unexpected;
use super::scripts::{eval, evalsha};
use super::wire::{
    Reply, fast_claim, lease_end, members, millis, ms_to_time, now_ms, read_completed, text,
};
use super::{RedisStore, STORE};
use crate::error::{IdempotencyError, Result, StoreRefusal};
use crate::record::{
    ClaimDecision, ClaimOutcome, IdempotencyRecord, Lease, RecordStatus, decide_claim,
};
use crate::store::{ClaimRequest, IdempotencyStore, ResultJson};

#[async_trait]
impl IdempotencyStore for RedisStore {
    fn name(&self) -> &'static str {
        STORE
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        // The common cases in one plain command: `SET NX GET` writes the
        // claim when the key is absent, and otherwise returns the record
        // untouched. A COMPLETED record (a duplicate) or our own claim (a
        // retried try) is answered from that reply; anything else (a live or
        // expired lease, a FAILED record, an unreadable value) goes to the
        // claim script, which decides it atomically.
        let px = millis(request.ttl).max(millis(request.lease));
        let doc = fast_claim(request, px)?;
        let mut cmd = redis::Cmd::with_capacity(7, 48 + request.key.len() + doc.len());
        cmd.arg("SET")
            .arg(request.key)
            .arg(&doc)
            .arg("NX")
            .arg("PX")
            .arg(px)
            .arg("GET");
        let sent_at = now_ms();
        let existing: Result<Option<Vec<u8>>> = self
            .run(request.key, |mut conn, _| {
                let cmd = &cmd;
                async move { conn.query(cmd).await }
            })
            .await;
        let existing = match existing {
            // A full Redis refuses every write, `SET NX GET` included; a read
            // still answers duplicates and live claims.
            Err(
                refused @ IdempotencyError::StoreRefused {
                    reason: StoreRefusal::OutOfMemory,
                    ..
                },
            ) => return Box::pin(self.claim_when_full(request, refused)).await,
            other => other?,
        };
        let lease = |attempt: u32| Lease {
            key: request.key.into(),
            token: request.token.into(),
            attempt,
            expires_at: lease_end(sent_at, request.lease),
            taken_over: false,
            version: None,
        };
        let Some(existing) = existing else {
            let fingerprint = request.fingerprint.filter(|f| !f.is_empty());
            let version = ifeq::version(fingerprint, doc.as_bytes());
            return Ok(ClaimOutcome::Acquired(lease(1).with_version(version)));
        };
        let raw = std::str::from_utf8(&existing).ok();
        // A duplicate, as every completion writes it: answered from the
        // reply. (Other COMPLETED records, a seen-set mark or one without
        // its expiry, go to the script, which reads the key's expiry.)
        if let Some(record) = raw.and_then(read_completed) {
            if let (Some(ours), Some(theirs)) = (request.fingerprint, &record.fingerprint)
                && !ours.is_empty()
                && ours != theirs
            {
                return Err(IdempotencyError::FingerprintMismatch {
                    key: request.key.to_owned(),
                });
            }
            return Ok(ClaimOutcome::Duplicate(record));
        }
        // A retried claim whose first try was applied: our own claim.
        if let Some(raw) = raw
            && let Ok(record) = serde_json::from_str::<IdempotencyRecord>(raw)
            && record.status == RecordStatus::Processing
            && record.lease_token.as_deref() == Some(request.token)
        {
            let version = ifeq::version(record.fingerprint.as_deref(), raw.as_bytes());
            return Ok(ClaimOutcome::Acquired(
                lease(record.attempts).with_version(version),
            ));
        }
        // Boxed, as every rare path here: the common claim's future stays
        // small (it is boxed and moved on every call).
        Box::pin(self.claim_script(request)).await
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let mut cmd = evalsha(&self.scripts.renew, &lease.key, 64 + lease.token().len());
        cmd.arg(lease.token()).arg(millis(lease_duration));
        let value = self.script(&lease.key, &self.scripts.renew, &cmd).await?;
        let reply = Reply::parse(&lease.key, value)?;
        match reply.tag.as_str() {
            "ok" => {
                let expires_at = ms_to_time(reply.int(0)?);
                // The renewed document, which the next completion compares
                // against; the fingerprint is the claim's (or, for a lease
                // without a version, the document's own).
                let version = match reply.rest.into_iter().nth(1) {
                    Some(doc) => {
                        let doc = text(&lease.key, doc)?;
                        match ifeq::held(lease) {
                            Some(held) => Some(ifeq::version(held.fingerprint, doc.as_bytes())),
                            None => serde_json::from_str::<ifeq::FingerprintOnly>(&doc)
                                .ok()
                                .map(|p| ifeq::version(p.fingerprint.as_deref(), doc.as_bytes())),
                        }
                    }
                    None => None,
                };
                Ok(Lease {
                    expires_at,
                    version,
                    ..lease.clone()
                })
            }
            _ => Err(IdempotencyError::LeaseLost {
                key: lease.key().to_owned(),
            }),
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&ResultJson<'_>>,
        ttl: Duration,
    ) -> Result<()> {
        // An empty payload completes the record without a `result` field.
        let result = result.map_or("", ResultJson::get);
        // One clock for `completed_at` on every path: this host's (`SET ...
        // IFEQ` cannot read the store's).
        let completed_at = now_ms();
        let mut retried = false;
        if let Some(held) = ifeq::held(lease) {
            match self
                .complete_if_equal(lease, &held, completed_at, ttl, result)
                .await?
            {
                IfeqReply::Applied => return Ok(()),
                // Not our document (any more): the finish script decides,
                // told whether an earlier try may have been applied.
                IfeqReply::Mismatch { retried: r } => retried = r,
            }
        }
        Box::pin(self.finish(lease, ttl, Some(completed_at), result, retried)).await
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        self.finish(lease, ttl, None, error, false).await
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let cmd = evalsha(&self.scripts.read, key, 0);
        let value = self.script(key, &self.scripts.read, &cmd).await?;
        let reply = Reply::parse(key, value)?;
        match reply.tag.as_str() {
            "found" => reply.record(key).map(Some),
            _ => Ok(None),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let removed: i64 = self
            .run(key, |mut conn, _| async move {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                conn.query(&cmd).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// Reads `INFO memory` from the node (every master of a cluster): an
    /// error when Redis does not answer, and when a node's
    /// `maxmemory-policy` may evict records (logged at `ERROR`; only logged
    /// with [`allow_eviction`](super::RedisStoreBuilder::allow_eviction) on).
    async fn health(&self) -> Result<()> {
        self.check_eviction("health").await
    }
}

#[async_trait]
impl crate::store::SeenSet for RedisStore {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        self.mark_keys(keys, ttl).await
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        self.contains_keys(keys).await
    }
}

#[async_trait]
impl crate::store::StoreAdmin for RedisStore {
    async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>> {
        self.stuck_records(prefix).await
    }

    async fn summary(&self, prefix: &str) -> Result<crate::store::StoreSummary> {
        self.summarize(prefix).await
    }

    async fn clear_prefix(&self, prefix: &str) -> Result<u64> {
        crate::store::check_clear_prefix(prefix)?;
        self.unlink_prefix(prefix).await
    }
}

impl RedisStore {
    /// A claim on a Redis too full to write: the read script decides what
    /// a read can answer (a duplicate, a live claim, our own claim, a
    /// fingerprint mismatch); a claim that would have to write is
    /// `refused`.
    async fn claim_when_full(
        &self,
        request: &ClaimRequest<'_>,
        refused: IdempotencyError,
    ) -> Result<ClaimOutcome> {
        let cmd = evalsha(&self.scripts.read, request.key, 0);
        let value = self.script(request.key, &self.scripts.read, &cmd).await?;
        let reply = Reply::parse(request.key, value)?;
        if reply.tag != "found" {
            return Err(refused);
        }
        let now = ms_to_time(reply.int(2)?);
        let record = reply.record(request.key)?;
        let fingerprint = request.fingerprint.filter(|f| !f.is_empty());
        match decide_claim(Some(record.view()), fingerprint, request.token, now) {
            ClaimDecision::Duplicate => Ok(ClaimOutcome::Duplicate(record)),
            ClaimDecision::InProgress => Ok(ClaimOutcome::InProgress(record)),
            ClaimDecision::AlreadyHeld => Ok(ClaimOutcome::Acquired(Lease {
                key: request.key.into(),
                token: request.token.into(),
                attempt: record.attempts,
                expires_at: record.lease_expires_at.unwrap_or(now),
                taken_over: false,
                version: None,
            })),
            ClaimDecision::FingerprintMismatch => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            ClaimDecision::Acquire { .. } => Err(refused),
        }
    }

    /// The claim script: every case, decided atomically in Redis.
    async fn claim_script(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        let members = members(request)?;
        let fingerprint = request.fingerprint.unwrap_or("");
        let args_len = 64 + request.token.len() + fingerprint.len() + members.len();
        let mut cmd = evalsha(&self.scripts.claim, request.key, args_len);
        cmd.arg(request.token)
            .arg(millis(request.lease))
            .arg(millis(request.ttl))
            .arg(fingerprint)
            .arg(members);
        let value = self.script(request.key, &self.scripts.claim, &cmd).await?;
        let reply = Reply::parse(request.key, value)?;
        match reply.tag.as_str() {
            "acquired" => {
                let mut lease = Lease {
                    key: request.key.into(),
                    token: request.token.into(),
                    attempt: u32::try_from(reply.int(0)?).unwrap_or(u32::MAX),
                    expires_at: ms_to_time(reply.int(1)?),
                    taken_over: reply.int(2)? == 1,
                    version: None,
                };
                if let Some(doc) = reply.rest.into_iter().nth(3) {
                    let doc = text(request.key, doc)?;
                    if let Ok(parsed) = serde_json::from_str::<ifeq::FingerprintOnly>(&doc) {
                        lease.version =
                            Some(ifeq::version(parsed.fingerprint.as_deref(), doc.as_bytes()));
                    }
                }
                Ok(ClaimOutcome::Acquired(lease))
            }
            "duplicate" => {
                let record = reply.record(request.key)?;
                if record.status != RecordStatus::Completed {
                    return Err(IdempotencyError::corrupt(
                        request.key,
                        "answered as a duplicate, but the record is not COMPLETED",
                    ));
                }
                Ok(ClaimOutcome::Duplicate(record))
            }
            "in_progress" => Ok(ClaimOutcome::InProgress(reply.record(request.key)?)),
            "mismatch" => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            other => Err(unexpected(format!("unexpected claim reply `{other}`"))),
        }
    }

    /// The finish script: COMPLETED at `completed_at` (ms since the epoch)
    /// when it is given, else FAILED; `retried_before`: an earlier try of
    /// this call (a compare-and-set) may have been applied.
    async fn finish(
        &self,
        lease: &Lease,
        ttl: Duration,
        completed_at: Option<i64>,
        payload: &str,
        retried_before: bool,
    ) -> Result<()> {
        let status = if completed_at.is_some() {
            "COMPLETED"
        } else {
            "FAILED"
        };
        let value: Value = self
            .run(&lease.key, |mut conn, retried| {
                let args_len = 64 + lease.token().len() + payload.len();
                let mut cmd = evalsha(&self.scripts.finish, &lease.key, args_len);
                cmd.arg(lease.token())
                    .arg(millis(ttl))
                    .arg(status)
                    .arg(payload)
                    .arg(if retried || retried_before { "1" } else { "" });
                if let Some(at) = completed_at {
                    cmd.arg(at);
                }
                async move { eval(&mut conn, &self.scripts.finish, &cmd).await }
            })
            .await?;
        // `OK` (a status reply), or `{'lost'}` or `{'corrupt', reason}`.
        if value == Value::Okay {
            return Ok(());
        }
        Reply::parse(&lease.key, value)?;
        Err(IdempotencyError::LeaseLost {
            key: lease.key().to_owned(),
        })
    }
}

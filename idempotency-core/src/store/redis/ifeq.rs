//! The compare-and-set completion: the COMPLETED document replaces the
//! stored one only when the key still holds, byte for byte, the document
//! this lease last wrote. Where the server has `SET ... IFEQ` (Valkey 8.1
//! and later, Redis 8.4 and later) it is one plain
//! `SET key <COMPLETED doc> IFEQ <held doc> PX ttl`; elsewhere (Redis 7, older
//! Valkey) it is the same comparison in a four-line script
//! (`lua/complete_if_equal.lua`) that decodes nothing.
//!
//! So the store remembers, per held lease, the exact document it (or its last
//! renewal) wrote: the claim the client's `SET NX` wrote, the document the
//! claim script returns, or the one the renew script returns. A completion
//! whose comparison fails (a retried try whose first one was applied, a
//! document another script rewrote, a lost lease) falls back to the finish
//! script, which decides it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Value;

use super::RedisStore;
use super::scripts::{eval, evalsha};
use super::wire::{millis, push_json_str};
use crate::error::Result;
use crate::record::Lease;

// Whether the server has `SET ... IFEQ`: 0 (the default) is not known yet,
// decided by the first completion that tries it.
/// It has: completions take the `IFEQ` path.
const YES: u8 = 1;
/// It has not (Redis 7, Valkey before 8.1): completions compare in a script.
const NO: u8 = 2;

/// How many held documents the store remembers at most. Entries leave when
/// their lease is completed or failed; those of abandoned leases leave once
/// their lease has run out and the map is full. A lease whose document is not
/// remembered completes through the finish script: slower, as correct.
const MAX_HELD: usize = 100_000;

/// What the store knows about a held lease's document.
#[derive(Debug, Clone)]
pub(super) struct HeldDoc {
    /// The exact bytes stored at the key (the `IFEQ` comparand).
    pub(super) doc: String,
    /// The record's fingerprint, which the COMPLETED document keeps.
    pub(super) fingerprint: Option<String>,
    /// The record's attempt count, which the COMPLETED document keeps.
    pub(super) attempts: u32,
    /// When the lease runs out (after which an entry may be dropped).
    pub(super) expires_at: DateTime<Utc>,
}

/// The server's `IFEQ` capability and the held documents; shared by clones.
#[derive(Debug, Default)]
pub(super) struct Ifeq {
    support: AtomicU8,
    /// By storage key: the holding lease's token and its document. One lease
    /// per key at a time: a later claim of the key replaces the entry.
    held: Mutex<HashMap<String, (String, HeldDoc)>>,
    /// Until when (ms since the epoch) the map stays full without another
    /// scan: a full map of live leases is pruned at most once a second, not
    /// on every claim.
    full_until_ms: AtomicI64,
}

impl Ifeq {
    /// Whether the server is known to have `IFEQ`.
    pub(super) fn supported(&self) -> Option<bool> {
        match self.support.load(Ordering::Relaxed) {
            YES => Some(true),
            NO => Some(false),
            _ => None,
        }
    }

    /// Records what a probe or a completion found out.
    pub(super) fn set_supported(&self, yes: bool) {
        self.support
            .store(if yes { YES } else { NO }, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, HeldDoc)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the document now stored for the lease `(key, token)`.
    pub(super) fn remember(&self, key: &str, token: &str, held: HeldDoc) {
        let mut map = self.lock();
        if map.len() >= MAX_HELD {
            // Not remembered: this lease completes through the finish
            // script, which is slower but as correct.
            let now = Utc::now();
            if now.timestamp_millis() < self.full_until_ms.load(Ordering::Relaxed) {
                return;
            }
            map.retain(|_, (_, h)| h.expires_at > now);
            if map.len() >= MAX_HELD {
                self.full_until_ms
                    .store(now.timestamp_millis() + 1000, Ordering::Relaxed);
                return;
            }
        }
        match map.get_mut(key) {
            Some(entry) => *entry = (token.to_owned(), held),
            None => {
                map.insert(key.to_owned(), (token.to_owned(), held));
            }
        }
    }

    /// Replaces the remembered document of `(key, token)` after a renewal.
    pub(super) fn renewed(
        &self,
        key: &str,
        token: &str,
        doc: String,
        expires_at: DateTime<Utc>,
        attempts: u32,
    ) {
        let existing = self
            .lock()
            .get(key)
            .filter(|(holder, _)| holder == token)
            .map(|(_, held)| held.fingerprint.clone());
        let fingerprint = match existing {
            Some(fingerprint) => fingerprint,
            // Not remembered (claimed on a full server, or dropped): the
            // renewed document names its fingerprint.
            None => match serde_json::from_str::<FingerprintOnly>(&doc) {
                Ok(parsed) => parsed.fingerprint,
                Err(_) => return,
            },
        };
        self.remember(
            key,
            token,
            HeldDoc {
                doc,
                fingerprint,
                attempts,
                expires_at,
            },
        );
    }

    /// Takes the remembered document of `(key, token)` out of the map.
    /// Another lease's entry for the key stays.
    pub(super) fn take(&self, key: &str, token: &str) -> Option<HeldDoc> {
        let mut map = self.lock();
        if map.get(key)?.0 != token {
            return None;
        }
        map.remove(key).map(|(_, held)| held)
    }

    /// How many documents are remembered (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The one field of a stored document the completion copies and a claim
/// script's reply does not carry.
#[derive(serde::Deserialize)]
pub(super) struct FingerprintOnly {
    #[serde(default)]
    pub(super) fingerprint: Option<String>,
}

/// The COMPLETED document, byte for byte as the finish script writes it:
/// the status first (the claim script's duplicate test reads it there),
/// `attempts` only when not 1, `ttl_ms` before the result, and the result's
/// JSON text spliced in last (absent when `result` is empty).
fn completed_doc(
    completed_at_ms: i64,
    held: &HeldDoc,
    ttl_ms: u64,
    result: &str,
) -> crate::error::Result<String> {
    use std::fmt::Write as _;
    let mut doc =
        String::with_capacity(96 + held.fingerprint.as_ref().map_or(0, String::len) + result.len());
    // Writing to a String cannot fail.
    let _ = write!(
        doc,
        "{{\"status\":\"COMPLETED\",\"completed_at\":{completed_at_ms}"
    );
    if held.attempts != 1 {
        let _ = write!(doc, ",\"attempts\":{}", held.attempts);
    }
    let _ = write!(doc, ",\"ttl_ms\":{ttl_ms}");
    if let Some(fingerprint) = &held.fingerprint {
        doc.push_str(",\"fingerprint\":");
        push_json_str(&mut doc, fingerprint)?;
    }
    if !result.is_empty() {
        doc.push_str(",\"result\":");
        doc.push_str(result);
    }
    doc.push('}');
    Ok(doc)
}

/// Whether `e` is the server refusing an option it does not know (`IFEQ` on
/// Redis 7 and older Valkey): `ERR syntax error`.
pub(super) fn unknown_option(e: &redis::RedisError) -> bool {
    e.detail().is_some_and(|d| d.starts_with("syntax error"))
        || (e.code().is_none() && e.to_string().contains("syntax error"))
}

impl RedisStore {
    /// Completes `lease` with its COMPLETED document when the key still
    /// holds exactly `held`'s document: `SET key <doc> IFEQ <held> PX ttl`
    /// where the server has it, else the compare script. Both write the same
    /// bytes: `completed_at_ms` is the completing host's clock (`SET` cannot
    /// read the store's).
    pub(super) async fn complete_if_equal(
        &self,
        lease: &Lease,
        held: &HeldDoc,
        completed_at_ms: i64,
        ttl: Duration,
        result: &str,
    ) -> Result<IfeqReply> {
        let ttl_ms = millis(ttl);
        let doc = completed_doc(completed_at_ms, held, ttl_ms, result)?;
        let retried = AtomicBool::new(false);
        loop {
            let native = self.ifeq.supported() != Some(false);
            let cmd = if native {
                let mut cmd =
                    redis::Cmd::with_capacity(7, 64 + lease.key.len() + doc.len() + held.doc.len());
                cmd.arg("SET")
                    .arg(&lease.key)
                    .arg(&doc)
                    .arg("IFEQ")
                    .arg(&held.doc)
                    .arg("PX")
                    .arg(ttl_ms);
                cmd
            } else {
                let mut cmd = evalsha(&self.scripts.complete_if_equal, &lease.key);
                cmd.arg(&held.doc).arg(&doc).arg(ttl_ms);
                cmd
            };
            let applied = self
                .run(&lease.key, |mut conn, again| {
                    if again {
                        retried.store(true, Ordering::Relaxed);
                    }
                    let cmd = &cmd;
                    async move {
                        let reply = if native {
                            cmd.query_async::<Value>(&mut conn).await
                        } else {
                            eval(&mut conn, &self.scripts.complete_if_equal, cmd).await
                        };
                        match reply {
                            Ok(Value::Okay) => Ok(Some(true)),
                            Ok(_) => Ok(Some(false)),
                            Err(e) if native && unknown_option(&e) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .await?;
            let Some(applied) = applied else {
                // No `IFEQ` here (an unsupported option is never applied):
                // the same comparison, in the script.
                self.ifeq.set_supported(false);
                continue;
            };
            if native {
                self.ifeq.set_supported(true);
            }
            return Ok(if applied {
                IfeqReply::Applied
            } else {
                IfeqReply::Mismatch {
                    retried: retried.load(Ordering::Relaxed),
                }
            });
        }
    }

    /// Whether the server has `SET ... IFEQ`, by trying it on a key that
    /// does not exist (`IFEQ` never creates one). `ERR syntax error`: no;
    /// any other refusal (an ACL user's key patterns) leaves it to the
    /// first completion.
    pub(super) async fn probe_ifeq(&self) {
        let mut cmd = redis::cmd("SET");
        cmd.arg("idempotency:capability-probe")
            .arg("x")
            .arg("IFEQ")
            .arg("never stored")
            .arg("PX")
            .arg(1000);
        let mut conn = self.conns.get();
        let probe = cmd.query_async::<Value>(&mut conn);
        match tokio::time::timeout(self.op_timeout, probe).await {
            Ok(Ok(_)) => self.ifeq.set_supported(true),
            Ok(Err(e)) if unknown_option(&e) => self.ifeq.set_supported(false),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "SET IFEQ probe refused; the first completion decides");
            }
            Err(_) => tracing::debug!("SET IFEQ probe timed out; the first completion decides"),
        }
    }

    /// Whether completions take `SET ... IFEQ` (`Some(true)`), the compare
    /// script (`Some(false)`), or are not known yet (`None`: the first
    /// completion decides).
    #[doc(hidden)]
    pub fn completes_with_set_ifeq(&self) -> Option<bool> {
        self.ifeq.supported()
    }
}

/// What a compare-and-set completion found.
pub(super) enum IfeqReply {
    /// Written.
    Applied,
    /// The key does not hold the remembered document; `retried`: an earlier
    /// try of this call may have been applied.
    Mismatch { retried: bool },
}

#[cfg(test)]
mod tests {
    use super::{HeldDoc, Ifeq, completed_doc};
    use crate::record::IdempotencyRecord;

    fn held(attempts: u32, fingerprint: Option<&str>) -> HeldDoc {
        HeldDoc {
            doc: String::new(),
            fingerprint: fingerprint.map(str::to_owned),
            attempts,
            expires_at: chrono::Utc::now() + chrono::TimeDelta::seconds(60),
        }
    }

    #[test]
    fn completed_documents_have_the_finish_scripts_shape() {
        let doc =
            completed_doc(1_700_000_000_123, &held(1, None), 60_000, r#"{"a":1}"#).expect("doc");
        assert_eq!(
            doc,
            r#"{"status":"COMPLETED","completed_at":1700000000123,"ttl_ms":60000,"result":{"a":1}}"#
        );
        let doc = completed_doc(5, &held(3, Some("f\"p")), 10, "").expect("doc");
        assert_eq!(
            doc,
            r#"{"status":"COMPLETED","completed_at":5,"attempts":3,"ttl_ms":10,"fingerprint":"f\"p"}"#
        );
        let record: IdempotencyRecord = serde_json::from_str(&doc).expect("readable");
        assert_eq!(record.attempts, 3);
        assert_eq!(record.fingerprint.as_deref(), Some("f\"p"));
        assert!(record.result.is_none());
    }

    #[test]
    fn leases_are_remembered_per_key_and_token_on_every_server() {
        let ifeq = Ifeq::default();
        ifeq.remember("k1", "t", held(1, None));
        ifeq.remember("k2", "t", held(2, None));
        assert_eq!(ifeq.take("k2", "t").map(|h| h.attempts), Some(2));
        assert!(ifeq.take("k2", "t").is_none());
        // A later lease of the key replaces the entry; the earlier one
        // finds nothing and leaves it.
        ifeq.remember("k1", "t2", held(4, None));
        assert!(ifeq.take("k1", "t").is_none());
        assert_eq!(ifeq.len(), 1);
        ifeq.set_supported(false);
        assert_eq!(ifeq.take("k1", "t2").map(|h| h.attempts), Some(4));
        ifeq.remember("k3", "t", held(3, None));
        assert_eq!(ifeq.take("k3", "t").map(|h| h.attempts), Some(3));
    }
}

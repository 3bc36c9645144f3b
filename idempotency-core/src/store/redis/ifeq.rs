//! The compare-and-set completion: the COMPLETED document replaces the
//! stored one only when the key still holds, byte for byte, the document
//! this lease last wrote. Where the server has `SET ... IFEQ` (Valkey 8.1
//! and later, Redis 8.4 and later) it is one plain
//! `SET key <COMPLETED doc> IFEQ <held doc> PX ttl`; elsewhere (Redis 7, older
//! Valkey) it is the same comparison in a four-line script
//! (`lua/complete_if_equal.lua`) that decodes nothing.
//!
//! The lease carries what the comparison needs as its
//! [`version`](Lease::version): the exact document its claim (the client's
//! `SET NX`, or the claim script's reply) or its last renewal (the renew
//! script's reply) wrote, with the record's fingerprint, which the COMPLETED
//! document keeps. Nothing is kept in the store's memory. A completion
//! whose comparison fails (a retried try whose first one was applied, a
//! document another script rewrote, a lost lease, a copy of the lease taken
//! before a renewal) and a lease with no version fall back to the finish
//! script, which decides by the token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use std::time::Duration;

use redis::Value;

use super::RedisStore;
use super::scripts::{eval, evalsha};
use super::wire::{millis, push_int, push_json_str};
use crate::error::Result;
use crate::record::Lease;

// Whether the server has `SET ... IFEQ`: 0 (the default) is not known yet,
// decided by the first completion that tries it.
/// It has: completions take the `IFEQ` path.
const YES: u8 = 1;
/// It has not (Redis 7, Valkey before 8.1): completions compare in a script.
const NO: u8 = 2;

/// What a completion needs from a held lease: the exact document at the key
/// (the comparand), and what the COMPLETED document keeps of the record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held<'a> {
    /// The exact bytes stored at the key.
    pub(super) doc: &'a [u8],
    /// The record's fingerprint.
    pub(super) fingerprint: Option<&'a str>,
    /// The record's attempt count.
    pub(super) attempts: u32,
}

/// The [`version`](Lease::version) of a lease whose claim or renewal wrote
/// `doc` on a record with `fingerprint`: a flag byte (1: a fingerprint
/// follows), the fingerprint's length (4 bytes, little-endian) and bytes,
/// then the document.
pub(super) fn version(fingerprint: Option<&str>, doc: &[u8]) -> Arc<[u8]> {
    let mut header = [0u8; 5];
    let (header, fingerprint): (&[u8], &[u8]) = match fingerprint {
        Some(fingerprint) => {
            let len = u32::try_from(fingerprint.len()).unwrap_or(u32::MAX);
            header[0] = 1;
            header[1..].copy_from_slice(&len.to_le_bytes());
            (&header, fingerprint.as_bytes())
        }
        None => (&header[..1], &[]),
    };
    let parts = [header, fingerprint, doc];
    let len = parts.iter().map(|p| p.len()).sum::<usize>();
    // Copied slice by slice into one buffer, then into the `Arc` in one
    // allocation (collecting the chained bytes would copy byte by byte).
    // Claim documents fit the stack buffer.
    let mut stack = [0u8; 512];
    let mut heap = Vec::new();
    let buffer = match stack.get_mut(..len) {
        Some(buffer) => buffer,
        None => {
            heap.resize(len, 0);
            &mut heap[..]
        }
    };
    let mut at = 0;
    for part in parts {
        buffer[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Arc::from(&*buffer)
}

/// What `lease`'s version says, when it has one this store made.
pub(super) fn held(lease: &Lease) -> Option<Held<'_>> {
    let version = lease.version()?;
    let (&flag, rest) = version.split_first()?;
    let (fingerprint, doc) = match flag {
        0 => (None, rest),
        1 => {
            let (len, rest) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            if len > rest.len() {
                return None;
            }
            let (fingerprint, doc) = rest.split_at(len);
            (Some(std::str::from_utf8(fingerprint).ok()?), doc)
        }
        _ => return None,
    };
    Some(Held {
        doc,
        fingerprint,
        attempts: lease.attempt,
    })
}

/// The server's `IFEQ` capability, found out once; shared by clones.
#[derive(Debug, Default)]
pub(super) struct Ifeq {
    support: AtomicU8,
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
    held: &Held<'_>,
    ttl_ms: u64,
    result: &str,
) -> crate::error::Result<String> {
    let mut doc = String::with_capacity(96 + held.fingerprint.map_or(0, str::len) + result.len());
    doc.push_str("{\"status\":\"COMPLETED\",\"completed_at\":");
    push_int(&mut doc, completed_at_ms);
    if held.attempts != 1 {
        doc.push_str(",\"attempts\":");
        push_int(&mut doc, held.attempts);
    }
    doc.push_str(",\"ttl_ms\":");
    push_int(&mut doc, ttl_ms);
    if let Some(fingerprint) = held.fingerprint {
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
        held: &Held<'_>,
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
                    .arg(lease.key())
                    .arg(&doc)
                    .arg("IFEQ")
                    .arg(held.doc)
                    .arg("PX")
                    .arg(ttl_ms);
                cmd
            } else {
                let args_len = 32 + held.doc.len() + doc.len();
                let mut cmd = evalsha(&self.scripts.complete_if_equal, &lease.key, args_len);
                cmd.arg(held.doc).arg(&doc).arg(ttl_ms);
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
                            conn.query::<Value>(cmd).await
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
    /// The key does not hold the lease's document; `retried`: an earlier
    /// try of this call may have been applied.
    Mismatch { retried: bool },
}

#[cfg(test)]
mod tests {
    use super::{Held, completed_doc, held, version};
    use crate::record::{IdempotencyRecord, Lease};
    use crate::store::redis::wire::read_completed;

    fn held_by(attempts: u32, fingerprint: Option<&str>) -> Held<'_> {
        Held {
            doc: b"",
            fingerprint,
            attempts,
        }
    }

    #[test]
    fn completed_documents_have_the_finish_scripts_shape() {
        let doc =
            completed_doc(1_700_000_000_123, &held_by(1, None), 60_000, r#"{"a":1}"#).expect("doc");
        assert_eq!(
            doc,
            r#"{"status":"COMPLETED","completed_at":1700000000123,"ttl_ms":60000,"result":{"a":1}}"#
        );
        let doc = completed_doc(5, &held_by(3, Some("f\"p")), 10, "").expect("doc");
        assert_eq!(
            doc,
            r#"{"status":"COMPLETED","completed_at":5,"attempts":3,"ttl_ms":10,"fingerprint":"f\"p"}"#
        );
        let record: IdempotencyRecord = serde_json::from_str(&doc).expect("readable");
        assert_eq!(record.attempts, 3);
        assert_eq!(record.fingerprint.as_deref(), Some("f\"p"));
        assert!(record.result.is_none());
    }

    /// Every document the completion writes is read in one pass, as serde
    /// reads it, with its expiry `ttl_ms` after its completion; one with a
    /// fingerprint that needs escapes is left to serde.
    #[test]
    fn completed_documents_read_in_one_pass_as_serde_reads_them() {
        let results = [
            "",
            "null",
            "42",
            "-1.5e3",
            r#""receipt 42: charged \"120\" EUR }""#,
            r#"{"ttl_ms":9,"result":[1,{"a":{}}],"status":"FAILED"}"#,
            r#"[true,false,"\u00e9\n"]"#,
        ];
        for result in results {
            for (attempts, fingerprint) in [(1, None), (2, Some("9f86d081884c7d65")), (7, Some(""))]
            {
                for (completed_at_ms, ttl_ms) in [(0, 1), (1_764_000_000_123, 86_400_000)] {
                    let held = held_by(attempts, fingerprint);
                    let doc = completed_doc(completed_at_ms, &held, ttl_ms, result).expect("doc");
                    let mut by_serde: IdempotencyRecord =
                        serde_json::from_str(&doc).expect("readable");
                    by_serde.expires_at = chrono::DateTime::from_timestamp_millis(
                        completed_at_ms + i64::try_from(ttl_ms).expect("small"),
                    );
                    assert_eq!(read_completed(&doc), Some(by_serde), "{doc}");
                }
            }
        }
        let escaped = completed_doc(5, &held_by(1, Some("f\"p")), 10, "1").expect("doc");
        assert_eq!(read_completed(&escaped), None);
    }

    #[test]
    fn a_lease_carries_its_document_and_fingerprint() {
        let lease = |v: Option<std::sync::Arc<[u8]>>| {
            let lease = Lease::new("k", "t", 4, chrono::Utc::now());
            match v {
                Some(v) => lease.with_version(v),
                None => lease,
            }
        };
        let with = lease(Some(version(Some("fp"), br#"{"status":"PROCESSING"}"#)));
        let read = held(&with).expect("readable");
        assert_eq!(read.doc, br#"{"status":"PROCESSING"}"#);
        assert_eq!(read.fingerprint, Some("fp"));
        assert_eq!(read.attempts, 4);
        // Longer than the stack buffer: built on the heap, read back whole.
        let long = vec![b'x'; 700];
        let with_long = lease(Some(version(Some("fp"), &long)));
        let read = held(&with_long).expect("readable");
        assert_eq!((read.doc, read.fingerprint), (&long[..], Some("fp")));
        let without = lease(Some(version(None, b"doc")));
        let read = held(&without).expect("readable");
        assert_eq!((read.doc, read.fingerprint), (&b"doc"[..], None));
        // No version, or one this store did not make: the finish script.
        assert!(held(&lease(None)).is_none());
        assert!(held(&lease(Some(vec![7u8, 1].into()))).is_none());
        assert!(held(&lease(Some(vec![1u8, 9, 0, 0, 0, b'x'].into()))).is_none());
        assert!(held(&lease(Some(Vec::new().into()))).is_none());
    }
}

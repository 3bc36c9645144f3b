//! The wire format: script replies, the JSON documents the client writes
//! (claims, by their members), and reading records and times back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Value;

use super::retry::unexpected;
use crate::error::{IdempotencyError, Result};
use crate::record::IdempotencyRecord;
use crate::store::ClaimRequest;

/// A duration in whole milliseconds, at least 1 (`PX 0` is an error).
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Milliseconds since the epoch as a time (the epoch when out of range).
pub(super) fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// A script reply: `{tag, ...}`.
pub(super) struct Reply {
    pub(super) tag: String,
    pub(super) rest: Vec<Value>,
}

impl Reply {
    pub(super) fn parse(key: &str, value: Value) -> Result<Self> {
        let Value::Array(mut items) = value else {
            return Err(unexpected(format!("unexpected script reply {value:?}")));
        };
        if items.is_empty() {
            return Err(unexpected("empty script reply"));
        }
        let rest = items.split_off(1);
        let tag = text(key, items.remove(0))?;
        if tag == "corrupt" {
            let reason = rest.into_iter().next().map(|v| text(key, v)).transpose()?;
            return Err(IdempotencyError::corrupt(
                key,
                reason.unwrap_or_else(|| "unreadable value".to_owned()),
            ));
        }
        Ok(Self { tag, rest })
    }

    pub(super) fn int(&self, i: usize) -> Result<i64> {
        match self.rest.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(unexpected(format!("expected an integer, got {other:?}"))),
        }
    }

    /// `{tag, raw, expires_ms}`: the record with its expiry.
    pub(super) fn record(self, key: &str) -> Result<IdempotencyRecord> {
        let expires_ms = self.int(1)?;
        let raw = self.rest.into_iter().next().unwrap_or(Value::Nil);
        let mut record = parse_record(key, &text(key, raw)?)?;
        record.expires_at = (expires_ms >= 0).then(|| ms_to_time(expires_ms));
        Ok(record)
    }
}

/// Appends `value` as a JSON string. Text that needs no escaping (keys,
/// ids, tokens, hex fingerprints almost always) is copied as it is.
pub(super) fn push_json_str(out: &mut String, value: &str) -> Result<()> {
    // Without short-circuiting, so the check compiles to vector code.
    let needs_escaping = value.bytes().fold(false, |any, b| {
        any | (b == b'"') | (b == b'\\') | (b < 0x20)
    });
    if needs_escaping {
        out.push_str(&serde_json::to_string(value)?);
    } else {
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
    Ok(())
}

/// The claim's descriptive fields as JSON object members, each followed by a
/// comma; absent and empty fields are left out.
pub(super) fn members(request: &ClaimRequest<'_>) -> Result<String> {
    let mut out = String::with_capacity(
        32 + request.recorded_key.len()
            + request.event_id.map_or(0, str::len)
            + request.event_type.map_or(0, str::len),
    );
    push_members(&mut out, request)?;
    Ok(out)
}

/// Appends [`members`] to `out`.
fn push_members(out: &mut String, request: &ClaimRequest<'_>) -> Result<()> {
    for (name, value) in [
        ("idempotency_key", Some(request.recorded_key)),
        ("event_id", request.event_id),
        ("event_type", request.event_type),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            push_json_str(out, value)?;
            out.push(',');
        }
    }
    Ok(())
}

/// The claim document the fast path writes with `SET NX`: the descriptive
/// fields, attempt 1, the token, and the lease relative to the key's expiry
/// (`lease_ms` and the `claim_px` it was set with), since only a script can
/// read the store's clock. Every script settles these into `first_seen_at`
/// and `lease_expires_at` when it reads the record.
pub(super) fn fast_claim(request: &ClaimRequest<'_>, px: u64) -> Result<String> {
    let mut doc = String::with_capacity(
        160 + request.recorded_key.len()
            + request.event_id.map_or(0, str::len)
            + request.event_type.map_or(0, str::len)
            + request.fingerprint.map_or(0, str::len),
    );
    doc.push('{');
    push_members(&mut doc, request)?;
    doc.push_str("\"status\":\"PROCESSING\",\"attempts\":1,\"lease_token\":");
    push_json_str(&mut doc, request.token)?;
    doc.push_str(",\"lease_ms\":");
    push_int(&mut doc, millis(request.lease));
    doc.push_str(",\"claim_px\":");
    push_int(&mut doc, px);
    if let Some(fingerprint) = request.fingerprint.filter(|f| !f.is_empty()) {
        doc.push_str(",\"fingerprint\":");
        push_json_str(&mut doc, fingerprint)?;
    }
    doc.push('}');
    Ok(doc)
}

/// When a COMPLETED record expires: `completed_at + ttl_ms`. The finish
/// script writes `ttl_ms` before the result, which it splices in last, so
/// the first `"ttl_ms":` ahead of the first `"result":` is the record's own.
pub(super) fn completed_expiry(raw: &str, record: &IdempotencyRecord) -> Option<DateTime<Utc>> {
    const TTL: &[u8] = b"\"ttl_ms\":";
    const RESULT: &[u8] = b"\"result\":";
    // A scan from quote to quote: the document is short, and a substring
    // searcher costs more to set up than this loop takes.
    let bytes = raw.as_bytes();
    let mut from = 0;
    let at = loop {
        let quote = from + bytes[from..].iter().position(|&b| b == b'"')?;
        let rest = &bytes[quote..];
        if rest.starts_with(TTL) {
            break quote + TTL.len();
        }
        if rest.starts_with(RESULT) {
            return None;
        }
        from = quote + 1;
    };
    let digits = raw[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    let ttl = chrono::TimeDelta::try_milliseconds(digits.parse().ok()?)?;
    record.completed_at?.checked_add_signed(ttl)
}

/// Appends `n` in decimal.
pub(super) fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

pub(super) fn text(key: &str, value: Value) -> Result<String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| IdempotencyError::corrupt(key, e))
        }
        Value::SimpleString(s) => Ok(s),
        other => Err(unexpected(format!("expected a string, got {other:?}"))),
    }
}

pub(super) fn parse_record(key: &str, raw: &str) -> Result<IdempotencyRecord> {
    serde_json::from_str(raw).map_err(|e| IdempotencyError::corrupt(key, e))
}

#[cfg(test)]
mod tests {
    use super::{Reply, completed_expiry, push_json_str};

    /// A reply of a shape the store does not expect is a protocol error,
    /// not an outage (it must not open the breaker or trigger fail-open).
    #[test]
    fn unexpected_replies_are_protocol_errors() {
        for value in [
            redis::Value::Int(7),
            redis::Value::Array(Vec::new()),
            redis::Value::Okay,
        ] {
            let error = Reply::parse("k", value).err().expect("an error");
            assert!(
                matches!(
                    error,
                    crate::IdempotencyError::Protocol { store: "redis", .. }
                ),
                "{error:?}"
            );
        }
    }
    #[test]
    fn a_completed_record_expires_ttl_ms_after_its_completion() {
        let expiry = |raw: &str| {
            let record: crate::IdempotencyRecord = serde_json::from_str(raw).expect("a record");
            completed_expiry(raw, &record).map(|t| t.timestamp_millis())
        };
        assert_eq!(
            expiry(
                r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":250,"result":{"ttl_ms":9}}"#
            ),
            Some(1250)
        );
        // Only the record's own field counts: not one inside the result,
        // nor one inside a string.
        assert_eq!(
            expiry(r#"{"status":"COMPLETED","completed_at":1000,"result":{"ttl_ms":9}}"#),
            None
        );
        assert_eq!(
            expiry(r#"{"status":"COMPLETED","completed_at":1000,"fingerprint":"\"ttl_ms\":7"}"#),
            None
        );
        // A seen-set mark says nothing of its expiry.
        assert_eq!(
            expiry(r#"{"status":"COMPLETED","completed_at":1000}"#),
            None
        );
    }

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        for text in [
            "",
            "order-42",
            "a\"quote",
            "back\\slash",
            "new\nline\t\u{1}",
            "ünï€ode/slash\u{7f}",
            r#""status":"COMPLETED""#,
        ] {
            let mut out = String::from("x");
            push_json_str(&mut out, text).expect("a string");
            assert_eq!(
                out,
                format!("x{}", serde_json::to_string(text).expect("serializable"))
            );
        }
    }
}

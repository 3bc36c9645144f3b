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

/// This host's clock in milliseconds since the epoch (0 before it), read
/// without building a calendar date.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// When a lease of `lease` claimed at `sent_ms` (this host's clock, in
/// milliseconds since the epoch) runs out: whole milliseconds, so never
/// later than the lease the store holds; the latest time there is when out
/// of range.
pub(super) fn lease_end(sent_ms: i64, lease: Duration) -> DateTime<Utc> {
    i64::try_from(millis(lease))
        .ok()
        .and_then(|lease_ms| sent_ms.checked_add(lease_ms))
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
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
    let mut doc = String::with_capacity(fast_claim_capacity(request));
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

/// What [`fast_claim`] writes for `request` at most, when nothing needs
/// escaping: its fields' text and 232 bytes of names, quotes and numbers
/// (two durations of up to 20 digits), so the document is never copied to
/// grow.
fn fast_claim_capacity(request: &ClaimRequest<'_>) -> usize {
    232 + request.recorded_key.len()
        + request.event_id.map_or(0, str::len)
        + request.event_type.map_or(0, str::len)
        + request.token.len()
        + request.fingerprint.map_or(0, str::len)
}

/// Reads a `COMPLETED` document in the exact form every completion writes
/// it (`ifeq::completed_doc` and the finish script):
/// `{"status":"COMPLETED","completed_at":<ms>[,"attempts":<n>],"ttl_ms":<ms>[,"fingerprint":"<text>"][,"result":<JSON>]}`,
/// with its expiry, `completed_at + ttl_ms`, filled in: a duplicate's reply,
/// read in one pass (serde's field-by-field reading and a scan for `ttl_ms`
/// cost about three times as much). `None` for anything else, which the
/// caller reads in full: a fingerprint with escapes, a seen-set mark (no
/// `ttl_ms`), a number serde would refuse, another layout. What it returns
/// is what serde reads from the same text (a test holds it to that).
pub(super) fn read_completed(raw: &str) -> Option<IdempotencyRecord> {
    let mut rest = raw.strip_prefix(r#"{"status":"COMPLETED","completed_at":"#)?;
    let completed_at = DateTime::from_timestamp_millis(i64::try_from(natural(&mut rest)?).ok()?)?;
    let mut attempts = 1;
    if let Some(after) = rest.strip_prefix(r#","attempts":"#) {
        rest = after;
        attempts = u32::try_from(natural(&mut rest)?).ok()?;
    }
    rest = rest.strip_prefix(r#","ttl_ms":"#)?;
    let ttl = chrono::TimeDelta::try_milliseconds(i64::try_from(natural(&mut rest)?).ok()?)?;
    let mut fingerprint = None;
    if let Some(after) = rest.strip_prefix(r#","fingerprint":""#) {
        // Text without escapes or control characters, up to its quote.
        let end = after
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < 0x20)?;
        if after.as_bytes()[end] != b'"' {
            return None;
        }
        fingerprint = Some(after[..end].to_owned());
        rest = &after[end + 1..];
    }
    let result = match rest.strip_prefix(r#","result":"#) {
        Some(after) => {
            let result = serde_json::from_str(after.strip_suffix('}')?).ok()?;
            // Inside the record the result sits one level deeper: serde
            // (128 levels at most) refuses the record when the result alone
            // nests 127.
            if nesting(&result) >= 127 {
                return None;
            }
            Some(result)
        }
        None if rest == "}" => None,
        None => return None,
    };
    Some(IdempotencyRecord {
        result,
        attempts,
        fingerprint,
        expires_at: Some(completed_at.checked_add_signed(ttl)?),
        ..IdempotencyRecord::completed(serde_json::Value::Null, 1, None, completed_at)
    })
}

/// How many arrays and objects `value` nests (0 for a scalar).
fn nesting(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(nesting).max().unwrap_or(0),
        serde_json::Value::Object(members) => 1 + members.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// A JSON natural number at the start of `rest` (digits, no leading zero),
/// which it then skips.
fn natural(rest: &mut &str) -> Option<u64> {
    let bytes = rest.as_bytes();
    let len = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    if len == 0 || (len > 1 && bytes[0] == b'0') {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &bytes[..len] {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    *rest = &rest[len..];
    Some(n)
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
    use super::{
        Reply, fast_claim, fast_claim_capacity, lease_end, now_ms, push_json_str, read_completed,
    };
    use crate::IdempotencyRecord;
    use crate::store::ClaimRequest;

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
    /// The one-pass reader takes only the completion's exact layout and
    /// leaves everything else to serde (and the script), never reading it
    /// differently.
    #[test]
    fn other_completed_documents_are_left_to_serde() {
        let read =
            |raw: &str| read_completed(raw).map(|r| r.expires_at.map(|t| t.timestamp_millis()));
        // Only the record's own `ttl_ms` counts, not one inside the result.
        assert_eq!(
            read(
                r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":250,"result":{"ttl_ms":9}}"#
            ),
            Some(Some(1250))
        );
        for raw in [
            // a seen-set mark says nothing of its expiry
            r#"{"status":"COMPLETED","completed_at":1000,"result":null}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"result":{"ttl_ms":9}}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"fingerprint":"\"ttl_ms\":7"}"#,
            // numbers serde refuses, or that are not whole milliseconds
            r#"{"status":"COMPLETED","completed_at":01000,"ttl_ms":1}"#,
            r#"{"status":"COMPLETED","completed_at":-5,"ttl_ms":1}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":2.5}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1e3}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"attempts":4294967296,"ttl_ms":1}"#,
            r#"{"status":"COMPLETED","completed_at":99999999999999999999,"ttl_ms":1}"#,
            r#"{"status":"COMPLETED","completed_at":9223372036854775807,"ttl_ms":1}"#,
            // not JSON, or not this layout
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1,"result":1}}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1,"result":}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1,"fingerprint":"a"#,
            "{\"status\":\"COMPLETED\",\"completed_at\":1000,\"ttl_ms\":1,\"fingerprint\":\"a\u{1}b\"}",
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1,"extra":true}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1"#,
            r#"{"completed_at":1000,"status":"COMPLETED","ttl_ms":1}"#,
            r#"{"status": "COMPLETED","completed_at":1000,"ttl_ms":1}"#,
            r#"{"status":"COMPLETED","completed_at":1000,"ttl_ms":1} "#,
        ] {
            assert_eq!(read(raw), None, "{raw}");
        }
    }

    /// A result nested as deep as serde allows on its own, but one level
    /// too deep inside the record, is left to serde (which refuses it).
    #[test]
    fn deeply_nested_results_read_as_serde_reads_them() {
        for depth in [1, 126, 127, 128] {
            let raw = format!(
                r#"{{"status":"COMPLETED","completed_at":1000,"ttl_ms":5,"result":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let by_serde = serde_json::from_str::<IdempotencyRecord>(&raw)
                .ok()
                .map(|mut r| {
                    r.expires_at = chrono::DateTime::from_timestamp_millis(1005);
                    r
                });
            assert_eq!(read_completed(&raw), by_serde, "depth {depth}");
        }
    }

    /// The claim document fits the room made for it, so it is written
    /// without growing, with every field and the longest durations.
    #[test]
    fn claim_documents_fit_their_capacity() {
        let longest = std::time::Duration::from_millis(u64::MAX);
        let key = "k".repeat(300);
        let mut request =
            ClaimRequest::new(&key, "0123456789abcdef0123456789abcdef", longest, longest);
        request.recorded_key = "r";
        request.event_id = Some("a7c0e0b2-0000-4000-8000-000000000001");
        request.event_type = Some("order.placed");
        request.fingerprint =
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        for fingerprint in [request.fingerprint, None] {
            request.fingerprint = fingerprint;
            let doc = fast_claim(&request, u64::MAX).expect("a document");
            assert!(
                doc.len() <= fast_claim_capacity(&request),
                "{} bytes: {doc}",
                doc.len()
            );
        }
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

    #[test]
    fn a_fast_claims_lease_ends_no_later_than_the_stores() {
        use std::time::Duration;
        let lease = Duration::from_micros(30_000_999);
        let before = chrono::Utc::now();
        let end = lease_end(now_ms(), lease);
        let after = chrono::Utc::now();
        // Whole milliseconds of both: never past the sent time plus the
        // lease the store was given (30,000 ms), and less than 1 ms before.
        assert!(end <= after + chrono::TimeDelta::milliseconds(30_000));
        assert!(end > before + chrono::TimeDelta::milliseconds(29_999));
        assert_eq!(
            lease_end(i64::MAX - 5, Duration::from_secs(1)),
            chrono::DateTime::<chrono::Utc>::MAX_UTC
        );
        assert_eq!(
            lease_end(0, Duration::from_secs(u64::MAX)),
            chrono::DateTime::<chrono::Utc>::MAX_UTC
        );
    }
}

//! Key hygiene and fingerprints, shared by every entry point.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::IdempotencyConfig;
use crate::error::{IdempotencyError, InvalidKeyReason, Result};

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// Canonical JSON of `value`: no whitespace, object keys sorted at every level.
/// Two values that are equal as JSON have the same canonical text.
pub(crate) fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The fingerprint of a payload: SHA-256 hex of its canonical JSON.
pub fn fingerprint<P: Serialize + ?Sized>(payload: &P) -> Result<String> {
    let value = serde_json::to_value(payload)?;
    Ok(sha256_hex(canonical_json(&value).as_bytes()))
}

/// Checks `key` against the configuration's rules.
pub(crate) fn validate_key(key: &str, config: &IdempotencyConfig) -> Result<()> {
    // ASCII text, the common case, is checked byte by byte without
    // decoding, and its length in characters is its length in bytes.
    let (control, len) = if key.is_ascii() {
        // Without short-circuiting, so the check compiles to vector code.
        let control = key
            .bytes()
            .fold(false, |any, b| any | (b < 0x20) | (b == 0x7f));
        (control, key.len())
    } else {
        (key.chars().any(char::is_control), key.chars().count())
    };
    let reason = if key.is_empty() {
        Some(InvalidKeyReason::Empty)
    } else if control {
        Some(InvalidKeyReason::ControlCharacter)
    } else {
        (len > config.max_key_len).then_some(InvalidKeyReason::TooLong {
            len,
            max: config.max_key_len,
        })
    };
    match reason {
        Some(reason) => Err(IdempotencyError::InvalidKey { reason }),
        None => Ok(()),
    }
}

/// A validated key in its two stored forms, which share one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredKey {
    /// The key the store is asked for: prefix + key (or its digest).
    pub(crate) storage: String,
    /// Where the recorded form starts in `storage` (the prefix's length).
    recorded_at: usize,
}

impl StoredKey {
    /// The key written into the record's `idempotency_key` field: the
    /// storage key without its prefix.
    pub(crate) fn recorded(&self) -> &str {
        &self.storage[self.recorded_at..]
    }
}

pub(crate) fn stored_key(key: &str, config: &IdempotencyConfig) -> Result<StoredKey> {
    validate_key(key, config)?;
    let prefix = &config.key_prefix;
    let digest;
    let recorded = if config.hash_keys {
        digest = sha256_hex(key.as_bytes());
        &digest
    } else {
        key
    };
    let mut storage = String::with_capacity(prefix.len() + recorded.len());
    storage.push_str(prefix);
    storage.push_str(recorded);
    Ok(StoredKey {
        storage,
        recorded_at: prefix.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"d": [1, {"z": 1, "y": 2}], "c": "x"}});
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":"x","d":[1,{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn fingerprint_ignores_key_order_but_not_values() {
        let a = fingerprint(&json!({"a": 1, "b": 2})).expect("fp");
        let b = fingerprint(&json!({"b": 2, "a": 1})).expect("fp");
        let c = fingerprint(&json!({"b": 3, "a": 1})).expect("fp");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keys_are_validated() {
        let config = IdempotencyConfig::default();
        let reason = |k: &str| match validate_key(k, &config) {
            Err(IdempotencyError::InvalidKey { reason }) => Some(reason),
            _ => None,
        };
        assert_eq!(reason(""), Some(InvalidKeyReason::Empty));
        assert_eq!(reason("a\nb"), Some(InvalidKeyReason::ControlCharacter));
        assert_eq!(reason("a\0"), Some(InvalidKeyReason::ControlCharacter));
        // DEL, and a C1 control in text that is not ASCII.
        assert_eq!(reason("a\u{7f}"), Some(InvalidKeyReason::ControlCharacter));
        assert_eq!(reason("é\u{85}"), Some(InvalidKeyReason::ControlCharacter));
        assert_eq!(reason("~ é"), None);
        assert_eq!(
            reason(&"k".repeat(256)),
            Some(InvalidKeyReason::TooLong { len: 256, max: 255 })
        );
        assert_eq!(reason(&"é".repeat(255)), None);
    }

    #[test]
    fn hashing_hides_the_raw_key() {
        let config = IdempotencyConfig::builder()
            .hash_keys(true)
            .build()
            .expect("config");
        let k = stored_key("user@example.com", &config).expect("valid");
        assert!(!k.storage.contains("user@example.com"));
        assert_eq!(
            k.storage,
            format!("idempotency:events:{}", sha256_hex(b"user@example.com"))
        );
        assert_eq!(k.recorded().len(), 64);
    }
}

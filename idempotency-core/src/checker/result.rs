//! A handler's result as stored (JSON a later read can decode) and as
//! replayed to duplicates.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::Processed;
use crate::config::DuplicatePolicy;
use crate::error::{IdempotencyError, Result};
use crate::record::IdempotencyRecord;

/// Results nested deeper than this are refused: `serde_json` would not read
/// them back (its limit is 128), so they could never be replayed.
const MAX_RESULT_DEPTH: usize = 100;

/// How deeply arrays and objects nest in the JSON text `json`: brackets
/// and braces counted outside strings. The text is serde_json's own
/// output, so it is well formed.
fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json.as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A handler's result as the JSON text to store, if it can be stored and
/// replayed. Serialized once, straight from `value`: the store writes this
/// text as it is.
pub(super) fn storable<T: Serialize + ?Sized>(
    value: &T,
) -> std::result::Result<Box<RawValue>, serde_json::Error> {
    let json = serde_json::value::to_raw_value(value)?;
    if json_depth(json.get()) > MAX_RESULT_DEPTH {
        return Err(serde::ser::Error::custom(format!(
            "the result nests deeper than {MAX_RESULT_DEPTH} levels and could not be replayed"
        )));
    }
    Ok(json)
}

/// The first attempt's result, or [`IdempotencyError::ResultNotStored`]
/// when the record holds none (the result could not be stored).
pub(super) fn stored_result(key: &str, record: &IdempotencyRecord) -> Result<serde_json::Value> {
    record.result.clone().ok_or_else(|| not_stored(key))
}

/// [`IdempotencyError::ResultNotStored`] for `key`.
fn not_stored(key: &str) -> IdempotencyError {
    IdempotencyError::ResultNotStored {
        key: key.to_owned(),
        reason: "the first attempt's result could not be serialized to JSON, \
                 or nested deeper than the limit"
            .to_owned(),
    }
}

/// What a duplicate of a `COMPLETED` key gets under `policy`.
/// The record is taken by value, so its result is decoded without a copy.
pub(super) fn replay<T: DeserializeOwned>(
    policy: DuplicatePolicy,
    key: String,
    record: IdempotencyRecord,
) -> Result<Processed<T>> {
    match policy {
        DuplicatePolicy::Error => Err(IdempotencyError::Duplicate {
            key,
            cached_result: record.result,
        }),
        DuplicatePolicy::Replay => match record.result {
            Some(value) => Ok(Processed::Replayed(serde_json::from_value(value)?)),
            None => Err(not_stored(&key)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> serde_json::Value {
        (0..depth).fold(serde_json::json!("x"), |inner, i| {
            if i % 2 == 0 {
                serde_json::json!([inner])
            } else {
                serde_json::json!({ "k": inner })
            }
        })
    }

    #[test]
    fn depth_counts_brackets_and_braces_outside_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth(r#""[[{{""#), 0);
        assert_eq!(json_depth(r#""\"[\\""#), 0);
        assert_eq!(json_depth("[]"), 1);
        assert_eq!(json_depth(r#"{"a":[1,{"b":"]]}}"}],"c":[[]]}"#), 3);
        assert_eq!(json_depth(r#"[{"\"":"\\"},[[["}"]]]]"#), 4);
    }

    #[test]
    fn depth_agrees_with_the_value_it_was_written_from() {
        for depth in 0..=130 {
            let json = serde_json::value::to_raw_value(&nested(depth)).expect("serializes");
            assert_eq!(json_depth(json.get()), depth, "{}", json.get());
        }
    }

    #[test]
    fn results_nested_past_the_limit_are_refused() {
        assert!(storable(&nested(MAX_RESULT_DEPTH)).is_ok());
        let refused = storable(&nested(MAX_RESULT_DEPTH + 1)).expect_err("too deep");
        assert!(refused.to_string().contains("nests deeper"), "{refused}");
    }

    #[test]
    fn the_stored_text_is_the_results_own_serialization() {
        #[derive(Serialize)]
        struct Receipt<'a> {
            order: u64,
            note: &'a str,
        }
        let json = storable(&Receipt {
            order: 7,
            note: "a \"quoted\" {note}",
        })
        .expect("storable");
        assert_eq!(json.get(), r#"{"order":7,"note":"a \"quoted\" {note}"}"#);
    }
}

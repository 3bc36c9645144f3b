//! A handler's result as stored (JSON a later read can decode) and as
//! replayed to duplicates.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Processed;
use crate::config::DuplicatePolicy;
use crate::error::{IdempotencyError, Result};
use crate::record::IdempotencyRecord;

/// Results nested deeper than this are refused: `serde_json` would not read
/// them back (its limit is 128), so they could never be replayed.
const MAX_RESULT_DEPTH: usize = 100;

fn json_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A handler's result as the JSON to store, if it can be stored and replayed.
pub(super) fn storable<T: Serialize + ?Sized>(
    value: &T,
) -> std::result::Result<serde_json::Value, serde_json::Error> {
    let json = serde_json::to_value(value)?;
    if json_depth(&json) > MAX_RESULT_DEPTH {
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

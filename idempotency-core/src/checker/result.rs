//! A handler's result as stored (JSON a later read can decode) and as
//! replayed to duplicates.

use super::Processed;
use crate::config::DuplicatePolicy;
use crate::error::{IdempotencyError, Result};
use crate::record::IdempotencyRecord;
use crate::store::ResultJson;
#[cfg(test)]
use crate::store::json::json_shape;
use crate::store::json::{MAX_RESULT_DEPTH, TOO_WIDE, too_deep, unreplayable};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// serde_json's compact output, refusing what a duplicate could not be
/// replayed from: integers wider than 64 bits (a record's result is read
/// back as a [`serde_json::Value`], which would round them to floats) and
/// arrays and objects nested deeper than [`MAX_RESULT_DEPTH`] (counted as
/// they are written, so the text is never scanned again).
#[derive(Default)]
struct Replayable {
    depth: usize,
}

impl Replayable {
    /// Enters an array or object.
    fn enter(&mut self) -> std::io::Result<()> {
        if self.depth >= MAX_RESULT_DEPTH {
            return Err(std::io::Error::other(too_deep()));
        }
        self.depth += 1;
        Ok(())
    }

    /// Leaves an array or object (serde_json pairs every end with a
    /// begin).
    fn leave(&mut self) {
        debug_assert!(self.depth > 0, "an end without a begin");
        self.depth = self.depth.saturating_sub(1);
    }
}

impl serde_json::ser::Formatter for Replayable {
    fn write_i128<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: i128,
    ) -> std::io::Result<()> {
        let value = i64::try_from(value).map_err(|_| too_wide())?;
        self.write_i64(writer, value)
    }

    fn write_u128<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: u128,
    ) -> std::io::Result<()> {
        let value = u64::try_from(value).map_err(|_| too_wide())?;
        self.write_u64(writer, value)
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.enter()?;
        writer.write_all(b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.leave();
        writer.write_all(b"]")
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.enter()?;
        writer.write_all(b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.leave();
        writer.write_all(b"}")
    }

    /// A [`serde_json::value::RawValue`] inside the result, written as it
    /// is when serde_json reads it back exactly (a `RawValue` is checked
    /// only loosely when it is made); its own nesting counts from where it
    /// sits.
    fn write_raw_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if let Some(reason) = unreplayable(fragment, self.depth) {
            return Err(std::io::Error::other(reason));
        }
        writer.write_all(fragment.as_bytes())
    }
}

fn too_wide() -> std::io::Error {
    std::io::Error::other(TOO_WIDE)
}

/// A handler's result as the JSON text to store, if it can be stored and
/// replayed: serialized once, into `text`, which the store then writes as
/// it is, never parsed again. The text is borrowed, not boxed, so it costs
/// one allocation.
pub(super) fn storable<'a, T: Serialize + ?Sized>(
    value: &T,
    text: &'a mut Vec<u8>,
) -> std::result::Result<ResultJson<'a>, serde_json::Error> {
    text.clear();
    text.reserve(128);
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut *text,
        Replayable::default(),
    ))?;
    // serde_json writes UTF-8 only, and JSON by construction.
    let text = std::str::from_utf8(text).map_err(serde::ser::Error::custom)?;
    Ok(ResultJson::trusted(text))
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
    use crate::store::json::nested;
    use serde_json::value::RawValue;

    fn bare(depth: usize) -> serde_json::Value {
        (0..depth).fold(serde_json::json!([]), |inner, _| serde_json::json!([inner]))
    }

    #[test]
    fn results_nested_past_the_limit_are_refused() {
        let mut text = Vec::new();
        assert!(storable(&bare(MAX_RESULT_DEPTH), &mut text).is_err());
        assert!(storable(&bare(MAX_RESULT_DEPTH - 1), &mut text).is_ok());
        assert!(storable(&nested(MAX_RESULT_DEPTH), &mut text).is_ok());
        let refused = storable(&nested(MAX_RESULT_DEPTH + 1), &mut text).expect_err("too deep");
        assert!(refused.to_string().contains("nests deeper"), "{refused}");
    }

    #[test]
    fn raw_values_inside_a_result_count_their_own_nesting() {
        let raw = |depth| serde_json::value::to_raw_value(&bare(depth)).expect("JSON");
        let mut text = Vec::new();
        // `bare(d)` nests d + 1 levels; one more for the array around it.
        let fits = [raw(MAX_RESULT_DEPTH - 2)];
        let json = storable(&fits, &mut text).expect("exactly at the limit");
        assert_eq!(json_shape(json.get().as_bytes()).depth, MAX_RESULT_DEPTH);
        let refused = storable(&[raw(MAX_RESULT_DEPTH - 1)], &mut text).expect_err("too deep");
        assert!(refused.to_string().contains("nests deeper"), "{refused}");
        // After a raw value, the depth is back where it was: both halves
        // reach the limit, neither passes it.
        let siblings = ([raw(MAX_RESULT_DEPTH - 3)], bare(MAX_RESULT_DEPTH - 2));
        let json = storable(&siblings, &mut text).expect("both at the limit");
        assert_eq!(json_shape(json.get().as_bytes()).depth, MAX_RESULT_DEPTH);
    }

    #[test]
    fn raw_values_that_would_not_read_back_exactly_are_refused() {
        let raw = |text: &str| RawValue::from_string(text.to_owned()).expect("a RawValue");
        let mut text = Vec::new();
        // A RawValue is checked loosely when it is made: serde_json reads
        // neither of these first two back, and the third as a float.
        for (fragment, reason) in [
            (r#""\ud800""#, "reads back"),
            ("1e400", "reads back"),
            ("123456789012345678901234567890", "wider than 64 bits"),
            ("[-9223372036854775809]", "wider than 64 bits"),
        ] {
            let refused = storable(&[raw(fragment)], &mut text).expect_err(fragment);
            assert!(
                refused.to_string().contains(reason),
                "{fragment}: {refused}"
            );
        }
        for fragment in [
            "18446744073709551615",
            "-9223372036854775808",
            "1.5e300",
            "[1,   2]",
        ] {
            let json = storable(&[raw(fragment)], &mut text).expect(fragment);
            assert_eq!(json.get(), format!("[{fragment}]"));
        }
    }

    #[test]
    fn siblings_do_not_add_up_to_depth() {
        let mut text = Vec::new();
        let objects = vec![std::collections::BTreeMap::<String, u8>::new(); 300];
        assert!(storable(&objects, &mut text).is_ok());
        let arrays = vec![Vec::<u8>::new(); 300];
        assert!(storable(&arrays, &mut text).is_ok());
    }

    #[test]
    fn integers_wider_than_64_bits_are_refused_and_the_rest_written_as_serde_does() {
        let mut text = Vec::new();
        for fits in [u128::from(u64::MAX), 0] {
            let json = storable(&fits, &mut text).expect("fits");
            assert_eq!(json.get(), serde_json::to_string(&fits).expect("JSON"));
        }
        for fits in [i128::from(i64::MIN), i128::from(i64::MAX), -1] {
            let json = storable(&fits, &mut text).expect("fits");
            assert_eq!(json.get(), serde_json::to_string(&fits).expect("JSON"));
        }
        for wide in [u128::from(u64::MAX) + 1, u128::MAX] {
            let refused = storable(&[wide], &mut text).expect_err("wider than 64 bits");
            assert!(
                refused.to_string().contains("wider than 64 bits"),
                "{refused}"
            );
        }
        for wide in [i128::from(i64::MIN) - 1, i128::MAX] {
            assert!(storable(&Some(wide), &mut text).is_err());
        }
    }

    #[test]
    fn the_stored_text_is_the_results_own_serialization() {
        #[derive(Serialize)]
        struct Receipt<'a> {
            order: u64,
            note: &'a str,
        }
        let mut text = Vec::new();
        let json = storable(
            &Receipt {
                order: 7,
                note: "a \"quoted\" {note}",
            },
            &mut text,
        )
        .expect("storable");
        assert_eq!(json.get(), r#"{"order":7,"note":"a \"quoted\" {note}"}"#);
    }
}

//! [`ResultJson`]: a handler's result as the JSON text a store writes.

use std::borrow::Cow;
use std::fmt;

#[cfg(doc)]
use serde_json::value::RawValue;

/// A handler's result as JSON text: what
/// [`IdempotencyStore::complete`](super::IdempotencyStore::complete) stores.
///
/// The checker serializes a handler's result once, straight to this text,
/// and hands it to the store without parsing it again. A store writes it as
/// it is (a byte string, a `jsonb` column, a field spliced into a
/// document) and reads it back as
/// [`IdempotencyRecord::result`](crate::IdempotencyRecord::result).
///
/// Every `ResultJson` is one JSON value that `serde_json` reads back, its
/// integers exactly: it nests at most 100 levels deep (serde_json's limit
/// is 128) and holds no integer wider than 64 bits (which would read back
/// as a rounded float). The checker's text is serde_json's compact output (with any
/// `RawValue` inside the result as it is). Text from elsewhere (a store's
/// own tests, a migration) is checked by [`ResultJson::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResultJson<'a> {
    text: Cow<'a, str>,
}

impl<'a> ResultJson<'a> {
    /// Checks that `text` is one JSON value that serde_json reads back,
    /// its integers exactly: valid escapes and numbers, nesting at most 100
    /// levels deep, no integer wider than 64 bits. `Err` otherwise
    /// (serde_json's error, which names the position, when the text is not
    /// JSON). Whitespace around the value is kept; the text is never
    /// empty.
    pub fn new(text: impl Into<Cow<'a, str>>) -> Result<Self, serde_json::Error> {
        let text = text.into();
        serde_json::from_str::<serde_json::Value>(&text)?;
        match shape_problem(&text, 0) {
            Some(reason) => Err(serde::de::Error::custom(reason)),
            None => Ok(Self { text }),
        }
    }

    /// Text the checker's serializer wrote, which is JSON by construction
    /// (and checked as it was written), used as it is.
    pub(crate) fn trusted(text: &'a str) -> Self {
        Self {
            text: Cow::Borrowed(text),
        }
    }

    /// The JSON text.
    #[must_use]
    pub fn get(&self) -> &str {
        &self.text
    }

    /// The JSON text's bytes (UTF-8).
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    /// An owned copy, for a store that keeps the text in memory.
    #[must_use]
    pub fn into_owned(self) -> ResultJson<'static> {
        ResultJson {
            text: Cow::Owned(self.text.into_owned()),
        }
    }
}

impl fmt::Display for ResultJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Results nested deeper than this are refused: `serde_json` would not read
/// them back (its limit is 128), so they could never be replayed.
pub(crate) const MAX_RESULT_DEPTH: usize = 100;

/// Why a result holding an integer wider than 64 bits is refused: read
/// back as a [`serde_json::Value`], it would be rounded to a float, and a
/// duplicate would get a value that was not the first result.
pub(crate) const TOO_WIDE: &str =
    "the result holds an integer wider than 64 bits, which would not replay exactly";

/// Why a result nested deeper than [`MAX_RESULT_DEPTH`] is refused.
pub(crate) fn too_deep() -> String {
    format!("the result nests deeper than {MAX_RESULT_DEPTH} levels and could not be replayed")
}

/// Why the JSON text `text`, nested inside `outer_depth` levels, could
/// not be replayed: `None` when serde_json reads it back, its integers
/// exactly. For text the checker did not serialize itself (a
/// [`RawValue`] inside a result, [`ResultJson::new`]): a `RawValue` is
/// checked only loosely when it is made (an escape like `\ud800` or a
/// number like `1e400` passes, and serde_json cannot read either back).
pub(crate) fn unreplayable(text: &str, outer_depth: usize) -> Option<String> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
        return Some(format!("the result is not JSON serde_json reads back: {e}"));
    }
    shape_problem(text, outer_depth)
}

/// Why the JSON text `text`, which serde_json reads, nested inside
/// `outer_depth` levels, would not be replayed: too deep, or an integer
/// too wide to read back exactly.
fn shape_problem(text: &str, outer_depth: usize) -> Option<String> {
    let shape = json_shape(text.as_bytes());
    if outer_depth + shape.depth > MAX_RESULT_DEPTH {
        Some(too_deep())
    } else if shape.wide_integer {
        Some(TOO_WIDE.to_owned())
    } else {
        None
    }
}

/// What [`json_shape`] finds in JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JsonShape {
    /// How deeply arrays and objects nest.
    pub(crate) depth: usize,
    /// Whether an integer (a number with no fraction or exponent) is wider
    /// than 64 bits.
    pub(crate) wide_integer: bool,
}

/// How deeply arrays and objects nest in the JSON text `bytes` (brackets
/// and braces counted outside strings), and whether it holds an integer
/// wider than 64 bits. On text that is not JSON the answer is meaningless,
/// but the scan still ends without a panic.
pub(crate) fn json_shape(bytes: &[u8]) -> JsonShape {
    let (mut depth, mut deepest, mut wide_integer, mut at) = (0usize, 0usize, false, 0usize);
    while let Some(&b) = bytes.get(at) {
        match b {
            b'"' => {
                // Skip the string, escapes included, to its closing quote.
                at += 1;
                while let Some(&c) = bytes.get(at) {
                    match c {
                        b'\\' => at += 2,
                        b'"' => break,
                        _ => at += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let end = bytes[at..]
                    .iter()
                    .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .map_or(bytes.len(), |len| at + len);
                let number = &bytes[at..end];
                let integer = !number.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                // 18 digits always fit; longer ones are read to see.
                if integer && number.len() > 18 {
                    let text = std::str::from_utf8(number).unwrap_or_default();
                    wide_integer |= text.parse::<i64>().is_err() && text.parse::<u64>().is_err();
                }
                at = end;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    JsonShape {
        depth: deepest,
        wide_integer,
    }
}

/// A value nesting `depth` levels, arrays and objects in turn, for tests.
#[cfg(test)]
pub(crate) fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(serde_json::json!("x"), |inner, i| {
        if i % 2 == 0 {
            serde_json::json!([inner])
        } else {
            serde_json::json!({ "k": inner })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_and_braces_outside_strings() {
        assert_eq!(json_shape(b"1").depth, 0);
        assert_eq!(json_shape(br#""[[{{""#).depth, 0);
        assert_eq!(json_shape(br#""\"[\\""#).depth, 0);
        assert_eq!(json_shape(b"[]").depth, 1);
        assert_eq!(json_shape(br#"{"a":[1,{"b":"]]}}"}],"c":[[]]}"#).depth, 3);
        assert_eq!(json_shape(br#"[{"\"":"\\"},[[["}"]]]]"#).depth, 4);
    }

    #[test]
    fn depth_agrees_with_the_value_it_was_written_from() {
        for depth in 0..=130 {
            let json = serde_json::value::to_raw_value(&nested(depth)).expect("serializes");
            assert_eq!(
                json_shape(json.get().as_bytes()).depth,
                depth,
                "{}",
                json.get()
            );
        }
    }

    #[test]
    fn integers_are_told_from_other_numbers_and_strings() {
        let wide = |text: &str| json_shape(text.as_bytes()).wide_integer;
        assert!(wide("18446744073709551616"));
        assert!(wide(r#"{"a":[1,-9223372036854775809]}"#));
        assert!(!wide("18446744073709551615"));
        assert!(!wide("-9223372036854775808"));
        assert!(!wide("123456789012345678901234567890.0"));
        assert!(!wide("1234567890123456789012345e2"));
        assert!(!wide(r#""123456789012345678901234567890""#));
        assert!(!wide(r#"["\"", 123456789012345678, "\\"]"#));
    }

    #[test]
    fn depth_scan_ends_on_text_that_is_not_json() {
        for text in ["\"", "\"\\", "[\"\\\"", "[[", "]]}", "\\", ""] {
            assert!(json_shape(text.as_bytes()).depth <= 2, "{text:?}");
        }
    }

    #[test]
    fn new_takes_one_json_value_nested_at_most_the_limit() {
        let limit = nested(MAX_RESULT_DEPTH).to_string();
        assert_eq!(
            ResultJson::new(limit.as_str()).expect("at the limit").get(),
            limit
        );
        let too_deep = nested(MAX_RESULT_DEPTH + 1).to_string();
        let refused = ResultJson::new(too_deep).expect_err("too deep");
        assert!(refused.to_string().contains("nests deeper"), "{refused}");
        for not_one_value in [
            "",
            "{",
            "1 2",
            "[1,]",
            "nul",
            "\"\\x\"",
            "\"\\ud800\"",
            "1e400",
        ] {
            assert!(ResultJson::new(not_one_value).is_err(), "{not_one_value:?}");
        }
        for wide in ["123456789012345678901234567890", "[-9223372036854775809]"] {
            let refused = ResultJson::new(wide).expect_err(wide);
            assert!(
                refused.to_string().contains("wider than 64 bits"),
                "{refused}"
            );
        }
        for fits in [
            "18446744073709551615",
            "-9223372036854775808",
            "1.5e300",
            "-0",
        ] {
            assert!(ResultJson::new(fits).is_ok(), "{fits}");
        }
        let owned = ResultJson::new(String::from("[1, {\"a\": null}]")).expect("JSON");
        assert_eq!(owned.to_string(), "[1, {\"a\": null}]");
        assert_eq!(owned.as_bytes(), owned.get().as_bytes());
    }
}

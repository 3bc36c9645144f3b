//! [`ResultJson`]: a handler's result as the JSON text a store writes.

use std::borrow::Cow;
use std::fmt;

use serde_json::value::RawValue;

/// A handler's result as JSON text: what
/// [`IdempotencyStore::complete`](super::IdempotencyStore::complete) stores.
///
/// The checker serializes a handler's result once, straight to this text,
/// and hands it to the store without reading it again. A store writes it as
/// it is (a byte string, a `jsonb` column, a field spliced into a
/// document) and reads it back as
/// [`IdempotencyRecord::result`](crate::IdempotencyRecord::result).
///
/// Every `ResultJson` is one JSON value that nests at most 100 levels deep,
/// so `serde_json` (whose limit is 128) always reads it back. The checker's
/// text is also compact and holds no integer wider than 64 bits. Text from
/// elsewhere (a store's own tests, a migration) is checked by
/// [`ResultJson::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResultJson<'a> {
    text: Cow<'a, str>,
}

impl<'a> ResultJson<'a> {
    /// Checks that `text` is one JSON value nesting at most 100 levels
    /// deep: `Err` (serde_json's error, naming the position) otherwise.
    pub fn new(text: impl Into<Cow<'a, str>>) -> Result<Self, serde_json::Error> {
        let text = text.into();
        let value: &RawValue = serde_json::from_str(&text)?;
        if json_depth(value.get().as_bytes()) > MAX_RESULT_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "the JSON nests deeper than {MAX_RESULT_DEPTH} levels"
            )));
        }
        Ok(Self { text })
    }

    /// Text the checker serialized itself, which is JSON by construction.
    pub(crate) fn checked(text: &'a str) -> Self {
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

/// How deeply arrays and objects nest in the JSON text `json`: brackets
/// and braces counted outside strings. The text is checked JSON (a
/// [`RawValue`]'s); on text that is not, the answer is meaningless but the
/// scan still ends without a panic.
pub(crate) fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest, mut at) = (0usize, 0usize, 0usize);
    let structural = |b: &u8| matches!(b, b'"' | b'[' | b'{' | b']' | b'}');
    while let Some(offset) = bytes
        .get(at..)
        .and_then(|rest| rest.iter().position(structural))
    {
        at += offset;
        match bytes[at] {
            b'"' => {
                // Skip the string, escapes included, to its closing quote.
                at += 1;
                loop {
                    let quote_or_escape = |b: &u8| matches!(b, b'"' | b'\\');
                    match bytes
                        .get(at..)
                        .and_then(|rest| rest.iter().position(quote_or_escape))
                    {
                        Some(offset) if bytes[at + offset] == b'\\' => at += offset + 2,
                        Some(offset) => {
                            at += offset;
                            break;
                        }
                        None => return deepest,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            _ => depth = depth.saturating_sub(1),
        }
        at += 1;
    }
    deepest
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
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(br#""[[{{""#), 0);
        assert_eq!(json_depth(br#""\"[\\""#), 0);
        assert_eq!(json_depth(b"[]"), 1);
        assert_eq!(json_depth(br#"{"a":[1,{"b":"]]}}"}],"c":[[]]}"#), 3);
        assert_eq!(json_depth(br#"[{"\"":"\\"},[[["}"]]]]"#), 4);
    }

    #[test]
    fn depth_agrees_with_the_value_it_was_written_from() {
        for depth in 0..=130 {
            let json = serde_json::value::to_raw_value(&nested(depth)).expect("serializes");
            assert_eq!(json_depth(json.get().as_bytes()), depth, "{}", json.get());
        }
    }

    #[test]
    fn depth_scan_ends_on_text_that_is_not_json() {
        for text in ["\"", "\"\\", "[\"\\\"", "[[", "]]}", "\\", ""] {
            assert!(json_depth(text.as_bytes()) <= 2, "{text:?}");
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
        for not_one_value in ["", "{", "1 2", "[1,]", "nul", "\"\\x\""] {
            assert!(ResultJson::new(not_one_value).is_err(), "{not_one_value:?}");
        }
        let owned = ResultJson::new(String::from("[1, {\"a\": null}]")).expect("JSON");
        assert_eq!(owned.to_string(), "[1, {\"a\": null}]");
        assert_eq!(owned.as_bytes(), owned.get().as_bytes());
    }
}

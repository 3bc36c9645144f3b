//! Reading the `Idempotency-Key` header.
//!
//! The IETF draft defines the header as a structured-field Item (RFC 8941)
//! whose value is a String: `Idempotency-Key: "8e03978e-40d5"`. This module
//! reads exactly that, plus one documented leniency: a bare key made of
//! token characters (`8e03978e-40d5`, `order:17/a`), which many clients send.
//! Everything else a structured-field parser would read as another type
//! (byte sequences, numbers, booleans, inner lists, lists) or with
//! parameters is refused rather than guessed at.

use http::{HeaderMap, HeaderValue};

/// The longest key the layer accepts, in characters (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// Why an `Idempotency-Key` header was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is empty, or an empty quoted string.
    Empty,
    /// The key has more than [`MAX_KEY_LEN`] characters.
    TooLong,
    /// The value is neither a structured-field string (`"..."`) nor a bare
    /// key of token characters.
    Malformed,
    /// The value is a structured-field item of another type: a byte
    /// sequence (`:YWJj:`), a number, a boolean (`?1`), a date or an inner
    /// list. The draft requires a string.
    NotAString,
    /// The value carries structured-field parameters (`"abc";x=1`); the
    /// draft defines none.
    Parameters,
    /// More than one key: a list (`"a", "b"`) or the header sent twice.
    Multiple,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "the Idempotency-Key header is empty",
            Self::TooLong => "the Idempotency-Key header is longer than 255 characters",
            Self::Malformed => {
                "the Idempotency-Key header must be a structured-field string (\"...\": printable \
                 ASCII, with \\\" and \\\\ escapes)"
            }
            Self::NotAString => {
                "the Idempotency-Key header must be a structured-field string (\"...\"), not a \
                 byte sequence, number, boolean, date or inner list"
            }
            Self::Parameters => {
                "the Idempotency-Key header must not carry parameters (;name=value)"
            }
            Self::Multiple => "the request carries more than one Idempotency-Key",
        })
    }
}

impl std::error::Error for KeyError {}

/// Parses an `Idempotency-Key` header value.
///
/// Accepts the structured-field string of the IETF draft (`"8e03978e"`,
/// printable ASCII with `\"` and `\\` escapes, RFC 8941 §3.3.3) and, as a
/// leniency, a bare key of token characters (letters, digits,
/// ``!#$%&'*+-.^_`|~``, `:` and `/`) that is not another structured-field
/// type: `8e03978e` is the same key as `"8e03978e"`. Refused with a typed
/// [`KeyError`]: byte sequences (`:YWJj:`), numbers (`12345`: send
/// `"12345"`), booleans, dates, inner lists, parameters (`"k";x=1`) and lists
/// (`"a", "b"`). Surrounding spaces are ignored.
///
/// ```
/// use http::HeaderValue;
/// use idempotency_http::{KeyError, parse_idempotency_key};
///
/// let parse = |v: &'static str| parse_idempotency_key(&HeaderValue::from_static(v));
/// assert_eq!(parse("\"abc-1\"")?, "abc-1");
/// assert_eq!(parse("abc-1")?, "abc-1");
/// assert_eq!(parse("\"open"), Err(KeyError::Malformed));
/// assert_eq!(parse(":YWJj:"), Err(KeyError::NotAString));
/// assert_eq!(parse("\"abc\";x=1"), Err(KeyError::Parameters));
/// # Ok::<(), idempotency_http::KeyError>(())
/// ```
pub fn parse_idempotency_key(value: &HeaderValue) -> Result<String, KeyError> {
    let text = trim(value.as_bytes());
    let key = match text.first() {
        None => return Err(KeyError::Empty),
        Some(b'"') => sf_string(&text[1..])?,
        Some(_) => bare(text)?,
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.chars().count() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(key)
}

/// The key of a request's headers: `Ok(None)` without the header, an error
/// when it is malformed or sent more than once (two `Idempotency-Key` lines
/// are [`KeyError::Multiple`], never "the first wins").
///
/// ```
/// use http::HeaderMap;
/// use idempotency_http::{IDEMPOTENCY_KEY_HEADER, KeyError, idempotency_key};
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(idempotency_key(&headers), Ok(None));
/// headers.append(IDEMPOTENCY_KEY_HEADER, "\"a\"".parse()?);
/// assert_eq!(idempotency_key(&headers), Ok(Some("a".to_owned())));
/// headers.append(IDEMPOTENCY_KEY_HEADER, "\"b\"".parse()?);
/// assert_eq!(idempotency_key(&headers), Err(KeyError::Multiple));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(crate::IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Multiple);
    }
    parse_idempotency_key(value).map(Some)
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// An sf-string after its opening quote; nothing but spaces may follow the
/// closing one.
fn sf_string(mut rest: &[u8]) -> Result<String, KeyError> {
    let mut key = String::with_capacity(rest.len());
    loop {
        match rest {
            [] => return Err(KeyError::Malformed),
            [b'"', tail @ ..] => {
                rest = tail;
                break;
            }
            [b'\\', c @ (b'"' | b'\\'), tail @ ..] => {
                key.push(char::from(*c));
                rest = tail;
            }
            [c @ 0x20..=0x7e, tail @ ..] if *c != b'\\' => {
                key.push(char::from(*c));
                rest = tail;
            }
            _ => return Err(KeyError::Malformed),
        }
    }
    after_item(rest)?;
    Ok(key)
}

/// What may follow an item: nothing. Parameters and list members are
/// named as such.
fn after_item(rest: &[u8]) -> Result<(), KeyError> {
    match trim(rest).first() {
        None => Ok(()),
        Some(b';') => Err(KeyError::Parameters),
        Some(b',') => Err(KeyError::Multiple),
        Some(_) => Err(KeyError::Malformed),
    }
}

/// The bare-key leniency: token characters, `:` and `/`; not a value that
/// RFC 8941 reads as another type.
fn bare(text: &[u8]) -> Result<String, KeyError> {
    let is_key_char = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(c);
    let end = text
        .iter()
        .position(|c| !is_key_char(c))
        .unwrap_or(text.len());
    let (key, rest) = text.split_at(end);
    match text[0] {
        b':' | b'?' | b'@' | b'(' => return Err(KeyError::NotAString),
        _ if is_sf_number(key) => return Err(KeyError::NotAString),
        _ => {}
    }
    if key.is_empty() {
        return Err(KeyError::Malformed);
    }
    after_item(rest)?;
    // Only ASCII bytes were taken.
    Ok(key.iter().copied().map(char::from).collect())
}

/// Whether `text` is an RFC 8941 integer or decimal (`-12`, `1.5`).
fn is_sf_number(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    let all_digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    all_digits(int) && frac.is_none_or(all_digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, KeyError> {
        parse_idempotency_key(&HeaderValue::from_str(s).expect("header value"))
    }

    #[test]
    fn quoted_and_bare_forms() {
        assert_eq!(parse("\"a b\"").as_deref(), Ok("a b"));
        assert_eq!(parse("  \"x\"  ").as_deref(), Ok("x"));
        assert_eq!(parse(r#""q\"uo\\te""#).as_deref(), Ok(r#"q"uo\te"#));
        assert_eq!(
            parse("8e03978e-40d5-43e8-bc93-6894a57f9324").as_deref(),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(parse("order:17/a").as_deref(), Ok("order:17/a"));
        assert_eq!(parse("\"12345\"").as_deref(), Ok("12345"));
        assert_eq!(parse("\":YWJj:\"").as_deref(), Ok(":YWJj:"));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert_eq!(parse(""), Err(KeyError::Empty));
        assert_eq!(parse("\"\""), Err(KeyError::Empty));
        assert_eq!(parse("\"open"), Err(KeyError::Malformed));
        assert_eq!(parse("\"a\"b"), Err(KeyError::Malformed));
        assert_eq!(parse(r#""bad\n""#), Err(KeyError::Malformed));
        assert_eq!(parse("\"tab\there\""), Err(KeyError::Malformed));
        assert_eq!(parse("two words"), Err(KeyError::Malformed));
        assert_eq!(parse(&"k".repeat(256)), Err(KeyError::TooLong));
        assert_eq!(parse(&"k".repeat(255)).map(|k| k.len()), Ok(255));
    }

    #[test]
    fn structured_field_items_that_are_not_strings_are_refused() {
        for value in [
            ":YWJj:",
            ":",
            "12345",
            "-7",
            "1.5",
            "?1",
            "@1659578233",
            "(\"a\")",
        ] {
            assert_eq!(parse(value), Err(KeyError::NotAString), "{value}");
        }
        for value in ["\"abc\";x=1", "abc;x=1", "\"abc\" ;x", "abc;"] {
            assert_eq!(parse(value), Err(KeyError::Parameters), "{value}");
        }
        for value in ["\"a\", \"b\"", "a,b"] {
            assert_eq!(parse(value), Err(KeyError::Multiple), "{value}");
        }
        let latin1 = HeaderValue::from_bytes(b"\"caf\xe9\"").expect("obs-text");
        assert_eq!(parse_idempotency_key(&latin1), Err(KeyError::Malformed));
    }

    #[test]
    fn two_header_lines_are_refused() {
        let mut headers = HeaderMap::new();
        headers.append(crate::IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("a"));
        headers.append(crate::IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("a"));
        assert_eq!(idempotency_key(&headers), Err(KeyError::Multiple));
    }
}

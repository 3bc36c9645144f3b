//! Reading the `Idempotency-Key` header.

use http::HeaderValue;

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
    /// token of visible ASCII characters.
    Malformed,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "the Idempotency-Key header is empty",
            Self::TooLong => "the Idempotency-Key header is longer than 255 characters",
            Self::Malformed => {
                "the Idempotency-Key header must be a quoted string (\"...\") or visible ASCII"
            }
        })
    }
}

impl std::error::Error for KeyError {}

/// Parses an `Idempotency-Key` header value.
///
/// Accepts the structured-field string form of the IETF draft (`"8e03978e"`,
/// with `\"` and `\\` escapes) and, as many clients send it, the bare form
/// (`8e03978e`). Surrounding spaces are ignored.
///
/// ```
/// use http::HeaderValue;
/// use idempotency_http::parse_idempotency_key;
///
/// assert_eq!(parse_idempotency_key(&HeaderValue::from_static("\"abc-1\""))?, "abc-1");
/// assert_eq!(parse_idempotency_key(&HeaderValue::from_static("abc-1"))?, "abc-1");
/// assert!(parse_idempotency_key(&HeaderValue::from_static("\"open")).is_err());
/// # Ok::<(), idempotency_http::KeyError>(())
/// ```
pub fn parse_idempotency_key(value: &HeaderValue) -> Result<String, KeyError> {
    let text = value
        .to_str()
        .map_err(|_| KeyError::Malformed)?
        .trim_matches(' ');
    let key = if let Some(quoted) = text.strip_prefix('"') {
        let mut key = String::with_capacity(quoted.len());
        let mut chars = quoted.chars();
        loop {
            match chars.next() {
                None => return Err(KeyError::Malformed),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some(c @ ('"' | '\\')) => key.push(c),
                    _ => return Err(KeyError::Malformed),
                },
                Some(c) if (' '..='~').contains(&c) => key.push(c),
                Some(_) => return Err(KeyError::Malformed),
            }
        }
        if chars.next().is_some() {
            return Err(KeyError::Malformed);
        }
        key
    } else {
        if !text.chars().all(|c| c.is_ascii_graphic()) {
            return Err(KeyError::Malformed);
        }
        text.to_owned()
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.chars().count() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(key)
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
    }

    #[test]
    fn bad_values_are_rejected() {
        assert_eq!(parse(""), Err(KeyError::Empty));
        assert_eq!(parse("\"\""), Err(KeyError::Empty));
        assert_eq!(parse("\"open"), Err(KeyError::Malformed));
        assert_eq!(parse("\"a\"b"), Err(KeyError::Malformed));
        assert_eq!(parse(r#""bad\n""#), Err(KeyError::Malformed));
        assert_eq!(parse("two words"), Err(KeyError::Malformed));
        assert_eq!(parse(&"k".repeat(256)), Err(KeyError::TooLong));
        assert_eq!(parse(&"k".repeat(255)).map(|k| k.len()), Ok(255));
    }
}

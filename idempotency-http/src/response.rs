//! The stored form of a response, and the problem responses the layer sends.

use axum_core::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode, response::Parts};
use serde::{Deserialize, Serialize};

/// Headers never stored or replayed: hop-by-hop headers, `Set-Cookie` (a
/// session for one client must not be handed to a retry), and the length,
/// which the server recomputes.
const NOT_STORED: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::SET_COOKIE,
    header::CONTENT_LENGTH,
];

/// `Idempotent-Replayed: true` marks every replayed response.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `Idempotent-Body-Omitted: true` marks a replay whose body was larger than
/// the layer's `max_response_body` and so was not stored.
pub const BODY_OMITTED: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// A header value as stored: its text when it is visible ASCII (the usual
/// case, readable in `redis-cli`), else its exact bytes in base64 (`obs-text`
/// such as Latin-1 is legal in HTTP/1.1 and must replay byte for byte).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum StoredValue {
    Text(String),
    Bytes { base64: String },
}

impl StoredValue {
    fn of(value: &HeaderValue) -> Self {
        match value.to_str() {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Bytes {
                base64: STANDARD.encode(value.as_bytes()),
            },
        }
    }

    fn to_value(&self) -> Option<HeaderValue> {
        match self {
            Self::Text(text) => HeaderValue::try_from(text).ok(),
            Self::Bytes { base64 } => HeaderValue::from_bytes(&STANDARD.decode(base64).ok()?).ok(),
        }
    }
}

/// A response as stored in the idempotency record's `result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    status: u16,
    headers: Vec<(String, StoredValue)>,
    /// The body: UTF-8 text as is, anything else in base64; `None` when it
    /// was larger than the limit.
    body: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    base64: bool,
}

impl StoredResponse {
    pub(crate) fn new(parts: &Parts, body: &Bytes, max_body: usize) -> Self {
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| !NOT_STORED.contains(name))
            .map(|(name, value)| (name.as_str().to_owned(), StoredValue::of(value)))
            .collect();
        let (body, base64) = if body.len() > max_body {
            (None, false)
        } else {
            match std::str::from_utf8(body) {
                Ok(text) => (Some(text.to_owned()), false),
                Err(_) => (Some(STANDARD.encode(body)), true),
            }
        };
        Self {
            status: parts.status.as_u16(),
            headers,
            body,
            base64,
        }
    }

    /// The replay: the stored status, headers and body, marked
    /// `Idempotent-Replayed: true`.
    pub(crate) fn into_replay(self) -> Response<Body> {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            if let (Ok(name), Some(value)) = (HeaderName::try_from(name), value.to_value()) {
                headers.append(name, value);
            }
        }
        headers.insert(REPLAYED, HeaderValue::from_static("true"));
        let body = match self.body {
            None => {
                headers.insert(BODY_OMITTED, HeaderValue::from_static("true"));
                headers.remove(header::CONTENT_TYPE);
                Bytes::new()
            }
            Some(text) if self.base64 => STANDARD.decode(text).map(Bytes::from).unwrap_or_default(),
            Some(text) => Bytes::from(text),
        };
        *response.body_mut() = Body::from(body);
        response
    }
}

/// An `application/problem+json` response (RFC 9457).
pub(crate) fn problem(status: StatusCode, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// A problem response with `Retry-After: seconds`.
pub(crate) fn retry_later(status: StatusCode, detail: &str, seconds: u64) -> Response<Body> {
    let mut response = problem(status, detail);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(status: u16, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Response::builder().status(status);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        builder.body(()).expect("response").into_parts().0
    }

    #[tokio::test]
    async fn replay_keeps_status_headers_and_body_but_not_cookies() {
        let p = parts(
            201,
            &[
                ("content-type", "application/json"),
                ("set-cookie", "s=1"),
                ("x-a", "1"),
                ("x-a", "2"),
                ("connection", "close"),
            ],
        );
        let stored = StoredResponse::new(&p, &Bytes::from_static(b"{\"id\":1}"), 1024);
        assert!(
            serde_json::to_string(&stored)
                .expect("json")
                .contains(r#"["content-type","application/json"]"#),
            "visible ASCII values are stored as text"
        );
        let json = serde_json::to_string(&stored).expect("json");
        let back: StoredResponse = serde_json::from_str(&json).expect("parse");
        let replay = back.into_replay();
        assert_eq!(replay.status(), 201);
        assert_eq!(replay.headers()["content-type"], "application/json");
        assert_eq!(replay.headers().get_all("x-a").iter().count(), 2);
        assert!(replay.headers().get("set-cookie").is_none());
        assert!(replay.headers().get("connection").is_none());
        assert_eq!(replay.headers()[REPLAYED], "true");
        let body = http_body_util::BodyExt::collect(replay.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"{\"id\":1}");
    }

    #[test]
    fn non_ascii_header_values_round_trip_as_bytes() {
        let mut p = parts(200, &[("x-a", "plain")]);
        let latin1 = HeaderValue::from_bytes(b"caf\xe9").expect("obs-text");
        p.headers.append("x-b", latin1.clone());
        let stored = StoredResponse::new(&p, &Bytes::new(), 1024);
        let json = serde_json::to_string(&stored).expect("json");
        let replay = serde_json::from_str::<StoredResponse>(&json)
            .expect("parse")
            .into_replay();
        assert_eq!(replay.headers()["x-a"], "plain");
        assert_eq!(replay.headers()["x-b"], latin1);
    }

    #[tokio::test]
    async fn binary_bodies_round_trip_and_oversize_bodies_are_omitted() {
        let p = parts(200, &[("content-type", "application/octet-stream")]);
        let bytes = Bytes::from_static(&[0, 159, 146, 150, 255]);
        let replay = StoredResponse::new(&p, &bytes, 1024).into_replay();
        let body = http_body_util::BodyExt::collect(replay.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, bytes);

        let replay = StoredResponse::new(&p, &bytes, 4).into_replay();
        assert_eq!(replay.status(), 200);
        assert_eq!(replay.headers()[BODY_OMITTED], "true");
        let body = http_body_util::BodyExt::collect(replay.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert!(body.is_empty());
    }
}

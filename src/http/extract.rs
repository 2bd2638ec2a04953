//! Request helpers: a body read with a hard cap (413 before it is read whole),
//! JSON parsing whose errors name the field, the `Json` extractor built from
//! both, and the bearer token.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde::de::{DeserializeOwned, MapAccess, Visitor};

use super::ApiError;

/// The largest request body a stage accepts (`http.max_body_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// The Content-Type's media type, lowercased and without parameters
/// (`text/plain; charset=utf-8` → `text/plain`); `None` without the header.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?;
    Some(ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// 415 unless the body is declared JSON (`application/json`, `…+json`) or,
/// where `ndjson` allows it, NDJSON; no `Content-Type` is taken as JSON.
/// Form and plain-text bodies are refused before they are read.
pub(crate) fn require_json(headers: &HeaderMap, ndjson: bool) -> Result<(), ApiError> {
    let Some(ct) = media_type(headers) else { return Ok(()) };
    let json = ct == "application/json" || ct.ends_with("+json");
    let nd = ct == "application/x-ndjson" || ct == "application/jsonl";
    if json || (ndjson && nd) {
        return Ok(());
    }
    let accepted = if ndjson {
        "Content-Type: application/json or application/x-ndjson"
    } else {
        "Content-Type: application/json (curl: -H 'Content-Type: application/json')"
    };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("Content-Type {ct:?} is not accepted; send {accepted}"),
    )
    .with_field("content-type"))
}

/// Reads at most `max` bytes of body; a declared or actual larger body is 413.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<axum::body::Bytes, ApiError> {
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {max} bytes"));
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else if caused_by::<tower_http::timeout::TimeoutError>(inner.as_ref()) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "request body not received in time (http.body_timeout); send it at once".to_string(),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", format!("cannot read request body: {inner}"))
        }
    })
}

/// True when `e`, or an error it wraps, is a `T`.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<T>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Parses JSON; errors name the field (`device_id`, `[3].payload`) and say why.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if path == "." || path.is_empty() { field_in_message(&message) } else { Some(path) };
        let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message);
        match field {
            Some(f) => err.with_field(f),
            None => err,
        }
    })
}

/// A `T` read from a JSON object only. serde's derive also takes a struct
/// as an array of its fields in order (`["d1", "t", {}]` as an event,
/// `[null, null]` as a registration), which no client means and the API
/// does not document: that is refused as `invalid_json`.
pub(crate) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData)).map(Object)
    }
}

/// serde names missing and unknown fields in backticks: "missing field `id`".
fn field_in_message(message: &str) -> Option<String> {
    if !(message.starts_with("missing field") || message.starts_with("unknown field")) {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// Splits a batch path like `[3].payload` into `(Some(3), "payload")`.
pub(crate) fn split_index(field: &str) -> (Option<usize>, String) {
    if let Some(rest) = field.strip_prefix('[')
        && let Some(end) = rest.find(']')
        && let Ok(i) = rest[..end].parse()
    {
        let tail = rest[end + 1..].trim_start_matches('.');
        return (Some(i), if tail.is_empty() { "events".into() } else { tail.to_string() });
    }
    (None, field.to_string())
}

/// The `Authorization: Bearer` token, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// `Authorization: Basic` credentials whose password is a device secret
/// (`crate::auth::secret`): (username, secret). A longer password is not
/// taken: tokens go in `Bearer`.
pub(crate) fn basic_secret(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, creds) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(creds.trim()).ok()?;
    let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    crate::auth::secret::is_secret(pass).then(|| (user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_paths_split_into_index_and_field() {
        assert_eq!(split_index("[3].payload"), (Some(3), "payload".into()));
        assert_eq!(split_index("[0]"), (Some(0), "events".into()));
        assert_eq!(split_index("device_id"), (None, "device_id".into()));
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: u8,
        }
        assert_eq!(parse_json::<T>(b"{}").unwrap_err().field.as_deref(), Some("a"));
        assert_eq!(parse_json::<T>(br#"{"a":1,"b":2}"#).unwrap_err().field.as_deref(), Some("b"));
        assert_eq!(parse_json::<T>(br#"{"a":"x"}"#).unwrap_err().field.as_deref(), Some("a"));
    }
}

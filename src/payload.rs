//! Payloads that are not JSON objects (issue #31): what much field firmware
//! sends (`on`, `21.5`, CSV, CBOR, Sparkplug B protobuf). A JSON object is
//! an event's payload as it is. Anything else is kept byte-exact inside one:
//!
//! - UTF-8 text (numbers and words, CSV, a JSON array or string) as
//!   `{"text": "…"}`;
//! - other bytes (and text with a NUL, which `jsonb` cannot hold) as
//!   `{"base64": "…"}` (standard alphabet, padded);
//!
//! and the event's properties say which (`"payload_format": "text"` or
//! `"base64"`). Central reads them with plain SQL (`payload->>'text'`,
//! `decode(payload->>'base64', 'base64')`), and MQTT subscribers get back
//! exactly the bytes the device sent ([`original`]).

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::value::RawValue;

/// The properties key naming how a payload was kept.
pub const FORMAT_KEY: &str = "payload_format";

/// How a device's payload is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON object: the payload itself.
    Object,
    /// UTF-8 text: `{"text": …}`.
    Text,
    /// Other bytes: `{"base64": …}`.
    Base64,
}

impl Format {
    fn name(self) -> Option<&'static str> {
        match self {
            Format::Object => None,
            Format::Text => Some("text"),
            Format::Base64 => Some("base64"),
        }
    }
}

/// The payload to store for `bytes` (a JSON object), and how it was kept.
/// A JSON object stays as it is, even one central would refuse (validation
/// then names the path): the jsonb rules hold for JSON.
pub fn keep(bytes: &[u8]) -> (Box<RawValue>, Format) {
    let wrap = |key: &str, value: &str| {
        serde_json::value::to_raw_value(&serde_json::json!({ key: value })).expect("a map of one string serializes")
    };
    match std::str::from_utf8(bytes) {
        Ok(s) if s.starts_with('{') => match RawValue::from_string(s.to_string()) {
            Ok(object) => (object, Format::Object),
            Err(_) => (wrap("text", s), Format::Text),
        },
        Ok(s) if !s.contains('\0') => (wrap("text", s), Format::Text),
        _ => (wrap("base64", &STANDARD.encode(bytes)), Format::Base64),
    }
}

/// The properties kept with an event (site log, central, streams) from
/// what its sender said: `{"content_type": …, "user_properties": [[k, v],
/// …], "gateway": …}` (a Content-Type, MQTT 5.0's content type and user
/// properties, the gateway of a child's event), or `None`.
pub(crate) fn event_properties(
    content_type: Option<&str>,
    user: &[(String, String)],
    gateway: Option<&str>,
) -> Option<String> {
    if content_type.is_none() && user.is_empty() && gateway.is_none() {
        return None;
    }
    let mut o = serde_json::Map::new();
    if let Some(g) = gateway {
        o.insert("gateway".into(), g.into());
    }
    if let Some(ct) = content_type {
        o.insert("content_type".into(), ct.into());
    }
    if !user.is_empty() {
        o.insert("user_properties".into(), serde_json::json!(user));
    }
    Some(serde_json::Value::Object(o).to_string())
}

/// A device's payload bytes as an event's: the payload, its properties with
/// the format recorded, and (when it was wrapped) the size the device sent,
/// which is what `limits.max_payload_bytes` applies to.
pub fn from_device(bytes: &[u8], properties: Option<String>) -> (Box<RawValue>, Option<String>, Option<usize>) {
    let (payload, format) = keep(bytes);
    let sent = (format != Format::Object).then_some(bytes.len());
    (payload, with_format(properties, format), sent)
}

/// `properties` (a JSON object's text, or none) with the format recorded;
/// unchanged for a JSON object.
pub fn with_format(properties: Option<String>, format: Format) -> Option<String> {
    let Some(name) = format.name() else { return properties };
    let mut o = properties
        .and_then(|p| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&p).ok())
        .unwrap_or_default();
    o.insert(FORMAT_KEY.into(), name.into());
    Some(serde_json::Value::Object(o).to_string())
}

/// The bytes the device sent, from a stored payload and its properties.
pub fn original<'a>(payload: &'a str, properties: Option<&str>) -> Cow<'a, [u8]> {
    let Some(props) = properties.filter(|p| p.contains(FORMAT_KEY)) else {
        return Cow::Borrowed(payload.as_bytes());
    };
    let format = serde_json::from_str::<serde_json::Value>(props)
        .ok()
        .and_then(|v| v.get(FORMAT_KEY).and_then(|f| f.as_str().map(str::to_string)));
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Cow::Borrowed(payload.as_bytes());
    };
    match format.as_deref() {
        Some("text") => match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => Cow::Owned(t.as_bytes().to_vec()),
            None => Cow::Borrowed(payload.as_bytes()),
        },
        Some("base64") => match v.get("base64").and_then(|b| b.as_str()).and_then(|b| STANDARD.decode(b).ok()) {
            Some(bytes) => Cow::Owned(bytes),
            None => Cow::Borrowed(payload.as_bytes()),
        },
        _ => Cow::Borrowed(payload.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_payload_comes_back_byte_exact() {
        let cbor = [0xa2, 0x61, 0x74, 0xf9, 0x4d, 0x60, 0x61, 0x6f, 0xf5]; // {"t": 21.5, "o": true}
        let cases: [(&[u8], Format); 9] = [
            (br#"{"t": 21.5}"#, Format::Object),
            (b" {\"a\":[1,2]}", Format::Text), // kept exactly, leading space and all
            (b"on", Format::Text),
            (b"21.5", Format::Text),
            (b"[1, 2, 3]", Format::Text),
            (b"t;21.5\nh;40\n", Format::Text),
            (b"{broken", Format::Text),
            (b"nul\0inside", Format::Base64),
            (&cbor, Format::Base64),
        ];
        for (bytes, want) in cases {
            let (payload, format) = keep(bytes);
            let payload = payload.get();
            assert_eq!(format, want, "{bytes:?}");
            assert!(payload.starts_with('{'), "always a JSON object: {payload}");
            let props = with_format(None, format);
            assert_eq!(&*original(payload, props.as_deref()), bytes, "{payload}");
        }
        assert_eq!(keep(b"on").0.get(), r#"{"text":"on"}"#);
        assert_eq!(keep(&[0xff, 0x00]).0.get(), r#"{"base64":"/wA="}"#);
    }

    #[test]
    fn the_format_joins_what_properties_there_are() {
        let props = with_format(Some(r#"{"content_type":"application/cbor"}"#.into()), Format::Base64).unwrap();
        let v: serde_json::Value = serde_json::from_str(&props).unwrap();
        assert_eq!(v["content_type"], "application/cbor");
        assert_eq!(v[FORMAT_KEY], "base64");
        assert_eq!(with_format(None, Format::Object), None);
        // An object payload is given back as stored, properties or not.
        assert_eq!(&*original(r#"{"text":"x"}"#, Some(r#"{"content_type":"a"}"#)), br#"{"text":"x"}"#);
    }
}

//! The `Event` every stage passes on, its wire form, and the validation that
//! turns one into the other. Validation is pure: a rejected input names the
//! field and the limit and has touched nothing.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Longest device id.
pub const MAX_DEVICE_ID: usize = 255;
/// Longest event type.
pub const MAX_EVENT_TYPE: usize = 100;

/// An accepted event, ready for the site log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub tenant: String,
    pub device_id: String,
    pub event_type: String,
    /// The payload: a JSON object, as text.
    pub payload: String,
    /// Device timestamp (or ingest time when the device gave none), µs since epoch.
    pub timestamp_us: i64,
    /// When this site (or the origin site) accepted it, µs since epoch.
    pub received_at_us: i64,
    /// The site that accepted it from the device.
    pub origin_site: String,
    /// MQTT 5.0 content type and user properties, as a JSON object
    /// (`{"content_type": …, "user_properties": [[k, v], …]}`), if any.
    pub properties: Option<String>,
}

/// FNV-1a, 64 bit: the payload digest of redelivery detection (stable
/// across versions: it is stored).
pub fn fnv1a64(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// Bytes a row costs in the log beyond its text columns (ids, seq,
/// timestamps, index entries): the one row-size formula, used by the
/// writer's byte caps, the forwarder's batches and the backlog gauge.
pub const ROW_OVERHEAD: usize = 96;

/// Approximate bytes of a log row with these text columns.
pub fn row_bytes(tenant: &str, device_id: &str, event_type: &str, payload: &str) -> usize {
    tenant.len() + device_id.len() + event_type.len() + payload.len() + ROW_OVERHEAD
}

impl Event {
    /// Approximate bytes the event occupies in the log; used for byte caps.
    pub fn size_hint(&self) -> usize {
        row_bytes(&self.tenant, &self.device_id, &self.event_type, &self.payload)
    }
}

/// An event as a device sends it over HTTP or WebSocket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    pub device_id: String,
    pub event_type: String,
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Set by the MQTT front-end (5.0 properties), never read from JSON.
    #[serde(skip)]
    pub properties: Option<String>,
    /// For a payload that was not a JSON object and is kept wrapped in one
    /// (`crate::payload`): the bytes the device sent, which is what
    /// `max_payload_bytes` applies to. Never read from JSON.
    #[serde(skip)]
    pub sent_bytes: Option<usize>,
}

/// An event as stored in the site log and returned by queries.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: Uuid,
    pub tenant: String,
    pub device_id: String,
    pub event_type: String,
    pub payload: Box<RawValue>,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub forwarded_at: Option<OffsetDateTime>,
    pub origin_site: String,
    /// MQTT 5.0 content type and user properties, when the device sent
    /// any; the gateway that published a child's event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Box<RawValue>>,
}

/// A validation failure: which field, and what limit it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, or the JSON path inside the payload (`payload.a[2]`).
    pub field: std::borrow::Cow<'static, str>,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), message: message.into() }
}

/// Limits applied by [`validate`].
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_payload_bytes: usize,
    pub max_payload_depth: usize,
    /// How far ahead of its receipt an event's timestamp may be…
    pub max_future_skew: std::time::Duration,
    /// …and how far behind.
    pub max_event_age: std::time::Duration,
}

/// Checks `input` against the limits and builds the event to store.
/// `now_us` is the ingest time; ids the device left out become UUIDv7.
pub fn validate(
    input: EventInput,
    tenant: &str,
    origin_site: &str,
    limits: InputLimits,
    now_us: i64,
) -> Result<Event, Invalid> {
    validate_device_id(&input.device_id)?;
    validate_event_type(&input.event_type)?;
    let payload = input.payload.get();
    let size = input.sent_bytes.unwrap_or(payload.len());
    if size > limits.max_payload_bytes {
        return Err(invalid(
            "payload",
            format!("{size} bytes exceeds the limit of {} bytes", limits.max_payload_bytes),
        ));
    }
    if !payload.starts_with('{') {
        return Err(invalid("payload", "must be a JSON object"));
    }
    let depth = json_depth(payload);
    if depth > limits.max_payload_depth {
        return Err(invalid(
            "payload",
            format!("nesting depth {depth} exceeds the limit of {}", limits.max_payload_depth),
        ));
    }
    if let Some((path, why)) = jsonb_refusal(payload) {
        return Err(Invalid { field: path.into(), message: why.into() });
    }
    let id = match input.id.as_deref() {
        Some(s) => Uuid::parse_str(s).map_err(|_| invalid("id", "must be a UUID"))?,
        None => Uuid::now_v7(),
    };
    if id.is_nil() {
        return Err(invalid("id", "must not be the nil UUID"));
    }
    let timestamp_us = match input.timestamp.as_deref() {
        Some(s) => {
            let t = parse_rfc3339_us(s)
                .ok_or_else(|| invalid("timestamp", "must be an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z"))?;
            check_event_time(t, now_us, limits)?;
            t
        }
        None => now_us,
    };
    Ok(Event {
        id,
        tenant: tenant.to_string(),
        device_id: input.device_id,
        event_type: input.event_type,
        payload: payload.to_string(),
        timestamp_us,
        received_at_us: now_us,
        origin_site: origin_site.to_string(),
        properties: input.properties,
    })
}

/// An event's time within `limits.max_future_skew` ahead of `now_us` and
/// `limits.max_event_age` behind it.
fn check_event_time(t: i64, now_us: i64, limits: InputLimits) -> Result<(), Invalid> {
    let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    let human = |d: std::time::Duration| humantime::format_duration(d).to_string();
    if t > now_us.saturating_add(micros(limits.max_future_skew)) {
        return Err(invalid(
            "timestamp",
            format!(
                "is more than limits.max_future_skew = {} ahead of the receive time {}",
                human(limits.max_future_skew),
                format_us(now_us)
            ),
        ));
    }
    if t < now_us.saturating_sub(micros(limits.max_event_age)) {
        return Err(invalid(
            "timestamp",
            format!(
                "is more than limits.max_event_age = {} before the receive time {}",
                human(limits.max_event_age),
                format_us(now_us)
            ),
        ));
    }
    Ok(())
}

fn format_us(us: i64) -> String {
    from_us(us).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// `event_type`: 1..=100 characters of `[A-Za-z0-9_.-]`.
pub fn validate_event_type(t: &str) -> Result<(), Invalid> {
    if t.is_empty() {
        return Err(invalid("event_type", "must not be empty"));
    }
    if t.len() > MAX_EVENT_TYPE {
        return Err(invalid("event_type", format!("longer than {MAX_EVENT_TYPE} characters")));
    }
    if !t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(invalid("event_type", "may contain only [A-Za-z0-9_.-]"));
    }
    Ok(())
}

/// Device ids appear in MQTT topics and client ids, so they are 1–255
/// characters of `[A-Za-z0-9_.:-]` (no `/`, `+`, `#` or spaces). The one
/// device-id rule: ingest, registration and the CLI all use it.
pub fn validate_device_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID {
        return Err(invalid("device_id", format!("must be 1-{MAX_DEVICE_ID} characters")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':')) {
        return Err(invalid("device_id", "may contain only [A-Za-z0-9_.:-]"));
    }
    Ok(())
}

/// A device id for a device registered without one: `dev-` and 12 hex digits.
pub fn new_device_id() -> String {
    format!("dev-{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A tenant name, validated once: `^[a-z][a-z0-9_]{0,40}$`. Tenant names
/// become SQL identifiers (`tenant_<t>`) and topic prefixes, so nothing
/// reaches those without passing through [`Tenant::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// Checks `t` against the pattern.
    pub fn parse(t: &str) -> Result<Self, Invalid> {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 41
            && b[0].is_ascii_lowercase()
            && b[1..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
        if ok { Ok(Self(t.to_string())) } else { Err(invalid("tenant", "tenant must match ^[a-z][a-z0-9_]{0,40}$")) }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Tenant {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stream or query cursor (`after=`, `Last-Event-ID`): a seq ≥ 0.
pub fn parse_cursor(v: &str) -> Result<i64, Invalid> {
    v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| invalid("after", "must be a seq (an integer ≥ 0)"))
}

/// Largest decimal exponent of a number PostgreSQL's `numeric` (and so
/// `jsonb`) stores: up to 131072 digits before the point…
const JSONB_MAX_EXP: i64 = 131_071;
/// …and 16383 after it.
const JSONB_MIN_EXP: i64 = -16_383;

/// The first thing in already-valid JSON text that the central `jsonb`
/// column would refuse, as (JSON path, why): `\u0000` in a string or key, a
/// lone UTF-16 surrogate escape, a number outside `numeric`'s range. An ack
/// means the event will reach central, so these are refused at ingest.
pub fn jsonb_refusal(text: &str) -> Option<(String, &'static str)> {
    enum Frame<'a> {
        Obj(Option<&'a str>),
        Arr(usize),
    }
    let path = |stack: &[Frame<'_>]| {
        let mut p = String::from("payload");
        for f in stack {
            match f {
                Frame::Obj(Some(k)) => {
                    p.push('.');
                    p.push_str(k);
                }
                Frame::Obj(None) => {}
                Frame::Arr(i) => p.push_str(&format!("[{i}]")),
            }
        }
        p
    };
    let b = text.as_bytes();
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' => stack.push(Frame::Obj(None)),
            b'[' => stack.push(Frame::Arr(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Arr(n)) => *n += 1,
                Some(Frame::Obj(k)) => *k = None,
                None => {}
            },
            b'"' => {
                let end = string_end(b, i);
                let is_key = matches!(stack.last(), Some(Frame::Obj(None)));
                if let Some(Frame::Obj(k)) = stack.last_mut()
                    && is_key
                {
                    *k = Some(&text[i + 1..end]);
                }
                if let Some(why) = bad_escape(&b[i + 1..end]) {
                    return Some((path(&stack), why));
                }
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let end = i + b[i..]
                    .iter()
                    .take_while(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .count();
                if !number_in_range(&text[i..end]) {
                    return Some((path(&stack), "number outside the range the central database stores"));
                }
                i = end - 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Index of the closing quote of the string opening at `start`.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// `\u0000` or a lone surrogate among a string's escapes.
fn bad_escape(s: &[u8]) -> Option<&'static str> {
    let hex = |at: usize| -> Option<u32> {
        let h = s.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' {
            i += 1;
            continue;
        }
        if s.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let code = hex(i + 2)?;
        match code {
            0 => return Some("\\u0000 is not allowed in strings (the central database refuses it)"),
            0xD800..=0xDBFF => {
                let low = (s.get(i + 6..i + 8) == Some(b"\\u")).then(|| hex(i + 8)).flatten();
                if !low.is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) {
                    return Some("lone UTF-16 surrogate escape (the central database refuses it)");
                }
                i += 12;
            }
            0xDC00..=0xDFFF => return Some("lone UTF-16 surrogate escape (the central database refuses it)"),
            _ => i += 6,
        }
    }
    None
}

/// Whether a JSON number fits PostgreSQL's `numeric`.
fn number_in_range(n: &str) -> bool {
    let n = n.strip_prefix('-').unwrap_or(n);
    let (mantissa, exp) = match n.find(['e', 'E']) {
        Some(at) => {
            let digits = &n[at + 1..];
            let (neg, digits) = match digits.as_bytes().first() {
                Some(b'-') => (true, &digits[1..]),
                Some(b'+') => (false, &digits[1..]),
                _ => (false, digits),
            };
            // Saturating: the exponent itself may have thousands of digits.
            let e = digits.bytes().fold(0i64, |e, d| e.saturating_mul(10).saturating_add(i64::from(d - b'0')));
            (&n[..at], if neg { -e } else { e })
        }
        None => (n, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let int_sig = int.trim_start_matches('0');
    let frac_lead = frac.len() - frac.trim_start_matches('0').len();
    if int_sig.is_empty() && frac_lead == frac.len() {
        return true; // zero
    }
    // Exponent of the most and least significant digits.
    let top = if int_sig.is_empty() { -(frac_lead as i64) - 1 } else { int_sig.len() as i64 - 1 };
    let bottom = -(frac.len() as i64);
    top.saturating_add(exp) <= JSONB_MAX_EXP && bottom.saturating_add(exp) >= JSONB_MIN_EXP
}

/// Nesting depth of already-valid JSON text, counted without allocating.
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses RFC 3339 into µs since the epoch.
pub fn parse_rfc3339_us(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339).ok().map(to_us)
}

/// A date-time → µs since the epoch (saturating): the one conversion.
pub fn to_us(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(if t.year() < 1970 { i64::MIN } else { i64::MAX })
}

/// µs since the epoch → UTC date-time (clamped to the representable range).
pub fn from_us(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Now, µs since the epoch.
pub fn now_us() -> i64 {
    to_us(OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        max_payload_bytes: 64,
        max_payload_depth: 3,
        max_future_skew: std::time::Duration::from_secs(3600),
        max_event_age: std::time::Duration::from_secs(30 * 86_400),
    };

    fn input(json: &str) -> EventInput {
        serde_json::from_str(json).unwrap()
    }

    fn check(json: &str) -> Result<Event, Invalid> {
        validate(input(json), "acme", "site-a", LIMITS, 1_000)
    }

    #[test]
    fn valid_event_gets_v7_id_and_ingest_time() {
        let e = check(r#"{"device_id":"d1","event_type":"temp.read","payload":{"c":1}}"#).unwrap();
        assert_eq!(e.id.get_version_num(), 7);
        assert_eq!(e.timestamp_us, 1_000);
        assert_eq!(e.payload, r#"{"c":1}"#);
    }

    #[test]
    fn each_field_is_named_in_its_rejection() {
        let long_dev = "d".repeat(256);
        let cases = [
            (format!(r#"{{"device_id":"{long_dev}","event_type":"a","payload":{{}}}}"#), "device_id"),
            (r#"{"device_id":"d","event_type":"a b","payload":{}}"#.into(), "event_type"),
            (format!(r#"{{"device_id":"d","event_type":"{}","payload":{{}}}}"#, "e".repeat(101)), "event_type"),
            (r#"{"device_id":"d","event_type":"a","payload":[1]}"#.into(), "payload"),
            (r#"{"device_id":"d","event_type":"a","payload":{"a":{"b":{"c":{}}}}}"#.into(), "payload"),
            (format!(r#"{{"device_id":"d","event_type":"a","payload":{{"x":"{}"}}}}"#, "x".repeat(64)), "payload"),
            (r#"{"device_id":"d","event_type":"a","payload":{},"id":"nope"}"#.into(), "id"),
            (r#"{"device_id":"d","event_type":"a","payload":{},"timestamp":"yesterday"}"#.into(), "timestamp"),
        ];
        for (json, field) in cases {
            let err = check(&json).unwrap_err();
            assert_eq!(err.field, field, "{json} -> {err}");
        }
    }

    #[test]
    fn what_central_jsonb_refuses_is_refused_naming_its_path() {
        let refused = |p: &str| jsonb_refusal(p).map(|(path, _)| path);
        assert_eq!(refused(r#"{"a":"x\u0000y"}"#).as_deref(), Some("payload.a"));
        assert_eq!(refused(r#"{"a":{"b":["ok","\ud800"]}}"#).as_deref(), Some("payload.a.b[1]"));
        assert_eq!(refused(r#"{"a":"\udc00"}"#).as_deref(), Some("payload.a"));
        assert_eq!(refused(r#"{"n":1e400000}"#).as_deref(), Some("payload.n"));
        assert_eq!(refused(r#"{"n":-1e400000}"#).as_deref(), Some("payload.n"));
        assert_eq!(refused(r#"{"n":1e-400000}"#).as_deref(), Some("payload.n"));
        assert_eq!(refused(r#"{"n":1e99999999999999999999999}"#).as_deref(), Some("payload.n"));
        assert_eq!(refused(r#"{"k\u0000":1}"#).as_deref(), Some("payload.k\\u0000"), "keys too");
        for ok in [
            r#"{"a":"\ud83d\ude00","b":"\u00e9","c":"\\u0000"}"#,
            r#"{"n":[0,-0.0,1e131071,1.5e-16382,0e999999999,123456789.125,-7]}"#,
            r#"{"s":"1e400000","t":"[{\"x\":1}]"}"#,
        ] {
            assert_eq!(refused(ok), None, "{ok}");
        }
    }

    #[test]
    fn depth_ignores_brackets_inside_strings() {
        assert_eq!(json_depth(r#"{"a":"{{{[[["}"#), 1);
        assert_eq!(json_depth(r#"{"a":"\"{","b":[{}]}"#), 3);
    }

    #[test]
    fn tenant_names_follow_the_pattern() {
        let valid = |t: &str| Tenant::parse(t).is_ok();
        assert!(valid("acme"));
        assert!(valid("a1_b"));
        assert!(!valid("Acme"));
        assert!(!valid("1acme"));
        assert!(!valid("acme;drop"));
        assert!(!valid(&"a".repeat(42)));
        assert!(valid(&"a".repeat(41)));
    }

    #[test]
    fn device_ids_are_topic_safe() {
        assert!(validate_device_id("pump-1.a:b_c").is_ok());
        for bad in ["", "a b", "a/b", "a+b", "a#b", "é", &"d".repeat(256)] {
            assert_eq!(validate_device_id(bad).unwrap_err().field, "device_id", "{bad:?}");
        }
        assert!(validate_device_id(&new_device_id()).is_ok());
    }

    #[test]
    fn cursors_are_non_negative_integers() {
        assert_eq!(parse_cursor("42"), Ok(42));
        assert!(parse_cursor("-1").is_err());
        assert!(parse_cursor("x").is_err());
    }

    #[test]
    fn timestamps_round_trip_through_microseconds() {
        let us = parse_rfc3339_us("2026-01-31T12:00:00.123456+01:00").unwrap();
        assert_eq!(from_us(us).format(&Rfc3339).unwrap(), "2026-01-31T11:00:00.123456Z");
    }
}

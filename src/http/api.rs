//! Query, device administration, health, metrics and status handlers.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::{bearer, parse_json, read_body};
use super::{ApiError, AppState, check_tenant};
use crate::auth::Perm;
use crate::event::{StoredEvent, now_us, parse_rfc3339_us, validate_event_type};
use crate::forward::{Uplink, UplinkSnapshot};
use crate::log::schema::{self, Device, LogStatus};

/// Default and largest page of `GET …/events`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// A page of events and the cursor to continue from.
#[derive(Serialize)]
pub struct EventsPage {
    pub events: Vec<StoredEvent>,
    /// Pass as `after=` to continue; equals the request's `after` when empty.
    pub next: i64,
    /// True when the page was full, so more may follow at once.
    pub has_more: bool,
}

/// `GET …/events?device_id&event_type&start_time&end_time&after&limit`.
pub async fn query_events(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<EventsPage>, ApiError> {
    check_tenant(&tenant)?;
    state.auth.authorize(bearer(&headers), &tenant, Perm::ReadEvents)?;
    const KNOWN: [&str; 6] = ["device_id", "event_type", "start_time", "end_time", "after", "limit"];
    if let Some(k) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_field(k.clone(), format!("unknown query parameter; known: {}", KNOWN.join(", "))));
    }
    let time = |k: &str| -> Result<Option<i64>, ApiError> {
        params
            .get(k)
            .map(|v| parse_rfc3339_us(v).ok_or_else(|| ApiError::bad_field(k, "must be an RFC 3339 date-time")))
            .transpose()
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_field("limit", format!("must be an integer 1..={MAX_LIMIT}")));
            }
        },
    };
    let after = match params.get("after") {
        None => 0,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(ApiError::bad_field("after", "must be a non-negative integer (a seq)"));
            }
        },
    };
    if let Some(t) = params.get("event_type") {
        validate_event_type(t).map_err(|e| ApiError::bad_field(e.field, e.message))?;
    }
    let q = schema::Query {
        tenant,
        device_id: params.get("device_id").cloned(),
        event_type: params.get("event_type").cloned(),
        start_us: time("start_time")?,
        end_us: time("end_time")?,
        after,
        limit,
    };
    let events = state.readers.with(move |c| schema::query(c, &q)).await?;
    let next = events.last().map_or(after, |e| e.seq);
    let has_more = events.len() == limit;
    Ok(Json(EventsPage { events, next, has_more }))
}

/// Body of `POST …/device/register`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub perms: Option<Vec<String>>,
    /// Token lifetime, e.g. "30d".
    #[serde(default)]
    pub ttl: Option<String>,
}

/// Answer of `POST …/device/register`: the device and its token (shown once).
#[derive(Serialize)]
pub struct Registered {
    pub device: Device,
    pub token: String,
}

/// Device ids appear in MQTT topics, so they exclude `/`, `+`, `#` and spaces.
pub fn check_device_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > crate::event::MAX_DEVICE_ID {
        return Err(ApiError::bad_field("device_id", "must be 1-255 characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':')) {
        return Err(ApiError::bad_field("device_id", "may contain only [A-Za-z0-9_.:-]"));
    }
    Ok(())
}

/// Parses permission names, naming the first unknown one.
pub fn parse_perms(perms: &[String]) -> Result<Vec<Perm>, ApiError> {
    perms
        .iter()
        .map(|p| {
            Perm::parse(p).ok_or_else(|| {
                ApiError::bad_field(
                    "perms",
                    format!("unknown permission {p:?}; known: write_events, read_events, read_config"),
                )
            })
        })
        .collect()
}

/// `POST …/device/register` (admin): registers a device, returns its token once.
pub async fn register_device(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    check_tenant(&tenant)?;
    state.auth.authorize_admin(bearer(&headers))?;
    let bytes = read_body(&headers, body, 64 * 1024).await?;
    let req: RegisterRequest =
        if bytes.iter().all(u8::is_ascii_whitespace) { parse_json(b"{}")? } else { parse_json(&bytes)? };
    let device_id =
        req.device_id.unwrap_or_else(|| format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    check_device_id(&device_id)?;
    if req.name.as_ref().is_some_and(|n| n.len() > 255) {
        return Err(ApiError::bad_field("name", "must be at most 255 characters"));
    }
    let perms = match &req.perms {
        Some(p) => parse_perms(p)?,
        None => Perm::DEFAULT.to_vec(),
    };
    let ttl = req.ttl.as_deref().map(|t| parse_ttl(t).map_err(|m| ApiError::bad_field("ttl", m))).transpose()?;
    let device = state.log.add_device(tenant.clone(), device_id.clone(), req.name).await?;
    state.auth.registry().set(&tenant, &device_id, false);
    let token = state.auth.issue_device(&tenant, &device_id, &perms, ttl)?;
    tracing::info!(tenant, device_id, "device registered");
    Ok((StatusCode::CREATED, Json(Registered { device, token })))
}

/// Parses a token lifetime like "30d" or "12h" (at least one minute).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30d or 12h: {e}"))?;
    if d < Duration::from_secs(60) {
        return Err(format!("{s:?} is shorter than 1m"));
    }
    Ok(d)
}

/// `DELETE …/device/{device_id}` (admin): revokes at once.
pub async fn revoke_device(
    State(state): State<AppState>,
    Path((tenant, device_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Device>, ApiError> {
    check_tenant(&tenant)?;
    state.auth.authorize_admin(bearer(&headers))?;
    let device = state.log.revoke_device(tenant.clone(), device_id.clone()).await?;
    state.auth.registry().set(&tenant, &device_id, true);
    tracing::info!(tenant, device_id, "device revoked");
    Ok(Json(device))
}

/// `GET …/devices` (admin): registry with last_seen and event counts.
pub async fn list_devices(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_tenant(&tenant)?;
    state.auth.authorize_admin(bearer(&headers))?;
    let devices = state.readers.with(move |c| schema::devices(c, Some(&tenant))).await?;
    Ok(Json(serde_json::json!({ "devices": devices })))
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the site log writer answers within 2 s.
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), state.log.ping()).await {
        Ok(Ok(())) => Ok("ready\n"),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("site log: {e}"))),
        Err(_) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "site log writer did not answer in 2s"))
        }
    }
}

/// The status document of `/api/v1/status` and `outpost status`.
#[derive(Serialize)]
pub struct Status {
    pub site_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub log: LogStatus,
    pub uplink: UplinkSnapshot,
    /// Backlog divided by the drain rate; `None` while nothing drains.
    pub drain_eta_seconds: Option<f64>,
}

/// How long a computed log status is reused: its counts scan the log, and
/// scrapes, status pages and CLI calls must not steal the cores ingest needs.
const STATUS_TTL: Duration = Duration::from_secs(2);

async fn current_status(state: &AppState) -> Result<Status, ApiError> {
    let cached = state
        .status_cache
        .lock()
        .ok()
        .and_then(|c| c.as_ref().filter(|(t, _)| t.elapsed() < STATUS_TTL).map(|(_, s)| s.clone()));
    let log = match cached {
        Some(s) => s,
        None => {
            let s = state.readers.with(|c| schema::status(c, now_us())).await?;
            if let Ok(mut c) = state.status_cache.lock() {
                *c = Some((std::time::Instant::now(), s.clone()));
            }
            s
        }
    };
    state.metrics.backlog_rows.set(log.backlog_rows);
    state.metrics.oldest_pending_seconds.set(log.oldest_pending_age_seconds.unwrap_or(0.0));
    state.metrics.log_bytes.set(i64::try_from(log.log_bytes).unwrap_or(i64::MAX));
    state.metrics.backlog_bytes.set(log.backlog_bytes);
    state.metrics.dead_letter_rows.set(log.dead_letters);
    let uplink = state.forward.snapshot();
    let rate = uplink.forwarded_rows_per_second;
    let drain_eta_seconds = (rate > 0.0).then(|| log.backlog_rows as f64 / rate);
    state.metrics.forward_rate.set(rate);
    state.metrics.drain_eta_seconds.set(drain_eta_seconds.unwrap_or(0.0));
    Ok(Status {
        site_id: state.site_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        log,
        uplink,
        drain_eta_seconds,
    })
}

/// `GET /api/v1/status`.
pub async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    Ok(Json(current_status(&state).await?))
}

/// `GET /metrics`: Prometheus text; gauges refreshed at scrape.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    current_status(&state).await?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response())
}

/// `GET /`: a small status page for the installer on site.
pub async fn index(State(state): State<AppState>) -> Result<Html<String>, ApiError> {
    let s = current_status(&state).await?;
    let age = s.log.oldest_pending_age_seconds.map_or("—".to_string(), |a| format!("{a:.0} s"));
    let central = match s.uplink.state {
        Uplink::Disabled => "not configured (buffering only)".to_string(),
        Uplink::Up => format!(
            "up, {:.0} rows/s{}",
            s.uplink.forwarded_rows_per_second,
            s.drain_eta_seconds.map_or(String::new(), |e| format!(", backlog drained in ~{e:.0} s"))
        ),
        Uplink::Connecting => "connecting".to_string(),
        Uplink::Down => format!("DOWN: {}", s.uplink.last_error.as_deref().unwrap_or("unknown error")),
    };
    let esc = |v: &str| v.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    Ok(Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>outpost {site}</title><style>body{{font:16px system-ui;margin:2em}}td{{padding:.2em 1em}}</style></head>\
         <body><h1>outpost · {site}</h1><table>\
         <tr><td>version</td><td>{ver}</td></tr><tr><td>uptime</td><td>{up} s</td></tr>\
         <tr><td>events in log</td><td>{total}</td></tr><tr><td>waiting to forward</td><td>{backlog}</td></tr>\
         <tr><td>oldest waiting</td><td>{age}</td></tr><tr><td>dead letters</td><td>{dead}</td></tr><tr><td>devices</td><td>{dev} ({rev} revoked)</td></tr>\
         <tr><td>log size</td><td>{mb:.1} MiB</td></tr><tr><td>central database</td><td>{central}</td></tr>\
         </table><p><a href=/metrics>metrics</a> · <a href=/api/v1/status>status JSON</a> · <a href=/readyz>readiness</a></p></body></html>",
        site = esc(&s.site_id),
        ver = s.version,
        up = s.uptime_seconds,
        total = s.log.total_rows,
        backlog = s.log.backlog_rows,
        dead = s.log.dead_letters,
        dev = s.log.devices,
        rev = s.log.devices_revoked,
        mb = s.log.log_bytes as f64 / 1048576.0,
        central = esc(&central),
    )))
}

/// Unknown paths get the same JSON error shape.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

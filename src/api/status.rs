//! Operations: liveness, readiness, Prometheus metrics, the status document
//! and the status page for the installer on site. No token needed.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

use super::ApiState;
use crate::event::now_us;
use crate::forward::{Uplink, UplinkSnapshot};
use crate::http::ApiError;
use crate::log::schema::{self, LogStatus};

/// `GET /healthz`: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the site log writer answers within 2 s.
async fn readyz(State(state): State<ApiState>) -> Result<&'static str, ApiError> {
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

async fn current_status(state: &ApiState) -> Result<Status, ApiError> {
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
    let uplink = state.uplink.snapshot();
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
async fn status(State(state): State<ApiState>) -> Result<Json<Status>, ApiError> {
    Ok(Json(current_status(&state).await?))
}

/// `GET /metrics`: Prometheus text; gauges refreshed at scrape.
async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    current_status(&state).await?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response())
}

/// `GET /`: a small status page for the installer on site.
async fn index(State(state): State<ApiState>) -> Result<Html<String>, ApiError> {
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

/// `/`, `/healthz`, `/readyz`, `/metrics`, `/api/v1/status`.
pub(super) fn routes() -> axum::Router<ApiState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
}

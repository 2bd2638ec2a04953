//! Operations: liveness, readiness, Prometheus metrics and the status
//! document. `/api/v1/status` and `/metrics` need no token unless
//! `http.status_token_file` is set (see `status_page::guard`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ApiState;
use super::sampler::{IngestRates, PROTOCOLS, Reading};
use crate::event::now_us;
use crate::forward::{Uplink, UplinkSnapshot};
use crate::http::ApiError;
use crate::log::schema::{self, LogStatus};
use crate::metrics::ProtocolLabel;

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
pub(crate) struct Status {
    pub site_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub log: LogStatus,
    pub uplink: UplinkSnapshot,
    /// Backlog divided by the drain rate; `None` while nothing drains.
    pub drain_eta_seconds: Option<f64>,
    /// No `central.url`: the backlog is not waiting for anything, it is kept.
    pub buffering_only: bool,
    /// Events accepted per second by protocol over the last minute.
    pub ingest: IngestRates,
    pub disk: Disk,
    /// Registered devices, most recently seen first (at most [`DEVICES_SHOWN`]).
    pub devices: Vec<DeviceView>,
    /// What each tenant holds of the shared pools now (tenants holding
    /// nothing are left out).
    pub tenants: Vec<TenantUse>,
}

/// One tenant's use of the pools its devices draw from.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TenantUse {
    pub tenant: String,
    /// Open MQTT connections (`mqtt.max_connections_per_tenant`).
    pub mqtt_connections: usize,
    /// Open stream subscribers: WebSocket, SSE, long-poll
    /// (`stream.max_subscribers_per_tenant`).
    pub stream_subscribers: usize,
}

/// Reads the tenants' use of the pools (composed where the pools are).
pub(crate) type TenantUsage = std::sync::Arc<dyn Fn() -> Vec<TenantUse> + Send + Sync>;

/// Storage figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Disk {
    pub log_bytes: u64,
    /// `log.max_bytes`: at this size new events are refused (503).
    pub log_max_bytes: u64,
    /// Free space of the data dir's filesystem (`None` if statvfs failed).
    pub data_dir_free_bytes: Option<u64>,
    pub data_dir_total_bytes: Option<u64>,
    /// Bytes this process wrote to storage per day at the rate of the last
    /// minute (`/proc/self/io`); `None` where the kernel does not say.
    pub write_bytes_per_day: Option<f64>,
    /// Bytes written to storage per event written to the log over the last
    /// minute; `None` when no event was written in it.
    pub write_bytes_per_event: Option<f64>,
    /// `log.write_budget`: bytes per day the writer keeps within; `None`
    /// without a budget.
    pub write_budget_bytes_per_day: Option<u64>,
    /// Days until the storage's rated endurance (`disk.endurance_tbw`) is
    /// written at the present write rate; `None` when either is unknown.
    pub endurance_days: Option<f64>,
}

/// A device as the status page shows it (no token, no counts of others).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub tenant: String,
    pub device_id: String,
    pub name: Option<String>,
    pub online: bool,
    pub revoked: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<time::OffsetDateTime>,
}

/// Devices listed at most; the count in `log.devices` is always complete.
pub(crate) const DEVICES_SHOWN: usize = 1000;

/// What the log queries return, cached for [`STATUS_TTL`].
pub(crate) type Cached = (Instant, LogStatus, Arc<Vec<DeviceView>>);

/// How long a computed log status is reused: its counts scan the log, and
/// scrapes, status pages and CLI calls must not steal the cores ingest needs.
const STATUS_TTL: Duration = Duration::from_secs(2);

fn device_views(mut all: Vec<schema::Device>) -> Vec<DeviceView> {
    all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.device_id.cmp(&b.device_id)));
    all.into_iter()
        .take(DEVICES_SHOWN)
        .map(|d| DeviceView {
            online: d.online && d.revoked_at.is_none(),
            revoked: d.revoked_at.is_some(),
            tenant: d.tenant,
            device_id: d.device_id,
            name: d.name,
            last_seen: d.last_seen,
        })
        .collect()
}

/// The log's status: gauges the writer keeps (no scan), plus cheap
/// queries, cached for [`STATUS_TTL`] and refreshed by one request at a
/// time however many scrape at once.
async fn log_status(state: &ApiState) -> Result<(LogStatus, Arc<Vec<DeviceView>>), ApiError> {
    let mut cache = state.status_cache.lock().await;
    if let Some((t, s, d)) = cache.as_ref()
        && t.elapsed() < STATUS_TTL
    {
        return Ok((s.clone(), d.clone()));
    }
    // The counters still in memory are added to the table's; a flush
    // between the read and the overlay makes it read again.
    let mut tries = 0;
    let (s, devices) = loop {
        let flushes = state.log.device_flushes();
        let counted = state.log.counters();
        let (s, mut devices) = state
            .readers
            .with(move |c| Ok((schema::status_from(c, counted, now_us())?, schema::devices(c, None)?)))
            .await?;
        tries += 1;
        if state.log.overlay_devices(&mut devices, flushes) || tries == 5 {
            break (s, devices);
        }
    };
    let devices = Arc::new(device_views(devices));
    *cache = Some((Instant::now(), s.clone(), devices.clone()));
    Ok((s, devices))
}

/// The status document; also refreshes the gauges `/metrics` reports.
pub(super) async fn current_status(state: &ApiState) -> Result<Status, ApiError> {
    let (log, devices) = log_status(state).await?;
    state.metrics.backlog_rows.set(log.backlog_rows);
    state.metrics.oldest_pending_seconds.set(log.oldest_pending_age_seconds.unwrap_or(0.0));
    state.metrics.log_bytes.set(i64::try_from(log.log_bytes).unwrap_or(i64::MAX));
    state.metrics.backlog_bytes.set(log.backlog_bytes);
    state.metrics.dead_letter_rows.set(log.dead_letters);
    let uplink = state.uplink.snapshot();
    // The gauge shows the same state as the status document and the page.
    state.metrics.uplink_up.set(i64::from(uplink.state == Uplink::Up));
    state.metrics.uplink_batch_waiting_seconds.set(uplink.batch_waiting_seconds.unwrap_or(0.0));
    let rate = uplink.forwarded_rows_per_second;
    let drain_eta_seconds = (rate > 0.0).then(|| log.backlog_rows as f64 / rate);
    state.metrics.forward_rate.set(rate);
    state.metrics.drain_eta_seconds.set(drain_eta_seconds.unwrap_or(0.0));
    let rates = {
        let reading = Reading {
            accepted: accepted_counts(state),
            events_written: state.metrics.log_events_written.get(),
            write_bytes: crate::sysinfo::process_write_bytes(),
        };
        if let Some(w) = reading.write_bytes {
            state.metrics.observe_write_bytes(w);
        }
        let mut sampler = state.sampler.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sampler.sample(reading)
    };
    let endurance_days = endurance_days(state.endurance_tbw, rates.write_bytes_per_day);
    state.metrics.disk_write_bytes_per_day.set(rates.write_bytes_per_day.unwrap_or(0.0));
    state.metrics.disk_endurance_days.set(endurance_days.unwrap_or(0.0));
    let space = crate::sysinfo::fs_space(&state.data_dir);
    let tenants = (state.tenant_usage)();
    for t in &tenants {
        let label = crate::metrics::TenantLabel { tenant: t.tenant.clone() };
        state.metrics.tenant_mqtt_connections.get_or_create(&label).set(t.mqtt_connections as i64);
        state.metrics.tenant_stream_subscribers.get_or_create(&label).set(t.stream_subscribers as i64);
    }
    Ok(Status {
        tenants,
        site_id: state.site_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        disk: Disk {
            log_bytes: log.log_bytes,
            log_max_bytes: state.log_max_bytes,
            data_dir_free_bytes: space.map(|s| s.available),
            data_dir_total_bytes: space.map(|s| s.total),
            write_bytes_per_day: rates.write_bytes_per_day,
            write_bytes_per_event: rates.write_bytes_per_event,
            write_budget_bytes_per_day: (state.write_budget > 0).then_some(state.write_budget),
            endurance_days,
        },
        buffering_only: uplink.state == Uplink::Disabled,
        log,
        uplink,
        drain_eta_seconds,
        ingest: rates.ingest,
        devices: devices.as_ref().clone(),
    })
}

/// Days until `tbw` terabytes are written at `per_day` bytes a day.
fn endurance_days(tbw: f64, per_day: Option<f64>) -> Option<f64> {
    per_day.filter(|&d| tbw > 0.0 && d > 0.0).map(|d| tbw * 1e12 / d)
}

/// The `events_accepted` counters of [`PROTOCOLS`], in that order.
pub(super) fn accepted_counts(state: &ApiState) -> [u64; 3] {
    PROTOCOLS.map(|protocol| state.metrics.events_accepted.get_or_create(&ProtocolLabel { protocol }).get())
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

/// `/metrics` and `/api/v1/status` (guarded by the caller), and the
/// always-open `/healthz`, `/readyz`.
pub(super) fn routes() -> (axum::Router<ApiState>, axum::Router<ApiState>) {
    use axum::routing::get;
    let guarded = axum::Router::new().route("/metrics", get(metrics)).route("/api/v1/status", get(status));
    let open = axum::Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz));
    (guarded, open)
}

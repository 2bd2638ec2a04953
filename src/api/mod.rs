//! The read side and the operator's endpoints: event queries, device
//! administration, health, metrics and the status page. Like every stage it
//! exports `routes()` over its own state; it reads the site log and the
//! forwarder's uplink status, and writes only device registrations.

pub(crate) mod devices;
pub(crate) mod openapi;
pub(crate) mod query;
pub(crate) mod sampler;
pub(crate) mod status;
pub(crate) mod status_page;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::FromRef;

use crate::auth::Authenticator;
use crate::config::LimitsConfig;
use crate::forward::ForwardStatus;
use crate::log::{LogHandle, Readers};
use crate::metrics::Metrics;
use crate::stream::Hub;

/// What these routes need.
#[derive(Clone, FromRef)]
pub struct ApiState {
    pub auth: Arc<Authenticator>,
    pub log: LogHandle,
    pub readers: Readers,
    pub metrics: Arc<Metrics>,
    pub uplink: Arc<ForwardStatus>,
    pub limits: Arc<LimitsConfig>,
    pub site_id: Arc<str>,
    pub max_body: usize,
    pub started: Instant,
    /// Last computed log status and device list, and when.
    /// Single-flight: one request refreshes it, concurrent ones wait for it.
    pub status_cache: Arc<tokio::sync::Mutex<Option<status::Cached>>>,
    /// Ingest and disk-write rates of the status page.
    pub sampler: Arc<Mutex<sampler::Sampler>>,
    /// The site-wide tail of the status page lives in the hub.
    pub hub: Arc<Hub>,
    /// Guards the status page, its JSON and feed, and `/metrics` when set.
    pub status_token: Option<Arc<str>>,
    pub data_dir: Arc<PathBuf>,
    /// `log.max_bytes`.
    pub log_max_bytes: u64,
    /// `log.write_budget` (0: none) and `disk.endurance_tbw` (0: unknown).
    #[from_ref(skip)]
    pub write_budget: u64,
    #[from_ref(skip)]
    pub endurance_tbw: f64,
    /// Ends the page's event feeds at shutdown.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The tenants' use of the shared pools (status page, `/metrics`).
    pub tenant_usage: status::TenantUsage,
}

/// Every route of this module.
pub(crate) fn routes(state: ApiState) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/api/v1/realtime/{tenant}/events", get(query::query_events))
        .merge(devices::routes())
        .merge(status_page::routes(&state))
        .merge(openapi::routes(&state.limits, state.max_body))
        .with_state(state)
}

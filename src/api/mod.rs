//! The read side and the operator's endpoints: event queries, device
//! administration, health, metrics and the status page. Like every stage it
//! exports `routes()` over its own state; it reads the site log and the
//! forwarder's uplink status, and writes only device registrations.

pub mod devices;
pub mod query;
pub mod status;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::FromRef;

use crate::auth::Authenticator;
use crate::config::LimitsConfig;
use crate::forward::ForwardStatus;
use crate::log::{LogHandle, Readers, schema::LogStatus};
use crate::metrics::Metrics;

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
    /// Last computed log status and when (see `status::STATUS_TTL`).
    pub status_cache: Arc<Mutex<Option<(Instant, LogStatus)>>>,
}

/// Every route of this module.
pub fn routes(state: ApiState) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/api/v1/realtime/{tenant}/events", get(query::query_events))
        .merge(devices::routes())
        .merge(status::routes())
        .with_state(state)
}

//! Router assembly and the state every handler shares. The HTTP server is a
//! stage: `run` serves until the shutdown token fires, then stops accepting
//! and lets in-flight requests finish (their appends still commit).

pub mod api;
pub mod error;
pub mod extract;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

use crate::auth::Authenticator;
use crate::event::valid_tenant;
use crate::forward::ForwardStatus;
use crate::ingest::IngestHandle;
use crate::log::{LogHandle, Readers};
use crate::metrics::Metrics;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub ingest: IngestHandle,
    pub auth: Arc<Authenticator>,
    pub log: LogHandle,
    pub readers: Readers,
    pub metrics: Arc<Metrics>,
    pub forward: Arc<ForwardStatus>,
    pub site_id: Arc<str>,
    pub max_body: usize,
    pub started: Instant,
    pub hub: Arc<crate::stream::Hub>,
    pub stream: crate::config::StreamConfig,
    /// Long-lived handlers (WS, SSE, long-poll) end when this fires.
    pub shutdown: CancellationToken,
    /// Last computed log status and when (see `api::STATUS_TTL`).
    pub status_cache: Arc<std::sync::Mutex<Option<(Instant, crate::log::schema::LogStatus)>>>,
}

/// 400 unless the path's tenant is a valid tenant name.
pub fn check_tenant(tenant: &str) -> Result<(), ApiError> {
    if valid_tenant(tenant) {
        Ok(())
    } else {
        Err(ApiError::bad_field("tenant", "tenant must match ^[a-z][a-z0-9_]{0,40}$"))
    }
}

/// Every route.
pub fn router(state: AppState) -> Router {
    use crate::ingest::http as ingest;
    Router::new()
        .route("/", get(api::index))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/realtime/{tenant}/event", post(ingest::post_event))
        .route("/api/v1/realtime/{tenant}/events", post(ingest::post_events).get(api::query_events))
        .route("/api/v1/realtime/{tenant}/device/register", post(api::register_device))
        .route("/api/v1/realtime/{tenant}/device/{device_id}", delete(api::revoke_device))
        .route("/api/v1/realtime/{tenant}/devices", get(api::list_devices))
        .route("/api/v1/realtime/{tenant}/stream", get(crate::stream::http::ws))
        .route("/api/v1/realtime/{tenant}/sse", get(crate::stream::http::sse))
        .route("/api/v1/realtime/{tenant}/poll", get(crate::stream::http::poll))
        .route("/api/v1/realtime/{tenant}/presence", get(crate::stream::http::presence))
        .fallback(api::not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`, then drains in-flight requests.
pub async fn run(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

//! Opening a subscription, shared by every subscriber endpoint (WebSocket
//! in `ws`, SSE and long-poll in `http`): the endpoints' state, the
//! parameters checked as the OpenAPI document declares them, auth and a
//! subscriber slot within the shares (`Hub::slot`), and the session's end
//! (revocation or token expiry) to watch.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRef;
use axum::http::HeaderMap;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Filter, Hub, Subscription};
use crate::auth::{Authenticator, Principal, SessionEnd};
use crate::config::StreamConfig;
use crate::event::{Tenant, now_us, parse_cursor};
use crate::http::auth::Subscribe;
use crate::http::{ApiError, EventFrames, TenantAccess};
use crate::log::{Readers, schema};
use crate::metrics::Metrics;

pub(super) type Params = HashMap<String, String>;

/// What the subscriber endpoints need.
#[derive(Clone, FromRef)]
pub struct StreamState {
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub readers: Readers,
    pub metrics: Arc<Metrics>,
    pub config: StreamConfig,
    /// Where WebSocket `event` frames go (the ingest stage).
    pub events: Arc<dyn EventFrames>,
    /// Long-lived sessions end when this fires…
    pub shutdown: CancellationToken,
    /// …and shutdown waits for them here.
    pub tracker: TaskTracker,
    /// Largest WebSocket message or frame read: the payload limit plus the
    /// envelope of an `event` frame.
    pub max_message: usize,
}

pub(super) struct Opened {
    pub tenant: Tenant,
    pub principal: Principal,
    pub sub: Subscription,
    /// Resolves when the device is revoked or the token expires.
    pub ended: SessionEnded,
}

/// A session's end: revocation or token expiry (see `Authenticator::session_end`).
pub(super) type SessionEnded = std::pin::Pin<Box<dyn Future<Output = SessionEnd> + Send>>;

/// The filter and the cursor of a stream request, checked as the OpenAPI
/// document declares them (`None` cursor: none given).
pub(super) fn check_params(params: &Params, headers: &HeaderMap) -> Result<(Filter, Option<i64>), ApiError> {
    let filter =
        Filter::from_query(params.get("device_id").map(String::as_str), params.get("event_types").map(String::as_str))
            .map_err(|(field, m)| ApiError::bad_field(field, m))?;
    let after = params
        .get("after")
        .map(String::as_str)
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
        .map(|v| parse_cursor(v).map_err(|e| ApiError::bad_field(e.field, e.message)))
        .transpose()?;
    Ok((filter, after))
}

/// Auth, filters, cursor and a subscriber slot; `after` from the query, else
/// `Last-Event-ID`, else "from now".
pub(super) async fn open(
    state: &StreamState,
    access: TenantAccess<Subscribe>,
    params: &Params,
    headers: &HeaderMap,
    kind: &'static str,
) -> Result<Opened, ApiError> {
    let TenantAccess { tenant, principal, expires_at, .. } = access;
    let (filter, after) = check_params(params, headers)?;
    let after = match after {
        Some(a) => a,
        // Live only: read the head before subscribing; the replay closes the gap.
        None => state.readers.with(schema::last_seq).await?,
    };
    let slot = state.hub.slot(kind, super::Owner::of(&principal, &tenant)).map_err(|full| full.api_error())?;
    let sub = Subscription::new(&state.hub, slot, state.readers.clone(), &tenant, filter, after);
    let (auth, p) = (state.auth.clone(), principal.clone());
    let ended = Box::pin(async move { auth.session_end(&p, expires_at).await });
    Ok(Opened { tenant, principal, sub, ended })
}

pub(super) fn presence_frame(device_id: &str, online: bool) -> String {
    json!({"type": "presence", "device_id": device_id, "online": online}).to_string()
}

pub(super) fn observe(state: &StreamState, received_at_us: i64) {
    state.metrics.stream_delivered.inc();
    state.metrics.stream_latency.observe(((now_us() - received_at_us).max(0)) as f64 / 1e6);
}

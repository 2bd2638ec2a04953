//! Subscriber endpoints: WebSocket, Server-Sent Events, long-poll, presence.
//! Auth as for the rest of the API (`read_events`, the path's tenant); as
//! browsers cannot set headers on WebSocket or EventSource, the token may
//! also come as `?access_token=` (never logged: no request logging carries
//! query strings).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Closed, Filter, Hub, Item, Subscription};
use crate::auth::{Authenticator, Principal, SessionEnd};
use crate::config::StreamConfig;
use crate::event::{Tenant, now_us, parse_cursor};
use crate::http::auth::Subscribe;
use crate::http::{ApiError, EventFrames, TenantAccess};
use crate::log::{Readers, schema};
use crate::metrics::Metrics;

/// Longest long-poll wait.
pub const MAX_POLL: Duration = Duration::from_secs(60);

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

/// `…/stream` (WebSocket), `…/sse`, `…/poll`, `…/presence`.
pub fn routes(state: StreamState) -> Router {
    Router::new()
        .route("/api/v1/realtime/{tenant}/stream", get(super::ws::ws))
        .route("/api/v1/realtime/{tenant}/sse", get(sse))
        .route("/api/v1/realtime/{tenant}/poll", get(poll))
        .route("/api/v1/realtime/{tenant}/presence", get(presence))
        .with_state(state)
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

/// `GET /api/v1/realtime/{tenant}/sse` (Server-Sent Events; `id:` = seq).
async fn sse(
    State(state): State<StreamState>,
    access: TenantAccess<Subscribe>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Opened { sub, ended, .. } = open(&state, access, &params, &headers, "sse").await?;
    let shutdown = state.shutdown.clone();
    let st = state.clone();
    // Tracked while the stream lives, so shutdown waits for it to end.
    let tracked = state.tracker.token();
    // State: the subscription, or None once closed.
    let stream = futures_util::stream::unfold(Some((sub, tracked, ended)), move |sub| {
        let (shutdown, st) = (shutdown.clone(), st.clone());
        async move {
            let (mut sub, tracked, mut ended) = sub?;
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
                why = &mut ended => {
                    // Revoked or expired: one last error event, then the stream ends.
                    let v = json!({"type": "error", "code": why.code(), "message": "session ended; the device was revoked or its token expired"});
                    return Some((Ok(SseEvent::default().event("error").data(v.to_string())), None));
                }
                n = sub.next() => n,
            };
            let (ev, keep) = match next {
                Ok(Item::Event(e)) => {
                    observe(&st, e.received_at_us);
                    (SseEvent::default().id(e.seq.to_string()).event("event").data(e.frame()), true)
                }
                Ok(Item::Presence { device_id, online }) => {
                    (SseEvent::default().event("presence").data(presence_frame(&device_id, online)), true)
                }
                Err(Closed::Lagged { last_seq }) => {
                    st.metrics.stream_lagged.inc();
                    let v = json!({"type": "error", "code": "lagged", "last_seq": last_seq,
                        "message": format!("subscriber fell behind; reconnect with Last-Event-ID: {last_seq}")});
                    (SseEvent::default().event("error").data(v.to_string()), false)
                }
                Err(Closed::Gone) => return None,
            };
            Some((Ok::<_, Infallible>(ev), keep.then_some((sub, tracked, ended))))
        }
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(state.config.sse_heartbeat).text("heartbeat"))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// `GET /api/v1/realtime/{tenant}/poll?after=SEQ&timeout=30` (long-poll).
async fn poll(
    State(state): State<StreamState>,
    access: TenantAccess<Subscribe>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let timeout = match params.get("timeout") {
        None => Duration::from_secs(30),
        Some(v) => match v.parse::<u64>() {
            Ok(s) if Duration::from_secs(s) <= MAX_POLL => Duration::from_secs(s),
            _ => return Err(ApiError::bad_field("timeout", "must be whole seconds, at most 60")),
        },
    };
    let mut params = params;
    params.entry("after".into()).or_insert_with(|| "0".into());
    let Opened { mut sub, mut ended, .. } = open(&state, access, &params, &headers, "poll").await?;
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    // Events already in the log after the cursor are there now, even at
    // `timeout=0`: read the first replay page before the clock can win.
    if sub.fill().await.is_err() {
        return Err(ApiError::internal("long-poll replay", &"site log read failed"));
    }
    loop {
        // After the first event, take only what is ready within a few ms.
        let wait_until =
            if events.is_empty() { deadline } else { tokio::time::Instant::now() + Duration::from_millis(5) };
        // Biased: events already waiting are taken before a due timeout
        // (`timeout=0` returns what is there instead of a coin flip).
        let next = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => break,
            _ = &mut ended => break,
            n = sub.next() => n,
            _ = tokio::time::sleep_until(wait_until) => break,
        };
        match next {
            Ok(Item::Event(e)) => {
                observe(&state, e.received_at_us);
                events.push(e);
                if events.len() >= 1000 {
                    break;
                }
            }
            Ok(Item::Presence { .. }) => {}
            Err(_) => break,
        }
    }
    let body = format!(
        r#"{{"events":[{}],"next":{}}}"#,
        events.iter().map(|e| format!(r#"{{"seq":{},"event":{}}}"#, e.seq, e.json)).collect::<Vec<_>>().join(","),
        sub.last_seq
    );
    Ok(([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")], body).into_response())
}

/// `GET /api/v1/realtime/{tenant}/presence`: devices online now.
async fn presence(
    State(state): State<StreamState>,
    access: TenantAccess<Subscribe>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = access.tenant;
    let t = tenant.clone();
    let online = state.readers.with(move |c| schema::online_devices(c, &t)).await?;
    let list: Vec<_> = online.iter().map(|d| json!({"device_id": d.device_id, "last_seen": d.last_seen})).collect();
    Ok(Json(json!({"tenant": tenant.as_str(), "online": list})))
}

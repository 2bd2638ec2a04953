//! Subscriber endpoints: the routes (WebSocket in `ws`), Server-Sent
//! Events, long-poll, presence.
//! Auth as for the rest of the API (`read_events`, the path's tenant); as
//! browsers cannot set headers on WebSocket or EventSource, the token may
//! also come as `?access_token=` (never logged: no request logging carries
//! query strings).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::open::{Opened, Params, StreamState, observe, open, presence_frame};
use super::{Closed, Item};
use crate::http::auth::Subscribe;
use crate::http::{ApiError, TenantAccess};
use crate::log::schema;

/// Longest long-poll wait.
pub(crate) const MAX_POLL: Duration = Duration::from_secs(60);

/// `…/stream` (WebSocket), `…/sse`, `…/poll`, `…/presence`.
pub(crate) fn routes(state: StreamState) -> Router {
    Router::new()
        .route("/api/v1/realtime/{tenant}/stream", get(super::ws::ws))
        .route("/api/v1/realtime/{tenant}/sse", get(sse))
        .route("/api/v1/realtime/{tenant}/poll", get(poll))
        .route("/api/v1/realtime/{tenant}/presence", get(presence))
        .with_state(state)
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

//! Subscriber endpoints: WebSocket, Server-Sent Events, long-poll, presence.
//! Auth as for the rest of the API (`read_events`, the path's tenant); as
//! browsers cannot set headers on WebSocket or EventSource, the token may
//! also come as `?access_token=` (never logged: no request logging carries
//! query strings).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{Closed, Filter, Item, Subscription};
use crate::auth::{Perm, Principal};
use crate::event::{EventInput, now_us};
use crate::http::extract::bearer;
use crate::http::{ApiError, AppState, check_tenant};
use crate::log::schema;

/// Longest long-poll wait.
pub const MAX_POLL: Duration = Duration::from_secs(60);

type Params = HashMap<String, String>;

/// The bearer token, or `?access_token=` (browsers cannot set headers on
/// WebSocket or EventSource).
fn token_of<'a>(headers: &'a HeaderMap, params: &'a Params) -> Option<&'a str> {
    bearer(headers).or(params.get("access_token").map(String::as_str))
}

struct Opened {
    principal: Principal,
    sub: Subscription,
}

/// Auth, filters, cursor and a subscriber slot; `after` from the query, else
/// `Last-Event-ID`, else "from now".
async fn open(
    state: &AppState,
    tenant: &str,
    params: &Params,
    headers: &HeaderMap,
    kind: &'static str,
) -> Result<Opened, ApiError> {
    check_tenant(tenant)?;
    let token = token_of(headers, params);
    let principal = state.auth.authorize(token, tenant, Perm::ReadEvents)?;
    let filter =
        Filter::parse(params.get("device_id").map(String::as_str), params.get("event_types").map(String::as_str))
            .map_err(|m| ApiError::bad_field("event_types", m))?;
    let after = params
        .get("after")
        .map(String::as_str)
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::bad_field("after", "must be a seq (integer ≥ 0)"))
        })
        .transpose()?;
    let after = match after {
        Some(a) => a,
        // Live only: read the head before subscribing; the replay closes the gap.
        None => state.readers.with(|c| Ok(schema::status(c, 0)?.last_seq)).await?,
    };
    let slot = state.hub.slot(kind).ok_or_else(|| ApiError {
        retry_after: Some(Duration::from_secs(5)),
        ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_subscribers", "stream.max_subscribers reached")
    })?;
    let sub = Subscription::new(&state.hub, slot, state.readers.clone(), tenant, filter, after);
    Ok(Opened { principal, sub })
}

fn presence_frame(device_id: &str, online: bool) -> String {
    json!({"type": "presence", "device_id": device_id, "online": online}).to_string()
}

fn observe(state: &AppState, received_at_us: i64) {
    state.metrics.stream_delivered.inc();
    state.metrics.stream_latency.observe(((now_us() - received_at_us).max(0)) as f64 / 1e6);
}

fn cors(state: &AppState, resp: &mut Response) {
    if let Some(origin) = &state.stream.cors_origin
        && let Ok(v) = HeaderValue::from_str(origin)
    {
        resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
}

/// `GET /api/v1/realtime/{tenant}/stream` (WebSocket).
pub async fn ws(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let opened = open(&state, &tenant, &params, &headers, "ws").await?;
    let mut resp = upgrade.on_upgrade(move |socket| ws_session(socket, state, tenant, opened));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// A client frame: `{"type": "subscribe" | "unsubscribe" | "ping" | "event", …}`.
/// A flat struct rather than a tagged enum: serde cannot buffer the event's
/// raw JSON payload through an internally tagged enum.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    event_types: Option<EventTypes>,
    #[serde(default, borrow)]
    event: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EventTypes {
    List(Vec<String>),
    Csv(String),
}

fn error_frame(code: &str, message: &str, field: Option<&str>) -> String {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(f) = field {
        v["field"] = json!(f);
    }
    v.to_string()
}

/// The WebSocket closing handshake: send Close, then wait (up to 5 s) for the
/// peer's Close or EOF. Dropping the socket at once can turn the peer's reply
/// into a TCP reset that discards frames it has not read yet (the error frame).
async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = axum::extract::ws::CloseFrame { code, reason: reason.to_string().into() };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn ws_session(mut socket: WebSocket, state: AppState, tenant: String, opened: Opened) {
    let Opened { principal, mut sub } = opened;
    let interval = state.stream.ping_interval;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // `unsubscribe` pauses event delivery until the next `subscribe`.
    let mut paused = false;
    let shutdown = state.shutdown.clone();
    loop {
        let out: Option<String> = tokio::select! {
            _ = shutdown.cancelled() => return close(socket, 1001, "server shutting down").await,
            item = sub.next() => match item {
                Ok(Item::Event(e)) if !paused => {
                    observe(&state, e.received_at_us);
                    Some(e.frame())
                }
                Ok(Item::Event(_)) => None,
                Ok(Item::Presence { device_id, online }) => Some(presence_frame(&device_id, online)),
                Err(Closed::Lagged { last_seq }) => {
                    state.metrics.stream_lagged.inc();
                    let v = json!({"type": "error", "code": "lagged", "last_seq": last_seq,
                        "message": format!("subscriber fell behind; resume with after={last_seq}")});
                    if socket.send(Message::Text(v.to_string().into())).await.is_ok() {
                        close(socket, 1013, "lagged; resume from last_seq").await;
                    }
                    return;
                }
                Err(Closed::Gone) => return,
            },
            msg = socket.recv() => {
                last_heard = Instant::now();
                match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(t))) => client_frame(&state, &tenant, &principal, &mut sub, &mut paused, t.as_str()).await,
                    Some(Ok(Message::Binary(_))) => Some(error_frame("bad_frame", "binary frames are not supported; send JSON text", None)),
                    Some(Ok(_)) => None, // ping/pong: liveness only
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > interval * 2 {
                    tracing::info!(tenant, "websocket subscriber silent for 2 ping intervals; closing");
                    return close(socket, 1001, "no pong").await;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
                None
            }
        };
        if let Some(text) = out
            && socket.send(Message::Text(text.into())).await.is_err()
        {
            return;
        }
    }
}

async fn client_frame(
    state: &AppState,
    tenant: &str,
    principal: &Principal,
    sub: &mut Subscription,
    paused: &mut bool,
    text: &str,
) -> Option<String> {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Some(error_frame("bad_frame", &format!("{e}; expected a JSON object with a type"), None)),
    };
    match frame.kind {
        "ping" => Some(json!({"type": "pong"}).to_string()),
        "unsubscribe" => {
            *paused = true;
            None
        }
        "subscribe" => {
            let types = match frame.event_types {
                Some(EventTypes::List(v)) => Some(v.join(",")),
                Some(EventTypes::Csv(s)) => Some(s),
                None => None,
            };
            match Filter::parse(frame.device_id.as_deref(), types.as_deref()) {
                Ok(f) => {
                    sub.set_filter(f);
                    *paused = false;
                    Some(json!({"type": "subscribed", "last_seq": sub.last_seq}).to_string())
                }
                Err(m) => Some(error_frame("invalid", &m, Some("event_types"))),
            }
        }
        "event" => {
            if let Principal::Device { perms, .. } = principal
                && !perms.contains(&Perm::WriteEvents)
            {
                return Some(error_frame("missing_permission", "token lacks permission write_events", None));
            }
            let Some(raw) = frame.event else {
                return Some(error_frame("invalid", "an event frame needs an `event` object", Some("event")));
            };
            let input: EventInput = match crate::http::extract::parse_json(raw.get().as_bytes()) {
                Ok(i) => i,
                Err(e) => return Some(error_frame(e.code, &e.message, e.field.as_deref())),
            };
            match state.ingest.submit(principal, tenant, vec![input], false, "ws").await {
                Ok(mut a) => a
                    .pop()
                    .map(|a| json!({"type": "ack", "id": a.id, "seq": a.seq, "duplicate": a.duplicate}).to_string()),
                Err(e) => {
                    let api: ApiError = e.into();
                    Some(error_frame(api.code, &api.message, api.field.as_deref()))
                }
            }
        }
        other => Some(error_frame(
            "bad_frame",
            &format!("unknown frame type {other:?}; expected subscribe, unsubscribe, ping or event"),
            Some("type"),
        )),
    }
}

/// `GET /api/v1/realtime/{tenant}/sse` (Server-Sent Events; `id:` = seq).
pub async fn sse(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Opened { sub, .. } = open(&state, &tenant, &params, &headers, "sse").await?;
    let shutdown = state.shutdown.clone();
    let st = state.clone();
    // State: the subscription, or None once closed.
    let stream = futures_util::stream::unfold(Some(sub), move |sub| {
        let (shutdown, st) = (shutdown.clone(), st.clone());
        async move {
            let mut sub = sub?;
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
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
            Some((Ok::<_, Infallible>(ev), keep.then_some(sub)))
        }
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(state.stream.sse_heartbeat).text("heartbeat"))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(&state, &mut resp);
    Ok(resp)
}

/// `GET /api/v1/realtime/{tenant}/poll?after=SEQ&timeout=30` (long-poll).
pub async fn poll(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
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
    let Opened { mut sub, .. } = open(&state, &tenant, &params, &headers, "poll").await?;
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // After the first event, take only what is ready within a few ms.
        let wait_until =
            if events.is_empty() { deadline } else { tokio::time::Instant::now() + Duration::from_millis(5) };
        let next = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(wait_until) => break,
            n = sub.next() => n,
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
    let mut resp =
        ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")], body).into_response();
    cors(&state, &mut resp);
    Ok(resp)
}

/// `GET /api/v1/realtime/{tenant}/presence`: devices online now.
pub async fn presence(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_tenant(&tenant)?;
    let token = token_of(&headers, &params);
    state.auth.authorize(token, &tenant, Perm::ReadEvents)?;
    let t = tenant.clone();
    let online = state.readers.with(move |c| schema::online_devices(c, &t)).await?;
    let list: Vec<_> = online.iter().map(|d| json!({"device_id": d.device_id, "last_seen": d.last_seen})).collect();
    Ok(Json(json!({"tenant": tenant, "online": list})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frames_parse() {
        let t = r#"{"event":{"device_id":"d1","event_type":"ws.in","payload":{"v":1}},"type":"event"}"#;
        let r = serde_json::from_str::<ClientFrame>(t);
        assert!(r.is_ok(), "{:?}", r.err());
    }
}

//! The WebSocket stream endpoint: subscription frames (`subscribe`,
//! `unsubscribe`, `ping`) and event delivery. `event` frames are ingest's:
//! they are handed to [`EventFrames`](crate::http::EventFrames).

use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::open::{Opened, Params, StreamState, observe, open, presence_frame};
use super::{Closed, Filter, Item, Subscription};
use crate::auth::Principal;
use crate::event::Tenant;
use crate::http::auth::Subscribe;
use crate::http::{ApiError, TenantAccess, error_frame};

/// `GET /api/v1/realtime/{tenant}/stream` (WebSocket).
pub(super) async fn ws(
    State(state): State<StreamState>,
    access: TenantAccess<Subscribe>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Bad parameters are named (400) before a missing upgrade is (426).
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            super::open::check_params(&params, &headers)?;
            return Err(crate::http::error::upgrade_required(&e));
        }
    };
    let opened = open(&state, access, &params, &headers, "ws").await?;
    // Tracked, so shutdown waits for the session's close handshake.
    let tracker = state.tracker.clone();
    // A message over the limit is refused from its frame header, never
    // buffered whole; what is queued to send is bounded too.
    let max = state.max_message;
    let upgrade = upgrade.max_message_size(max).max_frame_size(max).max_write_buffer_size(WRITE_BUFFER);
    let mut resp = upgrade.on_upgrade(move |socket| tracker.track_future(ws_session(socket, state, opened)));
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

async fn ws_session(mut socket: WebSocket, state: StreamState, opened: Opened) {
    let Opened { tenant, principal, mut sub, mut ended } = opened;
    let interval = state.config.ping_interval;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // `unsubscribe` pauses event delivery until the next `subscribe`.
    let mut paused = false;
    let shutdown = state.shutdown.clone();
    loop {
        let out: Option<String> = tokio::select! {
            _ = shutdown.cancelled() => return close(socket, 1001, "server shutting down").await,
            why = &mut ended => {
                let text = error_frame(why.code(), "session ended: the device was revoked or its token expired", None);
                if socket.send(Message::Text(text.into())).await.is_ok() {
                    close(socket, 1008, why.code()).await;
                }
                return;
            }
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
                    Some(Err(e)) if is_too_large(&e) => {
                        let message = format!("message larger than the limit of {} bytes (payload limit plus envelope)", state.max_message);
                        let text = error_frame("too_large", &message, None);
                        if socket.send(Message::Text(text.into())).await.is_ok() {
                            close(socket, 1009, "message too large").await;
                        }
                        return;
                    }
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(t))) => client_frame(&state, &tenant, &principal, &mut sub, &mut paused, t.as_str()).await,
                    Some(Ok(Message::Binary(_))) => Some(error_frame("bad_frame", "binary frames are not supported; send JSON text", None)),
                    Some(Ok(_)) => None, // ping/pong: liveness only
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > interval * 2 {
                    tracing::info!(%tenant, "websocket subscriber silent for 2 ping intervals; closing");
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

/// Bytes a WebSocket session may have queued for sending (tungstenite's
/// default is unbounded): a subscriber that does not read is closed, not
/// buffered for.
const WRITE_BUFFER: usize = 1 << 20;

/// tungstenite's capacity error ("Space limit exceeded: Message too long"),
/// raised from the frame header before the payload is read. axum does not
/// expose the type, so it is told by its text.
fn is_too_large(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long")
}

async fn client_frame(
    state: &StreamState,
    tenant: &Tenant,
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
        "event" => match frame.event {
            Some(raw) => Some(state.events.event_frame(principal, tenant, raw).await),
            None => Some(error_frame("invalid", "an event frame needs an `event` object", Some("event"))),
        },
        other => Some(error_frame(
            "bad_frame",
            &format!("unknown frame type {other:?}; expected subscribe, unsubscribe, ping or event"),
            Some("type"),
        )),
    }
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

//! MQTT over WebSocket: `GET /mqtt` on the HTTP port, subprotocol `mqtt`
//! (browsers' MQTT libraries and dashboards connect this way). Each binary
//! message carries MQTT bytes; the session is the same one the TCP listener
//! runs (login, ACL, ack after commit, limits), over an in-memory pipe.
//! [MQTT-6.0.0-1]: a text message closes the connection.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttDeps;

#[derive(Clone)]
struct WsState {
    deps: MqttDeps,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// The `/mqtt` route.
pub(crate) fn routes(deps: MqttDeps, tracker: TaskTracker, shutdown: CancellationToken) -> Router {
    Router::new().route("/mqtt", get(upgrade)).with_state(WsState { deps, tracker, shutdown })
}

async fn upgrade(
    State(s): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<crate::http::PeerCert>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return axum::response::IntoResponse::into_response(crate::http::error::upgrade_required(&e)),
    };
    // A message or frame holds at most one packet of mqtt.max_packet_size
    // (clients may split packets across messages, never need more).
    let max = s.deps.config.max_packet_size + 8;
    let tracker = s.tracker.clone();
    upgrade
        .protocols(["mqtt", "mqttv3.1"])
        .max_message_size(max)
        .max_frame_size(max)
        .max_write_buffer_size(4 * max.max(64 * 1024))
        .on_upgrade(move |socket| tracker.track_future(session(socket, peer, cert.map(|c| c.0.0), s)))
}

async fn session(
    mut socket: WebSocket,
    peer: SocketAddr,
    cert: Option<Result<crate::tls::ClientCert, String>>,
    s: WsState,
) {
    let deps = &s.deps;
    let Some(slot) = deps.slot(peer) else {
        let close = CloseFrame { code: 1013, reason: "mqtt.max_connections reached".into() };
        let _ = socket.send(Message::Close(Some(close))).await;
        return;
    };
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (session_r, session_w) = tokio::io::split(theirs);
    let (pipe_r, pipe_w) = tokio::io::split(ours);
    let (ws_tx, ws_rx) = socket.split();
    // Two pumps, one per direction, each waiting only on its own side: the
    // session reads while it writes (it never blocks on a write), so
    // neither direction can hold the other up. A pump stops the other by
    // ending: the device's side closes, or the session ends and closes its
    // pipe.
    let (tx_close, close_rx) = tokio::sync::mpsc::channel::<CloseFrame>(1);
    // When the session ends, the pumps get a moment to pass on its last
    // bytes and the close, then go (a client that stops reading cannot
    // hold the connection).
    let served = CancellationToken::new();
    let pumps = async {
        tokio::select! {
            _ = async { tokio::join!(pump_in(ws_rx, pipe_w, tx_close), pump_out(ws_tx, pipe_r, close_rx)) } => {}
            () = async {
                served.cancelled().await;
                tokio::time::sleep(CLOSE_GRACE).await;
            } => {}
        }
    };
    let serve = async {
        super::session::serve(Box::new(session_r), Box::new(session_w), peer, cert, deps, s.shutdown.clone()).await;
        served.cancel();
    };
    tokio::join!(pumps, serve);
    drop(slot);
}

/// The device's binary messages into the session's pipe; a text message
/// asks `pump_out` to close with 1003. Ends (closing the pipe, so the
/// session reads EOF) when the device's side closes.
async fn pump_in(
    mut ws_rx: SplitStream<WebSocket>,
    mut pipe_w: WriteHalf<DuplexStream>,
    close: tokio::sync::mpsc::Sender<CloseFrame>,
) {
    while let Some(msg) = ws_rx.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                if pipe_w.write_all(&b).await.is_err() {
                    break;
                }
            }
            Ok(Message::Text(_)) => {
                let _ = close
                    .try_send(CloseFrame { code: 1003, reason: "MQTT over WebSocket uses binary messages".into() });
                break;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            // Closed, or too large (1009 is sent by the codec), or broken.
            Ok(Message::Close(_)) | Err(_) => break,
        }
    }
    let _ = pipe_w.shutdown().await;
}

/// The session's bytes out as binary messages, until the session closes
/// its pipe (then a close frame) or `pump_in` asks for a close.
async fn pump_out(
    mut ws_tx: SplitSink<WebSocket, Message>,
    mut pipe_r: ReadHalf<DuplexStream>,
    mut close: tokio::sync::mpsc::Receiver<CloseFrame>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            frame = close.recv() => {
                let _ = ws_tx.send(Message::Close(frame)).await;
                break;
            }
            n = pipe_r.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = ws_tx.send(Message::Close(None)).await;
                    break;
                }
                Ok(n) => {
                    if ws_tx.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
}

/// How long the pumps of an ended session may still take to pass on its
/// last bytes and the close.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

//! The MQTT front-end (3.1, 3.1.1 and 5.0, over TCP or WebSocket).
//!
//! Packets are decoded with rumqttd's v4 or v5 codec (`codec`); rumqttd's
//! router is not used: it acks from memory before anything could persist,
//! keeps every filter it ever saw and cannot be bounded from outside. This
//! front-end authenticates CONNECT (username = device id, password = device
//! JWT, same checks as HTTP), applies the topic ACL and rate limits, and
//! appends each PUBLISH to the site log; only after its commit does it
//! answer PUBACK/PUBREC. Committed events (of any protocol) reach MQTT
//! subscribers through `fanout`, on `<tenant>/events/<device_id>/<event_type>`,
//! at min(publish QoS, granted QoS). Publishes awaiting their commit form a
//! FIFO per connection, so acks keep publish order and one connection is
//! not limited to one fsync per message.
//!
//! Decisions:
//! - Client id: the device id, or `<device id>-<suffix>` (so a device can
//!   hold several sessions, e.g. `pump-1` and `pump-1-diag`); sessions are
//!   per (tenant, device, client id).
//! - QoS 2: the packet id is held in the site log with the event until
//!   PUBREL, so a resend within the session stores nothing, across
//!   reconnects and restarts; session state lives exactly as long as its
//!   session (`log::mqtt`).
//! - QoS 1 redelivery: a DUP=1 publish whose packet id, topic and payload
//!   match the device's latest event with that id is acked without a second
//!   row (checked in the writer's transaction, so across restarts too).
//! - Over a rate limit the connection is not read until the window allows
//!   the publish (TCP backpressure); nothing is dropped or refused. At the
//!   log's byte budget reading stops likewise.
//! - A forbidden or invalid publish is not acked: 3.x closes the connection
//!   (it has no negative ack), 5.0 answers a negative PUBACK/PUBREC.
//! - On an unclean drop the will, which must be an event of the device's
//!   own, is stored like any event and then published (after its delay, a
//!   timer that does not hold the connection).
//! - Every resource a device can make the front-end hold is bounded per
//!   session, device and tenant (see the README's table), and every session
//!   can be ended whatever its peer does.

pub(crate) mod acl;
pub(crate) mod codec;
mod expiry;
pub(crate) mod fanout;
pub(crate) mod framing;
mod session;
pub(crate) mod state;
pub(crate) mod topic_map;
pub(crate) mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::MqttConfig;
use crate::ingest::IngestHandle;
use crate::metrics::{Metrics, Protocol};

const PROTOCOL: Protocol = Protocol::Mqtt;

/// What the MQTT stage needs.
#[derive(Clone)]
pub(crate) struct MqttDeps {
    pub ingest: IngestHandle,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub config: MqttConfig,
    /// Live and persistent sessions, and (through them) the fan-out.
    pub sessions: Arc<state::Sessions>,
    /// `mqtt.topic_maps`, parsed.
    pub topics: Arc<topic_map::TopicMaps>,
    /// Open connections, TCP and WebSocket (bounded by `max_connections`).
    pub connections: Arc<AtomicUsize>,
    /// Timers that outlive a connection (delayed wills, session expiry):
    /// shutdown waits for them.
    pub tasks: TaskTracker,
}

/// One open connection (TCP or WebSocket), counted against
/// `mqtt.max_connections` and in the connections gauge until dropped.
pub(crate) struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.mqtt_connections.dec();
    }
}

impl MqttDeps {
    /// A slot for a new connection; `None` (counted and logged as a
    /// refusal) at `mqtt.max_connections`.
    pub(crate) fn slot(&self, peer: std::net::SocketAddr) -> Option<Slot> {
        if self.connections.load(Ordering::Relaxed) >= self.config.max_connections {
            tracing::warn!(%peer, max = self.config.max_connections, "mqtt.max_connections reached; refusing new connection");
            self.ingest.count_rejected(PROTOCOL, "max_connections");
            return None;
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.metrics.mqtt_connections.inc();
        Some(Slot { open: self.connections.clone(), metrics: self.metrics.clone() })
    }
}

/// Accepts connections until `shutdown`; each runs on `tracker`.
/// With `tls`, each connection first completes a TLS handshake (within
/// `mqtt.connect_timeout`).
pub(crate) async fn run(
    listener: TcpListener,
    deps: MqttDeps,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let refusing = Arc::new(AtomicUsize::new(0));
    while let Some((stream, peer)) = crate::http::accept(&listener, &shutdown, PROTOCOL.as_str()).await {
        let Some(slot) = deps.slot(peer) else {
            // Told why (CONNACK 0x97 / 0x03) by a few bounded refusers;
            // beyond those, closed at once.
            if refusing.load(Ordering::Relaxed) < MAX_REFUSERS {
                refusing.fetch_add(1, Ordering::Relaxed);
                let refusing = refusing.clone();
                tracker.spawn(async move {
                    refuse_busy(stream).await;
                    refusing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (deps, shutdown) = (deps.clone(), shutdown.clone());
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                None => {
                    let (r, w) = stream.into_split();
                    session::serve(Box::new(r), Box::new(w), peer, None, &deps, shutdown).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(deps.config.connect_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let cert = crate::tls::ClientCert::of(s.get_ref().1);
                            let (r, w) = tokio::io::split(s);
                            session::serve(Box::new(r), Box::new(w), peer, cert, &deps, shutdown).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "mqtt tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "mqtt tls handshake timed out (mqtt.connect_timeout)"),
                    }
                }
            }
            drop(slot);
        });
    }
}

/// One connection over any byte stream, served like a TCP one from
/// 127.0.0.1 (same session code and slot); `None` at `max_connections`.
pub(crate) async fn serve_stream<S>(deps: &MqttDeps, stream: S, shutdown: CancellationToken) -> Option<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
{
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let slot = deps.slot(peer)?;
    let (r, w) = tokio::io::split(stream);
    session::serve(Box::new(r), Box::new(w), peer, None, deps, shutdown).await;
    drop(slot);
    Some(())
}

/// Takes in the sessions the site log kept over a restart: each waits for
/// its client until its expiry, as if its connection had just ended (the
/// log dropped those that expired while the appliance was down).
pub(crate) async fn resume_stored_sessions(
    deps: &MqttDeps,
    stored: Vec<crate::log::mqtt::StoredSession>,
    shutdown: &CancellationToken,
) -> Result<(), crate::log::Error> {
    if stored.is_empty() {
        return Ok(());
    }
    let (kept, dropped) = deps.sessions.load(stored, crate::event::now_us());
    for key in dropped {
        tracing::info!(
            tenant = key.tenant,
            device_id = key.device_id,
            client_id = key.client_id,
            max = deps.config.max_sessions_per_device,
            "stored mqtt session over mqtt.max_sessions_per_device; dropped"
        );
        deps.ingest.log().mqtt(crate::log::MqttOp::DropSession { key, generation: None, session_id: None }).await?;
    }
    tracing::info!(sessions = kept.len(), "mqtt sessions kept in the site log wait for their clients");
    for (lease, left, waiting) in kept {
        expiry::wait_for_client(deps, lease, left, waiting, shutdown);
    }
    Ok(())
}

/// Puts the retained messages kept in the site log back into the fan-out
/// (at start), within the tenants' bounds. Returns how many.
pub(crate) fn restore_retained(fanout: &fanout::Fanout, retained: Vec<(String, String, Vec<u8>)>) -> usize {
    let mut n = 0;
    for (tenant, topic, payload) in retained {
        let msg = Arc::new(fanout::Message {
            topic: bytes::Bytes::from(topic.clone()),
            stream: None,
            payload: bytes::Bytes::from(payload),
            qos: 1,
            retain: true,
            props: None,
            origin: 0,
            at: std::time::Instant::now(),
        });
        if fanout.set_retained(&tenant, &topic, Some(msg)) {
            n += 1;
        } else {
            tracing::warn!(tenant, topic, "retained message over the tenant's bounds; not restored");
        }
    }
    n
}

/// Counts a timer of an ended connection (`mqtt_session_timers`) while
/// it lives.
pub(crate) struct TimerGauge(prometheus_client::metrics::gauge::Gauge);

impl TimerGauge {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        metrics.mqtt_session_timers.inc();
        Self(metrics.mqtt_session_timers.clone())
    }
}

impl Drop for TimerGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Connections over `mqtt.max_connections` told so at once, at most.
const MAX_REFUSERS: usize = 16;

/// Reads a CONNECT's protocol level (2 s at most) and answers CONNACK
/// "quota exceeded" (5.0: 0x97) or "server unavailable" (3.x: 0x03).
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = bytes::BytesMut::with_capacity(256);
    let hello = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match codec::hello(&mut buf) {
                codec::Hello::More if buf.len() < 4096 => {}
                other => return other,
            }
            if matches!(stream.read_buf(&mut buf).await, Ok(0) | Err(_)) {
                return codec::Hello::More;
            }
        }
    })
    .await;
    let answer: &[u8] = match hello {
        Ok(codec::Hello::Version(codec::Version::V5)) => &[0x20, 3, 0, 0x97, 0],
        Ok(codec::Hello::Version(_)) => &[0x20, 2, 0, 3],
        _ => return,
    };
    let _ = stream.write_all(answer).await;
}

//! The MQTT 3.1.1 front-end over the embedded rumqttd router.
//!
//! rumqttd acks QoS 1 publishes from memory before anything could persist
//! them, so devices never talk to rumqttd's listener. This front-end decodes
//! packets with rumqttd's v4 codec, authenticates CONNECT (username = device
//! id, password = device JWT, same checks as HTTP), applies the topic ACL and
//! rate limits, and appends each PUBLISH to the site log. Only after its
//! commit is a publish handed to the device's rumqttd local link, under the
//! stream topic `<tenant>/events/<device_id>/<event_type>`; the router then
//! fans it out and emits the PUBACK. Publishes awaiting their commit form a
//! FIFO per connection, so acks keep publish order and one connection is not
//! limited to one fsync per message.
//!
//! Decisions:
//! - Client id: the device id, or a string starting with it (so a device can
//!   hold several sessions, e.g. `pump-1` and `pump-1-diag`).
//! - QoS 2 is refused: the connection is closed with a logged reason, nothing
//!   is acked. (QoS 1 with redelivery detection gives the same effect.)
//! - Redelivery: a QoS 1 publish with DUP=1 whose packet id and payload
//!   digest match one of the device's last 1000 events received in the past
//!   10 minutes is acked without a second row. The check runs in the log
//!   writer's transaction, so it also holds across an appliance restart.
//! - Over a rate limit the connection is not read until the window allows
//!   the publish (TCP backpressure); nothing is dropped or refused. At the
//!   log's byte budget reading stops likewise.
//! - A forbidden or invalid publish is not acked; the connection is closed
//!   with a logged reason. A forbidden subscribe gets SUBACK 0x80.
//! - Wills are the front-end's: the router never sees them (a local link can
//!   only be closed cleanly). On an unclean drop the will, which must be an
//!   event of the device's own, is stored like any event and then published.

pub mod acl;
pub mod broker;
pub mod codec;
pub mod framing;
pub mod session;
pub mod state;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::MqttConfig;
use crate::ingest::IngestHandle;
use crate::metrics::Metrics;
pub use broker::{Bridge, LinkFactory, start_router};

const PROTOCOL: &str = "mqtt";

/// What the MQTT stage needs.
#[derive(Clone)]
pub struct MqttDeps {
    pub ingest: IngestHandle,
    pub auth: Arc<Authenticator>,
    pub links: LinkFactory,
    pub metrics: Arc<Metrics>,
    pub config: MqttConfig,
    pub bridge: Arc<Bridge>,
    /// Live, persistent and retained state across connections.
    pub sessions: Arc<state::Sessions>,
    /// Open connections, TCP and WebSocket (bounded by `max_connections`).
    pub connections: Arc<AtomicUsize>,
}

/// Accepts connections until `shutdown`; each runs on `tracker`.
pub async fn run(listener: TcpListener, deps: MqttDeps, tracker: TaskTracker, shutdown: CancellationToken) {
    let open = deps.connections.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause, don't die.
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= deps.config.max_connections {
            tracing::warn!(%peer, max = deps.config.max_connections, "mqtt.max_connections reached; closing new connection");
            deps.ingest.count_rejected(PROTOCOL, "max_connections");
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        deps.metrics.mqtt_connections.inc();
        let (deps, open, shutdown) = (deps.clone(), open.clone(), shutdown.clone());
        tracker.spawn(async move {
            let (r, w) = stream.into_split();
            session::Session::serve(Box::new(r), Box::new(w), peer, &deps, shutdown).await;
            open.fetch_sub(1, Ordering::Relaxed);
            deps.metrics.mqtt_connections.dec();
        });
    }
}

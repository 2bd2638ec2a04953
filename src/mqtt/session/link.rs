//! A session's link into the rumqttd router, opened only once the session
//! needs the router: at CONNECT for a persistent session (the router holds
//! its subscriptions and queue), else at its first subscribe, or at its
//! first publish that someone may receive (an MQTT subscriber of the
//! tenant, or a retained message). A device that only publishes, the common
//! case, never opens one: a link costs about 27 KB of router buffers
//! (1,000 links: +26.7 MB VmHWM, measured) and router work per publish.

use prometheus_client::metrics::gauge::Gauge;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};

use super::End;
use crate::mqtt::LinkFactory;

pub(super) struct Link {
    pair: Option<(LinkTx, LinkRx)>,
    links: LinkFactory,
    router_id: String,
    /// The router drops the session with the link.
    clean: bool,
    /// `outpost_mqtt_router_links`.
    open_links: Gauge,
}

impl Link {
    /// Not open yet.
    pub fn closed(links: LinkFactory, router_id: String, clean: bool, open_links: Gauge) -> Self {
        Self { pair: None, links, router_id, clean, open_links }
    }

    /// Already open (persistent sessions open theirs at CONNECT).
    pub fn opened(
        pair: (LinkTx, LinkRx),
        links: LinkFactory,
        router_id: String,
        clean: bool,
        open_links: Gauge,
    ) -> Self {
        open_links.inc();
        Self { pair: Some(pair), links, router_id, clean, open_links }
    }

    pub fn is_open(&self) -> bool {
        self.pair.is_some()
    }

    /// The sending half, opening the link first if it is not open.
    pub async fn tx(&mut self) -> Result<&mut LinkTx, End> {
        if self.pair.is_none() {
            let (links, id, clean) = (self.links.clone(), self.router_id.clone(), self.clean);
            // The router answers a new link on its own thread: wait off the runtime.
            let built = tokio::task::spawn_blocking(move || links(id, clean)).await.map_err(|e| e.to_string());
            let (tx, rx, _) = built.and_then(|r| r).map_err(|e| End::unclean(format!("router link: {e}")))?;
            self.open_links.inc();
            self.pair = Some((tx, rx));
        }
        Ok(&mut self.pair.as_mut().expect("opened above").0)
    }

    /// Sends `packet` to the router, opening the link first if needed.
    pub async fn send(&mut self, packet: rumqttd::protocol::Packet) -> Result<(), End> {
        self.tx().await?.send(packet).await.map(|_| ()).map_err(|e| End::unclean(format!("router link: {e}")))
    }

    /// The next notification from the router; never, while the link is closed.
    pub async fn next(&mut self) -> Result<Option<Notification>, LinkError> {
        match &mut self.pair {
            Some((_, rx)) => rx.next().await,
            None => std::future::pending().await,
        }
    }

    /// The open link's halves.
    pub fn pair(&mut self) -> Option<&mut (LinkTx, LinkRx)> {
        self.pair.as_mut()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.pair.is_some() {
            self.open_links.dec();
        }
    }
}

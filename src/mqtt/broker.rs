//! The embedded rumqttd router and the links into it.
//!
//! The router runs on its own OS thread with no listener of its own: every
//! device reaches it through a local link opened by the front-end after the
//! CONNECT was checked. One more link, the bridge, publishes into the router
//! what did not arrive over MQTT (HTTP, WebSocket and other sites' events),
//! right after their commit, for tenants where an MQTT session subscribes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

use crate::event::Event;
use crate::log::CommitObserver;

/// Opens rumqttd local links. The router's sender type is private to
/// rumqttd, so it lives inside this closure.
pub type LinkFactory = Arc<dyn Fn(String, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync>;

/// Starts the rumqttd router (its own OS thread, no listeners of its own).
pub fn start_router(max_connections: usize) -> LinkFactory {
    let config = RouterConfig {
        max_connections: max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router_tx = Router::new(0, config).spawn();
    Arc::new(move |client_id: String, clean: bool| {
        LinkBuilder::new(&client_id, router_tx.clone())
            .clean_session(clean)
            .build()
            .map_err(|e: LinkError| e.to_string())
    })
}

/// Drops the persistent session the router keeps under `router_id` (a slot
/// recycled for another client id, see `state`): a clean connect under that
/// id replaces it, and the clean disconnect leaves no session behind.
/// Blocking: call it from the blocking pool.
pub fn drop_session(links: &LinkFactory, router_id: String) {
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
    match links(router_id.clone(), true) {
        Ok((mut tx, _rx, _)) => {
            let d = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let sent = tokio::runtime::Handle::current().block_on(tx.send(Packet::Disconnect(d, None)));
            if let Err(e) = sent {
                tracing::warn!(router_id, error = %e, "could not drop an evicted MQTT session");
            } else {
                tracing::info!(router_id, "evicted the oldest persistent MQTT session of its device");
            }
        }
        Err(e) => tracing::warn!(router_id, error = %e, "could not drop an evicted MQTT session"),
    }
}

/// Forgets a persistent session `after` its connection ended (its Session
/// Expiry Interval), unless its client connected again: the router's queue
/// and subscriptions, and its state in the site log (held QoS 2 packet ids,
/// subscriptions).
/// At shutdown the timer just ends: the session stays in the site log and
/// is judged again at the next start.
pub fn expire_later(
    deps: &super::MqttDeps,
    lease: super::state::Lease,
    after: std::time::Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let (sessions, links, log) = (deps.sessions.clone(), deps.links.clone(), deps.ingest.log().clone());
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(after) => {}
            () = shutdown.cancelled() => return,
        }
        let Some(router_id) = sessions.expire(&lease) else { return };
        let key = super::state::Sessions::key_of(&lease);
        tracing::info!(router_id, client_id = key.client_id, "mqtt session expired");
        let generation = Some(super::state::Sessions::generation_of(&lease));
        if let Err(e) = log.mqtt(crate::log::MqttOp::DropSession { key, generation }).await {
            tracing::warn!(error = %e, "expired session's state not cleared from the site log");
        }
        let _ = tokio::task::spawn_blocking(move || drop_session(&links, router_id)).await;
    });
}

/// Publishes committed non-MQTT events into the router (QoS 0, never
/// waiting: a full router queue skips the event for MQTT subscribers; the
/// durable copy stays in the log and on the WS/SSE/poll streams).
pub struct Bridge {
    link: Mutex<(LinkTx, LinkRx)>,
    /// MQTT sessions holding a subscription, per tenant: without any (and
    /// without persistent sessions, which may hold subscriptions offline),
    /// nothing is published into the router.
    subscribed: RwLock<HashMap<String, usize>>,
    sessions: Arc<super::state::Sessions>,
    /// The site's tenants-with-subscribers, which MQTT subscribers join.
    interest: Arc<crate::stream::interest::Interest>,
}

/// The bridge's router client id. rumqttd refuses `+$#/` in client ids, so
/// it starts with `!`, which no tenant name (the prefix of every device's
/// router client id) can.
const BRIDGE_CLIENT_ID: &str = "!outpost-bridge";

impl Bridge {
    /// Opens the bridge's link.
    pub fn open(
        links: &LinkFactory,
        sessions: Arc<super::state::Sessions>,
        interest: Arc<crate::stream::interest::Interest>,
    ) -> Result<Arc<Self>, String> {
        let (tx, rx, _) = links(BRIDGE_CLIENT_ID.to_string(), true)?;
        Ok(Arc::new(Self { link: Mutex::new((tx, rx)), subscribed: RwLock::new(HashMap::new()), sessions, interest }))
    }

    /// An MQTT session of `tenant` gained (`true`) or dropped (`false`) its
    /// subscriptions.
    pub fn subscriber(&self, tenant: &str, subscribed: bool) {
        let mut m = self.subscribed.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(tenant.to_string()).or_insert(0);
        *n = if subscribed { *n + 1 } else { n.saturating_sub(1) };
        if subscribed {
            self.interest.enter(tenant);
        } else {
            self.interest.leave(tenant);
        }
    }

    /// Puts the retained messages kept in the site log back into the router
    /// (at start), within the tenants' bounds. Returns how many.
    pub fn restore_retained(
        &self,
        sessions: &super::state::Sessions,
        retained: Vec<(String, String, Vec<u8>)>,
    ) -> usize {
        use futures_util::FutureExt;
        use rumqttd::protocol::{Packet, PublishProperties};
        let mut n = 0;
        let Ok(mut link) = self.link.lock() else { return 0 };
        for (tenant, topic, payload) in retained {
            if !sessions.retain(&tenant, &topic, payload.len()) {
                tracing::warn!(tenant, topic, "retained message over the tenant's bounds; not restored");
                continue;
            }
            let mut props = PublishProperties::default();
            super::codec::mark(&mut props, 1, true, "");
            let publish = super::codec::publish(0, false, true, 0, &Bytes::from(topic), &Bytes::from(payload));
            // The local link's send never waits (it queues and notifies).
            match link.0.send(Packet::Publish(publish, Some(props))).now_or_never() {
                Some(Ok(_)) => n += 1,
                other => tracing::warn!(result = ?other.map(|r| r.err()), "retained message not restored"),
            }
        }
        n
    }

    /// True while an MQTT session of `tenant` may receive its events.
    pub fn has_subscribers(&self, tenant: &str) -> bool {
        let m = self.subscribed.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(tenant).is_some_and(|n| *n > 0) || self.sessions.has_persistent(tenant)
    }
}

impl CommitObserver for Bridge {
    fn committed(&self, events: &[(i64, Event)]) {
        // Runs on the writer thread: MQTT-origin events were fanned out by
        // the front-end already, and tenants without subscribers cost nothing.
        for (_, e) in events {
            if e.protocol == "mqtt" || !self.has_subscribers(&e.tenant) {
                continue;
            }
            let topic = super::acl::stream_topic(&e.tenant, &e.device_id, &e.event_type);
            if let Ok(mut link) = self.link.lock()
                && let Err(err) = link.0.try_publish(topic, Bytes::from(e.payload.clone()))
            {
                tracing::debug!(error = %err, "event not published to MQTT (router busy)");
            }
        }
    }
}

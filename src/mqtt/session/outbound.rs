//! What goes back to the device: subscriptions (ACL and bounds), router
//! deliveries (checked against the connection's ACL) and the will.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{LastWill, Packet, Publish, SubAck, Subscribe, SubscribeReasonCode};

use super::super::PROTOCOL;
use super::super::acl::{delivery_allowed, subscribe_allowed};
use super::{End, Session, WILL_WAIT};
use crate::auth::Perm;

impl Session<'_> {
    pub(super) async fn subscribe(
        &mut self,
        sub: Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        link_tx: &mut LinkTx,
        suback_merge: &mut HashMap<u16, Vec<bool>>,
    ) -> Result<(), End> {
        let readable = self.can(Perm::ReadEvents);
        let max = self.deps.config.max_filters;
        let mut refused = Vec::with_capacity(sub.filters.len());
        for f in &sub.filters {
            let why = if !(readable && subscribe_allowed(&f.path, &self.tenant, &self.device_id)) {
                Some("forbidden_subscribe")
            } else if !self.filters.contains(&f.path) && self.filters.len() >= max {
                Some("max_filters")
            } else {
                self.filters.insert(f.path.clone());
                None
            };
            if let Some(reason) = why {
                tracing::info!(peer = %self.peer, device_id = self.device_id, filter = f.path, reason, max_filters = max, "mqtt subscribe refused (0x80)");
                self.deps.ingest.count_rejected(PROTOCOL, reason);
            }
            refused.push(why.is_some());
        }
        if refused.iter().all(|r| *r) {
            let codes = vec![SubscribeReasonCode::Failure; refused.len()];
            return self
                .write(Packet::SubAck(SubAck { pkid: sub.pkid, return_codes: codes }, None))
                .await
                .map_err(End::Unclean);
        }
        let pkid = sub.pkid;
        let allowed = Subscribe {
            pkid,
            filters: sub.filters.into_iter().zip(&refused).filter(|(_, r)| !**r).map(|(f, _)| f).collect(),
        };
        if refused.iter().any(|r| *r) {
            suback_merge.insert(pkid, refused);
        }
        if !self.subscribed {
            self.subscribed = true;
            self.deps.bridge.subscriber(&self.tenant, true);
        }
        link_tx.send(Packet::Subscribe(allowed, props)).await.map_err(|e| End::Unclean(format!("router link: {e}")))?;
        Ok(())
    }

    /// Writes what the router sends this device.
    pub(super) async fn deliver(
        &mut self,
        notification: Notification,
        link_rx: &mut LinkRx,
        suback_merge: &mut HashMap<u16, Vec<bool>>,
    ) -> Result<(), End> {
        if matches!(notification, Notification::Unschedule) {
            // The router paused this link (its buffer filled): resume it.
            return link_rx.wake().await.map_err(|e| End::Unclean(format!("router link: {e}")));
        }
        let packet: Option<Packet> = notification.into();
        let Some(mut packet) = packet else { return Ok(()) };
        if let Packet::SubAck(ack, _) = &mut packet
            && let Some(refused) = suback_merge.remove(&ack.pkid)
        {
            let mut granted = std::mem::take(&mut ack.return_codes).into_iter();
            ack.return_codes = refused
                .iter()
                .map(|r| {
                    if *r {
                        SubscribeReasonCode::Failure
                    } else {
                        granted.next().unwrap_or(SubscribeReasonCode::Failure)
                    }
                })
                .collect();
        }
        if let Packet::Disconnect(..) = packet {
            let _ = self.write(packet).await;
            let _ = self.flush().await;
            return Err(End::Unclean("router disconnected the link".into()));
        }
        // Defence in depth: whatever the router routes, a connection only
        // ever receives what its own ACL lets it subscribe to.
        if let Packet::Publish(p, _) = &packet
            && !delivery_allowed(&String::from_utf8_lossy(&p.topic), &self.tenant, &self.device_id)
        {
            tracing::warn!(peer = %self.peer, device_id = self.device_id, topic = %String::from_utf8_lossy(&p.topic),
                "router delivered outside this connection's ACL; dropped");
            return Ok(());
        }
        self.write(packet).await.map_err(End::Unclean)
    }

    /// Stores the will as an event, then publishes it to subscribers.
    pub(super) async fn publish_will(&self, link_tx: &mut LinkTx, will: LastWill) {
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        let Some((input, stream_topic)) = self.event_input(&will.topic, &will.message, None) else {
            tracing::warn!(device_id = self.device_id, topic, "will is not a JSON event of this device; not published");
            return;
        };
        // Wills count against the device's rate limits like any publish: over
        // a limit the will waits (at most WILL_WAIT) for the window to allow it.
        let waited = Instant::now();
        while let Err(l) = self.deps.ingest.check_rate(&self.tenant, &self.device_id, 1) {
            if waited.elapsed() + l.retry_after > WILL_WAIT {
                tracing::warn!(
                    device_id = self.device_id,
                    topic,
                    window = l.window.as_str(),
                    "will dropped: over the rate limit"
                );
                self.deps.ingest.count_rejected(PROTOCOL, "rate_limited");
                return;
            }
            tokio::time::sleep(l.retry_after).await;
        }
        match self.deps.ingest.submit_with(&self.principal, &self.tenant, vec![input], false, PROTOCOL, false).await {
            Ok(_) => {
                let retain = will.retain && self.deps.sessions.retain(&self.tenant, &stream_topic, will.message.len());
                let publish = Publish::new(Bytes::from(stream_topic), will.message.clone(), retain);
                if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
                    tracing::warn!(error = %e, device_id = self.device_id, "will stored but not published");
                } else {
                    tracing::info!(device_id = self.device_id, topic, "will stored and published");
                }
            }
            Err(e) => tracing::warn!(error = %e, device_id = self.device_id, "will refused"),
        }
    }
}

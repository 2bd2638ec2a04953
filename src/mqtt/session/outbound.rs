//! What goes back to the device: subscriptions (ACL, bounds, 5.0 options),
//! router deliveries (checked against the connection's ACL, at min(publish
//! QoS, granted QoS)) and the will.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties,
    RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode,
};
use tokio_util::sync::CancellationToken;

use super::super::PROTOCOL;
use super::super::acl::{delivery_allowed, subscribe_allowed, topic_matches};
use super::super::codec;
use super::connect::Will;
use super::link::Link;
use super::{End, Out, Session, SubOpts, WILL_WAIT};
use crate::auth::Perm;

type Merge = HashMap<u16, Vec<Option<SubscribeReasonCode>>>;

impl Session<'_> {
    pub(super) async fn subscribe(
        &mut self,
        sub: Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        link: &mut Link,
        suback_merge: &mut Merge,
    ) -> Result<(), End> {
        let readable = self.can(Perm::ReadEvents);
        let max = self.deps.config.max_filters;
        let mut refused = Vec::with_capacity(sub.filters.len());
        // Re-subscribes asking for the retained messages again (Retain
        // Handling 0): rumqttd sends them only for a new filter.
        let mut again = Vec::new();
        for f in &sub.filters {
            if self.filters.contains_key(&f.path) && f.retain_forward_rule == RetainForwardRule::OnEverySubscribe {
                again.push(f.path.clone());
            }
            let why = if !(readable && subscribe_allowed(&f.path, &self.tenant, &self.device_id)) {
                Some(("forbidden_subscribe", SubscribeReasonCode::NotAuthorized))
            } else if !self.filters.contains_key(&f.path) && self.filters.len() >= max {
                Some(("max_filters", SubscribeReasonCode::QuotaExceeded))
            } else {
                let new = !self.filters.contains_key(&f.path);
                let retained_wanted = match f.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => new,
                    RetainForwardRule::Never => false,
                };
                let opts = SubOpts {
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retained_wanted,
                };
                self.filters.insert(f.path.clone(), opts);
                None
            };
            if let Some((reason, _)) = why {
                tracing::info!(peer = %self.peer, device_id = self.device_id, filter = f.path, reason, max_filters = max, "mqtt subscribe refused");
                self.deps.ingest.count_rejected(PROTOCOL, reason);
            }
            // 3.x has one failure code (0x80).
            refused.push(why.map(|(_, code)| if self.v5() { code } else { SubscribeReasonCode::Failure }));
        }
        if refused.iter().all(Option::is_some) {
            let codes = refused.into_iter().flatten().collect();
            return self
                .write(Packet::SubAck(SubAck { pkid: sub.pkid, return_codes: codes }, None))
                .await
                .map_err(End::unclean);
        }
        let pkid = sub.pkid;
        let allowed = Subscribe {
            pkid,
            filters: sub.filters.into_iter().zip(&refused).filter(|(_, r)| r.is_none()).map(|(f, _)| f).collect(),
        };
        if refused.iter().any(Option::is_some) {
            suback_merge.insert(pkid, refused);
        }
        if !self.subscribed {
            self.subscribed = true;
            self.deps.bridge.subscriber(&self.tenant, true);
        }
        self.keep_subscriptions().await?;
        again.retain(|f| allowed.filters.iter().any(|a| a.path == *f));
        if !again.is_empty() {
            // The router handles one link's packets in order, in one pass:
            // no publish falls between the two.
            self.swallow_unsuback.insert(pkid);
            let unsub = rumqttd::protocol::Unsubscribe { pkid, filters: again };
            link.send(Packet::Unsubscribe(unsub, None)).await?;
        }
        link.send(Packet::Subscribe(allowed, props)).await
    }

    /// Handles what the router sends this connection.
    pub(super) async fn deliver(
        &mut self,
        notification: Notification,
        link: &mut Link,
        suback_merge: &mut Merge,
    ) -> Result<(), End> {
        if matches!(notification, Notification::Unschedule) {
            // The router paused this link (its buffer filled): resume it.
            let Some((_, link_rx)) = link.pair() else { return Ok(()) };
            return link_rx.wake().await.map_err(|e| End::unclean(format!("router link: {e}")));
        }
        let packet: Option<Packet> = notification.into();
        let Some(packet) = packet else { return Ok(()) };
        match packet {
            Packet::Publish(p, props) => self.deliver_publish(p, props, link).await,
            Packet::SubAck(ack, _) if self.swallow_suback.remove(&ack.pkid) => Ok(()),
            Packet::SubAck(mut ack, props) => {
                if let Some(refused) = suback_merge.remove(&ack.pkid) {
                    let mut granted = std::mem::take(&mut ack.return_codes).into_iter();
                    ack.return_codes = refused
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|| granted.next().unwrap_or(SubscribeReasonCode::Failure)))
                        .collect();
                }
                self.write(Packet::SubAck(ack, props)).await.map_err(End::unclean)
            }
            Packet::PubRel(rel, props) => self.router_pubrel(rel, props, link).await,
            Packet::Disconnect(..) => Err(End::coded(
                rumqttd::protocol::DisconnectReasonCode::SessionTakenOver,
                "session taken over by a new connection with the same client id",
            )),
            Packet::UnsubAck(ack, _) if self.swallow_unsuback.remove(&ack.pkid) => Ok(()),
            p @ Packet::UnsubAck(..) => self.write(p).await.map_err(End::unclean),
            // PUBACKs of our own QoS 0 hand-offs do not exist; the rest is not the client's.
            _ => Ok(()),
        }
    }

    /// One delivery: ACL, 5.0 subscription options, QoS = min(publish QoS,
    /// granted QoS), the client's Receive Maximum and Maximum Packet Size.
    async fn deliver_publish(
        &mut self,
        p: Publish,
        mut props: Option<PublishProperties>,
        link: &mut Link,
    ) -> Result<(), End> {
        let (router_qos, dup, retain, pkid) = codec::publish_flags(&p);
        let origin = codec::unmark(&mut props);
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let matching: Vec<SubOpts> =
            self.filters.iter().filter(|(f, _)| topic_matches(&topic, f)).map(|(_, o)| *o).collect();
        // Defence in depth: whatever the router routes, a connection only
        // ever receives what its own ACL lets it subscribe to.
        let skip = if !delivery_allowed(&topic, &self.tenant, &self.device_id) {
            tracing::warn!(peer = %self.peer, device_id = self.device_id, topic, "router delivered outside this connection's ACL; dropped");
            true
        } else if retain && !matching.is_empty() && matching.iter().all(|o| !o.retained_wanted) {
            true // Retain Handling: not at this subscribe
        } else {
            origin.router_id == self.router_id && !matching.is_empty() && matching.iter().all(|o| o.no_local)
        };
        let mut client_qos = origin.qos.min(router_qos);
        // Retain As Published: live deliveries keep the publisher's RETAIN.
        let retain = retain || (origin.retain && matching.iter().any(|o| o.retain_as_published));
        if !self.v5() {
            props = None;
        }
        let out = Delivery {
            qos: client_qos,
            dup: dup && client_qos > 0,
            retain,
            pkid,
            topic: p.topic,
            payload: p.payload,
            props,
        };
        let size = out.size();
        let too_large = size > self.client_max_packet;
        if too_large {
            tracing::info!(
                device_id = self.device_id,
                topic,
                size,
                max = self.client_max_packet,
                "delivery larger than the client's Maximum Packet Size; dropped"
            );
        }
        if skip || too_large {
            client_qos = 0;
        }
        if router_qos > 0 {
            self.out.insert(pkid, Out { router_qos, client_qos });
            self.router_acks.push_back((pkid, false));
            if client_qos == 0 {
                // The client is done at once (QoS 0, or nothing to send).
                self.ack_due(pkid, link).await?;
            }
        }
        if skip || too_large {
            return Ok(());
        }
        if client_qos > 0 && self.inflight >= self.client_receive_max {
            self.queued.push_back(out);
            return Ok(());
        }
        self.inflight += usize::from(client_qos > 0);
        self.write_delivery(out).await
    }

    /// Writes a delivery, with a 5.0 topic alias when the client allows
    /// them: the first delivery on a topic sets one, later ones send only
    /// the alias. Decided here, at write time, so a client always sees an
    /// alias set before it is used.
    async fn write_delivery(&mut self, d: Delivery) -> Result<(), End> {
        let Delivery { qos, dup, retain, pkid, mut topic, payload, mut props } = d;
        if self.v5() && self.client_alias_max > 0 {
            let alias = match self.out_aliases.get(&topic) {
                Some(a) => {
                    let a = *a;
                    topic = Bytes::new();
                    Some(a)
                }
                None if self.out_aliases.len() < usize::from(self.client_alias_max) => {
                    let a = self.out_aliases.len() as u16 + 1;
                    self.out_aliases.insert(topic.clone(), a);
                    Some(a)
                }
                None => None,
            };
            if let Some(a) = alias {
                props.get_or_insert_with(PublishProperties::default).topic_alias = Some(a);
            }
        }
        let out = codec::publish(qos, dup, retain, pkid, &topic, &payload);
        self.write(Packet::Publish(out, props)).await.map_err(End::unclean)
    }

    /// The router's PUBACK (router QoS 1) or PUBREC (QoS 2) of `pkid` is due;
    /// sends every due one at the head of the router's order.
    async fn ack_due(&mut self, pkid: u16, link: &mut Link) -> Result<(), End> {
        if let Some(e) = self.router_acks.iter_mut().find(|(p, _)| *p == pkid) {
            e.1 = true;
        }
        while let Some(&(pkid, true)) = self.router_acks.front() {
            self.router_acks.pop_front();
            let packet = match self.out.get(&pkid).map(|o| o.router_qos) {
                Some(2) => {
                    self.router_comps.push_back((pkid, false));
                    Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None)
                }
                _ => {
                    self.out.remove(&pkid);
                    Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)
                }
            };
            link.send(packet).await?;
        }
        Ok(())
    }

    /// The router's PUBCOMP of `pkid` is due; sends every due one in order.
    async fn comp_due(&mut self, pkid: u16, link: &mut Link) -> Result<(), End> {
        match self.router_comps.iter_mut().find(|(p, _)| *p == pkid) {
            Some(e) => e.1 = true,
            // Not tracked here (a PUBREL the router resent after a reconnect).
            None => {
                let comp = PubComp { pkid, reason: PubCompReason::Success };
                return link.send(Packet::PubComp(comp, None)).await;
            }
        }
        while let Some(&(pkid, true)) = self.router_comps.front() {
            self.router_comps.pop_front();
            self.out.remove(&pkid);
            let comp = PubComp { pkid, reason: PubCompReason::Success };
            link.send(Packet::PubComp(comp, None)).await?;
        }
        Ok(())
    }

    /// The router's PUBREL of a QoS 2 delivery: the client's if it got QoS 2,
    /// else answered here (the client got less and is done).
    async fn router_pubrel(
        &mut self,
        rel: rumqttd::protocol::PubRel,
        props: Option<rumqttd::protocol::PubRelProperties>,
        link: &mut Link,
    ) -> Result<(), End> {
        match self.out.get(&rel.pkid) {
            Some(o) if o.client_qos < 2 => self.comp_due(rel.pkid, link).await,
            _ => self.write(Packet::PubRel(rel, props)).await.map_err(End::unclean),
        }
    }

    /// The client's PUBACK (`step` 1), PUBREC (2) or PUBCOMP (3) of a delivery.
    pub(super) async fn client_completed(&mut self, pkid: u16, step: u8, link: &mut Link) -> Result<(), End> {
        let Some(o) = self.out.get(&pkid).copied() else {
            // Not tracked here (sent before a reconnect): the router's. A
            // session without a link was sent nothing: nothing to complete.
            if !link.is_open() {
                return Ok(());
            }
            let packet = match step {
                1 => Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None),
                2 => Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None),
                _ => Packet::PubComp(PubComp { pkid, reason: PubCompReason::Success }, None),
            };
            return link.send(packet).await;
        };
        let finished = match (step, o.client_qos) {
            (1, 1) => {
                self.ack_due(pkid, link).await?;
                true
            }
            (2, 2) => {
                self.ack_due(pkid, link).await?;
                false
            }
            (3, 2) => {
                self.comp_due(pkid, link).await?;
                true
            }
            _ => {
                return Err(End::coded(
                    rumqttd::protocol::DisconnectReasonCode::ProtocolError,
                    format!("acknowledgement of packet id {pkid} does not match its QoS {}", o.client_qos),
                ));
            }
        };
        if finished {
            self.inflight = self.inflight.saturating_sub(1);
            if let Some(d) = self.queued.pop_front() {
                self.inflight += 1;
                self.write_delivery(d).await?;
            }
        }
        Ok(())
    }

    /// Stores the will as an event, then publishes it to subscribers (after
    /// its 5.0 Will Delay, unless the client came back in the meantime).
    pub(super) async fn publish_will(&self, link: &mut Link, will: Will, shutdown: &CancellationToken) {
        let Will { message: will, props, delay } = will;
        if !delay.is_zero() {
            // A shutdown ends the wait: the will is published now.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {}
            }
            if self.lease.as_ref().is_some_and(|l| self.deps.sessions.resumed(l)) {
                tracing::info!(
                    device_id = self.device_id,
                    "will not published: the client reconnected within its will delay"
                );
                return;
            }
        }
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        let Some(event_type) = super::super::acl::event_topic(&topic, &self.tenant, &self.device_id) else {
            tracing::warn!(device_id = self.device_id, topic, "will is not an event of this device; not published");
            return;
        };
        let Ok(payload) = serde_json::value::RawValue::from_string(String::from_utf8_lossy(&will.message).into_owned())
        else {
            tracing::warn!(device_id = self.device_id, topic, "will payload is not JSON; not published");
            return;
        };
        let stream_topic = super::super::acl::stream_topic(&self.tenant, &self.device_id, event_type);
        let input = crate::event::EventInput {
            device_id: self.device_id.clone(),
            event_type: event_type.to_string(),
            payload,
            id: None,
            timestamp: None,
            redelivery: None,
            mqtt: None,
            properties: props
                .as_ref()
                .and_then(|p| codec::event_properties(p.content_type.as_deref(), &p.user_properties)),
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
                let mut pp = PublishProperties {
                    payload_format_indicator: props.as_ref().and_then(|p| p.payload_format_indicator),
                    message_expiry_interval: props.as_ref().and_then(|p| p.message_expiry_interval),
                    topic_alias: None,
                    response_topic: props.as_ref().and_then(|p| p.response_topic.clone()),
                    correlation_data: props.as_ref().and_then(|p| p.correlation_data.clone()),
                    user_properties: props.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default(),
                    subscription_identifiers: vec![],
                    content_type: props.as_ref().and_then(|p| p.content_type.clone()),
                };
                codec::mark(&mut pp, will.qos as u8, retain, &self.router_id);
                let publish = codec::publish(0, false, retain, 0, &Bytes::from(stream_topic), &will.message);
                if !self.may_reach_someone(link, retain) {
                    tracing::info!(
                        device_id = self.device_id,
                        topic,
                        "will stored (no MQTT subscriber to publish it to)"
                    );
                } else if let Err(e) = link.send(Packet::Publish(publish, Some(pp))).await {
                    tracing::warn!(error = ?e, device_id = self.device_id, "will stored but not published");
                } else {
                    tracing::info!(device_id = self.device_id, topic, "will stored and published");
                }
            }
            Err(e) => tracing::warn!(error = %e, device_id = self.device_id, "will refused"),
        }
    }
}

/// A delivery as decided (QoS, flags; 3.x: no properties), made into a
/// PUBLISH only when it is written, so a topic alias is set at write time.
pub(super) struct Delivery {
    qos: u8,
    dup: bool,
    retain: bool,
    pkid: u16,
    topic: Bytes,
    payload: Bytes,
    props: Option<PublishProperties>,
}

impl Delivery {
    /// Approximate encoded size (for the client's Maximum Packet Size).
    fn size(&self) -> usize {
        let pkid = if self.qos > 0 { 2 } else { 0 };
        5 + 2 + self.topic.len() + pkid + self.payload.len() + self.props.as_ref().map_or(0, props_len)
    }
}

/// Approximate encoded size of publish properties (for Maximum Packet Size).
fn props_len(p: &PublishProperties) -> usize {
    let strings = p.response_topic.as_ref().map_or(0, |s| 3 + s.len())
        + p.content_type.as_ref().map_or(0, |s| 3 + s.len())
        + p.correlation_data.as_ref().map_or(0, |s| 3 + s.len());
    let users: usize = p.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum();
    4 + strings + users + 5 * (p.message_expiry_interval.is_some() as usize) + 2 + 4 * p.subscription_identifiers.len()
}

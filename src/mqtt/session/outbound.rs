//! What goes to the device: subscriptions (ACL, bounds, 5.0 options) and
//! deliveries from the session's mailbox, at min(publish QoS, granted QoS),
//! within the client's Receive Maximum and Maximum Packet Size, with 5.0
//! topic aliases up to the client's maximum. QoS 1 and 2 deliveries stay in
//! the mailbox until the client completes them (in any order), so a
//! resumed session sends them again.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PubRel, PubRelReason, PublishProperties, RetainForwardRule, SubAck, SubAckProperties,
    Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};

use super::super::acl::{Matched, delivery_allowed, subscription};
use super::super::codec;
use super::super::fanout::{Inflight, Mailbox, Queued, Subscribed, Subscription};
use super::{End, Session};
use crate::auth::Perm;
use crate::log::MqttOp;

/// What the client's CONNECT said about deliveries to it (5.0; 3.x: no
/// limits). Its Maximum Packet Size is the wire's (`Wire::max_packet`),
/// which bounds every packet written to it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientLimits {
    /// QoS > 0 deliveries it accepts at once (Receive Maximum).
    pub receive_max: usize,
    /// Topic aliases it accepts (Topic Alias Maximum).
    pub alias_max: u16,
}

/// The outbound side of a connection.
pub(super) struct Outbound {
    pub mailbox: Arc<Mailbox>,
    /// The client's Receive Maximum, held to `mqtt.max_inflight`.
    receive_max: usize,
    alias_max: u16,
    /// 5.0: topic aliases this side set towards the client.
    aliases: HashMap<Bytes, u16>,
}

impl Outbound {
    pub(super) fn new(mailbox: Arc<Mailbox>, client: ClientLimits, max_inflight: usize) -> Self {
        Self {
            mailbox,
            receive_max: client.receive_max.min(max_inflight).max(1),
            alias_max: client.alias_max,
            aliases: HashMap::new(),
        }
    }

    /// The 5.0 topic alias for a delivery on `topic`: the first delivery on
    /// a topic sets one (sent with the topic), later ones send only the
    /// alias (`topic` emptied); none once the client's maximum is used up.
    /// Decided at write time, so a client always sees an alias set before
    /// it is used.
    fn alias(&mut self, topic: &mut Bytes) -> Option<u16> {
        if self.alias_max == 0 {
            return None;
        }
        if let Some(a) = self.aliases.get(topic) {
            *topic = Bytes::new();
            return Some(*a);
        }
        if self.aliases.len() >= usize::from(self.alias_max) {
            return None;
        }
        let a = self.aliases.len() as u16 + 1;
        self.aliases.insert(topic.clone(), a);
        Some(a)
    }
}

/// What the client's acknowledgement of an outgoing delivery does.
#[derive(Debug, PartialEq, Eq)]
enum AckStep {
    /// The delivery is done (PUBACK of QoS 1, PUBCOMP of a released QoS 2,
    /// or a 5.0 PUBREC with an error code).
    Complete,
    /// A QoS 2 PUBREC: the PUBREL goes out (again, for a repeated PUBREC).
    Release,
    /// An acknowledgement that does not fit the delivery's QoS.
    Mismatch,
}

/// `step`: 1 PUBACK, 2 PUBREC (with its `reason`), 3 PUBCOMP; of a
/// delivery of `qos`, `released` when its PUBREL was sent.
fn ack_step(step: u8, qos: u8, released: bool, reason: u8) -> AckStep {
    match (step, qos, released) {
        (1, 1, _) | (3, 2, true) => AckStep::Complete,
        (2, 2, false) if reason >= 0x80 => AckStep::Complete,
        (2, 2, _) => AckStep::Release,
        _ => AckStep::Mismatch,
    }
}

impl Session<'_> {
    /// SUBSCRIBE: each filter is checked (length, shared subscriptions, ACL,
    /// the session's bound), the SUBACK says what was granted, and retained
    /// messages follow it as the filter's Retain Handling asks.
    pub(super) async fn subscribe(&mut self, sub: Subscribe, props: Option<SubscribeProperties>) -> Result<(), End> {
        let readable = self.who.can(Perm::ReadEvents);
        let sub_id = props.and_then(|p| p.id);
        let fanout = self.deps.sessions.fanout().clone();
        let max_len = self.deps.config.max_topic_length;
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut reasons = Vec::new();
        let mut retained = Vec::new();
        let mut changed = false;
        for f in sub.filters {
            let allowed = subscription(&f.path, &self.who.tenant, &self.who.device_id, fanout.topics());
            let refused = if f.path.len() > max_len {
                Some(("topic_length", SubscribeReasonCode::TopicFilterInvalid))
            } else if f.path.starts_with("$share/") {
                Some(("shared_subscription", SubscribeReasonCode::SharedSubscriptionsNotSupported))
            } else if !readable {
                Some(("forbidden_subscribe", SubscribeReasonCode::NotAuthorized))
            } else if let Err(why) = &allowed {
                reasons.push(format!("{}: {why}", f.path));
                Some(("forbidden_subscribe", SubscribeReasonCode::NotAuthorized))
            } else {
                let s = Subscription {
                    filter: f.path.clone(),
                    qos: (f.qos as u8).min(2),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    id: sub_id,
                    layout: allowed == Ok(Matched::Layout),
                    since: 0,
                };
                match fanout.subscribe(&self.outbound.mailbox, s.clone()) {
                    Subscribed::Full => Some(("max_filters", SubscribeReasonCode::QuotaExceeded)),
                    outcome => {
                        changed = true;
                        let wanted = match f.retain_forward_rule {
                            RetainForwardRule::OnEverySubscribe => true,
                            RetainForwardRule::OnNewSubscribe => matches!(outcome, Subscribed::New),
                            RetainForwardRule::Never => false,
                        };
                        if wanted {
                            retained.push(s.clone());
                        }
                        codes.push(SubscribeReasonCode::Success(f.qos));
                        None
                    }
                }
            };
            if let Some((reason, code)) = refused {
                let why = allowed.err().unwrap_or_default();
                tracing::info!(peer = %self.who.peer, device_id = self.who.device_id, filter = f.path, reason, why,
                    max_filters = self.deps.config.max_filters, "mqtt subscribe refused");
                self.deps.ingest.count_rejected(super::PROTOCOL, reason);
                // 3.x has one failure code (0x80).
                codes.push(if self.v5() { code } else { SubscribeReasonCode::Failure });
            }
        }
        if changed {
            self.keep_subscriptions().await?;
        }
        // 5.0: the reason string says why filters were refused.
        let props = (self.v5() && !reasons.is_empty())
            .then(|| SubAckProperties { reason_string: Some(reasons.join("; ")), user_properties: Vec::new() });
        self.send(Packet::SubAck(SubAck { pkid: sub.pkid, return_codes: codes }, props))?;
        for s in retained {
            self.outbound.mailbox.queue_retained(&s, fanout.retained_for(&self.who.tenant, &s));
        }
        self.pull()
    }

    /// UNSUBSCRIBE: each filter goes (5.0: a reason code per filter, 0x11
    /// for one the session did not have); the UNSUBACK always comes.
    pub(super) async fn unsubscribe(&mut self, u: Unsubscribe, _: Option<UnsubscribeProperties>) -> Result<(), End> {
        let fanout = self.deps.sessions.fanout().clone();
        let reasons: Vec<UnsubAckReason> = u
            .filters
            .iter()
            .map(|f| {
                if fanout.unsubscribe(&self.outbound.mailbox, f) {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        if reasons.contains(&UnsubAckReason::Success) {
            self.keep_subscriptions().await?;
        }
        self.send(Packet::UnsubAck(UnsubAck { pkid: u.pkid, reasons }, None))
    }

    /// A persistent session keeps its subscriptions for a resume after a
    /// restart: committed to the site log before the SUBACK or UNSUBACK, so
    /// a session reported present has them.
    async fn keep_subscriptions(&mut self) -> Result<(), End> {
        if !self.lease.persistent {
            return Ok(());
        }
        let encoded = super::super::state::encode_subs(&self.outbound.mailbox.subscriptions());
        let op = MqttOp::Subscriptions {
            key: self.who.key(),
            generation: super::super::state::Sessions::generation_of(&self.lease),
            encoded,
        };
        self.deps
            .ingest
            .log()
            .mqtt(op)
            .await
            .map(|_| ())
            .map_err(|e| End::unclean(format!("subscriptions not recorded: {e}")))
    }

    /// A resumed session: what was in flight when its last connection ended
    /// is sent again (PUBLISH with DUP, or PUBREL), then what waits.
    pub(super) fn resume_deliveries(&mut self) -> Result<(), End> {
        if self.lease.present {
            let mb = self.outbound.mailbox.clone();
            let inflight: Vec<(u16, Inflight)> = mb.inner().in_flight();
            for (pkid, i) in inflight {
                if i.released {
                    self.send(Packet::PubRel(PubRel { pkid, reason: PubRelReason::Success }, None))?;
                } else {
                    self.write_delivery(&i.queued, pkid, true)?;
                }
            }
        }
        self.pull()
    }

    /// Takes deliveries from the mailbox while the socket has room and the
    /// client's Receive Maximum allows (QoS 0 ones are not counted, but keep
    /// their place in the order).
    pub(super) fn pull(&mut self) -> Result<(), End> {
        let mb = self.outbound.mailbox.clone();
        let max_bytes = mb.max_bytes();
        let mut inner = mb.inner();
        while self.wire.has_room() {
            let Some(head) = inner.queue.front() else { break };
            if head.qos > 0 && !inner.may_send_more(self.outbound.receive_max, max_bytes) {
                break;
            }
            let Some(q) = inner.pop() else { break };
            if q.msg.expiry_left() == Some(0) {
                continue; // its Message Expiry passed while it waited
            }
            let stream = std::str::from_utf8(q.msg.stream_topic()).unwrap_or("");
            if !delivery_allowed(stream, &self.who.tenant, &self.who.device_id) {
                tracing::warn!(device_id = self.who.device_id, "delivery outside this connection's ACL; dropped");
                continue;
            }
            if self.delivery_size(&q) > self.wire.max_packet {
                tracing::info!(
                    device_id = self.who.device_id,
                    max = self.wire.max_packet,
                    "delivery larger than the client's Maximum Packet Size; dropped"
                );
                continue;
            }
            let pkid = if q.qos > 0 { inner.send(&q) } else { 0 };
            self.write_delivery(&q, pkid, false)?;
        }
        Ok(())
    }

    /// The client's PUBACK (`step` 1), PUBREC (2, with its reason code) or
    /// PUBCOMP (3) of a delivery.
    pub(super) fn client_acked(&mut self, pkid: u16, step: u8, reason: u8) -> Result<(), End> {
        let mb = self.outbound.mailbox.clone();
        let mut inner = mb.inner();
        let Some(i) = inner.inflight_mut(pkid) else {
            return Ok(()); // not ours (any more): nothing to complete
        };
        match ack_step(step, i.queued.qos, i.released, reason) {
            AckStep::Complete => {
                inner.complete(pkid);
            }
            AckStep::Release => {
                i.released = true;
                drop(inner);
                return self.send(Packet::PubRel(PubRel { pkid, reason: PubRelReason::Success }, None));
            }
            AckStep::Mismatch => {
                let qos = i.queued.qos;
                return Err(End::coded(
                    DisconnectReasonCode::ProtocolError,
                    format!("acknowledgement of packet id {pkid} does not match its QoS {qos}"),
                ));
            }
        }
        drop(inner);
        self.pull()
    }

    /// Approximate encoded size of a delivery (for the client's Maximum
    /// Packet Size).
    fn delivery_size(&self, q: &Queued) -> usize {
        let props = if self.v5() { q.msg.props.as_ref().map_or(0, props_len) + 4 * q.sub_ids.len() } else { 0 };
        5 + 2 + q.msg.topic.len() + 2 + q.msg.payload.len() + props
    }

    /// Writes a delivery, with a 5.0 topic alias when the client allows
    /// them (see [`Outbound::alias`]).
    fn write_delivery(&mut self, q: &Queued, pkid: u16, dup: bool) -> Result<(), End> {
        let mut topic = q.msg.topic.clone();
        let props = if self.v5() {
            let mut p = q.msg.props.clone().unwrap_or_default();
            p.subscription_identifiers = q.sub_ids.clone();
            if let Some(left) = q.msg.expiry_left() {
                p.message_expiry_interval = Some(left);
            }
            p.topic_alias = self.outbound.alias(&mut topic);
            (p != PublishProperties::default()).then_some(p)
        } else {
            None
        };
        let publish = codec::publish(q.qos, dup && q.qos > 0, q.retain, pkid, &topic, &q.msg.payload);
        self.send(Packet::Publish(publish, props))
    }
}

/// Approximate encoded size of publish properties (for Maximum Packet Size).
fn props_len(p: &PublishProperties) -> usize {
    let strings = p.response_topic.as_ref().map_or(0, |s| 3 + s.len())
        + p.content_type.as_ref().map_or(0, |s| 3 + s.len())
        + p.correlation_data.as_ref().map_or(0, |s| 3 + s.len());
    let users: usize = p.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum();
    4 + strings + users + 5 * usize::from(p.message_expiry_interval.is_some()) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(alias_max: u16, receive_max: usize) -> Outbound {
        let config = crate::config::MqttConfig::default();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let fanout = crate::mqtt::fanout::Fanout::new(&config, Arc::default(), Arc::default(), metrics);
        let limits = ClientLimits { receive_max, alias_max };
        Outbound::new(fanout.mailbox("acme"), limits, 256)
    }

    #[test]
    fn a_topic_alias_is_set_once_then_used_alone_up_to_the_clients_maximum() {
        let mut o = outbound(2, 10);
        let (a, b, c) =
            (Bytes::from("acme/events/d1/x"), Bytes::from("acme/events/d1/y"), Bytes::from("acme/events/d1/z"));
        let mut t = a.clone();
        assert_eq!((o.alias(&mut t), &t), (Some(1), &a), "the first delivery sets the alias with its topic");
        let mut t = a.clone();
        assert_eq!((o.alias(&mut t), t.is_empty()), (Some(1), true), "later ones send the alias alone");
        let mut t = b.clone();
        assert_eq!(o.alias(&mut t), Some(2));
        let mut t = c.clone();
        assert_eq!((o.alias(&mut t), &t), (None, &c), "the client's maximum is used up: the topic goes whole");
        let mut none = outbound(0, 10);
        let mut t = a.clone();
        assert_eq!((none.alias(&mut t), &t), (None, &a), "a client that takes no aliases gets none");
    }

    #[test]
    fn the_receive_maximum_is_held_to_the_servers_and_is_at_least_one() {
        assert_eq!(outbound(0, 1000).receive_max, 256);
        assert_eq!(outbound(0, 0).receive_max, 1);
        assert_eq!(outbound(0, 5).receive_max, 5);
    }

    #[test]
    fn acknowledgements_complete_release_or_break_the_flow_by_qos() {
        assert_eq!(ack_step(1, 1, false, 0), AckStep::Complete, "PUBACK of QoS 1");
        assert_eq!(ack_step(2, 2, false, 0), AckStep::Release, "PUBREC of QoS 2: PUBREL");
        assert_eq!(ack_step(2, 2, true, 0), AckStep::Release, "a repeated PUBREC gets the PUBREL again");
        assert_eq!(ack_step(2, 2, false, 0x80), AckStep::Complete, "a 5.0 PUBREC with an error ends the flow");
        assert_eq!(ack_step(3, 2, true, 0), AckStep::Complete, "PUBCOMP after the PUBREL");
        assert_eq!(ack_step(3, 2, false, 0), AckStep::Mismatch, "PUBCOMP before any PUBREL");
        assert_eq!(ack_step(1, 2, false, 0), AckStep::Mismatch, "PUBACK of QoS 2");
        assert_eq!(ack_step(2, 1, false, 0), AckStep::Mismatch, "PUBREC of QoS 1");
    }
}

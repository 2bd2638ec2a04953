//! Packets from the device, in order. A PUBLISH is checked (topic alias,
//! ACL, size), waits for the rate limit and the log's budget, and joins a
//! FIFO of appends; it is acked (PUBACK / PUBREC) only once its event is
//! committed, in read order. SUBSCRIBE and UNSUBSCRIBE count against the
//! same rate limits. Everything else is dispatched as it comes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecProperties, PubRecReason, Publish, PublishProperties,
};

use super::super::acl::stream_topic;
use super::super::framing::{self, publish_header};
use super::super::topic_map::Resolved;
use super::{End, Session};
use crate::auth::Child;
use crate::auth::Perm;
use crate::event::{EventInput, fnv1a64};
use crate::ingest::Error as IngestError;
use crate::log::mqtt::{Facts, Published, Qos2Hold, Redelivery, Via};
use crate::log::{Appended, MqttOp};

/// A decoded packet and, for a PUBLISH, its (QoS, DUP, packet id).
type Decoded = (Packet, Option<(u8, bool, u16)>);

/// A publish read from the device: what it said and when, and (once its
/// topic is checked) whose event of which type it is.
pub(super) struct InPublish {
    publish: Publish,
    props: Option<PublishProperties>,
    qos: u8,
    dup: bool,
    pkid: u16,
    read_at: Instant,
    event_type: String,
    /// A gateway's publish for this child.
    child: Option<String>,
}

/// What a FIFO entry settled to, answered to the device in read order.
pub(super) enum Done {
    /// Publishes read together, each committed (or refused).
    Events(Vec<(InPublish, Result<Appended, IngestError>)>),
    /// A zero-byte retained publish cleared its (stream) topic (no event).
    Cleared(InPublish, String, Result<usize, crate::log::Error>),
    /// A 5.0 publish refused before the log: a negative PUBACK/PUBREC.
    Refused(InPublish, PubAckReason, String),
    /// A PUBREL: the QoS 2 packet id was released in the log.
    Released(u16, Result<usize, crate::log::Error>),
}

impl Done {
    /// What it answers of `Inbound::queued`: each publish of a batch, or one.
    fn entries(&self) -> usize {
        match self {
            Done::Events(each) => each.len(),
            _ => 1,
        }
    }
}

type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The inbound side of a connection.
pub(super) struct Inbound {
    /// Appends (and PUBRELs) in read order, answered as they settle.
    pub fifo: FuturesOrdered<Pending>,
    /// Publishes admitted since the last FIFO entry: they go to the log as
    /// one request (see [`Session::flush`]).
    batch: Vec<InPublish>,
    inputs: Vec<(EventInput, Box<Facts>)>,
    /// Publishes and other entries in the FIFO or the batch, not answered
    /// yet: bounded by `mqtt.max_inflight`.
    queued: usize,
    /// Decoded packets not handled yet.
    packets: VecDeque<Decoded>,
    /// A publish held back by a rate limit or a full log.
    held: Option<InPublish>,
    /// A SUBSCRIBE or UNSUBSCRIBE (the head of `packets`) waits for the rate limit.
    control_held: bool,
    /// When to try what is held again.
    pub resume_at: tokio::time::Instant,
    /// The device closed its side, or a newer connection took the client
    /// id over: finish what it sent, then end.
    pub eof: bool,
    pub taken: bool,
    /// QoS 1 publishes not answered yet, and QoS 2 packet ids not completed
    /// (PUBCOMP or a negative PUBREC): together bounded by the server's
    /// Receive Maximum (`mqtt.max_inflight`).
    open_qos1: usize,
    open_qos2: HashSet<u16>,
    /// 5.0: topic aliases the client set (at most `mqtt.topic_alias_max`).
    aliases: HashMap<u16, Bytes>,
}

impl Inbound {
    pub(super) fn new(alias_max: u16) -> Self {
        Self {
            fifo: FuturesOrdered::new(),
            batch: Vec::new(),
            inputs: Vec::new(),
            queued: 0,
            packets: VecDeque::new(),
            held: None,
            control_held: false,
            resume_at: tokio::time::Instant::now(),
            eof: false,
            taken: false,
            open_qos1: 0,
            open_qos2: HashSet::new(),
            aliases: HashMap::with_capacity(usize::from(alias_max).min(8)),
        }
    }

    /// Whether the device may be read: nothing held, nothing decoded left,
    /// room in the FIFO.
    pub(super) fn can_read(&self, max_inflight: usize) -> bool {
        !self.eof && self.held.is_none() && self.packets.is_empty() && self.queued < max_inflight
    }

    /// Adds an entry to the FIFO (the batch before it goes first: see
    /// [`Session::flush`]).
    fn push(&mut self, entry: Pending) {
        self.queued += 1;
        self.fifo.push_back(entry);
    }

    /// Something waits for the rate limit or the log's budget.
    pub(super) fn waiting(&self) -> bool {
        self.held.is_some() || self.control_held
    }

    /// Counts a QoS 1 or 2 publish as open; 5.0 bounds them by the
    /// server's Receive Maximum (`max`).
    fn open(&mut self, qos: u8, pkid: u16, v5: bool, max: usize) -> Result<(), End> {
        match qos {
            1 => self.open_qos1 += 1,
            2 => {
                self.open_qos2.insert(pkid);
            }
            _ => {}
        }
        if v5 && self.open_qos1 + self.open_qos2.len() > max {
            return Err(End::coded(
                DisconnectReasonCode::ReceiveMaximumExceeded,
                format!("more than Receive Maximum = {max} QoS 1 and 2 publishes unacknowledged"),
            ));
        }
        Ok(())
    }

    /// A publish was answered: a QoS 1 one is done; a QoS 2 one only with
    /// a negative PUBREC (else at its PUBCOMP, see [`Inbound::completed`]).
    fn answered(&mut self, qos: u8, pkid: u16, success: bool) {
        match qos {
            1 => self.open_qos1 = self.open_qos1.saturating_sub(1),
            2 if !success => {
                self.open_qos2.remove(&pkid);
            }
            _ => {}
        }
    }

    /// A QoS 2 packet id was completed (PUBCOMP sent).
    fn completed(&mut self, pkid: u16) {
        self.open_qos2.remove(&pkid);
    }

    /// How the session ends once the device closed its side (or was taken
    /// over) and everything it sent was handled.
    pub(super) fn finished(&self) -> Option<End> {
        if !(self.eof && self.packets.is_empty() && !self.waiting()) {
            return None;
        }
        Some(if self.taken { End::taken_over() } else { End::unclean("connection closed by the device") })
    }
}

impl Session<'_> {
    /// Decodes every complete packet in the read buffer, after checking the
    /// bytes rumqttd's codec does not.
    pub(super) fn decode(&mut self) -> Result<(), End> {
        loop {
            let malformed = |s: &Self, code, why: String| {
                s.deps.ingest.count_rejected(super::PROTOCOL, "malformed");
                End::coded(code, format!("malformed packet: {why}"))
            };
            if let Err(why) = framing::check(&self.wire.read_buf) {
                return Err(malformed(self, DisconnectReasonCode::MalformedPacket, why));
            }
            let header = publish_header(&self.wire.read_buf);
            match self.wire.codec.read(&mut self.wire.read_buf, self.deps.config.max_packet_size) {
                Ok(p) => self.inbound.packets.push_back((p, header)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e @ rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                    return Err(malformed(self, DisconnectReasonCode::PacketTooLarge, e.to_string()));
                }
                Err(e) => return Err(malformed(self, DisconnectReasonCode::MalformedPacket, e.to_string())),
            }
        }
    }

    /// Handles decoded packets in order; stops at one the rate limit or the
    /// log's budget holds back. The publishes admitted go to the log
    /// together, however it stops (a DISCONNECT after them included).
    pub(super) async fn admit(&mut self) -> Result<(), End> {
        let r = self.admit_packets().await;
        self.flush();
        r
    }

    /// Publishes admitted since the last FIFO entry go to the log as one
    /// request, one FIFO entry: one trip to the writer for what one read
    /// brought instead of one per publish. Everything else that joins the
    /// FIFO flushes them first, so answers keep the read order.
    pub(super) fn flush(&mut self) {
        if self.inbound.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.inbound.batch);
        let inputs = std::mem::take(&mut self.inbound.inputs);
        let (ingest, principal, tenant) =
            (self.deps.ingest.clone(), self.who.principal.clone(), self.who.tenant.clone());
        self.inbound.fifo.push_back(Box::pin(async move {
            let answers = ingest.submit_mqtt(&principal, &tenant, inputs).await;
            Done::Events(batch.into_iter().zip(answers).collect())
        }));
    }

    /// Adds a FIFO entry after the publishes admitted before it.
    fn push(&mut self, entry: Pending) {
        self.flush();
        self.inbound.push(entry);
    }

    async fn admit_packets(&mut self) -> Result<(), End> {
        loop {
            if let Some(publish) = self.inbound.held.take() {
                if !self.admit_held(publish) {
                    return Ok(());
                }
                continue;
            }
            if self.inbound.queued >= self.deps.config.max_inflight {
                return Ok(());
            }
            let Some((packet, header)) = self.inbound.packets.pop_front() else { return Ok(()) };
            match packet {
                Packet::Publish(publish, props) => {
                    let (qos, dup, pkid) = header.unwrap_or((0, false, 0));
                    self.inbound.open(qos, pkid, self.v5(), self.deps.config.max_inflight)?;
                    let publish = InPublish {
                        publish,
                        props,
                        qos,
                        dup,
                        pkid,
                        read_at: Instant::now(),
                        event_type: String::new(),
                        child: None,
                    };
                    self.inbound.held = self.check_publish(publish)?;
                }
                p @ (Packet::Subscribe(..) | Packet::Unsubscribe(..)) => {
                    self.inbound.control_held = false;
                    if let Err(l) = self.deps.ingest.check_rate(&self.who.tenant, &self.who.device_id, 1) {
                        if self.inbound.taken {
                            self.inbound.packets.clear(); // see admit_held
                            return Ok(());
                        }
                        self.inbound.packets.push_front((p, None));
                        self.inbound.control_held = true;
                        self.inbound.resume_at = tokio::time::Instant::now() + l.retry_after;
                        self.deps.metrics.mqtt_throttled.inc();
                        return Ok(());
                    }
                    self.dispatch(p).await?;
                }
                other => self.dispatch(other).await?,
            }
        }
    }

    /// A held publish goes to the log if the budget and the rate limit allow
    /// it now; false (still held, with a time to retry) when not. A
    /// connection that was taken over does not wait: what it still has over
    /// the limits is dropped, not acked (the device sends it again on its
    /// new connection), so it never holds its slot for a rate window.
    fn admit_held(&mut self, publish: InPublish) -> bool {
        let wait = if self.deps.ingest.log().is_full() {
            Some(Duration::from_millis(500))
        } else {
            // A child's event counts for the child and for its gateway.
            let (tenant, device) = (&self.who.tenant, &self.who.device_id);
            let checked = match &publish.child {
                None => self.deps.ingest.check_rate(tenant, device, 1),
                Some(child) => self.deps.ingest.check_rate_pair(tenant, child, device, 1),
            };
            match checked {
                Ok(()) => None,
                Err(l) => {
                    self.deps.metrics.mqtt_throttled.inc();
                    Some(l.retry_after)
                }
            }
        };
        match wait {
            None => {
                self.submit(publish);
                true
            }
            Some(_) if self.inbound.taken => {
                tracing::info!(
                    device_id = self.who.device_id,
                    packets = self.inbound.packets.len() + 1,
                    "taken over while over its rate limit or the log's budget: the rest of the old connection is dropped, not acked"
                );
                self.inbound.packets.clear();
                self.inbound.control_held = false;
                false
            }
            Some(after) => {
                self.inbound.held = Some(publish);
                self.inbound.resume_at = tokio::time::Instant::now() + after;
                false
            }
        }
    }

    /// A PUBREL: the packet id is released in the log, and answered in order.
    pub(super) fn release(&mut self, pkid: u16) {
        let log = self.deps.ingest.log().clone();
        let op = MqttOp::Release { key: self.who.key(), session_id: self.lease.session_id, pkid };
        self.push(Box::pin(async move { Done::Released(pkid, log.mqtt(op).await) }));
    }

    /// Resolves the topic alias of a 5.0 publish: an alias set is kept (its
    /// topic checked against `mqtt.max_topic_length` first), an alias used
    /// is replaced by its topic.
    fn resolve_alias(&mut self, publish: &mut InPublish) -> Result<(), End> {
        let Some(alias) = publish.props.as_mut().and_then(|p| p.topic_alias.take()) else { return Ok(()) };
        let max = self.deps.config.topic_alias_max;
        if alias == 0 || alias > max {
            return Err(End::coded(
                DisconnectReasonCode::TopicAliasInvalid,
                format!("topic alias {alias} outside 1..={max}"),
            ));
        }
        if publish.publish.topic.is_empty() {
            match self.inbound.aliases.get(&alias) {
                Some(t) => publish.publish.topic = t.clone(),
                None => {
                    return Err(End::coded(
                        DisconnectReasonCode::ProtocolError,
                        format!("topic alias {alias} used before it was set"),
                    ));
                }
            }
        } else if publish.publish.topic.len() <= self.deps.config.max_topic_length
            && matches!(
                self.deps.topics.resolve(
                    std::str::from_utf8(&publish.publish.topic).unwrap_or(""),
                    &self.who.tenant,
                    &self.who.device_id,
                ),
                Resolved::Event(_) | Resolved::Other { .. }
            )
        {
            // Only event topics are kept (of this device or, for a gateway,
            // of another): an alias of anything else is refused with its
            // publish below, and another device's is checked there.
            self.inbound.aliases.insert(alias, Bytes::copy_from_slice(&publish.publish.topic));
        }
        Ok(())
    }

    /// Checks a publish from the device: topic alias, topic ACL, payload.
    /// `Some` when it goes on to the log (through the rate limit); a refusal
    /// closes a 3.x connection, and is a negative ack for 5.0 (QoS 0: dropped).
    fn check_publish(&mut self, mut publish: InPublish) -> Result<Option<InPublish>, End> {
        self.resolve_alias(&mut publish)?;
        if publish.props.as_ref().is_some_and(|p| !p.subscription_identifiers.is_empty()) {
            return Err(End::coded(
                DisconnectReasonCode::ProtocolError,
                "a PUBLISH from a client carries a subscription identifier",
            ));
        }
        let max_topic = self.deps.config.max_topic_length;
        if publish.publish.topic.len() > max_topic {
            self.deps.ingest.count_rejected(super::PROTOCOL, "topic_length");
            let why = format!(
                "publish refused: topic of {} bytes is over mqtt.max_topic_length = {max_topic}",
                publish.publish.topic.len()
            );
            return self.refuse(publish, PubAckReason::TopicNameInvalid, why).map(|()| None);
        }
        let topic = String::from_utf8_lossy(&publish.publish.topic).into_owned();
        let (tenant, device_id) = (&self.who.tenant, &self.who.device_id);
        let may_write = self.who.can(Perm::WriteEvents);
        let refusal = match self.deps.topics.resolve(&topic, tenant, device_id) {
            Resolved::Event(t) if may_write => {
                publish.event_type = t.into_owned();
                None
            }
            Resolved::Other { device, event_type, why } if may_write => match self.child(device) {
                Ok(()) => {
                    publish.event_type = event_type.into_owned();
                    publish.child = Some(device.to_string());
                    None
                }
                Err(Some(why)) => {
                    self.deps.ingest.count_rejected(super::PROTOCOL, "forbidden_child");
                    return self.refuse_child(publish, format!("publish to {topic:?} refused: {why}")).map(|()| None);
                }
                Err(None) => Some(why),
            },
            other => other.refusal(may_write, tenant, device_id),
        };
        if let Some(why) = refusal {
            self.deps.ingest.count_rejected(super::PROTOCOL, "forbidden_topic");
            let why = format!("publish to {topic:?} refused: {why}");
            return self.refuse(publish, PubAckReason::NotAuthorized, why).map(|()| None);
        }
        let payload = &publish.publish.payload;
        if payload.is_empty() && publish.publish.retain {
            return Ok(Some(publish)); // clears the retained message: no event
        }
        // Any payload is an event: what is not a JSON object is kept
        // byte-exact inside one (`crate::payload`).
        Ok(Some(publish))
    }

    /// A refused publish: 3.x closes the connection (there is no negative
    /// ack); 5.0 answers it in order with a negative PUBACK/PUBREC.
    fn refuse(&mut self, publish: InPublish, code: PubAckReason, why: String) -> Result<(), End> {
        if !self.v5() {
            return Err(End::unclean(format!("{why}; not acked")));
        }
        tracing::info!(peer = %self.who.peer, device_id = self.who.device_id, reason = why, "mqtt publish refused");
        if publish.qos > 0 {
            self.push(Box::pin(async move { Done::Refused(publish, code, why) }));
        }
        Ok(())
    }

    /// Whether this login may publish for `child`: `Err(None)` when it is
    /// no gateway (the topic is refused as another device's), `Err(Some)`
    /// naming why a gateway may not publish for this id.
    fn child(&self, child: &str) -> Result<(), Option<String>> {
        let registry = self.deps.auth.registry();
        let (tenant, gateway) = (&self.who.tenant, &self.who.device_id);
        if !registry.is_gateway(tenant, gateway) {
            return Err(None);
        }
        match registry.child(tenant, gateway, child) {
            Child::Registered => Ok(()),
            Child::Unknown if self.deps.config.gateway_max_children > 0 => Ok(()),
            Child::Unknown => Err(Some(format!(
                "device {tenant}/{child} is not registered (mqtt.gateway_max_children = 0: register children with outpost device add --via {gateway})"
            ))),
            Child::Refused(why) => Err(Some(why)),
        }
    }

    /// A gateway's publish for a device it may not publish for: 5.0 gets a
    /// negative ack; 3.x, which has none, gets its ack without the event
    /// being stored (as mosquitto does for a publish its ACL denies):
    /// closing the connection would stop the gateway's other children,
    /// and it would send the same publish again. Logged and counted.
    fn refuse_child(&mut self, publish: InPublish, why: String) -> Result<(), End> {
        if self.v5() {
            return self.refuse(publish, PubAckReason::NotAuthorized, why);
        }
        self.dropped_for_child(&why);
        if publish.qos > 0 {
            self.push(Box::pin(async move { Done::Refused(publish, PubAckReason::Success, why) }));
        }
        Ok(())
    }

    /// The answer to a child's publish its transaction refused: a negative
    /// ack (5.0), or (3.x) the ack of a publish not stored, as
    /// [`refuse_child`](Self::refuse_child) says.
    fn answer_child(&mut self, publish: InPublish, code: PubAckReason, why: String) -> Result<(), End> {
        if self.v5() {
            tracing::info!(peer = %self.who.peer, gateway = self.who.device_id, reason = why, "mqtt publish refused");
            return self.ack(publish.qos, publish.pkid, code, Some(why));
        }
        self.dropped_for_child(&why);
        self.ack(publish.qos, publish.pkid, PubAckReason::Success, None)
    }

    fn dropped_for_child(&self, why: &str) {
        tracing::warn!(
            peer = %self.who.peer,
            gateway = self.who.device_id,
            reason = why,
            "gateway publish dropped (MQTT 3.x has no negative ack: acked, not stored)"
        );
    }

    /// Starts the append of one admitted publish; its future joins the FIFO.
    fn submit(&mut self, mut publish: InPublish) {
        let event_type = std::mem::take(&mut publish.event_type);
        let device_id = publish.child.clone().unwrap_or_else(|| self.who.device_id.clone());
        // The stream topic only for what keeps a retained message: most
        // publishes need none.
        let topic = || stream_topic(&self.who.tenant, &device_id, &event_type);
        if publish.publish.payload.is_empty() {
            let topic = topic();
            self.clear_retained(publish, topic);
            return;
        }
        let fanout = self.deps.sessions.fanout();
        let mut retain_topic = None;
        if publish.publish.retain {
            let topic = topic();
            if fanout.retain_fits(&self.who.tenant, &topic, publish.publish.payload.len()) {
                retain_topic = Some(topic);
            } else {
                tracing::warn!(
                    device_id = self.who.device_id,
                    topic,
                    "retained-message bound of the tenant reached: stored and delivered, not retained"
                );
                publish.publish.retain = false;
            }
        }
        let retain = retain_topic.is_some();
        let (qos, pkid, payload) = (publish.qos, publish.pkid, &publish.publish.payload);
        let redelivery =
            (qos > 0).then(|| Redelivery { pkid, digest: fnv1a64(payload), check: qos == 1 && publish.dup });
        let mut forwarded = publish.props.clone().unwrap_or_default();
        forwarded.topic_alias = None;
        let gateway = publish.child.as_ref().map(|_| self.who.device_id.as_str());
        let properties =
            crate::payload::event_properties(forwarded.content_type.as_deref(), &forwarded.user_properties, gateway);
        let facts = Facts {
            redelivery,
            qos2: (qos == 2).then(|| Qos2Hold {
                device_id: self.who.device_id.clone(),
                client_id: self.who.client_id.clone(),
                session_id: self.lease.session_id,
            }),
            retain_topic,
            via: publish.child.as_ref().map(|_| Via {
                gateway: self.who.device_id.clone(),
                max_children: self.deps.config.gateway_max_children,
            }),
            published: Some(Published {
                qos,
                retain,
                origin: self.outbound.mailbox.id,
                props: (forwarded != PublishProperties::default()).then_some(forwarded),
            }),
        };
        let (payload, properties, sent_bytes) = crate::payload::from_device(payload, properties);
        let input = EventInput { device_id, event_type, payload, id: None, timestamp: None, properties, sent_bytes };
        self.inbound.queued += 1;
        self.inbound.batch.push(publish);
        self.inbound.inputs.push((input, Box::new(facts)));
    }

    /// A zero-byte retained publish: the topic's retained message goes (in
    /// the log, then in memory), and subscribers get the empty message.
    fn clear_retained(&mut self, publish: InPublish, topic: String) {
        let log = self.deps.ingest.log().clone();
        let op = MqttOp::ClearRetained { tenant: self.who.tenant.clone(), topic: topic.clone() };
        self.push(Box::pin(async move {
            let r = log.mqtt(op).await;
            Done::Cleared(publish, topic, r)
        }));
    }

    /// Answers a settled FIFO entry: the acks, after the commit.
    pub(super) async fn settle(&mut self, done: Done) -> Result<(), End> {
        self.inbound.queued -= done.entries();
        match done {
            Done::Events(each) => {
                for (publish, result) in each {
                    self.settle_event(publish, result)?;
                }
                Ok(())
            }
            Done::Cleared(publish, topic, result) => match result {
                Ok(_) => {
                    self.ack(publish.qos, publish.pkid, PubAckReason::Success, None)?;
                    self.pass_on_clear(&publish, topic);
                    Ok(())
                }
                Err(e) => Err(End::unclean(format!("retained message not cleared, not acked: {e}"))),
            },
            Done::Refused(publish, code, why) => self.ack(publish.qos, publish.pkid, code, Some(why)),
            Done::Released(pkid, result) => match result {
                Ok(n) => {
                    self.inbound.completed(pkid);
                    let reason = if n == 0 && self.v5() {
                        PubCompReason::PacketIdentifierNotFound
                    } else {
                        PubCompReason::Success
                    };
                    self.send(Packet::PubComp(PubComp { pkid, reason }, None))
                }
                Err(e) => Err(End::unclean(format!("PUBREL not recorded: {e}"))),
            },
        }
    }

    /// The ack of one publish's event, after its commit (or its refusal).
    fn settle_event(&mut self, publish: InPublish, result: Result<Appended, IngestError>) -> Result<(), End> {
        self.deps.metrics.mqtt_commit_wait.observe(publish.read_at.elapsed().as_secs_f64());
        match result {
            Ok(_) => self.ack(publish.qos, publish.pkid, PubAckReason::Success, None),
            // A child refused in the event's own transaction (revoked since
            // its publish was read, or one over the gateway's bound).
            Err(IngestError::ChildRefused { why, quota }) => {
                self.deps.ingest.count_rejected(super::PROTOCOL, "forbidden_child");
                let code = if quota { PubAckReason::QuotaExceeded } else { PubAckReason::NotAuthorized };
                self.answer_child(publish, code, format!("publish refused: {why}"))
            }
            Err(e) => {
                let code = match &e {
                    IngestError::RateLimited(_) | IngestError::Full { .. } => PubAckReason::QuotaExceeded,
                    IngestError::Invalid { .. } => PubAckReason::PayloadFormatInvalid,
                    IngestError::OtherDevice { .. } => PubAckReason::NotAuthorized,
                    _ => PubAckReason::UnspecifiedError,
                };
                let why = format!("publish refused, not acked: {e}");
                if !self.v5() {
                    return Err(End::unclean(why));
                }
                tracing::info!(peer = %self.who.peer, device_id = self.who.device_id, reason = why, "mqtt publish refused");
                self.ack(publish.qos, publish.pkid, code, Some(why))
            }
        }
    }

    /// The cleared topic keeps no retained message; subscribers get the
    /// empty publish like any other.
    fn pass_on_clear(&self, publish: &InPublish, topic: String) {
        let fanout = self.deps.sessions.fanout();
        fanout.set_retained(&self.who.tenant, &topic, None);
        let msg = std::sync::Arc::new(super::super::fanout::Message {
            topic: Bytes::from(topic),
            stream: None,
            payload: Bytes::new(),
            qos: publish.qos,
            retain: true,
            props: None,
            origin: self.outbound.mailbox.id,
            at: Instant::now(),
        });
        fanout.publish(&self.who.tenant, &msg, fanout.number());
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) with `code`; nothing for QoS 0.
    fn ack(&mut self, qos: u8, pkid: u16, code: PubAckReason, why: Option<String>) -> Result<(), End> {
        let why = why.filter(|_| self.terms.problem_info);
        self.inbound.answered(qos, pkid, code == PubAckReason::Success);
        let packet = match qos {
            1 => Packet::PubAck(
                PubAck { pkid, reason: code },
                why.map(|r| PubAckProperties { reason_string: Some(r), user_properties: vec![] }),
            ),
            2 => Packet::PubRec(
                PubRec { pkid, reason: pubrec_reason(code) },
                why.map(|r| PubRecProperties { reason_string: Some(r), user_properties: vec![] }),
            ),
            _ => return Ok(()),
        };
        self.send(packet)
    }
}

fn pubrec_reason(code: PubAckReason) -> PubRecReason {
    match code {
        PubAckReason::Success => PubRecReason::Success,
        PubAckReason::NoMatchingSubscribers => PubRecReason::NoMatchingSubscribers,
        PubAckReason::UnspecifiedError => PubRecReason::UnspecifiedError,
        PubAckReason::ImplementationSpecificError => PubRecReason::ImplementationSpecificError,
        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
        PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
        PubAckReason::PacketIdentifierInUse => PubRecReason::PacketIdentifierInUse,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_maximum_counts_qos_1_until_answered_and_qos_2_until_completed() {
        let mut i = Inbound::new(0);
        i.open(0, 0, true, 2).unwrap();
        i.open(1, 1, true, 2).unwrap();
        i.open(2, 2, true, 2).unwrap();
        let over = i.open(1, 3, true, 2).unwrap_err();
        assert!(matches!(over, End::Unclean(_, Some(DisconnectReasonCode::ReceiveMaximumExceeded))), "{over:?}");
        i.answered(1, 3, true);
        i.answered(1, 1, true);
        i.answered(2, 2, true);
        i.open(1, 4, true, 2).unwrap();
        assert!(i.open(1, 5, true, 2).is_err(), "a QoS 2 id stays open after a successful PUBREC");
        i.answered(1, 5, true);
        i.answered(1, 4, true);
        i.completed(2);
        i.open(1, 5, true, 2).unwrap();
        i.open(2, 6, true, 2).unwrap();
        i.answered(2, 6, false);
        i.open(1, 7, true, 2).expect("a negative PUBREC ends the QoS 2 flow");
        let mut old = Inbound::new(0);
        for pkid in 1..10 {
            old.open(1, pkid, false, 2).expect("3.x has no Receive Maximum to break");
        }
    }

    #[test]
    fn a_connection_is_read_only_while_nothing_waits_and_ends_once_all_it_sent_is_handled() {
        let mut i = Inbound::new(0);
        assert!(i.can_read(1) && !i.waiting() && i.finished().is_none());
        i.packets.push_back((Packet::PingReq(rumqttd::protocol::PingReq), None));
        assert!(!i.can_read(1), "decoded packets first");
        i.eof = true;
        assert!(i.finished().is_none(), "the device closed, but a packet is left");
        i.packets.clear();
        i.control_held = true;
        assert!(i.waiting() && i.finished().is_none(), "a SUBSCRIBE waits for the rate limit");
        i.control_held = false;
        assert!(matches!(i.finished(), Some(End::Unclean(_, None))), "closed by the device: the will fires");
        i.taken = true;
        assert!(matches!(i.finished(), Some(End::Unclean(_, Some(DisconnectReasonCode::SessionTakenOver)))));
        let mut full = Inbound::new(0);
        full.push(Box::pin(async { Done::Released(1, Ok(1)) }));
        assert!(!full.can_read(1) && full.can_read(2), "the FIFO is bounded by max_inflight");
    }
}

//! One device connection: CONNECT checks (`connect`), the durable-before-ack
//! publish FIFO (here), subscriptions, deliveries and the will (`outbound`).

mod connect;
mod link;
mod outbound;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, PingResp, PubAck, PubAckProperties, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecProperties, PubRecReason, Publish, PublishProperties,
};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::acl::event_topic;
use super::codec::{self, Codec, Version};
use super::framing::{self, publish_header};
use super::{MqttDeps, PROTOCOL};
use crate::auth::{Perm, Principal, SessionEnd};
use crate::event::{EventInput, MqttFacts, Redelivery, fnv1a64};
use crate::ingest::Error as IngestError;
use crate::log::{Appended, MqttOp};
use link::Link;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the device: no will.
    Clean,
    /// Appliance shutdown: no will.
    Shutdown,
    /// Socket closed, keep-alive expired, protocol error…: the will fires.
    /// A 5.0 client is told the reason code first, where there is one.
    Unclean(String, Option<DisconnectReasonCode>),
    /// The device was revoked or its token expired: no will, no more acks.
    Ended(SessionEnd),
}

impl End {
    fn unclean(reason: impl Into<String>) -> Self {
        End::Unclean(reason.into(), None)
    }

    fn coded(code: DisconnectReasonCode, reason: impl Into<String>) -> Self {
        End::Unclean(reason.into(), Some(code))
    }
}

/// Longest a will waits for the device's rate limit to allow it.
const WILL_WAIT: Duration = Duration::from_secs(60);

/// Byte streams a session runs over: TCP, or a WebSocket's binary frames.
pub type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// A decoded packet and, for a PUBLISH, its (QoS, DUP, packet id).
type Decoded = (Packet, Option<(u8, bool, u16)>);

/// A publish read from the device: what it said and when.
struct Inbound {
    publish: Publish,
    props: Option<PublishProperties>,
    qos: u8,
    dup: bool,
    pkid: u16,
    read_at: Instant,
}

/// What a FIFO entry settled to, answered to the device in read order.
enum Done {
    /// A publish's event was committed (or refused).
    Event(Inbound, Result<Vec<Appended>, IngestError>),
    /// A zero-byte retained publish cleared its topic (no event).
    Cleared(Inbound, Result<usize, crate::log::Error>),
    /// A 5.0 publish refused before the log: a negative PUBACK/PUBREC.
    Refused(Inbound, PubAckReason, String),
    /// A PUBREL: the QoS 2 packet id was released in the log.
    Released(u16, Result<usize, crate::log::Error>),
}

type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A subscription's 5.0 options, as the front-end applies them.
#[derive(Debug, Clone, Copy)]
struct SubOpts {
    /// The QoS granted.
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    /// Retained messages sent at this subscribe are wanted (Retain Handling).
    retained_wanted: bool,
}

impl SubOpts {
    /// A subscription of a resumed session (no retained messages: it is
    /// not a new subscribe).
    fn resumed(s: &super::state::StoredSub) -> Self {
        Self { qos: s.qos, no_local: s.no_local, retain_as_published: s.retain_as_published, retained_wanted: false }
    }
}

/// A delivery the client has not completed: the QoS the router sent it
/// with, and the QoS the client got (min of publish and granted QoS).
#[derive(Debug, Clone, Copy)]
struct Out {
    router_qos: u8,
    client_qos: u8,
}

/// Most bytes a connection taken over still reads of what had arrived.
const ARRIVED_MAX: usize = 1 << 20;

/// Initial read and write buffer of a connection.
const SESSION_BUF: usize = 1024;

pub(super) struct Session<'a> {
    deps: &'a MqttDeps,
    peer: SocketAddr,
    reader: Reader,
    writer: Writer,
    read_buf: BytesMut,
    write_buf: BytesMut,
    codec: Codec,
    tenant: String,
    device_id: String,
    client_id: String,
    principal: Principal,
    keep_alive: Option<Duration>,
    /// The token's `exp` (unix seconds): the session ends then.
    expires_at: i64,
    /// The router's client id for this connection (a slot, see `state`).
    router_id: String,
    lease: Option<super::state::Lease>,
    /// Filters this connection holds (bounded by `mqtt.max_filters`).
    filters: HashMap<String, SubOpts>,
    /// Counted in the bridge's MQTT subscriber count.
    subscribed: bool,
    /// 5.0: reason strings and user properties on acks are wanted.
    problem_info: bool,
    /// 5.0: QoS > 0 deliveries the client accepts at once (Receive Maximum).
    client_receive_max: usize,
    /// 5.0: largest packet the client accepts.
    client_max_packet: usize,
    /// 5.0: topic aliases the client set.
    aliases: HashMap<u16, Bytes>,
    /// 5.0: topic aliases this side set towards the client (at most the
    /// client's Topic Alias Maximum).
    out_aliases: HashMap<Bytes, u16>,
    client_alias_max: u16,
    /// UNSUBACKs of our own router unsubscribes (a Retain Handling 0
    /// re-subscribe): not the client's.
    swallow_unsuback: std::collections::HashSet<u16>,
    /// SUBACKs of our own router subscribes (a resumed session's
    /// subscriptions restored after a restart): not the client's.
    swallow_suback: std::collections::HashSet<u16>,
    /// Session expiry granted, seconds (0: the session ends with the connection).
    session_expiry: u32,
    /// The router keeps this connection's session after it ends.
    persistent: bool,
    /// Deliveries not completed by the client, by the router's packet id.
    out: HashMap<u16, Out>,
    /// Router deliveries of QoS > 0 not yet acked to the router, in its
    /// order, and whether their ack is due: rumqttd takes PUBACK/PUBREC only
    /// in delivery order, while clients may complete QoS 1 and 2 flows in
    /// any order.
    router_acks: VecDeque<(u16, bool)>,
    /// QoS 2 deliveries PUBREC'd to the router, awaiting PUBCOMP, likewise.
    router_comps: VecDeque<(u16, bool)>,
    /// QoS > 0 deliveries sent and not completed (≤ `client_receive_max`).
    inflight: usize,
    /// QoS 1 publishes from the client not yet answered, and QoS 2 packet
    /// ids not yet completed (PUBCOMP or a negative PUBREC): together
    /// bounded by the server's Receive Maximum (`mqtt.max_inflight`).
    open_qos1: usize,
    open_qos2: std::collections::HashSet<u16>,
    /// Deliveries waiting for the client's Receive Maximum.
    queued: VecDeque<outbound::Delivery>,
}

/// Whether the router has dropped this link (it does on an ack it did not
/// expect): its queue then never drains. Takes what notifications are left,
/// which a session that has ended no longer needs.
fn router_dropped(link_rx: &mut LinkRx) -> bool {
    for _ in 0..1024 {
        match link_rx.recv_deadline(std::time::Instant::now()) {
            Ok(_) => {}
            Err(rumqttd::local::LinkError::RecvTimeout(flume::RecvTimeoutError::Disconnected)) => return true,
            Err(_) => return false,
        }
    }
    false
}

impl<'a> Session<'a> {
    pub(super) async fn serve(
        reader: Reader,
        writer: Writer,
        peer: SocketAddr,
        deps: &'a MqttDeps,
        shutdown: CancellationToken,
    ) {
        let mut s = Session {
            deps,
            peer,
            reader,
            writer,
            // Small to start (a thousand idle devices are a thousand of
            // these); both grow to what a connection actually sends.
            read_buf: BytesMut::with_capacity(SESSION_BUF),
            write_buf: BytesMut::with_capacity(SESSION_BUF),
            codec: Codec { version: Version::V311 },
            tenant: String::new(),
            device_id: String::new(),
            client_id: String::new(),
            principal: Principal::Admin,
            keep_alive: None,
            expires_at: 0,
            router_id: String::new(),
            lease: None,
            filters: HashMap::new(),
            subscribed: false,
            problem_info: true,
            client_receive_max: usize::from(u16::MAX),
            client_max_packet: usize::MAX,
            aliases: HashMap::new(),
            out_aliases: HashMap::new(),
            client_alias_max: 0,
            swallow_unsuback: Default::default(),
            swallow_suback: Default::default(),
            session_expiry: 0,
            persistent: false,
            out: HashMap::new(),
            router_acks: VecDeque::new(),
            router_comps: VecDeque::new(),
            inflight: 0,
            open_qos1: 0,
            open_qos2: Default::default(),
            queued: VecDeque::new(),
        };
        let Some((mut link, will)) = s.handshake(&shutdown).await else {
            if let Some(lease) = &s.lease {
                deps.sessions.release(lease);
            }
            return;
        };
        if deps.sessions.connected(&s.tenant, &s.device_id) {
            s.presence(true).await;
        }
        let end = s.session(&mut link, &shutdown).await;
        let fire_will = match &end {
            End::Unclean(reason, code) => {
                tracing::info!(%peer, device_id = s.device_id, reason, "mqtt device dropped");
                if let Some(code) = code {
                    s.disconnect(*code, reason).await;
                }
                true
            }
            End::Clean => {
                tracing::info!(%peer, device_id = s.device_id, "mqtt device disconnected");
                false
            }
            End::Ended(why) => {
                tracing::info!(%peer, device_id = s.device_id, reason = why.code(), "mqtt session ended: device revoked or token expired");
                s.disconnect(DisconnectReasonCode::NotAuthorized, "device revoked or token expired").await;
                false
            }
            End::Shutdown => {
                s.disconnect(DisconnectReasonCode::ServerShuttingDown, "the appliance is shutting down").await;
                false
            }
        };
        if fire_will && let Some(will) = will {
            s.publish_will(&mut link, will, &shutdown).await;
        }
        // A clean close of the local link (the router drops its state; wills
        // are ours). Sent once the router took what is queued: each send
        // notifies it, and a notification left over after the DISCONNECT
        // would be logged as an error for a connection already gone.
        if let Some((link_tx, link_rx)) = link.pair() {
            for _ in 0..100 {
                if link_tx.buffer().is_empty() || router_dropped(link_rx) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let _ = link_tx.send(Packet::Disconnect(disconnect, None)).await;
        }
        if s.subscribed {
            deps.bridge.subscriber(&s.tenant, false);
        }
        if let Some(lease) = &s.lease {
            deps.sessions.release(lease);
            // The session's state in the site log ends with it (expiry 0),
            // or waits for its client (a newer connection's is untouched).
            let op = MqttOp::EndSession {
                key: super::state::Sessions::key_of(lease),
                generation: super::state::Sessions::generation_of(lease),
                expiry: if s.persistent { s.session_expiry } else { 0 },
            };
            if let Err(e) = deps.ingest.log().mqtt(op).await {
                tracing::warn!(error = %e, device_id = s.device_id, "mqtt: session end not recorded in the site log");
            }
            // A persistent session outlives its connection by its expiry
            // (which the DISCONNECT may have changed, down to 0: at once).
            if s.persistent {
                let after = Duration::from_secs(u64::from(s.session_expiry));
                super::broker::expire_later(deps, lease.clone(), after, &shutdown);
            }
        }
        // Online until the device's last session ends.
        if deps.sessions.disconnected(&s.tenant, &s.device_id) {
            s.presence(false).await;
        }
    }

    /// Whose session state this connection holds in the site log.
    fn session_key(&self) -> crate::log::mqtt::SessionKey {
        crate::log::mqtt::SessionKey {
            tenant: self.tenant.clone(),
            device_id: self.device_id.clone(),
            client_id: self.client_id.clone(),
        }
    }

    /// A persistent session keeps its subscriptions for its resume: in
    /// memory, and in the site log (committed before the SUBACK or UNSUBACK,
    /// so a session reported present after a restart has them).
    async fn keep_subscriptions(&self) -> Result<(), End> {
        let Some(lease) = self.lease.as_ref().filter(|_| self.persistent) else { return Ok(()) };
        let subs: Vec<_> = self
            .filters
            .iter()
            .map(|(f, o)| super::state::StoredSub {
                filter: f.clone(),
                qos: o.qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
            })
            .collect();
        let encoded = super::state::encode_subs(&subs);
        if !self.deps.sessions.set_subs(lease, subs) {
            return Ok(()); // taken over: the newer connection owns the session
        }
        let op = MqttOp::Subscriptions {
            key: self.session_key(),
            generation: super::state::Sessions::generation_of(lease),
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

    fn can(&self, perm: Perm) -> bool {
        matches!(&self.principal, Principal::Device { perms, .. } if perms.contains(&perm))
    }

    fn v5(&self) -> bool {
        self.codec.version.is_v5()
    }

    async fn presence(&self, online: bool) {
        let log = self.deps.ingest.log();
        if let Err(e) = log.presence(self.tenant.clone(), self.device_id.clone(), online).await {
            tracing::warn!(error = %e, device_id = self.device_id, "presence update failed");
        }
    }

    /// A 5.0 DISCONNECT with its reason (3.x has none: the socket just closes).
    async fn disconnect(&mut self, code: DisconnectReasonCode, reason: &str) {
        if !self.v5() {
            return;
        }
        let props = DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(reason.to_string()),
            user_properties: vec![],
            server_reference: None,
        };
        let _ = self.write(Packet::Disconnect(Disconnect { reason_code: code }, Some(props))).await;
        let _ = self.flush().await;
    }

    async fn write(&mut self, packet: Packet) -> Result<(), String> {
        self.codec.write(packet, &mut self.write_buf).map_err(|e| format!("encode: {e}"))?;
        if self.write_buf.len() > 64 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        if !self.write_buf.is_empty() {
            self.writer.write_all(&self.write_buf).await.map_err(|e| format!("write: {e}"))?;
            self.writer.flush().await.map_err(|e| format!("write: {e}"))?;
            self.write_buf.clear();
        }
        Ok(())
    }

    /// The connected session: returns how it ended.
    async fn session(&mut self, link: &mut Link, shutdown: &CancellationToken) -> End {
        let mut fifo: FuturesOrdered<Pending> = FuturesOrdered::new();
        // A publish held back by a rate limit or a full log, and when to retry it.
        let mut held: Option<Inbound> = None;
        let mut resume_at = tokio::time::Instant::now();
        // Router SUBACKs to merge with our own refusals: pkid → refusal per position.
        let mut suback_merge: HashMap<u16, Vec<Option<rumqttd::protocol::SubscribeReasonCode>>> = HashMap::new();
        let mut deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
        let mut packets: VecDeque<Decoded> = VecDeque::new();
        // The device closed its side, or a newer connection took the
        // client id over: finish what it sent, then end.
        let mut eof = false;
        let mut taken = false;
        let (auth, principal) = (self.deps.auth.clone(), self.principal.clone());
        let ended = auth.session_end(&principal, self.expires_at);
        tokio::pin!(ended);
        let taken_over = self.lease.as_ref().map(|l| l.taken_over.clone()).unwrap_or_default();
        let end = loop {
            // Bytes already buffered (they may have come with the CONNECT, or
            // several packets in one segment) are decoded before any new read.
            if let Err(end) = self.decode(&mut packets) {
                break end;
            }
            // Admit held and already-read publishes while the limits allow.
            if let Err(end) =
                self.admit(&mut packets, &mut held, &mut resume_at, &mut fifo, link, &mut suback_merge).await
            {
                break end;
            }
            if let Err(e) = self.flush().await {
                break End::unclean(e);
            }
            if eof && packets.is_empty() && held.is_none() {
                break if taken {
                    End::coded(
                        DisconnectReasonCode::SessionTakenOver,
                        "session taken over by a new connection with the same client id",
                    )
                } else {
                    End::unclean("connection closed by the device")
                };
            }
            let can_read = !eof && held.is_none() && packets.is_empty() && fifo.len() < self.deps.config.max_inflight;
            if !can_read {
                // Keep-alive counts only while the device is read: time the
                // appliance holds the read (rate limit, full log, commits in
                // flight) never expires it, so throttling fires no will.
                deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
            }
            let ka = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break End::Shutdown,
                // Revoked or expired: what is not committed yet is never acked.
                why = &mut ended => return End::Ended(why),
                // A session with a router link also hears it from the router.
                // What the device sent before its new connection (already
                // here, e.g. a QoS 0 PUBLISH and DISCONNECT) is still
                // processed: it is read up to what has arrived, then the
                // session ends as if the device had closed it.
                _ = taken_over.cancelled(), if !taken => {
                    taken = true;
                    self.read_arrived();
                    eof = true;
                }
                _ = ka, if can_read => break End::coded(
                    DisconnectReasonCode::KeepAliveTimeout,
                    "keep-alive expired (no packet within 1.5 × keep-alive)",
                ),
                _ = tokio::time::sleep_until(resume_at), if held.is_some() => {}
                r = self.reader.read_buf(&mut self.read_buf), if can_read => match r {
                    Ok(0) => eof = true,
                    Err(e) => break End::unclean(format!("read: {e}")),
                    Ok(_) => deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k),
                },
                Some(done) = fifo.next() => {
                    // Everything the same commit settled is answered in one
                    // write: one send per commit, not one per PUBACK.
                    let (mut next, mut failed) = (Some(done), None);
                    while let Some(done) = next.take() {
                        if let Err(end) = self.settle(done, link).await {
                            failed = Some(end);
                            break;
                        }
                        next = fifo.next().now_or_never().flatten();
                    }
                    if let Some(end) = failed {
                        break end;
                    }
                }
                n = link.next() => match n {
                    Ok(Some(notification)) => if let Err(end) = self.deliver(notification, link, &mut suback_merge).await {
                        break end;
                    },
                    Ok(None) => {}
                    // The router drops a link when its client id connects again.
                    Err(_) if self.lease.as_ref().is_some_and(|l| self.deps.sessions.resumed(l)) => break End::coded(
                        DisconnectReasonCode::SessionTakenOver,
                        "session taken over by a new connection with the same client id",
                    ),
                    Err(e) => break End::unclean(format!("router link closed: {e}")),
                },
            }
        };
        // Every publish read before the end is committed and handed to the
        // router, whatever the segmentation: a QoS 0 publish followed by
        // DISCONNECT in one write is stored like any other.
        while let Some(done) = fifo.next().await {
            if let Done::Event(inbound, Ok(appended)) = done
                && !appended.iter().all(|a| a.duplicate)
            {
                let _ = self.fan_out(inbound, link).await;
            }
        }
        end
    }

    /// Reads what has already arrived, without waiting (at most
    /// [`ARRIVED_MAX`] bytes).
    fn read_arrived(&mut self) {
        let start = self.read_buf.len();
        while self.read_buf.len() - start < ARRIVED_MAX {
            match self.reader.read_buf(&mut self.read_buf).now_or_never() {
                Some(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// Decodes every complete packet in the read buffer, after checking the
    /// bytes rumqttd's codec does not.
    fn decode(&mut self, packets: &mut VecDeque<Decoded>) -> Result<(), End> {
        loop {
            let malformed = |s: &Self, code, why: String| {
                s.deps.ingest.count_rejected(PROTOCOL, "malformed");
                End::coded(code, format!("malformed packet: {why}"))
            };
            if let Err(why) = framing::check(&self.read_buf) {
                return Err(malformed(self, DisconnectReasonCode::MalformedPacket, why));
            }
            let header = publish_header(&self.read_buf);
            match self.codec.read(&mut self.read_buf, self.deps.config.max_packet_size) {
                Ok(p) => packets.push_back((p, header)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e @ rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                    return Err(malformed(self, DisconnectReasonCode::PacketTooLarge, e.to_string()));
                }
                Err(e) => return Err(malformed(self, DisconnectReasonCode::MalformedPacket, e.to_string())),
            }
        }
    }

    /// Handles decoded packets in order; stops at a publish the rate limit or
    /// the log's budget holds back.
    async fn admit(
        &mut self,
        packets: &mut VecDeque<Decoded>,
        held: &mut Option<Inbound>,
        resume_at: &mut tokio::time::Instant,
        fifo: &mut FuturesOrdered<Pending>,
        link: &mut Link,
        suback_merge: &mut HashMap<u16, Vec<Option<rumqttd::protocol::SubscribeReasonCode>>>,
    ) -> Result<(), End> {
        loop {
            if let Some(inbound) = held.take() {
                if self.deps.ingest.log().is_full() {
                    *held = Some(inbound);
                    *resume_at = tokio::time::Instant::now() + Duration::from_millis(500);
                    return Ok(());
                }
                if let Err(l) = self.deps.ingest.check_rate(&self.tenant, &self.device_id, 1) {
                    *held = Some(inbound);
                    *resume_at = tokio::time::Instant::now() + l.retry_after;
                    self.deps.metrics.mqtt_throttled.inc();
                    return Ok(());
                }
                self.submit(inbound, fifo)?;
                continue;
            }
            if fifo.len() >= self.deps.config.max_inflight {
                return Ok(());
            }
            let Some((packet, header)) = packets.pop_front() else { return Ok(()) };
            match packet {
                Packet::Publish(publish, props) => {
                    let (qos, dup, pkid) = header.unwrap_or((0, false, 0));
                    match qos {
                        1 => self.open_qos1 += 1,
                        2 => {
                            self.open_qos2.insert(pkid);
                        }
                        _ => {}
                    }
                    if self.v5() && self.open_qos1 + self.open_qos2.len() > self.deps.config.max_inflight {
                        return Err(End::coded(
                            DisconnectReasonCode::ReceiveMaximumExceeded,
                            format!(
                                "more than Receive Maximum = {} QoS 1 and 2 publishes unacknowledged",
                                self.deps.config.max_inflight
                            ),
                        ));
                    }
                    let inbound = Inbound { publish, props, qos, dup, pkid, read_at: Instant::now() };
                    if let Some(inbound) = self.check_publish(inbound, fifo)? {
                        *held = Some(inbound);
                    }
                }
                Packet::PubRel(rel, _) => {
                    let log = self.deps.ingest.log().clone();
                    let op = MqttOp::Release { key: self.session_key(), pkid: rel.pkid };
                    fifo.push_back(Box::pin(async move { Done::Released(rel.pkid, log.mqtt(op).await) }));
                }
                Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)).await.map_err(End::unclean)?,
                Packet::Subscribe(sub, props) => self.subscribe(sub, props, link, suback_merge).await?,
                Packet::Unsubscribe(u, props) => {
                    for f in &u.filters {
                        self.filters.remove(f);
                    }
                    self.keep_subscriptions().await?;
                    link.send(Packet::Unsubscribe(u, props)).await?;
                }
                Packet::PubAck(ack, _) => self.client_completed(ack.pkid, 1, link).await?,
                Packet::PubRec(rec, _) => self.client_completed(rec.pkid, 2, link).await?,
                Packet::PubComp(comp, _) => self.client_completed(comp.pkid, 3, link).await?,
                Packet::Disconnect(d, props) => {
                    // 5.0: the DISCONNECT may change the session expiry, but
                    // not give one to a session that had none [MQTT-3.14.2-2].
                    if let Some(e) = props.and_then(|p| p.session_expiry_interval) {
                        if self.session_expiry == 0 && e > 0 {
                            return Err(End::coded(
                                DisconnectReasonCode::ProtocolError,
                                "DISCONNECT sets a session expiry on a session that had none",
                            ));
                        }
                        let max = self.deps.config.max_session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32;
                        self.session_expiry = e.min(max);
                    }
                    return Err(if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                        End::unclean("DISCONNECT with will message (0x04)")
                    } else {
                        End::Clean
                    });
                }
                other => {
                    // Named by kind only: a packet's Debug output can carry credentials.
                    self.deps.ingest.count_rejected(PROTOCOL, "protocol");
                    return Err(End::coded(
                        DisconnectReasonCode::ProtocolError,
                        format!("unexpected {} packet", framing::name(&other)),
                    ));
                }
            }
        }
    }

    /// Checks a publish from the device: topic alias, topic ACL, payload.
    /// `Some` when it goes on to the log (through the rate limit); a refusal
    /// closes a 3.x connection, and is a negative ack for 5.0 (QoS 0: dropped).
    fn check_publish(
        &mut self,
        mut inbound: Inbound,
        fifo: &mut FuturesOrdered<Pending>,
    ) -> Result<Option<Inbound>, End> {
        if let Some(alias) = inbound.props.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 || alias > self.deps.config.topic_alias_max {
                return Err(End::coded(
                    DisconnectReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias} outside 1..={}", self.deps.config.topic_alias_max),
                ));
            }
            if inbound.publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => inbound.publish.topic = t.clone(),
                    None => {
                        return Err(End::coded(
                            DisconnectReasonCode::ProtocolError,
                            format!("topic alias {alias} used before it was set"),
                        ));
                    }
                }
            } else {
                self.aliases.insert(alias, inbound.publish.topic.clone());
            }
        }
        if inbound.props.as_ref().is_some_and(|p| !p.subscription_identifiers.is_empty()) {
            return Err(End::coded(
                DisconnectReasonCode::ProtocolError,
                "a PUBLISH from a client carries a subscription identifier",
            ));
        }
        let topic = String::from_utf8_lossy(&inbound.publish.topic).into_owned();
        if !self.can(Perm::WriteEvents) || event_topic(&topic, &self.tenant, &self.device_id).is_none() {
            self.deps.ingest.count_rejected(PROTOCOL, "forbidden_topic");
            let why = format!(
                "publish to {topic:?} refused: devices publish to {}/devices/{}/events/<event_type>",
                self.tenant, self.device_id
            );
            return self.refuse(inbound, PubAckReason::NotAuthorized, why, fifo).map(|()| None);
        }
        let payload = &inbound.publish.payload;
        if payload.is_empty() && inbound.publish.retain {
            return Ok(Some(inbound)); // clears the retained message: no event
        }
        if std::str::from_utf8(payload).ok().is_none_or(|s| !s.trim_start().starts_with('{')) {
            self.deps.ingest.count_rejected(PROTOCOL, "invalid");
            let why = format!("publish to {topic:?} refused: payload is not a JSON object");
            return self.refuse(inbound, PubAckReason::PayloadFormatInvalid, why, fifo).map(|()| None);
        }
        Ok(Some(inbound))
    }

    /// A refused publish: 3.x closes the connection (there is no negative
    /// ack); 5.0 answers it in order with a negative PUBACK/PUBREC.
    fn refuse(
        &mut self,
        inbound: Inbound,
        code: PubAckReason,
        why: String,
        fifo: &mut FuturesOrdered<Pending>,
    ) -> Result<(), End> {
        if !self.v5() {
            return Err(End::unclean(format!("{why}; not acked")));
        }
        tracing::info!(peer = %self.peer, device_id = self.device_id, reason = why, "mqtt publish refused");
        if inbound.qos > 0 {
            fifo.push_back(Box::pin(async move { Done::Refused(inbound, code, why) }));
        }
        Ok(())
    }

    /// Starts the append of one admitted publish; its future joins the FIFO.
    fn submit(&self, mut inbound: Inbound, fifo: &mut FuturesOrdered<Pending>) -> Result<(), End> {
        let event_type =
            event_topic(std::str::from_utf8(&inbound.publish.topic).unwrap_or(""), &self.tenant, &self.device_id)
                .unwrap_or_default()
                .to_string();
        let stream_topic = super::acl::stream_topic(&self.tenant, &self.device_id, &event_type);
        inbound.publish.topic = Bytes::from(stream_topic.clone());
        if inbound.publish.payload.is_empty() {
            self.deps.sessions.retain(&self.tenant, &stream_topic, 0);
            let log = self.deps.ingest.log().clone();
            let op = MqttOp::ClearRetained { tenant: self.tenant.clone(), topic: stream_topic };
            fifo.push_back(Box::pin(async move {
                let r = log.mqtt(op).await;
                Done::Cleared(inbound, r)
            }));
            return Ok(());
        }
        let retain = inbound.publish.retain
            && if self.deps.sessions.retain(&self.tenant, &stream_topic, inbound.publish.payload.len()) {
                true
            } else {
                tracing::warn!(
                    device_id = self.device_id,
                    topic = stream_topic,
                    "retained-message bound of the tenant reached: stored and delivered, not retained"
                );
                inbound.publish.retain = false;
                false
            };
        let (qos, pkid, payload) = (inbound.qos, inbound.pkid, &inbound.publish.payload);
        let redelivery =
            (qos > 0).then(|| Redelivery { pkid, digest: fnv1a64(payload), check: qos == 1 && inbound.dup });
        let facts = MqttFacts {
            qos2_client: (qos == 2).then(|| self.client_id.clone()),
            retain_topic: retain.then_some(stream_topic),
        };
        let payload = std::str::from_utf8(payload).unwrap_or("").to_string();
        let Ok(payload) = RawValue::from_string(payload) else {
            // Not JSON after all: refused like any invalid payload.
            let why = "payload is not JSON".to_string();
            let r = Err(IngestError::Invalid {
                index: None,
                invalid: crate::event::Invalid { field: "payload".into(), message: why },
            });
            fifo.push_back(Box::pin(async move { Done::Event(inbound, r) }));
            return Ok(());
        };
        let input = EventInput {
            device_id: self.device_id.clone(),
            event_type,
            payload,
            id: None,
            timestamp: None,
            redelivery,
            mqtt: (facts != MqttFacts::default()).then(|| Box::new(facts)),
            properties: inbound
                .props
                .as_ref()
                .and_then(|p| codec::event_properties(p.content_type.as_deref(), &p.user_properties)),
        };
        let (ingest, principal, tenant) = (self.deps.ingest.clone(), self.principal.clone(), self.tenant.clone());
        fifo.push_back(Box::pin(async move {
            let r = ingest.submit_with(&principal, &tenant, vec![input], false, PROTOCOL, false).await;
            Done::Event(inbound, r)
        }));
        Ok(())
    }

    /// Answers a settled FIFO entry: the ack (after the commit), and the
    /// fan-out of a new event to subscribers.
    async fn settle(&mut self, done: Done, link: &mut Link) -> Result<(), End> {
        match done {
            Done::Event(inbound, result) => {
                self.deps.metrics.mqtt_commit_wait.observe(inbound.read_at.elapsed().as_secs_f64());
                match result {
                    Ok(appended) => {
                        self.ack(inbound.qos, inbound.pkid, PubAckReason::Success, None).await?;
                        // A redelivery (QoS 1 DUP, QoS 2 held packet id) went out the first time.
                        if !appended.iter().all(|a| a.duplicate) {
                            self.fan_out(inbound, link).await?;
                        }
                        Ok(())
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
                        tracing::info!(peer = %self.peer, device_id = self.device_id, reason = why, "mqtt publish refused");
                        self.ack(inbound.qos, inbound.pkid, code, Some(why)).await
                    }
                }
            }
            Done::Cleared(inbound, result) => match result {
                Ok(_) => {
                    self.ack(inbound.qos, inbound.pkid, PubAckReason::Success, None).await?;
                    self.fan_out(inbound, link).await
                }
                Err(e) => Err(End::unclean(format!("retained message not cleared, not acked: {e}"))),
            },
            Done::Refused(inbound, code, why) => self.ack(inbound.qos, inbound.pkid, code, Some(why)).await,
            Done::Released(pkid, result) => match result {
                Ok(n) => {
                    self.open_qos2.remove(&pkid);
                    let reason = if n == 0 && self.v5() {
                        PubCompReason::PacketIdentifierNotFound
                    } else {
                        PubCompReason::Success
                    };
                    self.write(Packet::PubComp(PubComp { pkid, reason }, None)).await.map_err(End::unclean)
                }
                Err(e) => Err(End::unclean(format!("PUBREL not recorded: {e}"))),
            },
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) with `code`; nothing for QoS 0.
    async fn ack(&mut self, qos: u8, pkid: u16, code: PubAckReason, why: Option<String>) -> Result<(), End> {
        let why = why.filter(|_| self.problem_info);
        match qos {
            1 => self.open_qos1 = self.open_qos1.saturating_sub(1),
            2 if code != PubAckReason::Success => {
                self.open_qos2.remove(&pkid);
            }
            _ => {}
        }
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
        self.write(packet).await.map_err(End::unclean)
    }

    /// Whether a publish of this session may have a receiver in the router:
    /// a link already open (the session may subscribe itself), a retained
    /// message, or an MQTT subscriber or persistent session of the tenant.
    fn may_reach_someone(&self, link: &Link, retain: bool) -> bool {
        link.is_open() || retain || self.deps.bridge.has_subscribers(&self.tenant)
    }

    /// Hands a committed publish to the router (QoS 0 there: the device was
    /// acked by us), marked with its QoS and RETAIN for the deliveries. Not
    /// when nobody can receive it: no MQTT subscriber of the tenant, not
    /// retained, and no link open (a session with a link may subscribe itself).
    async fn fan_out(&self, inbound: Inbound, link: &mut Link) -> Result<(), End> {
        if !self.may_reach_someone(link, inbound.publish.retain) {
            return Ok(());
        }
        let mut props = inbound.props.unwrap_or_default();
        props.topic_alias = None;
        codec::mark(&mut props, inbound.qos, inbound.publish.retain, &self.router_id);
        let publish =
            codec::publish(0, false, inbound.publish.retain, 0, &inbound.publish.topic, &inbound.publish.payload);
        link.send(Packet::Publish(publish, Some(props))).await
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

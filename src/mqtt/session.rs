//! One device connection: CONNECT checks, the durable-before-ack publish
//! FIFO, subscriptions, deliveries and the will.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Packet, PingResp, Protocol, Publish,
    SubAck, Subscribe, SubscribeReasonCode,
};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::acl::{event_topic, subscribe_allowed};
use super::{MqttDeps, PROTOCOL};
use crate::auth::{Perm, Principal};
use crate::event::{EventInput, Redelivery, fnv1a64};
use crate::ingest::Error as IngestError;
use crate::log::Appended;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the device: no will.
    Clean,
    /// Appliance shutdown: no will.
    Shutdown,
    /// Socket closed, keep-alive expired, protocol error, refused publish…: will fires.
    Unclean(String),
}

/// A decoded packet and, for a PUBLISH, its (QoS, DUP, packet id).
type Decoded = (Packet, Option<(u8, bool, u16)>);

/// A publish waiting for its commit.
type Pending = Pin<Box<dyn Future<Output = (Publish, Instant, Result<Vec<Appended>, IngestError>)> + Send>>;

pub(super) struct Session<'a> {
    deps: &'a MqttDeps,
    peer: SocketAddr,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    read_buf: BytesMut,
    write_buf: BytesMut,
    codec: V4,
    tenant: String,
    device_id: String,
    principal: Principal,
    keep_alive: Option<Duration>,
    /// Counted in the hub's MQTT subscriber count.
    subscribed: bool,
}

/// QoS, DUP and packet id of the PUBLISH at the head of `buf`, which rumqttd
/// keeps private. Only meaningful once the codec decoded that packet.
fn publish_header(buf: &[u8]) -> Option<(u8, bool, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let (qos, dup) = ((first >> 1) & 0b11, first & 0b1000 != 0);
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    let topic_at = i + 1;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(topic_at)?, *buf.get(topic_at + 1)?]));
    let pkid_at = topic_at + 2 + topic_len;
    let pkid = if qos > 0 { u16::from_be_bytes([*buf.get(pkid_at)?, *buf.get(pkid_at + 1)?]) } else { 0 };
    Some((qos, dup, pkid))
}

fn refuse_code(e: &crate::auth::Error) -> ConnectReturnCode {
    if e.is_unauthenticated() { ConnectReturnCode::BadUserNamePassword } else { ConnectReturnCode::NotAuthorized }
}

impl<'a> Session<'a> {
    pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, deps: &'a MqttDeps, shutdown: CancellationToken) {
        let (reader, writer) = stream.into_split();
        let mut s = Session {
            deps,
            peer,
            reader,
            writer,
            read_buf: BytesMut::with_capacity(8 * 1024),
            write_buf: BytesMut::with_capacity(8 * 1024),
            codec: V4,
            tenant: String::new(),
            device_id: String::new(),
            principal: Principal::Admin,
            keep_alive: None,
            subscribed: false,
        };
        let Some((mut link_tx, mut link_rx, will)) = s.handshake(&shutdown).await else { return };
        s.presence(true).await;
        let end = s.session(&mut link_tx, &mut link_rx, &shutdown).await;
        match &end {
            End::Unclean(reason) => {
                tracing::info!(%peer, device_id = s.device_id, reason, "mqtt device dropped");
                if let Some(will) = will {
                    s.publish_will(&mut link_tx, will).await;
                }
            }
            End::Clean => tracing::info!(%peer, device_id = s.device_id, "mqtt device disconnected"),
            End::Shutdown => {}
        }
        // A clean close of the local link (the router drops its state; wills are ours).
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        let _ = link_tx.send(Packet::Disconnect(disconnect, None)).await;
        if s.subscribed {
            deps.bridge.subscriber(&s.tenant, false);
        }
        s.presence(false).await;
    }

    /// Reads and checks the CONNECT, opens the router link and answers the
    /// CONNACK. `None` when the connection ends here (refused, timed out).
    async fn handshake(&mut self, shutdown: &CancellationToken) -> Option<(LinkTx, LinkRx, Option<LastWill>)> {
        let connect = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = tokio::time::timeout(self.deps.config.connect_timeout, self.read_packet()) => r,
        };
        let packet = match connect {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer, reason = e, "mqtt: bad first packet; closing");
                return None;
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, timeout = ?self.deps.config.connect_timeout, "mqtt: no CONNECT in time; closing");
                return None;
            }
        };
        let Packet::Connect(connect, _props, will, _will_props, login) = packet else {
            tracing::info!(peer = %self.peer, "mqtt: first packet is not CONNECT; closing");
            return None;
        };
        let will = match self.authenticate(&connect.client_id, login.as_ref().map(|l| (&l.username, &l.password)), will)
        {
            Ok(will) => will,
            Err((code, reason)) => {
                tracing::info!(peer = %self.peer, client_id = connect.client_id, reason, "mqtt CONNECT refused");
                self.deps.ingest.count_rejected(PROTOCOL, "connect_refused");
                let _ = self.write(Packet::ConnAck(ConnAck { session_present: false, code }, None)).await;
                let _ = self.flush().await;
                return None;
            }
        };
        self.keep_alive =
            (connect.keep_alive > 0).then(|| Duration::from_secs(u64::from(connect.keep_alive)).mul_f32(1.5));
        let links = self.deps.links.clone();
        let (client_id, clean) = (connect.client_id.clone(), connect.clean_session);
        let built = tokio::task::spawn_blocking(move || links(client_id, clean)).await;
        let (link_tx, link_rx, connack) = match built {
            Ok(Ok(l)) => l,
            other => {
                tracing::error!(peer = %self.peer, device_id = self.device_id, result = ?other.err(), "mqtt: router refused the link");
                let code = ConnectReturnCode::ServiceUnavailable;
                let _ = self.write(Packet::ConnAck(ConnAck { session_present: false, code }, None)).await;
                let _ = self.flush().await;
                return None;
            }
        };
        let connack: Option<Packet> = connack.into();
        if let Some(p) = connack
            && (self.write(p).await.is_err() || self.flush().await.is_err())
        {
            return None;
        }
        tracing::info!(peer = %self.peer, tenant = self.tenant, device_id = self.device_id, client_id = connect.client_id, "mqtt device connected");
        Some((link_tx, link_rx, will))
    }

    /// CONNECT checks; returns the validated will, or the CONNACK refusal.
    fn authenticate(
        &mut self,
        client_id: &str,
        login: Option<(&String, &String)>,
        will: Option<LastWill>,
    ) -> Result<Option<LastWill>, (ConnectReturnCode, String)> {
        let bad = |r: &str| (ConnectReturnCode::BadUserNamePassword, r.to_string());
        let (username, password) = login.ok_or_else(|| bad("no username/password"))?;
        let principal = self.deps.auth.verify(password).map_err(|e| (refuse_code(&e), e.to_string()))?;
        let Principal::Device { tenant, device_id, perms } = &principal else {
            return Err((ConnectReturnCode::NotAuthorized, "admin tokens cannot connect as devices".into()));
        };
        if username != device_id {
            return Err(bad("username must be the token's device id"));
        }
        if !client_id.starts_with(device_id.as_str()) {
            return Err((
                ConnectReturnCode::ClientIdentifierNotValid,
                format!("client id {client_id:?} must be or start with the device id {device_id:?}"),
            ));
        }
        if !perms.contains(&Perm::WriteEvents) && !perms.contains(&Perm::ReadEvents) {
            return Err((ConnectReturnCode::NotAuthorized, "token has neither write_events nor read_events".into()));
        }
        if let Some(w) = &will {
            let topic = std::str::from_utf8(&w.topic).unwrap_or("");
            if !perms.contains(&Perm::WriteEvents) || event_topic(topic, tenant, device_id).is_none() {
                return Err((
                    ConnectReturnCode::NotAuthorized,
                    format!("will topic {topic:?} is not this device's event topic"),
                ));
            }
            if !w.message.trim_ascii_start().starts_with(b"{") {
                return Err((ConnectReturnCode::NotAuthorized, "will payload must be a JSON object".into()));
            }
        }
        self.tenant = tenant.clone();
        self.device_id = device_id.clone();
        self.principal = principal.clone();
        Ok(will)
    }

    fn can(&self, perm: Perm) -> bool {
        matches!(&self.principal, Principal::Device { perms, .. } if perms.contains(&perm))
    }

    async fn presence(&self, online: bool) {
        let log = self.deps.ingest.log();
        if let Err(e) = log.presence(self.tenant.clone(), self.device_id.clone(), online).await {
            tracing::warn!(error = %e, device_id = self.device_id, "presence update failed");
        }
    }

    /// Reads one packet; `None` on a clean EOF between packets.
    async fn read_packet(&mut self) -> Result<Option<Packet>, String> {
        loop {
            match self.codec.read_mut(&mut self.read_buf, self.deps.config.max_packet_size) {
                Ok(p) => return Ok(Some(p)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("malformed packet: {e}")),
            }
            match self.reader.read_buf(&mut self.read_buf).await {
                Ok(0) if self.read_buf.is_empty() => return Ok(None),
                Ok(0) => return Err("connection closed mid-packet".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
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
            self.write_buf.clear();
        }
        Ok(())
    }

    /// The connected session: returns how it ended.
    async fn session(&mut self, link_tx: &mut LinkTx, link_rx: &mut LinkRx, shutdown: &CancellationToken) -> End {
        let mut fifo: FuturesOrdered<Pending> = FuturesOrdered::new();
        // A publish held back by a rate limit or a full log, and when to retry it.
        let mut held: Option<(Publish, Option<Redelivery>, Instant)> = None;
        let mut resume_at = tokio::time::Instant::now();
        // Router SUBACKs to merge with our own refusals: pkid → refused positions.
        let mut suback_merge: HashMap<u16, Vec<bool>> = HashMap::new();
        let mut deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
        let mut packets: VecDeque<Decoded> = VecDeque::new();
        loop {
            // Admit held and already-read publishes while the limits allow.
            if let Err(end) =
                self.admit(&mut packets, &mut held, &mut resume_at, &mut fifo, link_tx, &mut suback_merge).await
            {
                return end;
            }
            if let Err(e) = self.flush().await {
                return End::Unclean(e);
            }
            let can_read = held.is_none() && packets.is_empty() && fifo.len() < self.deps.config.max_inflight;
            let ka = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = ka => return End::Unclean("keep-alive expired (no packet within 1.5 × keep-alive)".into()),
                _ = tokio::time::sleep_until(resume_at), if held.is_some() => {}
                r = self.reader.read_buf(&mut self.read_buf), if can_read => match r {
                    Ok(0) => return End::Unclean("connection closed by the device".into()),
                    Err(e) => return End::Unclean(format!("read: {e}")),
                    Ok(_) => {
                        deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
                        loop {
                            let header = publish_header(&self.read_buf);
                            match self.codec.read_mut(&mut self.read_buf, self.deps.config.max_packet_size) {
                                Ok(p) => packets.push_back((p, header)),
                                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => break,
                                Err(e) => {
                                    self.deps.ingest.count_rejected(PROTOCOL, "malformed");
                                    return End::Unclean(format!("malformed packet: {e}"));
                                }
                            }
                        }
                    }
                },
                Some((publish, read_at, result)) = fifo.next() => {
                    self.deps.metrics.mqtt_commit_wait.observe(read_at.elapsed().as_secs_f64());
                    match result {
                        // Durable: now the router may fan it out and PUBACK it.
                        Ok(_) => if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
                            return End::Unclean(format!("router link: {e}"));
                        },
                        Err(e) => {
                            return End::Unclean(format!("publish refused, not acked: {e}"));
                        }
                    }
                }
                n = link_rx.next() => match n {
                    Ok(Some(notification)) => if let Err(end) = self.deliver(notification, link_rx, &mut suback_merge).await {
                        return end;
                    },
                    Ok(None) => {}
                    Err(e) => return End::Unclean(format!("router link closed: {e}")),
                },
            }
        }
    }

    /// Handles decoded packets in order; stops at a publish the rate limit or
    /// the log's budget holds back.
    async fn admit(
        &mut self,
        packets: &mut VecDeque<Decoded>,
        held: &mut Option<(Publish, Option<Redelivery>, Instant)>,
        resume_at: &mut tokio::time::Instant,
        fifo: &mut FuturesOrdered<Pending>,
        link_tx: &mut LinkTx,
        suback_merge: &mut HashMap<u16, Vec<bool>>,
    ) -> Result<(), End> {
        loop {
            if let Some((publish, redelivery, read_at)) = held.take() {
                if self.deps.ingest.log().is_full() {
                    *held = Some((publish, redelivery, read_at));
                    *resume_at = tokio::time::Instant::now() + Duration::from_millis(500);
                    return Ok(());
                }
                if let Err(l) = self.deps.ingest.check_rate(&self.tenant, &self.device_id, 1) {
                    *held = Some((publish, redelivery, read_at));
                    *resume_at = tokio::time::Instant::now() + l.retry_after;
                    self.deps.metrics.mqtt_throttled.inc();
                    return Ok(());
                }
                self.submit(publish, redelivery, read_at, fifo)?;
                continue;
            }
            if fifo.len() >= self.deps.config.max_inflight {
                return Ok(());
            }
            let Some((packet, header)) = packets.pop_front() else { return Ok(()) };
            match packet {
                Packet::Publish(publish, _) => {
                    let (qos, dup, pkid) = header.unwrap_or((0, false, 0));
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if qos == 2 {
                        self.deps.ingest.count_rejected(PROTOCOL, "qos2");
                        return Err(End::Unclean(format!(
                            "QoS 2 publish to {topic:?} refused (not supported; use QoS 1)"
                        )));
                    }
                    if !self.can(Perm::WriteEvents) || event_topic(&topic, &self.tenant, &self.device_id).is_none() {
                        self.deps.ingest.count_rejected(PROTOCOL, "forbidden_topic");
                        return Err(End::Unclean(format!(
                            "publish to {topic:?} refused: devices publish to {}/devices/{}/events/<event_type>",
                            self.tenant, self.device_id
                        )));
                    }
                    let redelivery =
                        (qos == 1).then(|| Redelivery { pkid, digest: fnv1a64(&publish.payload), check: dup });
                    *held = Some((publish, redelivery, Instant::now()));
                }
                Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)).await.map_err(End::Unclean)?,
                Packet::Subscribe(sub, props) => self.subscribe(sub, props, link_tx, suback_merge).await?,
                Packet::Disconnect(..) => return Err(End::Clean),
                p @ (Packet::Unsubscribe(..) | Packet::PubAck(..)) => {
                    link_tx.send(p).await.map_err(|e| End::Unclean(format!("router link: {e}")))?;
                }
                other => {
                    self.deps.ingest.count_rejected(PROTOCOL, "protocol");
                    return Err(End::Unclean(format!("unexpected packet {other:?} (QoS 2 flows are not supported)")));
                }
            }
        }
    }

    /// The event a publish (or will) on this device's event topic carries, and
    /// the stream topic it is fanned out on; `None` unless the topic is the
    /// device's own and the payload is JSON.
    fn event_input(
        &self,
        topic: &[u8],
        payload: &[u8],
        redelivery: Option<Redelivery>,
    ) -> Option<(EventInput, String)> {
        let topic = std::str::from_utf8(topic).ok()?;
        let event_type = event_topic(topic, &self.tenant, &self.device_id)?.to_string();
        let payload = RawValue::from_string(std::str::from_utf8(payload).ok()?.to_string()).ok()?;
        let stream_topic = format!("{}/events/{}/{}", self.tenant, self.device_id, event_type);
        let input = EventInput {
            device_id: self.device_id.clone(),
            event_type,
            payload,
            id: None,
            timestamp: None,
            redelivery,
        };
        Some((input, stream_topic))
    }

    /// Starts the append of one admitted publish; its future joins the FIFO.
    fn submit(
        &self,
        mut publish: Publish,
        redelivery: Option<Redelivery>,
        read_at: Instant,
        fifo: &mut FuturesOrdered<Pending>,
    ) -> Result<(), End> {
        let (input, stream_topic) =
            self.event_input(&publish.topic, &publish.payload, redelivery).ok_or_else(|| {
                self.deps.ingest.count_rejected(PROTOCOL, "invalid");
                End::Unclean(format!(
                    "publish to {:?} refused: payload is not JSON",
                    String::from_utf8_lossy(&publish.topic)
                ))
            })?;
        publish.topic = Bytes::from(stream_topic);
        let (ingest, principal, tenant) = (self.deps.ingest.clone(), self.principal.clone(), self.tenant.clone());
        fifo.push_back(Box::pin(async move {
            let r = ingest.submit_with(&principal, &tenant, vec![input], false, PROTOCOL, false).await;
            (publish, read_at, r)
        }));
        Ok(())
    }

    async fn subscribe(
        &mut self,
        sub: Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        link_tx: &mut LinkTx,
        suback_merge: &mut HashMap<u16, Vec<bool>>,
    ) -> Result<(), End> {
        let readable = self.can(Perm::ReadEvents);
        let refused: Vec<bool> = sub
            .filters
            .iter()
            .map(|f| !(readable && subscribe_allowed(&f.path, &self.tenant, &self.device_id)))
            .collect();
        for (f, r) in sub.filters.iter().zip(&refused) {
            if *r {
                tracing::info!(peer = %self.peer, device_id = self.device_id, filter = f.path, "mqtt subscribe refused (0x80)");
                self.deps.ingest.count_rejected(PROTOCOL, "forbidden_subscribe");
            }
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
    async fn deliver(
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
        self.write(packet).await.map_err(End::Unclean)
    }

    /// Stores the will as an event, then publishes it to subscribers.
    async fn publish_will(&self, link_tx: &mut LinkTx, will: LastWill) {
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        let Some((input, stream_topic)) = self.event_input(&will.topic, &will.message, None) else {
            tracing::warn!(device_id = self.device_id, topic, "will is not a JSON event of this device; not published");
            return;
        };
        match self.deps.ingest.submit_with(&self.principal, &self.tenant, vec![input], false, PROTOCOL, false).await {
            Ok(_) => {
                let publish = Publish::new(Bytes::from(stream_topic), will.message.clone(), will.retain);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_header_reads_qos_dup_and_pkid() {
        // PUBLISH, DUP=1, QoS 1, topic "a/b", pkid 0x1234, payload "{}".
        let frame = [0x3a, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'{', b'}'];
        assert_eq!(publish_header(&frame), Some((1, true, 0x1234)));
        let qos0 = [0x30, 7, 0, 3, b'a', b'/', b'b', b'{', b'}'];
        assert_eq!(publish_header(&qos0), Some((0, false, 0)));
        assert_eq!(publish_header(&[0xc0, 0]), None);
    }
}

//! One device connection: CONNECT checks (`connect`), the durable-before-ack
//! publish FIFO (here), subscriptions, deliveries and the will (`outbound`).

mod connect;
mod outbound;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, PingResp, Protocol, Publish};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::acl::event_topic;
use super::framing::{self, publish_header};
use super::{MqttDeps, PROTOCOL};
use crate::auth::{Perm, Principal, SessionEnd};
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
    /// The device was revoked or its token expired: no will, no more acks.
    Ended(SessionEnd),
}

/// Longest a will waits for the device's rate limit to allow it.
const WILL_WAIT: Duration = Duration::from_secs(60);

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
    /// The token's `exp` (unix seconds): the session ends then.
    expires_at: i64,
    /// The router's client id for this connection (a slot, see `state`).
    router_id: String,
    lease: Option<super::state::Lease>,
    /// Filters this connection holds (bounded by `mqtt.max_filters`).
    filters: HashSet<String>,
    /// Counted in the bridge's MQTT subscriber count.
    subscribed: bool,
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
            expires_at: 0,
            router_id: String::new(),
            lease: None,
            filters: HashSet::new(),
            subscribed: false,
        };
        let Some((mut link_tx, mut link_rx, will)) = s.handshake(&shutdown).await else {
            if let Some(lease) = &s.lease {
                deps.sessions.release(lease);
            }
            return;
        };
        if deps.sessions.connected(&s.tenant, &s.device_id) {
            s.presence(true).await;
        }
        let end = s.session(&mut link_tx, &mut link_rx, &shutdown).await;
        match &end {
            End::Unclean(reason) => {
                tracing::info!(%peer, device_id = s.device_id, reason, "mqtt device dropped");
                if let Some(will) = will {
                    s.publish_will(&mut link_tx, will).await;
                }
            }
            End::Clean => tracing::info!(%peer, device_id = s.device_id, "mqtt device disconnected"),
            End::Ended(why) => {
                tracing::info!(%peer, device_id = s.device_id, reason = why.code(), "mqtt session ended: device revoked or token expired")
            }
            End::Shutdown => {}
        }
        // A clean close of the local link (the router drops its state; wills are ours).
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        let _ = link_tx.send(Packet::Disconnect(disconnect, None)).await;
        if s.subscribed {
            deps.bridge.subscriber(&s.tenant, false);
        }
        if let Some(lease) = &s.lease {
            deps.sessions.release(lease);
        }
        // Online until the device's last session ends.
        if deps.sessions.disconnected(&s.tenant, &s.device_id) {
            s.presence(false).await;
        }
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
            framing::check(&self.read_buf)?;
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
        // The device closed its side: finish what it sent, then end.
        let mut eof = false;
        let (auth, principal) = (self.deps.auth.clone(), self.principal.clone());
        let ended = auth.session_end(&principal, self.expires_at);
        tokio::pin!(ended);
        let end = loop {
            // Bytes already buffered (they may have come with the CONNECT, or
            // several packets in one segment) are decoded before any new read.
            if let Err(end) = self.decode(&mut packets) {
                break end;
            }
            // Admit held and already-read publishes while the limits allow.
            if let Err(end) =
                self.admit(&mut packets, &mut held, &mut resume_at, &mut fifo, link_tx, &mut suback_merge).await
            {
                break end;
            }
            if let Err(e) = self.flush().await {
                break End::Unclean(e);
            }
            if eof && packets.is_empty() && held.is_none() {
                break End::Unclean("connection closed by the device".into());
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
                _ = ka, if can_read => break End::Unclean("keep-alive expired (no packet within 1.5 × keep-alive)".into()),
                _ = tokio::time::sleep_until(resume_at), if held.is_some() => {}
                r = self.reader.read_buf(&mut self.read_buf), if can_read => match r {
                    Ok(0) => eof = true,
                    Err(e) => break End::Unclean(format!("read: {e}")),
                    Ok(_) => deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k),
                },
                Some((publish, read_at, result)) = fifo.next() => {
                    self.deps.metrics.mqtt_commit_wait.observe(read_at.elapsed().as_secs_f64());
                    match result {
                        // Durable: now the router may fan it out and PUBACK it.
                        Ok(_) => if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
                            break End::Unclean(format!("router link: {e}"));
                        },
                        Err(e) => break End::Unclean(format!("publish refused, not acked: {e}")),
                    }
                }
                n = link_rx.next() => match n {
                    Ok(Some(notification)) => if let Err(end) = self.deliver(notification, link_rx, &mut suback_merge).await {
                        break end;
                    },
                    Ok(None) => {}
                    Err(e) => break End::Unclean(format!("router link closed: {e}")),
                },
            }
        };
        // Every publish read before the end is committed and handed to the
        // router, whatever the segmentation: a QoS 0 publish followed by
        // DISCONNECT in one write is stored like any other.
        while let Some((publish, _, result)) = fifo.next().await {
            if result.is_ok() {
                let _ = link_tx.send(Packet::Publish(publish, None)).await;
            }
        }
        end
    }

    /// Decodes every complete packet in the read buffer, after checking the
    /// bytes rumqttd's codec does not.
    fn decode(&mut self, packets: &mut VecDeque<Decoded>) -> Result<(), End> {
        loop {
            let malformed = |s: &Self, why: String| {
                s.deps.ingest.count_rejected(PROTOCOL, "malformed");
                End::Unclean(format!("malformed packet: {why}"))
            };
            if let Err(why) = framing::check(&self.read_buf) {
                return Err(malformed(self, why));
            }
            let header = publish_header(&self.read_buf);
            match self.codec.read_mut(&mut self.read_buf, self.deps.config.max_packet_size) {
                Ok(p) => packets.push_back((p, header)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(malformed(self, e.to_string())),
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
                Packet::Unsubscribe(u, props) => {
                    for f in &u.filters {
                        self.filters.remove(f);
                    }
                    link_tx
                        .send(Packet::Unsubscribe(u, props))
                        .await
                        .map_err(|e| End::Unclean(format!("router link: {e}")))?;
                }
                p @ Packet::PubAck(..) => {
                    link_tx.send(p).await.map_err(|e| End::Unclean(format!("router link: {e}")))?;
                }
                other => {
                    // Named by kind only: a packet's Debug output can carry credentials.
                    self.deps.ingest.count_rejected(PROTOCOL, "protocol");
                    return Err(End::Unclean(format!(
                        "unexpected {} packet (QoS 2 flows are not supported)",
                        framing::name(&other)
                    )));
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
        if publish.retain && !self.deps.sessions.retain(&self.tenant, &stream_topic, publish.payload.len()) {
            tracing::warn!(
                device_id = self.device_id,
                topic = stream_topic,
                "retained-message bound of the tenant reached: stored and delivered, not retained"
            );
            publish.retain = false;
        }
        publish.topic = Bytes::from(stream_topic);
        let (ingest, principal, tenant) = (self.deps.ingest.clone(), self.principal.clone(), self.tenant.clone());
        fifo.push_back(Box::pin(async move {
            let r = ingest.submit_with(&principal, &tenant, vec![input], false, PROTOCOL, false).await;
            (publish, read_at, r)
        }));
        Ok(())
    }
}

//! One device connection, from CONNECT to its end.
//!
//! - `wire`: the bytes (bounded write buffer, write timeout).
//! - `connect`: the CONNECT checks; returns who the connection is.
//! - `inbound`: publishes from the device, durable before their ack, in a
//!   FIFO so one connection is not limited to one fsync per message.
//! - `outbound`: subscriptions, and deliveries from the session's mailbox.
//! - `will`: the will, now or after its delay.
//!
//! Every session can be ended: keep-alive, revocation (within 1 s), a
//! take-over and shutdown are watched by the same loop that reads and
//! writes, and no write blocks it (a client that stops reading is closed
//! after `mqtt.write_timeout`).

mod connect;
mod inbound;
mod outbound;
mod will;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::StreamExt;
use rumqttd::protocol::{Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, PingResp};
use tokio_util::sync::CancellationToken;

use super::state::{Lease, Sessions};
use super::{MqttDeps, PROTOCOL};
use crate::auth::{Perm, Principal, SessionEnd};
use crate::log::MqttOp;
use crate::log::mqtt::SessionKey;
use crate::tls::ClientCert;
pub(super) use wire::{Reader, Writer};

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

    fn taken_over() -> Self {
        End::coded(
            DisconnectReasonCode::SessionTakenOver,
            "session taken over by a new connection with the same client id",
        )
    }
}

/// Who a connection is: what its CONNECT proved. There is no session
/// before it.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub peer: SocketAddr,
    pub tenant: String,
    pub device_id: String,
    pub client_id: String,
    pub principal: Principal,
    /// The token's `exp` (unix seconds): the session ends then.
    pub expires_at: i64,
}

impl Identity {
    fn can(&self, perm: Perm) -> bool {
        matches!(&self.principal, Principal::Device { perms, .. } if perms.contains(&perm))
    }

    /// Whose session state this connection holds in the site log.
    fn key(&self) -> SessionKey {
        SessionKey { tenant: self.tenant.clone(), device_id: self.device_id.clone(), client_id: self.client_id.clone() }
    }
}

/// What the CONNECT settled for the connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Terms {
    /// 1.5 × the keep-alive granted, if any.
    pub keep_alive: Option<Duration>,
    /// Session expiry granted, seconds (0: the session ends with the
    /// connection). A 5.0 DISCONNECT may lower it.
    pub session_expiry: u32,
    /// 5.0: reason strings and user properties on acks are wanted.
    pub problem_info: bool,
}

/// What a connected session's loop watches besides its own parts.
struct Watch {
    /// Resolves when the device is revoked or its token expires.
    ended: std::pin::Pin<Box<dyn Future<Output = SessionEnd> + Send>>,
    /// Cancelled when a newer connection takes the client id over.
    taken_over: CancellationToken,
    /// The session's mailbox, told when a delivery is queued.
    mailbox: std::sync::Arc<super::fanout::Mailbox>,
    /// When keep-alive expires unless the device is heard from.
    deadline: Option<tokio::time::Instant>,
    write_timeout: Duration,
}

impl Watch {
    fn new(s: &Session<'_>) -> Self {
        let (auth, principal, expires_at) = (s.deps.auth.clone(), s.who.principal.clone(), s.who.expires_at);
        let mut watch = Self {
            ended: Box::pin(async move { auth.session_end(&principal, expires_at).await }),
            taken_over: s.lease.taken_over.clone(),
            mailbox: s.outbound.mailbox.clone(),
            deadline: None,
            write_timeout: s.deps.config.write_timeout,
        };
        watch.heard_from(s.terms.keep_alive);
        watch
    }

    /// The device was heard from (or not read): keep-alive starts again.
    fn heard_from(&mut self, keep_alive: Option<Duration>) {
        self.deadline = keep_alive.map(|k| tokio::time::Instant::now() + k);
    }
}

/// The session expiry after a 5.0 DISCONNECT that may set one (`asked`),
/// held to `max`; one that gives an expiry to a session that had none is a
/// protocol error [MQTT-3.14.2-2].
fn expiry_at_disconnect(granted: u32, asked: Option<u32>, max: u32) -> Result<u32, End> {
    match asked {
        None => Ok(granted),
        Some(e) if granted == 0 && e > 0 => Err(End::coded(
            DisconnectReasonCode::ProtocolError,
            "DISCONNECT sets a session expiry on a session that had none",
        )),
        Some(e) => Ok(e.min(max)),
    }
}

/// What woke a connected session's loop. It lives for one turn on the
/// stack: boxing the settled publish would cost an allocation per ack.
#[allow(clippy::large_enum_variant)]
enum Wake {
    /// The session ends (shutdown, revocation, keep-alive, a stalled write).
    End(End),
    /// A newer connection has the client id.
    TakenOver,
    /// Time to try again what a rate limit or the full log held.
    Retry,
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    /// The oldest entry of the inbound FIFO settled (committed or refused).
    Settled(inbound::Done),
    /// A delivery waits in the mailbox.
    Queued,
}

/// A connected session.
pub(super) struct Session<'a> {
    deps: &'a MqttDeps,
    wire: wire::Wire,
    who: Identity,
    terms: Terms,
    lease: Lease,
    inbound: inbound::Inbound,
    outbound: outbound::Outbound,
}

/// Serves one connection (TCP, TLS or WebSocket) until it ends.
pub(super) async fn serve(
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
    cert: Option<Result<ClientCert, String>>,
    deps: &MqttDeps,
    shutdown: CancellationToken,
) {
    let mut wire = wire::Wire::new(reader, writer);
    let Some(c) = connect::handshake(&mut wire, peer, cert, deps, &shutdown).await else { return };
    let mut s = Session {
        deps,
        wire,
        inbound: inbound::Inbound::new(deps.config.topic_alias_max),
        outbound: outbound::Outbound::new(c.lease.mailbox.clone(), c.client, deps.config.max_inflight),
        who: c.who,
        terms: c.terms,
        lease: c.lease,
    };
    let end = s.run(&shutdown).await;
    s.finish(end, c.will, &shutdown).await;
}

impl Session<'_> {
    fn v5(&self) -> bool {
        self.wire.version().is_v5()
    }

    async fn presence(&mut self, online: bool) {
        let log = self.deps.ingest.log();
        if let Err(e) = log.presence(self.who.tenant.clone(), self.who.device_id.clone(), online).await {
            tracing::warn!(error = %e, device_id = self.who.device_id, "presence update failed");
        }
    }

    /// Queues a packet for the client.
    fn send(&mut self, packet: Packet) -> Result<(), End> {
        self.wire.queue(packet).map_err(End::unclean)
    }

    /// The connected session: returns how it ended. Each turn handles what
    /// is already read (decode, admit), then waits for the next thing to
    /// happen ([`wait`](Self::wait)) and handles it ([`on`](Self::on)).
    async fn run(&mut self, shutdown: &CancellationToken) -> End {
        let mut watch = Watch::new(self);
        if let Err(end) = self.resume_deliveries() {
            return end;
        }
        loop {
            if let Err(end) = self.handle_read().await {
                return end;
            }
            let wake = self.wait(&mut watch, shutdown).await;
            if let Err(end) = self.on(wake, &mut watch).await {
                return end;
            }
        }
    }

    /// Bytes already buffered (they may have come with the CONNECT, or
    /// several packets in one segment) are decoded and admitted before any
    /// new read; `Err` once the device closed and all it sent is handled.
    async fn handle_read(&mut self) -> Result<(), End> {
        self.decode()?;
        self.admit().await?;
        match self.inbound.finished() {
            Some(end) => Err(end),
            None => Ok(()),
        }
    }

    /// Waits for whatever comes first: the end of the session (shutdown,
    /// revocation, keep-alive, a client that stopped reading), a take-over,
    /// bytes read or written, a commit settled, a delivery queued, or the
    /// time to retry what a rate limit held.
    async fn wait(&mut self, watch: &mut Watch, shutdown: &CancellationToken) -> Wake {
        let can_read = self.inbound.can_read(self.deps.config.max_inflight) && self.wire.may_read();
        if !can_read {
            // Keep-alive counts only while the device is read: time the
            // appliance holds the read (rate limit, full log, commits in
            // flight, a client that does not take its acks) never expires
            // it, so throttling fires no will.
            watch.heard_from(self.terms.keep_alive);
        }
        let keep_alive = async {
            match watch.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let pending = !self.wire.write_buf.is_empty();
        let stalled = self.wire.stalled_since.unwrap_or_else(tokio::time::Instant::now) + watch.write_timeout;
        let pull = self.wire.has_room() && !self.inbound.taken;
        let write = async {
            let n = tokio::io::AsyncWriteExt::write(&mut self.wire.writer, &self.wire.write_buf).await?;
            if n == self.wire.write_buf.len() {
                tokio::io::AsyncWriteExt::flush(&mut self.wire.writer).await?;
            }
            Ok::<usize, std::io::Error>(n)
        };
        tokio::select! {
            _ = shutdown.cancelled() => Wake::End(End::Shutdown),
            // Revoked or expired: what is not committed yet is never acked.
            why = &mut watch.ended => Wake::End(End::Ended(why)),
            _ = watch.taken_over.cancelled(), if !self.inbound.taken => Wake::TakenOver,
            _ = keep_alive, if can_read => Wake::End(End::coded(
                DisconnectReasonCode::KeepAliveTimeout,
                "keep-alive expired (no packet within 1.5 × keep-alive)",
            )),
            _ = tokio::time::sleep_until(self.inbound.resume_at), if self.inbound.waiting() => Wake::Retry,
            r = tokio::io::AsyncReadExt::read_buf(&mut self.wire.reader, &mut self.wire.read_buf), if can_read => Wake::Read(r),
            w = write, if pending => Wake::Wrote(w),
            _ = tokio::time::sleep_until(stalled), if pending => {
                self.deps.metrics.mqtt_write_timeouts.inc();
                Wake::End(End::unclean(format!(
                    "the client took none of what was written to it for {:?} (mqtt.write_timeout): it stopped reading",
                    watch.write_timeout
                )))
            }
            Some(done) = self.inbound.fifo.next() => Wake::Settled(done),
            _ = watch.mailbox.queued(), if pull => Wake::Queued,
        }
    }

    /// Handles what [`wait`](Self::wait) woke up for.
    async fn on(&mut self, wake: Wake, watch: &mut Watch) -> Result<(), End> {
        match wake {
            Wake::End(end) => return Err(end),
            // What the device sent before its new connection (already here,
            // e.g. a QoS 0 PUBLISH and DISCONNECT) is still processed: read
            // up to what has arrived, then the session ends as if the device
            // had closed it.
            Wake::TakenOver => {
                self.inbound.taken = true;
                self.wire.read_arrived().await;
                self.inbound.eof = true;
            }
            Wake::Retry => {}
            Wake::Read(Ok(0)) => self.inbound.eof = true,
            Wake::Read(Ok(_)) => watch.heard_from(self.terms.keep_alive),
            Wake::Read(Err(e)) => return Err(End::unclean(format!("read: {e}"))),
            Wake::Wrote(Ok(0)) => return Err(End::unclean("write: connection closed")),
            Wake::Wrote(Ok(n)) => {
                self.wire.wrote(n);
                self.pull()?;
            }
            Wake::Wrote(Err(e)) => return Err(End::unclean(format!("write: {e}"))),
            // Everything the same commit settled is answered in one write:
            // one send per commit, not one per PUBACK.
            Wake::Settled(done) => {
                let mut next = Some(done);
                while let Some(done) = next.take() {
                    self.settle(done).await?;
                    next = self.inbound.fifo.next().now_or_never().flatten();
                }
            }
            Wake::Queued => self.pull()?,
        }
        Ok(())
    }

    /// Handles one decoded packet other than a PUBLISH (those go through
    /// the inbound FIFO): a flat dispatch, one handler per kind.
    async fn dispatch(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::PubRel(rel, _) => {
                self.release(rel.pkid);
                Ok(())
            }
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Subscribe(sub, props) => self.subscribe(sub, props).await,
            Packet::Unsubscribe(unsub, props) => self.unsubscribe(unsub, props).await,
            Packet::PubAck(ack, _) => self.client_acked(ack.pkid, 1, 0),
            Packet::PubRec(rec, _) => self.client_acked(rec.pkid, 2, rec.reason as u8),
            Packet::PubComp(comp, _) => self.client_acked(comp.pkid, 3, 0),
            Packet::Disconnect(d, props) => Err(self.disconnected(d, props)),
            other => {
                // Named by kind only: a packet's Debug output can carry credentials.
                self.deps.ingest.count_rejected(PROTOCOL, "protocol");
                Err(End::coded(
                    DisconnectReasonCode::ProtocolError,
                    format!("unexpected {} packet", super::framing::name(&other)),
                ))
            }
        }
    }

    /// The device's DISCONNECT: how the session ends. 5.0: it may change
    /// the session expiry, but not give one to a session that had none
    /// [MQTT-3.14.2-2].
    fn disconnected(&mut self, d: Disconnect, props: Option<DisconnectProperties>) -> End {
        let max = self.deps.config.max_session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32;
        let asked = props.and_then(|p| p.session_expiry_interval);
        match expiry_at_disconnect(self.terms.session_expiry, asked, max) {
            Ok(expiry) => self.terms.session_expiry = expiry,
            Err(end) => return end,
        }
        if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
            End::unclean("DISCONNECT with will message (0x04)")
        } else {
            End::Clean
        }
    }

    /// A 5.0 DISCONNECT with its reason (3.x has none: the socket just
    /// closes), written within a second whatever the client does.
    async fn disconnect(&mut self, code: DisconnectReasonCode, reason: &str) {
        if self.v5() {
            let props = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(reason.to_string()),
                user_properties: vec![],
                server_reference: None,
            };
            let _ = self.wire.queue(Packet::Disconnect(Disconnect { reason_code: code }, Some(props)));
        }
        self.wire.flush_within(Duration::from_secs(1)).await;
    }

    /// After the loop: tell the client why, finish the publishes it sent,
    /// fire or schedule the will, and end (or park) the session.
    async fn finish(mut self, end: End, will: Option<will::Will>, shutdown: &CancellationToken) {
        let peer = self.who.peer;
        let fire_will = match &end {
            End::Unclean(reason, code) => {
                tracing::info!(%peer, device_id = self.who.device_id, reason, "mqtt device dropped");
                match code {
                    Some(code) => self.disconnect(*code, reason).await,
                    None => self.wire.flush_within(Duration::from_secs(1)).await,
                }
                true
            }
            End::Clean => {
                tracing::info!(%peer, device_id = self.who.device_id, "mqtt device disconnected");
                self.wire.flush_within(Duration::from_secs(1)).await;
                false
            }
            End::Ended(why) => {
                tracing::info!(%peer, device_id = self.who.device_id, reason = why.code(), "mqtt session ended: device revoked or token expired");
                self.disconnect(DisconnectReasonCode::NotAuthorized, "device revoked or token expired").await;
                false
            }
            End::Shutdown => {
                self.disconnect(DisconnectReasonCode::ServerShuttingDown, "the appliance is shutting down").await;
                false
            }
        };
        // Every publish read before the end is committed (and passed on),
        // whatever the segmentation: a QoS 0 publish followed by DISCONNECT
        // in one write is stored like any other. Revoked: nothing more.
        if !matches!(end, End::Ended(_)) {
            while self.inbound.fifo.next().await.is_some() {}
        }
        let deps = self.deps;
        let expiry = if self.lease.persistent { self.terms.session_expiry } else { 0 };
        let waiting = deps.sessions.release(&self.lease, expiry);
        // The session's state in the site log ends with it (expiry 0), or
        // waits for its client (a newer connection's is untouched).
        let op = MqttOp::EndSession {
            key: Sessions::key_of(&self.lease),
            generation: Sessions::generation_of(&self.lease),
            expiry,
        };
        if let Err(e) = deps.ingest.log().mqtt(op).await {
            tracing::warn!(error = %e, device_id = self.who.device_id, "mqtt: session end not recorded in the site log");
        }
        // A connection that took this one over may go on now.
        deps.sessions.ended(&self.lease);
        if let Some(waiting) = &waiting {
            super::expiry::wait_for_client(
                deps,
                self.lease.clone(),
                Duration::from_secs(u64::from(expiry)),
                waiting.clone(),
                shutdown,
            );
        }
        if fire_will && let Some(will) = will {
            will::fire_or_schedule(deps, &self.who, &self.lease, will, waiting, shutdown);
        }
        // Online until the device's last session ends.
        if deps.sessions.disconnected(&self.who.tenant, &self.who.device_id) {
            self.presence(false).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnect_may_change_the_session_expiry_but_not_give_one() {
        assert_eq!(expiry_at_disconnect(600, None, 3600).unwrap(), 600);
        assert_eq!(expiry_at_disconnect(600, Some(0), 3600).unwrap(), 0, "the session ends with the connection");
        assert_eq!(expiry_at_disconnect(600, Some(7200), 3600).unwrap(), 3600, "held to the maximum");
        assert_eq!(expiry_at_disconnect(0, Some(0), 3600).unwrap(), 0);
        let e = expiry_at_disconnect(0, Some(60), 3600).unwrap_err();
        assert!(matches!(e, End::Unclean(_, Some(DisconnectReasonCode::ProtocolError))), "{e:?}");
    }

    #[test]
    fn only_a_device_holding_the_permission_may_use_it() {
        let who = |perms: Vec<Perm>| Identity {
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            tenant: "acme".into(),
            device_id: "d1".into(),
            client_id: "d1".into(),
            principal: Principal::Device { tenant: "acme".into(), device_id: "d1".into(), perms },
            expires_at: 0,
        };
        assert!(who(vec![Perm::WriteEvents]).can(Perm::WriteEvents));
        assert!(!who(vec![Perm::WriteEvents]).can(Perm::ReadEvents));
        let key = who(vec![]).key();
        assert_eq!((key.tenant.as_str(), key.device_id.as_str(), key.client_id.as_str()), ("acme", "d1", "d1"));
    }
}

//! The CONNECT: protocol version, credentials, the client-id rule, the
//! will, 5.0 session properties, and the router link under a tenant- and
//! device-namespaced client id.

use std::time::Duration;

use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, LastWill, LastWillProperties, Packet,
};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::super::PROTOCOL;
use super::super::acl::{client_id_allowed, event_topic};
use super::super::codec::{Hello, Version, hello};
use super::link::Link;
use super::{Session, SubOpts};
use crate::auth::{Perm, Principal};
use crate::log::MqttOp;
use crate::mqtt::state::{Lease, Sessions};

/// The will a session fires on an unclean end: its message, 5.0
/// properties, and how long it waits first (Will Delay Interval).
pub(super) struct Will {
    pub message: LastWill,
    pub props: Option<LastWillProperties>,
    pub delay: Duration,
}

/// Packet id of the router SUBSCRIBE that restores a resumed session's
/// subscriptions (sent before the client can send any of its own).
const RESTORE_PKID: u16 = 1;

fn refuse_code(e: &crate::auth::Error) -> ConnectReturnCode {
    if e.is_unauthenticated() { ConnectReturnCode::BadUserNamePassword } else { ConnectReturnCode::NotAuthorized }
}

/// A CONNACK refusal code in the connection's protocol: 3.x has six codes,
/// so 5.0's finer ones fold into the nearest.
fn connack_code(version: Version, code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode as C;
    if version.is_v5() {
        return code;
    }
    match code {
        C::Success
        | C::RefusedProtocolVersion
        | C::ClientIdentifierNotValid
        | C::ServiceUnavailable
        | C::BadUserNamePassword
        | C::NotAuthorized => code,
        C::UnsupportedProtocolVersion => C::RefusedProtocolVersion,
        C::BadAuthenticationMethod | C::Banned => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

impl Session<'_> {
    /// Reads the first bytes until the protocol is known; a protocol this
    /// listener does not speak is answered with CONNACK 0x01 (3.1.1's
    /// "unacceptable protocol version") and closed.
    async fn read_hello(&mut self) -> Result<Option<Version>, String> {
        loop {
            match hello(&mut self.read_buf) {
                Hello::Version(v) => return Ok(Some(v)),
                Hello::Unsupported(why) => {
                    if self.read_buf.first().is_some_and(|b| b >> 4 == 1) {
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut self.writer, &[0x20, 2, 0, 1]).await;
                        let _ = tokio::io::AsyncWriteExt::flush(&mut self.writer).await;
                    }
                    return Err(why);
                }
                Hello::More => {}
            }
            if self.read_buf.len() > 16 * 1024 {
                return Err("no protocol name and level in the first 16 KiB".into());
            }
            match self.reader.read_buf(&mut self.read_buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Reads one packet; `None` on a clean EOF between packets.
    async fn read_packet(&mut self) -> Result<Option<Packet>, String> {
        loop {
            super::framing::check(&self.read_buf)?;
            match self.codec.read(&mut self.read_buf, self.deps.config.max_packet_size) {
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

    async fn first_packet(&mut self) -> Result<Option<Packet>, String> {
        let Some(version) = self.read_hello().await? else { return Ok(None) };
        self.codec.version = version;
        self.read_packet().await
    }

    async fn connack(&mut self, code: ConnectReturnCode, present: bool, props: Option<ConnAckProperties>) {
        let code = connack_code(self.codec.version, code);
        // 3.1 has no session-present flag.
        let session_present = present && self.codec.version != Version::V31;
        let props = props.filter(|_| self.codec.version.is_v5());
        let _ = self.write(Packet::ConnAck(ConnAck { session_present, code }, props)).await;
        let _ = self.flush().await;
    }

    async fn refuse_connect(&mut self, client_id: &str, code: ConnectReturnCode, reason: String) {
        tracing::info!(peer = %self.peer, client_id, reason, protocol = self.codec.version.as_str(), "mqtt CONNECT refused");
        self.deps.ingest.count_rejected(PROTOCOL, "connect_refused");
        let props = ConnAckProperties { reason_string: Some(reason), ..Default::default() };
        self.connack(code, false, Some(props)).await;
    }

    /// Reads and checks the CONNECT, opens the router link of a persistent
    /// session and answers the CONNACK. `None` when the connection ends here
    /// (refused, timed out).
    pub(super) async fn handshake(&mut self, shutdown: &CancellationToken) -> Option<(Link, Option<Will>)> {
        let connect = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = tokio::time::timeout(self.deps.config.connect_timeout, self.first_packet()) => r,
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
        let Packet::Connect(connect, props, will, will_props, login) = packet else {
            tracing::info!(peer = %self.peer, "mqtt: first packet is not CONNECT; closing");
            return None;
        };
        let props = props.unwrap_or(ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: vec![],
            authentication_method: None,
            authentication_data: None,
        });
        let mut client_id = connect.client_id.clone();
        if let Some(method) = &props.authentication_method {
            let why = format!("authentication method {method:?} is not supported: send the device token as password");
            self.refuse_connect(&client_id, ConnectReturnCode::BadAuthenticationMethod, why).await;
            return None;
        }
        if props.receive_maximum == Some(0) || props.max_packet_size == Some(0) {
            let why = "Receive Maximum and Maximum Packet Size must not be 0".to_string();
            self.refuse_connect(&client_id, ConnectReturnCode::ProtocolError, why).await;
            return None;
        }
        self.problem_info = props.request_problem_info != Some(0);
        self.client_receive_max = usize::from(props.receive_maximum.unwrap_or(u16::MAX));
        self.client_max_packet = props.max_packet_size.map_or(usize::MAX, |m| m as usize);
        self.client_alias_max = props.topic_alias_max.unwrap_or(0);
        let will = match self.authenticate(
            &mut client_id,
            connect.clean_session,
            login.as_ref().map(|l| (&l.username, &l.password)),
            will,
        ) {
            Ok(will) => will,
            Err((code, reason)) => {
                self.refuse_connect(&client_id, code, reason).await;
                return None;
            }
        };
        if !self.deps.sessions.connect_allowed(&self.tenant, &self.device_id) {
            let why = format!(
                "more than mqtt.max_connects_per_minute = {} connects of device {:?} in a minute; retry later",
                self.deps.config.max_connects_per_minute, self.device_id
            );
            self.refuse_connect(&client_id, ConnectReturnCode::ConnectionRateExceeded, why).await;
            return None;
        }
        let assigned = (client_id != connect.client_id).then(|| client_id.clone());
        self.client_id = client_id.clone();

        // Keep-alive, held to mqtt.max_keep_alive (5.0: told as Server Keep Alive).
        let max_ka = self.deps.config.max_keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        let keep_alive = if max_ka > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_ka) {
            max_ka
        } else {
            connect.keep_alive
        };
        self.keep_alive = (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)).mul_f32(1.5));

        // Session expiry: 3.x persistent sessions get the maximum; 5.0 what
        // it asked for, held to the maximum.
        let max_expiry = self.deps.config.max_session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32;
        let asked = if self.codec.version.is_v5() {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_session {
            0
        } else {
            u32::MAX
        };
        self.session_expiry = asked.min(max_expiry);
        let persistent = self.session_expiry > 0;

        // The router's session namespace is global, and it never forgets a
        // client id: connections get bounded slot ids, namespaced by tenant
        // and device (`|` is in no tenant name or device id; rumqttd refuses
        // `+$#/`). See `state::Device`.
        let lease =
            self.deps.sessions.lease(&self.tenant, &self.device_id, &client_id, persistent, !connect.clean_session);
        self.router_id = lease.router_id.clone();
        self.persistent = lease.persistent;
        // The session's state in the site log: a resumed session keeps its
        // held QoS 2 ids, a new one starts with none (a clean start, or a
        // session that ended), so CONNACK's session present is true of it.
        if let Err(e) = self.open_session(&lease).await {
            tracing::error!(error = %e, "mqtt: cannot record the session in the site log");
            self.lease = Some(lease);
            self.connack(ConnectReturnCode::ServiceUnavailable, false, None).await;
            return None;
        }
        let present = lease.present;
        self.filters = lease.subs.iter().map(|s| (s.filter.clone(), SubOpts::resumed(s))).collect();
        let persistent = lease.persistent;
        let links = self.deps.links.clone();
        let wipe = lease.wipe.then(|| lease.router_id.clone());
        self.lease = Some(lease);
        let router_id = self.router_id.clone();
        // A clean session opens its link when it first needs the router (see `link`).
        let (mut link, router_present) = if persistent {
            let built = tokio::task::spawn_blocking(move || {
                if let Some(old) = wipe {
                    crate::mqtt::broker::drop_session(&links, old);
                }
                links(router_id, false)
            })
            .await;
            let (link_tx, link_rx, router_connack) = match built {
                Ok(Ok(l)) => l,
                other => {
                    tracing::error!(peer = %self.peer, device_id = self.device_id, result = ?other.err(), "mqtt: router refused the link");
                    self.connack(ConnectReturnCode::ServiceUnavailable, false, None).await;
                    return None;
                }
            };
            let present = match Option::<Packet>::from(router_connack) {
                Some(Packet::ConnAck(ack, _)) => ack.session_present,
                _ => false,
            };
            let gauge = self.deps.metrics.mqtt_router_links.clone();
            (Link::opened((link_tx, link_rx), self.deps.links.clone(), self.router_id.clone(), false, gauge), present)
        } else {
            let gauge = self.deps.metrics.mqtt_router_links.clone();
            (Link::closed(self.deps.links.clone(), self.router_id.clone(), true, gauge), false)
        };
        if present && !router_present && !self.filters.is_empty() {
            // Resumed after a restart: the router lost the session's
            // subscriptions with the process; the site log kept them.
            if let Err(e) = self.restore_subscriptions(&mut link).await {
                tracing::error!(peer = %self.peer, device_id = self.device_id, error = ?e, "mqtt: cannot restore the session's subscriptions");
                self.connack(ConnectReturnCode::ServiceUnavailable, false, None).await;
                return None;
            }
        }
        let connack_props = ConnAckProperties {
            session_expiry_interval: (self.session_expiry != asked && asked != 0).then_some(self.session_expiry),
            receive_max: Some(self.deps.config.max_inflight.min(usize::from(u16::MAX)) as u16),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(self.deps.config.max_packet_size as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(self.deps.config.topic_alias_max),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(0),
            server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
            ..Default::default()
        };
        self.connack(ConnectReturnCode::Success, present, Some(connack_props)).await;
        if present && !self.subscribed {
            // A resumed session may hold subscriptions it will not send
            // again: it counts as a subscriber of its tenant (other sites'
            // events are read for it) until it ends.
            self.subscribed = true;
            self.deps.bridge.subscriber(&self.tenant, true);
        }
        tracing::info!(peer = %self.peer, tenant = self.tenant, device_id = self.device_id, client_id,
            protocol = self.codec.version.as_str(), "mqtt device connected");
        let will = will.map(|message| {
            let delay = will_props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0).min(self.session_expiry);
            Will { message, props: will_props, delay: Duration::from_secs(u64::from(delay)) }
        });
        Some((link, will))
    }

    /// Records the session in the site log (see `log::mqtt`), and drops the
    /// device's oldest persistent session when this one took its place.
    async fn open_session(&self, lease: &Lease) -> Result<(), crate::log::Error> {
        let log = self.deps.ingest.log();
        if let Some(key) = lease.evicted.clone() {
            log.mqtt(MqttOp::DropSession { key, generation: None }).await?;
        }
        let op = MqttOp::OpenSession {
            key: Sessions::key_of(lease),
            generation: Sessions::generation_of(lease),
            expiry: self.session_expiry,
            resume: lease.present,
        };
        log.mqtt(op).await.map(|_| ())
    }

    /// Subscribes the router link to the resumed session's filters again.
    /// No retained messages are sent for them (a resumed subscription is
    /// not a new one), and the router's SUBACK is not the client's.
    async fn restore_subscriptions(&mut self, link: &mut Link) -> Result<(), super::End> {
        use rumqttd::protocol::{Filter, RetainForwardRule, Subscribe};
        let filters = self
            .filters
            .iter()
            .map(|(path, o)| Filter {
                path: path.clone(),
                qos: rumqttd::protocol::qos(o.qos).unwrap_or_default(),
                nolocal: o.no_local,
                preserve_retain: o.retain_as_published,
                retain_forward_rule: RetainForwardRule::Never,
            })
            .collect();
        self.swallow_suback.insert(RESTORE_PKID);
        self.subscribed = true;
        self.deps.bridge.subscriber(&self.tenant, true);
        link.send(Packet::Subscribe(Subscribe { pkid: RESTORE_PKID, filters }, None)).await
    }

    /// CONNECT checks; returns the validated will, or the CONNACK refusal.
    /// An empty client id is assigned `<device id>-<random>` (3.x: only with
    /// a clean session, as 3.1.1 requires).
    fn authenticate(
        &mut self,
        client_id: &mut String,
        clean: bool,
        login: Option<(&String, &String)>,
        will: Option<LastWill>,
    ) -> Result<Option<LastWill>, (ConnectReturnCode, String)> {
        let bad = |r: &str| (ConnectReturnCode::BadUserNamePassword, r.to_string());
        let (username, password) = login.ok_or_else(|| bad("no username/password"))?;
        let (principal, expires_at) =
            self.deps.auth.verify_expiring(password).map_err(|e| (refuse_code(&e), e.to_string()))?;
        let Principal::Device { tenant, device_id, perms } = &principal else {
            return Err((ConnectReturnCode::NotAuthorized, "admin tokens cannot connect as devices".into()));
        };
        if username != device_id {
            return Err(bad("username must be the token's device id"));
        }
        if client_id.is_empty() {
            if !clean && !self.codec.version.is_v5() {
                return Err((
                    ConnectReturnCode::ClientIdentifierNotValid,
                    "an empty client id needs clean session = 1".into(),
                ));
            }
            let mut r = [0u8; 6];
            getrandom::fill(&mut r).map_err(|e| (ConnectReturnCode::ServiceUnavailable, e.to_string()))?;
            *client_id = format!("{device_id}-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        if !client_id_allowed(client_id, device_id) {
            return Err((
                ConnectReturnCode::ClientIdentifierNotValid,
                format!("client id {client_id:?} must be {device_id:?} or \"{device_id}-<suffix>\", at most 128 bytes"),
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
                return Err((ConnectReturnCode::PayloadFormatInvalid, "will payload must be a JSON object".into()));
            }
        }
        self.tenant = tenant.clone();
        self.device_id = device_id.clone();
        self.principal = principal.clone();
        self.expires_at = expires_at;
        Ok(will)
    }
}

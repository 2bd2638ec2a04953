//! The CONNECT: protocol version, credentials, the client-id rule, the
//! will, 5.0 session properties, and the session the connection gets (new
//! or resumed, recorded in the site log before CONNACK says which).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill, LastWillProperties, Login,
    Packet,
};
use tokio_util::sync::CancellationToken;

use super::super::PROTOCOL;
use super::super::acl::client_id_allowed;
use super::super::codec::Version;
use super::super::state::{Lease, Sessions};
use super::super::topic_map::TopicMaps;
use super::outbound::ClientLimits;
use super::will::Will;
use super::wire::Wire;
use super::{Identity, Terms};
use crate::auth::{Perm, Principal};
use crate::config::MqttConfig;
use crate::log::MqttOp;
use crate::mqtt::MqttDeps;
use crate::tls::ClientCert;

/// A connection the CONNECT let in.
pub(super) struct Connected {
    pub who: Identity,
    pub terms: Terms,
    pub lease: Lease,
    pub will: Option<Will>,
    pub client: ClientLimits,
}

/// Longest a take-over waits for the connection it took over to end.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(5);

/// A CONNECT refusal: the CONNACK code and why.
type Refusal = (ConnectReturnCode, String);

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

/// Reads and checks the CONNECT, opens the session and answers the
/// CONNACK. `None` when the connection ends here (refused, timed out).
pub(super) async fn handshake(
    wire: &mut Wire,
    peer: SocketAddr,
    cert: Option<Result<ClientCert, String>>,
    deps: &MqttDeps,
    shutdown: &CancellationToken,
) -> Option<Connected> {
    let mut h = Handshake { wire, peer, cert, deps };
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = tokio::time::timeout(deps.config.connect_timeout, h.first_packet()) => r,
    };
    let packet = match first {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::info!(%peer, reason = e, "mqtt: bad first packet; closing");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?deps.config.connect_timeout, "mqtt: no CONNECT in time; closing");
            return None;
        }
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        tracing::info!(%peer, "mqtt: first packet is not CONNECT; closing");
        return None;
    };
    h.connect(connect, props, will, will_props, login).await
}

struct Handshake<'w, 'd> {
    wire: &'w mut Wire,
    peer: SocketAddr,
    /// The device a TLS client certificate named (`tls.client_ca_file`).
    cert: Option<Result<ClientCert, String>>,
    deps: &'d MqttDeps,
}

impl Handshake<'_, '_> {
    async fn first_packet(&mut self) -> Result<Option<Packet>, String> {
        let Some(version) = self.wire.read_hello().await? else { return Ok(None) };
        self.wire.codec.version = version;
        self.wire.read_packet(self.deps.config.max_packet_size).await
    }

    async fn connack(&mut self, code: ConnectReturnCode, present: bool, props: Option<ConnAckProperties>) {
        let version = self.wire.version();
        // 3.1 has no session-present flag.
        let session_present = present && version != Version::V31;
        let props = props.filter(|_| version.is_v5());
        let code = connack_code(version, code);
        let _ = self.wire.queue(Packet::ConnAck(ConnAck { session_present, code }, props));
        self.wire.flush_within(self.deps.config.connect_timeout).await;
    }

    async fn refuse(&mut self, client_id: &str, (code, reason): Refusal) {
        tracing::info!(peer = %self.peer, client_id, reason, protocol = self.wire.version().as_str(), "mqtt CONNECT refused");
        self.deps.ingest.count_rejected(PROTOCOL, "connect_refused");
        let props = ConnAckProperties { reason_string: Some(reason), ..Default::default() };
        self.connack(code, false, Some(props)).await;
    }

    async fn connect(
        mut self,
        connect: Connect,
        props: Option<ConnectProperties>,
        will: Option<LastWill>,
        will_props: Option<LastWillProperties>,
        login: Option<Login>,
    ) -> Option<Connected> {
        let props = props.unwrap_or_else(no_props);
        if let Some(max) = props.max_packet_size.filter(|m| *m > 0) {
            self.wire.max_packet = max as usize;
        }
        let mut client_id = connect.client_id.clone();
        let login = login.as_ref().map(|l| (l.username.as_str(), l.password.as_str()));
        let authed = self.authenticate(login).await;
        let (who, will) = match self.check(&props, &mut client_id, connect.clean_session, authed, will) {
            Ok(ok) => ok,
            Err(refusal) => {
                self.refuse(&client_id, refusal).await;
                return None;
            }
        };
        let assigned = (client_id != connect.client_id).then(|| client_id.clone());
        let (terms, asked, keep_alive) = terms(&self.deps.config, self.wire.version(), &connect, &props);
        let lease = match self.session(&who, terms, !connect.clean_session).await {
            Ok(lease) => lease,
            Err(refusal) => {
                self.refuse(&client_id, refusal).await;
                return None;
            }
        };
        let connack_props = ConnAckProperties {
            session_expiry_interval: (terms.session_expiry != asked && asked != 0).then_some(terms.session_expiry),
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
        self.connack(ConnectReturnCode::Success, lease.present, Some(connack_props)).await;
        tracing::info!(peer = %self.peer, tenant = who.tenant, device_id = who.device_id, client_id,
            protocol = self.wire.version().as_str(), present = lease.present, "mqtt device connected");
        let will = will.map(|message| {
            let delay = will_props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0).min(terms.session_expiry);
            Will { message, props: will_props, delay: Duration::from_secs(u64::from(delay)) }
        });
        let client = ClientLimits {
            receive_max: usize::from(props.receive_maximum.unwrap_or(u16::MAX)),
            alias_max: props.topic_alias_max.unwrap_or(0),
        };
        Some(Connected { who, terms, lease, will, client })
    }

    /// The connection's session: its client id claimed within the shares,
    /// the connection it took over (if any) finished, the session opened
    /// (new or resumed) and recorded in the site log. A refusal is the
    /// CONNACK's.
    async fn session(&mut self, who: &Identity, terms: Terms, resume: bool) -> Result<Lease, Refusal> {
        // Client ids are a device's own namespace (see `state`).
        let sessions = &self.deps.sessions;
        let claim = sessions
            .claim(&who.tenant, &who.device_id, &who.client_id)
            .map_err(|why| (ConnectReturnCode::QuotaExceeded, why))?;
        // A take-over: the connection taken over first finishes what it had
        // read (it ends as if the device had closed it) and records its end,
        // so the client id's publishes are stored in the order they were
        // sent and this session is decided from what it left.
        if let Some(previous) = &claim.previous
            && tokio::time::timeout(TAKE_OVER_WAIT, previous.cancelled()).await.is_err()
        {
            tracing::warn!(peer = %self.peer, client_id = who.client_id, "mqtt: the connection taken over did not end in time; going on");
        }
        let lease = sessions
            .open(claim, terms.session_expiry > 0, resume)
            .map_err(|why| (ConnectReturnCode::QuotaExceeded, why))?;
        // The session's state in the site log: a resumed session keeps its
        // held QoS 2 ids, a new one starts with none (a clean start, or a
        // session that ended), so CONNACK's session present is true of it.
        // The device's first live connection puts it online in the same
        // transaction: one trip to the writer per CONNECT.
        let first = sessions.connected(&who.tenant, &who.device_id);
        if let Err(e) = self.open_session(&lease, who, terms.session_expiry, first).await {
            tracing::error!(error = %e, "mqtt: cannot record the session in the site log");
            sessions.disconnected(&who.tenant, &who.device_id);
            sessions.release(&lease, 0);
            sessions.ended(&lease);
            return Err((ConnectReturnCode::ServiceUnavailable, "the site log cannot record the session".into()));
        }
        Ok(lease)
    }

    /// Records the session in the site log (see `log::mqtt`), and the
    /// device online when it is its first live connection (`online`); drops
    /// the device's oldest persistent session when this one took its place.
    async fn open_session(
        &self,
        lease: &Lease,
        who: &Identity,
        expiry: u32,
        online: bool,
    ) -> Result<(), crate::log::Error> {
        let log = self.deps.ingest.log();
        if let Some((key, session_id)) = lease.evicted.clone() {
            tracing::info!(
                device_id = who.device_id,
                client_id = key.client_id,
                max = self.deps.config.max_sessions_per_device,
                "evicted the oldest persistent MQTT session of its device"
            );
            log.mqtt(MqttOp::DropSession { key, generation: None, session_id: Some(session_id) }).await?;
        }
        let op = MqttOp::OpenSession {
            key: Sessions::key_of(lease),
            generation: Sessions::generation_of(lease),
            session_id: lease.session_id,
            expiry: if lease.persistent { expiry } else { 0 },
            resume: lease.present,
        };
        match online {
            true => log.mqtt_online(op, who.tenant.clone(), who.device_id.clone()).await,
            false => log.mqtt(op).await,
        }
        .map(|_| ())
    }

    /// CONNECT checks; returns who the connection is and its validated
    /// will, or the CONNACK refusal.
    fn check(
        &self,
        props: &ConnectProperties,
        client_id: &mut String,
        clean: bool,
        authed: Result<(Principal, i64, bool), Refusal>,
        will: Option<LastWill>,
    ) -> Result<(Identity, Option<LastWill>), Refusal> {
        check_props(props)?;
        // `charged`: the connect budget was already charged (secret logins).
        let (principal, expires_at, charged) = authed?;
        let Principal::Device { tenant, device_id, perms } = &principal else { return Err(admin_refused()) };
        self.assign_client_id(client_id, device_id, clean)?;
        if !perms.contains(&Perm::WriteEvents) && !perms.contains(&Perm::ReadEvents) {
            return Err((ConnectReturnCode::NotAuthorized, "token has neither write_events nor read_events".into()));
        }
        if let Some(w) = &will {
            let write = perms.contains(&Perm::WriteEvents);
            check_will(w, self.deps.config.max_topic_length, write, &self.deps.topics, tenant, device_id)?;
        }
        if !charged && !self.deps.sessions.connect_allowed(tenant, device_id) {
            return Err(self.connect_rate_refusal(device_id));
        }
        let who = Identity {
            peer: self.peer,
            tenant: tenant.clone(),
            device_id: device_id.clone(),
            client_id: client_id.clone(),
            principal: principal.clone(),
            expires_at,
        };
        Ok((who, will))
    }

    /// The device the login proves, and when its login expires: a client
    /// certificate (any username must name its device; no password needed),
    /// a token (the username must be its device id), or a device secret of
    /// at most 32 characters (the username names the device:
    /// `<tenant>/<id>`, or the id alone when one tenant has it).
    async fn authenticate(&self, login: Option<(&str, &str)>) -> Result<(Principal, i64, bool), Refusal> {
        let bad = |r: &str| (ConnectReturnCode::BadUserNamePassword, r.to_string());
        let refused = |e: crate::auth::Error| (refuse_code(&e), e.to_string());
        if let Some(cert) = &self.cert {
            let cert = cert.as_ref().map_err(|why| bad(why))?;
            let named = login.map_or("", |(username, _)| username);
            let full = format!("{}/{}", cert.tenant, cert.device_id);
            if !(named.is_empty() || named == cert.device_id || named == full) {
                return Err(bad(&format!("username {named:?} is not the client certificate's device {full:?}")));
            }
            let (principal, exp) = self.deps.auth.cert_login(&cert.tenant, &cert.device_id).map_err(refused)?;
            return Ok((principal, exp, false));
        }
        let (username, password) = login.ok_or_else(|| bad("no username/password"))?;
        if crate::auth::secret::is_secret(password) {
            // The device's connect budget is charged before the hash, so
            // guessing its secret cannot keep the verifications busy.
            let login = self.deps.auth.secret_login(username).map_err(refused)?;
            if !self.deps.sessions.connect_allowed(&login.tenant, &login.device_id) {
                return Err(self.connect_rate_refusal(&login.device_id));
            }
            let (principal, exp) = self.deps.auth.verify_secret(login, password).await.map_err(refused)?;
            return Ok((principal, exp, true));
        }
        let (principal, expires_at) = self.deps.auth.verify_expiring(password).map_err(refused)?;
        let Principal::Device { device_id, .. } = &principal else { return Err(admin_refused()) };
        if username != device_id {
            return Err(bad("username must be the token's device id"));
        }
        Ok((principal, expires_at, false))
    }

    /// A device over `mqtt.max_connects_per_minute`.
    fn connect_rate_refusal(&self, device_id: &str) -> Refusal {
        let why = format!(
            "more than mqtt.max_connects_per_minute = {} connects of device {device_id:?} in a minute; retry later",
            self.deps.config.max_connects_per_minute
        );
        (ConnectReturnCode::ConnectionRateExceeded, why)
    }

    /// The client-id rule: `<device id>` or `<device id>-<suffix>`. An
    /// empty client id is assigned `<device id>-<random>` (3.x: only with a
    /// clean session, as 3.1.1 requires).
    fn assign_client_id(&self, client_id: &mut String, device_id: &str, clean: bool) -> Result<(), Refusal> {
        if client_id.is_empty() {
            if !clean && !self.wire.version().is_v5() {
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
        Ok(())
    }
}

/// Keep-alive (held to `mqtt.max_keep_alive`; 5.0: told as Server Keep
/// Alive) and session expiry (3.x persistent sessions get the maximum;
/// 5.0 what it asked for, held to the maximum). Returns the terms, the
/// expiry asked for and the keep-alive granted.
fn terms(c: &MqttConfig, version: Version, connect: &Connect, props: &ConnectProperties) -> (Terms, u32, u16) {
    let max_ka = c.max_keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
    let keep_alive = if max_ka > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_ka) {
        max_ka
    } else {
        connect.keep_alive
    };
    let max_expiry = c.max_session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32;
    let asked = if version.is_v5() {
        props.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_session {
        0
    } else {
        u32::MAX
    };
    let terms = Terms {
        keep_alive: (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)).mul_f32(1.5)),
        session_expiry: asked.min(max_expiry),
        problem_info: props.request_problem_info != Some(0),
    };
    (terms, asked, keep_alive)
}

fn admin_refused() -> Refusal {
    (ConnectReturnCode::NotAuthorized, "admin tokens cannot connect as devices".into())
}

/// 5.0 CONNECT properties the front-end cannot honour or that break the
/// protocol.
fn check_props(props: &ConnectProperties) -> Result<(), Refusal> {
    if let Some(method) = &props.authentication_method {
        let why = format!("authentication method {method:?} is not supported: send the device token as password");
        return Err((ConnectReturnCode::BadAuthenticationMethod, why));
    }
    if props.receive_maximum == Some(0) || props.max_packet_size == Some(0) {
        return Err((ConnectReturnCode::ProtocolError, "Receive Maximum and Maximum Packet Size must not be 0".into()));
    }
    Ok(())
}

/// A will must be an event of the device itself (its own event topic, a
/// JSON object), within the topic length, and the device must be allowed
/// to write events.
fn check_will(
    w: &LastWill,
    max_topic: usize,
    may_write: bool,
    topics: &TopicMaps,
    tenant: &str,
    device_id: &str,
) -> Result<(), Refusal> {
    let topic = std::str::from_utf8(&w.topic).unwrap_or("");
    if w.topic.len() > max_topic {
        return Err((
            ConnectReturnCode::TopicNameInvalid,
            format!("will topic of {} bytes is over mqtt.max_topic_length", w.topic.len()),
        ));
    }
    // Any payload will do (`offline` is the classic one): what is not a
    // JSON object is kept wrapped in one when the will fires.
    match topics.resolve(topic, tenant, device_id).refusal(may_write, tenant, device_id) {
        None => Ok(()),
        Some(why) => Err((ConnectReturnCode::NotAuthorized, format!("will topic {topic:?}: {why}"))),
    }
}

/// The CONNECT properties of a client that sent none (3.x, or 5.0
/// without any): rumqttd's type has no `Default`.
fn no_props() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: vec![],
        authentication_method: None,
        authentication_data: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttd::protocol::QoS;

    fn connect(keep_alive: u16, clean_session: bool) -> Connect {
        Connect { keep_alive, client_id: "d1".into(), clean_session }
    }

    fn props(session_expiry: Option<u32>) -> ConnectProperties {
        ConnectProperties { session_expiry_interval: session_expiry, ..no_props() }
    }

    #[test]
    fn keep_alive_and_session_expiry_are_held_to_the_maximums() {
        let c = MqttConfig::default(); // keep-alive at most 1 h, sessions 1 day
        let (t, asked, ka) = terms(&c, Version::V311, &connect(60, true), &props(None));
        assert_eq!((t.keep_alive, t.session_expiry, asked, ka), (Some(Duration::from_secs(90)), 0, 0, 60));
        let (t, _, ka) = terms(&c, Version::V311, &connect(0, true), &props(None));
        assert_eq!((ka, t.keep_alive), (3600, Some(Duration::from_secs(5400))), "none asked: the maximum");
        let (_, _, ka) = terms(&c, Version::V311, &connect(u16::MAX, true), &props(None));
        assert_eq!(ka, 3600, "over the maximum: the maximum");
        let (t, asked, _) = terms(&c, Version::V311, &connect(60, false), &props(None));
        assert_eq!((t.session_expiry, asked), (86_400, u32::MAX), "3.1.1 persistent: the maximum");
        let (t, asked, _) = terms(&c, Version::V5, &connect(60, false), &props(Some(600)));
        assert_eq!((t.session_expiry, asked), (600, 600), "5.0: what it asked for");
        let (t, _, _) = terms(&c, Version::V5, &connect(60, true), &props(Some(u32::MAX)));
        assert_eq!(t.session_expiry, 86_400, "5.0 never-expires is held to the maximum");
        let unlimited = MqttConfig { max_keep_alive: Duration::ZERO, ..MqttConfig::default() };
        let (t, _, ka) = terms(&unlimited, Version::V311, &connect(0, true), &props(None));
        assert_eq!((ka, t.keep_alive), (0, None), "no maximum: no keep-alive is none");
    }

    #[test]
    fn finer_refusal_codes_fold_into_the_six_of_3x() {
        use ConnectReturnCode as C;
        assert_eq!(connack_code(Version::V5, C::QuotaExceeded), C::QuotaExceeded);
        assert_eq!(connack_code(Version::V311, C::QuotaExceeded), C::ServiceUnavailable);
        assert_eq!(connack_code(Version::V311, C::Banned), C::NotAuthorized);
        assert_eq!(connack_code(Version::V311, C::BadAuthenticationMethod), C::NotAuthorized);
        assert_eq!(connack_code(Version::V31, C::UnsupportedProtocolVersion), C::RefusedProtocolVersion);
        assert_eq!(connack_code(Version::V311, C::BadUserNamePassword), C::BadUserNamePassword);
    }

    #[test]
    fn connect_properties_the_front_end_cannot_honour_are_refused() {
        assert!(check_props(&props(None)).is_ok());
        let auth = ConnectProperties { authentication_method: Some("SCRAM-SHA-1".into()), ..props(None) };
        assert_eq!(check_props(&auth).unwrap_err().0, ConnectReturnCode::BadAuthenticationMethod);
        let zero = ConnectProperties { receive_maximum: Some(0), ..props(None) };
        assert_eq!(check_props(&zero).unwrap_err().0, ConnectReturnCode::ProtocolError);
    }

    #[test]
    fn a_will_must_be_an_event_of_the_device_itself() {
        let will = |topic: &str, message: &str| LastWill {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            message: Bytes::copy_from_slice(message.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        let own = "acme/devices/d1/events/gone";
        assert!(check_will(&will(own, r#" {"a":1}"#), 512, true, &TopicMaps::default(), "acme", "d1").is_ok());
        let code = |w: LastWill, max: usize, write: bool| {
            check_will(&w, max, write, &TopicMaps::default(), "acme", "d1").unwrap_err().0
        };
        assert_eq!(code(will(own, "{}"), 10, true), ConnectReturnCode::TopicNameInvalid);
        assert_eq!(code(will(own, "{}"), 512, false), ConnectReturnCode::NotAuthorized, "no write_events");
        assert_eq!(code(will("acme/devices/d2/events/gone", "{}"), 512, true), ConnectReturnCode::NotAuthorized);
        assert!(
            check_will(&will(own, "offline"), 512, true, &TopicMaps::default(), "acme", "d1").is_ok(),
            "any payload"
        );
    }
}

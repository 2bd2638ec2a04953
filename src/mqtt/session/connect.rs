//! The CONNECT: credentials, the client-id rule, the will, and the router
//! link under a tenant- and device-namespaced client id.

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{ConnAck, ConnectReturnCode, LastWill, Packet};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::super::PROTOCOL;
use super::super::acl::{client_id_allowed, event_topic};
use super::Session;
use crate::auth::{Perm, Principal};

fn refuse_code(e: &crate::auth::Error) -> ConnectReturnCode {
    if e.is_unauthenticated() { ConnectReturnCode::BadUserNamePassword } else { ConnectReturnCode::NotAuthorized }
}

impl Session<'_> {
    /// Reads and checks the CONNECT, opens the router link and answers the
    /// CONNACK. `None` when the connection ends here (refused, timed out).
    pub(super) async fn handshake(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<(LinkTx, LinkRx, Option<LastWill>)> {
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
        // The router's session namespace is global, and it never forgets a
        // client id: connections get bounded slot ids, namespaced by tenant
        // and device (`|` is in no tenant name or device id; rumqttd refuses
        // `+$#/`). See `state::Device`.
        let lease = self.deps.sessions.lease(&self.tenant, &self.device_id, &connect.client_id, !connect.clean_session);
        self.router_id = lease.router_id.clone();
        let links = self.deps.links.clone();
        let clean = connect.clean_session;
        let wipe = lease.wipe.then(|| lease.router_id.clone());
        self.lease = Some(lease);
        let router_id = self.router_id.clone();
        let built = tokio::task::spawn_blocking(move || {
            if let Some(old) = wipe {
                crate::mqtt::broker::drop_session(&links, old);
            }
            links(router_id, clean)
        })
        .await;
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
        let (principal, expires_at) =
            self.deps.auth.verify_expiring(password).map_err(|e| (refuse_code(&e), e.to_string()))?;
        let Principal::Device { tenant, device_id, perms } = &principal else {
            return Err((ConnectReturnCode::NotAuthorized, "admin tokens cannot connect as devices".into()));
        };
        if username != device_id {
            return Err(bad("username must be the token's device id"));
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
                return Err((ConnectReturnCode::NotAuthorized, "will payload must be a JSON object".into()));
            }
        }
        self.tenant = tenant.clone();
        self.device_id = device_id.clone();
        self.principal = principal.clone();
        self.expires_at = expires_at;
        Ok(will)
    }
}

//! TLS for the device listeners (`http.tls_listen`: HTTPS and WSS;
//! `mqtt.tls_listen`: MQTT over TLS), with rustls/ring like the uplink. The
//! certificate chain and key come from `tls.cert_file` / `tls.key_file`
//! (PEM), read at start (a bad file stops the start) and again on SIGHUP.
//! A reload changes what new handshakes present; open connections keep
//! theirs. A reload that fails keeps the old certificate and logs why.
//!
//! Devices may log in with a client certificate instead of a token or a
//! secret: with `tls.client_ca_file` set, the listeners ask for one
//! (optional: devices without one log in as before), verify it against
//! that CA (webpki; a certificate of another CA fails the handshake), and
//! its subject's CN names the device as `<tenant>/<device id>`
//! ([`ClientCert`]). The CA file is read at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// The certificate new handshakes get; swapped by [`Certs::reload`].
#[derive(Debug)]
pub(crate) struct Certs {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Client certificates are asked for and verified against this CA.
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl Certs {
    /// Reads both files; errors name the file and what is wrong with it.
    pub(crate) fn load(config: &TlsConfig) -> Result<Arc<Self>, String> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Err("tls.cert_file and tls.key_file must both be set for a TLS listener".into());
        };
        let key = read(cert_file, key_file)?;
        let clients = config.client_ca_file.as_deref().map(client_verifier).transpose()?;
        Ok(Arc::new(Self {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: RwLock::new(key),
            clients,
        }))
    }

    /// Reads the files again; on error the old certificate stays.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let key = read(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
        Ok(())
    }

    /// A rustls server config presenting the current certificate, offering
    /// `alpn` (e.g. `http/1.1`).
    pub(crate) fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let builder = match &self.clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut c = builder.with_cert_resolver(self.clone());
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// Verifies client certificates against the CA in `ca_file`; a client
/// without one is let through (it logs in with a token or a secret).
fn client_verifier(ca_file: &Path) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let named = |e: &dyn std::fmt::Display| format!("tls.client_ca_file {}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(&e))? {
        roots.add(cert.map_err(|e| named(&e))?).map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no PEM certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| named(&e))
}

/// The device a verified client certificate names: its subject's CN is
/// `<tenant>/<device id>` (checked against the registry at login, like
/// any other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientCert {
    pub(crate) tenant: String,
    pub(crate) device_id: String,
}

impl ClientCert {
    /// What the TLS session's client certificate says, if it presented one
    /// (rustls verified it against `tls.client_ca_file`); `Err` names what
    /// is wrong with a certificate that names no device.
    pub(crate) fn of(conn: &rustls::ServerConnection) -> Option<Result<Self, String>> {
        let leaf = conn.peer_certificates()?.first()?;
        Some(Self::from_der(leaf))
    }

    fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_cert::der::Decode;
        let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("client certificate unreadable: {e}"))?;
        let cn = common_name(&cert.tbs_certificate.subject)
            .ok_or("client certificate has no subject CN; it must be <tenant>/<device id>")?;
        let bad = || format!("client certificate CN {cn:?} must be <tenant>/<device id>");
        let (tenant, device_id) = cn.split_once('/').ok_or_else(bad)?;
        crate::event::Tenant::parse(tenant).map_err(|_| bad())?;
        crate::event::validate_device_id(device_id).map_err(|_| bad())?;
        Ok(Self { tenant: tenant.to_string(), device_id: device_id.to_string() })
    }
}

/// The subject's common name (2.5.4.3), as UTF-8, Printable or IA5 text.
fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    const CN: x509_cert::der::oid::ObjectIdentifier = x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    let value = name.0.iter().flat_map(|rdn| rdn.0.iter()).find(|a| a.oid == CN)?.value.clone();
    let text = value
        .decode_as::<Utf8StringRef<'_>>()
        .map(|s| s.as_str().to_string())
        .or_else(|_| value.decode_as::<PrintableStringRef<'_>>().map(|s| s.as_str().to_string()))
        .or_else(|_| value.decode_as::<Ia5StringRef<'_>>().map(|s| s.as_str().to_string()));
    text.ok()
}

fn read(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert_file {}: no PEM certificate in it", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls.key_file {}: {e} (a PEM private key: PKCS#8, PKCS#1 or SEC1)", key_file.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "tls.cert_file {} and tls.key_file {} do not belong together: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The SIGHUP handler, installed before the "listening" line, so a SIGHUP
/// right after it cannot take the default action (ending the process).
pub(crate) fn sighup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads the certificate on every SIGHUP until `shutdown` (`systemctl
/// reload outpost`). Without TLS listeners there is nothing to reload, and a
/// SIGHUP is logged and otherwise ignored.
pub(crate) async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    certs: Option<Arc<Certs>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => match certs.as_ref().map(|c| (c, c.reload())) {
                None => tracing::info!("SIGHUP: nothing to reload (no TLS listener configured)"),
                Some((c, Ok(()))) => tracing::info!(cert_file = %c.cert_file.display(), "SIGHUP: TLS certificate reloaded"),
                Some((_, Err(e))) => tracing::error!(error = %e, "SIGHUP: TLS certificate NOT reloaded; the previous one stays"),
            },
        }
    }
}

//! Connections to the central database: TLS via rustls/ring (always
//! verifying the server), TCP keepalives, `tcp_user_timeout` and a
//! server-side statement timeout. Shared by the forwarder and the LISTEN
//! stage; built once at start, so a bad URL or CA file stops the start.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config as PgConfig};

use super::Error;
use crate::config::{CentralConfig, TlsMode};

/// The connection half of a raw client (it must be polled for notifications).
pub type RawConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// What the forwarder needs to open connections, built once at start.
#[derive(Clone)]
pub struct Connector {
    pg: PgConfig,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Client-side bound on one batch: statement timeout + 5 s.
    pub batch_timeout: Duration,
    /// How long a ping may go unanswered (`central.answer_timeout`).
    pub answer_timeout: Duration,
    /// Width of the time partitions (`central.partition_interval`).
    pub partition_interval: crate::config::PartitionInterval,
    /// How far back from now partitions are made (`central.partition_window`).
    pub partition_window: Duration,
    /// Whether statements are kept prepared per connection
    /// (`central.prepared_statements`).
    pub prepares: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints the password.
        f.debug_struct("Connector")
            .field("hosts", &self.pg.get_hosts())
            .field("dbname", &self.pg.get_dbname())
            .field("user", &self.pg.get_user())
            .finish()
    }
}

impl Connector {
    /// Parses the URL and prepares TLS. Errors here are configuration errors.
    pub fn new(config: &CentralConfig) -> Result<Self, Error> {
        let url = config.url.as_deref().ok_or_else(|| Error::Config("central.url is not set".into()))?;
        let mut pg = PgConfig::from_str(url).map_err(|e| Error::Config(format!("central.url: {e}")))?;
        if let Some(pw) = central_password(config)? {
            pg.password(pw);
        }
        let statement_ms = config.statement_timeout.as_millis();
        pg.application_name("outpost")
            .connect_timeout(config.connect_timeout)
            .keepalives(true)
            .keepalives_idle(config.keepalive_idle)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            // Sent data or keepalive probes unanswered this long and the
            // kernel drops the connection, even mid-batch: a silent partition
            // under load shows as fast as an idle one.
            .tcp_user_timeout(config.keepalive_idle + Duration::from_secs(3))
            .options(format!(
                "-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={statement_ms}"
            ))
            .ssl_mode(match config.tls {
                TlsMode::Disable => SslMode::Disable,
                TlsMode::Prefer => SslMode::Prefer,
                TlsMode::Require => SslMode::Require,
            });
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(config)?);
        Ok(Self {
            pg,
            tls,
            batch_timeout: config.statement_timeout + Duration::from_secs(5),
            answer_timeout: config.answer_timeout,
            partition_interval: config.partition_interval,
            partition_window: config.partition_window,
            prepares: config.prepares(),
        })
    }

    /// A plain connection with its `Connection` half, for LISTEN.
    pub async fn connect_raw(&self, application_name: &str) -> Result<(Client, RawConnection), Error> {
        let mut pg = self.pg.clone();
        pg.application_name(application_name);
        let timeout = pg.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10)) + Duration::from_secs(1);
        Ok(tokio::time::timeout(timeout, pg.connect(self.tls.clone()))
            .await
            .map_err(|_| Error::NoAnswer { what: "connect", after: timeout })??)
    }

    /// A connection whose `Connection` half is driven by a task of its own
    /// (abort the task to drop a blackholed socket at once).
    pub async fn connect(&self) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
        let (client, connection) = self.connect_raw("outpost").await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "central connection ended");
            }
        });
        Ok((client, task))
    }
}

/// `sql` prepared on `client` once: later calls take it from `cache`
/// (keyed by the statement's text; one cache per connection).
pub async fn prepared(
    client: &Client,
    cache: &mut std::collections::HashMap<String, tokio_postgres::Statement>,
    sql: &str,
    types: &[tokio_postgres::types::Type],
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare_typed(sql, types).await?;
    cache.insert(sql.to_string(), s.clone());
    Ok(s)
}

/// `SELECT 1`, answered within `within` or [`Error::NoAnswer`].
pub async fn ping(client: &Client, within: Duration) -> Result<(), Error> {
    match tokio::time::timeout(within, client.simple_query("SELECT 1")).await {
        Ok(r) => r.map(drop).map_err(Error::from),
        Err(_) => Err(Error::NoAnswer { what: "ping", after: within }),
    }
}

/// The password from `central.password_file` or `OUTPOST_CENTRAL_PASSWORD`.
fn central_password(config: &CentralConfig) -> Result<Option<String>, Error> {
    if let Some(path) = &config.password_file {
        let pw = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("central.password_file {}: {e}", path.display())))?;
        return Ok(Some(pw.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(std::env::var("OUTPOST_CENTRAL_PASSWORD").ok())
}

/// rustls with the ring provider; roots from `ca_file` or the system bundle.
fn tls_config(config: &CentralConfig) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let path = config.ca_file.clone().unwrap_or_else(|| std::path::PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::{self, PemObject};
    match CertificateDer::pem_file_iter(&path) {
        Ok(certs) => {
            for cert in certs {
                let cert = cert.map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
                // A bundle may hold certificates rustls cannot use; skip those.
                let _ = roots.add(cert);
            }
        }
        Err(pem::Error::Io(e)) if config.ca_file.is_some() => {
            return Err(Error::Config(format!("central.ca_file {}: {e}", path.display())));
        }
        Err(e) if config.ca_file.is_some() => {
            return Err(Error::Config(format!("central.ca_file {}: {e}", path.display())));
        }
        Err(_) => {}
    }
    if config.ca_file.is_some() && roots.is_empty() {
        return Err(Error::Config(format!("central.ca_file {}: no certificates found", path.display())));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

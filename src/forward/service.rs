//! The central database connection: connect (TLS via rustls/ring, TCP
//! keepalives, `tcp_user_timeout`, server-side statement timeout) and write one
//! tenant's batch in one transaction: COPY BINARY into a temporary stage, then
//! `INSERT … SELECT … ON CONFLICT (id) DO NOTHING`, so a resend never
//! duplicates.

use std::error::Error as StdError;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::pin_mut;
use tokio::task::JoinHandle;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};
use tokio_postgres::{Client, Config as PgConfig};

use super::Error;
use crate::config::{CentralConfig, TlsMode};
use crate::event::StoredEvent;

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
            .tcp_user_timeout(config.keepalive_idle + Duration::from_secs(5))
            .options(format!(
                "-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={statement_ms}"
            ))
            .ssl_mode(match config.tls {
                TlsMode::Disable => SslMode::Disable,
                TlsMode::Prefer => SslMode::Prefer,
                TlsMode::Require => SslMode::Require,
            });
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(config)?);
        Ok(Self { pg, tls, batch_timeout: config.statement_timeout + Duration::from_secs(5) })
    }

    /// A plain connection with its `Connection` half, for LISTEN.
    pub async fn connect_raw(&self, application_name: &str) -> Result<(Client, RawConnection), Error> {
        let mut pg = self.pg.clone();
        pg.application_name(application_name);
        let timeout = pg.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10)) + Duration::from_secs(1);
        Ok(tokio::time::timeout(timeout, pg.connect(self.tls.clone()))
            .await
            .map_err(|_| Error::Timeout("connect"))??)
    }

    /// Opens a connection and its staging table.
    pub async fn connect(&self) -> Result<Central, Error> {
        let (client, connection) = tokio::time::timeout(
            self.pg.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10)) + Duration::from_secs(1),
            self.pg.connect(self.tls.clone()),
        )
        .await
        .map_err(|_| Error::Timeout("connect"))??;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "central connection ended");
            }
        });
        let central = Central { client, task };
        central
            .client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS outpost_stage (
                    id uuid, device_id text, event_type text, payload jsonb, ts timestamptz,
                    site_id text, site_seq bigint, received_at timestamptz
                 ) ON COMMIT DELETE ROWS",
            )
            .await?;
        Ok(central)
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
    match std::fs::File::open(&path) {
        Ok(f) => {
            for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(f)) {
                let cert = cert.map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
                // A bundle may hold certificates rustls cannot use; skip those.
                let _ = roots.add(cert);
            }
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

/// An open central connection.
pub struct Central {
    client: Client,
    task: JoinHandle<()>,
}

impl Drop for Central {
    fn drop(&mut self) {
        // A blackholed socket would otherwise linger until keepalives give up.
        self.task.abort();
    }
}

/// JSON text sent as `jsonb` (binary format: version byte 1, then the text).
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    accepts!(JSON, JSONB);
    to_sql_checked!();
}

impl Central {
    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The client, for migrations.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Writes one tenant's rows in one transaction, idempotently.
    pub async fn write(&mut self, schema: &str, rows: &[&StoredEvent]) -> Result<u64, Error> {
        let tx = self.client.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY outpost_stage (id, device_id, event_type, payload, ts, site_id, site_seq, received_at) \
                 FROM STDIN BINARY",
            )
            .await?;
        let types = [
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::INT8,
            Type::TIMESTAMPTZ,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for r in rows {
            let payload = JsonText(r.payload.get());
            writer
                .as_mut()
                .write(&[
                    &r.id,
                    &r.device_id,
                    &r.event_type,
                    &payload,
                    &r.timestamp,
                    &r.origin_site,
                    &r.seq,
                    &r.received_at,
                ])
                .await?;
        }
        writer.finish().await?;
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO {schema}.events (id, device_id, event_type, payload, \"timestamp\", site_id, site_seq, received_at)
                     SELECT id, device_id, event_type, payload, ts, site_id, site_seq, received_at
                     FROM outpost_stage ORDER BY site_seq
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(inserted)
    }
}

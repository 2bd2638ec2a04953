//! The central PostgreSQL, as both the forwarder and the LISTEN stage see
//! it: connections (TLS, keepalives, timeouts), per-tenant schema
//! migrations, the error classification that decides retry versus dead
//! letter, and the backoff both stages reconnect with.

pub mod backoff;
pub mod connect;
pub mod schema;

pub use backoff::Backoff;
pub use connect::{Connector, RawConnection};

/// Why a central-database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("central database: {}", describe_pg(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("central database did not answer ({0}) in time")]
    Timeout(&'static str),
    /// A ping or connect met silence: a partition, not a slow server.
    #[error("no answer from central for {} s ({what})", .after.as_secs())]
    NoAnswer { what: &'static str, after: std::time::Duration },
    #[error("central configuration: {0}")]
    Config(String),
    #[error("invalid tenant name {0:?}")]
    BadTenant(String),
}

/// "SQLSTATE 22P05: unsupported Unicode escape sequence (detail…)" for server
/// errors; the driver's text and its causes otherwise.
fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("SQLSTATE {}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            s
        }
        None => {
            // "error performing TLS handshake: invalid peer certificate: …"
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

impl Error {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The rows themselves are unacceptable (data exception 22xxx, integrity
    /// violation 23xxx, or a tenant name that can never be a schema).
    pub fn is_data_error(&self) -> bool {
        matches!(self, Error::BadTenant(_))
            || self.sqlstate().is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
    }

    /// The tenant's schema or table does not exist (3F000, 42P01).
    pub fn is_missing_schema(&self) -> bool {
        matches!(self.sqlstate(), Some("3F000" | "42P01"))
    }

    /// A batch ran out of time: the client-side bound, or the server's
    /// statement (57014) or idle-in-transaction (25P03) timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_)) || matches!(self.sqlstate(), Some("57014" | "25P03"))
    }
}

/// The error of a stage that moves rows between the site log and the central
/// database (the forwarder, the LISTEN connection).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Central(#[from] Error),
    #[error(transparent)]
    Log(#[from] crate::log::Error),
}

impl From<tokio_postgres::Error> for StageError {
    fn from(e: tokio_postgres::Error) -> Self {
        StageError::Central(e.into())
    }
}

impl StageError {
    /// The rows themselves are unacceptable to the central database: bisect,
    /// dead-letter. Everything else (connection and I/O errors, timeouts,
    /// serialization failures, missing schemas, errors we cannot classify)
    /// is retried with backoff: inserts are idempotent, so a retry is always
    /// safe, and dead-lettering an unknown error would not be.
    pub fn is_data_error(&self) -> bool {
        matches!(self, StageError::Central(c) if c.is_data_error())
    }

    /// The tenant's schema or table is missing centrally.
    pub fn is_missing_schema(&self) -> bool {
        matches!(self, StageError::Central(c) if c.is_missing_schema())
    }

    /// A batch ran out of time (see [`Error::is_timeout`]): send less at once.
    pub fn is_timeout(&self) -> bool {
        matches!(self, StageError::Central(c) if c.is_timeout())
    }

    /// Central did not answer at all (a silent partition): probe again soon
    /// rather than after a long backoff, since silence costs central nothing.
    pub fn is_no_answer(&self) -> bool {
        matches!(self, StageError::Central(Error::NoAnswer { .. }))
    }
}

//! The SQLite site log: the durable heart of the appliance.
//!
//! Guarantees:
//! - An append is answered only after its transaction committed with
//!   `synchronous=FULL` in WAL mode: an `Ok` means the rows survive a power cut.
//! - One writer thread owns the write connection and group-commits whatever is
//!   queued (up to a row and byte cap) in one transaction; each request sits in
//!   its own savepoint, so one refused request never takes others with it.
//! - A batch request is all-or-nothing. A repeated event id from the same
//!   device is answered with the original `seq` and writes nothing.
//! - `seq` only grows and is never reused; rows leave only by retention, and
//!   only once forwarded.
//! - At the byte budget appends are refused (`Error::Full`), never dropped.

mod budget;
mod cmd;
mod handle;
pub mod mqtt;
pub mod reader;
pub mod retention;
pub mod schema;
pub mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use reader::Readers;

/// Told about every event right after the transaction that added it committed
/// (local appends and remote events), in commit order, and about devices
/// going online or offline once that is recorded. Called on the writer
/// thread, before the group's answers: it must not block. The stream hub
/// and the MQTT bridge are fed this way, so nothing downstream sees an
/// event before it is durable, and whoever was answered can count on them
/// having it.
pub trait CommitObserver: Send + Sync {
    /// Events a group committed, in seq order.
    fn committed(&self, events: &[Committed]);
    /// A device went online or offline.
    fn presence(&self, _tenant: &str, _device_id: &str, _online: bool) {}
}

/// A committed event, as observers get it: its seq, and what an MQTT
/// publish recorded beside it (none for other appends and remote events).
#[derive(Debug, Clone)]
pub struct Committed {
    pub seq: i64,
    pub event: crate::event::Event,
    pub mqtt: Option<Box<mqtt::Facts>>,
}

impl Committed {
    /// An event that carried nothing beside it.
    fn plain(seq: i64, event: crate::event::Event) -> Self {
        Self { seq, event, mqtt: None }
    }
}

/// Gauges of the log, kept by the writer as it commits, so status pages and
/// `/metrics` never scan the log. Set from a scan when the writer starts,
/// and again after another process (the CLI's replay and dead-letter
/// commands) changed the events, which it tells through `meta.log_version`.
#[derive(Debug, Default)]
struct Counters {
    backlog_rows: AtomicI64,
    remote_bytes: AtomicI64,
    /// Bytes of pending rows, as `event::row_bytes` counts them.
    backlog_bytes: AtomicI64,
    total_rows: AtomicI64,
    dead_letters: AtomicI64,
    last_seq: AtomicI64,
}

impl Counters {
    /// Overwrites every gauge with a scan's result.
    fn set(&self, s: &schema::Scan) {
        self.backlog_rows.store(s.backlog_rows, Ordering::Relaxed);
        self.remote_bytes.store(s.remote_bytes, Ordering::Relaxed);
        self.backlog_bytes.store(s.backlog_bytes, Ordering::Relaxed);
        self.total_rows.store(s.total_rows, Ordering::Relaxed);
        self.dead_letters.store(s.dead_letters, Ordering::Relaxed);
        // Never back: the writer gives the next seq from here.
        self.last_seq.fetch_max(s.last_seq, Ordering::Relaxed);
    }

    /// The gauges now.
    fn get(&self) -> schema::Scan {
        schema::Scan {
            backlog_rows: self.backlog_rows.load(Ordering::Relaxed),
            remote_bytes: self.remote_bytes.load(Ordering::Relaxed),
            backlog_bytes: self.backlog_bytes.load(Ordering::Relaxed),
            total_rows: self.total_rows.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            last_seq: self.last_seq.load(Ordering::Relaxed),
        }
    }
}

/// A remote event and the (tenant, site, site_seq) it advances.
#[derive(Debug, Clone)]
pub struct RemoteEvent {
    pub event: crate::event::Event,
    pub site_seq: i64,
}
pub use handle::{Appended, LogHandle};
pub use mqtt::MqttOp;
pub use writer::WriterConfig;

/// Why a site-log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("site log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("site log migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("site log is full: {used} of {budget} bytes used")]
    Full { used: u64, budget: u64 },
    #[error("event {index}: id {id} is already used by another device or tenant")]
    IdConflict { index: usize, id: uuid::Uuid },
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("device {tenant}/{device_id} already exists")]
    DeviceExists { tenant: String, device_id: String },
    #[error("device {tenant}/{device_id} was revoked; its id cannot be reused")]
    DeviceRevoked { tenant: String, device_id: String },
    #[error("device {tenant}/{device_id} not found")]
    DeviceNotFound { tenant: String, device_id: String },
    #[error("device {tenant}/{device_id} is not a registered gateway (outpost device add --gateway)")]
    NotAGateway { tenant: String, device_id: String },
    /// A gateway's publish for a device it may not publish for; `quota`:
    /// it would be one child more than `mqtt.gateway_max_children`.
    #[error("{why}")]
    ChildRefused { why: String, quota: bool },
    #[error("site log writer has stopped")]
    Closed,
    #[error("site log reader task failed: {0}")]
    Join(String),
}

impl Error {
    /// This error again, for each of the requests one failed call carried
    /// (the SQLite and migration errors it wraps cannot be copied: their text).
    pub fn for_each(&self) -> Error {
        match self {
            Error::Full { used, budget } => Error::Full { used: *used, budget: *budget },
            Error::Closed => Error::Closed,
            other => Error::Commit(other.to_string()),
        }
    }
}

/// Page size of a new site log. A commit writes every page it touched to
/// the WAL, so at a trickle (an event or two per commit) small pages write
/// less: measured at 100 events/s with forwarding on, about 10 KB per
/// commit with 1 KiB pages, 14 KB with 2 KiB and 21 KB with 4 KiB, and no
/// more per event in batches (README, performance).
pub const PAGE_SIZE: i64 = 1024;

/// Opens a connection with the pragmas every connection needs. The caller
/// decides whether it is the writer (`synchronous=FULL` matters there).
pub fn open(path: &Path, read_only: bool) -> Result<Connection, Error> {
    configure_sqlite();
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    if !read_only {
        // A new log only (an existing one keeps its size: WAL mode cannot
        // change it without rewriting the file).
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable acks: fsync the WAL at every commit.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the WAL file from growing without bound after bursts.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    }
    conn.pragma_update(None, "cache_size", -8192)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Process-wide SQLite settings, once, before the first connection:
/// memory statistics off. With them on (SQLite's default), every
/// allocation SQLite makes takes and releases a global mutex to count it:
/// 5% of the appliance's CPU in HTTP batches (perf, issue #29); nothing
/// here reads those statistics.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: called before any connection exists in this process (the
        // Once runs at the first `open`, and every connection is opened
        // through it); SQLITE_CONFIG_MEMSTATUS takes one int.
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was initialized already: its memory statistics stay on");
        }
    });
}

/// Opens the log for writing and brings its schema up to date.
pub fn open_and_migrate(path: &Path) -> Result<Connection, Error> {
    let mut conn = open(path, false)?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

//! The site log's schema and every SQL statement run against it, grouped
//! by table: events, forwarding (watermark, dead letters, replay,
//! retention), devices, other sites' events, and the gauges' scan. MQTT
//! state has its own statements in the MQTT module.
//!
//! Functions take a plain `&Connection` so the writer thread, the reader
//! pool and the CLI (another process) share one definition of each
//! operation. None of them opens a transaction: the caller's transaction
//! (the writer's group, a CLI command) is what makes a change atomic.

mod devices;
mod events;
mod forward;
mod remote;
mod scan;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use super::Error;
use crate::event::ROW_OVERHEAD;

pub use devices::{
    Child, Device, Role, add_device, child_status, device_by_id, device_secret, devices, online_devices, revoke_device,
    set_device_secret,
};
pub(crate) use devices::{bump_device, child_for_event, set_presence};
#[cfg(any(test, feature = "test-util"))]
pub use events::all_events;
pub(crate) use events::{Inserter, run_insert};
pub use events::{Query, insert_event, last_seq, query, seq_high};
pub(crate) use events::{insert_event_sql, owner_of};
pub use forward::at_risk;
#[cfg(any(test, feature = "test-util"))]
pub use forward::pending;
pub use forward::{
    DeadLetter, dead_letters, has_pending, pending_batch, purge_dead_letters, replay_chunk, retry_dead_letters,
    watermark,
};
pub(crate) use forward::{dead_letter, mark_forwarded, prune, resend, skip_forwarded};
pub(crate) use remote::{advance_remote_cursor, evict_remote};
pub use remote::{known_tenants, remote_cursors};
pub use scan::{LogStatus, Scan, scan, status, status_from};

// The forwarding state as SQL, shared by the events' columns and the
// forwarding statements.

/// The forwarding watermark: every row of this site at or below it was
/// committed centrally, except those in `pending_again`. A macro so that
/// [`PENDING`] can be built from the same text.
macro_rules! watermark_sql {
    () => {
        "(SELECT coalesce(max(upto), 0) FROM forward_marks)"
    };
}
pub(super) const WATERMARK: &str = watermark_sql!();

/// A row still to be forwarded (see migration 7).
pub(super) const PENDING: &str =
    concat!("forwarded_at IS NULL AND (seq > ", watermark_sql!(), " OR seq IN (SELECT seq FROM pending_again))");

/// When a row was forwarded: its own time, else that of the first mark that
/// moved the watermark past it; NULL while pending.
pub(super) const FORWARDED_AT: &str =
    "coalesce(forwarded_at, CASE WHEN events.seq IN (SELECT seq FROM pending_again) THEN NULL
    ELSE (SELECT at FROM forward_marks WHERE upto >= events.seq ORDER BY upto LIMIT 1) END)";

/// The site log's migrations, from `migrations/sqlite/` (tracked in
/// `user_version`, so none is applied twice).
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../../../migrations/sqlite/0001_site_log.sql")),
        M::up(include_str!("../../../migrations/sqlite/0002_dead_letter.sql")),
        M::up(include_str!("../../../migrations/sqlite/0003_mqtt_redelivery.sql")),
        M::up(include_str!("../../../migrations/sqlite/0004_remote_cursor.sql")),
        M::up(include_str!("../../../migrations/sqlite/0005_mqtt_session.sql")),
        M::up(include_str!("../../../migrations/sqlite/0006_event_properties.sql")),
        M::up(include_str!("../../../migrations/sqlite/0007_forward_watermark.sql")),
        M::up(include_str!("../../../migrations/sqlite/0008_mqtt_chain.sql")),
        M::up(include_str!("../../../migrations/sqlite/0009_mqtt_sessions.sql")),
        M::up_with_hook(include_str!("../../../migrations/sqlite/0010_seq_floor.sql"), drop_autoincrement),
        M::up(include_str!("../../../migrations/sqlite/0011_device_secrets.sql")),
        M::up(include_str!("../../../migrations/sqlite/0012_gateways.sql")),
    ])
}

/// Migration 10's hook: `events` loses `AUTOINCREMENT` in its declared SQL
/// only (SQLite's documented in-place schema edit, for a change that leaves
/// the stored rows as they are), instead of being copied into a new table.
/// The schema version is bumped so every connection reads the new SQL.
fn drop_autoincrement(tx: &rusqlite::Transaction<'_>) -> rusqlite_migration::HookResult {
    let version: i64 = tx.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    let edited = tx.execute(
        "UPDATE sqlite_schema SET sql = replace(sql, 'INTEGER PRIMARY KEY AUTOINCREMENT', 'INTEGER PRIMARY KEY')
         WHERE type = 'table' AND name = 'events'",
        [],
    );
    tx.pragma_update(None, "schema_version", version + 1)?;
    tx.pragma_update(None, "writable_schema", false)?;
    edited?;
    let sql: String =
        tx.query_row("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'events'", [], |r| r.get(0))?;
    if sql.contains("AUTOINCREMENT") {
        return Err(rusqlite_migration::HookError::Hook(format!("events still declares AUTOINCREMENT: {sql}")));
    }
    Ok(())
}

/// Applies pending migrations.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), Error> {
    migrations().to_latest(conn)?;
    Ok(())
}

/// Bytes the database's pages hold, free pages excluded. The writer asks
/// before every commit, so its statements are cached (the table-valued
/// `pragma_page_count()` form costs more than these three).
pub(crate) fn used_bytes(conn: &Connection) -> Result<u64, Error> {
    let pragma = |sql: &str| -> Result<i64, Error> { Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?) };
    let (pages, free, size) =
        (pragma("PRAGMA page_count")?, pragma("PRAGMA freelist_count")?, pragma("PRAGMA page_size")?);
    Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
}

/// The bytes a row counts for in the budget and the gauges, as SQL.
pub(super) fn row_bytes_sql() -> String {
    format!("length(tenant) + length(device_id) + length(event_type) + length(payload) + {ROW_OVERHEAD}")
}

/// Changes whenever a process other than the writer changed the events
/// (replay, dead-letter retry or purge), so the writer counts again.
pub(crate) fn log_version(conn: &Connection) -> Result<i64, Error> {
    let mut stmt = conn.prepare_cached("SELECT coalesce((SELECT value FROM meta WHERE key = 'log_version'), 0)")?;
    Ok(stmt.query_row([], |r| r.get(0))?)
}

fn bump_log_version(conn: &Connection) -> Result<(), Error> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('log_version', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
        [],
    )?;
    Ok(())
}

/// Changes with every device change, from any process.
pub fn registry_version(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = 'registry_version'", [], |r| r.get(0))?)
}

fn bump_registry_version(conn: &Connection) -> Result<(), Error> {
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'registry_version'", [])?;
    Ok(())
}

/// What the unit tests of the log share: a migrated log in memory and
/// events to put in it.
#[cfg(test)]
pub(crate) mod testing {
    use rusqlite::Connection;

    use crate::event::Event;

    /// An empty site log in memory, migrated.
    pub(crate) fn log() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        super::migrate(&mut c).unwrap();
        c
    }

    /// An event of `acme/<device>` accepted at `site`, received at 1 s.
    pub(crate) fn event(device: &str, site: &str) -> Event {
        Event {
            id: uuid::Uuid::now_v7(),
            tenant: "acme".into(),
            device_id: device.into(),
            event_type: "t".into(),
            payload: r#"{"a":1}"#.into(),
            timestamp_us: 1_000_000,
            received_at_us: 1_000_000,
            origin_site: site.into(),
            properties: None,
        }
    }

    /// A registry row of a plain device (`revoked` at 1 s, or not).
    pub(crate) fn device(tenant: &str, device_id: &str, revoked: bool) -> super::Device {
        super::Device {
            tenant: tenant.into(),
            device_id: device_id.into(),
            name: None,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            revoked_at: revoked.then(|| crate::event::from_us(1_000_000)),
            last_seen: None,
            online: false,
            event_count: 0,
            gateway: false,
            via: None,
        }
    }

    /// Inserts `e` as a local append does; its seq.
    pub(crate) fn insert(c: &Connection, e: &Event) -> i64 {
        super::insert_event(c, e, None, &mut super::events::seq_high(c).unwrap()).unwrap().unwrap()
    }

    /// The seqs in the log, in order.
    pub(crate) fn seqs(c: &Connection) -> Vec<i64> {
        super::all_events(c).unwrap().iter().map(|e| e.seq).collect()
    }
}

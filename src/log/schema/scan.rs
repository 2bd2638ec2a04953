//! The log's gauges counted by a scan (at start, and after another
//! process changed the events) and the status built from them.
//!
//! Guarantees: a scan counts exactly what the writer's gauges track, with
//! the same row-size formula (`event::row_bytes`), so a recount never
//! jumps.

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::super::Error;
use super::PENDING;
use super::forward::first_pending;
use super::{row_bytes_sql, used_bytes};

/// The log's gauges, counted by a scan (see `log::Counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    pub backlog_rows: i64,
    /// Bytes of other sites' events (`event::row_bytes`).
    pub remote_bytes: i64,
    pub backlog_bytes: i64,
    pub total_rows: i64,
    pub dead_letters: i64,
    pub last_seq: i64,
}

/// Counts the gauges by scanning (at start, and after another process
/// changed the events): O(rows). `remote_bytes` (events of sites other
/// than `site_id`) only when a site is given: the CLI's status has no use
/// for it.
pub fn scan(conn: &Connection, site_id: Option<&str>) -> Result<Scan, Error> {
    let remote_bytes: i64 = match site_id {
        Some(site) => conn.query_row(
            &format!("SELECT coalesce(sum({}), 0) FROM events WHERE origin_site != ?1", row_bytes_sql()),
            [site],
            |r| r.get(0),
        )?,
        None => 0,
    };
    // Above the watermark (a range of the pending index), plus pending again.
    let (backlog_rows, backlog_bytes): (i64, i64) = conn.query_row(
        &format!("SELECT count(*), coalesce(sum({}), 0) FROM events WHERE {PENDING}", row_bytes_sql()),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let total_rows: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    // The last seq ever given, also when retention pruned every row.
    let last_seq = super::events::seq_high(conn)?;
    let dead_letters: i64 = conn.query_row("SELECT count(*) FROM dead_letter", [], |r| r.get(0))?;
    Ok(Scan { backlog_rows, remote_bytes, backlog_bytes, total_rows, dead_letters, last_seq })
}

/// The status from gauges already counted, plus what is cheap to ask:
/// the oldest pending row (the first above the watermark, or the first
/// pending again), the device
/// counts (a small table) and the size (page counts).
pub fn status_from(conn: &Connection, counted: Scan, now_us: i64) -> Result<LogStatus, Error> {
    let oldest: Option<i64> = match first_pending(conn)? {
        Some(seq) => conn.query_row("SELECT received_at FROM events WHERE seq = ?1", [seq], |r| r.get(0)).optional()?,
        None => None,
    };
    let (devices, devices_revoked): (i64, i64) =
        conn.query_row("SELECT count(*), count(revoked_at) FROM devices", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(LogStatus {
        backlog_rows: counted.backlog_rows,
        #[allow(clippy::cast_precision_loss)]
        oldest_pending_age_seconds: oldest.map(|t| ((now_us - t).max(0)) as f64 / 1e6),
        total_rows: counted.total_rows,
        last_seq: counted.last_seq,
        backlog_bytes: counted.backlog_bytes,
        dead_letters: counted.dead_letters,
        devices,
        devices_revoked,
        log_bytes: used_bytes(conn)?,
    })
}

/// What `outpost status` and `/api/v1/status` report about the log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogStatus {
    pub backlog_rows: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub total_rows: i64,
    pub last_seq: i64,
    pub backlog_bytes: i64,
    pub dead_letters: i64,
    pub devices: i64,
    pub devices_revoked: i64,
    pub log_bytes: u64,
}

/// Backlog, oldest pending age, devices and size, counted by a scan (the
/// CLI's `outpost status`; the running appliance keeps `log::Counters`).
pub fn status(conn: &Connection, now_us: i64) -> Result<LogStatus, Error> {
    status_from(conn, scan(conn, None)?, now_us)
}

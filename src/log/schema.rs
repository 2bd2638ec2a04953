//! The site log's schema and every SQL statement run against it. Functions
//! take a plain `&Connection` so the writer thread, the reader pool and the
//! CLI (another process) share one definition of each operation.

use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::Error;
use crate::event::{Event, ROW_OVERHEAD, StoredEvent, from_us, row_bytes};

/// The site log's migrations, from `migrations/sqlite/` (tracked in
/// `user_version`, so none is applied twice).
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../../migrations/sqlite/0001_site_log.sql")),
        M::up(include_str!("../../migrations/sqlite/0002_dead_letter.sql")),
        M::up(include_str!("../../migrations/sqlite/0003_mqtt_redelivery.sql")),
        M::up(include_str!("../../migrations/sqlite/0004_remote_cursor.sql")),
        M::up(include_str!("../../migrations/sqlite/0005_mqtt_session.sql")),
        M::up(include_str!("../../migrations/sqlite/0006_event_properties.sql")),
        M::up(include_str!("../../migrations/sqlite/0007_forward_watermark.sql")),
        M::up(include_str!("../../migrations/sqlite/0008_mqtt_chain.sql")),
        M::up(include_str!("../../migrations/sqlite/0009_mqtt_sessions.sql")),
    ])
}

/// Applies pending migrations.
pub fn migrate(conn: &mut Connection) -> Result<(), Error> {
    migrations().to_latest(conn)?;
    Ok(())
}

/// Inserts one event; `None` when its id is already in the log. (No
/// `RETURNING seq`: SQLite buffers RETURNING rows in an ephemeral table it
/// opens and closes per statement, which cost the writer thread about a
/// fifth of its time in HTTP batches; the new row's seq is the
/// connection's last rowid.) `mqtt_prev`: the device's previous event with
/// a packet id, for one that has one (see [`find_redelivered`]).
pub fn insert_event(
    conn: &Connection,
    e: &Event,
    forwarded_at: Option<i64>,
    mqtt_prev: Option<i64>,
) -> Result<Option<i64>, Error> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (id, tenant, device_id, event_type, payload, ts, received_at, forwarded_at, origin_site,
                             mqtt_pkid, mqtt_digest, properties, mqtt_prev)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let inserted = stmt.execute(params![
        e.id.as_bytes(),
        e.tenant,
        e.device_id,
        e.event_type,
        e.payload,
        e.timestamp_us,
        e.received_at_us,
        forwarded_at,
        e.origin_site,
        e.redelivery.map(|r| r.pkid),
        e.redelivery.map(|r| r.digest),
        e.properties,
        mqtt_prev
    ])?;
    Ok((inserted == 1).then(|| conn.last_insert_rowid()))
}

/// How far back a DUP=1 publish is compared: the device's last this many
/// events that carried a packet id, received within `REDELIVERY_WINDOW_US`.
pub const REDELIVERY_EVENTS: i64 = 1000;
/// Ten minutes.
pub const REDELIVERY_WINDOW_US: i64 = 600_000_000;

/// An earlier copy of a redelivered MQTT publish: `(seq, id)`.
///
/// The rule: a DUP=1 publish is the earlier copy of the device's most recent
/// event that carried the same packet id (among its last
/// `REDELIVERY_EVENTS` with a packet id, received within `REDELIVERY_WINDOW_US`) when that
/// event has the same topic (its event type: tenant and device are the
/// device's own) and the same payload digest. Anything else is stored.
///
/// Why no genuinely new publish matches: DUP=1 says the client is resending
/// a publish it sent before and saw no PUBACK for. If that first attempt
/// reached us, it was stored before anything else could be (acks follow the
/// commit), and the client cannot have used the packet id again since it
/// still awaits that PUBACK: so the most recent event with the id *is* the
/// first attempt, and topic and payload agree. A new publish that merely
/// reuses an old packet id with another topic or payload never matches
/// (the near misses are tested). The one case left is a first attempt lost
/// with a dead connection, whose resend is byte-identical in topic and
/// payload to the device's previous publish under the same packet id within
/// the window: devices that send identical events back to back should give
/// them distinct content (a counter or timestamp).
///
/// The device's events with a packet id form a chain, newest first: `head`
/// (the writer keeps each device's newest in memory) and each row's
/// `mqtt_prev`. The walk stops at the window's edge, at a row no longer in
/// the log (retention, dead letters) or at a row of another device (a seq
/// a failed commit handed out and a later one reused).
pub fn find_redelivered(
    conn: &Connection,
    e: &Event,
    r: &crate::event::Redelivery,
    head: Option<i64>,
) -> Result<Option<(i64, Uuid)>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, tenant, device_id, event_type, mqtt_pkid, mqtt_digest, received_at, mqtt_prev
         FROM events WHERE seq = ?1",
    )?;
    let mut next = head;
    for _ in 0..REDELIVERY_EVENTS {
        let Some(seq) = next else { break };
        let row = stmt
            .query_row([seq], |row| {
                let id: [u8; 16] = row.get(0)?;
                let (tenant, device, event_type): (String, String, String) = (row.get(1)?, row.get(2)?, row.get(3)?);
                let (pkid, digest): (Option<i64>, Option<i64>) = (row.get(4)?, row.get(5)?);
                let (received, prev): (i64, Option<i64>) = (row.get(6)?, row.get(7)?);
                Ok((Uuid::from_bytes(id), tenant, device, event_type, pkid, digest, received, prev))
            })
            .optional()?;
        let Some((id, tenant, device, event_type, pkid, digest, received, prev)) = row else { break };
        if tenant != e.tenant || device != e.device_id || received < e.received_at_us - REDELIVERY_WINDOW_US {
            break;
        }
        if pkid == Some(i64::from(r.pkid)) {
            let same = event_type == e.event_type && digest == Some(r.digest);
            return Ok(same.then_some((seq, id)));
        }
        next = prev;
    }
    Ok(None)
}

/// `(tenant, device_id, seq)` of a device's event.
pub type DeviceSeq = (String, String, i64);

/// Each device's newest event with a packet id, as last stored, and the seq
/// up to which that is complete.
pub fn mqtt_heads(conn: &Connection) -> Result<(Vec<DeviceSeq>, i64), Error> {
    let heads = conn
        .prepare("SELECT tenant, device_id, seq FROM mqtt_heads")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let upto =
        conn.query_row("SELECT coalesce((SELECT value FROM meta WHERE key = 'mqtt_heads_upto'), 0)", [], |r| r.get(0))?;
    Ok((heads, upto))
}

/// Each device's newest event with a packet id above `upto`. After a
/// crash, the heads stored last miss these.
pub fn mqtt_heads_after(conn: &Connection, upto: i64) -> Result<Vec<DeviceSeq>, Error> {
    Ok(conn
        .prepare(
            "SELECT tenant, device_id, max(seq) FROM events
             WHERE seq > ?1 AND mqtt_pkid IS NOT NULL GROUP BY tenant, device_id",
        )?
        .query_map([upto], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Stores device heads and marks them complete up to the log's last seq.
pub fn store_mqtt_heads<'a>(
    conn: &Connection,
    heads: impl Iterator<Item = (&'a str, &'a str, i64)>,
) -> Result<(), Error> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO mqtt_heads (tenant, device_id, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, device_id) DO UPDATE SET seq = excluded.seq",
    )?;
    for (tenant, device, seq) in heads {
        stmt.execute(params![tenant, device, seq])?;
    }
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('mqtt_heads_upto', coalesce((SELECT max(seq) FROM events), 0))
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([])?;
    Ok(())
}

/// Marks a device online or offline and refreshes its last-seen time.
pub fn set_presence(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    online: bool,
    now_us: i64,
) -> Result<usize, Error> {
    let mut stmt = conn.prepare_cached(
        "UPDATE devices SET online = ?3, last_seen = max(coalesce(last_seen, 0), ?4) WHERE tenant = ?1 AND device_id = ?2",
    )?;
    Ok(stmt.execute(params![tenant, device_id, online, now_us])?)
}

/// Who owns an event id already in the log: `(seq, tenant, device_id)`.
pub fn owner_of(conn: &Connection, id: &Uuid) -> Result<Option<(i64, String, String)>, Error> {
    let mut stmt = conn.prepare_cached("SELECT seq, tenant, device_id FROM events WHERE id = ?1")?;
    Ok(stmt.query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()?)
}

/// Bytes the database's pages hold, free pages excluded. The writer asks
/// before every commit, so its statements are cached (the table-valued
/// `pragma_page_count()` form costs more than these three).
pub fn used_bytes(conn: &Connection) -> Result<u64, Error> {
    let pragma = |sql: &str| -> Result<i64, Error> { Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?) };
    let (pages, free, size) =
        (pragma("PRAGMA page_count")?, pragma("PRAGMA freelist_count")?, pragma("PRAGMA page_size")?);
    Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
}

/// Adds `count` events and a last-seen time to a device's counters.
pub fn bump_device(conn: &Connection, tenant: &str, device_id: &str, count: i64, seen_us: i64) -> Result<(), Error> {
    let mut stmt = conn.prepare_cached(
        "UPDATE devices SET event_count = event_count + ?3, last_seen = max(coalesce(last_seen, 0), ?4)
         WHERE tenant = ?1 AND device_id = ?2",
    )?;
    stmt.execute(params![tenant, device_id, count, seen_us])?;
    Ok(())
}

/// Marks the given rows forwarded at `now_us`; returns how many changed and
/// their bytes.
///
/// The common case writes one row: when the given rows above the watermark
/// are exactly the pending rows up to the highest of them (a batch read in
/// seq order and committed whole), the watermark moves there. Otherwise
/// (part of a batch, rows made pending again) the rows are marked one by
/// one, as v1 did. Rows pending again below the watermark leave
/// `pending_again`.
pub fn mark_forwarded(conn: &Connection, seqs: &[i64], now_us: i64) -> Result<(usize, i64), Error> {
    let watermark = watermark(conn)?;
    let (mut n, mut bytes) = (0, 0i64);
    let mut below = conn.prepare_cached(&format!(
        "SELECT {} FROM events WHERE seq = ?1 AND forwarded_at IS NULL AND seq IN (SELECT seq FROM pending_again)",
        row_bytes_sql()
    ))?;
    let mut leave = conn.prepare_cached("DELETE FROM pending_again WHERE seq = ?1")?;
    for &seq in seqs.iter().filter(|&&s| s <= watermark) {
        if let Some(b) = below.query_row([seq], |r| r.get::<_, i64>(0)).optional()? {
            leave.execute([seq])?;
            n += 1;
            bytes += b;
        }
    }
    let mut above: Vec<i64> = seqs.iter().copied().filter(|&s| s > watermark).collect();
    above.sort_unstable();
    above.dedup();
    let Some(&top) = above.last() else { return Ok((n, bytes)) };
    // The pending rows in (watermark, top]: one more than given at most, to tell.
    let pending: Vec<(i64, i64)> = conn
        .prepare_cached(&format!(
            "SELECT seq, {} FROM events WHERE seq > ?1 AND seq <= ?2 AND forwarded_at IS NULL ORDER BY seq LIMIT ?3",
            row_bytes_sql()
        ))?
        .query_map(params![watermark, top, above.len() as i64 + 1], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if pending.iter().map(|(s, _)| *s).eq(above.iter().copied()) {
        conn.prepare_cached("INSERT INTO forward_marks (upto, at) VALUES (?1, ?2)")?.execute(params![top, now_us])?;
        n += pending.len();
        bytes += pending.iter().map(|(_, b)| b).sum::<i64>();
        return Ok((n, bytes));
    }
    let mut one = conn.prepare_cached(&format!(
        "UPDATE events SET forwarded_at = ?2 WHERE seq = ?1 AND forwarded_at IS NULL RETURNING {}",
        row_bytes_sql()
    ))?;
    for seq in above {
        if let Some(b) = one.query_row(params![seq, now_us], |r| r.get::<_, i64>(0)).optional()? {
            n += 1;
            bytes += b;
        }
    }
    Ok((n, bytes))
}

/// Deletes up to `limit` forwarded rows received before `cutoff_us`, oldest
/// first, and never past the first pending row or the first row received
/// after the cutoff: the rows it walks are all deletable, so a long backlog
/// (uplink down for weeks) is not walked again at every prune.
/// Returns the rows deleted and the bytes of other sites' events among them.
pub fn prune(conn: &Connection, cutoff_us: i64, limit: usize, site_id: &str) -> Result<(usize, i64), Error> {
    let first_pending = first_pending(conn)?;
    // Looked for only below the first pending row: a backlog older than the
    // cutoff (uplink down for longer than the retention) is not walked.
    let pending_bound = first_pending.unwrap_or(i64::MAX);
    let first_young: Option<i64> = conn
        .prepare_cached("SELECT seq FROM events WHERE seq < ?2 AND received_at >= ?1 ORDER BY seq LIMIT 1")?
        .query_row(params![cutoff_us, pending_bound], |r| r.get(0))
        .optional()?;
    let bound = first_young.unwrap_or(pending_bound).min(pending_bound);
    let mut stmt = conn.prepare_cached(&format!(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq < ?1 ORDER BY seq LIMIT ?2)
         RETURNING CASE WHEN origin_site != ?3 THEN {} ELSE 0 END",
        row_bytes_sql()
    ))?;
    let freed: Vec<i64> = stmt
        .query_map(params![bound, i64::try_from(limit).unwrap_or(i64::MAX), site_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    // Marks below every row left are not needed to date any (the newest stays).
    conn.prepare_cached(
        "DELETE FROM forward_marks WHERE upto < (SELECT max(upto) FROM forward_marks)
           AND upto < coalesce((SELECT min(seq) FROM events), 9223372036854775807)",
    )?
    .execute([])?;
    Ok((freed.len(), freed.iter().sum()))
}

/// The forwarding watermark: every row of this site at or below it was
/// committed centrally, except those in `pending_again`. A macro so that
/// [`PENDING`] can be built from the same text.
macro_rules! watermark_sql {
    () => {
        "(SELECT coalesce(max(upto), 0) FROM forward_marks)"
    };
}
const WATERMARK: &str = watermark_sql!();

/// A row still to be forwarded (see migration 7).
const PENDING: &str =
    concat!("forwarded_at IS NULL AND (seq > ", watermark_sql!(), " OR seq IN (SELECT seq FROM pending_again))");

/// When a row was forwarded: its own time, else that of the first mark that
/// moved the watermark past it; NULL while pending.
const FORWARDED_AT: &str = "coalesce(forwarded_at, CASE WHEN events.seq IN (SELECT seq FROM pending_again) THEN NULL
    ELSE (SELECT at FROM forward_marks WHERE upto >= events.seq ORDER BY upto LIMIT 1) END)";

/// The columns [`stored_event`] reads, in its order.
fn event_columns() -> String {
    format!("seq, id, tenant, device_id, event_type, payload, ts, received_at, {FORWARDED_AT}, origin_site, properties")
}

/// The bytes a row counts for in the budget and the gauges, as SQL.
fn row_bytes_sql() -> String {
    format!("length(tenant) + length(device_id) + length(event_type) + length(payload) + {ROW_OVERHEAD}")
}

/// The oldest row still to be forwarded: the first above the watermark (a
/// range of the pending index) or the first pending again, whichever is
/// older.
fn first_pending(conn: &Connection) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT min(s) FROM (
                SELECT (SELECT seq FROM events WHERE seq > {WATERMARK} AND forwarded_at IS NULL ORDER BY seq LIMIT 1) AS s
                UNION ALL SELECT (SELECT min(seq) FROM pending_again))"
        ))?
        .query_row([], |r| r.get(0))?)
}

/// Lists `seq` in `pending_again` when it is at or below the watermark
/// (above it, a row with `forwarded_at` NULL is pending anyway).
fn pend_again(conn: &Connection, seq: i64) -> Result<(), Error> {
    conn.prepare_cached(&format!("INSERT OR IGNORE INTO pending_again (seq) SELECT ?1 WHERE ?1 <= {WATERMARK}"))?
        .execute([seq])?;
    Ok(())
}

/// The forwarding watermark (see [`WATERMARK`]).
pub fn watermark(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row(&format!("SELECT {WATERMARK}"), [], |r| r.get(0))?)
}

/// Whether any row is still to be forwarded.
pub fn has_pending(conn: &Connection) -> Result<bool, Error> {
    Ok(conn.query_row(&format!("SELECT EXISTS (SELECT 1 FROM events WHERE {PENDING})"), [], |r| r.get(0))?)
}

fn stored_event(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let id: [u8; 16] = r.get(1)?;
    let payload: String = r.get(5)?;
    let payload = RawValue::from_string(payload)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e)))?;
    Ok(StoredEvent {
        seq: r.get(0)?,
        id: Uuid::from_bytes(id),
        tenant: r.get(2)?,
        device_id: r.get(3)?,
        event_type: r.get(4)?,
        payload,
        timestamp: from_us(r.get(6)?),
        received_at: from_us(r.get(7)?),
        forwarded_at: r.get::<_, Option<i64>>(8)?.map(from_us),
        origin_site: r.get(9)?,
        properties: r
            .get::<_, Option<String>>(10)?
            .map(RawValue::from_string)
            .transpose()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, Box::new(e)))?,
    })
}

/// Oldest pending rows, in `seq` order.
#[cfg(any(test, feature = "test-util"))]
pub fn pending(conn: &Connection, limit: usize) -> Result<Vec<StoredEvent>, Error> {
    pending_batch(conn, 0, limit, usize::MAX)
}

/// Oldest pending rows after `after` in `seq` order, at most `max_rows` and
/// about `max_bytes` (always at least one row when any is pending): those
/// above the watermark (a range of the pending index) merged with those
/// pending again below it.
pub fn pending_batch(
    conn: &Connection,
    after: i64,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<StoredEvent>, Error> {
    let cols = event_columns();
    let limit = i64::try_from(max_rows).unwrap_or(i64::MAX);
    let mut above = conn.prepare_cached(&format!(
        "SELECT {cols} FROM events WHERE seq > max(?1, {WATERMARK}) AND forwarded_at IS NULL ORDER BY seq LIMIT ?2"
    ))?;
    let mut rows: Vec<StoredEvent> = above.query_map(params![after, limit], stored_event)?.collect::<Result<_, _>>()?;
    let mut again = conn.prepare_cached(&format!(
        "SELECT {cols} FROM events WHERE seq IN (SELECT seq FROM pending_again WHERE seq > ?1 ORDER BY seq LIMIT ?2)
           AND forwarded_at IS NULL ORDER BY seq"
    ))?;
    let again: Vec<StoredEvent> = again.query_map(params![after, limit], stored_event)?.collect::<Result<_, _>>()?;
    if !again.is_empty() {
        rows.extend(again);
        rows.sort_by_key(|e| e.seq);
        rows.truncate(max_rows);
    }
    let mut bytes = 0usize;
    let mut keep = rows.len();
    for (i, e) in rows.iter().enumerate() {
        bytes += row_bytes(&e.tenant, &e.device_id, &e.event_type, e.payload.get());
        if bytes >= max_bytes {
            keep = i + 1;
            break;
        }
    }
    rows.truncate(keep);
    Ok(rows)
}

/// Moves one pending row to `dead_letter` with the central error text.
pub fn dead_letter(conn: &Connection, seq: i64, error: &str, now_us: i64) -> Result<(usize, i64), Error> {
    let bytes: i64 = conn
        .query_row(&format!("SELECT {} FROM events WHERE seq = ?1 AND {PENDING}", row_bytes_sql()), [seq], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let n = conn.execute(
        &format!(
            "INSERT INTO dead_letter (seq, id, tenant, device_id, event_type, payload, ts, received_at, origin_site, error, failed_at, properties)
             SELECT seq, id, tenant, device_id, event_type, payload, ts, received_at, origin_site, ?2, ?3, properties
             FROM events WHERE seq = ?1 AND {PENDING}"
        ),
        params![seq, error, now_us],
    )?;
    if n > 0 {
        conn.execute("DELETE FROM events WHERE seq = ?1", [seq])?;
        conn.execute("DELETE FROM pending_again WHERE seq = ?1", [seq])?;
    }
    Ok((n, bytes))
}

/// A dead-lettered event and why the central database refused it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub seq: i64,
    pub id: Uuid,
    pub tenant: String,
    pub device_id: String,
    pub event_type: String,
    pub payload: String,
    pub error: String,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: time::OffsetDateTime,
}

/// Dead letters, oldest first.
pub fn dead_letters(conn: &Connection, tenant: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, tenant, device_id, event_type, payload, error, failed_at FROM dead_letter
         WHERE ?1 IS NULL OR tenant = ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![tenant, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
        let id: [u8; 16] = r.get(1)?;
        Ok(DeadLetter {
            seq: r.get(0)?,
            id: Uuid::from_bytes(id),
            tenant: r.get(2)?,
            device_id: r.get(3)?,
            event_type: r.get(4)?,
            payload: r.get(5)?,
            error: r.get(6)?,
            failed_at: from_us(r.get(7)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Puts dead letters back in the queue (same seq), all or the given ones.
/// One at or below the watermark is listed in `pending_again`.
pub fn retry_dead_letters(conn: &Connection, seqs: Option<&[i64]>) -> Result<usize, Error> {
    bump_log_version(conn)?;
    let all: Vec<i64> = conn
        .prepare("SELECT seq FROM dead_letter ORDER BY seq")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let chosen: Vec<i64> = match seqs {
        None => all,
        Some(seqs) => all.into_iter().filter(|s| seqs.contains(s)).collect(),
    };
    let mut back = conn.prepare_cached(
        "INSERT INTO events (seq, id, tenant, device_id, event_type, payload, ts, received_at, forwarded_at, origin_site, properties)
         SELECT seq, id, tenant, device_id, event_type, payload, ts, received_at, NULL, origin_site, properties
         FROM dead_letter WHERE seq = ?1",
    )?;
    let mut gone = conn.prepare_cached("DELETE FROM dead_letter WHERE seq = ?1")?;
    let mut n = 0;
    for seq in chosen {
        n += back.execute([seq])?;
        pend_again(conn, seq)?;
        gone.execute([seq])?;
    }
    Ok(n)
}

/// Deletes dead letters, all or the given ones.
pub fn purge_dead_letters(conn: &Connection, seqs: Option<&[i64]>) -> Result<usize, Error> {
    bump_log_version(conn)?;
    match seqs {
        None => Ok(conn.execute("DELETE FROM dead_letter", [])?),
        Some(seqs) => {
            let mut n = 0;
            for seq in seqs {
                n += conn.execute("DELETE FROM dead_letter WHERE seq = ?1", [seq])?;
            }
            Ok(n)
        }
    }
}

/// Marks up to `chunk` forwarded rows of this site received in `[since, until)`
/// with a seq after `after` pending again. Remote events (other origins) are
/// never sent back up. Returns how many, and the last seq looked at: the
/// next chunk starts after it, so a row the forwarder already sent again
/// is not replayed twice.
pub fn replay_chunk(
    conn: &Connection,
    site: &str,
    since_us: i64,
    until_us: i64,
    tenant: Option<&str>,
    after: i64,
    chunk: usize,
) -> Result<(usize, Option<i64>), Error> {
    bump_log_version(conn)?;
    let seqs: Vec<(i64, bool)> = conn
        .prepare_cached(&format!(
            "SELECT seq, {PENDING} FROM events
             WHERE seq > ?6 AND origin_site = ?1 AND received_at >= ?2 AND received_at < ?3 AND (?4 IS NULL OR tenant = ?4)
             ORDER BY seq LIMIT ?5"
        ))?
        .query_map(
            params![site, since_us, until_us, tenant, i64::try_from(chunk).unwrap_or(i64::MAX), after],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    let last = seqs.last().map(|(s, _)| *s);
    let seqs: Vec<i64> = seqs.into_iter().filter(|(_, pending)| !pending).map(|(s, _)| s).collect();
    let mut clear = conn.prepare_cached("UPDATE events SET forwarded_at = NULL WHERE seq = ?1")?;
    for &seq in &seqs {
        clear.execute([seq])?;
        pend_again(conn, seq)?;
    }
    Ok((seqs.len(), last))
}

/// Advances the catch-up cursor of (tenant, site) to at least `seq`.
pub fn advance_remote_cursor(conn: &Connection, tenant: &str, site: &str, seq: i64) -> Result<(), Error> {
    conn.execute(
        "INSERT INTO remote_cursor (tenant, site_id, last_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, site_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        params![tenant, site, seq],
    )?;
    Ok(())
}

/// Catch-up cursors of a tenant: site → last copied site_seq.
pub fn remote_cursors(conn: &Connection, tenant: &str) -> Result<std::collections::HashMap<String, i64>, Error> {
    let mut stmt = conn.prepare_cached("SELECT site_id, last_seq FROM remote_cursor WHERE tenant = ?1")?;
    let rows = stmt.query_map([tenant], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Devices online now, with last seen.
pub fn online_devices(conn: &Connection, tenant: &str) -> Result<Vec<Device>, Error> {
    Ok(devices(conn, Some(tenant))?.into_iter().filter(|d| d.online).collect())
}

/// The tenants this site knows: those of registered devices plus
/// `configured` (`central.tenants`), sorted, each once.
pub fn known_tenants(conn: &Connection, configured: &[String]) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT tenant FROM devices")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    let mut all: Vec<String> = rows.collect::<Result<_, _>>()?;
    all.extend(configured.iter().cloned());
    all.sort();
    all.dedup();
    Ok(all)
}

/// Filters of an event query. Times are µs since the epoch, on the device timestamp.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub tenant: String,
    pub device_id: Option<String>,
    pub event_type: Option<String>,
    pub start_us: Option<i64>,
    pub end_us: Option<i64>,
    pub after: i64,
    pub limit: usize,
}

/// Events of a tenant after a cursor, in `seq` order.
pub fn query(conn: &Connection, q: &Query) -> Result<Vec<StoredEvent>, Error> {
    let cols = event_columns();
    let sql = format!(
        "SELECT {cols} FROM events
         WHERE tenant = ?1 AND seq > ?2
           AND (?3 IS NULL OR device_id = ?3)
           AND (?4 IS NULL OR event_type = ?4)
           AND (?5 IS NULL OR ts >= ?5)
           AND (?6 IS NULL OR ts < ?6)
         ORDER BY seq LIMIT ?7"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            q.tenant,
            q.after,
            q.device_id,
            q.event_type,
            q.start_us,
            q.end_us,
            i64::try_from(q.limit).unwrap_or(i64::MAX)
        ],
        stored_event,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every row of the log, in `seq` order (tests).
#[cfg(any(test, feature = "test-util"))]
pub fn all_events(conn: &Connection) -> Result<Vec<StoredEvent>, Error> {
    let cols = event_columns();
    let mut stmt = conn.prepare(&format!("SELECT {cols} FROM events ORDER BY seq"))?;
    let rows = stmt.query_map([], stored_event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A device registry row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub tenant: String,
    pub device_id: String,
    pub name: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<time::OffsetDateTime>,
    pub online: bool,
    pub event_count: i64,
}

fn device(r: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        tenant: r.get(0)?,
        device_id: r.get(1)?,
        name: r.get(2)?,
        created_at: from_us(r.get(3)?),
        revoked_at: r.get::<_, Option<i64>>(4)?.map(from_us),
        last_seen: r.get::<_, Option<i64>>(5)?.map(from_us),
        online: r.get(6)?,
        event_count: r.get(7)?,
    })
}

/// Devices of one tenant, or of all tenants.
pub fn devices(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Device>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, device_id, name, created_at, revoked_at, last_seen, online, event_count
         FROM devices WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, device_id",
    )?;
    let rows = stmt.query_map([tenant], device)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One device, if registered.
pub fn device_by_id(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Device>, Error> {
    Ok(devices_matching(conn, tenant, device_id)?.into_iter().next())
}

fn devices_matching(conn: &Connection, tenant: &str, device_id: &str) -> Result<Vec<Device>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, device_id, name, created_at, revoked_at, last_seen, online, event_count
         FROM devices WHERE tenant = ?1 AND device_id = ?2",
    )?;
    let rows = stmt.query_map([tenant, device_id], device)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Registers a device. A revoked id stays revoked.
pub fn add_device(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    name: Option<&str>,
    now_us: i64,
) -> Result<Device, Error> {
    if let Some(d) = device_by_id(conn, tenant, device_id)? {
        return Err(if d.revoked_at.is_some() {
            Error::DeviceRevoked { tenant: tenant.into(), device_id: device_id.into() }
        } else {
            Error::DeviceExists { tenant: tenant.into(), device_id: device_id.into() }
        });
    }
    conn.execute(
        "INSERT INTO devices (tenant, device_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![tenant, device_id, name, now_us],
    )?;
    bump_registry_version(conn)?;
    device_by_id(conn, tenant, device_id)?
        .ok_or_else(|| Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() })
}

/// Revokes a device: every token it holds stops working.
pub fn revoke_device(conn: &Connection, tenant: &str, device_id: &str, now_us: i64) -> Result<Device, Error> {
    let n = conn.execute(
        "UPDATE devices SET revoked_at = coalesce(revoked_at, ?3), online = 0 WHERE tenant = ?1 AND device_id = ?2",
        params![tenant, device_id, now_us],
    )?;
    if n == 0 {
        return Err(Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() });
    }
    bump_registry_version(conn)?;
    device_by_id(conn, tenant, device_id)?
        .ok_or_else(|| Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() })
}

fn bump_registry_version(conn: &Connection) -> Result<(), Error> {
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'registry_version'", [])?;
    Ok(())
}

/// Changes with every device change, from any process.
pub fn registry_version(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = 'registry_version'", [], |r| r.get(0))?)
}

/// The newest seq (0 for an empty log): one probe of the primary key, where a
/// stream starts when it asks for no cursor.
pub fn last_seq(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?)
}

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
    // The last seq ever given (AUTOINCREMENT keeps it even when retention
    // pruned every row).
    let last_seq: i64 =
        conn.query_row("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)", [], |r| {
            r.get(0)
        })?;
    let dead_letters: i64 = conn.query_row("SELECT count(*) FROM dead_letter", [], |r| r.get(0))?;
    Ok(Scan { backlog_rows, remote_bytes, backlog_bytes, total_rows, dead_letters, last_seq })
}

/// Changes whenever a process other than the writer changed the events
/// (replay, dead-letter retry or purge), so the writer counts again.
pub fn log_version(conn: &Connection) -> Result<i64, Error> {
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

/// Deletes the oldest events of other sites (already central) until at
/// least `need` bytes are freed or none are left: `(rows, bytes)`.
pub fn evict_remote(conn: &Connection, site_id: &str, need: i64) -> Result<(usize, i64), Error> {
    let mut stmt = conn.prepare_cached(&format!(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE origin_site != ?1 ORDER BY seq LIMIT 256)
         RETURNING {}",
        row_bytes_sql()
    ))?;
    let (mut rows, mut bytes) = (0, 0i64);
    while bytes < need {
        let freed: Vec<i64> = stmt.query_map([site_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        if freed.is_empty() {
            break;
        }
        rows += freed.len();
        bytes += freed.iter().sum::<i64>();
    }
    Ok((rows, bytes))
}

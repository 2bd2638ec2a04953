//! Forwarding state of the events: the watermark (every row of this site
//! at or below it was committed centrally, except those pending again),
//! the batches the forwarder reads, dead letters, replay, and retention.
//!
//! Guarantees: a row is pending until `mark_forwarded` or `dead_letter`
//! took it, whatever order batches are marked in; a dead letter retried,
//! or a replayed row, is pending again with its own seq; retention deletes
//! only rows that are not pending, oldest first.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use uuid::Uuid;

use super::super::Error;
use super::events::{event_columns, stored_event};
use super::{PENDING, WATERMARK, bump_log_version, row_bytes_sql};
use crate::event::{StoredEvent, from_us, row_bytes};

/// The oldest row still to be forwarded: the first above the watermark (a
/// range of the pending index) or the first pending again, whichever is
/// older.
pub(super) fn first_pending(conn: &Connection) -> Result<Option<i64>, Error> {
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

/// The forwarding watermark (see `WATERMARK` in the schema module).
pub fn watermark(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row(&format!("SELECT {WATERMARK}"), [], |r| r.get(0))?)
}

/// Whether any row is still to be forwarded.
pub fn has_pending(conn: &Connection) -> Result<bool, Error> {
    Ok(conn.query_row(&format!("SELECT EXISTS (SELECT 1 FROM events WHERE {PENDING})"), [], |r| r.get(0))?)
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

/// Marks the given rows forwarded at `now_us`; returns how many changed and
/// their bytes.
///
/// The common case writes one row: when the given rows above the watermark
/// are exactly the pending rows up to the highest of them (a batch read in
/// seq order and committed whole), the watermark moves there. Otherwise
/// (part of a batch, rows made pending again) the rows are marked one by
/// one, as v1 did. Rows pending again below the watermark leave
/// `pending_again`.
pub(crate) fn mark_forwarded(conn: &Connection, seqs: &[i64], now_us: i64) -> Result<(usize, i64), Error> {
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
        add_mark(conn, forwarded_run_end(conn, top)?, now_us)?;
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

/// Where a watermark at `from` can move without passing a pending row of
/// this site: just below the first one above `from`, or the newest row when
/// there is none. Only forwarded rows lie between (other sites' events,
/// rows marked one by one), so the walk is as long as the run of them that
/// follows `from`.
fn forwarded_run_end(conn: &Connection, from: i64) -> Result<i64, Error> {
    let next: Option<i64> = conn
        .prepare_cached("SELECT seq FROM events WHERE seq > ?1 AND forwarded_at IS NULL ORDER BY seq LIMIT 1")?
        .query_row([from], |r| r.get(0))
        .optional()?;
    Ok(match next {
        Some(seq) => seq - 1,
        None => conn.prepare_cached("SELECT coalesce(max(seq), ?1) FROM events")?.query_row([from], |r| r.get(0))?,
    })
}

/// Moves the watermark past the forwarded rows that follow it (other
/// sites' events just stored): so the rows just above the watermark are
/// always this site's pending ones, and readers of pending rows (the
/// forwarder, the status's oldest pending row) never walk over other
/// sites' events, with no index listing the pending rows (migration 10).
/// Writes a mark only when the watermark moves.
pub(crate) fn skip_forwarded(conn: &Connection, now_us: i64) -> Result<(), Error> {
    let from = watermark(conn)?;
    let upto = forwarded_run_end(conn, from)?;
    if upto > from {
        add_mark(conn, upto, now_us)?;
    }
    Ok(())
}

/// Moves the watermark to `upto` at `now_us`.
fn add_mark(conn: &Connection, upto: i64, now_us: i64) -> Result<(), Error> {
    conn.prepare_cached("INSERT INTO forward_marks (upto, at) VALUES (?1, ?2)")?.execute(params![upto, now_us])?;
    Ok(())
}

/// Moves one pending row to `dead_letter` with the central error text.
pub(crate) fn dead_letter(conn: &Connection, seq: i64, error: &str, now_us: i64) -> Result<(usize, i64), Error> {
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
    super::events::keep_seq_floor(conn)?;
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

/// This site's forwarded rows that central may have lost in a failover:
/// those above the watermark as it was `window_us` before its newest move
/// (the commits an asynchronous standby may not have had when it was
/// promoted), as (seq, tenant) in seq order. A range of seqs from that
/// mark: no scan of the whole log. Rows sent again below it (`outpost
/// replay`, a dead letter retried) are not looked at.
pub fn at_risk(conn: &Connection, site: &str, window_us: i64) -> Result<Vec<(i64, String)>, Error> {
    let newest: Option<i64> = conn.query_row("SELECT max(at) FROM forward_marks", [], |r| r.get(0))?;
    let Some(newest) = newest else { return Ok(Vec::new()) };
    let floor: i64 = conn.query_row(
        "SELECT coalesce(max(upto), 0) FROM forward_marks WHERE at < ?1",
        [newest.saturating_sub(window_us)],
        |r| r.get(0),
    )?;
    let rows = conn
        .prepare_cached(&format!(
            "SELECT seq, tenant FROM events WHERE seq > ?2 AND origin_site = ?1 AND NOT ({PENDING}) ORDER BY seq"
        ))?
        .query_map(params![site, floor], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Makes the given forwarded rows pending again (central lacks them);
/// returns how many changed and their bytes. Pending rows are left alone.
pub(crate) fn resend(conn: &Connection, seqs: &[i64]) -> Result<(usize, i64), Error> {
    let mut forwarded =
        conn.prepare_cached(&format!("SELECT {} FROM events WHERE seq = ?1 AND NOT ({PENDING})", row_bytes_sql()))?;
    let mut clear = conn.prepare_cached("UPDATE events SET forwarded_at = NULL WHERE seq = ?1")?;
    let (mut n, mut bytes) = (0, 0);
    for &seq in seqs {
        let Some(b) = forwarded.query_row([seq], |r| r.get::<_, i64>(0)).optional()? else { continue };
        clear.execute([seq])?;
        pend_again(conn, seq)?;
        n += 1;
        bytes += b;
    }
    Ok((n, bytes))
}

/// Deletes up to `limit` forwarded rows received before `cutoff_us`, oldest
/// first, and never past the first pending row or the first row received
/// after the cutoff: the rows it walks are all deletable, so a long backlog
/// (uplink down for weeks) is not walked again at every prune.
/// Returns the rows deleted and the bytes of other sites' events among them.
pub(crate) fn prune(conn: &Connection, cutoff_us: i64, limit: usize, site_id: &str) -> Result<(usize, i64), Error> {
    let first_pending = first_pending(conn)?;
    // Looked for only below the first pending row: a backlog older than the
    // cutoff (uplink down for longer than the retention) is not walked.
    let pending_bound = first_pending.unwrap_or(i64::MAX);
    let first_young: Option<i64> = conn
        .prepare_cached("SELECT seq FROM events WHERE seq < ?2 AND received_at >= ?1 ORDER BY seq LIMIT 1")?
        .query_row(params![cutoff_us, pending_bound], |r| r.get(0))
        .optional()?;
    let bound = first_young.unwrap_or(pending_bound).min(pending_bound);
    super::events::keep_seq_floor(conn)?;
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

#[cfg(test)]
mod tests {
    use super::super::testing::{event, insert, log, seqs};
    use super::super::{dead_letters, scan, seq_high};
    use super::*;

    fn pending_seqs(c: &Connection) -> Vec<i64> {
        pending(c, 100).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn at_risk_is_what_was_forwarded_within_the_window_and_resend_pends_it_again() {
        let c = log();
        let mine: Vec<i64> = (0..5).map(|_| insert(&c, &event("d1", "site-a"))).collect();
        let theirs = insert(&c, &event("d2", "site-b"));
        let _ = theirs;
        let now = crate::event::now_us();
        mark_forwarded(&c, &mine[..3], now).unwrap();
        mark_forwarded(&c, &mine[3..], now + 100_000_000).unwrap();
        assert!(at_risk(&c, "site-b", 1_000_000).unwrap().is_empty(), "another site's rows are not ours to check");
        let risk: Vec<i64> = at_risk(&c, "site-a", 1_000_000).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(risk, mine[3..].to_vec(), "only what was forwarded within the window before the newest");
        let all: Vec<i64> = at_risk(&c, "site-a", 200_000_000).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(all, mine);
        // Sent again: pending, in the next batch, and no longer at risk.
        assert_eq!(resend(&c, &[mine[3], mine[4], 999]).unwrap().0, 2);
        assert_eq!(resend(&c, &[mine[3]]).unwrap().0, 0, "a pending row is left alone");
        let batch: Vec<i64> = pending_batch(&c, 0, 10, usize::MAX).unwrap().iter().map(|e| e.seq).collect();
        assert!(batch.starts_with(&mine[3..]), "{batch:?}");
        let risk: Vec<i64> = at_risk(&c, "site-a", 200_000_000).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(risk, mine[..3].to_vec());
    }

    #[test]
    fn the_watermark_moves_past_other_sites_rows_and_never_past_a_pending_one() {
        let c = log();
        let mine = insert(&c, &event("d1", "site-a"));
        // Other sites' rows stored while this site has nothing pending.
        let mut last = seq_high(&c).unwrap();
        mark_forwarded(&c, &[mine], 1).unwrap();
        for _ in 0..3 {
            super::super::insert_event(&c, &event("d2", "site-b"), Some(1), &mut last).unwrap();
        }
        assert_eq!(watermark(&c).unwrap(), mine);
        skip_forwarded(&c, 2).unwrap();
        assert_eq!(watermark(&c).unwrap(), mine + 3, "past the other sites' rows");
        assert_eq!(first_pending(&c).unwrap(), None);
        // Now this site's rows are pending, and more of other sites' follow.
        let a = insert(&c, &event("d1", "site-a"));
        let mut last = seq_high(&c).unwrap();
        let theirs = super::super::insert_event(&c, &event("d2", "site-b"), Some(1), &mut last).unwrap().unwrap();
        let b = insert(&c, &event("d1", "site-a"));
        skip_forwarded(&c, 3).unwrap();
        assert_eq!(watermark(&c).unwrap(), a - 1, "never past a pending row");
        assert_eq!(first_pending(&c).unwrap(), Some(a));
        assert_eq!(pending_seqs(&c), [a, b]);
        // Forwarding `a` moves the watermark past the other site's row too.
        mark_forwarded(&c, &[a], 4).unwrap();
        assert_eq!(watermark(&c).unwrap(), theirs);
        assert_eq!(pending_seqs(&c), [b]);
        mark_forwarded(&c, &[b], 5).unwrap();
        assert_eq!(watermark(&c).unwrap(), b);
        assert!(pending_seqs(&c).is_empty());
        // Every row dated: this site's by the marks, the other site's by its own.
        assert!(super::super::all_events(&c).unwrap().iter().all(|e| e.forwarded_at.is_some()));
    }

    #[test]
    fn marking_rows_forwarded_moves_the_watermark_and_the_backlog() {
        let c = log();
        let e = event("d1", "site-a");
        let bytes = e.size_hint() as i64;
        for _ in 0..4 {
            insert(&c, &event("d1", "site-a"));
        }
        assert_eq!((scan(&c, None).unwrap().backlog_rows, watermark(&c).unwrap()), (4, 0));
        // A whole batch in seq order: the watermark moves.
        assert_eq!(mark_forwarded(&c, &[1, 2], 7).unwrap(), (2, 2 * bytes));
        assert_eq!(watermark(&c).unwrap(), 2);
        assert_eq!(pending_seqs(&c), [3, 4]);
        // Part of one (4 without 3): marked one by one, the watermark stays.
        assert_eq!(mark_forwarded(&c, &[4], 8).unwrap(), (1, bytes));
        assert_eq!(watermark(&c).unwrap(), 2);
        assert_eq!(pending_seqs(&c), [3]);
        let counted = scan(&c, None).unwrap();
        assert_eq!((counted.backlog_rows, counted.backlog_bytes), (1, bytes));
        // Marking again changes nothing.
        assert_eq!(mark_forwarded(&c, &[1, 4], 9).unwrap(), (0, 0));
        assert!(has_pending(&c).unwrap());
        assert_eq!(mark_forwarded(&c, &[3], 9).unwrap(), (1, bytes));
        assert!(!has_pending(&c).unwrap());
    }

    #[test]
    fn a_dead_letter_retried_is_pending_again_with_its_seq() {
        let c = log();
        insert(&c, &event("d1", "site-a"));
        insert(&c, &event("d1", "site-a"));
        let bytes = event("d1", "site-a").size_hint() as i64;
        assert_eq!(dead_letter(&c, 1, "22P02: bad", 5).unwrap(), (1, bytes));
        assert_eq!(seqs(&c), [2]);
        assert_eq!(dead_letters(&c, None, 10).unwrap().iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
        // The rest is forwarded: the watermark passes the dead letter's seq.
        mark_forwarded(&c, &[2], 6).unwrap();
        assert_eq!(watermark(&c).unwrap(), 2);
        assert_eq!(dead_letter(&c, 2, "forwarded already", 7).unwrap(), (0, 0), "only a pending row");
        assert_eq!(retry_dead_letters(&c, None).unwrap(), 1);
        assert_eq!(pending_seqs(&c), [1], "pending again below the watermark");
        assert!(dead_letters(&c, None, 10).unwrap().is_empty());
        let counted = scan(&c, None).unwrap();
        assert_eq!((counted.backlog_rows, counted.dead_letters), (1, 0));
    }

    #[test]
    fn prune_never_deletes_a_pending_row() {
        let c = log();
        for _ in 0..3 {
            insert(&c, &event("d1", "site-a"));
        }
        mark_forwarded(&c, &[1], 2).unwrap();
        mark_forwarded(&c, &[3], 2).unwrap();
        // Every row is old enough; 2 is pending.
        assert_eq!(prune(&c, i64::MAX, 100, "site-a").unwrap(), (1, 0));
        assert_eq!(seqs(&c), [2, 3]);
        mark_forwarded(&c, &[2], 3).unwrap();
        // Not past the cutoff: nothing.
        assert_eq!(prune(&c, 0, 100, "site-a").unwrap(), (0, 0));
        assert_eq!(prune(&c, i64::MAX, 1, "site-a").unwrap(), (1, 0), "at most the limit");
        assert_eq!(prune(&c, i64::MAX, 100, "site-a").unwrap(), (1, 0));
        assert!(seqs(&c).is_empty());
    }
}

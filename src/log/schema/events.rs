//! The `events` table: inserting an event, who owns an id, and reading
//! events back (queries, test dumps) in `seq` order.
//!
//! Guarantees: an insert with an id already in the log writes nothing and
//! says so (`None`); every read returns rows in `seq` order, with
//! `forwarded_at` as the watermark dates it (see `forward`).

use rusqlite::{Connection, OptionalExtension, Row, ToSql, params};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::super::Error;
use super::FORWARDED_AT;
use crate::event::{Event, StoredEvent, from_us};

/// The `INSERT` of one event into `events`: the columns every event has
/// (the last, `?11`, its seq), then `$cols` (`", a, b"`) bound to `$values`
/// (`", ?12, ?13"`). A macro so
/// that the plain insert here and the one with the MQTT module's columns
/// share one column list and stay `&'static str` (cached statements,
/// nothing built per call). A repeated id inserts nothing.
macro_rules! insert_event_sql {
    ($cols:literal, $values:literal) => {
        concat!(
            "INSERT INTO events (id, tenant, device_id, event_type, payload, ts, received_at, forwarded_at, origin_site,
                                 properties, seq",
            $cols,
            ")
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11",
            $values,
            ")
         ON CONFLICT (id) DO NOTHING"
        )
    };
}
pub(crate) use insert_event_sql;

/// Inserts one event as seq `*last + 1` and moves `*last` there; `None`
/// (and `*last` unchanged) when its id is already in the log. The caller
/// (the writer) gives seqs: `last` starts at [`seq_high`]. (No `RETURNING
/// seq`: SQLite buffers RETURNING rows in an ephemeral table it opens and
/// closes per statement, which cost the writer thread about a fifth of its
/// time in HTTP batches.) `forwarded_at`: set for other sites' events,
/// which are central already.
pub fn insert_event(
    conn: &Connection,
    e: &Event,
    forwarded_at: Option<i64>,
    last: &mut i64,
) -> Result<Option<i64>, Error> {
    Inserter::new(conn)?.insert(e, forwarded_at, last)
}

/// [`insert_event`]'s statement, taken from the statement cache once for a
/// run of events (a request's batch) instead of once per event: a cache
/// lookup hashes and compares the whole SQL text and copies it back in,
/// which cost the writer more than binding the event (perf, issue #29).
pub(crate) struct Inserter<'c>(rusqlite::CachedStatement<'c>);

impl<'c> Inserter<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Result<Self, Error> {
        Ok(Self(conn.prepare_cached(insert_event_sql!("", ""))?))
    }

    /// See [`insert_event`].
    pub(crate) fn insert(
        &mut self,
        e: &Event,
        forwarded_at: Option<i64>,
        last: &mut i64,
    ) -> Result<Option<i64>, Error> {
        run_insert(&mut self.0, e, forwarded_at, &[], last)
    }
}

/// Runs a statement of [`insert_event_sql!`] for `e` as seq `*last + 1`:
/// the columns every event has, then `extra` in the order of the macro's
/// `$values`. Moves `*last` to the seq when the row was inserted; `None`
/// (and `*last` unchanged) when its id is already in the log. The one
/// place the event's values are bound, for this module's insert and the
/// MQTT module's.
pub(crate) fn run_insert(
    stmt: &mut rusqlite::Statement<'_>,
    e: &Event,
    forwarded_at: Option<i64>,
    extra: &[&dyn ToSql],
    last: &mut i64,
) -> Result<Option<i64>, Error> {
    let seq = *last + 1;
    let id = e.id.as_bytes();
    let values: [&dyn ToSql; 11] = [
        id,
        &e.tenant,
        &e.device_id,
        &e.event_type,
        &e.payload,
        &e.timestamp_us,
        &e.received_at_us,
        &forwarded_at,
        &e.origin_site,
        &e.properties,
        &seq,
    ];
    let inserted = stmt.execute(rusqlite::params_from_iter(values.iter().chain(extra)))?;
    Ok((inserted == 1).then(|| {
        *last = seq;
        seq
    }))
}

/// The highest seq ever given: the newest row's, a dead letter's, or the
/// floor kept before rows were deleted (and, for a log from before
/// migration 10, `sqlite_sequence`'s). The writer gives the next one up, so
/// no seq comes back even after retention emptied the log.
pub fn seq_high(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),
                    coalesce((SELECT max(seq) FROM dead_letter), 0),
                    coalesce((SELECT value FROM meta WHERE key = 'seq_floor'), 0),
                    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))",
        [],
        |r| r.get(0),
    )?)
}

/// Keeps [`seq_high`] where it is before rows are deleted (the newest row or
/// dead letter may be among them). Called by every delete from `events` or
/// `dead_letter`.
pub(crate) fn keep_seq_floor(conn: &Connection) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('seq_floor', ?1)
         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
    )?
    .execute([seq_high(conn)?])?;
    Ok(())
}

/// Who owns an event id already in the log: `(seq, tenant, device_id)`.
pub(crate) fn owner_of(conn: &Connection, id: &Uuid) -> Result<Option<(i64, String, String)>, Error> {
    let mut stmt = conn.prepare_cached("SELECT seq, tenant, device_id FROM events WHERE id = ?1")?;
    Ok(stmt.query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()?)
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

/// The newest seq (0 for an empty log): one probe of the primary key, where a
/// stream starts when it asks for no cursor.
pub fn last_seq(conn: &Connection) -> Result<i64, Error> {
    Ok(conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?)
}

/// The columns [`stored_event`] reads, in its order.
pub(super) fn event_columns() -> String {
    format!("seq, id, tenant, device_id, event_type, payload, ts, received_at, {FORWARDED_AT}, origin_site, properties")
}

pub(super) fn stored_event(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{event, insert, log, seqs};
    use super::*;

    #[test]
    fn a_repeated_id_inserts_nothing_and_its_owner_is_the_first() {
        let c = log();
        let e = event("d1", "site-a");
        let mut last = 0;
        assert_eq!(insert_event(&c, &e, None, &mut last).unwrap(), Some(1));
        let mut again = event("d2", "site-a");
        again.id = e.id;
        assert_eq!(
            insert_event(&c, &again, None, &mut last).unwrap(),
            None,
            "the same id, from any device, writes nothing"
        );
        assert_eq!(last, 1, "a refused row takes no seq");
        assert_eq!(owner_of(&c, &e.id).unwrap(), Some((1, "acme".into(), "d1".into())));
        assert_eq!(seqs(&c), [1]);
        assert_eq!(insert(&c, &event("d1", "site-a")), 2);
        assert_eq!(last_seq(&c).unwrap(), 2);
    }

    #[test]
    fn no_seq_is_given_again_after_the_newest_rows_are_deleted() {
        use super::super::{dead_letter, evict_remote, mark_forwarded, prune, purge_dead_letters};
        let c = log();
        let mine: Vec<i64> = (0..3).map(|_| insert(&c, &event("d1", "site-a"))).collect();
        mark_forwarded(&c, &mine, 1).unwrap();
        // Retention takes every row (all forwarded, all old).
        assert_eq!(prune(&c, i64::MAX, 100, "site-a").unwrap().0, 3);
        assert!(seqs(&c).is_empty());
        assert_eq!(seq_high(&c).unwrap(), 3);
        assert_eq!(insert(&c, &event("d1", "site-a")), 4, "a pruned seq is never given again");
        // The newest, another site's, evicted.
        assert_eq!(insert(&c, &event("d2", "site-b")), 5);
        assert_eq!(evict_remote(&c, "site-a", 1).unwrap().0, 1);
        assert_eq!(insert(&c, &event("d1", "site-a")), 6, "an evicted seq is never given again");
        // The newest dead-lettered, then purged.
        dead_letter(&c, 6, "refused", 1).unwrap();
        assert_eq!(seq_high(&c).unwrap(), 6, "a dead letter keeps its seq");
        purge_dead_letters(&c, None).unwrap();
        assert_eq!(insert(&c, &event("d1", "site-a")), 7, "a purged dead letter's seq is never given again");
    }

    #[test]
    fn a_remote_event_is_stored_forwarded() {
        let c = log();
        insert_event(&c, &event("d1", "site-b"), Some(5), &mut 0).unwrap();
        insert(&c, &event("d1", "site-a"));
        let rows = all_events(&c).unwrap();
        assert_eq!(rows[0].forwarded_at, Some(from_us(5)));
        assert_eq!(rows[1].forwarded_at, None);
    }
}

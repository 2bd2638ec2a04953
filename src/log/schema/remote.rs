//! Other sites' events: the catch-up cursors of the central stream, the
//! eviction that keeps them within their share of the budget, and the
//! tenants this site knows.
//!
//! Guarantees: a cursor only moves forward; eviction deletes only other
//! sites' events (already central), oldest first, never this site's.

use rusqlite::{Connection, params};

use super::super::Error;
use super::row_bytes_sql;

/// Advances the catch-up cursor of (tenant, site) to at least `seq`.
pub(crate) fn advance_remote_cursor(conn: &Connection, tenant: &str, site: &str, seq: i64) -> Result<(), Error> {
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

/// Deletes the oldest events of other sites (already central) until at
/// least `need` bytes are freed or none are left: `(rows, bytes)`.
pub(crate) fn evict_remote(conn: &Connection, site_id: &str, need: i64) -> Result<(usize, i64), Error> {
    super::events::keep_seq_floor(conn)?;
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

#[cfg(test)]
mod tests {
    use super::super::testing::{event, insert, log, seqs};
    use super::*;

    #[test]
    fn evicting_takes_only_other_sites_events_oldest_first() {
        let c = log();
        insert(&c, &event("d1", "site-a"));
        for i in 0..300 {
            insert(&c, &event("d2", if i % 2 == 0 { "site-b" } else { "site-c" }));
        }
        insert(&c, &event("d1", "site-a"));
        let bytes = event("d2", "site-b").size_hint() as i64;
        // One statement takes at most 256 rows: the oldest ones.
        assert_eq!(evict_remote(&c, "site-a", 1).unwrap(), (256, 256 * bytes));
        assert_eq!(seqs(&c).first(), Some(&1));
        assert_eq!(seqs(&c)[1], 258);
        assert_eq!(evict_remote(&c, "site-a", i64::MAX).unwrap(), (44, 44 * bytes), "all there are, no more");
        assert_eq!(seqs(&c), [1, 302], "this site's events stay");
    }

    #[test]
    fn a_remote_cursor_only_moves_forward() {
        let c = log();
        advance_remote_cursor(&c, "acme", "site-b", 10).unwrap();
        advance_remote_cursor(&c, "acme", "site-b", 4).unwrap();
        advance_remote_cursor(&c, "acme", "site-c", 1).unwrap();
        let cursors = remote_cursors(&c, "acme").unwrap();
        assert_eq!((cursors["site-b"], cursors["site-c"]), (10, 1));
        assert!(remote_cursors(&c, "globex").unwrap().is_empty());
    }
}

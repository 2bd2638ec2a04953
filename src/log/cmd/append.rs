//! Appends: this site's events (HTTP and WebSocket requests, one
//! all-or-nothing unit each) and other sites' events from the central
//! stream. A publish of the MQTT front-end has its own command, beside
//! the rest of what the log keeps for that protocol.
//!
//! Guarantees: an append is refused whole at the byte budget
//! (`Error::Full`), never cut; a repeated id of the same device is
//! answered with the original seq and writes nothing; other sites' events
//! stay within their share of the budget, their oldest making room.

use rusqlite::Connection;

use super::{Ctx, DeviceCounts, Reply, deliver, merge_counts};
use crate::event::{Event, now_us};
use crate::log::{Appended, Committed, Error, RemoteEvent, schema};

/// Appends events in one all-or-nothing unit.
pub(in crate::log) struct Append {
    pub(in crate::log) events: Vec<Event>,
    pub(in crate::log) reply: Reply<Vec<Appended>>,
}

impl Append {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let Append { events, reply } = self;
        let size: u64 = events.iter().map(|e| e.size_hint() as u64).sum();
        if let Some(full) = cx.over_budget(size) {
            cx.g.delivers.push(deliver(reply, Err(full)));
            return Ok(());
        }
        let result = append_request(tx, &events, &mut cx.g.seen, &mut cx.g.last_seq)?;
        if let Ok(r) = &result {
            cx.projected += size;
            for (_, e) in r.iter().zip(&events).filter(|(a, _)| !a.duplicate) {
                cx.g.appended(e.size_hint());
            }
            if cx.observed {
                let new = r.iter().zip(events).filter(|(a, _)| !a.duplicate);
                cx.g.new_events.extend(new.map(|(a, event)| Committed::plain(a.seq, event)));
            }
        }
        cx.g.delivers.push(deliver(reply, result));
        Ok(())
    }
}

/// One append request inside the group's transaction. The outer `Result`
/// fails the group (SQLite error); the inner one is this request's answer.
/// A single event needs no savepoint: its only refusal (an id owned by
/// another device) writes nothing, and any other error (SQLite, possibly
/// after its row was inserted) fails the group, so nothing is half-stored.
/// A batch is all-or-nothing.
fn append_request(
    tx: &Connection,
    events: &[Event],
    seen: &mut DeviceCounts,
    last: &mut i64,
) -> Result<Result<Vec<Appended>, Error>, Error> {
    if events.len() == 1 {
        return match append(tx, events, seen, last) {
            Err(e) if !matches!(e, Error::IdConflict { .. }) => Err(e),
            answer => Ok(answer),
        };
    }
    tx.execute_batch("SAVEPOINT request")?;
    let mut sp_seen = DeviceCounts::new();
    let before = *last;
    let r = append(tx, events, &mut sp_seen, last);
    match &r {
        Ok(_) => {
            tx.execute_batch("RELEASE request")?;
            merge_counts(seen, sp_seen);
        }
        Err(_) => {
            tx.execute_batch("ROLLBACK TO request; RELEASE request")?;
            // Nothing of it was stored: its seqs are free again.
            *last = before;
        }
    }
    Ok(r)
}

/// Appends one request's events, given seqs after `*last`; counts new rows
/// per device into `seen`.
fn append(
    conn: &Connection,
    events: &[Event],
    seen: &mut DeviceCounts,
    last: &mut i64,
) -> Result<Vec<Appended>, Error> {
    let mut out = Vec::with_capacity(events.len());
    let mut per_device = DeviceCounts::new();
    // A batch is mostly one device's: counted in runs, and a run's key is
    // copied into the map once.
    let mut run: Option<(&Event, i64, i64)> = None;
    let mut insert = schema::Inserter::new(conn)?;
    for (index, e) in events.iter().enumerate() {
        match insert.insert(e, None, last)? {
            Some(seq) => {
                out.push(Appended { id: e.id, seq, duplicate: false });
                match &mut run {
                    Some((first, n, at)) if first.tenant == e.tenant && first.device_id == e.device_id => {
                        *n += 1;
                        *at = (*at).max(e.received_at_us);
                    }
                    _ => {
                        count_run(&mut per_device, run.take());
                        run = Some((e, 1, e.received_at_us));
                    }
                }
            }
            None => match schema::owner_of(conn, &e.id)? {
                Some((seq, tenant, device)) if tenant == e.tenant && device == e.device_id => {
                    out.push(Appended { id: e.id, seq, duplicate: true });
                }
                _ => return Err(Error::IdConflict { index, id: e.id }),
            },
        }
    }
    count_run(&mut per_device, run);
    merge_counts(seen, per_device);
    Ok(out)
}

/// Adds a run of one device's new events (its first, count, latest
/// receive time) to the counts.
fn count_run(counts: &mut DeviceCounts, run: Option<(&Event, i64, i64)>) {
    if let Some((e, n, at)) = run {
        let c = counts.entry((e.tenant.clone(), e.device_id.clone())).or_insert((0, 0));
        c.0 += n;
        c.1 = c.1.max(at);
    }
}

/// Stores other sites' events (already central, so never forwarded) and
/// advances their catch-up cursors; duplicates by id are skipped.
/// Answers how many were new.
pub(in crate::log) struct AppendRemote {
    pub(in crate::log) events: Vec<RemoteEvent>,
    pub(in crate::log) reply: Reply<usize>,
}

impl AppendRemote {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let AppendRemote { mut events, reply } = self;
        // Other sites' events stay within their share of the budget (and
        // the budget): the oldest of them make room. A batch larger than
        // the whole share keeps its newest part; the rest counts as
        // evicted (its cursor moves on).
        let mut size: i64 = events.iter().map(|r| r.event.size_hint() as i64).sum();
        let share = cx.config.remote_max_bytes as i64;
        let mut skip = 0;
        while size > share && skip < events.len() {
            size -= events[skip].event.size_hint() as i64;
            skip += 1;
        }
        for r in events.drain(..skip) {
            schema::advance_remote_cursor(tx, &r.event.tenant, &r.event.origin_site, r.site_seq)?;
        }
        cx.g.remote_evicted += skip;
        if !make_room(tx, cx, size)? {
            // This site's own events fill the budget: other sites' events
            // wait in central (no cursor moves).
            tracing::warn!(bytes = size, "site log full of this site's events: remote events not stored");
            cx.g.delivers.push(deliver(reply, Ok(0)));
            return Ok(());
        }
        // An error here fails the whole group: nothing half-stored.
        let before = cx.g.new_events.len();
        let added = append_remote(tx, events, &mut cx.g.new_events, &mut cx.g.last_seq)?;
        if added > 0 {
            schema::skip_forwarded(tx, now_us())?;
        }
        let new = &cx.g.new_events[before..];
        cx.g.d_total_rows += added as i64;
        cx.g.written_rows += added;
        cx.g.d_remote_bytes += new.iter().map(|c| c.event.size_hint() as i64).sum::<i64>();
        cx.projected += new.iter().map(|c| c.event.size_hint() as u64).sum::<u64>();
        cx.g.delivers.push(deliver(reply, Ok(added)));
        Ok(())
    }
}

/// Evicts the oldest of other sites' events until `size` more bytes of
/// them fit their share and the budget; false when they cannot.
fn make_room(tx: &Connection, cx: &mut Ctx<'_>, size: i64) -> Result<bool, Error> {
    let remote = cx.counters.remote_bytes.load(std::sync::atomic::Ordering::Relaxed) + cx.g.d_remote_bytes;
    let over_share = remote + size - cx.config.remote_max_bytes as i64;
    let over_budget = (cx.projected as i64) + size - cx.config.max_bytes as i64;
    let need = over_share.max(over_budget);
    if need <= 0 {
        return Ok(true);
    }
    let (rows, bytes) = schema::evict_remote(tx, &cx.config.site_id, need)?;
    cx.g.d_remote_bytes -= bytes;
    cx.g.d_total_rows -= rows as i64;
    cx.g.remote_evicted += rows;
    cx.projected = cx.projected.saturating_sub(bytes as u64);
    Ok(bytes >= need)
}

/// Stores other sites' events (already forwarded) and advances their
/// catch-up cursors; duplicates by id are skipped. Returns how many were new.
fn append_remote(
    tx: &Connection,
    events: Vec<RemoteEvent>,
    new_events: &mut Vec<Committed>,
    last: &mut i64,
) -> Result<usize, Error> {
    let now = now_us();
    let mut added = 0;
    let mut insert = schema::Inserter::new(tx)?;
    for r in events {
        let seq = insert.insert(&r.event, Some(now), last)?;
        schema::advance_remote_cursor(tx, &r.event.tenant, &r.event.origin_site, r.site_seq)?;
        if let Some(seq) = seq {
            added += 1;
            new_events.push(Committed::plain(seq, r.event));
        }
    }
    Ok(added)
}

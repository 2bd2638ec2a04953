//! The forwarder's and retention's commands: rows committed centrally,
//! rows the central database refused, and forwarded rows past retention.
//!
//! Guarantees: each keeps the backlog and row gauges exact (the bytes
//! come from the rows the statements touched); retention never deletes a
//! pending row.

use rusqlite::Connection;

use super::{Ctx, Reply, deliver};
use crate::event::now_us;
use crate::log::{Error, schema};

/// Marks rows forwarded (after the central commit).
pub(in crate::log) struct MarkForwarded {
    pub(in crate::log) seqs: Vec<i64>,
    pub(in crate::log) reply: Reply<usize>,
}

impl MarkForwarded {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let r = schema::mark_forwarded(tx, &self.seqs, now_us()).map(|(n, bytes)| {
            cx.g.d_backlog_rows -= n as i64;
            cx.g.d_backlog_bytes -= bytes;
            n
        });
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

/// Moves a pending row the central database refused to `dead_letter`.
pub(in crate::log) struct DeadLetter {
    pub(in crate::log) seq: i64,
    pub(in crate::log) error: String,
    pub(in crate::log) reply: Reply<usize>,
}

impl DeadLetter {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let r = schema::dead_letter(tx, self.seq, &self.error, now_us()).map(|(n, bytes)| {
            cx.g.d_backlog_rows -= n as i64;
            cx.g.d_backlog_bytes -= bytes;
            cx.g.d_total_rows -= n as i64;
            cx.g.d_dead_letters += n as i64;
            n
        });
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

/// Makes forwarded rows central lacks (after a failover) pending again.
pub(in crate::log) struct Resend {
    pub(in crate::log) seqs: Vec<i64>,
    pub(in crate::log) reply: Reply<usize>,
}

impl Resend {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let r = schema::resend(tx, &self.seqs).map(|(n, bytes)| {
            cx.g.d_backlog_rows += n as i64;
            cx.g.d_backlog_bytes += bytes;
            n
        });
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

/// Deletes up to `limit` forwarded rows older than `cutoff_us`.
pub(in crate::log) struct Prune {
    pub(in crate::log) cutoff_us: i64,
    pub(in crate::log) limit: usize,
    pub(in crate::log) reply: Reply<usize>,
}

impl Prune {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let r = schema::prune(tx, self.cutoff_us, self.limit, &cx.config.site_id).map(|(n, remote)| {
            cx.g.d_total_rows -= n as i64;
            cx.g.d_remote_bytes -= remote;
            n
        });
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

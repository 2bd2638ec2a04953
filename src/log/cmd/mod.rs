//! The writer's commands: one type per request the writer thread takes,
//! each with its own `apply`, run inside the group's transaction.
//!
//! Guarantees every `apply` keeps:
//! - An `Err` from `apply` is a SQLite error that fails the whole group
//!   (nothing of it commits, every request is refused); a refusal of one
//!   request (full, id conflict, unknown device) is that request's answer,
//!   queued in [`Group::delivers`], and writes nothing.
//! - Answers, gauge changes and observer notices go into the [`Group`] and
//!   are handed out only after the commit.
//! - A multi-event append sits in its own savepoint: one refused request
//!   never takes others with it.

mod append;
mod devices;
mod forward;

use std::collections::HashMap;

use rusqlite::Connection;
use tokio::sync::oneshot;

pub(super) use append::{Append, AppendRemote};
pub(super) use devices::{AddDevice, Presence, RevokeDevice};
pub(super) use forward::{DeadLetter, MarkForwarded, Prune, Resend};

use super::mqtt::{self, MqttHeads};
use super::{Committed, Counters, Error, WriterConfig};

/// Where a command's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the writer thread.
pub(super) enum Command {
    Append(Append),
    AppendMqtt(mqtt::AppendMqtt),
    AppendRemote(AppendRemote),
    MarkForwarded(MarkForwarded),
    DeadLetter(DeadLetter),
    Resend(Resend),
    Presence(Presence),
    Prune(Prune),
    AddDevice(AddDevice),
    RevokeDevice(RevokeDevice),
    Mqtt(mqtt::ApplyOp),
    Ping(Ping),
}

impl Command {
    /// What the command counts for against the group's row and byte caps.
    pub(super) fn rows_and_bytes(&self) -> (usize, usize) {
        match self {
            Command::Append(c) => (c.events.len(), c.events.iter().map(crate::event::Event::size_hint).sum()),
            Command::AppendMqtt(c) => (c.events.len(), c.events.iter().map(|(e, _)| e.size_hint()).sum()),
            Command::MarkForwarded(c) => (c.seqs.len(), c.seqs.len() * 16),
            Command::AppendRemote(c) => (c.events.len(), c.events.iter().map(|r| r.event.size_hint()).sum()),
            _ => (1, 0),
        }
    }

    /// Runs the command in the group's transaction.
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        match self {
            Command::Append(c) => c.apply(tx, cx),
            Command::AppendMqtt(c) => c.apply(tx, cx),
            Command::AppendRemote(c) => c.apply(tx, cx),
            Command::MarkForwarded(c) => c.apply(tx, cx),
            Command::DeadLetter(c) => c.apply(tx, cx),
            Command::Resend(c) => c.apply(tx, cx),
            Command::Presence(c) => c.apply(tx, cx),
            Command::Prune(c) => c.apply(tx, cx),
            Command::AddDevice(c) => c.apply(tx, cx),
            Command::RevokeDevice(c) => c.apply(tx, cx),
            Command::Mqtt(c) => c.apply(tx, cx),
            Command::Ping(c) => {
                cx.g.delivers.push(deliver(c.reply, Ok(())));
                Ok(())
            }
        }
    }
}

/// Round trip through the writer: proves it is alive and the log writable.
pub(super) struct Ping {
    pub(super) reply: Reply<()>,
}

/// What a command works with besides the transaction.
pub(super) struct Ctx<'a> {
    /// The group's answers and accounting.
    pub(super) g: &'a mut Group,
    /// Bytes the log will use once the group commits, as far as applied.
    pub(super) projected: u64,
    pub(super) config: &'a WriterConfig,
    /// The gauges as of the last commit.
    pub(super) counters: &'a Counters,
    /// Each device's MQTT chain head (see `mqtt::MqttHeads`).
    pub(super) heads: &'a mut MqttHeads,
    /// Someone observes commits: the group keeps its new events for them.
    pub(super) observed: bool,
}

impl Ctx<'_> {
    /// The refusal of `size` more bytes, when they would pass the budget.
    pub(super) fn over_budget(&self, size: u64) -> Option<Error> {
        let budget = self.config.max_bytes;
        (self.projected + size > budget).then_some(Error::Full { used: self.projected, budget })
    }
}

/// What one group commit produced, handed out only after the commit.
#[derive(Default)]
pub(super) struct Group {
    pub(super) delivers: Vec<Deliver>,
    pub(super) appended_rows: usize,
    /// Rows inserted into `events`: this site's and other sites'.
    pub(super) written_rows: usize,
    pub(super) new_events: Vec<Committed>,
    pub(super) presence: Vec<(String, String, bool)>,
    /// New rows per device, for the device counters.
    pub(super) seen: DeviceCounts,
    /// Changes to the gauges, applied after the commit.
    pub(super) d_backlog_rows: i64,
    pub(super) d_backlog_bytes: i64,
    pub(super) d_remote_bytes: i64,
    pub(super) remote_evicted: usize,
    pub(super) d_total_rows: i64,
    pub(super) d_dead_letters: i64,
    /// The last seq given, this group's inserts included: it starts at the
    /// writer's gauge and every insert takes the next one (see
    /// `schema::insert_event`).
    pub(super) last_seq: i64,
    pub(super) log_version: i64,
}

impl Group {
    /// A new row of this site (`bytes` as `event::row_bytes` counts them):
    /// pending, counted in the gauges and the commit's metrics.
    pub(super) fn appended(&mut self, bytes: usize) {
        self.d_backlog_rows += 1;
        self.d_total_rows += 1;
        self.d_backlog_bytes += bytes as i64;
        self.appended_rows += 1;
        self.written_rows += 1;
    }
}

/// A result computed inside the transaction, sent only after the commit.
pub(super) type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;

pub(super) fn deliver<T: Send + 'static>(reply: Reply<T>, result: Result<T, Error>) -> Deliver {
    Box::new(move |commit_error| {
        let result = match commit_error {
            Some(e) => Err(Error::Commit(e.to_string())),
            None => result,
        };
        // The requester may have gone away (client hung up): nothing to do.
        let _ = reply.send(result);
    })
}

/// Per (tenant, device): events added and the latest receive time.
pub(super) type DeviceCounts = HashMap<(String, String), (i64, i64)>;

pub(super) fn merge_counts(into: &mut DeviceCounts, from: DeviceCounts) {
    for (k, (n, last)) in from {
        let c = into.entry(k).or_insert((0, 0));
        c.0 += n;
        c.1 = c.1.max(last);
    }
}

//! The writer thread and its cheap, cloneable front-end, `LogHandle`.
//!
//! Group commit: the thread blocks for one request, then drains whatever else
//! is queued (up to `commit_max_rows` / `commit_max_bytes`), runs all of it in
//! one transaction (a savepoint per request), commits once, and only then
//! answers every request. A failed commit answers every request with an error,
//! so nothing is acked that is not on disk.
//!
//! When the queue is full, `LogHandle` callers wait for room (backpressure).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use super::{Error, MqttOp, schema};
use crate::event::{Event, now_us};
use crate::metrics::Metrics;

/// Limits of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub max_bytes: u64,
    /// Bytes other sites' events may take (`log.remote_max_bytes`).
    pub remote_max_bytes: u64,
    /// This site: events from any other are remote.
    pub site_id: String,
    pub commit_max_rows: usize,
    pub commit_max_bytes: usize,
    /// How long a group stays open after its first request to gather more
    /// (`log.commit_delay`; zero: commit once the queue is empty).
    pub commit_delay: Duration,
    pub queue_capacity: usize,
}

/// The answer for one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub id: Uuid,
    pub seq: i64,
    /// The id was already in the log: nothing was written, `seq` is the original.
    pub duplicate: bool,
}

/// How often an open group (`commit_delay`) looks at the queue again.
const COMMIT_DELAY_POLL: Duration = Duration::from_millis(1);

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    Append { events: Vec<Event>, reply: Reply<Vec<Appended>> },
    MarkForwarded { seqs: Vec<i64>, reply: Reply<usize> },
    DeadLetter { seq: i64, error: String, reply: Reply<usize> },
    Presence { tenant: String, device_id: String, online: bool, reply: Reply<usize> },
    AppendRemote { events: Vec<super::RemoteEvent>, reply: Reply<usize> },
    Prune { cutoff_us: i64, limit: usize, reply: Reply<usize> },
    AddDevice { tenant: String, device_id: String, name: Option<String>, reply: Reply<schema::Device> },
    RevokeDevice { tenant: String, device_id: String, reply: Reply<schema::Device> },
    Mqtt { op: MqttOp, reply: Reply<usize> },
    Ping { reply: Reply<()> },
}

impl Command {
    fn rows_and_bytes(&self) -> (usize, usize) {
        match self {
            Command::Append { events, .. } => (events.len(), events.iter().map(Event::size_hint).sum()),
            Command::MarkForwarded { seqs, .. } => (seqs.len(), seqs.len() * 16),
            Command::AppendRemote { events, .. } => (events.len(), events.iter().map(|r| r.event.size_hint()).sum()),
            _ => (1, 0),
        }
    }
}

/// Cheap handle to the writer thread.
#[derive(Clone)]
pub struct LogHandle {
    tx: mpsc::Sender<Command>,
    full: Arc<AtomicBool>,
    counters: Arc<super::Counters>,
    unflushed: Arc<Mutex<DeviceCounts>>,
    /// Bumped before a group that stores the device counters commits (odd
    /// while it may be committing) and after `unflushed` was cleared:
    /// readers that add `unflushed` to the table's counters retry when it
    /// moved, so they never count a flush twice or not at all.
    device_flushes: Arc<std::sync::atomic::AtomicU64>,
}

/// The running writer thread; `join` after every handle is dropped.
pub struct WriterThread {
    thread: JoinHandle<()>,
}

impl WriterThread {
    /// Waits for the writer to drain its queue and stop. It stops once every
    /// `LogHandle` is gone.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("site log writer thread panicked");
        }
    }
}

/// WAL bytes at which the writer checkpoints (about what SQLite's default
/// of 1,000 pages was with 4 KiB pages).
const CHECKPOINT_BYTES: i64 = 4 << 20;

thread_local! {
    /// Pages in the WAL after the writer thread's last commit (its WAL hook).
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook: it replaces SQLite's autocheckpoint,
/// which would run inside the commit and hold that group's answers back.
fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// Pokes the writer while device counters wait in memory, so an idle log
/// stores them within [`DEVICE_FLUSH`] too (a busy one does at its commits).
pub async fn flush_devices(log: LogHandle, shutdown: tokio_util::sync::CancellationToken) -> Result<(), Error> {
    let mut tick = tokio::time::interval(DEVICE_FLUSH / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let waiting = !log.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty();
        if waiting && let Err(e) = log.ping().await {
            tracing::warn!(error = %e, "device counters not stored; will retry");
        }
    }
}

/// Starts the writer thread on an open, migrated connection.
/// `committed` is signalled after every commit that appended rows (the
/// forwarder waits on it instead of polling); `observers` are told about
/// every committed event and presence change.
pub fn spawn(
    conn: Connection,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    committed: Arc<Notify>,
    observers: Vec<Arc<dyn super::CommitObserver>>,
) -> Result<(LogHandle, WriterThread), Error> {
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let full = Arc::new(AtomicBool::new(false));
    let writer_full = full.clone();
    // Counted once here; the writer keeps the gauges from then on.
    let counters = Arc::new(super::Counters::default());
    counters.set(&schema::scan(&conn, Some(&config.site_id))?);
    let log_version = schema::log_version(&conn)?;
    let heads = MqttHeads::load(&conn)?;
    let writer_counters = counters.clone();
    let unflushed = Arc::new(Mutex::new(DeviceCounts::new()));
    let writer_unflushed = unflushed.clone();
    let device_flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer_flushes = device_flushes.clone();
    // SQLite's default checkpoints every 1,000 pages: 1 MiB with 1 KiB pages.
    // Every checkpoint writes the hot pages (index tails, the table's last
    // page) to the database again, so fewer of them write less: 4 MiB. The
    // writer runs them itself once a group is answered (`note_wal_pages`).
    conn.wal_hook(Some(note_wal_pages));
    // In pages of this log (1 KiB for new ones, 4 KiB for logs from before).
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let checkpoint_pages = i32::try_from(CHECKPOINT_BYTES / page_size.max(512)).unwrap_or(i32::MAX);
    let thread = std::thread::Builder::new()
        .name("site-log-writer".into())
        .spawn(move || {
            Writer {
                conn,
                config,
                metrics,
                committed,
                full: writer_full,
                observers,
                counters: writer_counters,
                log_version,
                unflushed: writer_unflushed,
                device_flushes: writer_flushes,
                heads,
                checkpoint_pages,
                flushed_at: Instant::now(),
                stopping: false,
            }
            .run(rx)
        })
        .map_err(|e| Error::Commit(format!("cannot start writer thread: {e}")))?;
    Ok((LogHandle { tx, full, counters, unflushed, device_flushes }, WriterThread { thread }))
}

impl LogHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Appends events in one all-or-nothing unit; answers after the commit.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, Error> {
        self.call(|reply| Command::Append { events, reply }).await
    }

    /// Marks rows forwarded (after the central commit).
    pub async fn mark_forwarded(&self, seqs: Vec<i64>) -> Result<usize, Error> {
        self.call(|reply| Command::MarkForwarded { seqs, reply }).await
    }

    /// Moves a pending row the central database refused to `dead_letter`.
    pub async fn dead_letter(&self, seq: i64, error: String) -> Result<usize, Error> {
        self.call(|reply| Command::DeadLetter { seq, error, reply }).await
    }

    /// Records a device connecting or dropping (MQTT presence).
    pub async fn presence(&self, tenant: String, device_id: String, online: bool) -> Result<usize, Error> {
        self.call(|reply| Command::Presence { tenant, device_id, online, reply }).await
    }

    /// Stores events of other sites (already central, so never forwarded) and
    /// advances their catch-up cursors; duplicates by id are skipped.
    /// Returns how many were new.
    pub async fn append_remote(&self, events: Vec<super::RemoteEvent>) -> Result<usize, Error> {
        self.call(|reply| Command::AppendRemote { events, reply }).await
    }

    /// The log's gauges (backlog, total rows, dead letters, last seq), kept
    /// by the writer: reading them costs nothing.
    pub fn counters(&self) -> super::schema::Scan {
        self.counters.get()
    }

    /// Adds the counters not yet stored to `devices` read from the table.
    pub fn overlay_devices(&self, devices: &mut [schema::Device], flushes: u64) -> bool {
        let unflushed = self.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.device_flushes.load(Ordering::SeqCst);
        if now != flushes || now % 2 == 1 {
            return false;
        }
        for d in devices {
            if let Some(&(count, last)) = unflushed.get(&(d.tenant.clone(), d.device_id.clone())) {
                d.event_count += count;
                let last = crate::event::from_us(last);
                d.last_seen = Some(d.last_seen.map_or(last, |seen| seen.max(last)));
            }
        }
        true
    }

    /// Read before the devices table: see [`overlay_devices`](Self::overlay_devices).
    pub fn device_flushes(&self) -> u64 {
        self.device_flushes.load(Ordering::SeqCst)
    }

    /// True while the log is at its byte budget (appends would be refused).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Deletes up to `limit` forwarded rows older than `cutoff_us`.
    pub async fn prune(&self, cutoff_us: i64, limit: usize) -> Result<usize, Error> {
        self.call(|reply| Command::Prune { cutoff_us, limit, reply }).await
    }

    /// Registers a device.
    pub async fn add_device(
        &self,
        tenant: String,
        device_id: String,
        name: Option<String>,
    ) -> Result<schema::Device, Error> {
        self.call(|reply| Command::AddDevice { tenant, device_id, name, reply }).await
    }

    /// Revokes a device.
    pub async fn revoke_device(&self, tenant: String, device_id: String) -> Result<schema::Device, Error> {
        self.call(|reply| Command::RevokeDevice { tenant, device_id, reply }).await
    }

    /// Resolves once the writer thread is gone (stopped or panicked).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Records MQTT session state; answers after the commit.
    pub async fn mqtt(&self, op: MqttOp) -> Result<usize, Error> {
        self.call(|reply| Command::Mqtt { op, reply }).await
    }

    /// Round trip through the writer: proves it is alive and the log writable.
    pub async fn ping(&self) -> Result<(), Error> {
        self.call(|reply| Command::Ping { reply }).await
    }
}

struct Writer {
    conn: Connection,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    committed: Arc<Notify>,
    /// Set while the log is within 64 KiB of its budget, so MQTT stops reading.
    full: Arc<AtomicBool>,
    observers: Vec<Arc<dyn super::CommitObserver>>,
    counters: Arc<super::Counters>,
    /// `meta.log_version` last seen: another process changed the events
    /// when it moves, and the gauges are counted again.
    log_version: i64,
    /// Device counters of committed groups not yet in the devices table.
    unflushed: Arc<Mutex<DeviceCounts>>,
    /// See `LogHandle::device_flushes`.
    device_flushes: Arc<std::sync::atomic::AtomicU64>,
    flushed_at: Instant,
    /// Set when the queue closed: the last group stores the counters.
    stopping: bool,
    heads: MqttHeads,
    /// WAL pages at which the writer checkpoints (`CHECKPOINT_BYTES`).
    checkpoint_pages: i32,
}

/// Each device's newest event with a packet id: where a DUP=1 lookup starts
/// walking back through `events.mqtt_prev` (see `schema::find_redelivered`).
/// Kept here, stored with the device counters, and completed from the
/// log's tail after a crash. Nested maps: looking up by `&str` allocates
/// nothing.
#[derive(Default)]
struct MqttHeads {
    devices: HashMap<String, HashMap<String, Head>>,
    /// What the open transaction changed, oldest first, with the head
    /// before: undone if it does not commit.
    undo: Vec<(String, String, Option<Head>)>,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    seq: i64,
    /// `mqtt_heads` holds this seq.
    stored: bool,
}

impl MqttHeads {
    fn load(conn: &Connection) -> Result<Self, Error> {
        let (stored, upto) = schema::mqtt_heads(conn)?;
        let mut heads = MqttHeads::default();
        for (tenant, device, seq) in stored {
            heads.devices.entry(tenant).or_default().insert(device, Head { seq, stored: true });
        }
        let after = schema::mqtt_heads_after(conn, upto)?;
        if !after.is_empty() {
            tracing::info!(
                devices = after.len(),
                "MQTT redelivery: newest events found again past the last stored ones"
            );
        }
        for (tenant, device, seq) in after {
            heads.devices.entry(tenant).or_default().insert(device, Head { seq, stored: false });
        }
        Ok(heads)
    }

    fn get(&self, tenant: &str, device: &str) -> Option<i64> {
        Some(self.devices.get(tenant)?.get(device)?.seq)
    }

    fn set(&mut self, tenant: &str, device: &str, seq: i64) {
        let head = Head { seq, stored: false };
        if !self.devices.contains_key(tenant) {
            self.devices.insert(tenant.to_owned(), HashMap::new());
        }
        let devices = self.devices.get_mut(tenant).expect("inserted above");
        let before = match devices.get_mut(device) {
            Some(h) => Some(std::mem::replace(h, head)),
            None => devices.insert(device.to_owned(), head),
        };
        self.undo.push((tenant.to_owned(), device.to_owned(), before));
    }

    /// Undoes the changes after the first `keep` (a rolled-back request or
    /// transaction).
    fn undo_to(&mut self, keep: usize) {
        while self.undo.len() > keep {
            let Some((tenant, device, before)) = self.undo.pop() else { break };
            let devices = self.devices.entry(tenant).or_default();
            match before {
                Some(head) => devices.insert(device, head),
                None => devices.remove(&device),
            };
        }
    }

    /// Heads `mqtt_heads` does not hold yet: `(tenant, device, seq)`.
    fn unstored(&self) -> impl Iterator<Item = (&str, &str, i64)> {
        self.devices.iter().flat_map(|(tenant, devices)| {
            devices.iter().filter(|(_, h)| !h.stored).map(move |(device, h)| (tenant.as_str(), device.as_str(), h.seq))
        })
    }

    /// After the commit that stored every head.
    fn mark_stored(&mut self) {
        self.devices.values_mut().flat_map(HashMap::values_mut).for_each(|h| h.stored = true);
    }
}

/// A result computed inside the transaction, sent only after the commit.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;

fn deliver<T: Send + 'static>(reply: Reply<T>, result: Result<T, Error>) -> Deliver {
    Box::new(move |commit_error| {
        let result = match commit_error {
            Some(e) => Err(Error::Commit(e.to_string())),
            None => result,
        };
        // The requester may have gone away (client hung up): nothing to do.
        let _ = reply.send(result);
    })
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let (mut rows, mut bytes) = first.rows_and_bytes();
            let mut group = vec![first];
            // With a commit delay the group stays open until then, polling
            // the queue: the writer has no runtime to wait with a timeout.
            let open_until = Instant::now() + self.config.commit_delay;
            while rows < self.config.commit_max_rows && bytes < self.config.commit_max_bytes {
                match rx.try_recv() {
                    Ok(cmd) => {
                        let (r, b) = cmd.rows_and_bytes();
                        rows += r;
                        bytes += b;
                        group.push(cmd);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= open_until {
                            break;
                        }
                        std::thread::sleep((open_until - now).min(COMMIT_DELAY_POLL));
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            self.commit_group(group);
        }
        // Stopping: store the device counters still in memory.
        self.stopping = true;
        self.commit_group(Vec::new());
        tracing::debug!("site log writer: queue closed, stopping");
    }

    fn commit_group(&mut self, group: Vec<Command>) {
        let started = Instant::now();
        let mut g = Group::default();
        let outcome = self.write_group(group, &mut g);
        let commit_error = match &outcome {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "site log commit failed; requests in this group are refused");
                Some(e.to_string())
            }
        };
        if commit_error.is_none() {
            self.metrics.commit_rows.observe(g.appended_rows as f64);
            self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.log_events_written.inc_by(g.written_rows as u64);
            // Before the answers: an acked event is in the gauges.
            self.count(&g);
        }
        for d in g.delivers {
            d(commit_error.as_deref());
        }
        if commit_error.is_some() {
            // Don't spin on a persistent failure (disk gone, read-only fs).
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        if g.appended_rows > 0 {
            self.committed.notify_one();
        }
        for o in &self.observers {
            if !g.new_events.is_empty() {
                o.committed(&g.new_events);
            }
            for (tenant, device_id, online) in &g.presence {
                o.presence(tenant, device_id, *online);
            }
        }
        self.checkpoint_if_due();
    }

    /// Copies the WAL back into the database once it holds
    /// `CHECKPOINT_BYTES`, as SQLite's autocheckpoint would (passive: never
    /// waits for a reader), but after the group's answers. Its fsync of the
    /// database file (5-10 ms for 4 MiB of WAL here) is the slowest thing
    /// the writer does; inside the commit, the group that filled the WAL
    /// waited for it on top of its own commit.
    fn checkpoint_if_due(&mut self) {
        if WAL_PAGES.get() < self.checkpoint_pages {
            return;
        }
        WAL_PAGES.set(0);
        let started = Instant::now();
        match self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64()),
            Err(e) => tracing::warn!(error = %e, "site log checkpoint failed; will retry at the next commit"),
        }
    }

    /// Applies a committed group to the gauges; counts again from a scan
    /// when another process changed the events since the last group.
    fn count(&mut self, g: &Group) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        if g.log_version != self.log_version {
            match schema::scan(&self.conn, Some(&self.config.site_id)) {
                Ok(s) => {
                    c.set(&s);
                    self.log_version = g.log_version;
                }
                Err(e) => tracing::warn!(error = %e, "site log gauges not recounted; will retry"),
            }
            return;
        }
        c.backlog_rows.fetch_add(g.d_backlog_rows, Relaxed);
        c.remote_bytes.fetch_add(g.d_remote_bytes, Relaxed);
        if g.remote_evicted > 0 {
            self.metrics.remote_evicted.inc_by(g.remote_evicted as u64);
        }
        c.backlog_bytes.fetch_add(g.d_backlog_bytes, Relaxed);
        c.total_rows.fetch_add(g.d_total_rows, Relaxed);
        c.dead_letters.fetch_add(g.d_dead_letters, Relaxed);
        c.last_seq.fetch_max(g.last_seq, Relaxed);
    }

    /// Runs every command of the group in one transaction and commits it.
    fn write_group(&mut self, group: Vec<Command>, g: &mut Group) -> Result<(), Error> {
        let (max_bytes, observed) = (self.config.max_bytes, !self.observers.is_empty());
        // IMMEDIATE: the reads below see the latest snapshot (the CLI may
        // have written from another process), which a deferred transaction
        // could not upgrade to a write (SQLITE_BUSY_SNAPSHOT). They are made
        // inside it because outside, each takes and drops its own lock.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut projected = schema::used_bytes(&tx)?;
        g.log_version = schema::log_version(&tx)?;
        // Anything left from a transaction that failed is undone.
        self.heads.undo_to(0);
        let mut seen = DeviceCounts::new();
        for cmd in group {
            match cmd {
                Command::Append { events, reply } => {
                    let size: u64 = events.iter().map(|e| e.size_hint() as u64).sum();
                    if projected + size > max_bytes {
                        g.delivers.push(deliver(reply, Err(Error::Full { used: projected, budget: max_bytes })));
                        continue;
                    }
                    let result = append_request(&tx, &events, &mut seen, &mut self.heads)?;
                    if let Ok(r) = &result {
                        projected += size;
                        let new = r.iter().zip(&events).filter(|(a, _)| !a.duplicate);
                        for (a, e) in new {
                            g.d_backlog_rows += 1;
                            g.d_total_rows += 1;
                            g.d_backlog_bytes += e.size_hint() as i64;
                            g.last_seq = g.last_seq.max(a.seq);
                        }
                        let appended = r.iter().filter(|a| !a.duplicate).count();
                        g.appended_rows += appended;
                        g.written_rows += appended;
                        if observed {
                            g.new_events
                                .extend(r.iter().zip(events).filter(|(a, _)| !a.duplicate).map(|(a, e)| (a.seq, e)));
                        }
                    }
                    g.delivers.push(deliver(reply, result));
                }
                Command::AppendRemote { mut events, reply } => {
                    // Other sites' events stay within their share of the
                    // budget (and the budget): the oldest of them make room.
                    // A batch larger than the whole share keeps its newest
                    // part; the rest counts as evicted (its cursor moves on).
                    let mut size: i64 = events.iter().map(|r| r.event.size_hint() as i64).sum();
                    let share = self.config.remote_max_bytes as i64;
                    let mut skip = 0;
                    while size > share && skip < events.len() {
                        size -= events[skip].event.size_hint() as i64;
                        skip += 1;
                    }
                    for r in events.drain(..skip) {
                        schema::advance_remote_cursor(&tx, &r.event.tenant, &r.event.origin_site, r.site_seq)?;
                    }
                    g.remote_evicted += skip;
                    let remote =
                        self.counters.remote_bytes.load(std::sync::atomic::Ordering::Relaxed) + g.d_remote_bytes;
                    let over_share = remote + size - self.config.remote_max_bytes as i64;
                    let over_budget = (projected as i64) + size - max_bytes as i64;
                    let need = over_share.max(over_budget);
                    if need > 0 {
                        let (rows, bytes) = schema::evict_remote(&tx, &self.config.site_id, need)?;
                        g.d_remote_bytes -= bytes;
                        g.d_total_rows -= rows as i64;
                        g.remote_evicted += rows;
                        projected = projected.saturating_sub(bytes as u64);
                        if bytes < need {
                            // This site's own events fill the budget: other
                            // sites' events wait in central (no cursor moves).
                            tracing::warn!(
                                bytes = size,
                                "site log full of this site's events: remote events not stored"
                            );
                            g.delivers.push(deliver(reply, Ok(0)));
                            continue;
                        }
                    }
                    // An error here fails the whole group: nothing half-stored.
                    let before = g.new_events.len();
                    let added = append_remote(&tx, events, &mut g.new_events)?;
                    let new = &g.new_events[before..];
                    g.d_total_rows += added as i64;
                    g.written_rows += added;
                    g.d_remote_bytes += new.iter().map(|(_, e)| e.size_hint() as i64).sum::<i64>();
                    projected += new.iter().map(|(_, e)| e.size_hint() as u64).sum::<u64>();
                    g.last_seq = new.iter().map(|(s, _)| *s).fold(g.last_seq, i64::max);
                    g.delivers.push(deliver(reply, Ok(added)));
                }
                Command::Presence { tenant, device_id, online, reply } => {
                    let r = schema::set_presence(&tx, &tenant, &device_id, online, now_us());
                    if r.is_ok() {
                        g.presence.push((tenant, device_id, online));
                    }
                    g.delivers.push(deliver(reply, r));
                }
                Command::MarkForwarded { seqs, reply } => {
                    let r = schema::mark_forwarded(&tx, &seqs, now_us()).map(|(n, bytes)| {
                        g.d_backlog_rows -= n as i64;
                        g.d_backlog_bytes -= bytes;
                        n
                    });
                    g.delivers.push(deliver(reply, r));
                }
                Command::DeadLetter { seq, error, reply } => {
                    let r = schema::dead_letter(&tx, seq, &error, now_us()).map(|(n, bytes)| {
                        g.d_backlog_rows -= n as i64;
                        g.d_backlog_bytes -= bytes;
                        g.d_total_rows -= n as i64;
                        g.d_dead_letters += n as i64;
                        n
                    });
                    g.delivers.push(deliver(reply, r));
                }
                Command::Prune { cutoff_us, limit, reply } => {
                    let r = schema::prune(&tx, cutoff_us, limit, &self.config.site_id).map(|(n, remote)| {
                        g.d_total_rows -= n as i64;
                        g.d_remote_bytes -= remote;
                        n
                    });
                    g.delivers.push(deliver(reply, r));
                }
                Command::AddDevice { tenant, device_id, name, reply } => {
                    let r = schema::add_device(&tx, &tenant, &device_id, name.as_deref(), now_us());
                    g.delivers.push(deliver(reply, r));
                }
                Command::RevokeDevice { tenant, device_id, reply } => {
                    g.delivers.push(deliver(reply, schema::revoke_device(&tx, &tenant, &device_id, now_us())));
                }
                Command::Mqtt { op, reply } => g.delivers.push(deliver(reply, op.apply(&tx, now_us()))),
                Command::Ping { reply } => g.delivers.push(deliver(reply, Ok(()))),
            }
        }
        // Device counters: kept in memory, stored every DEVICE_FLUSH.
        let flush = self.stopping || self.flushed_at.elapsed() >= DEVICE_FLUSH;
        if flush {
            let unflushed = self.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((tenant, device), (count, last)) in unflushed.iter() {
                schema::bump_device(&tx, tenant, device, *count, *last)?;
            }
            schema::store_mqtt_heads(&tx, self.heads.unstored())?;
            super::mqtt::note_alive(&tx, now_us())?;
            self.device_flushes.fetch_add(1, Ordering::SeqCst);
        }
        let committed = tx.commit();
        if committed.is_err() && flush {
            self.device_flushes.fetch_add(1, Ordering::SeqCst); // the counters stay in memory
        }
        committed?;
        self.heads.undo.clear();
        if flush {
            self.heads.mark_stored();
        }
        let mut unflushed = self.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if flush {
            unflushed.clear();
            self.device_flushes.fetch_add(1, Ordering::SeqCst);
            self.flushed_at = Instant::now();
        }
        merge_counts(&mut unflushed, seen);
        self.full.store(projected + 64 * 1024 > max_bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// What one group commit produced, handed out only after the commit.
#[derive(Default)]
struct Group {
    delivers: Vec<Deliver>,
    appended_rows: usize,
    /// Rows inserted into `events`: this site's and other sites'.
    written_rows: usize,
    new_events: Vec<(i64, Event)>,
    presence: Vec<(String, String, bool)>,
    /// Changes to the gauges, applied after the commit.
    d_backlog_rows: i64,
    d_backlog_bytes: i64,
    d_remote_bytes: i64,
    remote_evicted: usize,
    d_total_rows: i64,
    d_dead_letters: i64,
    last_seq: i64,
    log_version: i64,
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
    heads: &mut MqttHeads,
) -> Result<Result<Vec<Appended>, Error>, Error> {
    if events.len() == 1 {
        return match append(tx, events, seen, heads) {
            Err(e) if !matches!(e, Error::IdConflict { .. }) => Err(e),
            answer => Ok(answer),
        };
    }
    tx.execute_batch("SAVEPOINT request")?;
    let mut sp_seen = DeviceCounts::new();
    let keep = heads.undo.len();
    let r = append(tx, events, &mut sp_seen, heads);
    match &r {
        Ok(_) => {
            tx.execute_batch("RELEASE request")?;
            merge_counts(seen, sp_seen);
        }
        Err(_) => {
            tx.execute_batch("ROLLBACK TO request; RELEASE request")?;
            heads.undo_to(keep);
        }
    }
    Ok(r)
}

/// Stores other sites' events (already forwarded) and advances their
/// catch-up cursors; duplicates by id are skipped. Returns how many were new.
fn append_remote(
    tx: &Connection,
    events: Vec<super::RemoteEvent>,
    new_events: &mut Vec<(i64, Event)>,
) -> Result<usize, Error> {
    let now = now_us();
    let mut added = 0;
    for r in events {
        let seq = schema::insert_event(tx, &r.event, Some(now), None)?;
        schema::advance_remote_cursor(tx, &r.event.tenant, &r.event.origin_site, r.site_seq)?;
        if let Some(seq) = seq {
            added += 1;
            new_events.push((seq, r.event));
        }
    }
    Ok(added)
}

/// Per (tenant, device): events added and the latest receive time.
type DeviceCounts = HashMap<(String, String), (i64, i64)>;

/// How long device counters (`event_count`, `last_seen`) may stay in memory
/// before the writer stores them. Writing them at every commit touched one
/// page of the devices table per device in the group: at a trickle, one
/// page per event. A kill loses at most this much of the counters (never
/// an event); readers of this process add what is not stored yet.
pub const DEVICE_FLUSH: Duration = Duration::from_secs(10);

fn merge_counts(into: &mut DeviceCounts, from: DeviceCounts) {
    for (k, (n, last)) in from {
        let c = into.entry(k).or_insert((0, 0));
        c.0 += n;
        c.1 = c.1.max(last);
    }
}

/// Appends one request's events; counts new rows per device into `seen`.
fn append(
    conn: &Connection,
    events: &[Event],
    seen: &mut DeviceCounts,
    heads: &mut MqttHeads,
) -> Result<Vec<Appended>, Error> {
    let mut out = Vec::with_capacity(events.len());
    let mut per_device = DeviceCounts::new();
    for (index, e) in events.iter().enumerate() {
        // The device's newest event with a packet id, for one that has one.
        let head = e.redelivery.and_then(|_| heads.get(&e.tenant, &e.device_id));
        if let Some(r) = e.redelivery.as_ref().filter(|r| r.check)
            && let Some((seq, id)) = schema::find_redelivered(conn, e, r, head)?
        {
            out.push(Appended { id, seq, duplicate: true });
            continue;
        }
        let qos2 = e.mqtt.as_ref().and_then(|m| m.qos2.as_ref()).zip(e.redelivery.map(|r| r.pkid));
        if let Some((hold, pkid)) = qos2
            && let Some((seq, id)) = super::mqtt::held_qos2(conn, e, hold, pkid)?
        {
            out.push(Appended { id, seq, duplicate: true });
            continue;
        }
        match schema::insert_event(conn, e, None, head)? {
            Some(seq) => {
                if e.redelivery.is_some() {
                    heads.set(&e.tenant, &e.device_id, seq);
                }
                if let Some((hold, pkid)) = qos2 {
                    super::mqtt::hold_qos2(conn, e, hold, pkid, seq)?;
                }
                if let Some(topic) = e.mqtt.as_ref().and_then(|m| m.retain_topic.as_deref()) {
                    super::mqtt::set_retained(conn, &e.tenant, topic, Some(e.payload.as_bytes()), e.received_at_us)?;
                }
                out.push(Appended { id: e.id, seq, duplicate: false });
                let c = per_device.entry((e.tenant.clone(), e.device_id.clone())).or_insert((0, 0));
                c.0 += 1;
                c.1 = c.1.max(e.received_at_us);
            }
            None => match schema::owner_of(conn, &e.id)? {
                Some((seq, tenant, device)) if tenant == e.tenant && device == e.device_id => {
                    out.push(Appended { id: e.id, seq, duplicate: true });
                }
                _ => return Err(Error::IdConflict { index, id: e.id }),
            },
        }
    }
    merge_counts(seen, per_device);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of the devices table sees against a flush of the
    /// counters: the writer bumps `device_flushes` before the flush commits
    /// and again once `unflushed` is cleared, and the overlay refuses (the
    /// reader reads again) when it moved or is odd.
    #[test]
    fn a_reader_never_counts_a_device_flush_twice_or_not_at_all() {
        let (tx, _rx) = mpsc::channel(1);
        let log = LogHandle {
            tx,
            full: Arc::default(),
            counters: Arc::default(),
            unflushed: Arc::default(),
            device_flushes: Arc::default(),
        };
        log.unflushed.lock().unwrap().insert(("acme".into(), "d1".into()), (3, 1_000_000));
        let table = |count| {
            vec![schema::Device {
                tenant: "acme".into(),
                device_id: "d1".into(),
                name: None,
                created_at: time::OffsetDateTime::UNIX_EPOCH,
                revoked_at: None,
                last_seen: None,
                online: false,
                event_count: count,
            }]
        };
        // No flush: the table's 2 and the 3 in memory.
        let mut d = table(2);
        assert!(log.overlay_devices(&mut d, log.device_flushes()));
        assert_eq!(d[0].event_count, 5);
        // A flush committing while the table is read (it may or may not
        // hold the 3): refused.
        let seen = log.device_flushes();
        log.device_flushes.fetch_add(1, Ordering::SeqCst);
        assert!(!log.overlay_devices(&mut table(5), seen));
        assert!(!log.overlay_devices(&mut table(5), log.device_flushes()), "odd: a flush may be committing");
        // The flush is done: the table read before it may lack the 3,
        // the memory no longer has them: refused too.
        log.unflushed.lock().unwrap().clear();
        log.device_flushes.fetch_add(1, Ordering::SeqCst);
        assert!(!log.overlay_devices(&mut table(2), seen));
        let mut d = table(5);
        assert!(log.overlay_devices(&mut d, log.device_flushes()));
        assert_eq!(d[0].event_count, 5);
    }

    /// A rolled-back request or transaction leaves the heads as they were
    /// before it: a head pointing at a seq that was never committed would
    /// be handed out again to another event and cut the device's chain.
    #[test]
    fn heads_changed_by_what_did_not_commit_are_undone() {
        let mut h = MqttHeads::default();
        h.set("acme", "d1", 1);
        h.undo.clear(); // committed
        let keep = h.undo.len();
        h.set("acme", "d1", 2);
        h.set("acme", "d2", 3);
        assert_eq!((h.get("acme", "d1"), h.get("acme", "d2")), (Some(2), Some(3)));
        h.undo_to(keep);
        assert_eq!((h.get("acme", "d1"), h.get("acme", "d2")), (Some(1), None));
        // Within one transaction, a later request's rollback keeps the earlier one's.
        h.set("acme", "d1", 4);
        let keep = h.undo.len();
        h.set("acme", "d1", 5);
        h.undo_to(keep);
        assert_eq!(h.get("acme", "d1"), Some(4));
        h.undo_to(0);
        assert_eq!(h.get("acme", "d1"), Some(1));
        assert_eq!(h.get("globex", "d1"), None, "heads are per tenant");
        // What is stored at a flush: the heads the table does not hold yet.
        assert_eq!(h.unstored().collect::<Vec<_>>(), [("acme", "d1", 1)]);
        h.mark_stored();
        assert_eq!(h.unstored().count(), 0);
        h.set("acme", "d1", 6);
        h.undo_to(0);
        assert_eq!(h.unstored().count(), 0, "an undone change leaves the head stored");
    }
}

//! The writer thread: the one owner of the write connection.
//!
//! Group commit: the thread blocks for one request, then drains whatever else
//! is queued (up to `commit_max_rows` / `commit_max_bytes`), runs all of it in
//! one transaction (a savepoint per request), commits once, and only then
//! answers every request. A failed commit answers every request with an error,
//! so nothing is acked that is not on disk. Observers hear of a group only
//! after its answers, and the WAL is checkpointed after them too.
//!
//! Each request is a command (`log::cmd`); this file is the loop around them:
//! the transaction, the device counters, the commit and what follows it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{Notify, mpsc};

use super::budget::{self, Budget};
use super::cmd::{Command, Ctx, DeviceCounts, Group, merge_counts};
use super::{CommitObserver, Counters, Error, LogHandle, mqtt, schema};
use crate::event::now_us;
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
    /// `log.write_budget`: bytes per day the writer keeps its writes within
    /// by holding groups open longer (0: no budget; see `budget`).
    pub write_budget: u64,
    /// `log.max_commit_delay`: the longest the budget holds a group open.
    pub max_commit_delay: Duration,
}

/// How often an open group (`commit_delay`) looks at the queue again.
const COMMIT_DELAY_POLL: Duration = Duration::from_millis(1);

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
/// stores them within `DEVICE_FLUSH` too (a busy one does at its commits).
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
    observers: Vec<Arc<dyn CommitObserver>>,
) -> Result<(LogHandle, WriterThread), Error> {
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let full = Arc::new(AtomicBool::new(false));
    let writer_full = full.clone();
    // Counted once here; the writer keeps the gauges from then on.
    let counters = Arc::new(Counters::default());
    counters.set(&schema::scan(&conn, Some(&config.site_id))?);
    let log_version = schema::log_version(&conn)?;
    let heads = mqtt::MqttHeads::load(&conn)?;
    let writer_counters = counters.clone();
    let unflushed = Arc::new(Mutex::new(DeviceCounts::new()));
    let writer_unflushed = unflushed.clone();
    let device_flushes = Arc::new(AtomicU64::new(0));
    let writer_flushes = device_flushes.clone();
    // SQLite's default checkpoints every 1,000 pages: 1 MiB with 1 KiB pages.
    // Every checkpoint writes the hot pages (index tails, the table's last
    // page) to the database again, so fewer of them write less: 4 MiB. The
    // writer runs them itself once a group is answered (`note_wal_pages`).
    conn.wal_hook(Some(note_wal_pages));
    // In pages of this log (1 KiB for new ones, 4 KiB for logs from before).
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let checkpoint_pages = i32::try_from(CHECKPOINT_BYTES / page_size.max(512)).unwrap_or(i32::MAX);
    let budget = (config.write_budget > 0)
        .then(|| Budget::new(config.write_budget, config.commit_delay, config.max_commit_delay));
    metrics.log_commit_hold_seconds.set(budget.as_ref().map_or(config.commit_delay, Budget::hold).as_secs_f64());
    #[allow(clippy::cast_possible_wrap)]
    metrics.log_write_budget.set(config.write_budget as i64);
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
                budget,
                flushed_at: Instant::now(),
                stopping: false,
            }
            .run(rx)
        })
        .map_err(|e| Error::Commit(format!("cannot start writer thread: {e}")))?;
    Ok((LogHandle { tx, full, counters, unflushed, device_flushes }, WriterThread { thread }))
}

struct Writer {
    conn: Connection,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    committed: Arc<Notify>,
    /// Set while the log is within 64 KiB of its budget, so MQTT stops reading.
    full: Arc<AtomicBool>,
    observers: Vec<Arc<dyn CommitObserver>>,
    counters: Arc<Counters>,
    /// `meta.log_version` last seen: another process changed the events
    /// when it moves, and the gauges are counted again.
    log_version: i64,
    /// Device counters of committed groups not yet in the devices table.
    unflushed: Arc<Mutex<DeviceCounts>>,
    /// See `LogHandle::device_flushes`.
    device_flushes: Arc<AtomicU64>,
    flushed_at: Instant,
    /// Set when the queue closed: the last group stores the counters.
    stopping: bool,
    /// Each device's MQTT chain head, kept with the group's transaction.
    heads: mqtt::MqttHeads,
    /// WAL pages at which the writer checkpoints (`CHECKPOINT_BYTES`).
    checkpoint_pages: i32,
    /// `log.write_budget`, when set: it sets how long groups stay open.
    budget: Option<Budget>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let (mut rows, mut bytes) = first.rows_and_bytes();
            let mut group = vec![first];
            // With a commit delay the group stays open until then, polling
            // the queue: the writer has no runtime to wait with a timeout.
            let open_until = Instant::now() + self.hold();
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

    /// How long the next group stays open after its first request:
    /// `log.commit_delay`, or what the write budget needs now (it reads the
    /// thread's bytes written at most every 200 ms).
    fn hold(&mut self) -> Duration {
        let Some(b) = self.budget.as_mut() else { return self.config.commit_delay };
        let now = Instant::now();
        if b.due(now)
            && let Some(written) = budget::thread_write_bytes()
        {
            b.observe(now, written);
            self.metrics.log_commit_hold_seconds.set(b.hold().as_secs_f64());
        }
        b.hold()
    }

    fn commit_group(&mut self, group: Vec<Command>) {
        let started = Instant::now();
        // Seqs go on from the last one given (see `Group::last_seq`).
        let mut g = Group { last_seq: self.counters.last_seq.load(Ordering::Relaxed), ..Group::default() };
        let outcome = self.write_group(group, &mut g);
        let commit_error = match &outcome {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "site log commit failed; requests in this group are refused");
                Some(e.to_string())
            }
        };
        if let Some(e) = commit_error {
            for d in g.delivers {
                d(Some(&e));
            }
            // Don't spin on a persistent failure (disk gone, read-only fs).
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        if g.appended_rows > 0 {
            // A group of bookkeeping only (device counters, sessions) is
            // not an event commit: counting it would blur the figure.
            self.metrics.commit_rows.observe(g.appended_rows as f64);
            self.committed.notify_one();
        }
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.log_events_written.inc_by(g.written_rows as u64);
        // Before the answers: an acked event is in the gauges, and the
        // observers have it (a retained message is set, and an MQTT client
        // that subscribes once acked is not sent it as a live message).
        self.count(&g);
        for o in &self.observers {
            if !g.new_events.is_empty() {
                o.committed(&g.new_events);
            }
            for (tenant, device_id, online) in &g.presence {
                o.presence(tenant, device_id, *online);
            }
        }
        for d in g.delivers {
            d(None);
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
        // IMMEDIATE: the reads below see the latest snapshot (the CLI may
        // have written from another process), which a deferred transaction
        // could not upgrade to a write (SQLITE_BUSY_SNAPSHOT). They are made
        // inside it because outside, each takes and drops its own lock.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let projected = schema::used_bytes(&tx)?;
        g.log_version = schema::log_version(&tx)?;
        self.heads.begin();
        let mut cx = Ctx {
            g,
            projected,
            config: &self.config,
            counters: &self.counters,
            heads: &mut self.heads,
            observed: !self.observers.is_empty(),
        };
        for cmd in group {
            cmd.apply(&tx, &mut cx)?;
        }
        let projected = cx.projected;
        // Device counters: kept in memory, stored every DEVICE_FLUSH.
        let flush = self.stopping || self.flushed_at.elapsed() >= DEVICE_FLUSH;
        if flush {
            store_devices(&tx, &self.unflushed, &self.heads, &self.device_flushes)?;
        }
        let committed = tx.commit();
        if committed.is_err() && flush {
            self.device_flushes.fetch_add(1, Ordering::SeqCst); // the counters stay in memory
        }
        committed?;
        self.finish(flush, std::mem::take(&mut g.seen), projected);
        Ok(())
    }

    /// After the commit: the heads are final, the device counters move to
    /// memory (or, flushed, leave it), and the full flag is set.
    fn finish(&mut self, flushed: bool, seen: DeviceCounts, projected: u64) {
        self.heads.committed(flushed);
        let mut unflushed = self.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if flushed {
            unflushed.clear();
            self.device_flushes.fetch_add(1, Ordering::SeqCst);
            self.flushed_at = Instant::now();
        }
        merge_counts(&mut unflushed, seen);
        self.full.store(projected + 64 * 1024 > self.config.max_bytes, Ordering::Relaxed);
    }
}

/// Stores the device counters kept in memory, and the MQTT heads with
/// them, in the group's transaction; then, still holding the counters,
/// makes `device_flushes` odd: the flush may commit from now on.
fn store_devices(
    tx: &Connection,
    unflushed: &Mutex<DeviceCounts>,
    heads: &mqtt::MqttHeads,
    device_flushes: &AtomicU64,
) -> Result<(), Error> {
    let unflushed = unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for ((tenant, device), (count, last)) in unflushed.iter() {
        schema::bump_device(tx, tenant, device, *count, *last)?;
    }
    mqtt::store(tx, heads, now_us())?;
    device_flushes.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// How long device counters (`event_count`, `last_seen`) may stay in memory
/// before the writer stores them. Writing them at every commit touched one
/// page of the devices table per device in the group: at a trickle, one
/// page per event. A kill loses at most this much of the counters (never
/// an event); readers of this process add what is not stored yet.
const DEVICE_FLUSH: Duration = Duration::from_secs(10);

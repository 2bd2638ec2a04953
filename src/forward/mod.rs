//! The forwarder: site log → central PostgreSQL (`tenant_<t>.events`).
//!
//! Guarantees:
//! - Rows leave in `seq` order; one tenant's part of a batch is one central
//!   transaction; a row is marked forwarded only after that COMMIT succeeded.
//! - Inserts are `ON CONFLICT (id) DO NOTHING`, so a crash between the central
//!   COMMIT and the local mark (the row is sent again) never duplicates.
//! - Connection, I/O, timeout and server-side transient errors back off
//!   (100 ms doubling to `central.max_backoff`, jittered) and retry forever.
//! - Data errors (SQLSTATE classes 22 and 23) bisect the batch until the
//!   poison rows are isolated; those move to `dead_letter`, the rest go on.
//! - A batch that times out is sent again at half the size (rows and bytes,
//!   down to one row); quick successes double it back up to the configured
//!   caps. So a slow uplink drains instead of resending one batch forever.
//! - Silence is failure: an idle forwarder pings central every
//!   `central.ping_interval`; a ping or connect unanswered for
//!   `central.answer_timeout` marks the uplink down and reconnects.
//! - No SQLite connection is held across an `.await` (reads run on the
//!   blocking pool, writes go through the writer thread).

pub mod service;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::central::{self, Backoff, Connector, schema};
use crate::config::CentralConfig;
use crate::event::{StoredEvent, now_us};
use crate::log::{self, LogHandle, Readers};
use crate::metrics::Metrics;
use service::Central;

/// Why forwarding a batch failed: the central database or the site log.
pub use crate::central::StageError as Error;

/// Uplink state, as shown by status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Uplink {
    /// No `central.url`: buffering only.
    Disabled,
    Connecting,
    Up,
    /// Connected, but a batch has had no answer for `central.answer_timeout`
    /// (a hung server or a middlebox that stopped passing bytes): nothing
    /// moves, though the connection may still come back.
    Stalled,
    Down,
}

/// Shared, cheap view of the forwarder for status pages and metrics.
pub struct ForwardStatus {
    inner: Mutex<StatusInner>,
}

struct StatusInner {
    state: Uplink,
    since: time::OffsetDateTime,
    last_error: Option<String>,
    /// (when, rows) of recent successful batches, for the drain rate.
    recent: VecDeque<(Instant, usize)>,
    /// A batch sent to central and not answered yet: since when.
    waiting: Option<(Instant, time::OffsetDateTime)>,
    /// How long a batch may wait before the uplink shows stalled.
    answer_timeout: Duration,
}

/// Window of the drain-rate estimate.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A point-in-time copy of the uplink status.
#[derive(Debug, Clone, Serialize)]
pub struct UplinkSnapshot {
    pub state: Uplink,
    #[serde(with = "time::serde::rfc3339")]
    pub since: time::OffsetDateTime,
    pub last_error: Option<String>,
    /// Rows forwarded per second over the last 10 s.
    pub forwarded_rows_per_second: f64,
    /// Seconds the batch in flight has waited for central's answer, once
    /// that is longer than `central.answer_timeout` (`null` otherwise).
    pub batch_waiting_seconds: Option<f64>,
}

impl ForwardStatus {
    /// Starts in `state`.
    pub fn new(state: Uplink) -> Self {
        Self::with_answer_timeout(state, Duration::from_secs(5))
    }

    /// Starts in `state`; a batch unanswered for `answer_timeout` shows as
    /// stalled.
    pub fn with_answer_timeout(state: Uplink, answer_timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(StatusInner {
                state,
                since: time::OffsetDateTime::now_utc(),
                last_error: None,
                recent: VecDeque::new(),
                waiting: None,
                answer_timeout,
            }),
        }
    }

    /// A batch went to central (`true`), or its answer came (`false`).
    fn waiting(&self, on: bool) {
        let mut s = self.lock();
        s.waiting = on.then(|| (Instant::now(), time::OffsetDateTime::now_utc()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, state: Uplink, error: Option<String>) {
        let mut s = self.lock();
        if s.state != state {
            s.state = state;
            s.since = time::OffsetDateTime::now_utc();
        }
        if error.is_some() || state == Uplink::Up {
            s.last_error = error;
        }
    }

    /// `Connecting`, unless the uplink is already known to be down: its
    /// reconnect attempts keep showing `down` with the reason.
    fn connecting(&self) {
        if self.lock().state != Uplink::Down {
            self.set(Uplink::Connecting, None);
        }
    }

    fn forwarded(&self, rows: usize) {
        let mut s = self.lock();
        let now = Instant::now();
        s.recent.push_back((now, rows));
        while s.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            s.recent.pop_front();
        }
    }

    /// Current state, error and drain rate. An uplink whose batch has had
    /// no answer for `central.answer_timeout` is never shown up.
    pub fn snapshot(&self) -> UplinkSnapshot {
        let s = self.lock();
        let now = Instant::now();
        let rows: usize = s.recent.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, r)| r).sum();
        let stalled = s.waiting.filter(|(at, _)| now.duration_since(*at) > s.answer_timeout);
        let (state, since, last_error) = match stalled {
            Some((at, wall)) if s.state == Uplink::Up => {
                let waited = now.duration_since(at).as_secs_f64();
                let why =
                    format!("no answer from central for {waited:.0} s: a batch is waiting (central.answer_timeout)");
                (Uplink::Stalled, wall, Some(why))
            }
            _ => (s.state, s.since, s.last_error.clone()),
        };
        UplinkSnapshot {
            state,
            since,
            last_error,
            forwarded_rows_per_second: rows as f64 / RATE_WINDOW.as_secs_f64(),
            batch_waiting_seconds: stalled.map(|(at, _)| now.duration_since(at).as_secs_f64()),
        }
    }
}

/// Everything the forwarder stage needs.
pub struct Forwarder {
    pub connector: Connector,
    pub config: CentralConfig,
    pub log: LogHandle,
    pub readers: Readers,
    pub status: Arc<ForwardStatus>,
    pub metrics: Arc<Metrics>,
    /// Signalled by the log writer after commits that appended rows.
    pub wake: Arc<Notify>,
    /// This site: its forwarded rows are what central is checked for.
    pub site_id: String,
}

/// A small batch waits this many times central's recent commit time (see
/// [`Pipeline::batch_wait`]): a site then holds central busy for at most
/// about a tenth of the time.
const BUSY_FACTOR: u32 = 10;

/// Marks (site-log commits) allowed in flight behind central commits.
const MAX_MARKS_IN_FLIGHT: usize = 4;

/// While a connect attempt hangs, a fresh one starts this often beside it,
/// and this is the longest wait between attempts after central went silent.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Connect attempts in flight at most (enough to cover the default
/// `connect_timeout` at one start a second).
const MAX_PROBES: usize = 16;

/// The batch size in use, within the configured caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchLimit {
    rows: usize,
    bytes: usize,
}

impl BatchLimit {
    /// Halves rows and bytes (at least one row always goes); false when
    /// already at one row.
    fn shrink(&mut self) -> bool {
        let before = *self;
        self.rows = (self.rows / 2).max(1);
        self.bytes = (self.bytes / 2).max(1);
        *self != before && before.rows > 1
    }

    /// Doubles rows and bytes up to `max`; false when already there.
    fn grow(&mut self, max: BatchLimit) -> bool {
        let before = *self;
        self.rows = self.rows.saturating_mul(2).min(max.rows);
        self.bytes = self.bytes.saturating_mul(2).min(max.bytes);
        *self != before
    }
}

/// Overlaps the three steps of forwarding: while Postgres commits batch N, the
/// site log is marking batch N-1 and reading batch N+1. `cursor` is the last
/// seq handed to a central write; reads continue after it, and it returns to
/// 0 after an error or when nothing follows it (rows made pending again by
/// `replay` or `dead-letter retry` sit before it).
struct Pipeline {
    /// Current batch size (see [`BatchLimit`]).
    limit: BatchLimit,
    /// How long central took to commit recent batches (a moving average).
    commit_time: Duration,
    cursor: i64,
    marks: VecDeque<JoinHandle<Result<usize, log::Error>>>,
    prefetch: Option<JoinHandle<Result<Vec<StoredEvent>, log::Error>>>,
}

impl Pipeline {
    fn new(limit: BatchLimit) -> Self {
        Self { limit, commit_time: Duration::ZERO, marks: VecDeque::new(), prefetch: None, cursor: 0 }
    }

    /// A batch committed in `took`: folded into the moving average (an
    /// eighth per batch, so one slow commit does not swing it).
    fn committed_in(&mut self, took: Duration) {
        self.commit_time = (self.commit_time * 7 + took) / 8;
    }

    /// How long a small batch waits to coalesce: `batch_wait`, or
    /// [`BUSY_FACTOR`] times the recent commit time when central is slower
    /// than that (busy), up to `max_batch_wait`. A site then sends fewer,
    /// larger transactions exactly while central falls behind, and quick
    /// ones again as soon as it keeps up.
    fn batch_wait(&self, config: &CentralConfig) -> Duration {
        (self.commit_time * BUSY_FACTOR).clamp(config.batch_wait, config.max_batch_wait.max(config.batch_wait))
    }

    /// Waits for every mark in flight. A failed mark leaves its rows
    /// pending: they are sent again and ignored centrally.
    async fn settle_marks(&mut self) {
        while let Some(m) = self.marks.pop_front() {
            settle(m).await;
        }
    }

    /// Forget reads and position: start again from the first pending row.
    async fn rewind(&mut self) {
        if let Some(p) = self.prefetch.take() {
            p.abort();
        }
        self.settle_marks().await;
        self.cursor = 0;
    }
}

async fn settle(mark: JoinHandle<Result<usize, log::Error>>) {
    match mark.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "marking rows forwarded failed; they will be sent again"),
        Err(e) => tracing::warn!(error = %e, "mark task failed; rows will be sent again"),
    }
}

/// How often an idle forwarder looks for rows another process made pending
/// (`outpost replay`, `outpost dead-letter retry`), which do not signal `wake`.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// How often a migrated tenant's schema is looked after again (the next
/// time partition, `central.retention`).
const MAINTAIN_EVERY: Duration = Duration::from_secs(3600);

/// Tenants whose central schema this forwarder migrated, and when.
type Migrated = HashMap<String, Instant>;

impl Forwarder {
    /// Forwards until `shutdown`. Only configuration problems found at start
    /// are fatal; everything later is retried.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut pipeline = Pipeline::new(self.max_limit());
        let result = self.run_pipeline(&mut pipeline, shutdown).await;
        pipeline.rewind().await;
        result
    }

    /// The configured batch caps.
    fn max_limit(&self) -> BatchLimit {
        BatchLimit { rows: self.config.batch_rows, bytes: self.config.batch_bytes }
    }

    async fn run_pipeline(&self, p: &mut Pipeline, shutdown: CancellationToken) -> Result<(), Error> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_backoff);
        let mut central: Option<Central> = None;
        let mut migrated: Migrated = HashMap::new();
        // When central last answered anything; an idle forwarder pings after
        // `ping_interval` without an answer.
        let mut last_answer = Instant::now();
        tracing::info!(central = ?self.connector, "forwarder started");
        loop {
            // Connect (and migrate) eagerly, so schemas exist at startup and
            // the uplink state is true even when nothing is flowing.
            if central.as_ref().is_none_or(Central::is_closed) {
                let connect = async {
                    self.status.connecting();
                    let mut c = self.open().await?;
                    if self.config.migrate {
                        self.migrate_known(&mut c, &mut migrated).await?;
                    }
                    Ok::<_, Error>(c)
                };
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = connect => r,
                };
                // What central acknowledged before the connection was lost
                // may be missing now (a standby promoted): check it first.
                let result = match result {
                    Ok(mut c) => {
                        p.rewind().await;
                        let checked = tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            r = self.resend_lost(&mut c) => r,
                        };
                        checked.map(|()| c)
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(c) => {
                        tracing::info!("central database connected");
                        central = Some(c);
                        last_answer = Instant::now();
                        self.up(&mut backoff);
                    }
                    Err(e) => {
                        if self.failed(e, &mut backoff, &mut migrated, &shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let Some(c) = central.as_mut() else { continue };
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                b = self.next_batch(p) => b,
            };
            let batch = match batch {
                Ok(Some(b)) => b,
                // Idle: give tenants registered since the connect their
                // schema (central readers see it within IDLE_POLL), make
                // sure central still answers, then loop to re-check the
                // connection.
                Ok(None) => {
                    let mut result = Ok(());
                    if self.config.migrate {
                        result = self.migrate_known(c, &mut migrated).await;
                    }
                    if result.is_ok() && last_answer.elapsed() >= self.config.ping_interval {
                        result = tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            r = c.ping(self.connector.answer_timeout) => r,
                        };
                        if result.is_ok() {
                            last_answer = Instant::now();
                        }
                    }
                    if let Err(e) = result {
                        central = None;
                        if self.failed(e, &mut backoff, &mut migrated, &shutdown).await {
                            return Ok(());
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "forwarder: cannot read the site log; retrying");
                    if sleep_or_stop(&shutdown, backoff.next_delay()).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let result = tokio::select! {
                // Shutdown mid-batch is safe: uncommitted rows stay pending.
                _ = shutdown.cancelled() => return Ok(()),
                r = self.forward(c, p, &batch, &mut migrated) => r,
            };
            match result {
                Ok(()) => {
                    p.cursor = batch.last().map_or(p.cursor, |e| e.seq);
                    p.committed_in(started.elapsed());
                    self.metrics.forward_batch_wait_seconds.set(p.batch_wait(&self.config).as_secs_f64());
                    last_answer = Instant::now();
                    self.up(&mut backoff);
                    // Grow only when a doubled batch would likely still fit
                    // the statement timeout, or it would saw-tooth.
                    if started.elapsed() < self.config.statement_timeout / 4 && p.limit.grow(self.max_limit()) {
                        tracing::info!(
                            batch_rows = p.limit.rows,
                            batch_bytes = p.limit.bytes,
                            "forward batch size doubled after a quick batch"
                        );
                    }
                }
                Err(e) => {
                    central = None;
                    p.rewind().await;
                    if e.is_timeout() && p.limit.shrink() {
                        tracing::info!(
                            batch_rows = p.limit.rows,
                            batch_bytes = p.limit.bytes,
                            "forward batch size halved after a timeout"
                        );
                    }
                    if self.failed(e, &mut backoff, &mut migrated, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Opens a connection. An attempt that hangs (a silent partition
    /// swallows the startup) does not hold up the next: a fresh one starts
    /// every [`PROBE_EVERY`] beside it, and the first to connect wins, so a
    /// heal shows within about a second however long connects may take.
    async fn open(&self) -> Result<Central, Error> {
        let mut attempts = FuturesUnordered::new();
        attempts.push(Central::open(&self.connector));
        let mut next = tokio::time::Instant::now() + PROBE_EVERY;
        loop {
            tokio::select! {
                r = attempts.next() => match r {
                    Some(Ok(c)) => return Ok(c),
                    // A quick failure (refused, bad password) with nothing
                    // else pending goes to the backoff like any other.
                    Some(Err(e)) if attempts.is_empty() => return Err(e),
                    Some(Err(e)) => tracing::debug!(error = %e, "central connect attempt failed; others pending"),
                    None => return Err(central::Error::Timeout("connect").into()),
                },
                _ = tokio::time::sleep_until(next), if attempts.len() < MAX_PROBES => {
                    attempts.push(Central::open(&self.connector));
                    next = tokio::time::Instant::now() + PROBE_EVERY;
                }
            }
        }
    }

    fn up(&self, backoff: &mut Backoff) {
        backoff.reset();
        self.status.set(Uplink::Up, None);
        self.metrics.uplink_up.set(1);
    }

    /// Records a failure and sleeps the backoff; true when shutting down.
    async fn failed(
        &self,
        e: Error,
        backoff: &mut Backoff,
        migrated: &mut Migrated,
        shutdown: &CancellationToken,
    ) -> bool {
        if e.is_missing_schema() {
            migrated.clear();
            if !self.config.migrate {
                tracing::error!("central schema missing and central.migrate = false: run `outpost migrate --central`");
            }
        }
        let mut delay = backoff.next_delay();
        if e.is_no_answer() {
            delay = delay.min(PROBE_EVERY);
        }
        self.status.set(Uplink::Down, Some(e.to_string()));
        self.metrics.uplink_up.set(0);
        self.metrics.forward_retries.inc();
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, attempt = backoff.attempts(),
            "forwarding failed; will retry");
        sleep_or_stop(shutdown, delay).await
    }

    /// The next rows after the cursor: the prefetched ones if any, else read
    /// (waiting for pending rows, letting a small trickle coalesce for
    /// `batch_wait`). `None` after an idle wait, so the caller can re-check
    /// the connection. A full batch starts the read of the one after it.
    async fn next_batch(&self, p: &mut Pipeline) -> Result<Option<Vec<StoredEvent>>, Error> {
        let (max_rows, max_bytes) = (p.limit.rows, p.limit.bytes);
        let mut batch = match p.prefetch.take() {
            Some(h) => h.await.map_err(|e| log::Error::Join(e.to_string()))??,
            None => Vec::new(),
        };
        while batch.is_empty() {
            let after = p.cursor;
            batch = self.readers.with(move |c| log::schema::pending_batch(c, after, max_rows, max_bytes)).await?;
            let Some(first) = batch.first() else {
                if p.cursor != 0 {
                    p.rewind().await;
                    continue;
                }
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = tokio::time::sleep(IDLE_POLL) => return Ok(None),
                }
            };
            let received_us = crate::event::to_us(first.received_at);
            let age = Duration::from_micros(u64::try_from(now_us() - received_us).unwrap_or(0));
            let wait = p.batch_wait(&self.config);
            if batch.len() < max_rows && age < wait {
                tokio::time::sleep(wait - age).await;
                batch.clear();
            }
        }
        if batch.len() >= max_rows
            && let Some(last) = batch.last()
        {
            let (readers, after) = (self.readers.clone(), last.seq);
            p.prefetch = Some(tokio::spawn(async move {
                readers.with(move |c| log::schema::pending_batch(c, after, max_rows, max_bytes)).await
            }));
        }
        Ok(Some(batch))
    }

    /// After a (re)connect: the rows this site forwarded within
    /// `central.failover_window` before its newest forwarding, that central
    /// does not hold now (its `sites.last_seq` for this site is behind
    /// them: it failed over to a standby that had not replicated them), are
    /// made pending again, so they are sent again (central ignores those it
    /// has). Commits of one tenant are made in seq order on one connection,
    /// and a standby holds a prefix of them, so `last_seq` tells what it
    /// has.
    async fn resend_lost(&self, c: &mut Central) -> Result<(), Error> {
        let window = i64::try_from(self.config.failover_window.as_micros()).unwrap_or(i64::MAX);
        if window == 0 {
            return Ok(());
        }
        let site = self.site_id.clone();
        let at_risk = self.readers.with(move |c| log::schema::at_risk(c, &site, window)).await?;
        let mut tenants: Vec<&str> = at_risk.iter().map(|(_, t)| t.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut lost = Vec::new();
        for tenant in tenants {
            let Ok(schema) = schema::schema_name(tenant) else { continue };
            let Some(last) = c.site_last_seq(&schema, &self.site_id).await? else { continue };
            lost.extend(at_risk.iter().filter(|(seq, t)| t == tenant && *seq > last).map(|(seq, _)| *seq));
        }
        if lost.is_empty() {
            return Ok(());
        }
        let (first, count) = (lost[0], lost.len());
        let resent = self.log.resend(lost).await?;
        self.metrics.forward_resent.inc_by(resent as u64);
        tracing::warn!(
            events = resent,
            first_seq = first,
            checked = count,
            "central lacks events it had acknowledged (a failover to a standby that had not replicated them?); sending them again"
        );
        Ok(())
    }

    async fn migrate_known(&self, c: &mut Central, migrated: &mut Migrated) -> Result<(), Error> {
        let configured = self.config.tenants.clone();
        for t in self.readers.with(move |c| log::schema::known_tenants(c, &configured)).await? {
            self.ensure_migrated(c, &t, migrated).await?;
        }
        Ok(())
    }

    /// Migrates `tenant`'s central schema once per forwarder (again after a
    /// missing-schema error clears `migrated`), and again every
    /// [`MAINTAIN_EVERY`]: that creates the next time partition ahead and
    /// drops those past `central.retention`.
    async fn ensure_migrated(&self, c: &mut Central, tenant: &str, migrated: &mut Migrated) -> Result<(), Error> {
        if migrated.get(tenant).is_some_and(|at| at.elapsed() < MAINTAIN_EVERY) {
            return Ok(());
        }
        let first = !migrated.contains_key(tenant);
        let m = schema::migrate_tenant(c.client_mut(), tenant, schema::Layout::of(&self.config)).await?;
        if m.applied > 0 || m.converted {
            tracing::info!(tenant, migrations = m.applied, partitioned = m.converted, "central schema migrated");
        }
        if first && !m.partitioned {
            tracing::warn!(
                tenant,
                "central tenant_{tenant}.events holds rows and is not partitioned by time; \
                 `outpost migrate --central --partition-existing` converts it (copies the rows, locking the table meanwhile)"
            );
        }
        if m.dropped > 0 {
            tracing::info!(
                tenant,
                partitions = m.dropped,
                retention = ?self.config.retention,
                "central partitions past central.retention dropped"
            );
        }
        migrated.insert(tenant.to_string(), Instant::now());
        Ok(())
    }

    /// Forwards one batch, tenant by tenant (first appearance order), and
    /// marks what central committed in one mark: a whole batch moves the site
    /// log's watermark with one row write. After an error, what was
    /// committed before it is still marked.
    async fn forward(
        &self,
        c: &mut Central,
        p: &mut Pipeline,
        batch: &[StoredEvent],
        migrated: &mut Migrated,
    ) -> Result<(), Error> {
        let mut groups: Vec<(&str, Vec<&StoredEvent>)> = Vec::new();
        for e in batch {
            match groups.iter_mut().find(|(t, _)| *t == e.tenant) {
                Some((_, rows)) => rows.push(e),
                None => groups.push((&e.tenant, vec![e])),
            }
        }
        let mut committed = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        for (tenant, rows) in groups {
            if self.config.migrate
                && let Err(e) = self.ensure_migrated(c, tenant, migrated).await
            {
                result = Err(e);
                break;
            }
            let written = match schema::schema_name(tenant) {
                Ok(schema) => self.write_bisecting(c, &schema, &rows, &mut committed).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = written {
                result = Err(e);
                break;
            }
        }
        if !committed.is_empty() {
            let log = self.log.clone();
            p.marks.push_back(tokio::spawn(async move { log.mark_forwarded(committed).await }));
            while p.marks.len() > MAX_MARKS_IN_FLIGHT {
                if let Some(m) = p.marks.pop_front() {
                    settle(m).await;
                }
            }
        }
        result
    }

    /// One batch write, bounded by the batch timeout; the status shows it
    /// waiting from the moment it is sent, and a warning says so once it has
    /// waited `central.answer_timeout`.
    async fn write_watched(&self, c: &mut Central, schema: &str, part: &[&StoredEvent]) -> Result<u64, Error> {
        self.status.waiting(true);
        let write = tokio::time::timeout(self.connector.batch_timeout, c.write(schema, part));
        tokio::pin!(write);
        let answer = tokio::select! {
            r = &mut write => Some(r),
            () = tokio::time::sleep(self.connector.answer_timeout) => None,
        };
        let answer = match answer {
            Some(r) => r,
            None => {
                tracing::warn!(rows = part.len(), after = ?self.connector.answer_timeout,
                    "no answer from central for a batch yet; still waiting (the status shows the uplink stalled)");
                write.await
            }
        };
        self.status.waiting(false);
        match answer {
            Ok(r) => r,
            Err(_) => Err(central::Error::Timeout("batch write").into()),
        }
    }

    /// Writes `rows`; on a data error splits them until each poison row is
    /// alone, dead-letters it, and forwards the rest in order. The seqs
    /// central committed are added to `committed`.
    async fn write_bisecting(
        &self,
        c: &mut Central,
        schema: &str,
        rows: &[&StoredEvent],
        committed: &mut Vec<i64>,
    ) -> Result<(), Error> {
        let mut stack = vec![(0, rows.len())];
        while let Some((a, b)) = stack.pop() {
            let part = &rows[a..b];
            let result = self.write_watched(c, schema, part).await;
            match result {
                Ok(inserted) => {
                    // Central has the rows; the site log does not know yet.
                    crate::failpoint::fire("after_central_commit");
                    committed.extend(part.iter().map(|r| r.seq));
                    if let (Some(n), Some(row)) = (c.partition_count(schema), part.first()) {
                        let tenant = crate::metrics::TenantLabel { tenant: row.tenant.clone() };
                        self.metrics.central_partitions.get_or_create(&tenant).set(n);
                    }
                    self.status.forwarded(part.len());
                    self.metrics.forward_rows.inc_by(part.len() as u64);
                    self.metrics.forward_batches.inc();
                    if (inserted as usize) < part.len() {
                        tracing::debug!(sent = part.len(), inserted, "some rows were already central (resend)");
                    }
                }
                Err(e) if e.is_data_error() => {
                    if let [row] = part {
                        let reason = e.to_string();
                        tracing::warn!(seq = row.seq, id = %row.id, tenant = row.tenant, device_id = row.device_id,
                            error = reason, "central database refused an event; moved to dead letters");
                        self.log.dead_letter(row.seq, reason).await?;
                        self.metrics.dead_letters.inc();
                    } else {
                        let mid = a + (b - a) / 2;
                        stack.push((mid, b));
                        stack.push((a, mid));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Sleeps unless shutdown comes first; true when stopping.
async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Connects once and migrates the given tenants (`outpost migrate --central
/// [--partition-existing]`), dropping partitions past `central.retention`.
pub async fn migrate_central(
    config: &CentralConfig,
    tenants: &[String],
    partition_existing: bool,
) -> Result<Vec<(String, schema::Migrated)>, Error> {
    let connector = Connector::new(config)?;
    let mut c = Central::open(&connector).await?;
    let mut out = Vec::new();
    let layout = schema::Layout { partition_existing, ..schema::Layout::of(config) };
    for t in tenants {
        out.push((t.clone(), schema::migrate_tenant(c.client_mut(), t, layout).await?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_batch_halves_down_to_one_row_and_grows_back_to_the_caps() {
        let max = BatchLimit { rows: 5000, bytes: 8 * 1024 * 1024 };
        let mut limit = max;
        assert!(limit.shrink());
        assert_eq!(limit, BatchLimit { rows: 2500, bytes: 4 * 1024 * 1024 });
        let mut halvings = 1;
        while limit.shrink() {
            halvings += 1;
        }
        assert_eq!(limit.rows, 1, "never below one row");
        assert_eq!(halvings, 12);
        let mut doublings = 0;
        while limit.grow(max) {
            doublings += 1;
        }
        assert_eq!(limit, max, "back to the configured caps, never above");
        assert_eq!(doublings, 13);
    }

    #[test]
    fn a_slow_central_stretches_the_batch_wait_up_to_its_cap_and_a_quick_one_restores_it() {
        let config = CentralConfig::default();
        let (floor, cap) = (config.batch_wait, config.max_batch_wait);
        let mut p = Pipeline::new(BatchLimit { rows: 5000, bytes: 1 << 20 });
        assert_eq!(p.batch_wait(&config), floor, "nothing measured yet");
        // Quick commits (1 ms): ten times that is below batch_wait.
        for _ in 0..50 {
            p.committed_in(Duration::from_millis(1));
        }
        assert_eq!(p.batch_wait(&config), floor);
        // Central slows down to 25 ms a commit: the wait follows, ten times.
        for _ in 0..100 {
            p.committed_in(Duration::from_millis(25));
        }
        let wait = p.batch_wait(&config);
        assert!(wait > Duration::from_millis(240) && wait <= Duration::from_millis(250), "{wait:?}");
        // One very slow commit moves it by an eighth, and never past the cap.
        p.committed_in(Duration::from_secs(5));
        assert_eq!(p.batch_wait(&config), cap);
        for _ in 0..100 {
            p.committed_in(Duration::from_millis(1));
        }
        assert_eq!(p.batch_wait(&config), floor, "quick again: back to batch_wait");
        // A cap below the floor (refused by validation) still never waits less.
        let odd = CentralConfig { max_batch_wait: Duration::ZERO, ..CentralConfig::default() };
        assert_eq!(p.batch_wait(&odd), odd.batch_wait);
    }

    #[test]
    fn silence_names_how_long_central_did_not_answer() {
        let e: Error = central::Error::NoAnswer { what: "ping", after: Duration::from_secs(5) }.into();
        assert_eq!(e.to_string(), "no answer from central for 5 s (ping)");
        assert!(e.is_no_answer() && !e.is_timeout() && !e.is_data_error());
        let batch: Error = central::Error::Timeout("batch write").into();
        assert!(batch.is_timeout() && !batch.is_no_answer());
    }
}

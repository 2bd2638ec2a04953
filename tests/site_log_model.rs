//! Model-based property test of the site log: random sequences of append
//! (some with duplicate or conflicting ids), mark-forwarded (whole batches,
//! which move the watermark, and batches with a gap, which cannot), dead
//! letters and their retry and purge, replay, prune and reopen run against
//! the real writer and SQLite file, and against a `VecDeque` model. After
//! every step: no acked event lost or duplicated, pending rows in ack order,
//! `seq` strictly increasing (a new event's above every seq acked before,
//! even when retention or dead letters took the newest rows and the log
//! reopened), pruning never touches pending rows, and the
//! writer's gauges equal a scan.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use outpost::event::{Event, now_us};
use outpost::log::{self, LogHandle, WriterConfig, schema, writer};
use outpost::metrics::Metrics;
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` new events from `device`, optionally re-sending an earlier id.
    Append { device: u8, n: usize, resend: Option<usize> },
    /// A batch whose middle item reuses an id owned by another device: refused whole.
    Conflicting { n: usize },
    /// Forward the oldest `n` pending rows.
    Forward { n: usize },
    /// Forward the oldest `n` pending rows but the `skip`-th (a part of a
    /// batch: the watermark cannot move past the one left).
    ForwardGap { n: usize, skip: usize },
    /// Retention with a cutoff in the future: every forwarded row goes.
    Prune,
    /// Close the writer and open the file again.
    Reopen,
    /// Central refused the oldest pending row: it moves to the dead letters.
    DeadLetter,
    /// `outpost dead-letter purge` in another process.
    CliPurge,
    /// `outpost dead-letter retry` in another process: back in the queue.
    CliRetry,
    /// `outpost replay` of everything in another process.
    CliReplay,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1usize..8, proptest::option::of(0usize..1000)).prop_map(|(device, n, resend)| Op::Append { device, n, resend }),
        1 => (2usize..5).prop_map(|n| Op::Conflicting { n }),
        2 => (0usize..10).prop_map(|n| Op::Forward { n }),
        1 => (2usize..10, 0usize..10).prop_map(|(n, skip)| Op::ForwardGap { n, skip }),
        1 => Just(Op::Prune),
        1 => Just(Op::Reopen),
        1 => Just(Op::DeadLetter),
        1 => Just(Op::CliPurge),
        1 => Just(Op::CliRetry),
        1 => Just(Op::CliReplay),
    ]
}

struct Model {
    /// Acked, not yet forwarded, in ack order.
    pending: VecDeque<Uuid>,
    /// Forwarded, not yet pruned.
    forwarded: Vec<Uuid>,
    /// Dead letters, not yet retried or purged.
    dead: Vec<Uuid>,
    /// Every id ever acked → its device (ids are never reused).
    owners: HashMap<Uuid, String>,
    acked_order: Vec<Uuid>,
}

impl Model {
    fn in_log(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.forwarded.iter().chain(self.pending.iter()).copied()
    }

    fn position(&self, id: &Uuid) -> usize {
        self.acked_order.iter().position(|a| a == id).expect("acked")
    }

    /// Makes `ids` pending again, in their ack (= seq) order among the rest.
    fn pend(&mut self, ids: Vec<Uuid>) {
        let mut all: Vec<Uuid> = self.pending.drain(..).chain(ids).collect();
        all.sort_by_key(|id| self.position(id));
        self.pending = all.into();
    }
}

fn event(device: &str, id: Uuid) -> Event {
    Event {
        id,
        tenant: "acme".into(),
        device_id: device.into(),
        event_type: "model".into(),
        payload: "{}".into(),
        timestamp_us: now_us(),
        received_at_us: now_us(),
        origin_site: "site-a".into(),
        properties: None,
    }
}

fn start(path: &std::path::Path) -> (LogHandle, writer::WriterThread) {
    start_observed(path, Vec::new())
}

fn start_observed(
    path: &std::path::Path,
    observers: Vec<Arc<dyn log::CommitObserver>>,
) -> (LogHandle, writer::WriterThread) {
    let conn = log::open_and_migrate(path).unwrap();
    let cfg = WriterConfig {
        max_bytes: 1 << 30,
        remote_max_bytes: 1 << 28,
        site_id: "site-a".into(),
        commit_max_rows: 1000,
        commit_max_bytes: 1 << 20,
        commit_delay: std::time::Duration::ZERO,
        queue_capacity: 16,
        write_budget: 0,
        max_commit_delay: std::time::Duration::ZERO,
    };
    writer::spawn(conn, cfg, Arc::new(Metrics::new()), Arc::new(tokio::sync::Notify::new()), observers).unwrap()
}

/// An observer slow to take a commit: it records what it was told only
/// after a pause, so an answer sent before the observers ran is caught.
struct Slow(std::sync::Mutex<Vec<Uuid>>);

impl log::CommitObserver for Slow {
    fn committed(&self, events: &[log::Committed]) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.0.lock().unwrap().extend(events.iter().map(|c| c.event.id));
    }
}

/// Whoever is answered can count on the observers having the event: a
/// retained MQTT message is set, and a client that subscribes once acked
/// is not sent it as a live message (tests/mqtt_protocol.rs failed at
/// random on that while observers ran after the answers).
#[tokio::test]
async fn observers_have_an_event_before_its_append_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Arc::new(Slow(std::sync::Mutex::default()));
    let (handle, thread) = start_observed(&dir.path().join("log.sqlite"), vec![slow.clone()]);
    for _ in 0..3 {
        let id = Uuid::new_v4();
        handle.append(vec![event("d1", id)]).await.unwrap();
        assert!(slow.0.lock().unwrap().contains(&id), "answered before the observers had {id}");
    }
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sqlite");
    let (mut handle, mut thread) = start(&path);
    let mut m = Model {
        pending: VecDeque::new(),
        forwarded: Vec::new(),
        dead: Vec::new(),
        owners: HashMap::new(),
        acked_order: Vec::new(),
    };
    // The highest seq acked so far: a new event's is above it, even after
    // retention, dead letters and purges emptied the log and it reopened.
    let mut high = 0;
    for op in ops {
        match op {
            Op::Append { device, n, resend } => {
                let dev = format!("d{device}");
                let mut events: Vec<Event> = (0..n).map(|_| event(&dev, Uuid::now_v7())).collect();
                // Re-send an id this device had acked and the log still holds: a
                // duplicate, not a new row. (Once retention pruned an id, a resend
                // is a new row; the central ON CONFLICT catches that one.)
                let own: Vec<Uuid> = m.in_log().filter(|id| m.owners[id] == dev).collect();
                let resent = resend.filter(|_| !own.is_empty()).map(|i| own[i % own.len()]);
                if let Some(id) = resent {
                    events.insert(n / 2, event(&dev, id));
                }
                let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                let out = handle.append(events).await.unwrap();
                prop_assert_eq!(out.len(), ids.len());
                for (a, id) in out.iter().zip(&ids) {
                    prop_assert_eq!(a.id, *id);
                    prop_assert_eq!(a.duplicate, Some(*id) == resent);
                    if !a.duplicate {
                        prop_assert!(a.seq > high, "seq {} given again (highest acked {high})", a.seq);
                        high = a.seq;
                        m.pending.push_back(*id);
                        m.owners.insert(*id, dev.clone());
                        m.acked_order.push(*id);
                    }
                }
            }
            Op::Conflicting { n } => {
                let Some(taken) = m.in_log().next() else {
                    continue;
                };
                let thief = if m.owners[&taken] == "d9" { "d8" } else { "d9" };
                let mut events: Vec<Event> = (0..n).map(|_| event(thief, Uuid::now_v7())).collect();
                events[n / 2].id = taken;
                let err = handle.append(events).await.unwrap_err();
                prop_assert!(matches!(err, log::Error::IdConflict { index, .. } if index == n / 2), "{err}");
            }
            Op::Forward { n } => {
                let readers = log::Readers::new(path.clone());
                let batch = readers.with(move |c| schema::pending(c, n)).await.unwrap();
                let seqs: Vec<i64> = batch.iter().map(|e| e.seq).collect();
                let changed = handle.mark_forwarded(seqs).await.unwrap();
                prop_assert_eq!(changed, batch.len());
                for e in batch {
                    prop_assert_eq!(Some(e.id), m.pending.pop_front(), "forwarded out of order");
                    m.forwarded.push(e.id);
                }
            }
            Op::ForwardGap { n, skip } => {
                let readers = log::Readers::new(path.clone());
                let batch = readers.with(move |c| schema::pending(c, n)).await.unwrap();
                if batch.len() < 2 {
                    continue;
                }
                let skip = skip % batch.len();
                let sent: Vec<_> = batch.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, e)| e).collect();
                let changed = handle.mark_forwarded(sent.iter().map(|e| e.seq).collect()).await.unwrap();
                prop_assert_eq!(changed, sent.len());
                for e in sent {
                    m.pending.retain(|id| *id != e.id);
                    m.forwarded.push(e.id);
                }
            }
            Op::Prune => {
                // Forwarded rows go, up to the first pending row: retention
                // walks seq and stops there.
                let n = handle.prune(now_us() + 3_600_000_000, 1_000_000).await.unwrap();
                let first_pending = m.pending.front().map_or(usize::MAX, |id| m.position(id));
                let (gone, kept): (Vec<Uuid>, Vec<Uuid>) =
                    m.forwarded.iter().partition(|id| m.position(id) < first_pending);
                prop_assert_eq!(n, gone.len());
                m.forwarded = kept;
            }
            Op::DeadLetter => {
                let readers = log::Readers::new(path.clone());
                let Some(e) = readers.with(|c| schema::pending(c, 1)).await.unwrap().pop() else { continue };
                prop_assert_eq!(handle.dead_letter(e.seq, "refused".into()).await.unwrap(), 1);
                prop_assert_eq!(Some(e.id), m.pending.pop_front());
                m.dead.push(e.id);
            }
            Op::CliPurge => {
                let conn = log::open(&path, false).unwrap();
                schema::purge_dead_letters(&conn, None).unwrap();
                m.dead.clear();
                // The writer notices at its next group and counts again.
                handle.ping().await.unwrap();
            }
            Op::CliRetry => {
                let conn = log::open(&path, false).unwrap();
                prop_assert_eq!(schema::retry_dead_letters(&conn, None).unwrap(), m.dead.len());
                let back = std::mem::take(&mut m.dead);
                m.pend(back);
                handle.ping().await.unwrap();
            }
            Op::CliReplay => {
                let conn = log::open(&path, false).unwrap();
                let (n, _) = schema::replay_chunk(&conn, "site-a", 0, i64::MAX, None, 0, 1_000_000).unwrap();
                prop_assert_eq!(n, m.forwarded.len());
                let back = std::mem::take(&mut m.forwarded);
                m.pend(back);
                handle.ping().await.unwrap();
            }
            Op::Reopen => {
                drop(handle);
                tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
                (handle, thread) = start(&path);
            }
        }
        // Invariants against the file itself.
        let conn = log::open(&path, true).unwrap();
        let rows = schema::all_events(&conn).unwrap();
        prop_assert_eq!(
            handle.counters(),
            schema::scan(&conn, Some("site-a")).unwrap(),
            "the writer's gauges equal a scan"
        );
        prop_assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq), "seq not increasing");
        let expected: Vec<Uuid> = m.forwarded.iter().chain(m.pending.iter()).copied().collect();
        let mut in_log: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let mut want = expected.clone();
        in_log.sort();
        want.sort();
        prop_assert_eq!(in_log, want, "log rows differ from the model");
        let pending: Vec<Uuid> = rows.iter().filter(|r| r.forwarded_at.is_none()).map(|r| r.id).collect();
        prop_assert_eq!(pending, m.pending.iter().copied().collect::<Vec<_>>(), "pending order");
        prop_assert!(rows.iter().filter(|r| r.forwarded_at.is_some()).all(|r| m.forwarded.contains(&r.id)));
    }
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // Where proptest writes shrunk failures for this file, so they re-run first.
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_acked_event_is_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}

/// Flash wear at a trickle (issue #29): a commit of one event appends to the
/// WAL only the pages it changed. It was 4 pages: the table's last leaf, the
/// id index's, the pending index's and `sqlite_sequence` (`AUTOINCREMENT`);
/// now 2, the table's and the id index's (migration 10). Counted from the
/// WAL file's growth over single-event commits (the median: a leaf split
/// adds pages to some).
#[tokio::test]
async fn a_one_event_commit_appends_two_pages_to_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sqlite");
    let (handle, thread) = start(&path);
    let wal = dir.path().join("log.sqlite-wal");
    let frame = (log::PAGE_SIZE + 24) as u64;
    for _ in 0..50 {
        handle.append(vec![event("d1", Uuid::now_v7())]).await.unwrap();
    }
    let mut frames = Vec::new();
    for i in 0..41 {
        let before = std::fs::metadata(&wal).unwrap().len();
        handle.append(vec![event(&format!("d{}", i % 20), Uuid::now_v7())]).await.unwrap();
        let grown = std::fs::metadata(&wal).unwrap().len() - before;
        assert_eq!(grown % frame, 0, "the WAL grows by whole frames");
        frames.push(grown / frame);
    }
    frames.sort_unstable();
    assert_eq!(frames[frames.len() / 2], 2, "pages per one-event commit: {frames:?}");
    drop(handle);
    thread.join();
}

//! A site log written by the v1 code (before the forwarding watermark of
//! migration 7) is carried forward with its pending events.
//!
//! `tests/fixtures/site-log-v1.sqlite` was written by the release binary of
//! commit e13787e with `tests/fixtures/make-site-log-v1.sh`: six events of
//! `acme/pump-1` (payload `{"i": n}`, seq n). 1-4 were forwarded to a real
//! PostgreSQL, then `outpost replay` made 1 and 2 pending again, and 5 and 6
//! arrived with no uplink. So pending rows (1, 2) come before forwarded ones
//! (3, 4), which v1 could hold and the watermark alone cannot say.

use std::sync::Arc;

use outpost::event::{Event, now_us};
use outpost::log::mqtt::{self, Redelivery};
use outpost::log::{self, WriterConfig, schema, writer};
use outpost::metrics::Metrics;

/// The writer's limits in these tests: none that they reach.
fn writer_config(site_id: &str) -> WriterConfig {
    WriterConfig {
        max_bytes: 1 << 30,
        remote_max_bytes: 1 << 28,
        site_id: site_id.into(),
        commit_max_rows: 1000,
        commit_max_bytes: 1 << 20,
        commit_delay: std::time::Duration::ZERO,
        queue_capacity: 16,
        write_budget: 0,
        max_commit_delay: std::time::Duration::ZERO,
    }
}

/// An event of `acme/<device>` received now at site-a.
fn event(device: &str, event_type: &str, payload: &str) -> Event {
    Event {
        id: uuid::Uuid::now_v7(),
        tenant: "acme".into(),
        device_id: device.into(),
        event_type: event_type.into(),
        payload: payload.into(),
        timestamp_us: now_us(),
        received_at_us: now_us(),
        origin_site: "site-a".into(),
        properties: None,
    }
}

fn payload_i(e: &outpost::event::StoredEvent) -> i64 {
    serde_json::from_str::<serde_json::Value>(e.payload.get()).unwrap()["i"].as_i64().unwrap()
}

#[tokio::test]
async fn a_v1_log_keeps_its_pending_events_in_order_and_forwards_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site-log.sqlite");
    std::fs::copy("tests/fixtures/site-log-v1.sqlite", &path).unwrap();
    let conn = log::open_and_migrate(&path).unwrap();
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    assert_eq!(page_size, 4096, "an existing log keeps its page size");
    // Migration 10 edits the table's declared SQL in place (no copy).
    let sql: String = conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'events'", [], |r| r.get(0)).unwrap();
    assert!(sql.contains("seq          INTEGER PRIMARY KEY,") && !sql.contains("AUTOINCREMENT"), "{sql}");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");

    let pending: Vec<i64> = schema::pending(&conn, 100).unwrap().iter().map(payload_i).collect();
    assert_eq!(pending, [1, 2, 5, 6], "v1's pending rows, in seq order");
    let rows = schema::all_events(&conn).unwrap();
    let forwarded: Vec<i64> = rows.iter().filter(|e| e.forwarded_at.is_some()).map(payload_i).collect();
    assert_eq!(forwarded, [3, 4], "v1's forwarded rows keep their time");
    let counted = schema::scan(&conn, Some("fixture-site")).unwrap();
    assert_eq!((counted.backlog_rows, counted.total_rows, counted.last_seq), (4, 6, 6));
    assert_eq!(schema::watermark(&conn).unwrap(), 0, "the watermark starts below the first pending row");

    // The forwarder sends the four; one mark moves the watermark past all six.
    let cfg = writer_config("fixture-site");
    let (handle, thread) =
        writer::spawn(conn, cfg, Arc::new(Metrics::new()), Arc::new(tokio::sync::Notify::new()), Vec::new()).unwrap();
    let seqs: Vec<i64> = rows.iter().filter(|e| e.forwarded_at.is_none()).map(|e| e.seq).collect();
    assert_eq!(handle.mark_forwarded(seqs).await.unwrap(), 4);
    assert_eq!(handle.counters().backlog_rows, 0);
    let check = log::open(&path, true).unwrap();
    assert!(schema::pending(&check, 100).unwrap().is_empty());
    assert_eq!(schema::watermark(&check).unwrap(), 6);
    assert!(schema::all_events(&check).unwrap().iter().all(|e| e.forwarded_at.is_some()));
    // Retention takes all six once they are old enough; new events follow
    // on, also after a restart (no seq is given twice).
    assert_eq!(handle.prune(now_us() + 3_600_000_000, 1000).await.unwrap(), 6);
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
    let conn = log::open_and_migrate(&path).unwrap();
    let (handle, thread) = writer::spawn(
        conn,
        writer_config("fixture-site"),
        Arc::new(Metrics::new()),
        Arc::new(tokio::sync::Notify::new()),
        Vec::new(),
    )
    .unwrap();
    let next = handle.append(vec![event("pump-1", "after", r#"{"i": 7}"#)]).await.unwrap();
    assert_eq!(next[0].seq, 7, "after a log emptied by retention, seqs go on");
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
}

#[test]
fn a_new_log_uses_small_pages() {
    let dir = tempfile::tempdir().unwrap();
    let conn = log::open_and_migrate(&dir.path().join("new.sqlite")).unwrap();
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    assert_eq!(page_size, log::PAGE_SIZE);
    let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(journal, "wal");
}

/// The writer checkpoints the WAL itself (after answering the group that
/// filled it, not inside its commit): the WAL starts over instead of
/// growing with every event, and each checkpoint shows in /metrics.
#[tokio::test]
async fn the_writer_checkpoints_the_wal_once_it_holds_4_mib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site-log.sqlite");
    let conn = log::open_and_migrate(&path).unwrap();
    let cfg = writer_config("site-a");
    let metrics = Arc::new(Metrics::new());
    let (handle, thread) =
        writer::spawn(conn, cfg, metrics.clone(), Arc::new(tokio::sync::Notify::new()), Vec::new()).unwrap();
    // 12 MiB of events in 100-event groups: three times the checkpoint size.
    let payload = format!(r#"{{"pad": "{}"}}"#, "x".repeat(1000));
    for _ in 0..120 {
        let events = (0..100).map(|_| event("pump-1", "wal", &payload)).collect();
        handle.append(events).await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("site-log.sqlite-wal")).unwrap().len();
    assert!(wal < 6 << 20, "the WAL started over after its checkpoints: {wal} bytes");
    let rendered = metrics.render();
    let count = rendered
        .lines()
        .find_map(|l| l.strip_prefix("outpost_log_checkpoint_duration_seconds_count "))
        .map(|n| n.parse::<f64>().unwrap())
        .unwrap_or_else(|| panic!("no checkpoint histogram in:\n{rendered}"));
    assert!(count >= 2.0, "12 MiB of WAL took at least two checkpoints, counted {count}");
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
}

/// Migration 8 replaces the per-device MQTT index with a chain: a log
/// written before it keeps its DUP=1 window. Built here with migrations 1-7
/// (the code of that time) and MQTT rows of two devices, interleaved.
#[test]
fn a_log_from_before_the_mqtt_chain_keeps_its_redelivery_window() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site-log.sqlite");
    let mut conn = log::open(&path, false).unwrap();
    schema::migrations().to_version(&mut conn, 7).unwrap();
    let now = now_us();
    // seq 1-6: d1 pkids 10, 11, 12 and d2 pkids 10, 11, 12, alternating;
    // seq 7: an HTTP event of d1 (no packet id).
    for (i, (device, pkid)) in
        [("d1", 10), ("d2", 10), ("d1", 11), ("d2", 11), ("d1", 12), ("d2", 12)].iter().enumerate()
    {
        conn.execute(
            "INSERT INTO events (id, tenant, device_id, event_type, payload, ts, received_at, origin_site, mqtt_pkid, mqtt_digest)
             VALUES (?1, 'acme', ?2, 't', '{}', ?3, ?3, 'site-a', ?4, ?5)",
            rusqlite::params![uuid::Uuid::now_v7().as_bytes(), device, now, pkid, 100 + i as i64],
        )
        .unwrap();
    }
    conn.execute(
        "INSERT INTO events (id, tenant, device_id, event_type, payload, ts, received_at, origin_site)
         VALUES (?1, 'acme', 'd1', 't', '{}', ?2, ?2, 'site-a')",
        rusqlite::params![uuid::Uuid::now_v7().as_bytes(), now],
    )
    .unwrap();
    drop(conn);

    let conn = log::open_and_migrate(&path).unwrap();
    let (mut heads, upto) = mqtt::mqtt_heads(&conn).unwrap();
    heads.sort();
    assert_eq!(heads, [("acme".into(), "d1".into(), 5), ("acme".into(), "d2".into(), 6)]);
    assert_eq!(upto, 7, "the heads are complete up to the last row");
    let chain: Vec<Option<i64>> = conn
        .prepare("SELECT mqtt_prev FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(chain, [None, None, Some(1), Some(2), Some(3), Some(4), None]);
    // d1's first event (pkid 10, digest 100) is found behind its two newer ones.
    let found = |device: &str, pkid: u16, digest: i64, head: i64| {
        let e = event(device, "t", "{}");
        let r = Redelivery { pkid, digest, check: true };
        mqtt::find_redelivered(&conn, &e, &r, Some(head)).unwrap().map(|(seq, _)| seq)
    };
    assert_eq!(found("d1", 10, 100, 5), Some(1));
    assert_eq!(found("d2", 11, 103, 6), Some(4));
    assert_eq!(found("d1", 10, 999, 5), None, "another payload is a new event");
    assert_eq!(found("d1", 10, 101, 5), None, "d2's event is not d1's");
}

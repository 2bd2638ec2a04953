//! The real binary, killed. SIGKILL while clients post concurrently must lose
//! no event that got a 201 and store none twice; SIGTERM must drain in-flight
//! requests and exit 0.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Proc, cli, log_rows};
use serde_json::json;

/// Registers `n` devices through the CLI (the appliance may be down).
fn add_devices(dir: &std::path::Path, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("dev-{i}");
            let (ok, out, err) = cli(dir, &["device", "add", "--tenant", "acme", "--id", &id]);
            assert!(ok, "{err}");
            (id, out.trim().to_string())
        })
        .collect()
}

/// Clients post until `stop`; each records the ids that got 201, in order.
fn spawn_clients(
    base: String,
    devices: &[(String, String)],
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, i64)>>> {
    devices
        .iter()
        .cloned()
        .map(|(dev, token)| {
            let (base, stop, acked_count) = (base.clone(), stop.clone(), acked_count.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut acked = Vec::new();
                let mut n: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = uuid::Uuid::new_v4().to_string();
                    let body = json!({"device_id": dev, "event_type": "crash.test", "payload": {"n": n}, "id": id});
                    match client
                        .post(format!("{base}/api/v1/realtime/acme/event"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => {
                            acked.push((id, n));
                            acked_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("unexpected {}: {}", r.status(), r.text().await.unwrap_or_default()),
                        // The appliance died under us: this event was not acked.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acked_event_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    let devices = add_devices(dir.path(), 8);
    let env = [
        ("OUTPOST_LIMITS__PER_SECOND", "100000"),
        ("OUTPOST_LIMITS__PER_MINUTE", "1000000"),
        ("OUTPOST_LIMITS__PER_HOUR", "10000000"),
    ];
    let mut all_acked: Vec<(String, String, i64)> = Vec::new();
    // Kill points: right after start, after a few acks, and deep into load.
    for (round, kill_after) in [1usize, 50, 300, 1000, 7].into_iter().enumerate() {
        let proc = Proc::start(dir.path(), &env);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let tasks = spawn_clients(proc.base(), &devices, stop.clone(), count.clone());
        let reached = common::eventually(Duration::from_secs(60), || {
            let c = count.clone();
            async move { c.load(Ordering::Relaxed) >= kill_after }
        })
        .await;
        assert!(reached, "round {round}: only {} acks", count.load(Ordering::Relaxed));
        proc.kill9();
        stop.store(true, Ordering::Relaxed);
        for (t, (dev, _)) in tasks.into_iter().zip(&devices) {
            for (id, n) in t.await.unwrap() {
                all_acked.push((dev.clone(), id, n));
            }
        }
        // After each kill: every acked event is in the log, exactly once.
        let rows = log_rows(&dir.path().join("site-log.sqlite"));
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in &rows {
            *seen.entry(r.id.to_string()).or_default() += 1;
        }
        assert!(seen.values().all(|c| *c == 1), "round {round}: duplicated rows");
        let missing: Vec<_> = all_acked.iter().filter(|(_, id, _)| !seen.contains_key(id)).collect();
        assert!(missing.is_empty(), "round {round}: {} acked events lost, e.g. {:?}", missing.len(), missing.first());
        // Per device, acked events appear in the log in the order they were acked.
        for (dev, _) in &devices {
            let acked_ids: Vec<&str> =
                all_acked.iter().filter(|(d, _, _)| d == dev).map(|(_, id, _)| id.as_str()).collect();
            let acked_set: HashSet<&str> = acked_ids.iter().copied().collect();
            let log_order: Vec<String> = rows
                .iter()
                .filter(|r| &r.device_id == dev)
                .map(|r| r.id.to_string())
                .filter(|id| acked_set.contains(id.as_str()))
                .collect();
            assert_eq!(log_order, acked_ids, "round {round}: order of {dev}");
        }
    }
    assert!(all_acked.len() >= 1300, "{} acked in total", all_acked.len());
    // A clean start after all that: the log is consistent and serves.
    let proc = Proc::start(dir.path(), &env);
    let r = reqwest::get(format!("{}/readyz", proc.base())).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(proc.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let devices = add_devices(dir.path(), 4);
    let env = [("OUTPOST_LIMITS__PER_SECOND", "100000"), ("OUTPOST_LIMITS__PER_MINUTE", "1000000")];
    let proc = Proc::start(dir.path(), &env);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let tasks = spawn_clients(proc.base(), &devices, stop.clone(), count.clone());
    let c2 = count.clone();
    assert!(
        common::eventually(Duration::from_secs(30), || {
            let c = c2.clone();
            async move { c.load(Ordering::Relaxed) >= 200 }
        })
        .await
    );
    let status = tokio::task::spawn_blocking(move || proc.terminate()).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(status.code(), Some(0), "SIGTERM exit status");
    let mut acked = 0;
    let rows = log_rows(&dir.path().join("site-log.sqlite"));
    let stored: HashSet<String> = rows.iter().map(|r| r.id.to_string()).collect();
    for t in tasks {
        for (id, _) in t.await.unwrap() {
            assert!(stored.contains(&id), "acked {id} missing after SIGTERM");
            acked += 1;
        }
    }
    assert!(acked >= 200);
}

//! Offline-to-online: the site keeps accepting while the central PostgreSQL
//! is down, partitioned or crashing, and once it is back every acked event is
//! there exactly once, in per-device order. Real PostgreSQL (initdb + pg_ctl),
//! a real TCP fault proxy, the real appliance.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::pg::Pg;
use common::proxy::{Mode, Proxy};
use common::{Proc, TestApp, assert_exactly_once, central, central_count, central_rows, cli, cli_env, eventually};
use outpost::config::{NotifyMode, TlsMode};
use serde_json::{Value, json};

const DRAIN: Duration = Duration::from_secs(120);

/// Posts `n` events for `device` in batches; returns the acked ids in order.
async fn ingest(app: &TestApp, token: &str, device: &str, n: usize, batch: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let items: Vec<Value> = (i..(i + batch).min(n))
            .map(|k| json!({"device_id": device, "event_type": "reading", "payload": {"k": k}}))
            .collect();
        let r = app.post("/api/v1/realtime/acme/events", Some(token), &json!(items)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        ids.extend(r.body["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()));
        i += batch;
    }
    ids
}

/// Waits until nothing is pending locally and the central count is `n`.
async fn wait_drained(app: &TestApp, pg: &Pg, n: usize) {
    let ok = eventually(DRAIN, || async { app.pending() == 0 && central_count(pg).await == n as i64 }).await;
    assert!(ok, "not drained: {} pending locally, {} central, want {n}", app.pending(), central_count(pg).await);
}

async fn uplink_state(app: &TestApp) -> String {
    let s = app.get("/api/v1/status", None).await;
    s.body["uplink"]["state"].as_str().unwrap_or_default().to_string()
}

/// Forwards `n` single events one batch at a time (each waits until
/// central has it) and returns how often central parsed the insert.
async fn parses_of_the_insert(prepared: Option<bool>, n: usize) -> usize {
    let pg = Pg::start_logging_statements();
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        c.central.batch_wait = Duration::from_millis(1);
        c.central.prepared_statements = prepared;
    })
    .await;
    let token = app.device("acme", "d1").await;
    for k in 0..n {
        ingest(&app, &token, "d1", 1, 1).await;
        wait_drained(&app, &pg, k + 1).await;
    }
    // The insert's first line (`WITH ins AS (`) follows the step's name.
    pg.server_log().lines().filter(|l| l.contains(" parse ") && l.ends_with("WITH ins AS (")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_parses_its_insert_once_per_connection_unless_told_it_is_behind_a_pooler() {
    // Parsed and planned once, then only bound and executed: for batches of
    // a row or two, planning was most of what central spent per event.
    assert_eq!(parses_of_the_insert(None, 12).await, 1);
    // Off (a transaction pooler before PgBouncer 1.21): every batch is one
    // unnamed statement, parsed each time.
    assert_eq!(parses_of_the_insert(Some(false), 12).await, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_from_the_start_then_50000_events_arrive_exactly_once() {
    let pg = Pg::init(); // not running yet
    let app = TestApp::start_with(|c| central(c, &pg.url())).await;
    let mut acked = HashMap::new();
    for d in 0..4 {
        let dev = format!("dev-{d}");
        let token = app.device("acme", &dev).await;
        acked.insert(dev.clone(), ingest(&app, &token, &dev, 12_500, 500).await);
    }
    assert_eq!(app.pending(), 50_000, "everything is buffered while central is down");
    assert!(eventually(Duration::from_secs(10), || async { uplink_state(&app).await == "down" }).await);
    let s = app.get("/api/v1/status", None).await;
    assert!(s.body["uplink"]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{}", s.text);
    pg.up();
    wait_drained(&app, &pg, 50_000).await;
    assert_exactly_once(&central_rows(&pg).await, &acked);
    assert_eq!(uplink_state(&app).await, "up");
    // Log gauges are computed at most every 2 s (status cache).
    let settled = eventually(Duration::from_secs(5), || async {
        let m = app.get("/metrics", None).await.text;
        m.contains("outpost_forwarded_rows_total 50000") && m.contains("outpost_backlog_rows 0")
    })
    .await;
    assert!(settled, "{}", app.get("/metrics", None).await.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_stream_several_times_loses_and_duplicates_nothing() {
    let pg = Pg::start();
    let app = Arc::new(TestApp::start_with(|c| central(c, &pg.url())).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for d in 0..3 {
        let dev = format!("dev-{d}");
        let token = app.device("acme", &dev).await;
        let (app, stop) = (app.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                ids.extend(ingest(&app, &token, &dev, 50, 50).await);
            }
            (dev, ids)
        }));
    }
    for round in 0..3 {
        let before = central_count(&pg).await.max(0);
        assert!(
            eventually(Duration::from_secs(30), || async { central_count(&pg).await > before + 100 }).await,
            "round {round}: central did not grow"
        );
        pg.kill();
        // Ingest goes on while central is gone; the forwarder notices.
        let pending_at_kill = app.pending();
        assert!(eventually(Duration::from_secs(20), || async { uplink_state(&app).await == "down" }).await);
        assert!(eventually(Duration::from_secs(20), || async { app.pending() > pending_at_kill + 100 }).await);
        pg.up();
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashMap::new();
    for t in tasks {
        let (dev, ids) = t.await.unwrap();
        acked.insert(dev, ids);
    }
    let total: usize = acked.values().map(Vec::len).sum();
    wait_drained(&app, &pg, total).await;
    assert_exactly_once(&central_rows(&pg).await, &acked);
    let m = app.get("/metrics", None).await.text;
    assert!(!m.contains("outpost_forward_retries_total 0\n"), "retries were counted: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_reset_and_refused_partitions_recover_when_healed() {
    let pg = Pg::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let app = TestApp::start_with(|c| {
        central(c, &url);
        c.central.statement_timeout = Duration::from_secs(1);
        c.central.keepalive_idle = Duration::from_secs(1);
    })
    .await;
    let token = app.device("acme", "d1").await;
    let mut ids = ingest(&app, &token, "d1", 500, 100).await;
    wait_drained(&app, &pg, ids.len()).await;
    for mode in [Mode::Blackhole, Mode::Reset, Mode::Refuse] {
        proxy.set(mode);
        ids.extend(ingest(&app, &token, "d1", 2000, 100).await);
        // Noticed in seconds (timeouts, keepalives), not hours.
        let noticed = eventually(Duration::from_secs(20), || async { uplink_state(&app).await == "down" }).await;
        assert!(noticed, "{mode:?} not noticed: uplink {}", uplink_state(&app).await);
        assert!(app.pending() > 0, "{mode:?}: rows stay pending while partitioned");
        proxy.set(Mode::Pass);
        wait_drained(&app, &pg, ids.len()).await;
    }
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), ids)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_central_commit_before_local_mark_resends_without_duplicates() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let url = pg.url();
    let env = [
        ("OUTPOST_CENTRAL__URL", url.as_str()),
        ("OUTPOST_CENTRAL__TLS", "disable"),
        ("OUTPOST_CENTRAL__BATCH_WAIT", "500ms"),
        ("OUTPOST_LIMITS__PER_SECOND", "100000"),
        ("OUTPOST_LIMITS__PER_MINUTE", "1000000"),
        ("OUTPOST_LIMITS__PER_HOUR", "10000000"),
    ];
    let mut with_failpoint = env.to_vec();
    with_failpoint.push(("OUTPOST_FAILPOINT", "after_central_commit"));
    let mut proc = Proc::start(dir.path(), &with_failpoint);
    let client = reqwest::Client::new();
    let items: Vec<Value> =
        (0..1000).map(|k| json!({"device_id": "d1", "event_type": "reading", "payload": {"k": k}})).collect();
    let r = client
        .post(format!("{}/api/v1/realtime/acme/events", proc.base()))
        .bearer_auth(&token)
        .json(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let acked: Vec<String> =
        body["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect();
    let status = proc.wait_exit(Duration::from_secs(30)).expect("failpoint did not fire");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Central has the batch; the site log never learned it was forwarded.
    assert_eq!(central_count(&pg).await, 1000);
    let conn = outpost::log::open(&dir.path().join("site-log.sqlite"), true).unwrap();
    assert_eq!(outpost::log::schema::status(&conn, 0).unwrap().backlog_rows, 1000);
    drop(conn);
    drop(proc);
    // Restart: the batch is sent again and ignored centrally.
    let proc = Proc::start(dir.path(), &env);
    let drained = eventually(DRAIN, || async {
        let conn = outpost::log::open(&dir.path().join("site-log.sqlite"), true).unwrap();
        outpost::log::schema::status(&conn, 0).unwrap().backlog_rows == 0
    })
    .await;
    assert!(drained);
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), acked)]));
    assert_eq!(proc.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_go_to_dead_letters_while_neighbours_arrive() {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| central(c, &pg.url())).await;
    let token = app.device("acme", "d1").await;
    // What only the server knows: ingest refuses whatever jsonb would (\u0000
    // and the like), so the poison here is a central CHECK constraint (23514).
    let warm_up = json!({"device_id": "d1", "event_type": "reading", "payload": {"k": -1}});
    let first = app.post("/api/v1/realtime/acme/event", Some(&token), &warm_up).await;
    assert_eq!(first.status, 201);
    wait_drained(&app, &pg, 1).await;
    pg.exec("ALTER TABLE tenant_acme.events ADD CONSTRAINT only_the_server_knows CHECK (NOT payload ? 'bad')").await;
    let items: Vec<Value> = (0..20)
        .map(|k| {
            let payload = if k == 7 { json!({"bad": "poison"}) } else { json!({"k": k}) };
            json!({"device_id": "d1", "event_type": "reading", "payload": payload})
        })
        .collect();
    let r = app.post("/api/v1/realtime/acme/events", Some(&token), &json!(items)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let ids: Vec<String> =
        r.body["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect();
    wait_drained(&app, &pg, 20).await;
    let mut good = ids.clone();
    let poison = good.remove(7);
    good.insert(0, first.body["id"].as_str().unwrap().to_string());
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), good.clone())]));
    let (ok, out, _) = cli(app.dir.path(), &["dead-letter", "list"]);
    assert!(ok);
    assert!(out.contains(&poison) && out.contains("23514"), "{out}");
    // A column too narrow centrally (22001) is a data error too.
    pg.exec("ALTER TABLE tenant_acme.events ALTER COLUMN event_type TYPE varchar(10)").await;
    let r = app
        .post(
            "/api/v1/realtime/acme/events",
            Some(&token),
            &json!([{"device_id": "d1", "event_type": "short", "payload": {}},
                    {"device_id": "d1", "event_type": "much.too.long.for.ten", "payload": {}},
                    {"device_id": "d1", "event_type": "short", "payload": {}}]),
        )
        .await;
    assert_eq!(r.status, 201);
    wait_drained(&app, &pg, 22).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.get("/api/v1/status", None).await.body["log"]["dead_letters"] == 2
        })
        .await
    );
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_dead_letters_total 2"), "{m}");
    // Retry puts them back; they fail again and return to dead letters.
    let (ok, out, _) = cli(app.dir.path(), &["dead-letter", "retry", "--all"]);
    assert!(ok && out.contains("2 dead letter(s) back"), "{out}");
    assert!(eventually(Duration::from_secs(20), || async { app.pending() == 0 }).await);
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.get("/api/v1/status", None).await.body["log"]["dead_letters"] == 2
        })
        .await
    );
    let (ok, out, _) = cli(app.dir.path(), &["dead-letter", "purge", "--all"]);
    assert!(ok && out.contains("2 dead letter(s) purged"), "{out}");
    let (ok, _, err) = cli(app.dir.path(), &["dead-letter", "purge"]);
    assert!(!ok && err.contains("--all"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_into_one_tenant_plus_replay_stay_exactly_once() {
    let pg = Pg::start();
    let a = TestApp::start_with(|c| central(c, &pg.url())).await;
    let b = TestApp::start_with(|c| {
        central(c, &pg.url());
        c.site.id = Some("site-b".into());
    })
    .await;
    let ta = a.device("acme", "a1").await;
    let tb = b.device("acme", "b1").await;
    let (ia, ib) = tokio::join!(ingest(&a, &ta, "a1", 5000, 250), ingest(&b, &tb, "b1", 5000, 250));
    assert!(eventually(DRAIN, || async { a.pending() == 0 && b.pending() == 0 }).await);
    assert_eq!(central_count(&pg).await, 10_000);
    // Replay the last hour of site A: everything is sent again, nothing doubles.
    let (ok, out, err) = cli(a.dir.path(), &["replay", "--since", "1h"]);
    assert!(ok, "{err}");
    assert!(out.contains("5000 events"), "{out}");
    assert!(a.pending() > 0 || central_count(&pg).await == 10_000);
    assert!(eventually(DRAIN, || async { a.pending() == 0 }).await);
    let rows = central_rows(&pg).await;
    assert_exactly_once(&rows, &HashMap::from([("a1".to_string(), ia), ("b1".to_string(), ib)]));
    let sites: HashSet<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(sites, HashSet::from(["site-a", "site-b"]));
    // Each site keeps its row in `sites`, at the last seq it committed.
    let c = pg.client().await;
    for site in ["site-a", "site-b"] {
        let last: i64 =
            c.query_one("SELECT last_seq FROM tenant_acme.sites WHERE site_id = $1", &[&site]).await.unwrap().get(0);
        let max = rows.iter().filter(|r| r.2 == site).map(|r| r.3).max().unwrap();
        assert_eq!(last, max, "{site}");
    }
    let (ok, _, err) = cli(a.dir.path(), &["replay", "--since", "yesterday-ish"]);
    assert!(!ok && err.contains("--since"), "{err}");
}

/// LISTENs on `channel`; notifications arrive on the receiver while the
/// returned client lives.
async fn listen(pg: &Pg, channel: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = msg {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
    (client, rx)
}

async fn notifications_in_mode(mode: NotifyMode) -> (Vec<Value>, Vec<String>) {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        c.central.notify = mode;
    })
    .await;
    let token = app.device("acme", "d1").await;
    // The schema exists once the forwarder has connected and migrated.
    assert!(eventually(Duration::from_secs(20), || async { central_count(&pg).await == 0 }).await);
    let (_listener, mut rx) = listen(&pg, "tenant_acme_events").await;
    let ids = ingest(&app, &token, "d1", 10, 10).await;
    wait_drained(&app, &pg, 10).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got.push(serde_json::from_str::<Value>(&p).unwrap());
        let covered = match mode {
            NotifyMode::PerRow => got.len() >= 10,
            NotifyMode::PerBatch => got.iter().map(|v| v["count"].as_i64().unwrap_or(0)).sum::<i64>() >= 10,
        };
        if covered {
            break;
        }
    }
    (got, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_row_trigger_notifies_each_forwarded_event() {
    let (got, ids) = notifications_in_mode(NotifyMode::PerRow).await;
    let ids_seen: Vec<&str> = got.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids_seen, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for v in &got {
        assert_eq!(v["device_id"], "d1");
        assert_eq!(v["event_type"], "reading");
        assert!(v["timestamp"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_batch_trigger_notifies_once_per_statement_with_the_seq_range() {
    let (got, _) = notifications_in_mode(NotifyMode::PerBatch).await;
    assert!(!got.is_empty());
    assert!(got.len() <= 10);
    let total: i64 = got.iter().map(|v| v["count"].as_i64().unwrap()).sum();
    assert_eq!(total, 10);
    for v in &got {
        assert_eq!(v["site_id"], "site-a");
        assert!(v["first_seq"].as_i64().unwrap() <= v["last_seq"].as_i64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_central_is_idempotent_and_safe_from_many_sites_at_once() {
    let pg = Pg::start();
    let url = pg.url();
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let handles: Vec<_> = dirs
        .iter()
        .map(|d| {
            let (p, url) = (d.path().to_path_buf(), url.clone());
            std::thread::spawn(move || {
                cli_env(
                    &p,
                    &["migrate", "--central", "--tenant", "acme", "--tenant", "globex"],
                    &[("OUTPOST_CENTRAL__URL", &url), ("OUTPOST_CENTRAL__TLS", "disable")],
                )
            })
        })
        .collect();
    let mut applied = 0;
    for h in handles {
        let (ok, out, err) = h.join().unwrap();
        assert!(ok, "{err}");
        // Every migration of a tenant is applied by one site; the others find none to apply.
        applied += out.matches("5 migration(s) applied, now partitioned by time").count();
    }
    assert_eq!(applied, 2, "each tenant migrated exactly once across 4 concurrent sites");
    let c = pg.client().await;
    for t in ["acme", "globex"] {
        let n: i64 =
            c.query_one(&format!("SELECT count(*) FROM tenant_{t}.outpost_migrations"), &[]).await.unwrap().get(0);
        assert_eq!(n, 5, "every migration recorded once");
    }
    let (ok, _, err) = cli_env(
        dirs[0].path(),
        &["migrate", "--central", "--tenant", "Bad-Name"],
        &[("OUTPOST_CENTRAL__URL", &url), ("OUTPOST_CENTRAL__TLS", "disable")],
    );
    assert!(!ok && err.contains("Bad-Name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_central_verifies_the_server_certificate() {
    let (pg, ca) = Pg::start_tls();
    // Trusting the server's CA: forwarded over TLS.
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        c.central.tls = TlsMode::Require;
        c.central.ca_file = Some(ca.clone());
    })
    .await;
    let token = app.device("acme", "d1").await;
    let ids = ingest(&app, &token, "d1", 100, 100).await;
    if !eventually(Duration::from_secs(10), || async { app.pending() == 0 }).await {
        panic!("TLS forwarding failed: {}", app.get("/api/v1/status", None).await.body["uplink"]);
    }
    wait_drained(&app, &pg, 100).await;
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), ids)]));
    let c = pg.client().await;
    let ssl: i64 = c
        .query_one("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'outpost' AND s.ssl", &[])
        .await
        .unwrap()
        .get(0);
    assert!(ssl >= 1, "the appliance's connection is not encrypted");
    drop(app);
    // An untrusted certificate is refused: nothing is sent, the reason is shown.
    let other_dir = tempfile::tempdir().unwrap();
    let wrong_ca = other_dir.path().join("other.pem");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other", "-keyout"])
        .arg(other_dir.path().join("k"))
        .arg("-out")
        .arg(&wrong_ca)
        .output()
        .unwrap();
    assert!(out.status.success());
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        c.central.tls = TlsMode::Require;
        c.central.ca_file = Some(wrong_ca.clone());
    })
    .await;
    let token = app.device("acme", "d2").await;
    ingest(&app, &token, "d2", 10, 10).await;
    assert!(eventually(Duration::from_secs(20), || async { uplink_state(&app).await == "down" }).await);
    let s = app.get("/api/v1/status", None).await;
    let err = s.body["uplink"]["last_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(err.contains("certificate") || err.contains("tls") || err.contains("ssl"), "{err}");
    assert_eq!(app.pending(), 10);
    assert_eq!(central_count(&pg).await, 100);
    // A missing CA file is a configuration error at start, not a silent downgrade.
    let mut cfg = common::test_config(other_dir.path());
    central(&mut cfg, &pg.url());
    cfg.central.ca_file = Some(other_dir.path().join("missing.pem"));
    let err = outpost::app::start(cfg).await.err().expect("must refuse to start");
    assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_registered_after_the_uplink_is_up_gets_its_schema_while_idle() {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| central(c, &pg.url())).await;
    let up = || async { app.get("/api/v1/status", None).await.body["uplink"]["state"] == "up" };
    assert!(eventually(Duration::from_secs(20), up).await, "uplink never came up");
    // Connected and migrated already; this tenant is new, and nothing is sent.
    app.device("late", "d1").await;
    let client = pg.client().await;
    let exists = || async {
        client.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'tenant_late'", &[]).await.unwrap().is_some()
    };
    assert!(eventually(Duration::from_secs(5), exists).await, "no central schema for a tenant registered later");
}

/// Environment for a child appliance forwarding to `url` (raised limits,
/// retries quick enough for a test; the timeouts under test stay default
/// unless `extra` sets them).
fn proc_central_env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("OUTPOST_CENTRAL__URL", url),
        ("OUTPOST_CENTRAL__TLS", "disable"),
        ("OUTPOST_CENTRAL__BATCH_WAIT", "20ms"),
        ("OUTPOST_LIMITS__PER_SECOND", "1000000"),
        ("OUTPOST_LIMITS__PER_MINUTE", "10000000"),
        ("OUTPOST_LIMITS__PER_HOUR", "100000000"),
    ];
    env.extend_from_slice(extra);
    env
}

/// Rows still pending in a child appliance's site log.
fn proc_pending(data_dir: &std::path::Path) -> i64 {
    let conn = outpost::log::open(&data_dir.join("site-log.sqlite"), true).unwrap();
    outpost::log::schema::status(&conn, 0).unwrap().backlog_rows
}

/// Posts `n` events of about `pad` bytes each to a child appliance; returns the acked ids.
async fn proc_ingest(proc: &Proc, token: &str, device: &str, n: usize, pad: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let items: Vec<Value> = (start..(start + 1000).min(n))
            .map(|k| json!({"device_id": device, "event_type": "reading", "payload": {"k": k, "pad": "x".repeat(pad)}}))
            .collect();
        let r = client
            .post(format!("{}/api/v1/realtime/acme/events", proc.base()))
            .bearer_auth(token)
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        ids.extend(body["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()));
    }
    ids
}

/// The child's `/api/v1/status` uplink object.
async fn proc_uplink(proc: &Proc) -> Value {
    let Ok(r) = reqwest::get(format!("{}/api/v1/status", proc.base())).await else { return Value::Null };
    r.json::<Value>().await.map(|v| v["uplink"].clone()).unwrap_or(Value::Null)
}

async fn proc_get_text(proc: &Proc, path: &str) -> String {
    reqwest::get(format!("{}{path}", proc.base())).await.unwrap().text().await.unwrap()
}

/// A 10 MB backlog over a 1 Mbit/s uplink whose statement timeout (2 s) is
/// far shorter than one full batch takes (1000 rows ≈ 1 MB ≈ 8 s): a
/// forwarder that resends the same batch after each timeout never drains;
/// one that halves it does, exactly once. Prints the drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes ~150 s: run by `make test-network`"]
async fn a_10_mb_backlog_drains_over_a_1_mbit_uplink_by_halving_timed_out_batches() {
    const EVENTS: usize = 10_000;
    const RATE: u64 = 125_000; // 1 Mbit/s
    let bound = Duration::from_secs(300);
    let pg = Pg::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    // Central unreachable while the backlog builds.
    proxy.set(Mode::Refuse);
    let dir = tempfile::tempdir().unwrap();
    let token = common::add_device(dir.path(), "acme", "d1");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let env = proc_central_env(
        &url,
        &[("OUTPOST_CENTRAL__STATEMENT_TIMEOUT", "2s"), ("OUTPOST_CENTRAL__MAX_BACKOFF", "500ms")],
    );
    let proc = Proc::start(dir.path(), &env);
    let ids = proc_ingest(&proc, &token, "d1", EVENTS, 1000).await;
    assert_eq!(proc_pending(dir.path()), EVENTS as i64);
    let backlog_bytes = {
        let conn = outpost::log::open(&dir.path().join("site-log.sqlite"), true).unwrap();
        outpost::log::schema::status(&conn, 0).unwrap().backlog_bytes
    };
    assert!(backlog_bytes >= 10_000_000, "backlog is {backlog_bytes} bytes");

    proxy.set(Mode::Bandwidth(RATE));
    let started = std::time::Instant::now();
    let drained =
        eventually(bound, || async { central_count(&pg).await == EVENTS as i64 && proc_pending(dir.path()) == 0 })
            .await;
    let took = started.elapsed();
    let lines: Vec<String> = proc.stderr_tail.try_iter().collect();
    assert!(
        drained,
        "not drained in {bound:?}: {} central, {} pending; batch size changes: {:?}",
        central_count(&pg).await,
        proc_pending(dir.path()),
        lines.iter().filter(|l| l.contains("forward batch size")).collect::<Vec<_>>()
    );
    eprintln!(
        "drained {EVENTS} events ({:.1} MB backlog) over {} Mbit/s in {:.1} s",
        backlog_bytes as f64 / 1e6,
        RATE * 8 / 1_000_000,
        took.as_secs_f64()
    );
    for l in lines.iter().filter(|l| l.contains("forward batch size")) {
        eprintln!("  {}", l.split_once("outpost::forward").map_or(l.as_str(), |(_, rest)| rest));
    }
    let halved: Vec<&String> = lines.iter().filter(|l| l.contains("forward batch size halved")).collect();
    assert!(!halved.is_empty(), "the batch was never halved");
    assert!(halved[0].contains("batch_rows=500"), "the new size is logged: {}", halved[0]);
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), ids)]));
}

/// How long until `/api/v1/status` shows the uplink `state` (30 s at most).
async fn until_uplink(proc: &Proc, state: &str) -> Option<Duration> {
    let from = std::time::Instant::now();
    eventually(Duration::from_secs(30), || async { proc_uplink(proc).await["state"] == state })
        .await
        .then(|| from.elapsed())
}

/// A silent partition (the proxy swallows every byte, closes nothing) of an
/// idle uplink shows as `down` with its reason within 10 s in the status
/// document, `/metrics` and the status page, stays down while it lasts
/// (20 s), and is `up` again within 2 s of the heal. Default timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_shows_down_within_10_s_and_up_within_2_s_of_the_heal() {
    let pg = Pg::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = common::add_device(dir.path(), "acme", "d1");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let proc = Proc::start(dir.path(), &proc_central_env(&url, &[]));
    // Someone at the site subscribes, so the LISTEN connection is open too.
    let ws = format!("{}/api/v1/realtime/acme/stream?access_token={token}", proc.base().replace("http://", "ws://"));
    let _watching = tokio_tungstenite::connect_async(ws).await.expect("ws connect");
    let mut ids = proc_ingest(&proc, &token, "d1", 100, 10).await;
    assert!(eventually(Duration::from_secs(20), || async { proc_pending(dir.path()) == 0 }).await);
    assert_eq!(proc_uplink(&proc).await["state"], "up");

    proxy.set(Mode::Blackhole);
    let cut = std::time::Instant::now();
    let Some(noticed) = until_uplink(&proc, "down").await else {
        panic!("a silent partition never showed: {}", proc_uplink(&proc).await)
    };
    eprintln!("silent partition shown down after {:.1} s", noticed.as_secs_f64());
    assert!(noticed <= Duration::from_secs(10), "down shown after {noticed:?}");
    let uplink = proc_uplink(&proc).await;
    let reason = uplink["last_error"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("no answer from central"), "{uplink}");
    assert!(proc_get_text(&proc, "/metrics").await.contains("outpost_uplink_up 0"));
    // The LISTEN connection pings too, and notices the same silence.
    let listen_down = || async { proc_get_text(&proc, "/metrics").await.contains("outpost_listen_up 0") };
    assert!(eventually(Duration::from_secs(10), listen_down).await, "LISTEN connection still counted up");
    let page = proc_get_text(&proc, "/").await;
    assert!(page.contains(r#"id="uplink-state">DOWN<"#), "status page: {page}");
    assert!(page.contains(r#"id="uplink-reason">no answer from central"#), "status page: {page}");
    // Events keep being accepted; the uplink stays down (not "connecting")
    // for the rest of the 20 s partition.
    ids.extend(proc_ingest(&proc, &token, "d1", 100, 10).await);
    while cut.elapsed() < Duration::from_secs(20) {
        assert_eq!(proc_uplink(&proc).await["state"], "down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(proc_pending(dir.path()), 100);

    proxy.set(Mode::Pass);
    let Some(recovered) = until_uplink(&proc, "up").await else {
        panic!("never up again: {}", proc_uplink(&proc).await)
    };
    eprintln!("heal shown up after {:.2} s", recovered.as_secs_f64());
    assert!(recovered <= Duration::from_secs(2), "up shown {recovered:?} after the heal");
    assert!(proc_get_text(&proc, "/metrics").await.contains("outpost_uplink_up 1"));
    let listen_up = || async { proc_get_text(&proc, "/metrics").await.contains("outpost_listen_up 1") };
    assert!(eventually(Duration::from_secs(15), listen_up).await, "LISTEN connection not back");
    assert!(eventually(Duration::from_secs(20), || async { proc_pending(dir.path()) == 0 }).await);
    assert_exactly_once(&central_rows(&pg).await, &HashMap::from([("d1".to_string(), ids)]));
}

//! Central tables partitioned by time (`central.partition_interval`,
//! `central.retention`, `outpost migrate --central --partition-existing`),
//! against a real PostgreSQL. The exactly-once, replay and both NOTIFY styles
//! of tests/forward.rs run on partitioned tables too: every new tenant is.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::pg::Pg;
use common::{TestApp, central, cli, cli_env, eventually};
use serde_json::{Value, json};

const DRAIN: Duration = Duration::from_secs(60);

async fn count(pg: &Pg, sql: &str) -> i64 {
    pg.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// `tenant_acme.events`' partitions, by name.
async fn partitions(pg: &Pg) -> HashSet<String> {
    let rows = pg
        .client()
        .await
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'tenant_acme.events'::regclass",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn relkind(pg: &Pg) -> String {
    pg.client()
        .await
        .query_one("SELECT relkind::text FROM pg_class WHERE oid = 'tenant_acme.events'::regclass", &[])
        .await
        .unwrap()
        .get(0)
}

fn month_partition(t: time::OffsetDateTime) -> String {
    format!("events_p{:04}{:02}01", t.year(), u8::from(t.month()))
}

/// Posts one event per timestamp (None: the appliance's clock); returns the ids.
async fn post(app: &TestApp, token: &str, stamps: &[Option<&str>]) -> Vec<String> {
    let items: Vec<Value> = stamps
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let mut e = json!({"device_id": "d1", "event_type": "reading", "payload": {"k": k}});
            if let Some(t) = t {
                e["timestamp"] = json!(t);
            }
            e
        })
        .collect();
    let r = app.post("/api/v1/realtime/acme/events", Some(token), &json!(items)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect()
}

async fn central_ids(pg: &Pg) -> Vec<String> {
    let rows = pg.client().await.query("SELECT id::text FROM tenant_acme.events ORDER BY id", &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tenants_are_partitioned_and_rows_outside_every_partition_land_exactly_once() {
    let pg = Pg::start();
    // Partitions are UTC months whatever the server's zone: in New York,
    // "March + 1 month" in local time would end on March 28 23:00 UTC.
    pg.client().await.batch_execute("ALTER DATABASE postgres SET timezone TO 'America/New_York'").await.unwrap();
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        any_time(c);
    })
    .await;
    let token = app.device("acme", "d1").await;
    assert!(
        eventually(DRAIN, || async {
            count(&pg, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme'").await == 1
        })
        .await
    );
    assert_eq!(relkind(&pg).await, "p", "a new tenant's events table is partitioned");
    let now = time::OffsetDateTime::now_utc();
    let next = now.replace_day(1).unwrap() + time::Duration::days(32);
    let ahead = partitions(&pg).await;
    for p in [month_partition(now), month_partition(next), "events_default".to_string()] {
        assert!(ahead.contains(&p), "{p} created ahead by the migration: {ahead:?}");
    }

    // Far in the past and the future (the site took them: limits wide
    // open here): outside central.partition_window no partition is made;
    // the rows land in the default partition, each once.
    let stamps = [None, Some("1999-03-04T05:06:07Z"), Some("2100-06-15T00:00:00Z"), Some("2100-03-31T12:00:00Z")];
    let mut ids = post(&app, &token, &stamps).await;
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    let made = partitions(&pg).await;
    for p in ["events_p19990301", "events_p21000601", "events_p21000301"] {
        assert!(!made.contains(p), "{p} made outside the window: {made:?}");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events_default").await, 3, "the default partition");

    // A replay resends every row with its id and timestamp: (id, timestamp)
    // conflicts, nothing doubles.
    let (ok, out, err) = cli(app.dir.path(), &["replay", "--since", "1h"]);
    assert!(ok && out.contains("4 events"), "{out}{err}");
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    ids.sort();
    assert_eq!(central_ids(&pg).await, ids, "each acked event once");

    // A partition that cannot be made returns NULL instead of failing: a
    // one-day partition inside an existing month partition overlaps it.
    let next_day = format!("{}-{:02}-02", next.year(), u8::from(next.month()));
    let made: Option<String> = pg
        .client()
        .await
        .query_one(&format!("SELECT tenant_acme.outpost_ensure_partition('{next_day}', '1 day')"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made, None);
}

/// Timestamps of any year taken at ingest (the test is about central).
fn any_time(c: &mut outpost::config::Config) {
    c.limits.max_event_age = Duration::from_secs(200 * 365 * 86_400);
    c.limits.max_future_skew = Duration::from_secs(200 * 365 * 86_400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_with_rows_is_converted_only_by_partition_existing() {
    let pg = Pg::start();
    // A tenant as an older outpost left it: migrations 1 and 2, rows in it.
    let c = pg.client().await;
    let mut ddl = "CREATE SCHEMA tenant_acme;
        CREATE TABLE tenant_acme.outpost_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO tenant_acme.outpost_migrations (version) VALUES (1), (2);"
        .to_string();
    for f in ["0001_tenant_events.sql", "0002_event_properties.sql"] {
        let sql = std::fs::read_to_string(format!("migrations/postgres/{f}")).unwrap();
        ddl.push_str(&sql.replace("{{schema}}", "tenant_acme").replace("{{channel}}", "tenant_acme_events"));
    }
    ddl.push_str(
        "INSERT INTO tenant_acme.events (id, device_id, event_type, payload, \"timestamp\", site_id, site_seq)
         VALUES (gen_random_uuid(), 'old', 'reading', '{}', '2020-01-02', 'site-old', 1),
                (gen_random_uuid(), 'old', 'reading', '{}', NULL, 'site-old', 2);",
    );
    c.batch_execute(&ddl).await.unwrap();
    let env = [("OUTPOST_CENTRAL__URL", pg.url()), ("OUTPOST_CENTRAL__TLS", "disable".into())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();

    let (ok, out, err) = cli_env(dir.path(), &["migrate", "--central", "--tenant", "acme"], &env);
    assert!(ok, "{err}");
    assert!(out.contains("3 migration(s) applied, NOT partitioned") && out.contains("--partition-existing"), "{out}");
    assert_eq!(relkind(&pg).await, "r", "rows are never copied without being asked");

    // Forwarding into the old table still works, exactly once.
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        any_time(c);
    })
    .await;
    let token = app.device("acme", "d1").await;
    let mut ids = post(&app, &token, &[None, None, Some("2021-05-05T00:00:00Z")]).await;
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events").await, 5);

    let (ok, out, err) =
        cli_env(dir.path(), &["migrate", "--central", "--tenant", "acme", "--partition-existing"], &env);
    assert!(ok, "{err}");
    assert!(out.contains("now partitioned by time"), "{out}");
    assert_eq!(relkind(&pg).await, "p");
    let parts = partitions(&pg).await;
    for p in ["events_p20200101", "events_p20210501", "events_default"] {
        assert!(parts.contains(p), "{p}: {parts:?}");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events").await, 5, "every row copied");
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events WHERE \"timestamp\" IS NULL").await, 0);
    let triggers = count(&pg, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tenant_acme.events'::regclass AND tgname = 'events_notify_batch'").await;
    assert_eq!(triggers, 1, "the NOTIFY trigger is on the new table");

    // The running site resends into the converted table without doubles.
    let (ok, out, err) = cli(app.dir.path(), &["replay", "--since", "1h"]);
    assert!(ok && out.contains("3 events"), "{out}{err}");
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    let central: HashSet<String> = central_ids(&pg).await.into_iter().collect();
    ids.sort();
    assert!(ids.iter().all(|i| central.contains(i)), "every acked event is there");
    assert_eq!(central.len(), 5, "and once");

    // Again: nothing left to convert.
    let (ok, out, _) = cli_env(dir.path(), &["migrate", "--central", "--tenant", "acme", "--partition-existing"], &env);
    assert!(ok && out.contains("up to date, partitioned by time"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_partitions_past_it() {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| {
        central(c, &pg.url());
        any_time(c);
        // Partitions for any year, so that old ones exist to be dropped.
        c.central.partition_window = Duration::from_secs(200 * 365 * 86_400);
    })
    .await;
    let token = app.device("acme", "d1").await;
    post(&app, &token, &[None, Some("2001-01-01T00:00:00Z"), Some("2002-02-02T00:00:00Z")]).await;
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events").await, 3);

    let env = [("OUTPOST_CENTRAL__URL", pg.url()), ("OUTPOST_CENTRAL__TLS", "disable".into())];
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (ok, out, _) = cli_env(app.dir.path(), &["migrate", "--central"], &env);
    assert!(ok && !out.contains("dropped"), "no retention, nothing dropped: {out}");
    env.push(("OUTPOST_CENTRAL__RETENTION", "90d"));
    let (ok, out, err) = cli_env(app.dir.path(), &["migrate", "--central"], &env);
    assert!(ok, "{err}");
    assert!(out.contains("2 partition(s) past central.retention dropped"), "{out}");
    let left = partitions(&pg).await;
    assert!(!left.contains("events_p20010101") && !left.contains("events_p20020201"), "{left:?}");
    assert!(left.contains(&month_partition(time::OffsetDateTime::now_utc())), "{left:?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM tenant_acme.events").await, 1, "the recent event stays");
}

/// A device's clock cannot grow central without bound: 1,000 events with
/// timestamps spread over decades either are refused at ingest (outside
/// limits.max_event_age / max_future_skew, naming the field and the bound)
/// or reach central, in a partition within central.partition_window or in
/// the default one. None acked is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_over_the_years_make_only_the_windows_partitions() {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| central(c, &pg.url())).await;
    let token = app.device("acme", "d1").await;
    assert!(
        eventually(DRAIN, || async {
            count(&pg, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme'").await == 1
        })
        .await,
        "tenant migrated"
    );
    let before = partitions(&pg).await.len();
    let now = time::OffsetDateTime::now_utc();
    let (mut acked, mut refused) = (Vec::new(), 0);
    for k in 0..1000i64 {
        // From 20 years back to 20 years ahead, a few near now.
        let offset =
            if k % 10 == 0 { time::Duration::minutes(k % 50) } else { time::Duration::days((k * 29) % 14_600 - 7_300) };
        let t = (now + offset).format(&time::format_description::well_known::Rfc3339).unwrap();
        let body = json!({"device_id": "d1", "event_type": "reading", "payload": {"k": k}, "timestamp": t});
        let r = app.post("/api/v1/realtime/acme/event", Some(&token), &body).await;
        match r.status {
            201 => acked.push(r.body["id"].as_str().unwrap().to_string()),
            400 => {
                r.assert_error(400, "invalid", Some("timestamp"));
                let m = r.body["message"].as_str().unwrap();
                assert!(m.contains("limits.max_event_age") || m.contains("limits.max_future_skew"), "{m}");
                refused += 1;
            }
            s => panic!("{s}: {}", r.text),
        }
    }
    assert!(acked.len() >= 100 && refused >= 800, "acked {} refused {refused}", acked.len());
    assert!(eventually(DRAIN, || async { app.pending() == 0 }).await);
    acked.sort();
    assert_eq!(central_ids(&pg).await, acked, "every acked event is central, once");
    // At most the window's: the current month, the one before and ahead (the
    // migration made those), plus whatever of the last 62 days needed one.
    let made = partitions(&pg).await;
    assert!(made.len() <= before + 2, "{} partitions after, {before} before: {made:?}", made.len());
    assert_eq!(app.metric_labelled("outpost_central_partitions", "tenant=\"acme\"").await, made.len() as u64);
}

//! Central fails over to an asynchronous standby (`make test-failover`:
//! needs root for nftables). A real primary and a real streaming standby;
//! replication is cut with nftables while batches commit on the primary;
//! the primary is killed and the standby promoted. Every acked event ends
//! up centrally exactly once, in per-device order: at its reconnect the
//! forwarder finds that the promoted server's `sites.last_seq` is behind
//! what it forwarded within `central.failover_window`, and sends the rest
//! again. With the check off, the events the standby never had are lost,
//! which the second test shows (so the first cannot pass by accident).

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::Pg;
use common::{TestApp, assert_exactly_once, central, central_count as count, central_rows, eventually};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// An nftables table dropping the replication traffic of a primary on
/// `port` (it flows through 127.0.0.2; the appliance uses 127.0.0.1).
/// Deleted when dropped, also when the test fails.
struct Cut(String);

impl Cut {
    fn replication(port: u16) -> Self {
        let name = format!("outpost_failover_{port}");
        let rules = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             ip daddr 127.0.0.2 tcp dport {port} drop\n  ip saddr 127.0.0.2 tcp sport {port} drop\n }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&rules));
        Cut(name)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        nft(&["delete", "table", "inet", &self.0], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (nftables) is needed: make test-failover installs it");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {} (root is needed)", String::from_utf8_lossy(&out.stderr));
}

async fn answers(pg: &Pg, sql: &str) -> bool {
    let Ok((c, conn)) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await else { return false };
    tokio::spawn(conn);
    c.query_one(sql, &[]).await.map(|r| r.get::<_, bool>(0)).unwrap_or(false)
}

/// Posts events `range` for d1 and d2 (alternating); their ids by device.
async fn post(
    app: &TestApp,
    tokens: &[String; 2],
    range: std::ops::Range<u32>,
    acked: &mut HashMap<String, Vec<String>>,
) {
    for i in range {
        let device = format!("d{}", i % 2 + 1);
        let r = app.post_event("acme", &tokens[(i % 2) as usize], &device, json!({"i": i})).await;
        assert_eq!(r.status, 201, "{}", r.text);
        acked.entry(device).or_default().push(r.body["id"].as_str().unwrap().to_string());
    }
}

/// What happens: 20 events replicated, 30 committed on the primary only
/// (replication cut), the primary killed, the standby promoted, 10 more.
/// Returns the acked ids, the ids the standby never had, and the promoted
/// server's rows once the forwarder has nothing pending and the last 10
/// arrived.
async fn failover(window: Duration) -> (HashMap<String, Vec<String>>, Vec<String>, Vec<(String, String, String, i64)>) {
    let primary = Pg::start_primary();
    let standby = Pg::start_standby(&primary);
    let streaming = "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'";
    assert!(eventually(T, || answers(&primary, streaming)).await, "the standby never streamed");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let app = TestApp::start_with(|c| {
        central(c, &url);
        c.central.failover_window = window;
    })
    .await;
    let tokens = [app.device("acme", "d1").await, app.device("acme", "d2").await];
    let mut acked = HashMap::new();

    post(&app, &tokens, 0..20, &mut acked).await;
    let replicated = eventually(T, || async { count(&primary).await == 20 && count(&standby).await == 20 }).await;
    assert!(replicated, "primary {} standby {}", count(&primary).await, count(&standby).await);

    let cut = Cut::replication(primary.port);
    let before: Vec<String> = acked.values().flatten().cloned().collect();
    post(&app, &tokens, 20..50, &mut acked).await;
    // Committed on the primary and marked forwarded here: what the check
    // (not a pending row's ordinary resend) has to find again.
    let forwarded = eventually(T, || async { count(&primary).await == 50 && app.pending() == 0 }).await;
    assert!(forwarded, "primary {}, {} pending", count(&primary).await, app.pending());
    assert_eq!(count(&standby).await, 20, "replication was not cut");
    let unreplicated: Vec<String> = acked.values().flatten().filter(|id| !before.contains(id)).cloned().collect();

    // The cut stays until the standby is promoted: the killed primary's
    // kernel still retransmits the WAL its sockets had queued, and with
    // the cut gone the standby's receiver would take it (so the standby
    // would have the 30 after all).
    primary.kill();
    standby.promote();
    drop(cut);
    post(&app, &tokens, 50..60, &mut acked).await;

    let want = if window.is_zero() { 30 } else { 60 };
    let settled = eventually(T, || async { app.pending() == 0 && count(&standby).await == want }).await;
    assert!(settled, "{} pending, {} on the promoted standby, want {want}", app.pending(), count(&standby).await);
    let rows = central_rows(&standby).await;
    (acked, unreplicated, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and nftables: make test-failover"]
async fn a_failover_to_an_asynchronous_standby_loses_no_acked_event() {
    let (acked, _, rows) = failover(Duration::from_secs(300)).await;
    assert_exactly_once(&rows, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and nftables: make test-failover"]
async fn without_the_check_the_events_the_standby_never_had_are_lost() {
    let (_, unreplicated, rows) = failover(Duration::ZERO).await;
    assert_eq!(unreplicated.len(), 30);
    let lost = unreplicated.iter().filter(|id| !rows.iter().any(|r| &&r.0 == id)).count();
    assert_eq!(lost, 30, "the scenario must lose what the standby never had when nothing is sent again");
}

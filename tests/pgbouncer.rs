//! Forwarding through PgBouncer in transaction pooling (Debian's
//! `pgbouncer`, started by the test in front of a throwaway PostgreSQL):
//! every statement the forwarder sends must be valid when consecutive
//! transactions land on different server connections (no named prepared
//! statements kept, no session state such as temporary tables), and a
//! PgBouncer restart mid-stream loses and duplicates nothing. LISTEN goes
//! to PostgreSQL directly (`central.listen_url`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pg::Pg;
use common::{TestApp, assert_exactly_once, central, central_count as count, central_rows, eventually};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// A PgBouncer in transaction pooling on a free port, in front of `pg`,
/// with three server connections used in turn (`server_round_robin`), so
/// consecutive transactions of one client land on different ones; killed
/// when dropped.
struct Bouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Bouncer {
    fn start(pg: &Pg) -> Self {
        let dir = tempfile::Builder::new().prefix("outpost-pgbouncer").tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\n\
                 default_pool_size = 3\nmin_pool_size = 3\nserver_round_robin = 1\n\
                 max_client_conn = 100\nserver_reset_query =\n\
                 ignore_startup_parameters = options,extra_float_digits\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
                pg.port
            ),
        )
        .unwrap();
        let mut b = Bouncer { child: Self::spawn(dir.path()), port, dir };
        b.wait_up();
        b
    }

    /// PgBouncer refuses to run as root: it switches to `postgres` then
    /// (`-u`, so the pid killed is PgBouncer's own).
    fn spawn(dir: &Path) -> Child {
        let mut c = Command::new("pgbouncer");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status().unwrap();
            assert!(st.success());
            c.args(["-u", "postgres"]);
        }
        c.arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer (make test installs it)")
    }

    fn wait_up(&mut self) {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = std::time::Instant::now() + T;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(self.child.try_wait().unwrap().is_none(), "pgbouncer exited: {}", self.log());
            assert!(std::time::Instant::now() < deadline, "pgbouncer never listened: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.dir.path());
        self.wait_up();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_through_pgbouncer_transaction_pooling_is_exactly_once_across_its_restart() {
    let pg = Pg::start();
    let mut bouncer = Bouncer::start(&pg);
    let direct = pg.url();
    let app = TestApp::start_with(|c| {
        central(c, &bouncer.url());
        c.central.listen_url = Some(direct.clone());
    })
    .await;
    let tokens = [app.device("acme", "d1").await, app.device("acme", "d2").await];
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    let mut post = async |range: std::ops::Range<u32>| {
        for i in range {
            let device = format!("d{}", i % 2 + 1);
            let r = app.post_event("acme", &tokens[(i % 2) as usize], &device, json!({"i": i})).await;
            assert_eq!(r.status, 201, "{}", r.text);
            acked.entry(device).or_default().push(r.body["id"].as_str().unwrap().to_string());
        }
    };
    post(0..300).await;
    assert!(eventually(T, || async { count(&pg).await == 300 }).await, "central has {}", count(&pg).await);
    // Every statement was valid on whichever server connection it met.
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_forward_retries_total 0\n"), "batches failed through PgBouncer: {}", bouncer.log());
    bouncer.restart();
    post(300..600).await;
    let drained = eventually(T, || async { app.pending() == 0 && count(&pg).await == 600 }).await;
    assert!(drained, "{} pending, central {}: {}", app.pending(), count(&pg).await, bouncer.log());
    assert_exactly_once(&central_rows(&pg).await, &acked);
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_dead_letters_total 0\n"), "nothing refused through PgBouncer: {m}");
}

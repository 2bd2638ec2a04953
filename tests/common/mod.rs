//! Test harness: starts the real appliance (in-process via `app::start`, or the
//! real binary as a child process) on 127.0.0.1:0 with a temp data dir and
//! real tokens. No mocks: real SQLite files, real HTTP.
#![allow(dead_code)]

pub mod mqtt_raw;
pub mod pg;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::auth::{Authenticator, Perm, Registry};
use outpost::config::Config;
use serde_json::{Value, json};

/// Path of the built `outpost` binary (`OUTPOST_TEST_BIN` runs the
/// black-box tests against another build, e.g. an older release, to show
/// that a test fails there).
pub fn bin() -> PathBuf {
    std::env::var_os("OUTPOST_TEST_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_outpost")), PathBuf::from)
}

/// A config for tests: loopback ports, the given data dir, site id `site-a`.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::default();
    c.site.id = Some("site-a".into());
    c.site.data_dir = data_dir.to_path_buf();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.shutdown_grace = Duration::from_secs(10);
    c
}

/// Points the appliance at `url` with test-friendly timings and raised limits.
pub fn central(c: &mut Config, url: &str) {
    c.central.url = Some(url.to_string());
    c.central.tls = outpost::config::TlsMode::Disable;
    c.central.batch_wait = Duration::from_millis(20);
    c.central.max_backoff = Duration::from_millis(500);
    c.central.statement_timeout = Duration::from_secs(2);
    c.central.connect_timeout = Duration::from_secs(2);
    c.central.keepalive_idle = Duration::from_secs(2);
    c.limits.per_second = 1_000_000;
    c.limits.per_minute = 10_000_000;
    c.limits.per_hour = 100_000_000;
}

/// Mints tokens with the data dir's secret, the way the CLI does.
pub fn issuer(config: &Config) -> Authenticator {
    Authenticator::from_config(config, Arc::new(Registry::default())).unwrap().0
}

/// An in-process appliance.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub base: String,
    pub mqtt: SocketAddr,
    pub client: reqwest::Client,
    pub admin: String,
    running: Option<outpost::app::Running>,
}

impl TestApp {
    /// Starts an appliance with default test config.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts an appliance after `tweak` adjusts its config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        config.validate().unwrap();
        let running = outpost::app::start(config.clone()).await.unwrap();
        let admin = issuer(&config).issue_admin(None).unwrap();
        Self {
            base: format!("http://{}", running.http_addr),
            mqtt: running.mqtt_addr.unwrap_or_else(|| "127.0.0.1:9".parse().unwrap()),
            dir,
            config,
            client: reqwest::Client::new(),
            admin,
            running: Some(running),
        }
    }

    /// Stops the appliance cleanly and starts it again on the same data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = outpost::app::start(self.config.clone()).await.unwrap();
        self.base = format!("http://{}", running.http_addr);
        self.mqtt = running.mqtt_addr.unwrap_or(self.mqtt);
        self.running = Some(running);
    }

    /// Stops the appliance cleanly.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Registers a device over the admin API; returns its token.
    pub async fn register(&self, tenant: &str, device: &str, perms: &[&str]) -> String {
        let r = self
            .client
            .post(self.url(&format!("/api/v1/realtime/{tenant}/device/register")))
            .bearer_auth(&self.admin)
            .json(&json!({"device_id": device, "perms": perms}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "register {tenant}/{device}");
        let v: Value = r.json().await.unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// Registers a device with write_events + read_events.
    pub async fn device(&self, tenant: &str, device: &str) -> String {
        self.register(tenant, device, &["write_events", "read_events"]).await
    }

    /// POSTs a JSON body with a bearer token; returns status, headers and body.
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Resp::from(req.send().await.unwrap()).await
    }

    /// GETs with a bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Resp::from(req.send().await.unwrap()).await
    }

    /// The value of the unlabelled metric `name` in `/metrics` (panics when
    /// it is missing or not a whole number).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics", None).await.text;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics: {text}"))
    }

    /// The value of metric `name` with the labels `labels` (e.g.
    /// `tenant="acme"`) in `/metrics`.
    pub async fn metric_labelled(&self, name: &str, labels: &str) -> u64 {
        let text = self.get("/metrics", None).await.text;
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} not in /metrics: {text}"))
    }

    /// Posts one event for `device` and returns the response.
    pub async fn post_event(&self, tenant: &str, token: &str, device: &str, payload: Value) -> Resp {
        self.post(
            &format!("/api/v1/realtime/{tenant}/event"),
            Some(token),
            &json!({"device_id": device, "event_type": "test.reading", "payload": payload}),
        )
        .await
    }

    /// Rows still waiting to be forwarded, read from the file.
    pub fn pending(&self) -> i64 {
        let conn = outpost::log::open(&self.config.log_path(), true).unwrap();
        outpost::log::schema::status(&conn, 0).unwrap().backlog_rows
    }

    /// Every event in the site log, read from the file (not through the API).
    pub fn log_rows(&self) -> Vec<outpost::event::StoredEvent> {
        log_rows(&self.config.log_path())
    }
}

/// Every event in a site log file.
pub fn log_rows(path: &Path) -> Vec<outpost::event::StoredEvent> {
    let conn = outpost::log::open(path, true).unwrap();
    outpost::log::schema::all_events(&conn).unwrap()
}

/// A response, read whole.
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub async fn from(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self { status, headers, body, text }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error response: status, code and (optionally) field.
    pub fn assert_error(&self, status: u16, code: &str, field: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.body["error"], code, "{}", self.text);
        assert!(self.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.text);
        if let Some(f) = field {
            assert_eq!(self.body["field"], f, "{}", self.text);
        }
    }
}

/// The real binary running as a child process.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    /// The TLS listeners, when configured.
    pub https: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub stderr_tail: std::sync::mpsc::Receiver<String>,
}

/// Environment for a child appliance on `data_dir`.
pub fn proc_env(data_dir: &Path) -> Vec<(String, String)> {
    vec![
        ("OUTPOST_SITE__DATA_DIR".into(), data_dir.display().to_string()),
        ("OUTPOST_SITE__ID".into(), "site-a".into()),
        ("OUTPOST_HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ("OUTPOST_MQTT__LISTEN".into(), "127.0.0.1:0".into()),
        ("OUTPOST_LOG".into(), "info".into()),
        ("NO_COLOR".into(), "1".into()),
    ]
}

impl Drop for Proc {
    /// A failing test must not leave an appliance running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `outpost run` and waits for its "http listening on" line.
    pub fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin());
        for (k, v) in proc_env(data_dir) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// `start`, with a config file (written into the data dir) under the
    /// environment: for what only a file can say (per-device limits).
    pub fn start_with_config(data_dir: &Path, toml: &str, extra_env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let file = data_dir.join("outpost.toml");
        std::fs::write(&file, toml).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(&file);
        for (k, v) in proc_env(data_dir) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Starts `cmd` (the binary, with its environment and directory set) as
    /// `outpost run` and waits for its "http listening on" line.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::piped()).env_remove("OUTPOST_CONFIG");
        let mut child = cmd.spawn().unwrap();
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no stderr pipe");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("appliance did not report its http address in 30 s");
                }
            };
            if let Some(i) = line.find("http listening on ") {
                let after = |marker: &str| -> Option<SocketAddr> {
                    let j = line.find(marker)? + marker.len();
                    line[j..].split_whitespace().next()?.trim_end_matches([',', ';']).parse().ok()
                };
                let Some(addr) = after("http listening on ") else {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("bad address in {:?}", &line[i..]);
                };
                let (mqtt, https, mqtts) =
                    (after("mqtt listening on "), after("https listening on "), after("mqtts listening on "));
                return Self { child, addr, mqtt, https, mqtts, stderr_tail: rx };
            }
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process's resident set, in KiB (`VmRSS`).
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
    }

    /// The value of the unlabelled metric `name` in its `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base())).await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics: {text}"))
    }

    /// The value of metric `name` with the labels `labels` (e.g.
    /// `tenant="acme"`) in its `/metrics`, or None while it has none.
    pub async fn metric_labelled(&self, name: &str, labels: &str) -> Option<u64> {
        let text = reqwest::get(format!("{}/metrics", self.base())).await.unwrap().text().await.unwrap();
        let prefix = format!("{name}{{{labels}}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok())
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for the exit status (the log stays readable).
    pub fn terminate_in_place(&mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

/// Registers a device with the CLI (the appliance may be running); returns its token.
pub fn add_device(data_dir: &Path, tenant: &str, id: &str) -> String {
    let (ok, out, err) = cli(data_dir, &["device", "add", "--tenant", tenant, "--id", id]);
    assert!(ok, "device add {tenant}/{id}: {err}");
    out.trim().to_string()
}

/// Runs the CLI with `args` on `data_dir`; returns (success, stdout, stderr).
pub fn cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    cli_env(data_dir, args, &[])
}

/// `cli` with extra environment.
pub fn cli_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("OUTPOST_CONFIG");
    for (k, v) in proc_env(data_dir) {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` until it is true or `timeout` passes (conditions, not sleeps).
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Limits high enough that a test's own traffic is never throttled (for
/// `Proc::start`).
#[allow(dead_code)]
pub const FAST: [(&str, &str); 4] = [
    ("OUTPOST_LIMITS__PER_SECOND", "1000000"),
    ("OUTPOST_LIMITS__PER_MINUTE", "100000000"),
    ("OUTPOST_LIMITS__PER_HOUR", "1000000000"),
    ("OUTPOST_MQTT__MAX_CONNECTS_PER_MINUTE", "0"),
];

/// Device permissions used by tests.
pub const RW: [Perm; 2] = Perm::DEFAULT;

/// Rows of tenant acme on `pg`, or -1 while it cannot say (not up, no
/// table yet).
#[allow(dead_code)]
pub async fn central_count(pg: &pg::Pg) -> i64 {
    let Ok((c, conn)) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await else { return -1 };
    tokio::spawn(conn);
    match c.query_one("SELECT count(*) FROM tenant_acme.events", &[]).await {
        Ok(r) => r.get(0),
        Err(_) => -1,
    }
}

/// The central events of tenant acme: (id, device, site, site_seq), by site and seq.
#[allow(dead_code)]
pub async fn central_rows(pg: &pg::Pg) -> Vec<(String, String, String, i64)> {
    let c = pg.client().await;
    let rows = c
        .query("SELECT id::text, device_id, site_id, site_seq FROM tenant_acme.events ORDER BY site_id, site_seq", &[])
        .await
        .unwrap_or_default();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
}

/// Exactly the acked ids, each once; per device in ack order (by site_seq).
#[allow(dead_code)]
pub fn assert_exactly_once(
    rows: &[(String, String, String, i64)],
    acked: &std::collections::HashMap<String, Vec<String>>,
) {
    let total: usize = acked.values().map(Vec::len).sum();
    assert_eq!(rows.len(), total, "central row count");
    let unique: std::collections::HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(unique.len(), rows.len(), "duplicate ids centrally");
    for (device, ids) in acked {
        let central: Vec<&str> = rows.iter().filter(|r| &r.1 == device).map(|r| r.0.as_str()).collect();
        let want: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(central, want, "order or content of {device}");
    }
}

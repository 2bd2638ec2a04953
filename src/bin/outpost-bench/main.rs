//! `outpost-bench`: load generators that drive a running appliance and put
//! the result next to the raw limit of the same machine, measured in the same
//! run (SQLite group commits of the same schema, on the same disk). Numbers
//! for notes, never assertions in tests. Built only with the `bench`
//! feature (`make bench`), so the product binary carries none of it.

mod fleet;
mod forward;
mod http;
mod mqtt;
mod stream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use outpost::auth::{Authenticator, Registry};
use outpost::config::Config;
use outpost::event::{Event, now_us};
use outpost::log::{self, schema};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "outpost-bench", version, about = "Load generators for outpost (numbers for notes, never for tests)")]
struct Cli {
    /// Config file (TOML) of the appliance under test: its data dir holds the
    /// raw-limit scratch database and its signing secret issues admin tokens.
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Drive HTTP ingest: devices post single events or batches.
    Http(HttpArgs),
    /// Drive MQTT ingest: devices publish at QoS 0/1/2 over MQTT 3.1.1 or
    /// 5.0 (rumqttc); ack latency (PUBACK, or PUBREC and PUBCOMP).
    /// `--compare`: 3.1.1 QoS 1, 3.1.1 QoS 2 and 5.0 QoS 1 in one run.
    Mqtt(MqttArgs),
    /// Ingest → WebSocket subscriber latency (same site, or another site
    /// through the central database), and how many subscribers one appliance
    /// serves before p99 passes 100 ms.
    Stream(StreamArgs),
    /// Drain a synthetic backlog into a central PostgreSQL, next to raw
    /// COPY BINARY + INSERT … ON CONFLICT of the same rows, and the cost of
    /// the two NOTIFY trigger styles. Drops and recreates the schemas
    /// tenant_benchraw, tenant_benchfwd and tenant_benchtrig_* on that server.
    Forward(ForwardArgs),
    /// N simulated sites in this process (each a real appliance: site log,
    /// forwarder, LISTEN) against one central PostgreSQL; prints
    /// `measuring`, then one JSON line. Driven by `tests/bench/fleet.py
    /// --in-process`, which measures central's CPU.
    Fleet(fleet::FleetArgs),
    /// Only measure the raw group-commit rate of the data dir's disk.
    Raw {
        /// Rows per transaction.
        #[arg(long, default_value_t = 100)]
        rows: usize,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(Args, Debug)]
pub struct MqttArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    #[arg(long, default_value = "bench")]
    tenant: String,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Total publishes per second across devices, or "max".
    #[arg(long, default_value = "max")]
    rate: String,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// 0, 1 or 2 (QoS 2 ack latency: publish → PUBCOMP).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// MQTT protocol level: 3.1.1 or 5.
    #[arg(long, value_enum, default_value = "3.1.1")]
    protocol: mqtt::Protocol,
    /// Instead: 3.1.1 QoS 1, 3.1.1 QoS 2 and 5.0 QoS 1 one after the other
    /// (same devices, --duration each), a table and the ratios
    /// QoS 2 / QoS 1 and 5.0 / 3.1.1.
    #[arg(long, conflicts_with_all = ["qos", "protocol"])]
    compare: bool,
    /// Runs of each cell, interleaved with --compare (A B C A B C …), each
    /// cell reported over all its runs: drift and other load on the machine
    /// then fall on every cell alike.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Publishes in flight per device (rumqttc inflight window).
    #[arg(long, default_value_t = 32)]
    inflight: u16,
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Another broker (e.g. mosquitto): no registration, no credentials.
    #[arg(long)]
    plain: bool,
    /// HTTP API of the appliance, to register the bench devices.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN")]
    admin_token: Option<String>,
    #[arg(long)]
    no_raw: bool,
}

#[derive(Args, Debug)]
pub struct StreamArgs {
    /// Appliance that ingests.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Appliance whose WebSocket subscribers listen (default: --url).
    #[arg(long)]
    sub_url: Option<String>,
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Events per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent WebSocket subscribers.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Instead: step through 1, 10, 50, 100, 200, 400, 800, 1600 subscribers
    /// (each for --duration) until p99 passes 100 ms.
    #[arg(long)]
    sweep: bool,
    /// Admin token of --url (default: minted from this config).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Admin token of --sub-url (default: --admin-token).
    #[arg(long)]
    sub_admin_token: Option<String>,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Central PostgreSQL (password from OUTPOST_CENTRAL_PASSWORD).
    #[arg(long)]
    url: String,
    /// Backlog size.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Rows per trigger-cost run.
    #[arg(long, default_value_t = 200_000)]
    trigger_rows: usize,
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
}

#[derive(Args, Debug)]
pub struct HttpArgs {
    /// Base URL of the appliance.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Tenant to register the bench devices in.
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Concurrent devices (one client loop each).
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// Total events per second across devices, or "max".
    #[arg(long, default_value = "max")]
    rate: String,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events per request: 1 posts to /event, more to /events.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Admin token (default: minted from this config's signing secret).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Skip the raw SQLite measurement.
    #[arg(long)]
    no_raw: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = Config::load(cli.config.as_deref(), std::env::vars())
        .map_err(anyhow::Error::from)
        .and_then(|config| runtime.block_on(run(cli.command, config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a bench command.
async fn run(cmd: BenchCommand, config: Config) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Raw { rows, duration } => {
            let f = raw_commit_rate(&config, rows, 128, duration).await?;
            println!(
                "raw durable append: {:.0} rows/s, {} bytes written per event ({rows}-row transactions, synchronous=FULL, WAL)",
                f.rows_per_second,
                f.bytes_per_event.map_or("n/a".into(), |b| format!("{b:.0}"))
            );
            Ok(())
        }
        BenchCommand::Http(args) => http::run(args, config).await,
        BenchCommand::Forward(args) => forward::run(args, config).await,
        BenchCommand::Fleet(args) => fleet::run(args, config).await,
        BenchCommand::Mqtt(args) => mqtt::run(args, config).await,
        BenchCommand::Stream(args) => stream::run(args, config).await,
    }
}

/// The raw limit of a durable append at one transaction size.
#[derive(Debug, Clone, Copy)]
pub struct RawFigure {
    pub rows: usize,
    pub rows_per_second: f64,
    /// Bytes this process wrote to storage per row (WAL and a final
    /// checkpoint); `None` where `/proc/self/io` is absent.
    pub bytes_per_event: Option<f64>,
}

/// Commits `rows`-row transactions into a scratch database in the data dir
/// for `duration`: the minimal durable append of
/// `../shared/bench/raw_append.py` (WAL, synchronous=FULL, an integer key,
/// a unique 16-byte time-ordered id, device, type, timestamp, payload), not
/// the site log's schema, so it is the disk's limit.
pub async fn raw_commit_rate(
    config: &Config,
    rows: usize,
    payload_bytes: usize,
    duration: Duration,
) -> anyhow::Result<RawFigure> {
    let dir = config.site.data_dir.clone();
    std::fs::create_dir_all(&dir)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<RawFigure> {
        let path = dir.join(format!("bench-raw-{}.sqlite", std::process::id()));
        let result = (|| -> anyhow::Result<RawFigure> {
            let mut conn = rusqlite::Connection::open(&path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(
                "CREATE TABLE e (seq INTEGER PRIMARY KEY, id BLOB NOT NULL, device TEXT NOT NULL,
                                 type TEXT NOT NULL, ts INTEGER NOT NULL, payload TEXT NOT NULL);
                 CREATE UNIQUE INDEX e_id ON e (id);",
            )?;
            let payload = payload(0, payload_bytes);
            let written = outpost::sysinfo::process_write_bytes;
            let w0 = written();
            let started = Instant::now();
            let mut total = 0usize;
            while started.elapsed() < duration {
                let tx = conn.transaction()?;
                {
                    let mut insert =
                        tx.prepare_cached("INSERT INTO e (id, device, type, ts, payload) VALUES (?1, ?2, ?3, ?4, ?5)")?;
                    for _ in 0..rows {
                        let id = uuid::Uuid::now_v7();
                        let device = format!("dev-{}", total % 64);
                        insert.execute(rusqlite::params![
                            &id.as_bytes()[..],
                            device,
                            "bench.raw",
                            now_us(),
                            payload
                        ])?;
                        total += 1;
                    }
                }
                tx.commit()?;
            }
            let rows_per_second = total as f64 / started.elapsed().as_secs_f64();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            drop(conn);
            let bytes_per_event = match (w0, written()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / total.max(1) as f64),
                _ => None,
            };
            Ok(RawFigure { rows, rows_per_second, bytes_per_event })
        })();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        result
    })
    .await?
}

/// Measures the raw limit at 1-, 100- and 1000-row transactions and prints
/// the ratios: the rate against the best raw rate, the bytes per event
/// against the transaction size closest to the appliance's own groups.
pub async fn report_raw(config: &Config, payload_bytes: usize, accepted_rate: f64) -> anyhow::Result<RawLimit> {
    let raw = RawLimit::measure(config, payload_bytes).await?;
    raw.print();
    raw.print_ratio(accepted_rate);
    Ok(raw)
}

/// The raw limit at 1-, 100- and 1000-row transactions.
pub struct RawLimit {
    pub figures: [RawFigure; 3],
}

impl RawLimit {
    pub async fn measure(config: &Config, payload_bytes: usize) -> anyhow::Result<RawLimit> {
        let second = Duration::from_secs(3);
        let one = raw_commit_rate(config, 1, payload_bytes, second).await?;
        let hundred = raw_commit_rate(config, 100, payload_bytes, second).await?;
        let thousand = raw_commit_rate(config, 1000, payload_bytes, second).await?;
        Ok(RawLimit { figures: [one, hundred, thousand] })
    }

    pub fn best(&self) -> f64 {
        self.figures.iter().map(|f| f.rows_per_second).fold(0.0, f64::max)
    }

    /// The figure of `rows`-row transactions.
    pub fn at(&self, rows: usize) -> RawFigure {
        *self.figures.iter().find(|f| f.rows == rows).unwrap_or(&self.figures[0])
    }

    pub fn print(&self) {
        println!("raw durable append, same disk, same run (raw_append.py's schema, WAL, synchronous=FULL):");
        for f in &self.figures {
            println!(
                "  {:>4}-row transactions: {:>9.0} rows/s, {} bytes written per event",
                f.rows,
                f.rows_per_second,
                f.bytes_per_event.map_or("n/a".into(), |b| format!("{b:.0}"))
            );
        }
    }

    pub fn print_ratio(&self, accepted_rate: f64) {
        println!(
            "ratio: {:.1}% of the best raw rate ({:.1}% of the 100-row rate)",
            100.0 * accepted_rate / self.best(),
            100.0 * accepted_rate / self.at(100).rows_per_second
        );
    }
}

/// What the appliance wrote to storage, from its `/metrics`
/// (`outpost_log_write_bytes_total`, `outpost_log_events_written_total`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Wear {
    pub write_bytes: u64,
    pub events_written: u64,
    pub backlog_rows: u64,
    pub uplink_up: bool,
}

impl Wear {
    pub async fn read(client: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<Wear> {
        let text = client.get(format!("{base}/metrics")).bearer_auth(token).send().await?.text().await?;
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        Ok(Wear {
            write_bytes: value("outpost_log_write_bytes_total"),
            events_written: value("outpost_log_events_written_total"),
            backlog_rows: value("outpost_backlog_rows"),
            uplink_up: value("outpost_uplink_up") == 1,
        })
    }

    /// The reading once the forwarder has marked what the run wrote (when
    /// the uplink is up; at most 60 s), so marking counts in the figure.
    pub async fn settled(client: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<Wear> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let w = Wear::read(client, base, token).await?;
            if !w.uplink_up || w.backlog_rows == 0 || Instant::now() > deadline {
                return Ok(w);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Prints the bytes the appliance wrote per event since `before`, next
    /// to the raw figure of `raw_rows`-row transactions.
    pub fn print_since(&self, before: &Wear, raw: Option<&RawLimit>, raw_rows: usize) {
        let bytes = self.write_bytes.saturating_sub(before.write_bytes);
        let events = self.events_written.saturating_sub(before.events_written);
        if events == 0 {
            println!("bytes written: no event written");
            return;
        }
        let per_event = bytes as f64 / events as f64;
        let marking = if self.uplink_up { "forwarding on: ingest + marking" } else { "no uplink: ingest only" };
        print!("appliance wrote {bytes} bytes for {events} events = {per_event:.0} bytes per event ({marking})");
        match raw.and_then(|r| r.at(raw_rows).bytes_per_event) {
            Some(r) if r > 0.0 => println!("; raw {raw_rows}-row append {r:.0}: {:.2}x raw", per_event / r),
            _ => println!(),
        }
    }
}

fn payload(i: usize, bytes: usize) -> String {
    let base = json!({"i": i, "temp_c": 21.5, "ok": true}).to_string();
    let pad = bytes.saturating_sub(base.len() + 10);
    json!({"i": i, "temp_c": 21.5, "ok": true, "pad": "x".repeat(pad)}).to_string()
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    accepted: u64,
    rejected: u64,
    errors: Vec<String>,
}

/// Registers `n` bench devices through the admin API: (device id, token).
async fn register_devices(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    admin: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("bench-{run_id}-{i}");
        let resp = client
            .post(format!("{base}/api/v1/realtime/{tenant}/device/register"))
            .bearer_auth(admin)
            .json(&json!({"device_id": id, "ttl": "2h"}))
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        if !resp.status().is_success() {
            bail!("registering {id}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        let v: serde_json::Value = resp.json().await?;
        tokens.push((id, v["token"].as_str().unwrap_or_default().to_string()));
    }
    Ok(tokens)
}

fn admin_token(given: Option<String>, config: &Config) -> anyhow::Result<String> {
    match given {
        Some(t) => Ok(t),
        None => {
            let (a, _) = Authenticator::from_config(config, Arc::new(Registry::default()))
                .context("minting an admin token from the config's signing secret (or pass --admin-token)")?;
            Ok(a.issue_admin(Some(Duration::from_secs(3600)))?)
        }
    }
}

/// The pacing of device `i` of `n` sending every `interval`: its ticks are
/// offset by `i / n` of the interval, so a paced run arrives spread out as
/// real devices do, not as `n`-request bursts that group commit flatters.
fn paced(interval: Duration, i: usize, n: usize) -> tokio::time::Interval {
    let offset = interval.mul_f64(i as f64 / n.max(1) as f64);
    let mut it = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    it.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    it
}

/// `--rate`: events per second, or "max" (`None`).
fn parse_rate(s: &str) -> anyhow::Result<Option<f64>> {
    match s {
        "max" => Ok(None),
        r => Ok(Some(r.parse::<f64>().ok().filter(|r| *r > 0.0).context("--rate: a positive number or \"max\"")?)),
    }
}

/// p50, p99 and max in ms of µs samples, and the sample count.
fn percentiles(mut v: Vec<u32>) -> (f64, f64, f64, usize) {
    v.sort_unstable();
    let pct = |p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        f64::from(v[i]) / 1000.0
    };
    (pct(0.5), pct(0.99), pct(1.0), v.len())
}

fn synthetic(tenant: &str, i: usize, payload: &str) -> Event {
    let now = now_us();
    Event {
        id: uuid::Uuid::now_v7(),
        tenant: tenant.into(),
        device_id: format!("dev-{}", i % 100),
        event_type: "bench.reading".into(),
        payload: payload.to_string(),
        timestamp_us: now,
        received_at_us: now,
        origin_site: "bench-site".into(),
        properties: None,
    }
}

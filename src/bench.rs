//! `outpost bench`: load generators that drive a running appliance and put
//! the result next to the raw limit of the same machine, measured in the same
//! run (SQLite group commits of the same schema, on the same disk). Numbers
//! for notes, never assertions in tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::auth::{Authenticator, Registry};
use crate::config::Config;
use crate::event::{Event, now_us};
use crate::log::{self, schema};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Drive HTTP ingest: devices post single events or batches.
    Http(HttpArgs),
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

/// Runs a bench command.
pub async fn run(cmd: BenchCommand, config: Config) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Raw { rows, duration } => {
            let rate = raw_commit_rate(&config, rows, 128, duration).await?;
            println!(
                "raw group commit: {rate:.0} rows/s ({rows}-row transactions, synchronous=FULL, WAL, site-log schema)"
            );
            Ok(())
        }
        BenchCommand::Http(args) => http(args, config).await,
    }
}

/// Commits `rows`-row transactions of site-log rows into a scratch database in
/// the data dir for `duration`; rows per second.
pub async fn raw_commit_rate(
    config: &Config,
    rows: usize,
    payload_bytes: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let dir = config.site.data_dir.clone();
    std::fs::create_dir_all(&dir)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let path = dir.join(format!("bench-raw-{}.sqlite", std::process::id()));
        let result = (|| -> anyhow::Result<f64> {
            let mut conn = log::open_and_migrate(&path)?;
            let payload = payload(0, payload_bytes);
            let started = Instant::now();
            let mut total = 0usize;
            while started.elapsed() < duration {
                let tx = conn.transaction()?;
                for _ in 0..rows {
                    let e = Event {
                        id: uuid::Uuid::now_v7(),
                        tenant: "bench".into(),
                        device_id: format!("raw-{}", total % 100),
                        event_type: "bench.raw".into(),
                        payload: payload.clone(),
                        timestamp_us: now_us(),
                        received_at_us: now_us(),
                        origin_site: "bench".into(),
                    };
                    schema::insert_event(&tx, &e, None)?;
                    total += 1;
                }
                tx.commit()?;
            }
            Ok(total as f64 / started.elapsed().as_secs_f64())
        })();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        result
    })
    .await?
}

/// Measures the raw limit at two transaction sizes and prints the ratio
/// against the larger (the writer's group commits can exceed 100 rows, so
/// 100-row transactions alone would flatter the appliance).
pub async fn report_raw(config: &Config, payload_bytes: usize, accepted_rate: f64) -> anyhow::Result<()> {
    let raw100 = raw_commit_rate(config, 100, payload_bytes, Duration::from_secs(3)).await?;
    let raw1000 = raw_commit_rate(config, 1000, payload_bytes, Duration::from_secs(3)).await?;
    println!(
        "raw group commit, same disk, same run (site-log schema, synchronous=FULL): \
         {raw100:.0} rows/s in 100-row transactions, {raw1000:.0} rows/s in 1000-row transactions"
    );
    let best = raw100.max(raw1000);
    println!(
        "ratio: {:.1}% of the best raw rate ({:.1}% of the 100-row rate)",
        100.0 * accepted_rate / best,
        100.0 * accepted_rate / raw100
    );
    Ok(())
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

async fn http(args: HttpArgs, config: Config) -> anyhow::Result<()> {
    if args.devices == 0 || args.batch == 0 {
        bail!("--devices and --batch must be at least 1");
    }
    let rate: Option<f64> = match args.rate.as_str() {
        "max" => None,
        r => Some(r.parse::<f64>().ok().filter(|r| *r > 0.0).context("--rate: a positive number or \"max\"")?),
    };
    let admin = match args.admin_token.clone() {
        Some(t) => t,
        None => {
            let (a, _) = Authenticator::from_config(&config, Arc::new(Registry::default()))
                .context("minting an admin token from the config's signing secret (or pass --admin-token)")?;
            a.issue_admin(Some(Duration::from_secs(3600)))?
        }
    };
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.devices * 2).build()?;
    let base = args.url.trim_end_matches('/').to_string();
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut tokens = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let id = format!("bench-{run_id}-{i}");
        let resp = client
            .post(format!("{base}/api/v1/realtime/{}/device/register", args.tenant))
            .bearer_auth(&admin)
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
    println!(
        "bench http: {} devices, rate {}, batch {}, payload ~{} B, {:?} against {base}",
        args.devices,
        rate.map_or("max".into(), |r| format!("{r}/s")),
        args.batch,
        args.payload_bytes,
        args.duration
    );
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    for (id, token) in tokens {
        let client = client.clone();
        let url = if args.batch == 1 {
            format!("{base}/api/v1/realtime/{}/event", args.tenant)
        } else {
            format!("{base}/api/v1/realtime/{}/events", args.tenant)
        };
        let interval = rate.map(|r| Duration::from_secs_f64(args.batch as f64 * args.devices as f64 / r));
        let (batch, pbytes) = (args.batch, args.payload_bytes);
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut tick = interval.map(|i| {
                let mut it = tokio::time::interval(i);
                it.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                it
            });
            let mut n = 0usize;
            while Instant::now() < deadline {
                if let Some(tick) = tick.as_mut() {
                    tick.tick().await;
                }
                let events: Vec<_> = (0..batch)
                    .map(|k| json!({"device_id": id, "event_type": "bench.reading",
                                    "payload": serde_json::from_str::<serde_json::Value>(&payload(n + k, pbytes)).unwrap_or_default()}))
                    .collect();
                n += batch;
                let body = if batch == 1 { events[0].clone() } else { json!(events) };
                let sent = Instant::now();
                match client.post(&url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                        t.latencies_us.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                        let _ = r.bytes().await;
                        t.accepted += batch as u64;
                    }
                    Ok(r) => {
                        t.rejected += batch as u64;
                        if t.errors.len() < 3 {
                            t.errors.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default()));
                        }
                    }
                    Err(e) => {
                        t.rejected += batch as u64;
                        if t.errors.len() < 3 {
                            t.errors.push(e.to_string());
                        }
                    }
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await?;
        all.latencies_us.extend(t.latencies_us);
        all.accepted += t.accepted;
        all.rejected += t.rejected;
        all.errors.extend(t.errors);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted_rate = all.accepted as f64 / elapsed;
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((all.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all.latencies_us[i]) / 1000.0
    };
    println!(
        "accepted {} events in {elapsed:.1}s = {accepted_rate:.0} events/s; refused {}",
        all.accepted, all.rejected
    );
    for e in all.errors.iter().take(3) {
        println!("  e.g. refused: {e}");
    }
    println!(
        "ack latency (per request): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} requests)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        all.latencies_us.len()
    );
    if !args.no_raw {
        report_raw(&config, args.payload_bytes, accepted_rate).await?;
    }
    Ok(())
}

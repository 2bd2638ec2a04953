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
    /// Drive MQTT ingest: devices publish QoS 1 (rumqttc); PUBACK latency.
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
    /// 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
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
        BenchCommand::Forward(args) => forward(args, config).await,
        BenchCommand::Mqtt(args) => mqtt(args, config).await,
        BenchCommand::Stream(args) => stream(args, config).await,
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
                        redelivery: None,
                        protocol: "bench",
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
    let rate = parse_rate(&args.rate)?;
    let admin = admin_token(args.admin_token.clone(), &config)?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.devices * 2).build()?;
    let base = args.url.trim_end_matches('/').to_string();
    let tokens = register_devices(&client, &base, &args.tenant, &admin, args.devices).await?;
    println!(
        "bench http: {} devices, rate {}, batch {}, payload ~{} B, {:?} against {base}",
        args.devices,
        rate.map_or("max".into(), |r| format!("{r}/s")),
        args.batch,
        args.payload_bytes,
        args.duration
    );
    http_load(args, rate, client, base, tokens, config).await
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

async fn http_load(
    args: HttpArgs,
    rate: Option<f64>,
    client: reqwest::Client,
    base: String,
    tokens: Vec<(String, String)>,
    config: Config,
) -> anyhow::Result<()> {
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
    let (p50, p99, max, requests) = percentiles(all.latencies_us);
    println!(
        "accepted {} events in {elapsed:.1}s = {accepted_rate:.0} events/s; refused {}",
        all.accepted, all.rejected
    );
    for e in all.errors.iter().take(3) {
        println!("  e.g. refused: {e}");
    }
    println!("ack latency (per request): p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms  ({requests} requests)");
    if !args.no_raw {
        report_raw(&config, args.payload_bytes, accepted_rate).await?;
    }
    Ok(())
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
        redelivery: None,
        protocol: "bench",
    }
}

async fn forward(args: ForwardArgs, config: Config) -> anyhow::Result<()> {
    use crate::config::{NotifyMode, TlsMode};
    use crate::forward::{ForwardStatus, Forwarder, Uplink, schema as central_schema, service::Connector};

    let mut central = config.central.clone();
    central.url = Some(args.url.clone());
    if central.tls == TlsMode::Prefer && args.url.contains("127.0.0.1") {
        central.tls = TlsMode::Disable;
    }
    let connector = Connector::new(&central)?;
    let mut admin = connector.connect().await.context("connecting to the bench database")?;
    for t in ["benchraw", "benchfwd", "benchtrig_none", "benchtrig_per_row", "benchtrig_per_batch"] {
        admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{t} CASCADE")).await?;
    }
    let dir = config.site.data_dir.join(format!("bench-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("site-log.sqlite");
    let payload = payload(0, args.payload_bytes);

    // 1. The backlog: `rows` pending events in a fresh site log.
    let started = Instant::now();
    {
        let (path, payload, n) = (log_path.clone(), payload.clone(), args.rows);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = log::open_and_migrate(&path)?;
            for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
                let tx = conn.transaction()?;
                for i in chunk {
                    schema::insert_event(&tx, &synthetic("benchfwd", *i, &payload), None)?;
                }
                tx.commit()?;
            }
            Ok(())
        })
        .await??;
    }
    println!("backlog: {} events written to a scratch site log in {:.1}s", args.rows, started.elapsed().as_secs_f64());

    // 2. Raw limit: the same rows, already in memory, COPY + INSERT … ON CONFLICT
    //    in central.batch_rows batches, one transaction each.
    let rows = {
        let p = log_path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<crate::event::StoredEvent>> {
            Ok(schema::all_events(&log::open(&p, true)?)?)
        })
        .await??
    };
    central_schema::migrate_tenant(admin.client_mut(), "benchraw", NotifyMode::PerBatch).await?;
    let started = Instant::now();
    for chunk in rows.chunks(central.batch_rows) {
        let refs: Vec<&crate::event::StoredEvent> = chunk.iter().collect();
        admin.write("tenant_benchraw", &refs).await?;
    }
    let raw_rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw COPY BINARY + INSERT ON CONFLICT (per_batch trigger, {}-row transactions): {raw_rate:.0} rows/s",
        central.batch_rows
    );
    drop(rows);

    // 3. The forwarder draining the backlog from the site log.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let conn = log::open_and_migrate(&log_path)?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let (handle, writer) = log::writer::spawn(
        conn,
        log::WriterConfig {
            max_bytes: u64::MAX,
            commit_max_rows: 10_000,
            commit_max_bytes: 64 << 20,
            queue_capacity: 64,
        },
        metrics.clone(),
        wake.clone(),
    )?;
    let readers = log::Readers::new(log_path.clone());
    central.notify = NotifyMode::PerBatch;
    central.batch_wait = Duration::ZERO;
    let forwarder = Forwarder {
        connector: connector.clone(),
        config: central.clone(),
        log: handle,
        readers: readers.clone(),
        status: Arc::new(ForwardStatus::new(Uplink::Connecting)),
        metrics,
        wake,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let s = stop.clone();
        async move { forwarder.run(s).await }
    });
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !readers.with(schema::has_pending).await? {
            break;
        }
    }
    let drain_rate = args.rows as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    tokio::task::spawn_blocking(move || writer.join()).await?;
    println!(
        "forwarder drain of {} events (site log → central, marked forwarded): {drain_rate:.0} rows/s = {:.1}% of raw",
        args.rows,
        100.0 * drain_rate / raw_rate
    );

    // 4. Trigger cost: the same insert path with no trigger, per_row, per_batch.
    let sample: Vec<crate::event::StoredEvent> = {
        let p = log_path.clone();
        let n = args.trigger_rows;
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let conn = log::open(&p, true)?;
            Ok(schema::all_events(&conn)?.into_iter().take(n).collect())
        })
        .await??
    };
    // Interleaved rounds on fresh tables (a resend would insert nothing and
    // fire no row trigger); the best round of each style counts.
    let modes = [("none", None), ("per_row", Some(NotifyMode::PerRow)), ("per_batch", Some(NotifyMode::PerBatch))];
    let mut rates = [0f64; 3];
    for round in 0..3 {
        for (i, (name, mode)) in modes.iter().enumerate() {
            let tenant = format!("benchtrig_{name}");
            admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{tenant} CASCADE")).await?;
            central_schema::migrate_tenant(admin.client_mut(), &tenant, mode.unwrap_or(NotifyMode::PerBatch)).await?;
            if mode.is_none() {
                admin
                    .client_mut()
                    .batch_execute(&format!("DROP TRIGGER events_notify_batch ON tenant_{tenant}.events"))
                    .await?;
            }
            admin.client_mut().batch_execute("CHECKPOINT").await?;
            let started = Instant::now();
            for chunk in sample.chunks(central.batch_rows) {
                let refs: Vec<&crate::event::StoredEvent> = chunk.iter().collect();
                admin.write(&format!("tenant_{tenant}"), &refs).await?;
            }
            let rate = sample.len() as f64 / started.elapsed().as_secs_f64();
            println!("trigger {name:<9} round {round}: {rate:.0} rows/s");
            rates[i] = rates[i].max(rate);
        }
    }
    println!(
        "trigger best of 3 ({} rows, {}-row transactions): none {:.0}, per_row {:.0}, per_batch {:.0} rows/s",
        sample.len(),
        central.batch_rows,
        rates[0],
        rates[1],
        rates[2]
    );
    println!(
        "trigger cost vs none: per_row {:.1}% slower, per_batch {:.1}% slower",
        100.0 * (1.0 - rates[1] / rates[0]),
        100.0 * (1.0 - rates[2] / rates[0])
    );
    for t in ["benchraw", "benchfwd", "benchtrig_none", "benchtrig_per_row", "benchtrig_per_batch"] {
        admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{t} CASCADE")).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn mqtt(args: MqttArgs, config: Config) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    if args.devices == 0 || args.qos > 1 {
        bail!("--devices must be at least 1 and --qos 0 or 1");
    }
    let rate = parse_rate(&args.rate)?;
    let devices: Vec<(String, Option<String>)> = if args.plain {
        (0..args.devices).map(|i| (format!("bench-{i}"), None)).collect()
    } else {
        let admin = admin_token(args.admin_token.clone(), &config)?;
        let client = reqwest::Client::new();
        register_devices(&client, args.url.trim_end_matches('/'), &args.tenant, &admin, args.devices)
            .await?
            .into_iter()
            .map(|(id, t)| (id, Some(t)))
            .collect()
    };
    println!(
        "bench mqtt: {} devices, rate {}, QoS {}, inflight {}, payload ~{} B, {:?} against {}:{}{}",
        args.devices,
        rate.map_or("max".into(), |r| format!("{r}/s")),
        args.qos,
        args.inflight,
        args.payload_bytes,
        args.duration,
        args.host,
        args.port,
        if args.plain { " (plain broker)" } else { "" }
    );
    let qos = if args.qos == 1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    for (id, token) in devices {
        let mut o = MqttOptions::new(id.clone(), args.host.clone(), args.port);
        if let Some(t) = &token {
            o.set_credentials(id.clone(), t.clone());
        }
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(args.inflight);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, usize::from(args.inflight) * 2);
        let topic = format!("{}/devices/{id}/events/bench.reading", args.tenant);
        let interval = rate.map(|r| Duration::from_secs_f64(args.devices as f64 / r));
        let body = payload(0, args.payload_bytes);
        let publisher = tokio::spawn(async move {
            let mut tick = interval.map(|i| {
                let mut it = tokio::time::interval(i);
                it.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                it
            });
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                if client.publish(topic.clone(), qos, false, body.clone()).await.is_err() {
                    break;
                }
            }
            let _ = client.disconnect().await;
        });
        tasks.push(tokio::spawn(async move {
            let mut sent: std::collections::HashMap<u16, Instant> = std::collections::HashMap::new();
            let (mut lat, mut acked, mut errors) = (Vec::new(), 0u64, 0u64);
            let stop = deadline + Duration::from_secs(5);
            while Instant::now() < stop {
                match tokio::time::timeout(Duration::from_secs(1), el.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if qos == QoS::AtMostOnce {
                            acked += 1;
                        } else {
                            sent.insert(pkid, Instant::now());
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                        if let Some(t) = sent.remove(&a.pkid) {
                            lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                            acked += 1;
                        }
                    }
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => {
                        errors += 1;
                        if Instant::now() > deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) if Instant::now() > deadline => break,
                    Err(_) => {}
                }
            }
            let _ = publisher.await;
            (lat, acked, errors)
        }));
    }
    let (mut all, mut acked, mut errors) = (Vec::new(), 0u64, 0u64);
    for t in tasks {
        let (l, a, e) = t.await?;
        all.extend(l);
        acked += a;
        errors += e;
    }
    let elapsed = args.duration.as_secs_f64();
    let rate_done = acked as f64 / elapsed;
    let (p50, p99, max, n) = percentiles(all);
    println!("acked {acked} publishes in {elapsed:.1}s = {rate_done:.0} events/s; connection errors {errors}");
    if args.qos == 1 {
        println!("PUBACK latency: p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms  ({n} acks)");
    }
    if !args.no_raw {
        report_raw(&config, args.payload_bytes, rate_done).await?;
    }
    Ok(())
}

/// One round of the stream bench: latencies (µs) of every delivery.
async fn stream_round(
    args: &StreamArgs,
    publisher: &(String, String),
    sub_token: &str,
    subscribers: usize,
) -> anyhow::Result<(Vec<u32>, u64, u64)> {
    use futures_util::StreamExt;
    let base = args.url.trim_end_matches('/').to_string();
    let sub_base = args.sub_url.as_deref().unwrap_or(&args.url).trim_end_matches('/').replacen("http", "ws", 1);
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let url = format!(
            "{sub_base}/api/v1/realtime/{}/stream?access_token={sub_token}&event_types=bench.latency",
            args.tenant
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await.context("websocket connect")?;
        subs.push(ws);
    }
    let end = Instant::now() + args.duration;
    let stop_at = end + Duration::from_secs(3);
    let mut readers = Vec::new();
    for mut ws in subs {
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(stop_at.into(), ws.next()).await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = msg
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str())
                    && let Some(sent) = v["event"]["payload"]["sent_us"].as_i64()
                {
                    lat.push(u32::try_from((now_us() - sent).max(0)).unwrap_or(u32::MAX));
                }
            }
            lat
        }));
    }
    let client = reqwest::Client::new();
    let (device, token) = publisher;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut inflight = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let (client, url, token) =
            (client.clone(), format!("{base}/api/v1/realtime/{}/event", args.tenant), token.clone());
        let body = json!({"device_id": device, "event_type": "bench.latency", "payload": {"sent_us": now_us()}});
        inflight.push(tokio::spawn(async move {
            client.post(url).bearer_auth(token).json(&body).send().await.map(|r| r.status().as_u16())
        }));
        sent += 1;
        if inflight.len() > 256 {
            for h in inflight.drain(..128) {
                if !matches!(h.await, Ok(Ok(201))) {
                    refused += 1;
                }
            }
        }
    }
    for h in inflight {
        if !matches!(h.await, Ok(Ok(201))) {
            refused += 1;
        }
    }
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await?);
    }
    Ok((all, sent, refused))
}

async fn stream(args: StreamArgs, config: Config) -> anyhow::Result<()> {
    let admin = admin_token(args.admin_token.clone(), &config)?;
    let sub_admin = args.sub_admin_token.clone().unwrap_or_else(|| admin.clone());
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/').to_string();
    let publisher = register_devices(&client, &base, &args.tenant, &admin, 1).await?.remove(0);
    let sub_base = args.sub_url.as_deref().unwrap_or(&args.url).trim_end_matches('/').to_string();
    let (_, sub_token) = register_devices(&client, &sub_base, &args.tenant, &sub_admin, 1).await?.remove(0);
    if args.sub_url.is_some() {
        // The subscriber site LISTENs for a tenant once it has a device there.
        println!("waiting 7 s for the subscriber site to LISTEN on tenant {}…", args.tenant);
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    let steps: Vec<usize> = if args.sweep { vec![1, 10, 50, 100, 200, 400, 800, 1600] } else { vec![args.subscribers] };
    println!("bench stream: {} ev/s for {:?}, ingest at {base}, subscribers at {sub_base}", args.rate, args.duration);
    for n in steps {
        let (lat, sent, refused) = stream_round(&args, &publisher, &sub_token, n).await?;
        let expected = sent.saturating_sub(refused) * n as u64;
        let got = lat.len() as u64;
        let (p50, p99, max, _) = percentiles(lat);
        println!(
            "{n:>5} subscribers: delivered {got}/{expected}  latency p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms{}",
            if refused > 0 { format!("  ({refused} posts refused)") } else { String::new() }
        );
        if args.sweep && (p99 > 100.0 || got < expected) {
            println!("stop: p99 above 100 ms or deliveries missing at {n} subscribers");
            break;
        }
    }
    Ok(())
}

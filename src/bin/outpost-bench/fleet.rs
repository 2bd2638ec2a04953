//! `outpost-bench fleet`: N simulated sites in this one process, each a real
//! appliance (`app::start`: its own site log, writer thread, forwarder and
//! central connection, LISTEN connection when someone there subscribes), so
//! a 2-core machine measures central rather than N processes' overhead.
//!
//! Site `i` belongs to tenant `i % tenants` and appends `rate` events/s from
//! its device `s<i>` straight to its log (no HTTP in between). Every
//! `sub_every`-th site holds a feed of its tenant, which timestamps the other
//! sites' events as they reach that site's subscribers: ingest at A → A's
//! log → forwarder → central → NOTIFY → B's listener → B's log → B's feed,
//! one clock. After `warmup` it prints `measuring`, after `seconds` one JSON
//! line (`tests/bench/fleet.py --in-process` reads both and measures
//! central's CPU in between).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

#[derive(Args, Debug)]
pub struct FleetArgs {
    /// The central PostgreSQL.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// Tenants the sites are spread over (site i writes tenant i % tenants).
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Events per second per site.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Every n-th site has a subscriber (0: none).
    #[arg(long, default_value_t = 5)]
    sub_every: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    seconds: Duration,
    /// Where the sites' data dirs go (default: the config's data dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn tenant_of(i: usize, tenants: usize) -> String {
    format!("fleet{}", i % tenants.max(1))
}

pub async fn run(args: FleetArgs, base: Config) -> anyhow::Result<()> {
    use outpost::app;
    use outpost::config::TlsMode;

    let dir = args.dir.clone().unwrap_or_else(|| base.site.data_dir.join("fleet"));
    let mut sites = Vec::with_capacity(args.sites);
    let started = Instant::now();
    for i in 0..args.sites {
        let mut c = base.clone();
        c.site.id = Some(format!("sim-{i:04}"));
        c.site.data_dir = dir.join(format!("site-{i:04}"));
        c.http.listen = "127.0.0.1:0".parse()?;
        c.mqtt.enabled = false;
        c.central.url = Some(args.url.clone());
        if c.central.tls == TlsMode::Prefer && args.url.contains("127.0.0.1") {
            c.central.tls = TlsMode::Disable;
        }
        sites.push(app::start(c).await.with_context(|| format!("starting site {i}"))?);
    }
    eprintln!("fleet: {} sites up in {:.1}s", args.sites, started.elapsed().as_secs_f64());

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let sent = Arc::new(AtomicU64::new(0));
    let latencies: Arc<std::sync::Mutex<Vec<u32>>> = Default::default();
    let mut tasks = Vec::new();
    let mut subscribers = 0;
    for (i, site) in sites.iter().enumerate() {
        if args.sub_every > 0 && i % args.sub_every == 0 {
            subscribers += 1;
            let mut feed = site.feed(&tenant_of(i, args.tenants));
            let own = format!("s{i}");
            let (measuring, latencies, stop) = (measuring.clone(), latencies.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let e = tokio::select! {
                        e = feed.next() => e,
                        _ = stop.cancelled() => None,
                    };
                    let Some(e) = e else { break };
                    if e.device_id != own && measuring.load(Ordering::Relaxed) {
                        mine.push(((now_us() - e.received_at_us).max(0) / 10).min(u32::MAX as i64) as u32);
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
                feed.lagged
            }));
        }
    }
    // Open loop: each site appends on its own schedule, spread over the
    // first interval so the fleet does not tick in step.
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut appenders = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let (log, tenant, sent, stop) = (site.log().clone(), tenant_of(i, args.tenants), sent.clone(), stop.clone());
        let mut tick = paced(interval, i, args.sites);
        appenders.push(tokio::spawn(async move {
            let mut k = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return anyhow::Ok(()),
                }
                let now = now_us();
                let event = Event {
                    id: uuid::Uuid::now_v7(),
                    tenant: tenant.clone(),
                    device_id: format!("s{i}"),
                    event_type: "reading".into(),
                    payload: format!("{{\"k\":{k},\"v\":21.5}}"),
                    timestamp_us: now,
                    received_at_us: now,
                    origin_site: format!("sim-{i:04}"),
                    properties: None,
                };
                log.append(vec![event]).await?;
                sent.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        }));
    }
    let counters = |sites: &[app::Running]| {
        sites.iter().fold((0u64, 0u64, 0u64), |(b, f, n), s| {
            let m = s.metrics();
            (b + m.forward_batches.get(), f + m.remote_fetches.get(), n + m.remote_notifications.get())
        })
    };
    tokio::time::sleep(args.warmup).await;
    let (batches0, fetches0, notes0) = counters(&sites);
    let sent0 = sent.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    println!("measuring");
    let t0 = Instant::now();
    tokio::time::sleep(args.seconds).await;
    measuring.store(false, Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let (batches1, fetches1, notes1) = counters(&sites);
    let sent1 = sent.load(Ordering::Relaxed);
    println!("measured");
    stop.cancel();
    for a in appenders {
        a.await??;
    }
    let mut lagged = 0;
    for t in tasks {
        lagged += t.await?;
    }
    let lat = std::mem::take(&mut *latencies.lock().expect("latencies"));
    // `percentiles` reads milliseconds from microseconds; these are tens of µs.
    let (p50, p99, max, samples) = percentiles(lat);
    let out = json!({
        "sites": args.sites,
        "tenants": args.tenants,
        "rate": args.rate,
        "subscribers": subscribers,
        "offered": (sent1 - sent0) as f64 / dt,
        "sent": sent1,
        "batches_per_s": (batches1 - batches0) as f64 / dt,
        "fetches_per_s": (fetches1 - fetches0) as f64 / dt,
        "notifications_per_s": (notes1 - notes0) as f64 / dt,
        "p50_ms": p50 * 10.0,
        "p99_ms": p99 * 10.0,
        "max_ms": max * 10.0,
        "samples": samples,
        "lagged": lagged,
    });
    println!("{out}");
    // Keep the sites up until the harness has seen central catch up.
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    for s in sites {
        s.stop().await?;
    }
    Ok(())
}

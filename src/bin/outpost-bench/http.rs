//! `outpost-bench http`.

use super::*;

pub async fn run(args: HttpArgs, config: Config) -> anyhow::Result<()> {
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

async fn http_load(
    args: HttpArgs,
    rate: Option<f64>,
    client: reqwest::Client,
    base: String,
    tokens: Vec<(String, String)>,
    config: Config,
) -> anyhow::Result<()> {
    let admin = admin_token(args.admin_token.clone(), &config)?;
    let wear_before = Wear::read(&client, &base, &admin).await?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    let n = tokens.len();
    for (i, (id, token)) in tokens.into_iter().enumerate() {
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
            let mut tick = interval.map(|every| paced(every, i, n));
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
    let wear = Wear::settled(&client, &base, &admin).await?;
    let raw = if args.no_raw { None } else { Some(report_raw(&config, args.payload_bytes, accepted_rate).await?) };
    // Single posts at a set rate commit about one request each: compare
    // with 1-row transactions; batches with transactions of their size.
    let raw_rows = if args.batch >= 1000 {
        1000
    } else if args.batch >= 100 {
        100
    } else {
        1
    };
    wear.print_since(&wear_before, raw.as_ref(), raw_rows);
    Ok(())
}

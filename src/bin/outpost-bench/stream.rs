//! `outpost-bench stream`.

use super::*;

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

pub async fn run(args: StreamArgs, config: Config) -> anyhow::Result<()> {
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

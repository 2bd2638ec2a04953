//! `outpost-bench mqtt`.

use super::*;

pub async fn run(args: MqttArgs, config: Config) -> anyhow::Result<()> {
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

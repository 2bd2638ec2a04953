//! The memory bound (issue #26): with the default configuration, one
//! hostile device at its default limits cannot take the appliance past
//! 64 MB of RSS, whatever it does for 30 s (filter churn with long distinct
//! filters, topic-alias churn, persistent reconnect churn, a subscriber
//! that reads everything of a busy tenant, one that reads nothing), all at
//! once; and 5 s after it leaves, RSS is back within 4 MB of its level
//! before. Reported by `make test` (the figures print with --nocapture).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::mqtt_raw::v5::{self, prop_u16};
use common::mqtt_raw::{Raw, frame, string};
use common::{Proc, add_device as add};
use serde_json::json;

const ATTACK: Duration = Duration::from_secs(30);
const BOUND_MB: f64 = 64.0;

fn subscribe(pkid: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter, &mut body);
    body.push(qos);
    frame(0x82, &body)
}

fn unsubscribe(pkid: u16, filter: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter, &mut body);
    frame(0xa2, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hostile_device_cannot_take_the_appliance_past_its_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Defaults, but for the feeder that keeps the tenant busy.
    let config =
        "[limits.devices.\"acme/feeder\"]\nper_second = 1000000\nper_minute = 100000000\nper_hour = 1000000000\n";
    let p = Proc::start_with_config(dir.path(), config, &[]);
    let feeder = add(dir.path(), "acme", "feeder");
    let evil = add(dir.path(), "acme", "evil");
    let mqtt = p.mqtt.unwrap();
    let stop_feed = Arc::new(AtomicBool::new(false));
    // A busy tenant: about 1,000 events/s of 1 KB.
    let feed = {
        let (base, stop, token) = (p.base(), stop_feed.clone(), feeder.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let pad = "x".repeat(1000);
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..100)
                    .map(|i| json!({"device_id": "feeder", "event_type": "load", "payload": {"i": i, "pad": pad}}))
                    .collect();
                let url = format!("{base}/api/v1/realtime/acme/events");
                let r = client.post(url).bearer_auth(&token).json(&batch).send().await.unwrap();
                assert_eq!(r.status(), 201);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Warm-up under the feed (the site log's page cache fills meanwhile).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = p.rss_kb() as f64 / 1024.0;

    let stop = Arc::new(AtomicBool::new(false));
    let mut attacks = Vec::new();
    // Filter churn: distinct long filters, subscribed and unsubscribed as
    // fast as the rate limit lets it (over-long ones too).
    {
        let (stop, token) = (stop.clone(), evil.clone());
        attacks.push(tokio::spawn(async move {
            let (mut c, _) = Raw::connect(mqtt, "evil-filters", "evil", &token, 600, None).await;
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let pkid = (i % 60_000 + 1) as u16;
                let len = if i.is_multiple_of(10) { 60_000 } else { 500 };
                let filter = format!("acme/events/{i}/{}", "f".repeat(len));
                if !c.try_send(&subscribe(pkid, filter.as_bytes(), 1)).await
                    || !c.try_send(&unsubscribe(pkid, filter.as_bytes())).await
                {
                    break;
                }
                let _ = c.read_kind(11, Duration::from_secs(5)).await;
            }
        }));
    }
    // Alias churn: 64 KB topics outside the ACL, each setting an alias.
    {
        let (stop, token) = (stop.clone(), evil.clone());
        attacks.push(tokio::spawn(async move {
            let (mut c, _) = Raw::connect_v5(mqtt, "evil-aliases", "evil", &token, 600, true, &[]).await;
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let topic = format!("acme/elsewhere/{i}/{}", "t".repeat(64_000));
                let f = v5::publish_packet(&topic, b"{}", 0, 0, false, &prop_u16(0x23, (i % 32 + 1) as u16));
                if !c.try_send(&f).await {
                    break;
                }
                if i.is_multiple_of(32) {
                    c.send(&[0xc0, 0]).await;
                    let _ = c.read_kind(13, Duration::from_secs(5)).await;
                }
            }
        }));
    }
    // Persistent reconnect churn (as fast as mqtt.max_connects_per_minute lets it).
    {
        let (stop, token) = (stop.clone(), evil.clone());
        attacks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (mut c, code, _) =
                    Raw::connect_session(mqtt, &format!("evil-p{}", i % 8), "evil", &token, 60, None, false).await;
                if code == 0 {
                    let _ = c.try_send(&subscribe(1, b"acme/events/#", 1)).await;
                    c.disconnect().await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // A subscriber that reads everything of the busy tenant.
    {
        let (stop, token) = (stop.clone(), evil.clone());
        attacks.push(tokio::spawn(async move {
            let (mut c, _) = Raw::connect(mqtt, "evil-reader", "evil", &token, 600, None).await;
            c.send(&subscribe(1, b"acme/events/#", 0)).await;
            while !stop.load(Ordering::Relaxed) {
                let _ = c.read(Duration::from_millis(200)).await;
            }
        }));
    }
    // Subscribers that read nothing (QoS 0 and QoS 1), as many connections
    // as the device may hold.
    let mut stuck = Vec::new();
    for i in 0..8 {
        let (mut c, code) = Raw::connect(mqtt, &format!("evil-stuck{i}"), "evil", &evil, 600, None).await;
        if code == 0 {
            c.send(&subscribe(1, b"acme/events/#", (i % 2) as u8)).await;
            stuck.push(c);
        }
    }

    let mut peak = before;
    let started = std::time::Instant::now();
    while started.elapsed() < ATTACK {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(p.rss_kb() as f64 / 1024.0);
    }
    stop.store(true, Ordering::Relaxed);
    drop(stuck);
    for a in attacks {
        let _ = a.await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await; // "5 s after the attacker leaves"
    let after = p.rss_kb() as f64 / 1024.0;
    stop_feed.store(true, Ordering::Relaxed);
    feed.await.unwrap();
    eprintln!("RSS before {before:.1} MiB, peak under attack {peak:.1} MiB, 5 s after {after:.1} MiB");
    assert!(peak <= BOUND_MB, "RSS reached {peak:.1} MiB under attack (bound {BOUND_MB} MB)");
    assert!(after - before <= 4.0, "RSS {after:.1} MiB 5 s after the attack, {before:.1} MiB before");
}

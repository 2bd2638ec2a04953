//! MQTT under a hostile device, black-box against the real binary: every
//! byte a device can make the appliance hold is bounded (filters, topic
//! aliases, timers of ended sessions, deliveries for slow or absent
//! readers, connection slots), and every session can be ended (keep-alive,
//! revocation, a write timeout and shutdown, whatever the peer does; over
//! WebSocket too). Wills outlive nothing they should not.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::mqtt_raw::v5::{self, prop_u16, prop_u32};
use common::mqtt_raw::{Raw, frame, string};
use common::{FAST, Proc, add_device as add, cli, eventually, log_rows};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn fast(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

/// A 3.1.1 SUBSCRIBE of one filter at QoS 1.
fn subscribe(pkid: u16, filter: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter, &mut body);
    body.push(1);
    frame(0x82, &body)
}

/// A 3.1.1 UNSUBSCRIBE.
fn unsubscribe(pkid: u16, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        string(f, &mut body);
    }
    frame(0xa2, &body)
}

/// Posts `n` events of about `size` bytes each for `device`, in batches.
async fn post_events(p: &Proc, token: &str, device: &str, n: usize, size: usize) {
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/realtime/acme/events", p.base());
    let pad = "x".repeat(size);
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        let batch: Vec<_> = (0..k)
            .map(|i| json!({"device_id": device, "event_type": "load", "payload": {"i": i, "pad": pad}}))
            .collect();
        let r = client.post(&url).bearer_auth(token).json(&batch).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        left -= k;
    }
}

/// RSS after the appliance settled, in MiB.
fn rss_mb(p: &Proc) -> f64 {
    p.rss_kb() as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_filters_are_bounded_in_length_and_freed_when_unsubscribed() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    let (mut c, code) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &token, 60, None).await;
    assert_eq!(code, 0);
    let before = rss_mb(&p);
    // Distinct 60 KB filters: refused (over mqtt.max_topic_length) before
    // anything of them is kept.
    for i in 0..300u16 {
        let filter = format!("acme/events/{i}/{}", "f".repeat(60_000));
        c.send(&subscribe(i + 1, filter.as_bytes())).await;
        let ack = c.read_kind(9, T).await.expect("SUBACK");
        assert_eq!(ack.body[2], 0x80, "a 60 KB filter is refused");
        c.send(&unsubscribe(i + 1, &[filter.as_bytes()])).await;
        c.read_kind(11, T).await.expect("UNSUBACK");
    }
    // Distinct filters within the length: granted, and freed again.
    for i in 0..3000u16 {
        let filter = format!("acme/events/{i}/{}", "f".repeat(400));
        c.send(&subscribe(i + 1, filter.as_bytes())).await;
        assert_eq!(c.read_kind(9, T).await.expect("SUBACK").body[2], 1);
        c.send(&unsubscribe(i + 1, &[filter.as_bytes()])).await;
        c.read_kind(11, T).await.expect("UNSUBACK");
    }
    assert_eq!(p.metric("outpost_mqtt_subscribed_sessions").await, 0, "a session without filters is not kept");
    c.disconnect().await;
    assert!(c.closed(T).await);
    let grown = rss_mb(&p) - before;
    assert!(grown < 8.0, "RSS grew {grown:.1} MiB over filter churn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_its_own_filter_bound() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[("OUTPOST_MQTT__MAX_FILTERS", "4")]));
    let token = add(dir.path(), "acme", "d1");
    let mut n = 0u16;
    for round in 0..3 {
        let (mut c, code, present) = Raw::connect_session(p.mqtt.unwrap(), "d1", "d1", &token, 60, None, false).await;
        assert_eq!((code, present), (0, round > 0));
        let mut granted = 0;
        for _ in 0..4 {
            n += 1;
            c.send(&subscribe(n, format!("acme/events/f{n}").as_bytes())).await;
            if c.read_kind(9, T).await.expect("SUBACK").body[2] != 0x80 {
                granted += 1;
            }
        }
        assert_eq!(granted, if round == 0 { 4 } else { 0 }, "round {round}: the resumed session holds 4 already");
        c.disconnect().await;
        assert!(c.closed(T).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_are_kept_only_for_topics_the_device_may_publish_to() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    let before = rss_mb(&p);
    let mut conns = Vec::new();
    for i in 0..10 {
        let (mut c, ack) = Raw::connect_v5(p.mqtt.unwrap(), &format!("d1-{i}"), "d1", &token, 60, true, &[]).await;
        assert_eq!(ack.body[1], 0);
        for alias in 1..=32u16 {
            // 64 KB topics outside the device's ACL, each setting an alias:
            // refused (QoS 0: dropped), and the alias not kept.
            let topic = format!("acme/elsewhere/{alias}/{}", "t".repeat(64_000));
            c.send(&v5::publish_packet(&topic, b"{}", 0, 0, false, &prop_u16(0x23, alias))).await;
        }
        // The connection is still up: a ping is answered after all of them.
        c.send(&[0xc0, 0]).await;
        assert!(c.read_kind(13, T).await.is_some(), "PINGRESP");
        conns.push(c);
    }
    let grown = rss_mb(&p) - before;
    assert!(grown < 8.0, "RSS grew {grown:.1} MiB over topic aliases outside the ACL");
    // An alias of the device's own topic works as before.
    let c = &mut conns[0];
    c.send(&v5::publish_packet("acme/devices/d1/events/t", b"{\"n\":1}", 1, 1, false, &prop_u16(0x23, 1))).await;
    c.read_kind(4, T).await.expect("PUBACK");
    c.send(&v5::publish_packet("", b"{\"n\":2}", 1, 2, false, &prop_u16(0x23, 1))).await;
    c.read_kind(4, T).await.expect("PUBACK by alias");
    assert_eq!(log_rows(&dir.path().join("site-log.sqlite")).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_reconnects_leave_one_timer_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    for _ in 0..500 {
        let (mut c, code, _) = Raw::connect_session(p.mqtt.unwrap(), "d1", "d1", &token, 60, None, false).await;
        assert_eq!(code, 0);
        c.disconnect().await;
        assert!(c.closed(T).await);
    }
    assert!(
        eventually(T, || async { p.metric("outpost_mqtt_session_timers").await == 1 }).await,
        "timers of ended connections: {} for one waiting session",
        p.metric("outpost_mqtt_session_timers").await
    );
}

/// A subscriber (QoS 0: nothing to ack, so nothing holds its deliveries
/// back but its socket) that stops reading while events flood in.
async fn stuck_subscriber(p: &Proc, device: &str, token: &str, keep_alive: u16) -> Raw {
    let (mut c, code) = Raw::connect(p.mqtt.unwrap(), device, device, token, keep_alive, None).await;
    assert_eq!(code, 0);
    let mut body = 1u16.to_be_bytes().to_vec();
    string(b"acme/events/#", &mut body);
    body.push(0);
    c.send(&frame(0x82, &body)).await;
    c.read_kind(9, T).await.expect("SUBACK");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_ended_by_keep_alive_revocation_and_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[("OUTPOST_MQTT__WRITE_TIMEOUT", "2s")]));
    let feeder = add(dir.path(), "acme", "feeder");
    let (ka, revoked, pinger) =
        (add(dir.path(), "acme", "ka"), add(dir.path(), "acme", "rv"), add(dir.path(), "acme", "pg"));
    let mut by_ka = stuck_subscriber(&p, "ka", &ka, 2).await;
    let mut by_revocation = stuck_subscriber(&p, "rv", &revoked, 600).await;
    let mut by_timeout = stuck_subscriber(&p, "pg", &pinger, 600).await;
    // About 10 MB of events: far more than the sockets and the mailboxes hold.
    post_events(&p, &feeder, "feeder", 10_000, 1000).await;
    // Keep-alive: nothing came from the client for 1.5 × 2 s.
    let started = Instant::now();
    // Revocation: within a second, stuck or not.
    let (ok, _, err) = cli(dir.path(), &["device", "revoke", "rv", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let revoked_at = Instant::now();
    // The write timeout: the client pings (so keep-alive never fires) and
    // never reads, while events keep coming (more than socket buffers hold).
    let pings = async {
        for _ in 0..20 {
            if !by_timeout.try_send(&[0xc0, 0]).await {
                break; // closed
            }
            post_events(&p, &feeder, "feeder", 1000, 1000).await;
        }
    };
    let (_, revocation, keep_alive) =
        tokio::join!(pings, async { by_revocation.closed(T).await.then(|| revoked_at.elapsed()) }, async {
            by_ka.closed(T).await.then(|| started.elapsed())
        },);
    let revocation = revocation.expect("a revoked, stuck session stayed open");
    assert!(revocation < Duration::from_secs(2), "a revoked, stuck session ended after {revocation:?}");
    let keep_alive = keep_alive.expect("keep-alive did not end a stuck session");
    assert!(keep_alive < Duration::from_secs(6), "keep-alive ended a stuck session after {keep_alive:?}");
    assert!(by_timeout.closed(T).await, "a pinging client that never reads is closed by mqtt.write_timeout");
    assert!(p.metric("outpost_mqtt_write_timeouts_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_client_that_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::start(dir.path(), &fast(&[]));
    let feeder = add(dir.path(), "acme", "feeder");
    let token = add(dir.path(), "acme", "s1");
    let _stuck = stuck_subscriber(&p, "s1", &token, 600).await;
    post_events(&p, &feeder, "feeder", 5_000, 1000).await;
    let started = Instant::now();
    let status = p.terminate_in_place();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?} (grace 10 s)", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_keeps_going_when_the_client_publishes_past_its_rate_limit_on_a_busy_tenant() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    // Everyone may post fast but the WebSocket client: 50/s.
    let p = Proc::start_with_config(dir.path(), "[limits.devices.\"acme/ws1\"]\nper_second = 50\n", &fast(&[]));
    let feeder = add(dir.path(), "acme", "feeder");
    let token = add(dir.path(), "acme", "ws1");
    let mut req = format!("ws://{}/mqtt", p.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let bin = |b: Vec<u8>| Message::Binary(b.into());
    tx.send(bin(common::mqtt_raw::connect_packet("ws1", "ws1", &token, 30, None, true))).await.unwrap();
    tx.send(bin(subscribe(1, b"acme/events/#"))).await.unwrap();
    // A reader that counts PUBACKs (frames are whole packets, or several).
    let reader = tokio::spawn(async move {
        let (mut pubacks, mut pingresp, mut buf) = (0usize, 0usize, Vec::new());
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(20), rx.next()).await {
            let Message::Binary(b) = m else { continue };
            buf.extend_from_slice(&b);
            while let Some((kind, len)) = packet_at(&buf) {
                match kind {
                    4 => pubacks += 1,
                    13 => pingresp += 1,
                    _ => {}
                }
                buf.drain(..len);
            }
            if pubacks >= 200 && pingresp >= 1 {
                break;
            }
        }
        (pubacks, pingresp)
    });
    // The tenant is busy, and the client publishes 200 QoS 1 events of 1 KB
    // at once (200 KB, more than the pipe between the WebSocket and the
    // session holds, and over its 50/s): it is slowed down, never stuck.
    let busy = post_events(&p, &feeder, "feeder", 3_000, 1000);
    let publish = async {
        let pad = "p".repeat(1000);
        for i in 1..=200u16 {
            let payload = format!("{{\"i\":{i},\"pad\":\"{pad}\"}}");
            let f =
                common::mqtt_raw::publish_packet("acme/devices/ws1/events/t", payload.as_bytes(), 1, i, false, false);
            tx.send(bin(f)).await.unwrap();
        }
        tx.send(bin(vec![0xc0, 0])).await.unwrap();
    };
    tokio::join!(busy, publish);
    let (pubacks, pingresp) = reader.await.unwrap();
    assert_eq!((pubacks, pingresp), (200, 1), "PUBACKs and PINGRESP over WebSocket");
    let stored = log_rows(&dir.path().join("site-log.sqlite")).iter().filter(|r| r.device_id == "ws1").count();
    assert_eq!(stored, 200);
}

/// Kind and length of the packet at the head of `buf`, when complete.
fn packet_at(buf: &[u8]) -> Option<(u8, usize)> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let b = *buf.get(i)?;
        len += usize::from(b & 0x7f) * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (buf.len() >= i + len).then_some((buf[0] >> 4, i + len))
}

/// A 5.0 CONNECT with a session expiry and a will of `delay` seconds.
fn connect_with_will(client: &str, device: &str, token: &str, delay: u32, retain: bool) -> Vec<u8> {
    let topic = format!("acme/devices/{device}/events/gone");
    let mut p = v5::connect_packet(
        client,
        device,
        token,
        30,
        true,
        &prop_u32(0x11, 3600),
        Some((&topic, b"{\"gone\":true}", &prop_u32(0x18, delay))),
    );
    if retain {
        // Will Retain is bit 5 of the connect flags, after the protocol
        // name ("MQTT") and level.
        let at = p.windows(4).position(|w| w == b"MQTT").unwrap() + 5;
        p[at] |= 0b0010_0000;
    }
    p
}

fn wills(dir: &Path, device: &str) -> usize {
    log_rows(&dir.join("site-log.sqlite")).iter().filter(|r| r.device_id == device && r.event_type == "gone").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_holds_no_connection_slot() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[("OUTPOST_MQTT__MAX_CONNECTIONS", "3")]));
    let token = add(dir.path(), "acme", "d1");
    for i in 0..3 {
        let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
        c.send(&connect_with_will(&format!("d1-{i}"), "d1", &token, 3600, false)).await;
        assert_eq!(c.read(T).await.map(|f| f.body[1]), Some(0));
        drop(c); // unclean: the will waits an hour
    }
    assert!(eventually(T, || async { p.metric("outpost_mqtt_connections").await == 0 }).await, "slots held");
    assert_eq!(p.metric("outpost_mqtt_session_timers").await, 6, "three waiting sessions, three delayed wills");
    // A new client, and one of the three coming back, both get in.
    let (_new, ack) = Raw::connect_v5(p.mqtt.unwrap(), "d1-new", "d1", &token, 30, true, &[]).await;
    assert_eq!(ack.body[1], 0, "a new client got in");
    let (_back, ack) = Raw::connect_v5(p.mqtt.unwrap(), "d1-0", "d1", &token, 30, false, &prop_u32(0x11, 3600)).await;
    assert_eq!((ack.body[1], ack.body[0] & 1), (0, 1), "the returning client got its session back");
    assert_eq!(wills(dir.path(), "d1"), 0, "and no will of a client that came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_of_a_revoked_device_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
    c.send(&connect_with_will("d1", "d1", &token, 1, false)).await;
    assert_eq!(c.read(T).await.map(|f| f.body[1]), Some(0));
    drop(c);
    let (ok, _, err) = cli(dir.path(), &["device", "revoke", "d1", "--tenant", "acme"]);
    assert!(ok, "{err}");
    // The will's timer runs out (the session's stays), and nothing is stored.
    assert!(eventually(T, || async { p.metric("outpost_mqtt_session_timers").await == 1 }).await);
    assert_eq!(wills(dir.path(), "d1"), 0, "a revoked device's delayed will was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_will_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    let sub = add(dir.path(), "acme", "s1");
    let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
    c.send(&connect_with_will("d1", "d1", &token, 0, true)).await;
    assert_eq!(c.read(T).await.map(|f| f.body[1]), Some(0));
    drop(c);
    assert!(eventually(T, || async { wills(dir.path(), "d1") == 1 }).await, "the will is stored");
    assert!(p.terminate().success());
    let p = Proc::start(dir.path(), &fast(&[]));
    let (mut s, code) = Raw::connect(p.mqtt.unwrap(), "s1", "s1", &sub, 30, None).await;
    assert_eq!(code, 0);
    s.send(&subscribe(1, b"acme/events/d1/#")).await;
    let got = s.read_kind(3, T).await.expect("the retained will after a restart");
    assert_eq!(got.flags & 1, 1, "RETAIN");
    assert!(got.body.windows(12).any(|w| w == b"\"gone\":true}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_is_always_answered_with_a_reason_per_filter() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &fast(&[]));
    let token = add(dir.path(), "acme", "d1");
    // 3.1.1: an UNSUBACK even for a filter never subscribed.
    let (mut c, _) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &token, 30, None).await;
    c.send(&unsubscribe(7, &[b"acme/events/never"])).await;
    assert_eq!(c.read_kind(11, T).await.expect("UNSUBACK").pkid(), 7);
    // 5.0: one reason code per filter (0x00 success, 0x11 no subscription).
    let (mut c, _) = Raw::connect_v5(p.mqtt.unwrap(), "d1-v5", "d1", &token, 30, true, &[]).await;
    c.send(&v5::subscribe_packet(1, &[("acme/events/a", 1)], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    let mut body = 8u16.to_be_bytes().to_vec();
    body.push(0); // no properties
    string(b"acme/events/a", &mut body);
    string(b"acme/events/b", &mut body);
    c.send(&frame(0xa2, &body)).await;
    let ack = c.read_kind(11, T).await.expect("UNSUBACK");
    assert_eq!((ack.pkid(), &ack.body[3..]), (8, &[0x00, 0x11][..]), "{:?}", ack.body);
    // A shared subscription: 0x9E (CONNACK said none are supported).
    c.send(&v5::subscribe_packet(2, &[("$share/g/acme/events/#", 1)], &[])).await;
    let ack = c.read_kind(9, T).await.expect("SUBACK");
    assert_eq!(ack.body[3], 0x9e, "{:?}", ack.body);
}

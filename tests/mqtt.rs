//! MQTT ingest against the real appliance: rumqttc and a raw client for the
//! edge cases, plus clients nobody here wrote (mosquitto_pub/sub, paho).
//! Every PUBACK must mean the event is already in the site log.

mod common;

use std::time::{Duration, Instant};

use common::mqtt_raw::{Raw, Will};
use common::{TestApp, eventually};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

fn opts(app: &TestApp, client_id: &str, device: &str, token: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, app.mqtt.ip().to_string(), app.mqtt.port());
    o.set_credentials(device, token);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Polls the event loop until `want` matches an incoming packet.
async fn until<F: FnMut(&Packet) -> bool>(el: &mut EventLoop, mut want: F) -> Packet {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll()).await.expect("timed out").expect("connection error");
        if let Event::Incoming(p) = ev
            && want(&p)
        {
            return p;
        }
    }
}

/// The first connection error of a fresh event loop (CONNACK refusals).
async fn connect_error(mut el: EventLoop) -> ConnectionError {
    loop {
        match tokio::time::timeout(T, el.poll()).await.expect("timed out") {
            Ok(Event::Incoming(Packet::ConnAck(_))) => panic!("connection was accepted"),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

fn rows_of(app: &TestApp, device: &str) -> Vec<Value> {
    app.log_rows()
        .iter()
        .filter(|e| e.device_id == device)
        .map(|e| serde_json::from_str(e.payload.get()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publish_is_stored_before_its_puback_and_reaches_subscribers() {
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    // d2 listens to the tenant's stream.
    let (sub, mut sub_el) = AsyncClient::new(opts(&app, "d2-listen", "d2", &t2), 10);
    sub.subscribe("acme/events/#", QoS::AtLeastOnce).await.unwrap();
    until(&mut sub_el, |p| matches!(p, Packet::SubAck(_))).await;
    let (pubc, mut pub_el) = AsyncClient::new(opts(&app, "d1", "d1", &t1), 10);
    for i in 0..3 {
        pubc.publish("acme/devices/d1/events/temp.read", QoS::AtLeastOnce, false, json!({"i": i}).to_string())
            .await
            .unwrap();
        until(&mut pub_el, |p| matches!(p, Packet::PubAck(_))).await;
        // Ack means durable: the row is there the moment the PUBACK is.
        assert_eq!(rows_of(&app, "d1").len(), i + 1);
    }
    let rows = app.log_rows();
    assert_eq!(rows[0].event_type, "temp.read");
    assert_eq!(rows[0].tenant, "acme");
    for i in 0..3 {
        let p = until(&mut sub_el, |p| matches!(p, Packet::Publish(_))).await;
        let Packet::Publish(p) = p else { unreachable!() };
        assert_eq!(p.topic, "acme/events/d1/temp.read");
        assert_eq!(serde_json::from_slice::<Value>(&p.payload).unwrap(), json!({"i": i}));
    }
    // Presence: online while connected.
    let devs = app.get("/api/v1/realtime/acme/devices", Some(&app.admin)).await;
    let d1 = devs.body["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == "d1").unwrap().clone();
    assert_eq!(d1["online"], true);
    pubc.disconnect().await.unwrap();
    let _ = tokio::time::timeout(T, pub_el.poll()).await;
    let offline = eventually(T, || async {
        let devs = app.get("/api/v1/realtime/acme/devices", Some(&app.admin)).await;
        devs.body["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == "d1" && d["online"] == false)
    })
    .await;
    assert!(offline);
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_events_accepted_total{protocol=\"mqtt\"} 3"), "{m}");
    assert!(m.contains("outpost_mqtt_commit_wait_seconds_count 3"), "{m}");
}

#[tokio::test]
async fn connect_refusals_use_the_right_return_codes() {
    let app = TestApp::start_with(|c| c.mqtt.connect_timeout = Duration::from_secs(1)).await;
    let token = app.device("acme", "d1").await;
    let refused = |o: MqttOptions| async move {
        let (_c, el) = AsyncClient::new(o, 10);
        connect_error(el).await
    };
    // Wrong password.
    let e = refused(opts(&app, "d1", "d1", "not-a-token")).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{e:?}");
    // Username is not the token's device.
    let e = refused(opts(&app, "d2", "d2", &token)).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{e:?}");
    // Client id not starting with the device id.
    let e = refused(opts(&app, "other", "d1", &token)).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)), "{e:?}");
    // Expired token.
    let secret = std::fs::read_to_string(app.config.secret_path()).unwrap();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "d1", "tenant": "acme", "perms": ["write_events"], "exp": 1_000_000_000}),
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    let e = refused(opts(&app, "d1", "d1", &expired)).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{e:?}");
    // Admin tokens are not devices.
    let e = refused(opts(&app, "admin", "admin", &app.admin)).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)), "{e:?}");
    // Revoked: the next connect is refused.
    let (c, mut el) = AsyncClient::new(opts(&app, "d1", "d1", &token), 10);
    until(&mut el, |p| matches!(p, Packet::ConnAck(_))).await;
    drop(c);
    let r = app.client.delete(app.url("/api/v1/realtime/acme/device/d1")).bearer_auth(&app.admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let e = refused(opts(&app, "d1", "d1", &token)).await;
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{e:?}");
    // No CONNECT at all within the connect timeout: closed.
    let mut raw = Raw::connect_tcp(app.mqtt).await;
    assert!(raw.closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn foreign_topic_and_bad_payload_are_not_acked_and_close_a_311_connection() {
    let app = TestApp::start().await;
    let token = app.device("acme", "d1").await;
    app.device("acme", "d2").await;
    for (topic, payload, qos) in [
        ("acme/devices/d2/events/x", &b"{}"[..], 1),
        ("globex/devices/d1/events/x", b"{}", 1),
        ("acme/devices/d1/status", b"{}", 1),
        ("acme/devices/d1/events/bad type", b"{}", 1),
        ("acme/devices/d2/events/x", b"{}", 2),
        // Any payload is an event; a JSON object central would refuse is not.
        ("acme/devices/d1/events/x", br#"{"a":"\u0000"}"#, 1),
    ] {
        let (mut c, code) = Raw::connect(app.mqtt, "d1", "d1", &token, 30, None).await;
        assert_eq!(code, 0);
        c.publish(topic, payload, qos, 9, false, false).await;
        let answer = c.read(T).await;
        assert!(answer.is_none(), "{topic} {payload:?}: expected close, got {answer:?}");
    }
    assert!(app.log_rows().is_empty(), "nothing refused was written");
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("reason=\"forbidden_topic\""), "{m}");
    assert!(m.contains("reason=\"invalid\""), "{m}");
}

#[tokio::test]
async fn forbidden_subscribe_gets_0x80_while_allowed_filters_are_granted() {
    let app = TestApp::start().await;
    let token = app.device("acme", "d1").await;
    let (mut c, _) = Raw::connect(app.mqtt, "d1", "d1", &token, 30, None).await;
    c.subscribe(5, &["acme/events/#", "globex/events/#", "acme/devices/d1/#", "acme/devices/d2/#"]).await;
    let ack = c.read_kind(9, T).await.expect("SUBACK");
    assert_eq!(ack.pkid(), 5);
    assert_eq!(&ack.body[2..], &[1, 0x80, 1, 0x80]);
    c.subscribe(6, &["#"]).await;
    let ack = c.read_kind(9, T).await.expect("SUBACK");
    assert_eq!(&ack.body[2..], &[0x80]);
    // A write-only device may not subscribe at all.
    let wo = app.register("acme", "wo", &["write_events"]).await;
    let (mut c, _) = Raw::connect(app.mqtt, "wo", "wo", &wo, 30, None).await;
    c.subscribe(1, &["acme/events/#"]).await;
    assert_eq!(&c.read_kind(9, T).await.unwrap().body[2..], &[0x80]);
}

#[tokio::test]
async fn malformed_and_oversize_packets_close_only_that_connection() {
    let app = TestApp::start_with(|c| c.mqtt.max_packet_size = 4096).await;
    let token = app.device("acme", "d1").await;
    let (mut good, _) = Raw::connect(app.mqtt, "d1-good", "d1", &token, 30, None).await;
    let (mut bad, _) = Raw::connect(app.mqtt, "d1-bad", "d1", &token, 30, None).await;
    // A reserved packet type with garbage.
    bad.send(&[0xf0, 3, 1, 2, 3]).await;
    assert!(bad.closed(T).await, "malformed packet must close the connection");
    let (mut big, _) = Raw::connect(app.mqtt, "d1-big", "d1", &token, 30, None).await;
    let payload = format!("{{\"x\":\"{}\"}}", "y".repeat(8000));
    big.publish("acme/devices/d1/events/x", payload.as_bytes(), 1, 1, false, false).await;
    assert!(big.closed(T).await, "oversize packet must close the connection");
    // The other connection is untouched.
    good.publish("acme/devices/d1/events/x", b"{\"ok\":1}", 1, 3, false, false).await;
    assert_eq!(good.read_kind(4, T).await.expect("PUBACK").pkid(), 3);
    assert_eq!(app.log_rows().len(), 1);
}

#[tokio::test]
async fn keep_alive_expiry_drops_the_device_and_fires_its_will() {
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    let (mut sub, _) = Raw::connect(app.mqtt, "d2", "d2", &t2, 60, None).await;
    sub.subscribe(1, &["acme/events/#"]).await;
    sub.read_kind(9, T).await.unwrap();
    // keep-alive 1 s, then silence: dropped after 1.5 s, the will is stored and published.
    let will = Will("acme/devices/d1/events/status.lost", b"{\"online\":false}", false);
    // Timed from before the CONNECT: the appliance's keep-alive starts after
    // it (once the CONNACK is written), so it can never have run longer.
    let started = Instant::now();
    let (mut dev, code) = Raw::connect(app.mqtt, "d1", "d1", &t1, 1, Some(will)).await;
    assert_eq!(code, 0);
    assert!(dev.closed(Duration::from_secs(10)).await, "not dropped after keep-alive expiry");
    assert!(started.elapsed() >= Duration::from_millis(1400), "dropped too early: {:?}", started.elapsed());
    let p = sub.read_kind(3, T).await.expect("will delivered");
    let topic_len = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    assert_eq!(&p.body[2..2 + topic_len], b"acme/events/d1/status.lost");
    let rows = app.log_rows();
    assert_eq!(rows.len(), 1, "the will is a stored event");
    assert_eq!(rows[0].event_type, "status.lost");
    // A clean DISCONNECT fires no will.
    let will = Will("acme/devices/d1/events/status.lost", b"{\"online\":false}", false);
    let (mut dev, _) = Raw::connect(app.mqtt, "d1", "d1", &t1, 30, Some(will)).await;
    dev.disconnect().await;
    assert!(dev.closed(T).await);
    // An abrupt drop does.
    let will = Will("acme/devices/d1/events/status.lost", b"{\"online\":false}", false);
    let (dev, _) = Raw::connect(app.mqtt, "d1", "d1", &t1, 30, Some(will)).await;
    drop(dev);
    sub.read_kind(3, T).await.expect("will on abrupt drop");
    assert!(eventually(T, || async { app.log_rows().len() == 2 }).await);
    // A will outside the device's own event topics is refused at CONNECT.
    let will = Will("acme/devices/d2/events/x", b"{}", false);
    let (_c, code) = Raw::connect(app.mqtt, "d1", "d1", &t1, 30, Some(will)).await;
    assert_eq!(code, 5);
}

#[tokio::test]
async fn events_ingested_over_http_reach_local_mqtt_subscribers() {
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    let (mut sub, _) = Raw::connect(app.mqtt, "d2", "d2", &t2, 30, None).await;
    sub.subscribe(1, &["acme/events/#"]).await;
    sub.read_kind(9, T).await.unwrap();
    app.post_event("acme", &t1, "d1", json!({"via": "http"})).await;
    let p = sub.read_kind(3, T).await.expect("HTTP event on MQTT");
    let topic_len = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    assert_eq!(&p.body[2..2 + topic_len], b"acme/events/d1/test.reading");
    assert!(p.body.ends_with(br#"{"via":"http"}"#));
    // MQTT-origin events are not delivered twice.
    let (mut dev, _) = Raw::connect(app.mqtt, "d1", "d1", &t1, 30, None).await;
    dev.publish("acme/devices/d1/events/x", b"{\"via\":\"mqtt\"}", 1, 1, false, false).await;
    dev.read_kind(4, T).await.unwrap();
    let p = sub.read_kind(3, T).await.unwrap();
    assert!(p.body.ends_with(br#"{"via":"mqtt"}"#));
    assert!(sub.read_kind(3, Duration::from_millis(500)).await.is_none(), "one copy only");
}

#[tokio::test]
async fn retained_event_reaches_later_subscribers() {
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    let (mut dev, _) = Raw::connect(app.mqtt, "d1", "d1", &t1, 30, None).await;
    dev.publish("acme/devices/d1/events/config", b"{\"v\":7}", 1, 1, false, true).await;
    dev.read_kind(4, T).await.expect("PUBACK");
    let (mut late, _) = Raw::connect(app.mqtt, "d2", "d2", &t2, 30, None).await;
    late.subscribe(1, &["acme/events/d1/#"]).await;
    let p = late.read_kind(3, T).await.expect("retained publish");
    assert!(p.flags & 1 == 1, "retain flag set");
    assert!(p.body.ends_with(b"{\"v\":7}"));
}

#[tokio::test]
async fn redelivered_dup_publish_is_acked_without_a_second_row() {
    let mut app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let (mut c, _) = Raw::connect(app.mqtt, "d1", "d1", &t, 30, None).await;
    c.publish("acme/devices/d1/events/x", b"{\"n\":1}", 1, 42, false, false).await;
    assert_eq!(c.read_kind(4, T).await.unwrap().pkid(), 42);
    // The device lost the PUBACK and resends with DUP=1, on a new connection.
    let (mut c, _) = Raw::connect(app.mqtt, "d1", "d1", &t, 30, None).await;
    c.publish("acme/devices/d1/events/x", b"{\"n\":1}", 1, 42, true, false).await;
    assert_eq!(c.read_kind(4, T).await.unwrap().pkid(), 42);
    assert_eq!(app.log_rows().len(), 1);
    // Same packet id, other payload: a new event. Same payload without DUP: new too.
    c.publish("acme/devices/d1/events/x", b"{\"n\":2}", 1, 42, true, false).await;
    c.read_kind(4, T).await.unwrap();
    c.publish("acme/devices/d1/events/x", b"{\"n\":1}", 1, 43, false, false).await;
    c.read_kind(4, T).await.unwrap();
    assert_eq!(app.log_rows().len(), 3);
    // Survives a restart of the appliance (the window lives in the log).
    drop(c);
    app.restart().await;
    let (mut c, _) = Raw::connect(app.mqtt, "d1", "d1", &t, 30, None).await;
    c.publish("acme/devices/d1/events/x", b"{\"n\":2}", 1, 42, true, false).await;
    c.read_kind(4, T).await.unwrap();
    assert_eq!(app.log_rows().len(), 3);
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_events_duplicate_total{protocol=\"mqtt\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_slows_the_device_down_without_loss_or_early_acks() {
    let app = TestApp::start_with(|c| c.limits.per_second = 5).await;
    let t = app.device("acme", "d1").await;
    let (mut c, _) = Raw::connect(app.mqtt, "d1", "d1", &t, 60, None).await;
    let started = Instant::now();
    for i in 1..=15u16 {
        c.publish("acme/devices/d1/events/x", format!("{{\"i\":{i}}}").as_bytes(), 1, i, false, false).await;
    }
    for i in 1..=15u16 {
        let ack = c.read_kind(4, Duration::from_secs(20)).await.expect("every publish is acked eventually");
        assert_eq!(ack.pkid(), i, "acks in publish order");
        assert!(rows_of(&app, "d1").len() >= usize::from(i), "PUBACK {i} before its commit");
    }
    // 15 events at 5/s cannot all be admitted in under 2 s.
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    let got: Vec<i64> = rows_of(&app, "d1").iter().map(|v| v["i"].as_i64().unwrap()).collect();
    assert_eq!(got, (1..=15).collect::<Vec<_>>());
    let m = app.get("/metrics", None).await.text;
    assert!(!m.contains("outpost_mqtt_throttled_total 0"), "{m}");
}

#[tokio::test]
async fn connections_over_max_connections_are_refused_with_a_connack() {
    let app = TestApp::start_with(|c| c.mqtt.max_connections = 2).await;
    let t = app.device("acme", "d1").await;
    let (_a, _) = Raw::connect(app.mqtt, "d1-a", "d1", &t, 30, None).await;
    let (_b, _) = Raw::connect(app.mqtt, "d1-b", "d1", &t, 30, None).await;
    // 3.1.1: 0x03 server unavailable; 5.0: 0x97 quota exceeded. Then closed.
    let (mut c, code) = Raw::connect(app.mqtt, "d1-c", "d1", &t, 30, None).await;
    assert_eq!(code, 3);
    assert!(c.closed(T).await);
    let (mut c, ack) = Raw::connect_v5(app.mqtt, "d1-c", "d1", &t, 30, true, &[]).await;
    assert_eq!(ack.body[1], 0x97);
    assert!(c.closed(T).await);
    // A silent connection is closed.
    let mut c = Raw::connect_tcp(app.mqtt).await;
    assert!(c.closed(T).await);
}

// ---- clients nobody here wrote ------------------------------------------------

fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_subscribe_and_retain() {
    assert!(have("mosquitto_pub") && have("mosquitto_sub"), "mosquitto-clients missing: `make test` installs them");
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    let port = app.mqtt.port().to_string();
    // Retained, QoS 1, by mosquitto_pub.
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "d1", "-u", "d1", "-P", &t1, "-q", "1", "-r"])
        .args(["-t", "acme/devices/d1/events/config", "-m", "{\"v\":1}"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.log_rows().len(), 1, "acked by mosquitto_pub means stored");
    // mosquitto_sub gets the retained one, then a live one.
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "d2",
            "-u",
            "d2",
            "-P",
            &t2,
            "-q",
            "1",
            "-v",
            "-C",
            "2",
            "-W",
            "20",
        ])
        .args(["-t", "acme/events/#"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The retained message arrives first: then the subscription is live
    // (a device shown online has not necessarily subscribed yet), and a live
    // publish must reach it.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(T, lines.next_line()).await.expect("no retained message").unwrap();
    assert_eq!(first.as_deref(), Some("acme/events/d1/config {\"v\":1}"));
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "d1", "-u", "d1", "-P", &t1, "-q", "1"])
        .args(["-t", "acme/devices/d1/events/temp", "-m", "{\"c\":20}"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let second = tokio::time::timeout(T, lines.next_line()).await.expect("no live message").unwrap();
    assert_eq!(second.as_deref(), Some("acme/events/d1/temp {\"c\":20}"));
    assert!(sub.wait().await.unwrap().success(), "mosquitto_sub -C 2 exits after two messages");
    // A wrong password is refused with the right code (mosquitto_pub exits non-zero).
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "d1", "-u", "d1", "-P", "nope", "-q", "1"])
        .args(["-t", "acme/devices/d1/events/temp", "-m", "{}"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("bad user name or password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_publishes_qos1_and_subscribes() {
    let python = "/usr/bin/python3";
    let ok =
        std::process::Command::new(python).args(["-c", "import paho.mqtt.client"]).status().is_ok_and(|s| s.success());
    assert!(ok, "paho-mqtt missing for {python}: `make test` installs python3-paho-mqtt");
    let app = TestApp::start().await;
    let t1 = app.device("acme", "d1").await;
    let script = r#"
import json, sys, threading
import paho.mqtt.client as mqtt
port, token = int(sys.argv[1]), sys.argv[2]
got, acked, subbed = [], threading.Event(), threading.Event()
c = mqtt.Client(client_id="d1-paho", clean_session=True)
c.username_pw_set("d1", token)
c.on_subscribe = lambda *a: subbed.set()
c.on_message = lambda cl, u, m: got.append((m.topic, m.payload.decode()))
c.on_publish = lambda *a: acked.set()
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
c.subscribe("acme/events/#", qos=1)
assert subbed.wait(10), "no SUBACK"
info = c.publish("acme/devices/d1/events/paho.test", json.dumps({"from": "paho"}), qos=1)
info.wait_for_publish(10)
assert acked.wait(10), "no PUBACK"
for _ in range(100):
    if got: break
    threading.Event().wait(0.1)
c.loop_stop()
print(json.dumps(got))
"#;
    let out = tokio::process::Command::new(python)
        .args(["-c", script, &app.mqtt.port().to_string(), &t1])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "paho: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<(String, String)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, vec![("acme/events/d1/paho.test".to_string(), "{\"from\": \"paho\"}".to_string())]);
    let rows = app.log_rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].event_type, "paho.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sessions_that_subscribe_are_in_the_fan_out_and_take_over_works_for_any() {
    let app = TestApp::start().await;
    let (tp, ts) = (app.device("acme", "p1").await, app.device("acme", "s1").await);
    let subscribed = || app.metric("outpost_mqtt_subscribed_sessions");

    // A device that only publishes, with nobody subscribed: stored and
    // acked, and nothing of it in the fan-out.
    let (mut p, code) = Raw::connect(app.mqtt, "p1", "p1", &tp, 30, None).await;
    assert_eq!(code, 0);
    p.publish("acme/devices/p1/events/t", b"{\"n\":1}", 1, 1, false, false).await;
    assert!(p.read_kind(4, T).await.is_some(), "PUBACK");
    assert_eq!(rows_of(&app, "p1").len(), 1);
    assert_eq!(subscribed().await, 0, "a publisher is not in the fan-out");

    // Take-over ends the older connection of the client id.
    let (mut p2, code) = Raw::connect(app.mqtt, "p1", "p1", &tp, 30, None).await;
    assert_eq!(code, 0);
    assert!(p.closed(T).await, "the taken-over connection is closed");

    // A subscriber is; the publisher's next event reaches it.
    let (mut s, code) = Raw::connect(app.mqtt, "s1", "s1", &ts, 30, None).await;
    assert_eq!(code, 0);
    s.subscribe(1, &["acme/events/+/#"]).await;
    assert!(s.read_kind(9, T).await.is_some(), "SUBACK");
    assert_eq!(subscribed().await, 1);
    p2.publish("acme/devices/p1/events/t", b"{\"n\":2}", 1, 2, false, false).await;
    assert!(p2.read_kind(4, T).await.is_some(), "PUBACK");
    let got = s.read_kind(3, T).await.expect("the subscriber gets the event");
    assert!(String::from_utf8_lossy(&got.body).contains("{\"n\":2}"));
    drop((p2, s));
    assert!(
        eventually(T, || async { subscribed().await == 0 }).await,
        "a clean session leaves the fan-out with its connection"
    );
}

/// A CONNECT is one trip to the site-log writer (issue #29: a connect
/// storm of 1,000 devices was 2,000): its session and the device's
/// presence are recorded in one transaction, so the device is online by
/// the time its CONNACK arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_records_its_session_and_presence_in_one_commit() {
    let app = TestApp::start().await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        tokens.push(app.device("acme", &format!("d{i}")).await);
    }
    let before = app.metric("outpost_commit_duration_seconds_count").await;
    let mut open = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let id = format!("d{i}");
        let (c, code) = Raw::connect(app.mqtt, &id, &id, token, 30, None).await;
        assert_eq!(code, 0);
        let online = app.get("/api/v1/realtime/acme/presence", Some(token)).await.text;
        assert!(online.contains(&format!(r#""device_id":"{id}""#)), "online at its CONNACK: {online}");
        open.push(c);
    }
    let commits = app.metric("outpost_commit_duration_seconds_count").await - before;
    assert!(commits <= 5, "{commits} commits for 5 CONNECTs one after the other (one each)");
}

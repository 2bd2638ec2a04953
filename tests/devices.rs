//! The devices that exist (issue #31), black-box with clients nobody here
//! wrote (mosquitto 3.1.1 and 5.0): a relay that publishes `on`, a sensor
//! that publishes `21.5`, a binary frame and CBOR are each an event, kept
//! byte-exact at the site, in the central table, and for MQTT subscribers.

mod common;

use std::time::Duration;

use common::pg::Pg;
use common::{TestApp, central, central_count, eventually};
use tokio::io::AsyncBufReadExt;

const T: Duration = Duration::from_secs(20);

/// `outpost device add --secret` for `acme/<id>` on the running app's data
/// dir: the secret it prints.
fn add_with_secret(app: &TestApp, id: &str) -> String {
    let (ok, out, err) = common::cli(app.dir.path(), &["device", "add", "--tenant", "acme", "--id", id, "--secret"]);
    assert!(ok, "device add {id} --secret: {err}");
    assert!(err.contains(&format!("acme/{id}")), "says the login: {err}");
    out.trim().to_string()
}

/// `outpost` with `args` on the running app's data dir, which must
/// succeed: what it printed, trimmed.
fn cli_ok(app: &TestApp, args: &[&str]) -> String {
    let (ok, out, err) = common::cli(app.dir.path(), args);
    assert!(ok, "{args:?}: {err}");
    out.trim().to_string()
}

/// `POST /api/v1/realtime/acme/device/register` as the admin.
async fn register(app: &TestApp, body: serde_json::Value) -> reqwest::Result<reqwest::Response> {
    app.client.post(app.url("/api/v1/realtime/acme/device/register")).bearer_auth(&app.admin).json(&body).send().await
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_number_binary_and_cbor_payloads_are_events_byte_exact_at_the_site_centrally_and_for_subscribers() {
    let pg = Pg::start();
    let app = TestApp::start_with(|c| central(c, &pg.url())).await;
    let t1 = app.device("acme", "d1").await;
    let t2 = app.device("acme", "d2").await;
    let port = app.mqtt.port().to_string();
    let binary: Vec<u8> = (0..=255u8).rev().collect(); // not UTF-8, a NUL inside
    let cbor = vec![0xa2, 0x61, 0x74, 0xf9, 0x4d, 0x60, 0x61, 0x6f, 0xf5]; // {"t": 21.5, "o": true}
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for v in ["mqttv311", "mqttv5"] {
        cases.push((format!("relay-{v}"), b"on".to_vec(), v));
        cases.push((format!("number-{v}"), b"21.5".to_vec(), v));
        cases.push((format!("binary-{v}"), binary.clone(), v));
        cases.push((format!("cbor-{v}"), cbor.clone(), v));
    }
    // A subscriber that prints each message's topic and payload in hex.
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "d2", "-u", "d2", "-P", &t2, "-q", "1", "-V", "mqttv311"])
        .args(["-t", "acme/events/#", "-F", "%t %x"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    let publish = |event_type: &str, bytes: &[u8], version: &str| {
        let file = app.dir.path().join(format!("{event_type}.bin"));
        std::fs::write(&file, bytes).unwrap();
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-i", "d1", "-u", "d1", "-P", &t1, "-q", "1", "-V", version])
            .args(["-t", &format!("acme/devices/d1/events/{event_type}")])
            .arg("-f")
            .arg(file)
            .output()
    };
    // Live once a warm-up message arrives (SUBACK is not visible from here).
    let mut live = false;
    for _ in 0..40 {
        publish("warmup", b"{}", "mqttv311").await.unwrap();
        if let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
            live = true;
            break;
        }
    }
    assert!(live, "mosquitto_sub never received the warm-up");
    while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await {}

    for (event_type, bytes, version) in &cases {
        let out = publish(event_type, bytes, version).await.unwrap();
        assert!(out.status.success(), "{event_type}: {}", String::from_utf8_lossy(&out.stderr));
        // Acked means stored; the subscriber gets the device's own bytes.
        let line = tokio::time::timeout(T, lines.next_line()).await.expect("no message").unwrap().unwrap();
        assert_eq!(line, format!("acme/events/d1/{event_type} {}", hex(bytes)), "{event_type}");
    }
    // At the site: a JSON object payload that gives the bytes back.
    let rows = app.log_rows();
    for (event_type, bytes, _) in &cases {
        let row = rows.iter().find(|r| &r.event_type == event_type).expect("stored");
        let props = row.properties.as_ref().map(|p| p.get());
        assert_eq!(&*outpost::payload::original(row.payload.get(), props), &bytes[..], "{event_type}");
        let want = if std::str::from_utf8(bytes).is_ok_and(|s| !s.contains('\0')) { "text" } else { "base64" };
        assert!(
            props.is_some_and(|p| p.contains(&format!("\"payload_format\":\"{want}\""))),
            "{event_type}: {props:?}"
        );
    }
    // Centrally: plain SQL reads them back.
    let n = cases.len() as i64 + rows.iter().filter(|r| r.event_type == "warmup").count() as i64;
    assert!(eventually(Duration::from_secs(60), || async { central_count(&pg).await == n }).await, "not forwarded");
    let c = pg.client().await;
    let sql = "SELECT event_type, properties->>'payload_format',
                      coalesce(convert_to(payload->>'text', 'UTF8'), decode(payload->>'base64', 'base64'))
               FROM tenant_acme.events WHERE event_type <> 'warmup'";
    let central: Vec<(String, String, Vec<u8>)> =
        c.query(sql, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(central.len(), cases.len());
    for (event_type, bytes, _) in &cases {
        let (_, format, got) = central.iter().find(|(t, _, _)| t == event_type).expect("central row");
        assert_eq!(got, bytes, "{event_type} ({format})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_device_posts_its_payload_as_it_is_to_its_event_path() {
    let app = TestApp::start().await;
    let token = app.device("acme", "d1").await;
    let post = |path: &str, content_type: &str, body: Vec<u8>| {
        app.client
            .post(app.url(&format!("/api/v1/realtime/acme/devices/{path}")))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let binary: Vec<u8> = vec![0x00, 0xff, 0x10, 0x80];
    for (event_type, content_type, body) in [
        ("state", "text/plain; charset=utf-8", b"on".to_vec()),
        ("frame", "application/octet-stream", binary.clone()),
        ("reading", "application/json", br#"{"t":21.5}"#.to_vec()),
    ] {
        let r = post(&format!("d1/events/{event_type}"), content_type, body.clone()).await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let rows = app.log_rows();
        let row = rows.iter().find(|r| r.event_type == event_type).expect("stored");
        let props = row.properties.as_ref().map(|p| p.get());
        assert_eq!(&*outpost::payload::original(row.payload.get(), props), &body[..]);
        assert!(props.is_some_and(|p| p.contains(content_type)), "the content type is kept: {props:?}");
    }
    assert_eq!(app.log_rows()[2].payload.get(), r#"{"t":21.5}"#, "a JSON object stays the payload");
    // Refusals name the field, as on the JSON route; nothing is written.
    let before = app.log_rows().len();
    let r = post("d2/events/state", "text/plain", b"on".to_vec()).await.unwrap();
    assert_eq!(r.status(), 403, "another device's path");
    let r = post("d1/events/bad%20type", "text/plain", b"on".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "event_type", "{body}");
    // The limit holds on the bytes sent (64 KiB by default), not on their base64.
    let r = post("d1/events/big", "application/octet-stream", vec![7u8; 70_000]).await.unwrap();
    assert_eq!(r.status(), 400, "over limits.max_payload_bytes");
    let r = post("d1/events/fits", "application/octet-stream", vec![7u8; 60_000]).await.unwrap();
    assert_eq!(r.status(), 201, "60,000 bytes fit, though their base64 does not");
    assert_eq!(app.log_rows().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_logs_in_with_a_24_character_secret_until_it_is_revoked() {
    let app = TestApp::start().await;
    let secret = add_with_secret(&app, "relay-2");
    assert_eq!(secret.len(), 24, "fits ESP-AT's 64-byte and WiseConnect's 60-byte password: {secret:?}");
    let port = app.mqtt.port().to_string();
    let publish = |user: &str, password: &str, version: &str, payload: &str| {
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-i", "relay-2", "-u", user, "-P", password, "-q", "1"])
            .args(["-V", version, "-t", "acme/devices/relay-2/events/state", "-m", payload])
            .output()
    };
    // 3.1.1 and 5.0; the username is <tenant>/<id>, or the id alone when
    // one tenant has it.
    for (user, version, payload) in [("acme/relay-2", "mqttv311", "on"), ("relay-2", "mqttv5", "off")] {
        let out = publish(user, &secret, version, payload).await.unwrap();
        assert!(out.status.success(), "{user} {version}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(app.log_rows().len(), 2, "acked means stored");
    // A wrong secret, and a secret for a device that has none, are refused.
    let out = publish("acme/relay-2", "AAAAAAAAAAAAAAAAAAAAAAAA", "mqttv311", "on").await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("bad user name or password"));
    app.device("acme", "d9").await;
    let out = publish("acme/d9", &secret, "mqttv311", "on").await.unwrap();
    assert!(!out.status.success(), "d9 has no secret");
    // An open session ends when the device is revoked (the CLI, another
    // process: within the registry poll), and the secret stops working.
    let (mut c, code) = common::mqtt_raw::Raw::connect(app.mqtt, "relay-2", "acme/relay-2", &secret, 30, None).await;
    assert_eq!(code, 0);
    let revoked_at = std::time::Instant::now();
    let (ok, _, err) = common::cli(app.dir.path(), &["device", "revoke", "relay-2", "--tenant", "acme"]);
    assert!(ok, "{err}");
    assert!(c.closed(T).await, "the session outlived the revocation");
    assert!(revoked_at.elapsed() < Duration::from_secs(2), "closed {:?} after the revoke", revoked_at.elapsed());
    let out = publish("acme/relay-2", &secret, "mqttv311", "on").await.unwrap();
    assert!(!out.status.success(), "a revoked device's secret no longer logs in");
    assert_eq!(app.log_rows().len(), 2);
    // A chosen secret is checked; the hash, never the secret, is stored.
    let (ok, _, err) = common::cli(app.dir.path(), &["device", "secret", "d9", "--tenant", "acme", "--set", "short"]);
    assert!(!ok && err.contains("16-32 characters"), "{err}");
    let (ok, out, err) =
        common::cli(app.dir.path(), &["device", "secret", "d9", "--tenant", "acme", "--set", "Kitchen-relay:2026!"]);
    assert!(ok && out.trim() == "Kitchen-relay:2026!", "{err}");
    let log = std::fs::read(app.dir.path().join("site-log.sqlite")).unwrap();
    assert!(!log.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret itself is not in the site log");
    let (_c, code) = common::mqtt_raw::Raw::connect(app.mqtt, "d9", "acme/d9", "Kitchen-relay:2026!", 30, None).await;
    assert_eq!(code, 0, "the chosen secret logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_api_issues_a_secret_when_asked_and_only_then() {
    let app = TestApp::start().await;
    let r = register(&app, serde_json::json!({"device_id": "plc-1", "secret": true})).await.unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    let secret = body["secret"].as_str().expect("a secret").to_string();
    assert_eq!(secret.len(), 24);
    assert!(body["token"].is_string(), "the token as well");
    let (_c, code) = common::mqtt_raw::Raw::connect(app.mqtt, "plc-1", "acme/plc-1", &secret, 30, None).await;
    assert_eq!(code, 0, "the secret logs in at once");
    let r = register(&app, serde_json::json!({"device_id": "plc-2"})).await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.get("secret").is_none(), "no secret unless asked: {body}");
    let (_c, code) = common::mqtt_raw::Raw::connect(app.mqtt, "plc-2", "acme/plc-2", &secret, 30, None).await;
    assert_eq!(code, 4, "plc-2 has no secret: bad user name or password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_and_tasmota_devices_publish_on_their_own_topics_through_topic_maps() {
    use common::mqtt_raw::{Raw, v5};
    use outpost::config::TopicMapRule;
    let app = TestApp::start_with(|c| {
        c.mqtt.topic_maps = vec![
            TopicMapRule { pattern: "shellies/{device}/{type..}".into(), event_type: None },
            TopicMapRule { pattern: "tele/{device}/{type}".into(), event_type: None },
        ];
    })
    .await;
    let relay = app.device("acme", "relay-1").await;
    let sensor = app.device("acme", "sensor-1").await;
    let port = app.mqtt.port().to_string();
    let pub_ = |id: &str, token: &str, version: &str, topic: &str, payload: &str, retain: bool| {
        let mut cmd = tokio::process::Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-i", id, "-u", id, "-P", token, "-q", "1", "-V", version])
            .args(["-t", topic, "-m", payload]);
        if retain {
            cmd.arg("-r");
        }
        cmd.output()
    };
    // A Shelly relay (3.1.1, its plain-text state, retained) and a Tasmota
    // sensor (5.0, its JSON telemetry), each on its own layout.
    let out = pub_("relay-1", &relay, "mqttv311", "shellies/relay-1/relay/0", "on", true).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let telemetry = r#"{"AM2301":{"Temperature":21.5,"Humidity":40}}"#;
    let out = pub_("sensor-1", &sensor, "mqttv5", "tele/sensor-1/SENSOR", telemetry, false).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = app.log_rows();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (r.device_id.as_str(), r.event_type.as_str())).collect();
    assert_eq!(kinds, [("relay-1", "relay.0"), ("sensor-1", "SENSOR")]);
    assert_eq!(rows[1].payload.get(), telemetry, "a JSON object stays the payload");
    // The retained state is the relay's, on its stream topic, as it was sent.
    let out = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "sensor-1-sub", "-u", "sensor-1", "-P", &sensor, "-q", "1"])
        .args(["-t", "acme/events/relay-1/#", "-v", "-C", "1", "-W", "10"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "acme/events/relay-1/relay.0 on");
    // Another device's topic of the same layout is refused naming the rule:
    // 5.0 gets a negative PUBACK with the reason, 3.1.1 loses the connection.
    let (mut c, ack) = Raw::connect_v5(app.mqtt, "relay-1", "relay-1", &relay, 30, true, &v5::prop_u8(0x17, 1)).await;
    assert_eq!(ack.body[1], 0);
    c.send(&v5::publish_packet("shellies/sensor-1/relay/0", b"off", 1, 7, false, &[])).await;
    let puback = c.read_kind(4, T).await.expect("PUBACK");
    assert_eq!(puback.body[2], 0x87, "not authorized");
    let why = v5::prop_string(&v5::props(&puback.body, 3), 0x1f).unwrap_or_default();
    assert!(why.contains("mqtt.topic_maps[0]") && why.contains("\"sensor-1\""), "{why}");
    let (mut c, code) = Raw::connect(app.mqtt, "relay-1", "relay-1", &relay, 30, None).await;
    assert_eq!(code, 0);
    c.publish("tele/sensor-1/SENSOR", b"{}", 1, 9, false, false).await;
    assert!(c.read(T).await.is_none(), "3.1.1: closed, not acked");
    assert_eq!(app.log_rows().len(), 2, "nothing refused was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_device_authenticates_with_its_secret_as_basic_auth() {
    let app = TestApp::start().await;
    let secret = add_with_secret(&app, "meter-1");
    let post = |user: &str, password: &str, device: &str| {
        app.client
            .post(app.url(&format!("/api/v1/realtime/acme/devices/{device}/events/kwh")))
            .basic_auth(user, Some(password))
            .header("content-type", "text/plain")
            .body("12.5")
            .send()
    };
    assert_eq!(post("acme/meter-1", &secret, "meter-1").await.unwrap().status(), 201);
    assert_eq!(post("meter-1", &secret, "meter-1").await.unwrap().status(), 201, "the id alone, one tenant has it");
    assert_eq!(post("acme/meter-1", "AAAAAAAAAAAAAAAAAAAAAAAA", "meter-1").await.unwrap().status(), 401);
    app.device("acme", "meter-2").await;
    assert_eq!(post("acme/meter-1", &secret, "meter-2").await.unwrap().status(), 403, "only as itself");
    let r = app
        .client
        .post(app.url("/api/v1/realtime/globex/devices/meter-1/events/kwh"))
        .basic_auth("acme/meter-1", Some(&secret))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "only in its tenant");
    let (ok, _, err) = common::cli(app.dir.path(), &["device", "revoke", "meter-1", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let revoked =
        eventually(T, || async { post("acme/meter-1", &secret, "meter-1").await.unwrap().status() == 401 }).await;
    assert!(revoked, "a revoked device's secret still worked");
    // (Posts before the revocation took effect were stored; none after.)
    let stored = app.log_rows().len();
    assert_eq!(post("acme/meter-1", &secret, "meter-1").await.unwrap().status(), 401);
    assert_eq!(app.log_rows().len(), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_a_devices_secret_is_charged_to_its_connect_budget_before_any_hash() {
    use common::mqtt_raw::Raw;
    let app = TestApp::start_with(|c| c.mqtt.max_connects_per_minute = 3).await;
    let secret = add_with_secret(&app, "lock-1");
    // Three wrong guesses use the minute's budget ("bad user name or
    // password", 4); the fourth attempt, even with the right secret, is
    // refused before hashing (3.1.1 folds "connection rate exceeded" into
    // "server unavailable", 3).
    for _ in 0..3 {
        let (_c, code) = Raw::connect(app.mqtt, "lock-1", "acme/lock-1", "WRONGwrongWRONGwrong0000", 30, None).await;
        assert_eq!(code, 4);
    }
    let (_c, code) = Raw::connect(app.mqtt, "lock-1", "acme/lock-1", &secret, 30, None).await;
    assert_eq!(code, 3, "over mqtt.max_connects_per_minute");
    // Another device's budget is its own, and a right secret counts once.
    let other = add_with_secret(&app, "lock-2");
    for _ in 0..3 {
        let (_c, code) = Raw::connect(app.mqtt, "lock-2", "acme/lock-2", &other, 30, None).await;
        assert_eq!(code, 0);
    }
    let (_c, code) = Raw::connect(app.mqtt, "lock-2", "acme/lock-2", &other, 30, None).await;
    assert_eq!(code, 3, "the fourth connect of the minute");
}

/// A Zigbee2MQTT-style bridge registered as a gateway publishes for its
/// children over its own connection (mosquitto 3.1.1 and 5.0, a topic map
/// and the native topic): a child registered with `--via`, two registered
/// by their first event, a fourth over `mqtt.gateway_max_children`
/// refused, a plain device and a non-gateway refused; one child revoked
/// midway is refused (5.0: PUBACK 0x87; 3.1.1: acked, not stored) while
/// the others go on; a QoS 2 resend for a child is stored once; revoking
/// the gateway ends its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_for_its_children_until_they_or_it_are_revoked() {
    use common::mqtt_raw::{Raw, v5};
    use outpost::config::TopicMapRule;
    let app = TestApp::start_with(|c| {
        c.mqtt.topic_maps =
            vec![TopicMapRule { pattern: "zigbee2mqtt/{device}".into(), event_type: Some("state".into()) }];
        c.mqtt.gateway_max_children = 3;
    })
    .await;
    let bridge = cli_ok(&app, &["device", "add", "--tenant", "acme", "--id", "bridge", "--gateway"]);
    cli_ok(&app, &["device", "add", "--tenant", "acme", "--id", "lamp", "--via", "bridge"]);
    let plain = app.device("acme", "plain").await;
    let port = app.mqtt.port().to_string();
    let pub_ = |version: &str, topic: &str, payload: &str| {
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-i", "bridge", "-u", "bridge", "-P", &bridge, "-q", "1"])
            .args(["-V", version, "-t", topic, "-m", payload])
            .output()
    };
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(pub_("mqttv311", "zigbee2mqtt/lamp", r#"{"state":"ON"}"#).await.unwrap());
    ok(pub_("mqttv5", "zigbee2mqtt/plug", r#"{"state":"OFF","power":0}"#).await.unwrap());
    ok(pub_("mqttv311", "acme/devices/sensor/events/temp", "21.5").await.unwrap());
    let (ok_list, list, _) = common::cli(app.dir.path(), &["device", "list", "--tenant", "acme"]);
    assert!(ok_list && list.lines().any(|l| l.contains("plug") && l.contains("via bridge")), "{list}");

    // Over the bound, another device, a non-gateway: refused with the reason (5.0).
    let (mut c, ack) =
        Raw::connect_v5(app.mqtt, "bridge-raw", "bridge", &bridge, 30, true, &v5::prop_u8(0x17, 1)).await;
    assert_eq!(ack.body[1], 0);
    let (code, why) = refused(&mut c, "zigbee2mqtt/extra", 1).await;
    assert!(code == 0x97 && why.contains("mqtt.gateway_max_children = 3"), "quota exceeded: {code:#x} {why}");
    let (code, why) = refused(&mut c, "zigbee2mqtt/plain", 2).await;
    assert!(code == 0x87 && why.contains("not a child of gateway"), "{code:#x} {why}");
    let (mut p, ack) = Raw::connect_v5(app.mqtt, "plain", "plain", &plain, 30, true, &v5::prop_u8(0x17, 1)).await;
    assert_eq!(ack.body[1], 0);
    let (code, why) = refused(&mut p, "zigbee2mqtt/lamp", 3).await;
    assert!(code == 0x87 && why.contains("mqtt.topic_maps[0]"), "a plain device publishes only as itself: {why}");

    // A QoS 2 publish for a child, sent again before its PUBREL: one event.
    c.send(&v5::publish_packet("zigbee2mqtt/lamp", br#"{"state":"OFF"}"#, 2, 9, false, &[])).await;
    assert!(c.read_kind(5, T).await.is_some(), "PUBREC");
    let mut again = v5::publish_packet("zigbee2mqtt/lamp", br#"{"state":"OFF"}"#, 2, 9, false, &[]);
    again[0] |= 0x08; // DUP
    c.send(&again).await;
    assert!(c.read_kind(5, T).await.is_some(), "PUBREC again");
    c.send(&[0x62, 0x02, 0x00, 0x09]).await; // PUBREL 9
    assert!(c.read_kind(7, T).await.is_some(), "PUBCOMP");

    // plug revoked midway: refused (3.1.1 acks without storing), lamp goes on.
    cli_ok(&app, &["device", "revoke", "plug", "--tenant", "acme"]);
    let (code, why) = refused(&mut c, "zigbee2mqtt/plug", 4).await;
    assert!(code == 0x87 && why.contains("revoked"), "{code:#x} {why}");
    ok(pub_("mqttv311", "zigbee2mqtt/plug", r#"{"state":"ON"}"#).await.unwrap());
    ok(pub_("mqttv311", "zigbee2mqtt/lamp", r#"{"state":"ON","brightness":80}"#).await.unwrap());

    let rows = app.log_rows();
    let got: Vec<(&str, &str)> = rows.iter().map(|r| (r.device_id.as_str(), r.event_type.as_str())).collect();
    assert_eq!(
        got,
        [("lamp", "state"), ("plug", "state"), ("sensor", "temp"), ("lamp", "state"), ("lamp", "state")],
        "one event per accepted publish, none for a refused one"
    );
    for r in &rows {
        let props = r.properties.as_ref().map(|p| p.get().to_string()).unwrap_or_default();
        assert!(props.contains(r#""gateway":"bridge""#), "the gateway is recorded: {props}");
    }

    // Revoking the gateway ends its session: its children's traffic stops.
    cli_ok(&app, &["device", "revoke", "bridge", "--tenant", "acme"]);
    let disconnect = c.read_kind(14, T).await.expect("DISCONNECT");
    assert_eq!(disconnect.body[0], 0x87, "not authorized");
    let out = pub_("mqttv311", "zigbee2mqtt/lamp", "{}").await.unwrap();
    assert!(!out.status.success(), "a revoked gateway logs in no more");
    assert_eq!(app.log_rows().len(), 5);
}

/// A 5.0 QoS 1 publish of `{}` to `topic`: its PUBACK's reason code and string.
async fn refused(c: &mut common::mqtt_raw::Raw, topic: &str, pkid: u16) -> (u8, String) {
    use common::mqtt_raw::v5;
    c.send(&v5::publish_packet(topic, b"{}", 1, pkid, false, &[])).await;
    let puback = c.read_kind(4, T).await.expect("PUBACK");
    let why = v5::prop_string(&v5::props(&puback.body, 3), 0x1f).unwrap_or_default();
    (puback.body[2], why)
}

/// `POST …/device/register` registers gateways and their children (a
/// gateway may be another's child); a child of a device that is no
/// gateway is refused (409) naming `via` and registers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_api_registers_gateways_and_their_children() {
    let app = TestApp::start().await;
    let r = register(&app, serde_json::json!({"device_id": "bridge", "gateway": true})).await.unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!((body["device"]["gateway"].as_bool(), body["device"]["via"].is_null()), (Some(true), true), "{body}");
    let r = register(&app, serde_json::json!({"device_id": "lamp", "via": "bridge"})).await.unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["device"]["via"], "bridge", "{body}");
    for bad in [
        serde_json::json!({"device_id": "plug", "via": "lamp"}),
        serde_json::json!({"device_id": "plug", "via": "nobody"}),
    ] {
        let r = register(&app, bad.clone()).await.unwrap();
        assert_eq!(r.status(), 409, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!((body["error"].as_str(), body["field"].as_str()), (Some("not_a_gateway"), Some("via")), "{body}");
    }
    let r = register(&app, serde_json::json!({"device_id": "hub", "via": "bridge", "gateway": true})).await.unwrap();
    assert_eq!(r.status(), 201, "a gateway under a gateway");
    let (ok, list, _) = common::cli(app.dir.path(), &["device", "list", "--tenant", "acme"]);
    assert!(ok && !list.contains("plug"), "nothing registered by a refusal: {list}");
}

/// paho-mqtt 2.x (3.1.1 and 5.0) as the devices that exist: a relay with a
/// 24-character secret publishing plain text and raw bytes, and a bridge
/// publishing for its children on its own topic layout; each publish is
/// acked and stored as the issue's forms say (text, base64, the child's id
/// with its gateway).
/// paho 2.x, 3.1.1 and 5.0: a relay logs in with its secret and sends any
/// payload; a bridge publishes for children on its layout, which the relay
/// receives there (a layout subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_devices_log_in_with_a_secret_send_any_payload_and_publish_through_a_gateway() {
    use outpost::config::TopicMapRule;
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv-paho2/bin/python");
    assert!(python.exists(), "paho-mqtt 2.x venv missing: `make test-deps` installs it");
    let app = TestApp::start_with(|c| {
        c.mqtt.topic_maps =
            vec![TopicMapRule { pattern: "zigbee2mqtt/{device}".into(), event_type: Some("state".into()) }];
    })
    .await;
    let secret = add_with_secret(&app, "relay");
    let bridge = cli_ok(&app, &["device", "add", "--tenant", "acme", "--id", "bridge", "--gateway"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_devices.py");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python)
            .arg(script)
            .args(["127.0.0.1", &app.mqtt.port().to_string(), "acme", "relay", &secret, "bridge", &bridge])
            .output(),
    )
    .await
    .expect("paho script hung")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (acks, deliveries): (Vec<_>, Vec<_>) = lines.iter().partition(|l| l.get("acked").is_some());
    assert_eq!(acks.len(), 6, "2 versions × (text, bytes, child): {lines:?}");
    assert!(acks.iter().all(|l| l["acked"] == true), "{lines:?}");
    // The relay, subscribed to zigbee2mqtt/+ (a layout), got each child event there.
    let got: Vec<(&str, &str)> =
        deliveries.iter().map(|l| (l["topic"].as_str().unwrap(), l["payload"].as_str().unwrap())).collect();
    assert_eq!(got, [("zigbee2mqtt/lamp-311", r#"{"state":"ON"}"#), ("zigbee2mqtt/lamp-50", r#"{"state":"ON"}"#)]);
    let rows = app.log_rows();
    let got: Vec<(String, String, String)> =
        rows.iter().map(|r| (r.device_id.clone(), r.event_type.clone(), r.payload.get().to_string())).collect();
    let want = |d: &str, t: &str, p: &str| (d.to_string(), t.to_string(), p.to_string());
    let mut expected = Vec::new();
    for v in ["311", "50"] {
        expected.push(want("relay", "state", r#"{"text":"on"}"#));
        expected.push(want("relay", "frame", r#"{"base64":"AP8QgA=="}"#));
        expected.push(want(&format!("lamp-{v}"), "state", r#"{"state":"ON"}"#));
    }
    assert_eq!(got, expected);
    let gateway =
        rows.iter().filter(|r| r.properties.as_ref().is_some_and(|p| p.get().contains(r#""gateway":"bridge""#)));
    assert_eq!(gateway.count(), 2, "the children's events record their gateway");
}

/// A Shelly-style relay listens on its own command topic
/// (`shellies/<id>/relay/0/command`), which a controller (a gateway the
/// relay is registered under, as Home Assistant would be) publishes to:
/// the relay gets the command as sent, on its own layout, with mosquitto
/// 3.1.1; a persistent session keeps that subscription through a restart;
/// a filter on a rule that cannot write topics is refused naming the rule
/// (5.0 SUBACK reason string); another tenant's subscriber on the same
/// layout gets nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_subscribes_to_its_command_topic_on_its_own_layout() {
    use common::mqtt_raw::{Raw, v5};
    use outpost::config::TopicMapRule;
    let mut app = TestApp::start_with(|c| {
        c.mqtt.topic_maps = vec![
            TopicMapRule { pattern: "shellies/{device}/{type..}".into(), event_type: None },
            TopicMapRule { pattern: "stat/{device}/+".into(), event_type: Some("status".into()) },
        ];
    })
    .await;
    let hass = cli_ok(&app, &["device", "add", "--tenant", "acme", "--id", "hass", "--gateway"]);
    let relay = cli_ok(&app, &["device", "add", "--tenant", "acme", "--id", "relay-1", "--via", "hass"]);
    let other = app.device("globex", "relay-1").await;
    let port = app.mqtt.port().to_string();
    let command = "shellies/relay-1/relay/0/command";
    let hass_pub = |payload: &str| {
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-i", "hass", "-u", "hass", "-P", &hass, "-q", "1", "-V", "mqttv5"])
            .args(["-t", command, "-m", payload])
            .output()
    };

    // The relay (mosquitto_sub, 3.1.1) and globex's relay-1 (raw 3.1.1),
    // both on the layout; the relay is live once its client saw the SUBACK.
    // (stdbuf: its debug lines are stdio-buffered into a pipe otherwise.)
    let mut sub = tokio::process::Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port, "-i", "relay-1", "-u", "relay-1"])
        .args(["-P", &relay, "-q", "1"])
        .args(["-V", "mqttv311", "-d", "-v", "-C", "1", "-W", "20", "-t", command])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    let mut log = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(T, lines.next_line()).await {
        log.push(line);
        if log.last().unwrap().starts_with("Subscribed") {
            break;
        }
    }
    assert!(log.last().is_some_and(|l| l.ends_with(": 1")), "granted QoS 1: {log:?}");
    let (mut g, code) = Raw::connect(app.mqtt, "relay-1", "relay-1", &other, 30, None).await;
    assert_eq!(code, 0);
    g.subscribe(1, &["shellies/#"]).await;
    let ack = g.read_kind(9, T).await.expect("SUBACK");
    assert_eq!(ack.body[2], 1, "granted: the layout is open to any tenant's devices, each sees its own tenant");

    let out = hass_pub("on").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut got = None;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(T, lines.next_line()).await {
        if !line.starts_with("Client ") {
            got = Some(line);
            break;
        }
    }
    assert_eq!(got.as_deref(), Some("shellies/relay-1/relay/0/command on"), "the command as sent, on its layout");
    let rows = app.log_rows();
    assert_eq!((rows[0].device_id.as_str(), rows[0].event_type.as_str()), ("relay-1", "relay.0.command"));
    // globex's subscriber: its own device's publish is the first it gets.
    let (mut gp, _) = Raw::connect(app.mqtt, "relay-1-p", "relay-1", &other, 30, None).await;
    gp.publish("shellies/relay-1/relay/0", b"off", 1, 1, false, false).await;
    assert!(gp.read_kind(4, T).await.is_some(), "PUBACK");
    let first = g.read_kind(3, T).await.expect("PUBLISH");
    let topic_len = usize::from(u16::from_be_bytes([first.body[0], first.body[1]]));
    assert_eq!(&first.body[2..2 + topic_len], b"shellies/relay-1/relay/0", "not acme's command");
    assert!(first.body.ends_with(b"off"));

    // A persistent session: subscribed, away over a restart, back without
    // subscribing again: the next command still reaches it on its layout.
    let (mut r, code, _) = Raw::connect_session(app.mqtt, "relay-1-p", "relay-1", &relay, 30, None, false).await;
    assert_eq!(code, 0);
    r.subscribe(1, &[command]).await;
    assert_eq!(r.read_kind(9, T).await.expect("SUBACK").body[2], 1);
    r.disconnect().await;
    app.restart().await;
    let (mut r, code, present) = Raw::connect_session(app.mqtt, "relay-1-p", "relay-1", &relay, 30, None, false).await;
    assert!(code == 0 && present, "the session is back");
    let port = app.mqtt.port().to_string();
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "hass", "-u", "hass", "-P", &hass, "-q", "1"])
        .args(["-t", command, "-m", "off"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let delivery = r.read_kind(3, T).await.expect("the command after the restart");
    let topic_len = usize::from(u16::from_be_bytes([delivery.body[0], delivery.body[1]]));
    assert_eq!(&delivery.body[2..2 + topic_len], command.as_bytes());
    assert!(delivery.body.ends_with(b"off"));

    // stat/{device}/+ cannot write a topic: refused, naming the rule.
    let (mut c, ack) = Raw::connect_v5(app.mqtt, "relay-1-x", "relay-1", &relay, 30, true, &[]).await;
    assert_eq!(ack.body[1], 0);
    c.send(&v5::subscribe_packet(1, &[("stat/relay-1/POWER", 1), ("shellies/relay-1/#", 1)], &[])).await;
    let suback = c.read_kind(9, T).await.expect("SUBACK");
    let why = v5::prop_string(&v5::props(&suback.body, 2), 0x1f).unwrap_or_default();
    let codes = &suback.body[suback.body.len() - 2..];
    assert_eq!(codes, [0x87, 1], "{why}");
    assert!(why.starts_with("stat/relay-1/POWER: mqtt.topic_maps[1] (\"stat/{device}/+\") has a + segment"), "{why}");
}

//! The MQTT trust boundary, black-box against the real binary: tenants stay
//! apart, revocation and expiry end open sessions, an ack means the event is
//! kept, and the protocol is enforced byte by byte. Raw sockets where the
//! bytes matter; devices are added with the CLI while the appliance runs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::mqtt_raw::{Raw, Will, connect_packet, publish_packet};
use common::{Proc, cli, eventually, log_rows};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
/// Revocation reaches open sessions within 1 s; the tests allow scheduling slack.
const REVOKE_BOUND: Duration = Duration::from_millis(1500);

use common::add_device as add;

fn rows(dir: &Path) -> Vec<outpost::event::StoredEvent> {
    log_rows(&dir.join("site-log.sqlite"))
}

async fn post(proc: &Proc, tenant: &str, token: &str, device: &str, payload: Value) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("{}/api/v1/realtime/{tenant}/event", proc.base()))
        .bearer_auth(token)
        .json(&json!({"device_id": device, "event_type": "t", "payload": payload}))
        .send()
        .await
        .unwrap()
        .status()
}

fn start(dir: &Path, env: &[(&str, &str)]) -> Proc {
    Proc::start(dir, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_never_cross_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mqtt = p.mqtt.unwrap();
    let acme = add(dir.path(), "acme", "sensor-1");
    let globex_sensor = add(dir.path(), "globex", "sensor");
    let globex_same = add(dir.path(), "globex", "sensor-1");
    let publisher = add(dir.path(), "acme", "pub-1");
    // acme's sensor-1 subscribes with a persistent session and leaves.
    let (mut a, code, _) = Raw::connect_session(mqtt, "sensor-1", "sensor-1", &acme, 30, None, false).await;
    assert_eq!(code, 0);
    a.subscribe(1, &["acme/events/#"]).await;
    assert!(a.read_kind(9, T).await.is_some(), "SUBACK");
    a.disconnect().await;
    assert!(a.closed(T).await);
    // Another acme device publishes: the event is queued for that session.
    let (mut pb, _) = Raw::connect(mqtt, "pub-1", "pub-1", &publisher, 30, None).await;
    pb.publish("acme/devices/pub-1/events/t", br#"{"s":1}"#, 1, 1, false, false).await;
    assert!(pb.read_kind(4, T).await.is_some());
    // globex's `sensor` may use client id "sensor-1" (its own id plus a
    // suffix), but gets a session of its own: not acme's, not globex's sensor-1's.
    let (mut gs, code, present) =
        Raw::connect_session(mqtt, "sensor-1", "sensor", &globex_sensor, 30, None, false).await;
    assert_eq!((code, present), (0, false), "a fresh session, not acme's");
    assert!(gs.read_kind(3, Duration::from_secs(1)).await.is_none(), "acme's event leaked into globex's sensor");
    // globex's own sensor-1, same client id, likewise.
    let (mut g, code, present) =
        Raw::connect_session(mqtt, "sensor-1", "sensor-1", &globex_same, 30, None, false).await;
    assert_eq!((code, present), (0, false), "a fresh session, not acme's");
    assert!(g.read_kind(3, Duration::from_secs(1)).await.is_none(), "acme's event leaked into globex");
    // acme's session is intact: resuming it delivers the queued event.
    let (mut a, code, present) = Raw::connect_session(mqtt, "sensor-1", "sensor-1", &acme, 30, None, false).await;
    assert_eq!((code, present), (0, true));
    let publish = a.read_kind(3, T).await.expect("acme's queued event");
    assert!(String::from_utf8_lossy(&publish.body).contains("acme/events/pub-1/t"));
    // Both tenants' sensor-1 stay connected side by side: neither kicked the other.
    for c in [&mut a, &mut g, &mut gs] {
        c.send(&[0xc0, 0]).await;
        assert!(c.read_kind(13, T).await.is_some(), "PINGRESP: still connected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_redelivery_matches_topic_and_payload_not_the_packet_id_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "door-1");
    let mut c = door(&p, &token).await;
    let open = "acme/devices/door-1/events/door.open";
    let close = "acme/devices/door-1/events/door.close";
    let expect_rows = |n: usize, what: &str| {
        let got = rows(dir.path()).len();
        assert_eq!(got, n, "{what}");
    };
    publish_acked(&mut c, open, br#"{"v":1}"#, 7, false).await;
    expect_rows(1, "first publish");
    // Same packet id and payload, another topic: a new event.
    publish_acked(&mut c, close, br#"{"v":1}"#, 7, true).await;
    expect_rows(2, "same payload on another topic is stored");
    // Same packet id and topic, another payload: a new event.
    publish_acked(&mut c, close, br#"{"v":2}"#, 7, true).await;
    expect_rows(3, "same topic with another payload is stored");
    // A true resend of the latest: acked, not stored again.
    publish_acked(&mut c, close, br#"{"v":2}"#, 7, true).await;
    expect_rows(3, "the resend is recognised");
    let types: Vec<String> = rows(dir.path()).iter().map(|r| r.event_type.clone()).collect();
    assert_eq!(types, ["door.open", "door.close", "door.close"]);
}

/// A DUP=1 resend is found by walking back from the device's newest event
/// (kept in memory, stored every 10 s): after a SIGKILL the appliance finds
/// the newest events again in the log, so a resend of an older one is still
/// recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_redelivery_walks_back_past_newer_events_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "door-1");
    let mut c = door(&p, &token).await;
    let topic = "acme/devices/door-1/events/door.open";
    for pkid in 1..=5u16 {
        publish_acked(&mut c, topic, format!(r#"{{"v":{pkid}}}"#).as_bytes(), pkid, false).await;
    }
    // Killed well within the 10 s after which the heads would be stored.
    p.kill9();
    let p = start(dir.path(), &[]);
    let mut c = door(&p, &token).await;
    // Resends of the fourth and the second: acked, not stored again.
    for pkid in [4u16, 2] {
        publish_acked(&mut c, topic, format!(r#"{{"v":{pkid}}}"#).as_bytes(), pkid, true).await;
    }
    assert_eq!(rows(dir.path()).len(), 5, "resends after the kill are recognised");
    // The packet id of the first with another payload: a new event, which
    // is now the newest; the one before it is still found behind it.
    publish_acked(&mut c, topic, br#"{"v":"new"}"#, 1, true).await;
    publish_acked(&mut c, topic, br#"{"v":3}"#, 3, true).await;
    assert_eq!(
        payloads(dir.path()),
        [r#"{"v":1}"#, r#"{"v":2}"#, r#"{"v":3}"#, r#"{"v":4}"#, r#"{"v":5}"#, r#"{"v":"new"}"#]
    );
}

/// The heads stored at a clean stop, then newer events the kill kept from
/// being stored: the newest event under a packet id is the one found after
/// the restart. A stale head would match the older event with that id, and
/// a new publish would be acked without being stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_newest_event_under_a_packet_id_is_the_one_matched() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "door-1");
    let topic = "acme/devices/door-1/events/door.open";
    let mut c = door(&p, &token).await;
    publish_acked(&mut c, topic, br#"{"v":"a"}"#, 1, false).await;
    drop(c);
    assert!(p.terminate_in_place().success(), "a clean stop stores the heads");
    let p = start(dir.path(), &[]);
    let mut c = door(&p, &token).await;
    publish_acked(&mut c, topic, br#"{"v":"b"}"#, 2, false).await;
    publish_acked(&mut c, topic, br#"{"v":"c"}"#, 1, false).await;
    p.kill9();
    let p = start(dir.path(), &[]);
    let mut c = door(&p, &token).await;
    // Packet id 1 now belongs to "c": a resend of "c" is recognised, and
    // "a" under packet id 1 is a new event.
    publish_acked(&mut c, topic, br#"{"v":"c"}"#, 1, true).await;
    publish_acked(&mut c, topic, br#"{"v":"a"}"#, 1, true).await;
    assert_eq!(payloads(dir.path()), [r#"{"v":"a"}"#, r#"{"v":"b"}"#, r#"{"v":"c"}"#, r#"{"v":"a"}"#]);
}

/// door-1's clean MQTT 3.1.1 connection to `p`.
async fn door(p: &Proc, token: &str) -> Raw {
    let (c, code) = Raw::connect(p.mqtt.unwrap(), "door-1", "door-1", token, 30, None).await;
    assert_eq!(code, 0);
    c
}

/// Publishes at QoS 1 and waits for its PUBACK.
async fn publish_acked(c: &mut Raw, topic: &str, payload: &[u8], pkid: u16, dup: bool) {
    c.publish(topic, payload, 1, pkid, dup, false).await;
    assert_eq!(c.read_kind(4, T).await.unwrap().pkid(), pkid);
}

/// The stored events' payloads, in seq order.
fn payloads(dir: &Path) -> Vec<String> {
    rows(dir).iter().map(|r| r.payload.get().to_string()).collect()
}

/// Opens a WebSocket stream, an SSE stream and a long-poll for `token`.
async fn open_streams(
    p: &Proc,
    token: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    reqwest::Response,
    tokio::task::JoinHandle<reqwest::Response>,
) {
    let ws_url = format!("ws://{}/api/v1/realtime/acme/stream?access_token={token}", p.addr);
    let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let sse = reqwest::Client::new()
        .get(format!("{}/api/v1/realtime/acme/sse", p.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let url = format!("{}/api/v1/realtime/acme/poll?timeout=30", p.base());
    let t = token.to_string();
    let poll = tokio::spawn(async move { reqwest::Client::new().get(url).bearer_auth(t).send().await.unwrap() });
    // The long-poll is open once the appliance counts it: only then is a
    // revocation one that must end it (before, it is answered 401).
    let open = eventually(T, || async {
        p.metric_labelled("outpost_tenant_stream_subscribers", "tenant=\"acme\"").await == Some(3)
    })
    .await;
    assert!(open, "the three streams never all opened");
    (ws, sse, poll)
}

/// Waits for every session of a revoked (or expired) device to end; returns
/// the longest time it took and the WebSocket error code.
async fn sessions_end(
    mqtt: &mut Raw,
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    sse: reqwest::Response,
    poll: tokio::task::JoinHandle<reqwest::Response>,
    since: Instant,
) -> (Duration, String) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    assert!(mqtt.closed(T).await, "MQTT connection still open");
    let mut slowest = since.elapsed();
    let mut code = String::new();
    while let Some(Ok(m)) = tokio::time::timeout(T, ws.next()).await.expect("WebSocket stayed open") {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "error" {
                    code = v["code"].as_str().unwrap_or("").to_string();
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    slowest = slowest.max(since.elapsed());
    let body = tokio::time::timeout(T, sse.text()).await.expect("SSE stream stayed open").unwrap_or_default();
    assert!(body.contains("event: error"), "SSE ended without its error event: {body}");
    slowest = slowest.max(since.elapsed());
    let r = tokio::time::timeout(T, poll).await.expect("long-poll stayed open").unwrap();
    assert_eq!(r.status(), 200);
    slowest = slowest.max(since.elapsed());
    (slowest, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_by_api_or_cli_ends_every_open_session_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let admin = {
        let (ok, out, err) = cli(dir.path(), &["token", "issue", "--admin"]);
        assert!(ok, "{err}");
        out.trim().to_string()
    };
    for (device, by_cli) in [("api-1", false), ("cli-1", true)] {
        let token = add(dir.path(), "acme", device);
        let (mut mqtt, code) = Raw::connect(p.mqtt.unwrap(), device, device, &token, 30, None).await;
        assert_eq!(code, 0);
        let (mut ws, sse, poll) = open_streams(&p, &token).await;
        let since = Instant::now();
        if by_cli {
            let (ok, _, err) = cli(dir.path(), &["device", "revoke", device, "--tenant", "acme"]);
            assert!(ok, "{err}");
        } else {
            let r = reqwest::Client::new()
                .delete(format!("{}/api/v1/realtime/acme/device/{device}", p.base()))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let (took, code) = sessions_end(&mut mqtt, &mut ws, sse, poll, since).await;
        assert_eq!(code, "revoked", "{device}: WebSocket error frame");
        assert!(took <= REVOKE_BOUND, "{device}: sessions ended after {took:?}");
        // And nothing it publishes now is acked: the connection is refused.
        let (_, code) = Raw::connect(p.mqtt.unwrap(), device, device, &token, 30, None).await;
        assert_eq!(code, 4, "{device}: a revoked device cannot reconnect");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_ends_open_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    add(dir.path(), "acme", "exp-1");
    // A token of this appliance's key that expires in 3 s.
    let secret = std::fs::read_to_string(dir.path().join("jwt.secret")).unwrap();
    let mut config = common::test_config(dir.path());
    config.site.data_dir = dir.path().to_path_buf();
    let _ = common::issuer(&config); // installs the crypto provider
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3;
    let claims =
        json!({"sub": "exp-1", "tenant": "acme", "perms": ["write_events", "read_events"], "exp": exp, "jti": "e"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    let (mut mqtt, code) = Raw::connect(p.mqtt.unwrap(), "exp-1", "exp-1", &token, 30, None).await;
    assert_eq!(code, 0);
    let (mut ws, sse, poll) = open_streams(&p, &token).await;
    let since = Instant::now();
    let (took, code) = sessions_end(&mut mqtt, &mut ws, sse, poll, since).await;
    assert_eq!(code, "token_expired");
    assert!(took >= Duration::from_secs(1) && took <= Duration::from_secs(5), "ended after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_by_the_cli_works_the_moment_the_command_returns() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    for i in 0..5 {
        let id = format!("new-{i}");
        let token = add(dir.path(), "acme", &id);
        assert_eq!(post(&p, "acme", &token, &id, json!({"i": i})).await, 201, "HTTP right after device add");
        let token = add(dir.path(), "acme", &format!("{id}-m"));
        let (_, code) = Raw::connect(p.mqtt.unwrap(), &format!("{id}-m"), &format!("{id}-m"), &token, 30, None).await;
        assert_eq!(code, 0, "MQTT right after device add");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_trace_level_carries_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), &[("OUTPOST_LOG", "trace")]);
    let mqtt = p.mqtt.unwrap();
    let token = add(dir.path(), "acme", "leak-1");
    let signature = token.rsplit('.').next().unwrap().to_string();
    // Every refusal path: wrong user, bad client id, admin-less garbage…
    let _ = Raw::connect(mqtt, "leak-1", "someone-else", &token, 30, None).await;
    let _ = Raw::connect(mqtt, "other", "leak-1", &token, 30, None).await;
    let _ = Raw::connect(mqtt, "leak-1", "leak-1", &format!("{token}x"), 30, None).await;
    // …a second CONNECT on a live connection (its Debug output had the password)…
    let (mut c, code) = Raw::connect(mqtt, "leak-1", "leak-1", &token, 30, None).await;
    assert_eq!(code, 0);
    // (subscribed first, so the fan-out has the session too)
    c.subscribe(1, &["acme/devices/leak-1/events/#"]).await;
    assert!(c.read_kind(9, T).await.is_some(), "SUBACK");
    c.send(&connect_packet("leak-1", "leak-1", &token, 30, None, true)).await;
    assert!(c.closed(T).await);
    // …a foreign topic, a bad payload, a malformed packet.
    for bytes in [
        publish_packet("acme/devices/other/events/t", b"{}", 1, 1, false, false),
        publish_packet("acme/devices/leak-1/events/t", br#"{"a":"\u0000"}"#, 1, 1, false, false),
        vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ] {
        let (mut c, _) = Raw::connect(mqtt, "leak-1", "leak-1", &token, 30, None).await;
        c.send(&bytes).await;
        assert!(c.closed(T).await);
    }
    let status = p.terminate_in_place();
    assert_eq!(status.code(), Some(0));
    let lines: Vec<String> = p.stderr_tail.try_iter().collect();
    assert!(lines.len() > 10, "trace logging produced {} lines", lines.len());
    let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(&signature)).collect();
    assert!(leaks.is_empty(), "token in the log: {leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_in_the_same_segment_as_connect_or_disconnect_are_processed() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mqtt = p.mqtt.unwrap();
    let token = add(dir.path(), "acme", "seg-1");
    // CONNECT + PUBLISH (QoS 1) in one write: CONNACK, then PUBACK.
    let mut c = Raw::connect_tcp(mqtt).await;
    let mut bytes = connect_packet("seg-1", "seg-1", &token, 30, None, true);
    bytes.extend(publish_packet("acme/devices/seg-1/events/first", br#"{"n":1}"#, 1, 1, false, false));
    c.send(&bytes).await;
    assert_eq!(c.read_kind(2, T).await.expect("CONNACK").body[1], 0);
    assert_eq!(c.read_kind(4, T).await.expect("PUBACK of the publish that came with CONNECT").pkid(), 1);
    // PUBLISH (QoS 0) + DISCONNECT in one write: stored.
    let mut bytes = publish_packet("acme/devices/seg-1/events/last", br#"{"n":2}"#, 0, 0, false, false);
    bytes.extend([0xe0, 0]);
    c.send(&bytes).await;
    assert!(c.closed(T).await);
    let stored = eventually(T, || async { rows(dir.path()).len() == 2 }).await;
    let types: Vec<String> = rows(dir.path()).iter().map(|r| r.event_type.clone()).collect();
    assert!(stored, "stored: {types:?}");
    assert_eq!(types, ["first", "last"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_connection_outlives_its_keep_alive_and_fires_no_will() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[("OUTPOST_LIMITS__PER_SECOND", "1")]);
    let token = add(dir.path(), "acme", "slow-1");
    let will = Will("acme/devices/slow-1/events/gone", br#"{"will":true}"#, false);
    // Keep-alive 1 s: the connection would expire after 1.5 s without reads.
    let (mut c, code) = Raw::connect(p.mqtt.unwrap(), "slow-1", "slow-1", &token, 1, Some(will)).await;
    assert_eq!(code, 0);
    for i in 1..=4u16 {
        c.publish("acme/devices/slow-1/events/t", format!(r#"{{"i":{i}}}"#).as_bytes(), 1, i, false, false).await;
    }
    // The device keeps pinging while the appliance holds its publishes back.
    let started = Instant::now();
    let mut acked = 0;
    while acked < 4 {
        c.send(&[0xc0, 0]).await;
        match c.read(Duration::from_millis(400)).await {
            Some(f) if f.kind == 4 => acked += 1,
            Some(_) => {}
            None => assert!(started.elapsed() < Duration::from_secs(15), "acked {acked} of 4"),
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(2), "the rate limit held the publishes back");
    c.disconnect().await;
    assert!(c.closed(T).await);
    let types: Vec<String> = rows(dir.path()).iter().map(|r| r.event_type.clone()).collect();
    assert_eq!(types, ["t", "t", "t", "t"], "no will: the connection was throttled, not lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_counts_against_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[("OUTPOST_LIMITS__PER_SECOND", "1")]);
    let token = add(dir.path(), "acme", "will-1");
    let will = Will("acme/devices/will-1/events/gone", br#"{"will":true}"#, false);
    let (mut c, code) = Raw::connect(p.mqtt.unwrap(), "will-1", "will-1", &token, 30, Some(will)).await;
    assert_eq!(code, 0);
    c.publish("acme/devices/will-1/events/t", br#"{"i":1}"#, 1, 1, false, false).await;
    assert!(c.read_kind(4, T).await.is_some());
    drop(c); // unclean: the will fires, but only once the window allows it
    assert!(eventually(T, || async { rows(dir.path()).len() == 2 }).await, "will stored");
    let r = rows(dir.path());
    let gap = r[1].received_at - r[0].received_at;
    assert!(gap >= time::Duration::milliseconds(800), "will stored {gap} after the publish, inside the 1/s window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reserved_flag_and_wrong_subscribe_flags_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mqtt = p.mqtt.unwrap();
    let token = add(dir.path(), "acme", "strict-1");
    // [MQTT-3.1.2-3]: the reserved connect flag must be 0.
    let mut bytes = connect_packet("strict-1", "strict-1", &token, 30, None, true);
    let flags_at = 2 + 2 + 4 + 1 + usize::from(bytes[1] & 0x80 != 0); // fixed header, "MQTT", level
    bytes[flags_at] |= 1;
    let mut c = Raw::connect_tcp(mqtt).await;
    c.send(&bytes).await;
    assert!(c.read_kind(2, Duration::from_secs(2)).await.is_none(), "no CONNACK for a reserved flag");
    assert!(c.closed(T).await);
    // [MQTT-3.8.1-1]: SUBSCRIBE's fixed-header flags must be 0010.
    let (mut c, code) = Raw::connect(mqtt, "strict-1", "strict-1", &token, 30, None).await;
    assert_eq!(code, 0);
    let mut sub = vec![0x80, 0];
    let body = [0u8, 1, 0, 13, b'a', b'c', b'm', b'e', b'/', b'e', b'v', b'e', b'n', b't', b's', b'/', b'#', 1];
    sub[1] = body.len() as u8;
    sub.extend(body);
    c.send(&sub).await;
    assert!(c.read_kind(9, Duration::from_secs(2)).await.is_none(), "no SUBACK for wrong flags");
    assert!(c.closed(T).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_filters_and_retained_messages_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OUTPOST_MQTT__MAX_SESSIONS_PER_DEVICE", "2"),
        ("OUTPOST_MQTT__MAX_FILTERS", "2"),
        ("OUTPOST_MQTT__MAX_RETAINED_PER_TENANT", "2"),
    ];
    let p = start(dir.path(), &env);
    let mqtt = p.mqtt.unwrap();
    let token = add(dir.path(), "acme", "b-1");
    // Filters: the third distinct filter of a connection is refused.
    let (mut c, _) = Raw::connect(mqtt, "b-1", "b-1", &token, 30, None).await;
    c.subscribe(1, &["acme/events/a/#", "acme/events/b/#", "acme/events/c/#"]).await;
    let ack = c.read_kind(9, T).await.unwrap();
    assert_eq!(&ack.body[2..], &[1, 1, 0x80]);
    // Retained: a third retained topic is delivered but not retained.
    for t in ["r1", "r2", "r3"] {
        c.publish(&format!("acme/devices/b-1/events/{t}"), br#"{"r":1}"#, 1, 9, false, true).await;
        assert!(c.read_kind(4, T).await.is_some());
    }
    c.disconnect().await;
    let (mut late, _) = Raw::connect(mqtt, "b-1-late", "b-1", &token, 30, None).await;
    late.subscribe(2, &["acme/events/#"]).await;
    let mut retained = 0;
    while let Some(f) = late.read(Duration::from_secs(1)).await {
        retained += usize::from(f.kind == 3);
    }
    assert_eq!(retained, 2, "retained messages beyond the tenant's bound");
    // Persistent sessions: a third evicts the device's oldest.
    for id in ["b-1-s1", "b-1-s2", "b-1-s3"] {
        let (mut s, code, _) = Raw::connect_session(mqtt, id, "b-1", &token, 30, None, false).await;
        assert_eq!(code, 0);
        s.subscribe(3, &["acme/events/#"]).await;
        assert!(s.read_kind(9, T).await.is_some());
        s.disconnect().await;
        assert!(s.closed(T).await);
    }
    let (_, _, present) = Raw::connect_session(mqtt, "b-1-s1", "b-1", &token, 30, None, false).await;
    assert!(!present, "the oldest persistent session was evicted");
    let (_, _, present) = Raw::connect_session(mqtt, "b-1-s3", "b-1", &token, 30, None, false).await;
    assert!(present, "the newest is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_stays_online_until_the_last_session_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "pr-1");
    let online = || async {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/realtime/acme/presence", p.base()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["online"].as_array().unwrap().iter().any(|d| d["device_id"] == "pr-1")
    };
    let (mut a, _) = Raw::connect(p.mqtt.unwrap(), "pr-1", "pr-1", &token, 30, None).await;
    let (mut b, _) = Raw::connect(p.mqtt.unwrap(), "pr-1-b", "pr-1", &token, 30, None).await;
    assert!(eventually(T, &online).await);
    a.disconnect().await;
    assert!(a.closed(T).await);
    // Give a wrong "offline" every chance to land, then check it did not.
    b.send(&[0xc0, 0]).await;
    assert!(b.read_kind(13, T).await.is_some());
    assert!(online().await, "offline while a session remains");
    b.disconnect().await;
    assert!(b.closed(T).await);
    assert!(eventually(T, || async { !online().await }).await, "online after the last session ended");
}

//! MQTT for the devices that exist, black-box against the real binary:
//! 3.1, 3.1.1 and 5.0 on one listener and over WebSocket, QoS 0/1/2 with
//! the same contract (an ack, PUBACK or PUBREC, means the event is in the
//! site log), retained messages, and 5.0's reason codes and properties.
//! Tests are named after the normative statement they check, where there
//! is one. Raw sockets where the bytes matter; mosquitto, paho 2.x and
//! rumqttc's v5 client where a real client is enough.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::mqtt_raw::v5::{self, prop_str, prop_u8, prop_u16, prop_u32, user_prop};
use common::mqtt_raw::{Raw, frame, publish_packet};
use common::{Proc, add_device as add, cli, eventually, log_rows};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const T: Duration = Duration::from_secs(10);

fn rows(dir: &Path) -> Vec<outpost::event::StoredEvent> {
    log_rows(&dir.join("site-log.sqlite"))
}

/// Runs a mosquitto client against the appliance's MQTT listener.
async fn mosquitto(tool: &str, p: &Proc, device: &str, token: &str, args: &[&str]) -> std::process::Output {
    let mqtt = p.mqtt.unwrap();
    let (host, port) = (mqtt.ip().to_string(), mqtt.port().to_string());
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(["-h", &host, "-p", &port, "-u", device, "-P", token]).args(args);
    tokio::time::timeout(T, cmd.output()).await.expect("mosquitto client hung").unwrap()
}

/// A running `mosquitto_sub` whose output lines arrive on a channel.
struct Sub {
    _child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Sub {
    fn start(p: &Proc, device: &str, token: &str, args: &[&str]) -> Self {
        let mqtt = p.mqtt.unwrap();
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args(["-h", &mqtt.ip().to_string(), "-p", &mqtt.port().to_string(), "-u", device, "-P", token])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { _child: child, lines }
    }

    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(T, self.lines.recv()).await.ok().flatten()
    }
}

/// Publishes probes over HTTP until `sub` prints one: its subscription is live.
async fn until_subscribed(p: &Proc, token: &str, device: &str, sub: &mut Sub) {
    for i in 0..50 {
        let url = format!("{}/api/v1/realtime/acme/event", p.base());
        let body = serde_json::json!({"device_id": device, "event_type": "probe", "payload": {"probe": i}});
        let r = reqwest::Client::new().post(url).bearer_auth(token).json(&body).send().await.unwrap();
        assert!(r.status().is_success());
        if let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(200), sub.lines.recv()).await {
            assert!(l.contains("probe"), "{l}");
            // Drain probes already in flight.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), sub.lines.recv()).await {}
            return;
        }
    }
    panic!("mosquitto_sub never received a probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_a_qos0_publish_followed_by_disconnect_in_one_write_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "pump-1");
    // mosquitto_pub -q 0 writes PUBLISH and DISCONNECT back to back.
    for v in ["mqttv311", "mqttv5"] {
        for i in 0..5 {
            let out = mosquitto(
                "mosquitto_pub",
                &p,
                "pump-1",
                &token,
                &[
                    "-V",
                    v,
                    "-q",
                    "0",
                    "-i",
                    "pump-1",
                    "-t",
                    "acme/devices/pump-1/events/t",
                    "-m",
                    &format!("{{\"i\":{i}}}"),
                ],
            )
            .await;
            assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert!(
        eventually(T, || async { rows(dir.path()).len() == 10 }).await,
        "5 of 5 QoS 0 publishes stored, per version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_8_4_6_delivery_qos_is_the_minimum_of_publish_and_granted_qos() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let publisher = add(dir.path(), "acme", "pump-1");
    let sub_token = add(dir.path(), "acme", "panel");
    for version in ["mqttv311", "mqttv5"] {
        let fmt = ["-F", "%q %p", "-t", "acme/events/pump-1/#", "-V", version];
        let mut q2 = Sub::start(&p, "panel", &sub_token, &[&["-q", "2", "-i", "panel-q2"][..], &fmt].concat());
        let mut q1 = Sub::start(&p, "panel", &sub_token, &[&["-q", "1", "-i", "panel-q1"][..], &fmt].concat());
        until_subscribed(&p, &publisher, "pump-1", &mut q2).await;
        until_subscribed(&p, &publisher, "pump-1", &mut q1).await;
        for qos in ["0", "1", "2"] {
            let out = mosquitto(
                "mosquitto_pub",
                &p,
                "pump-1",
                &publisher,
                &["-V", version, "-q", qos, "-t", "acme/devices/pump-1/events/t", "-m", &format!("{{\"q\":{qos}}}")],
            )
            .await;
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        for (sub, want) in [(&mut q2, ["0", "1", "2"]), (&mut q1, ["0", "1", "1"])] {
            let mut got = Vec::new();
            while got.len() < 3 {
                let l = sub.line().await.expect("delivery");
                if !l.contains("probe") {
                    got.push(l);
                }
            }
            // Three publishers (one mosquitto_pub each): no order between them.
            got.sort_by_key(|l| l.split(' ').nth(1).map(str::to_string));
            let expected: Vec<String> = (0..3).map(|i| format!("{} {{\"q\":{i}}}", want[i])).collect();
            assert_eq!(got, expected, "{version}: delivered QoS = min(publish, granted)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_10_a_zero_byte_retained_publish_clears_the_retained_message() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "pump-1");
    let pub_args =
        |topic: &'static str, msg: &'static [&'static str]| [&["-q", "1", "-r", "-t", topic][..], msg].concat();
    let out = mosquitto(
        "mosquitto_pub",
        &p,
        "pump-1",
        &token,
        &pub_args("acme/devices/pump-1/events/a", &["-m", "{\"a\":1}"]),
    )
    .await;
    assert!(out.status.success());
    let out =
        mosquitto("mosquitto_pub", &p, "pump-1", &token, &pub_args("acme/devices/pump-1/events/a", &["-n"])).await;
    assert!(out.status.success(), "the empty retained publish is acked: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(dir.path()).len(), 1, "clearing stores no event");
    let out = mosquitto(
        "mosquitto_pub",
        &p,
        "pump-1",
        &token,
        &pub_args("acme/devices/pump-1/events/b", &["-m", "{\"b\":1}"]),
    )
    .await;
    assert!(out.status.success());
    // A new subscriber gets the retained messages at once: only b's is left.
    let out =
        mosquitto("mosquitto_sub", &p, "pump-1", &token, &["-C", "1", "-F", "%r %t %p", "-t", "acme/events/#"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 acme/events/pump-1/b {\"b\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "pump-1");
    let out = mosquitto(
        "mosquitto_pub",
        &p,
        "pump-1",
        &token,
        &["-V", "mqttv5", "-q", "2", "-r", "-t", "acme/devices/pump-1/events/state", "-m", "{\"on\":true}"],
    )
    .await;
    assert!(out.status.success());
    assert!(p.terminate().success());
    let p = Proc::start(dir.path(), &[]);
    let out =
        mosquitto("mosquitto_sub", &p, "pump-1", &token, &["-C", "1", "-F", "%r %t %p", "-t", "acme/events/#"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 acme/events/pump-1/state {\"on\":true}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_2_an_unsupported_protocol_level_gets_connack_0x01_and_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    for (name, level) in [(&b"MQTT"[..], 6u8), (b"MQTT", 3), (b"MQIsdp", 4)] {
        let mut body = Vec::new();
        common::mqtt_raw::string(name, &mut body);
        body.extend_from_slice(&[level, 0xc2, 0, 30]);
        for s in ["d1", "d1", &token] {
            common::mqtt_raw::string(s.as_bytes(), &mut body);
        }
        let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
        c.send(&frame(0x10, &body)).await;
        let ack = c.read(T).await.expect("a CONNACK before the close");
        assert_eq!((ack.kind, ack.body.clone()), (2, vec![0, 1]), "level {level}");
        assert!(c.closed(T).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_31_clients_connect_and_publish_like_311_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    for qos in ["0", "1", "2"] {
        let out = mosquitto(
            "mosquitto_pub",
            &p,
            "d1",
            &token,
            &["-V", "mqttv31", "-i", "d1", "-q", qos, "-t", "acme/devices/d1/events/t", "-m", "{\"v\":31}"],
        )
        .await;
        assert!(out.status.success(), "QoS {qos}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(eventually(T, || async { rows(dir.path()).len() == 3 }).await);
}

/// QoS 2 PUBLISH with a chosen DUP flag.
fn qos2(pkid: u16, payload: &[u8], dup: bool) -> Vec<u8> {
    publish_packet("acme/devices/d1/events/t", payload, 2, pkid, dup, false)
}

async fn connect_persistent(addr: std::net::SocketAddr, token: &str) -> Raw {
    let (c, code, _) = Raw::connect_session(addr, "d1", "d1", token, 30, None, false).await;
    assert_eq!(code, 0);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_3_3_a_qos2_publish_resent_before_its_pubrel_is_stored_once_across_reconnects_and_kills() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_FAILPOINT", "")]);
    let token = add(dir.path(), "acme", "d1");
    let mut c = connect_persistent(p.mqtt.unwrap(), &token).await;
    c.send(&qos2(7, b"{\"n\":1}", false)).await;
    let rec = c.read_kind(5, T).await.expect("PUBREC");
    assert_eq!(rec.pkid(), 7);
    assert_eq!(rows(dir.path()).len(), 1, "PUBREC after the commit");
    // The same packet id before PUBREL: the same message.
    c.send(&qos2(7, b"{\"n\":1}", true)).await;
    assert_eq!(c.read_kind(5, T).await.expect("PUBREC again").pkid(), 7);
    // After a reconnect, and after SIGKILL and a restart, still the same message.
    drop(c);
    let mut c = connect_persistent(p.mqtt.unwrap(), &token).await;
    c.send(&qos2(7, b"{\"n\":1}", true)).await;
    assert_eq!(c.read_kind(5, T).await.expect("PUBREC after reconnect").pkid(), 7);
    p.kill9();
    let p = Proc::start(dir.path(), &[]);
    let mut c = connect_persistent(p.mqtt.unwrap(), &token).await;
    c.send(&qos2(7, b"{\"n\":1}", true)).await;
    assert_eq!(c.read_kind(5, T).await.expect("PUBREC after restart").pkid(), 7);
    assert_eq!(rows(dir.path()).len(), 1, "one event for one QoS 2 message");
    // PUBREL releases the id: PUBCOMP, and the id is free for a new message.
    c.send(&v5::ack_packet(0x62, 7)).await;
    assert_eq!(c.read_kind(7, T).await.expect("PUBCOMP").pkid(), 7);
    c.send(&qos2(7, b"{\"n\":2}", false)).await;
    assert_eq!(c.read_kind(5, T).await.expect("PUBREC").pkid(), 7);
    assert_eq!(rows(dir.path()).len(), 2);
    // A clean session discards the held ids with the session.
    c.send(&qos2(9, b"{\"n\":3}", false)).await;
    c.read_kind(5, T).await.expect("PUBREC");
    drop(c);
    let (mut c, code) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &token, 30, None).await;
    assert_eq!(code, 0);
    c.send(&qos2(9, b"{\"n\":3}", false)).await;
    c.read_kind(5, T).await.expect("PUBREC");
    assert_eq!(rows(dir.path()).len(), 4, "a new session's message with an old id is new");
}

/// CONNACK reason code and properties of a 5.0 connect.
async fn connect5(p: &Proc, client_id: &str, user: &str, pass: &str, props: &[u8]) -> (Raw, u8, Vec<(u8, Vec<u8>)>) {
    let (c, ack) = Raw::connect_v5(p.mqtt.unwrap(), client_id, user, pass, 30, true, props).await;
    let pr = v5::props(&ack.body, 2);
    (c, ack.body[1], pr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_connack_carries_reason_codes_reason_strings_and_server_limits() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (ok, admin, err) = cli(dir.path(), &["token", "issue", "--admin"]);
    assert!(ok, "{err}");
    let cases: [(&str, &str, &str, Vec<u8>, u8); 4] = [
        ("d1", "d1", "not-a-token", vec![], 0x86),
        ("d1", "d1", admin.trim(), vec![], 0x87),
        ("other", "d1", &token, vec![], 0x85),
        ("d1", "d1", &token, prop_str(0x15, "SCRAM-SHA-1"), 0x8c),
    ];
    for (client, user, pass, pr, want) in cases {
        let (mut c, code, props) = connect5(&p, client, user, pass, &pr).await;
        assert_eq!(code, want, "{client}/{user}");
        assert!(v5::prop_string(&props, 0x1f).is_some_and(|r| !r.is_empty()), "a reason string: {props:?}");
        assert!(c.closed(T).await);
    }
    let (_c, code, props) = connect5(&p, "d1", "d1", &token, &[]).await;
    assert_eq!(code, 0);
    let get = |id: u8| props.iter().find(|(i, _)| *i == id).map(|(_, v)| v.clone());
    assert_eq!(get(0x21), Some(256u16.to_be_bytes().to_vec()), "Receive Maximum = mqtt.max_inflight");
    assert_eq!(get(0x27), Some(131_072u32.to_be_bytes().to_vec()), "Maximum Packet Size");
    assert_eq!(get(0x22), Some(32u16.to_be_bytes().to_vec()), "Topic Alias Maximum");
    assert_eq!(get(0x2a), Some(vec![0]), "no shared subscriptions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_refused_publish_gets_a_negative_ack_and_the_connection_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    add(dir.path(), "acme", "d2");
    for problem_info in [1u8, 0] {
        let (mut c, code, _) = connect5(&p, "d1", "d1", &token, &prop_u8(0x17, problem_info)).await;
        assert_eq!(code, 0);
        for (topic, payload, qos, kind, reason) in [
            ("acme/devices/d2/events/x", &b"{}"[..], 1u8, 4u8, 0x87u8),
            // Any payload is an event, but a JSON object central would refuse
            // is refused by name.
            ("acme/devices/d1/events/x", br#"{"a":"\u0000"}"#, 1, 4, 0x99),
            ("acme/devices/d2/events/x", b"{}", 2, 5, 0x87),
            ("acme/devices/d1/events/x", br#"{"b":"\u0000"}"#, 2, 5, 0x99),
        ] {
            c.send(&v5::publish_packet(topic, payload, qos, 3, false, &[])).await;
            let ack = c.read_kind(kind, T).await.expect("a negative ack, not a close");
            assert_eq!((ack.pkid(), ack.body[2]), (3, reason), "{topic} {payload:?}");
            let reason_string = v5::prop_string(&v5::props(&ack.body, 3), 0x1f);
            assert_eq!(reason_string.is_some(), problem_info == 1, "reason strings only when asked for");
        }
        c.send(&v5::publish_packet("acme/devices/d1/events/x", b"{\"ok\":1}", 1, 4, false, &[])).await;
        let ack = c.read_kind(4, T).await.expect("PUBACK");
        assert!(ack.pkid() == 4 && ack.body.get(2).is_none_or(|r| *r == 0), "success: {ack:?}");
    }
    assert_eq!(rows(dir.path()).len(), 2, "only the valid publishes were stored");
}

/// MQTT 5.0 3.4.2.2.2 (and the same rule for every answer): a reason
/// string that would make the packet larger than the client's Maximum
/// Packet Size is left out; the reason code still says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_answers_stay_within_the_clients_maximum_packet_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let max = 64u32;
    let (mut c, code, _) = connect5(&p, "d1", "d1", &token, &v5::prop_u32(0x27, max)).await;
    assert_eq!(code, 0);
    let size = |f: &common::mqtt_raw::Frame| f.body.len() + 2; // one-byte length: under 128
    c.send(&v5::publish_packet("acme/devices/d2/events/x", b"{}", 1, 3, false, &[])).await;
    let ack = c.read_kind(4, T).await.expect("PUBACK");
    assert_eq!(ack.body[2], 0x87, "not authorized");
    assert!(size(&ack) <= max as usize, "PUBACK of {} bytes over the client's {max}: {ack:?}", size(&ack));
    c.send(&v5::subscribe_packet(4, &[("globex/events/#", 1)], &[])).await;
    let suback = c.read_kind(9, T).await.expect("SUBACK");
    assert_eq!(*suback.body.last().unwrap(), 0x87);
    assert!(size(&suback) <= max as usize, "SUBACK of {} bytes over {max}: {suback:?}", size(&suback));
    // A client that allows them still gets the reasons.
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    c.send(&v5::publish_packet("acme/devices/d2/events/x", b"{}", 1, 3, false, &[])).await;
    let ack = c.read_kind(4, T).await.expect("PUBACK");
    assert!(size(&ack) > max as usize && v5::prop_string(&v5::props(&ack.body, 3), 0x1f).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_server_disconnects_carry_a_reason_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_MQTT__MAX_PACKET_SIZE", "1024")]);
    let token = add(dir.path(), "acme", "d1");
    let disconnect = |f: Option<common::mqtt_raw::Frame>| f.map(|f| f.body[0]);
    // 0x8E: a new connection with the same client id takes the session over.
    let (mut first, _, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    let (_second, code, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    assert_eq!(code, 0);
    assert_eq!(disconnect(first.read_kind(14, T).await), Some(0x8e), "session taken over");
    // 0x95: a packet over mqtt.max_packet_size.
    let (mut c, _, _) = connect5(&p, "d1-big", "d1", &token, &[]).await;
    c.send(&v5::publish_packet("acme/devices/d1/events/x", &vec![b' '; 2000], 1, 1, false, &[])).await;
    assert_eq!(disconnect(c.read_kind(14, T).await), Some(0x95), "packet too large");
    // 0x8D: keep-alive expired (1 s keep-alive, silent client).
    let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
    c.send(&v5::connect_packet("d1-ka", "d1", &token, 1, true, &[], None)).await;
    assert_eq!(c.read(T).await.map(|f| f.kind), Some(2));
    assert_eq!(disconnect(c.read_kind(14, T).await), Some(0x8d), "keep-alive timeout");
    // 0x87: the device is revoked.
    let (mut c, _, _) = connect5(&p, "d1-rev", "d1", &token, &[]).await;
    let (ok, _, err) = cli(dir.path(), &["device", "revoke", "d1", "--tenant", "acme"]);
    assert!(ok, "{err}");
    assert_eq!(disconnect(c.read_kind(14, T).await), Some(0x87), "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_topic_aliases_from_the_client_are_resolved_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    c.send(&v5::publish_packet("acme/devices/d1/events/aliased", b"{\"n\":1}", 1, 1, false, &prop_u16(0x23, 1))).await;
    c.send(&v5::publish_packet("", b"{\"n\":2}", 1, 2, false, &prop_u16(0x23, 1))).await;
    assert_eq!(c.read_kind(4, T).await.map(|f| f.pkid()), Some(1));
    assert_eq!(c.read_kind(4, T).await.map(|f| f.pkid()), Some(2));
    let types: Vec<String> = rows(dir.path()).into_iter().map(|e| e.event_type).collect();
    assert_eq!(types, ["aliased", "aliased"]);
    // 0x94 for an alias over the Topic Alias Maximum (32).
    c.send(&v5::publish_packet("acme/devices/d1/events/x", b"{}", 1, 3, false, &prop_u16(0x23, 33))).await;
    assert_eq!(c.read_kind(14, T).await.map(|f| f.body[0]), Some(0x94));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_3_6_an_empty_client_id_is_assigned_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (_c, code, props) = connect5(&p, "", "d1", &token, &[]).await;
    assert_eq!(code, 0);
    let assigned = v5::prop_string(&props, 0x12).expect("Assigned Client Identifier");
    assert!(assigned.starts_with("d1-") && assigned.len() > 3, "{assigned}");
    let (_c, code) = Raw::connect(p.mqtt.unwrap(), "", "d1", &token, 30, None).await;
    assert_eq!(code, 0, "3.1.1: an empty client id with a clean session");
    let (_c, code, _) = Raw::connect_session(p.mqtt.unwrap(), "", "d1", &token, 30, None, false).await;
    assert_eq!(code, 2, "[MQTT-3.1.3-8]: not with a persistent session");
}

/// Posts `n` events of `device` over HTTP (delivered like QoS 1 publishes).
async fn post_events(p: &Proc, token: &str, device: &str, n: usize) {
    for i in 0..n {
        let url = format!("{}/api/v1/realtime/acme/event", p.base());
        let body = serde_json::json!({"device_id": device, "event_type": "t", "payload": {"i": i}});
        assert!(
            reqwest::Client::new().post(url).bearer_auth(token).json(&body).send().await.unwrap().status().is_success()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_receive_maximum_bounds_unacknowledged_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &prop_u16(0x21, 2)).await;
    c.send(&v5::subscribe_packet(1, &[("acme/events/#", 1)], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    post_events(&p, &token, "d1", 4).await;
    let a = c.read_kind(3, T).await.expect("first delivery");
    let b = c.read_kind(3, T).await.expect("second delivery");
    assert!(c.read(Duration::from_millis(500)).await.is_none(), "a third waits for an ack");
    for f in [a, b] {
        let pkid = u16::from_be_bytes([f.body[2 + usize::from(f.body[1])], f.body[3 + usize::from(f.body[1])]]);
        c.send(&v5::ack_packet(0x40, pkid)).await;
    }
    assert!(c.read_kind(3, T).await.is_some() && c.read_kind(3, T).await.is_some(), "the rest after the acks");
}

/// Payload of a 5.0 PUBLISH frame.
fn payload5(f: &common::mqtt_raw::Frame) -> Value {
    let tl = usize::from(u16::from_be_bytes([f.body[0], f.body[1]]));
    let mut at = 2 + tl + if (f.flags >> 1) & 3 > 0 { 2 } else { 0 };
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = f.body[at];
        at += 1;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    serde_json::from_slice(&f.body[at + len..]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_subscription_options_no_local_retain_as_published_and_retain_handling() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let t1 = add(dir.path(), "acme", "d1");
    let t2 = add(dir.path(), "acme", "d2");
    // A retained message exists before the subscriptions.
    let (mut d2, _, _) = connect5(&p, "d2", "d2", &t2, &[]).await;
    d2.send(&v5::publish_packet("acme/devices/d2/events/r", b"{\"r\":\"old\"}", 1, 1, true, &[])).await;
    d2.read_kind(4, T).await.expect("PUBACK");
    // No Local (bit 2) and Retain Handling 2 (never): neither its own
    // publish nor the retained message reaches d1.
    let (mut c, _, _) = connect5(&p, "d1", "d1", &t1, &[]).await;
    c.send(&v5::subscribe_packet(1, &[("acme/events/#", 1 | 0b100 | (2 << 4))], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    c.send(&v5::publish_packet("acme/devices/d1/events/own", b"{\"own\":1}", 1, 2, false, &[])).await;
    c.read_kind(4, T).await.expect("PUBACK");
    d2.send(&v5::publish_packet("acme/devices/d2/events/r", b"{\"r\":\"live\"}", 1, 2, true, &[])).await;
    let f = c.read_kind(3, T).await.expect("d2's live publish");
    assert_eq!(payload5(&f), serde_json::json!({"r": "live"}), "not its own, not the old retained one");
    assert_eq!(f.flags & 1, 0, "without Retain As Published, live deliveries have RETAIN 0");
    // Retain As Published (bit 3), Retain Handling 0: the retained message at
    // subscribe, then live ones with the publisher's RETAIN.
    let (mut c, _, _) = connect5(&p, "d1-rap", "d1", &t1, &[]).await;
    c.send(&v5::subscribe_packet(1, &[("acme/events/d2/#", 1 | 0b1000)], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    let f = c.read_kind(3, T).await.expect("the retained message");
    assert_eq!((payload5(&f), f.flags & 1), (serde_json::json!({"r": "live"}), 1));
    d2.send(&v5::publish_packet("acme/devices/d2/events/r", b"{\"r\":\"rap\"}", 1, 3, true, &[])).await;
    let f = c.read_kind(3, T).await.expect("live delivery");
    assert_eq!((payload5(&f), f.flags & 1), (serde_json::json!({"r": "rap"}), 1), "RETAIN as published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_2_speaks_311_and_5_over_tcp_and_websocket_at_every_qos() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv-paho2/bin/python");
    assert!(python.exists(), "paho-mqtt 2.x venv missing: `make test-deps` installs it");
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let pub_token = add(dir.path(), "acme", "pump-1");
    let sub_token = add(dir.path(), "acme", "panel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho2.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python)
            .arg(script)
            .args(["127.0.0.1", &p.mqtt.unwrap().port().to_string(), &p.addr.port().to_string(), "acme"])
            .args(["pump-1", &pub_token, "panel", &sub_token])
            .output(),
    )
    .await
    .expect("paho script hung")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12, "2 versions × 2 transports × 3 QoS");
    for l in &lines {
        let qos: u64 = l["case"].as_str().unwrap().rsplit("qos").next().unwrap().parse().unwrap();
        assert_eq!(l["acked"], true, "{l}");
        assert_eq!(l["received_qos"], qos, "delivered at the publish QoS (subscriber at 2): {l}");
    }
    let stored: Vec<String> = rows(dir.path()).into_iter().map(|e| e.payload.get().to_string()).collect();
    for l in &lines {
        let want: Value = serde_json::from_str(l["payload"].as_str().unwrap()).unwrap();
        assert!(stored.iter().any(|s| serde_json::from_str::<Value>(s).unwrap() == want), "{l} not in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_publishes_at_qos2_and_receives_its_subscription() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let mqtt = p.mqtt.unwrap();
    let mut opts = MqttOptions::new("d1", mqtt.ip().to_string(), mqtt.port());
    opts.set_credentials("d1", token);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client.subscribe("acme/events/d1/#", QoS::ExactlyOnce).await.unwrap();
    let mut published = false;
    let mut received = None;
    let deadline = tokio::time::Instant::now() + T;
    while received.is_none() || !published {
        let ev = tokio::time::timeout_at(deadline, el.poll()).await.expect("timed out").expect("eventloop");
        match ev {
            Event::Incoming(Packet::SubAck(_)) => {
                client.publish("acme/devices/d1/events/v5", QoS::ExactlyOnce, false, "{\"v\":5}").await.unwrap();
            }
            Event::Incoming(Packet::PubComp(_)) => published = true,
            Event::Incoming(Packet::Publish(pb)) => received = Some((pb.qos, pb.payload.clone())),
            _ => {}
        }
    }
    assert_eq!(received, Some((QoS::ExactlyOnce, bytes::Bytes::from_static(b"{\"v\":5}"))));
    assert_eq!(rows(dir.path()).len(), 1);
}

/// Packet id of a PUBLISH frame (QoS > 0).
fn publish_pkid(f: &common::mqtt_raw::Frame) -> u16 {
    let tl = usize::from(u16::from_be_bytes([f.body[0], f.body[1]]));
    u16::from_be_bytes([f.body[2 + tl], f.body[3 + tl]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_6_0_a_subscriber_may_complete_qos1_and_qos2_deliveries_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let t1 = add(dir.path(), "acme", "d1");
    let t2 = add(dir.path(), "acme", "d2");
    let (mut sub, _) = Raw::connect(p.mqtt.unwrap(), "d2", "d2", &t2, 30, None).await;
    sub.send(&frame(0x82, &[&[0, 1, 0, 13][..], b"acme/events/#", &[2]].concat())).await;
    assert_eq!(sub.read_kind(9, T).await.map(|f| f.body[2]), Some(2), "granted QoS 2");
    let (mut publisher, _) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &t1, 30, None).await;
    publisher.publish("acme/devices/d1/events/a", b"{\"n\":1}", 1, 1, false, false).await;
    publisher.publish("acme/devices/d1/events/b", b"{\"n\":2}", 2, 2, false, false).await;
    let first = sub.read_kind(3, T).await.expect("QoS 1 delivery");
    let second = sub.read_kind(3, T).await.expect("QoS 2 delivery");
    assert_eq!(((first.flags >> 1) & 3, (second.flags >> 1) & 3), (1, 2));
    // PUBREC of the second before PUBACK of the first.
    sub.send(&v5::ack_packet(0x50, publish_pkid(&second))).await;
    sub.send(&v5::ack_packet(0x40, publish_pkid(&first))).await;
    let rel = sub.read_kind(6, T).await.expect("PUBREL");
    assert_eq!(rel.pkid(), publish_pkid(&second));
    sub.send(&v5::ack_packet(0x70, rel.pkid())).await;
    // The session is intact: the next delivery arrives.
    publisher.publish("acme/devices/d1/events/c", b"{\"n\":3}", 1, 3, false, false).await;
    let third = sub.read_kind(3, T).await.expect("delivery after out-of-order acks");
    assert!(third.body.windows(7).any(|w| w == b"{\"n\":3}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_content_type_and_user_properties_are_kept_with_the_event_and_delivered() {
    let pg = common::pg::Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let p = Proc::start(dir.path(), &[("OUTPOST_CENTRAL__URL", url.as_str()), ("OUTPOST_CENTRAL__TLS", "disable")]);
    let t1 = add(dir.path(), "acme", "d1");
    let t2 = add(dir.path(), "acme", "d2");
    let (mut sub5, _, _) = connect5(&p, "d2", "d2", &t2, &[]).await;
    sub5.send(&v5::subscribe_packet(1, &[("acme/events/d1/#", 1)], &[])).await;
    sub5.read_kind(9, T).await.expect("SUBACK");
    let (mut sub3, _) = Raw::connect(p.mqtt.unwrap(), "d2-old", "d2", &t2, 30, None).await;
    sub3.subscribe(1, &["acme/events/d1/#"]).await;
    sub3.read_kind(9, T).await.expect("SUBACK");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &t1, &[]).await;
    let props =
        [prop_str(0x03, "application/vnd.acme+json"), user_prop("fw", "1.2.3"), user_prop("fw", "again")].concat();
    c.send(&v5::publish_packet("acme/devices/d1/events/reading", b"{\"t\":21.5}", 1, 1, false, &props)).await;
    c.read_kind(4, T).await.expect("PUBACK");
    let want = serde_json::json!({"content_type": "application/vnd.acme+json", "user_properties": [["fw", "1.2.3"], ["fw", "again"]]});
    // Site log and query API.
    let stored = rows(dir.path());
    let kept: Value = serde_json::from_str(stored[0].properties.as_ref().expect("properties kept").get()).unwrap();
    assert_eq!(kept, want);
    let url = format!("{}/api/v1/realtime/acme/events", p.base());
    let listed: Value = reqwest::Client::new().get(url).bearer_auth(&t1).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["events"][0]["properties"], want, "{listed}");
    // A 5.0 subscriber gets them in order; a 3.1.1 one gets the payload only.
    let f = sub5.read_kind(3, T).await.expect("5.0 delivery");
    let tl = usize::from(u16::from_be_bytes([f.body[0], f.body[1]]));
    let got = v5::props(&f.body, 2 + tl + 2);
    assert_eq!(v5::prop_string(&got, 0x03).as_deref(), Some("application/vnd.acme+json"));
    let users: Vec<&Vec<u8>> = got.iter().filter(|(i, _)| *i == 0x26).map(|(_, v)| v).collect();
    assert_eq!(users.len(), 2, "both user properties, and no internal mark: {got:?}");
    let f = sub3.read_kind(3, T).await.expect("3.1.1 delivery");
    assert!(f.body.ends_with(b"{\"t\":21.5}"));
    // The central table.
    let client = pg.client().await;
    assert!(
        eventually(T, || async {
            client
                .query_opt("SELECT 1 FROM tenant_acme.events WHERE properties IS NOT NULL", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await,
        "forwarded with its properties"
    );
    let central: Value = client
        .query_one("SELECT properties::text FROM tenant_acme.events", &[])
        .await
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .unwrap();
    assert_eq!(central, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_more_unreleased_qos2_publishes_than_receive_maximum_is_disconnect_0x93() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_MQTT__MAX_INFLIGHT", "4")]);
    let token = add(dir.path(), "acme", "d1");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    for pkid in 1..=4 {
        c.send(&v5::publish_packet("acme/devices/d1/events/x", b"{}", 2, pkid, false, &[])).await;
        assert_eq!(c.read_kind(5, T).await.map(|f| f.pkid()), Some(pkid), "PUBREC");
    }
    // Releasing one makes room for one more.
    c.send(&v5::ack_packet(0x62, 1)).await;
    assert_eq!(c.read_kind(7, T).await.map(|f| f.pkid()), Some(1), "PUBCOMP");
    c.send(&v5::publish_packet("acme/devices/d1/events/x", b"{}", 2, 5, false, &[])).await;
    assert_eq!(c.read_kind(5, T).await.map(|f| f.pkid()), Some(5));
    c.send(&v5::publish_packet("acme/devices/d1/events/x", b"{}", 2, 6, false, &[])).await;
    assert_eq!(c.read_kind(14, T).await.map(|f| f.body[0]), Some(0x93), "Receive Maximum exceeded");
    assert_eq!(rows(dir.path()).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_expiry_keeps_resumes_and_ends_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let connect = |clean: bool, expiry: Option<u32>| {
        let props = expiry.map(|e| prop_u32(0x11, e)).unwrap_or_default();
        let (p, token) = (&p, token.clone());
        async move {
            let (c, ack) = Raw::connect_v5(p.mqtt.unwrap(), "d1", "d1", &token, 30, clean, &props).await;
            assert_eq!(ack.body[1], 0);
            (c, ack.body[0] & 1 == 1)
        }
    };
    // A session with an expiry outlives its connection; resuming it (clean
    // start 0, even with expiry 0 this time) finds it with its subscription.
    let (mut c, present) = connect(true, Some(600)).await;
    assert!(!present);
    c.send(&v5::subscribe_packet(1, &[("acme/events/#", 1)], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    c.send(&[0xe0, 0]).await;
    assert!(c.closed(T).await);
    let (mut c, present) = connect(false, None).await;
    assert!(present, "session present after a reconnect within its expiry");
    post_events(&p, &token, "d1", 1).await;
    assert!(c.read_kind(3, T).await.is_some(), "the subscription came back with the session");
    // DISCONNECT with expiry 0 ends it at once.
    c.send(&[0xe0, 5, 0, 3, 0x11, 0, 0]).await;
    assert!(c.closed(T).await);
    assert!(
        eventually(T, || async {
            let (mut c, present) = connect(false, None).await;
            c.send(&[0xe0, 0]).await;
            !present
        })
        .await,
        "no session after DISCONNECT with Session Expiry 0"
    );
    // A session that had no expiry cannot get one at DISCONNECT.
    let (mut c, _) = connect(true, None).await;
    c.send(&[0xe0, 7, 0, 5, 0x11, 0, 0, 0, 9]).await;
    assert_eq!(c.read_kind(14, T).await.map(|f| f.body[0]), Some(0x82), "protocol error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reconnecting_too_fast_is_refused_with_connection_rate_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_MQTT__MAX_CONNECTS_PER_MINUTE", "3")]);
    let token = add(dir.path(), "acme", "d1");
    let other = add(dir.path(), "acme", "d2");
    for _ in 0..3 {
        let (_c, code, _) = connect5(&p, "d1", "d1", &token, &[]).await;
        assert_eq!(code, 0);
    }
    let (_c, code, props) = connect5(&p, "d1", "d1", &token, &[]).await;
    assert_eq!(code, 0x9f, "connection rate exceeded");
    assert!(v5::prop_string(&props, 0x1f).is_some_and(|r| r.contains("max_connects_per_minute")));
    let (_c, code) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &token, 30, None).await;
    assert_eq!(code, 3, "3.1.1: server unavailable");
    let (_c, code, _) = connect5(&p, "d2", "d2", &other, &[]).await;
    assert_eq!(code, 0, "other devices are not affected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_server_keep_alive_holds_clients_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_MQTT__MAX_KEEP_ALIVE", "60s")]);
    let token = add(dir.path(), "acme", "d1");
    for (asked, told) in [(0u16, Some(60u16)), (120, Some(60)), (30, None)] {
        let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
        c.send(&v5::connect_packet("d1", "d1", &token, asked, true, &[], None)).await;
        let ack = c.read(T).await.expect("CONNACK");
        let server_ka = v5::props(&ack.body, 2)
            .into_iter()
            .find(|(i, _)| *i == 0x13)
            .map(|(_, v)| u16::from_be_bytes([v[0], v[1]]));
        assert_eq!(server_ka, told, "keep-alive {asked}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_will_waits_its_delay_and_is_not_sent_when_the_client_returns() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let wills = || rows(dir.path()).into_iter().filter(|e| e.event_type == "gone").count();
    let will = Some(("acme/devices/d1/events/gone", &b"{\"gone\":true}"[..], &prop_u32(0x18, 1)[..]));
    let connect = [prop_u32(0x11, 30)].concat();
    // Dropped, back within the delay: no will.
    let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
    c.send(&v5::connect_packet("d1", "d1", &token, 30, true, &connect, will)).await;
    assert_eq!(c.read(T).await.map(|f| f.body[1]), Some(0));
    drop(c);
    let (_back, present) = {
        let (c, ack) = Raw::connect_v5(p.mqtt.unwrap(), "d1", "d1", &token, 30, false, &connect).await;
        (c, ack.body[0] & 1 == 1)
    };
    assert!(present);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(wills(), 0, "the client came back within its will delay");
    // Dropped for good: the will comes after its delay.
    let mut c = Raw::connect_tcp(p.mqtt.unwrap()).await;
    c.send(&v5::connect_packet("d1-x", "d1", &token, 30, true, &connect, will)).await;
    assert_eq!(c.read(T).await.map(|f| f.body[1]), Some(0));
    let dropped = std::time::Instant::now();
    drop(c);
    assert!(eventually(T, || async { wills() == 1 }).await, "the will after its delay");
    assert!(dropped.elapsed() >= Duration::from_millis(900), "not before the delay");
}

/// Topic, topic alias and payload of a 5.0 PUBLISH frame.
fn publish5(f: &common::mqtt_raw::Frame) -> (String, Option<u16>, Value) {
    let tl = usize::from(u16::from_be_bytes([f.body[0], f.body[1]]));
    let topic = String::from_utf8_lossy(&f.body[2..2 + tl]).into_owned();
    let at = 2 + tl + if (f.flags >> 1) & 3 > 0 { 2 } else { 0 };
    let alias =
        v5::props(&f.body, at).into_iter().find(|(i, _)| *i == 0x23).map(|(_, v)| u16::from_be_bytes([v[0], v[1]]));
    (topic, alias, payload5(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_deliveries_use_topic_aliases_up_to_the_clients_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &prop_u16(0x22, 1)).await;
    c.send(&v5::subscribe_packet(1, &[("acme/events/#", 0)], &[])).await;
    c.read_kind(9, T).await.expect("SUBACK");
    let (mut d, _, _) = connect5(&p, "d1-pub", "d1", &token, &[]).await;
    for (i, t) in ["a", "a", "b"].iter().enumerate() {
        let payload = format!("{{\"i\":{i}}}");
        d.send(&v5::publish_packet(
            &format!("acme/devices/d1/events/{t}"),
            payload.as_bytes(),
            1,
            i as u16 + 1,
            false,
            &[],
        ))
        .await;
        d.read_kind(4, T).await.expect("PUBACK");
    }
    let got: Vec<_> = [c.read_kind(3, T).await, c.read_kind(3, T).await, c.read_kind(3, T).await]
        .into_iter()
        .map(|f| publish5(&f.expect("delivery")))
        .collect();
    assert_eq!(got[0], ("acme/events/d1/a".into(), Some(1), serde_json::json!({"i": 0})), "the first sets the alias");
    assert_eq!(got[1], (String::new(), Some(1), serde_json::json!({"i": 1})), "then the alias alone");
    assert_eq!(got[2], ("acme/events/d1/b".into(), None, serde_json::json!({"i": 2})), "no more aliases than allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_retain_handling_0_resends_retained_messages_on_every_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let token = add(dir.path(), "acme", "d1");
    let (mut c, _, _) = connect5(&p, "d1", "d1", &token, &[]).await;
    c.send(&v5::publish_packet("acme/devices/d1/events/state", b"{\"s\":1}", 1, 1, true, &[])).await;
    c.read_kind(4, T).await.expect("PUBACK");
    for (pkid, rh) in [(2u16, 0u8), (3, 0), (4, 1)] {
        c.send(&v5::subscribe_packet(pkid, &[("acme/events/#", 1 | (rh << 4))], &[])).await;
        assert_eq!(c.read_kind(9, T).await.map(|f| f.pkid()), Some(pkid), "SUBACK, not the router's UNSUBACK");
        if rh == 0 {
            let f = c.read_kind(3, T).await.expect("the retained message, again");
            assert_eq!((f.flags & 1, payload5(&f)), (1, serde_json::json!({"s": 1})));
            let pkid = u16::from_be_bytes([f.body[2 + usize::from(f.body[1])], f.body[3 + usize::from(f.body[1])]]);
            c.send(&v5::ack_packet(0x40, pkid)).await;
        }
    }
    assert!(
        c.read(Duration::from_millis(500)).await.is_none(),
        "Retain Handling 1 on an existing subscription: nothing"
    );
}

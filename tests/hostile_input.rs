//! Hostile input against the real binary: what the central `jsonb` column
//! would refuse is refused at ingest on every protocol, naming the JSON path,
//! and writes nothing (an ack means the event will reach central).

mod common;

use std::time::Duration;

use common::mqtt_raw::Raw;
use common::{Proc, cli, log_rows};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

/// Payloads central refuses, as raw JSON text, and the path each names.
const REFUSED: [(&str, &str); 3] = [
    (r#"{"a":"x\u0000y"}"#, "payload.a"),
    (r#"{"a":{"b":["ok","\ud800"]}}"#, "payload.a.b[1]"),
    (r#"{"n":1e400000}"#, "payload.n"),
];

fn event(payload: &str) -> String {
    format!(r#"{{"device_id":"d1","event_type":"t","payload":{payload}}}"#)
}

async fn post(p: &Proc, token: &str, path: &str, body: String, ndjson: bool) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/realtime/acme/{path}", p.base()))
        .bearer_auth(token)
        .header("content-type", if ndjson { "application/x-ndjson" } else { "application/json" })
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_central_jsonb_refuses_are_refused_on_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/v1/realtime/acme/stream?access_token={token}", p.addr))
            .await
            .unwrap();
    for (payload, path) in REFUSED {
        // HTTP, one event.
        let (status, body) = post(&p, &token, "event", event(payload), false).await;
        assert_eq!((status, body["field"].as_str()), (400, Some(path)), "HTTP {payload}: {body}");
        // HTTP batch (array) and NDJSON: the item is named by index.
        let ok_one = event(r#"{"fine":true}"#);
        let (status, body) = post(&p, &token, "events", format!("[{ok_one},{}]", event(payload)), false).await;
        assert_eq!((status, body["field"].as_str(), body["index"].as_u64()), (400, Some(path), Some(1)), "{body}");
        let (status, body) = post(&p, &token, "events", format!("{ok_one}\n{}\n", event(payload)), true).await;
        assert_eq!((status, body["field"].as_str(), body["index"].as_u64()), (400, Some(path), Some(1)), "{body}");
        // WebSocket event frame: an error frame naming the path.
        let frame = format!(r#"{{"type":"event","event":{}}}"#, event(payload));
        ws.send(Message::Text(frame.into())).await.unwrap();
        let reply = loop {
            let Message::Text(t) = tokio::time::timeout(T, ws.next()).await.unwrap().unwrap().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "error" || v["type"] == "ack" {
                break v;
            }
        };
        assert_eq!((reply["type"].as_str(), reply["field"].as_str()), (Some("error"), Some(path)), "WS {reply}");
        // MQTT: not acked, the connection is closed (3.1.1 has no negative ack).
        let (mut c, code) = Raw::connect(p.mqtt.unwrap(), "d1", "d1", &token, 30, None).await;
        assert_eq!(code, 0);
        c.publish("acme/devices/d1/events/t", payload.as_bytes(), 1, 1, false, false).await;
        assert!(c.read_kind(4, Duration::from_secs(2)).await.is_none(), "MQTT acked {payload}");
        assert!(c.closed(T).await);
    }
    // Nothing of it was written.
    let rows = log_rows(&dir.path().join("site-log.sqlite"));
    assert!(rows.is_empty(), "{} rows written: {:?}", rows.len(), rows.first().map(|r| r.payload.get()));
    // A payload that only looks alike is accepted.
    let (status, body) = post(&p, &token, "event", event(r#"{"a":"\\u0000 as text","n":1e300}"#), false).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_text_bodies_get_415_and_every_4xx_has_the_json_body() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let client = reqwest::Client::new();
    for (path, ct) in [
        ("event", "application/xml"),
        ("event", "application/x-www-form-urlencoded"),
        ("events", "text/plain; charset=utf-8"),
        ("events", "multipart/form-data; boundary=x"),
    ] {
        let r = client
            .post(format!("{}/api/v1/realtime/acme/{path}", p.base()))
            .bearer_auth(&token)
            .header("content-type", ct)
            .body(event(r#"{"a":1}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{path} as {ct}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["error"].as_str(), body["field"].as_str()),
            (Some("unsupported_media_type"), Some("content-type"))
        );
    }
    // text/plain on the single-event route points to the route that takes a
    // device's payload as it is (issue #31).
    let r = client
        .post(format!("{}/api/v1/realtime/acme/event", p.base()))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(event(r#"{"a":1}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("/api/v1/realtime/acme/devices/<device_id>/events/<event_type>"),
        "{body}"
    );
    assert!(log_rows(&dir.path().join("site-log.sqlite")).is_empty());
    // axum's own rejections (a plain GET on the WebSocket endpoint, a bad
    // query string) carry the same body as ours.
    for url in [
        format!("{}/api/v1/realtime/acme/stream?access_token={token}", p.base()),
        format!("{}/api/v1/realtime/acme/events?limit=%zz", p.base()),
    ] {
        let r = client.get(&url).bearer_auth(&token).send().await.unwrap();
        let status = r.status();
        assert!(status.is_client_error(), "{url}: {status}");
        let body: Value = r.json().await.unwrap_or_else(|e| panic!("{url}: {status} without a JSON body: {e}"));
        assert!(body["error"].is_string() && body["message"].is_string(), "{url}: {body}");
    }
}

/// Reads one unmasked server WebSocket frame: (opcode, payload).
async fn ws_frame(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut h)).await.ok()?.ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            usize::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            usize::try_from(u64::from_be_bytes(b)).ok()?
        }
        n => usize::from(n),
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((h[0] & 0x0f, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_websocket_message_is_refused_from_its_header_with_1009() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[]);
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok, "{err}");
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let req = format!(
        "GET /api/v1/realtime/acme/stream?access_token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token.trim()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    // A masked text frame announcing 16 MiB, then only 1 KiB of it: the
    // refusal must come from the header, without waiting for the rest.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(16u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[b' ' ^ 1; 1024]);
    s.write_all(&frame).await.unwrap();
    let mut got = Vec::new();
    while let Some((op, body)) = ws_frame(&mut s).await {
        got.push((op, body.clone()));
        if op == 8 {
            break;
        }
    }
    let text = got.iter().find(|(op, _)| *op == 1).map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap());
    let text = text.expect("an error frame before the close");
    assert_eq!(text["code"], "too_large", "{text}");
    assert!(text["message"].as_str().unwrap().contains("bytes"), "{text}");
    let close = got.iter().find(|(op, _)| *op == 8).expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1009);
}

/// Raises this process's open-file limit to its hard limit (the appliance
/// under test inherits it): the slowloris test holds thousands of sockets.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_half_sent_requests_neither_block_real_ones_nor_stay_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &[("OUTPOST_HTTP__HEADER_TIMEOUT", "3s"), ("OUTPOST_HTTP__BODY_TIMEOUT", "1s")]);
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    // 3,000 requests that never finish their headers.
    let mut half = Vec::with_capacity(3000);
    for _ in 0..3000 {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"POST /api/v1/realtime/acme/event HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        half.push(s);
    }
    let started = std::time::Instant::now();
    let (status, body) = post(&p, &token, "event", event("{\"real\":1}"), false).await;
    assert_eq!(status, 201, "{body}");
    let waited = started.elapsed();
    eprintln!("with 3,000 half-sent requests open, a real request got its 201 in {waited:?}");
    assert!(waited < Duration::from_secs(1), "a real request waited {waited:?}");
    // Every half-sent request is closed: made room for others, or timed out.
    let deadline = tokio::time::Instant::now() + T;
    for s in &mut half {
        let mut b = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a half-sent request is still open after the header timeout"),
            }
        }
    }
    // A body that stops halfway gets 408 with the JSON error body.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/realtime/acme/event HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"device_id\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"body_timeout\""), "{resp}");
    assert_eq!(log_rows(&dir.path().join("site-log.sqlite")).len(), 1, "only the real request was stored");
}

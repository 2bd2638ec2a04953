//! Live streaming: local subscribers see their site's events at once (even
//! with the central database down); other sites' events arrive through the
//! central PostgreSQL (NOTIFY + LISTEN) at WS, SSE, long-poll and MQTT
//! subscribers; filters, resume without gap or duplicate, tenant isolation,
//! catch-up after the LISTEN backend is killed, slow subscribers cut off.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::mqtt_raw::Raw;
use common::pg::Pg;
use common::{TestApp, eventually};
use futures_util::{SinkExt, StreamExt};
use outpost::config::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(15);

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn central(c: &mut Config, url: &str, site: &str) {
    common::central(c, url);
    c.site.id = Some(site.to_string());
}

async fn ws(app: &TestApp, tenant: &str, query: &str, token: &str) -> Ws {
    let url = format!(
        "ws://{}/api/v1/realtime/{tenant}/stream?access_token={token}&{query}",
        app.base.trim_start_matches("http://")
    );
    tokio_tungstenite::connect_async(url).await.expect("ws connect").0
}

/// A WebSocket whose socket has a small receive buffer, so a client that
/// stops reading backs the server up quickly (as a stuck dashboard would).
async fn ws_small_buffer(app: &TestApp, tenant: &str, token: &str) -> Ws {
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/api/v1/realtime/{tenant}/stream?access_token={token}");
    tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await.expect("ws connect").0
}

/// Next JSON text frame, skipping pings; `None` on close or timeout.
async fn next_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return None,
        }
    }
}

/// Next event frame (skipping presence frames).
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws, T).await.expect("no frame");
        if v["type"] == "event" {
            return v;
        }
    }
}

async fn post(app: &TestApp, tenant: &str, token: &str, device: &str, event_type: &str, k: i64) -> Value {
    let r = app
        .post(
            &format!("/api/v1/realtime/{tenant}/event"),
            Some(token),
            &json!({"device_id": device, "event_type": event_type, "payload": {"k": k}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

/// The sites' LISTEN connections open at central.
async fn listen_connections(pg: &Pg) -> i64 {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outpost-listen'";
    pg.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Reads SSE `data:` lines of `event` events until `n` arrived.
async fn sse_events(resp: &mut reqwest::Response, n: usize) -> Vec<(i64, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(T, resp.chunk()).await.expect("sse timeout").unwrap().expect("sse ended");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut data, mut kind) = (None, None, "message");
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = if v.trim() == "event" { "event" } else { "other" };
                }
            }
            if kind == "event"
                && let (Some(id), Some(d)) = (id, data)
            {
                out.push((id, serde_json::from_str(&d).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_subscribers_see_events_at_once_even_with_postgres_down() {
    let pg = Pg::init(); // never started
    let app = TestApp::start_with(|c| central(c, &pg.url(), "site-a")).await;
    let t = app.device("acme", "d1").await;
    let mut w = ws(&app, "acme", "", &t).await;
    let mut sse = app.client.get(app.url("/api/v1/realtime/acme/sse")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["cache-control"], "no-cache");
    assert_eq!(sse.headers()["x-accel-buffering"], "no");
    assert!(sse.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let posted = post(&app, "acme", &t, "d1", "temp.read", 1).await;
    let f = next_event(&mut w).await;
    assert_eq!(f["seq"], posted["seq"]);
    assert_eq!(f["event"]["id"], posted["id"]);
    assert_eq!(f["event"]["payload"], json!({"k": 1}));
    assert_eq!(f["event"]["origin_site"], "site-a");
    let got = sse_events(&mut sse, 1).await;
    assert_eq!(got[0].0, posted["seq"].as_i64().unwrap());
    // Long-poll returns at once when events exist after the cursor…
    let p = app.get("/api/v1/realtime/acme/poll?after=0&timeout=5", Some(&t)).await;
    assert_eq!(p.body["events"][0]["event"]["id"], posted["id"]);
    assert_eq!(p.body["next"], posted["seq"]);
    // …and waits for the next one otherwise.
    let next = posted["seq"].as_i64().unwrap();
    let (client, url, tok) =
        (app.client.clone(), app.url(&format!("/api/v1/realtime/acme/poll?after={next}&timeout=20")), t.clone());
    let waiting =
        tokio::spawn(
            async move { client.get(url).bearer_auth(tok).send().await.unwrap().json::<Value>().await.unwrap() },
        );
    let posted2 = post(&app, "acme", &t, "d1", "temp.read", 2).await;
    let p = tokio::time::timeout(T, waiting).await.unwrap().unwrap();
    assert_eq!(p.body_events()[0]["event"]["id"], posted2["id"]);
    // An empty long-poll at its timeout.
    let after = posted2["seq"].as_i64().unwrap();
    let p = app.get(&format!("/api/v1/realtime/acme/poll?after={after}&timeout=1"), Some(&t)).await;
    assert_eq!(p.body["events"], json!([]));
    // timeout=0 still returns what the log already holds after the cursor.
    for _ in 0..20 {
        let p = app.get("/api/v1/realtime/acme/poll?after=0&timeout=0", Some(&t)).await;
        assert_eq!(p.body.body_events().len(), 2, "{}", p.text);
    }
    app.get("/api/v1/realtime/acme/poll?timeout=61", Some(&t)).await.assert_error(400, "invalid", Some("timeout"));
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_stream_subscribers{kind=\"ws\"} 1"), "{m}");
    assert!(m.contains("outpost_stream_latency_seconds_count"), "{m}");
}

trait BodyEvents {
    fn body_events(&self) -> Vec<Value>;
}
impl BodyEvents for Value {
    fn body_events(&self) -> Vec<Value> {
        self["events"].as_array().cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_wildcards_tenant_isolation_and_auth() {
    let app = TestApp::start().await;
    let a1 = app.device("acme", "d1").await;
    let a2 = app.device("acme", "d2").await;
    let g1 = app.device("globex", "d1").await;
    let mut alarms = ws(&app, "acme", "event_types=alarm.*", &a1).await;
    let mut dev2 = ws(&app, "acme", "device_id=d2", &a1).await;
    let mut globex = ws(&app, "globex", "", &g1).await;
    post(&app, "acme", &a1, "d1", "temp.read", 1).await;
    post(&app, "acme", &a1, "d1", "alarm.high", 2).await;
    post(&app, "acme", &a2, "d2", "temp.read", 3).await;
    post(&app, "globex", &g1, "d1", "alarm.high", 4).await;
    post(&app, "acme", &a1, "d1", "alarm", 5).await; // `alarm.*` needs a second segment
    post(&app, "acme", &a2, "d2", "alarm.low", 6).await;
    let got: Vec<i64> = [next_event(&mut alarms).await, next_event(&mut alarms).await]
        .iter()
        .map(|f| f["event"]["payload"]["k"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![2, 6]);
    let got: Vec<i64> = [next_event(&mut dev2).await, next_event(&mut dev2).await]
        .iter()
        .map(|f| f["event"]["payload"]["k"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![3, 6]);
    let g = next_event(&mut globex).await;
    assert_eq!(g["event"]["payload"]["k"], 4, "globex sees only globex");
    assert!(next_json(&mut globex, Duration::from_millis(300)).await.is_none(), "nothing from acme");
    // Auth: other tenant's token, no token, bad filter.
    let r = app.get("/api/v1/realtime/globex/sse", Some(&a1)).await;
    r.assert_error(403, "wrong_tenant", None);
    app.get("/api/v1/realtime/acme/sse", None).await.assert_error(401, "missing_token", None);
    app.get("/api/v1/realtime/acme/sse?event_types=al*rm", Some(&a1)).await.assert_error(
        400,
        "invalid",
        Some("event_types"),
    );
    let wo = app.register("acme", "wo", &["write_events"]).await;
    app.get("/api/v1/realtime/acme/poll?timeout=0", Some(&wo)).await.assert_error(403, "missing_permission", None);
    let p = app.get("/api/v1/realtime/acme/presence", Some(&a1)).await;
    assert_eq!(p.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_cursor_has_no_gap_and_no_duplicate() {
    let app = TestApp::start_with(|c| c.limits.per_second = 1000).await;
    let t = app.device("acme", "d1").await;
    let mut w = ws(&app, "acme", "after=0", &t).await;
    for k in 0..5 {
        post(&app, "acme", &t, "d1", "x", k).await;
    }
    let mut last = 0;
    for k in 0..3 {
        let f = next_event(&mut w).await;
        assert_eq!(f["event"]["payload"]["k"], k);
        last = f["seq"].as_i64().unwrap();
    }
    drop(w);
    // Events keep coming while disconnected; ingest runs concurrently with the resume.
    let app2 = &app;
    let query = format!("after={last}");
    let (_, mut w) = tokio::join!(
        async {
            for k in 5..40 {
                post(app2, "acme", &t, "d1", "x", k).await;
            }
        },
        ws(&app, "acme", &query, &t)
    );
    let mut ks = Vec::new();
    while ks.len() < 37 {
        ks.push(next_event(&mut w).await["event"]["payload"]["k"].as_i64().unwrap());
    }
    assert_eq!(ks, (3..40).collect::<Vec<_>>());
    assert!(next_json(&mut w, Duration::from_millis(300)).await.is_none(), "no duplicate after the seam");
    // SSE resumes from Last-Event-ID the same way.
    let mut sse = app
        .client
        .get(app.url("/api/v1/realtime/acme/sse"))
        .bearer_auth(&t)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let got = sse_events(&mut sse, 37).await;
    let seqs: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(got[0].1["event"]["payload"]["k"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_ingest_acks_after_commit_and_bad_frames_get_error_frames() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let mut w = ws(&app, "acme", "", &t).await;
    let ev = json!({"type": "event", "event": {"device_id": "d1", "event_type": "ws.in", "payload": {"v": 1}}});
    w.send(Message::Text(ev.to_string().into())).await.unwrap();
    // The event frame comes back (we are subscribed) and the ack, in either
    // order: both are awaited, so the event frame cannot turn up later in
    // place of a frame the steps below wait for.
    let (mut ack, mut echoed) = (None, false);
    while ack.is_none() || !echoed {
        let f = next_json(&mut w, T).await.expect("the ack and the event frame");
        match f["type"].as_str() {
            Some("ack") if ack.is_none() => ack = Some(f),
            Some("event") if !echoed => echoed = true,
            _ => panic!("unexpected frame {f}"),
        }
    }
    let ack = ack.expect("ack frame");
    let rows = app.log_rows();
    assert_eq!(rows.len(), 1, "acked means stored");
    assert_eq!(rows[0].id.to_string(), ack["id"].as_str().unwrap());
    for (frame, code) in [
        ("not json".to_string(), "bad_frame"),
        (json!({"type": "teleport"}).to_string(), "bad_frame"),
        (
            json!({"type": "event", "event": {"device_id": "d1", "event_type": "bad type", "payload": {}}}).to_string(),
            "invalid",
        ),
        (
            json!({"type": "event", "event": {"device_id": "d2", "event_type": "x", "payload": {}}}).to_string(),
            "other_device",
        ),
        (json!({"type": "subscribe", "event_types": ["a*b"]}).to_string(), "invalid"),
    ] {
        w.send(Message::Text(frame.clone().into())).await.unwrap();
        let f = loop {
            let f = next_json(&mut w, T).await.expect("error frame");
            if f["type"] == "error" {
                break f;
            }
        };
        assert_eq!(f["code"], code, "{frame}: {f}");
    }
    w.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let f = next_json(&mut w, T).await;
    assert_eq!(f.as_ref().map(|f| f["code"].clone()), Some(json!("bad_frame")), "{f:?}");
    // Still alive.
    w.send(Message::Text(json!({"type": "ping"}).to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut w, T).await.unwrap()["type"], "pong");
    // A read-only token cannot ingest over the socket.
    let ro = app.register("acme", "ro", &["read_events"]).await;
    let mut r = ws(&app, "acme", "", &ro).await;
    let ev = json!({"type": "event", "event": {"device_id": "ro", "event_type": "x", "payload": {}}});
    r.send(Message::Text(ev.to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut r, T).await.unwrap()["code"], "missing_permission");
    assert_eq!(app.log_rows().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_is_cut_off_while_ingest_runs_at_full_speed() {
    let app = TestApp::start_with(|c| {
        // Larger than one commit burst (100), far smaller than the 4000 sent.
        c.stream.queue = 256;
        c.limits.per_second = 1_000_000;
        c.limits.per_minute = 10_000_000;
        c.limits.per_hour = 100_000_000;
    })
    .await;
    let t = app.device("acme", "d1").await;
    let mut stalled = ws_small_buffer(&app, "acme", &t).await;
    let mut healthy = ws(&app, "acme", "", &t).await;
    // The stalled one reads nothing while 40 batches of 100 (32 MB) are ingested.
    let items: Vec<Value> = (0..100)
        .map(|k| json!({"device_id": "d1", "event_type": "bulk", "payload": {"k": k, "pad": "p".repeat(8000)}}))
        .collect();
    for _ in 0..40 {
        let r = app.post("/api/v1/realtime/acme/events", Some(&t), &json!(items)).await;
        assert_eq!(r.status, 201);
        // The healthy subscriber keeps up.
        for _ in 0..100 {
            next_event(&mut healthy).await;
        }
    }
    assert_eq!(app.log_rows().len(), 4000);
    // Now the stalled one reads: some events, then a lagged error with its cursor.
    let mut last_event_seq = 0;
    let mut count = 0;
    let err = loop {
        let f = next_json(&mut stalled, T).await;
        let Some(f) = f else {
            panic!("stalled subscriber must get an error frame, then close; got {count} events, last {last_event_seq}")
        };
        count += 1;
        match f["type"].as_str() {
            Some("event") => last_event_seq = f["seq"].as_i64().unwrap(),
            Some("error") => break f,
            _ => {}
        }
    };
    assert_eq!(err["code"], "lagged");
    assert_eq!(err["last_seq"].as_i64().unwrap(), last_event_seq);
    assert!(next_json(&mut stalled, Duration::from_secs(2)).await.is_none(), "closed after the error");
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_stream_lagged_disconnects_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_site_a_reach_site_b_subscribers_through_postgres() {
    let pg = Pg::start();
    let a = TestApp::start_with(|c| central(c, &pg.url(), "site-a")).await;
    let b = TestApp::start_with(|c| central(c, &pg.url(), "site-b")).await;
    let ta = a.device("acme", "pump-a").await;
    let tb = b.device("acme", "dash-b").await;
    b.device("globex", "other").await;
    // B's LISTEN picks up tenant acme (its devices' tenants) within its poll.
    let mut w = ws(&b, "acme", "", &tb).await;
    let mut sse = b.client.get(b.url("/api/v1/realtime/acme/sse")).bearer_auth(&tb).send().await.unwrap();
    let (mut mq, _) = Raw::connect(b.mqtt, "dash-b", "dash-b", &tb, 60, None).await;
    mq.subscribe(1, &["acme/events/#"]).await;
    mq.read_kind(9, T).await.unwrap();
    let start = b.get("/api/v1/status", None).await;
    let _ = start;
    assert!(eventually(T, || async { b.get("/metrics", None).await.text.contains("outpost_listen_up 1") }).await);
    let posted = post(&a, "acme", &ta, "pump-a", "flow.rate", 7).await;
    let f = next_event(&mut w).await;
    assert_eq!(f["event"]["id"], posted["id"]);
    assert_eq!(f["event"]["origin_site"], "site-a");
    let got = sse_events(&mut sse, 1).await;
    assert_eq!(got[0].1["event"]["id"], posted["id"]);
    let p = b
        .get(&format!("/api/v1/realtime/acme/poll?after={}&timeout=5", f["seq"].as_i64().unwrap() - 1), Some(&tb))
        .await;
    assert_eq!(p.body["events"][0]["event"]["id"], posted["id"]);
    let pubm = mq.read_kind(3, T).await.expect("MQTT subscriber at B gets A's event");
    let topic_len = usize::from(u16::from_be_bytes([pubm.body[0], pubm.body[1]]));
    assert_eq!(&pubm.body[2..2 + topic_len], b"acme/events/pump-a/flow.rate");
    // Stored at B as remote (already forwarded: never sent back up), once.
    let rows = b.log_rows();
    let remote: Vec<_> = rows.iter().filter(|r| r.origin_site == "site-a").collect();
    assert_eq!(remote.len(), 1);
    assert!(remote[0].forwarded_at.is_some());
    // A's own subscribers are not fed A's events twice through central.
    let mut wa = ws(&a, "acme", "after=0", &ta).await;
    next_event(&mut wa).await;
    assert!(next_json(&mut wa, Duration::from_millis(800)).await.is_none());

    // Kill B's LISTEN backend while events flow: catch-up completes the set.
    let c = pg.client().await;
    let flow = async {
        let mut ids = vec![posted["id"].as_str().unwrap().to_string()];
        for k in 0..60 {
            ids.push(post(&a, "acme", &ta, "pump-a", "flow.rate", 100 + k).await["id"].as_str().unwrap().to_string());
            if k == 10 {
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'outpost-listen'",
                    &[],
                )
                .await
                .unwrap();
            }
        }
        ids
    };
    let ids = flow.await;
    let complete = eventually(Duration::from_secs(30), || async {
        let have: HashSet<String> =
            b.log_rows().iter().filter(|r| r.origin_site == "site-a").map(|r| r.id.to_string()).collect();
        ids.iter().all(|id| have.contains(id))
    })
    .await;
    assert!(complete, "B is missing A's events after the LISTEN backend was killed");
    let remote: Vec<_> = b.log_rows().into_iter().filter(|r| r.origin_site == "site-a").collect();
    assert_eq!(remote.len(), ids.len(), "no duplicates at B");
    // Every event reaches B's WS subscriber exactly once, in order.
    let mut seen = vec![f["event"]["id"].as_str().unwrap().to_string()];
    while seen.len() < ids.len() {
        seen.push(next_event(&mut w).await["event"]["id"].as_str().unwrap().to_string());
    }
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    assert_eq!(sorted_seen, sorted_ids);
    // The listener reports up again once its catch-up returned, which may
    // be just after the rows it stored became visible.
    assert!(eventually(T, || async { b.metric("outpost_listen_up").await == 1 }).await, "LISTEN not back up");
    assert!(b.get("/metrics", None).await.text.contains("outpost_remote_events_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_clients_curl_sse_and_python_websockets() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // curl -N on the SSE stream.
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "10", "-H", &format!("Authorization: Bearer {t}")])
        .arg(format!("http://{addr}/api/v1/realtime/acme/sse"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // python websockets: subscribe, then print the first event frame.
    let py = r#"
import asyncio, json, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        print("ready", flush=True)
        while True:
            f = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if f["type"] == "event":
                print(json.dumps(f), flush=True)
                return
asyncio.run(main())
"#;
    let mut python = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", py, &format!("ws://{addr}/api/v1/realtime/acme/stream?access_token={t}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both subscribers are attached, then post.
    assert!(
        eventually(T, || async {
            let m = app.get("/metrics", None).await.text;
            m.contains("outpost_stream_subscribers{kind=\"sse\"} 1")
                && m.contains("outpost_stream_subscribers{kind=\"ws\"} 1")
        })
        .await
    );
    let posted = post(&app, "acme", &t, "d1", "outside", 1).await;
    let out = tokio::time::timeout(T, async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(python.stdout.take().unwrap()).lines();
        let mut got = None;
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with('{') {
                got = Some(l);
                break;
            }
        }
        got
    })
    .await
    .unwrap()
    .expect("python websockets got no event");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["event"]["id"], posted["id"]);
    let sse = tokio::time::timeout(T, async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(curl.stdout.take().unwrap()).lines();
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with("data:") && l.contains(posted["id"].as_str().unwrap()) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(sse, "curl -N saw no event");
    let _ = curl.kill().await;
    let _ = python.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_events_stay_within_their_share_and_never_block_local_ingest() {
    let pg = Pg::start();
    let share = 128 * 1024;
    let a = TestApp::start_with(|c| {
        central(c, &pg.url(), "site-a");
        c.log.max_bytes = 1 << 20;
        c.log.remote_max_bytes = Some(share);
    })
    .await;
    let b = TestApp::start_with(|c| central(c, &pg.url(), "site-b")).await;
    let ta = a.device("acme", "local-1").await;
    let tb = b.device("acme", "busy").await;
    assert!(eventually(T, || async { a.get("/metrics", None).await.text.contains("outpost_listen_up 1") }).await);
    // Someone at A watches acme, so A reads other sites' acme events.
    let _watching = ws(&a, "acme", "", &ta).await;
    // Site B sends 2 MiB of acme events: twice site A's whole budget.
    let filler = "x".repeat(1000);
    for batch in 0..20 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"device_id": "busy", "event_type": "bulk", "payload": {"i": batch * 100 + i, "f": filler}}))
            .collect();
        let r = b.post("/api/v1/realtime/acme/events", Some(&tb), &json!(items)).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let evicted = || async {
        let m = a.get("/metrics", None).await.text;
        m.lines()
            .find(|l| l.starts_with("outpost_remote_evicted_total "))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
    };
    assert!(
        eventually(Duration::from_secs(30), || async { evicted().await.is_some_and(|n| n >= 1000.0) }).await,
        "site A evicts the oldest remote events: central has {:?} rows; A: {}; B: {}",
        pg.client().await.query_one("SELECT count(*) FROM tenant_acme.events", &[]).await.map(|r| r.get::<_, i64>(0)),
        a.get("/metrics", None)
            .await
            .text
            .lines()
            .filter(|l| l.starts_with("outpost_remote") || l.starts_with("outpost_listen"))
            .collect::<Vec<_>>()
            .join(" | "),
        b.get("/metrics", None)
            .await
            .text
            .lines()
            .filter(|l| l.starts_with("outpost_backlog") || l.starts_with("outpost_forward"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    // Site A's own devices are never refused for it, and their events stay.
    for k in 0..50 {
        let r = post(&a, "acme", &ta, "local-1", "own", k).await;
        assert!(r["id"].is_string(), "{r}");
    }
    let rows = a.log_rows();
    let remote: usize = rows
        .iter()
        .filter(|r| r.origin_site == "site-b")
        .map(|r| outpost::event::row_bytes(&r.tenant, &r.device_id, &r.event_type, r.payload.get()))
        .sum();
    assert!(remote as u64 <= share, "remote events take {remote} bytes, over the {share}-byte share");
    assert_eq!(rows.iter().filter(|r| r.origin_site == "site-a").count(), 50, "no local event evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_reads_other_sites_events_only_for_tenants_someone_there_watches() {
    let pg = Pg::start();
    let a = TestApp::start_with(|c| central(c, &pg.url(), "site-a")).await;
    let b = TestApp::start_with(|c| central(c, &pg.url(), "site-b")).await;
    let (a_acme, a_globex) = (a.device("acme", "a1").await, a.device("globex", "g1").await);
    let (b_acme, b_globex) = (b.device("acme", "b1").await, b.device("globex", "gb").await);
    for s in [&a, &b] {
        assert!(eventually(T, || async { s.metric("outpost_listen_up").await == 1 }).await);
    }
    assert_eq!(b.metric("outpost_remote_fetches_total").await, 0, "nobody at B subscribes: no fetch at all");
    assert_eq!(listen_connections(&pg).await, 0, "and no LISTEN connection from either site");

    // B watches globex only. A sends acme events, then a globex one: once
    // B has the globex one, B would have had the acme ones had it listened
    // (notifications arrive in commit order).
    let mut globex_at_b = ws(&b, "globex", "", &b_globex).await;
    assert!(
        eventually(T, || async { listen_connections(&pg).await == 1 }).await,
        "B listens once someone there subscribes"
    );
    let mut early = Vec::new();
    for k in 0..5 {
        early.push(post(&a, "acme", &a_acme, "a1", "reading", k).await["id"].as_str().unwrap().to_string());
    }
    assert!(eventually(T, || async { a.pending() == 0 }).await);
    post(&a, "globex", &a_globex, "g1", "reading", 0).await;
    assert_eq!(next_event(&mut globex_at_b).await["event"]["device_id"], "g1");
    // The counters move just after the store hands the event to subscribers.
    // B's LISTEN connection shows in pg_stat_activity before its LISTEN and
    // catch-up ran, so the globex event may come by either way: a
    // notification (remote_events) or the catch-up (remote_catchup_rows).
    let read = || async {
        b.metric("outpost_remote_events_total").await + b.metric("outpost_remote_catchup_rows_total").await
    };
    assert!(eventually(T, || async { read().await >= 1 }).await);
    assert_eq!(read().await, 1, "only the globex event was read");
    let fetches = b.metric("outpost_remote_fetches_total").await;
    assert!((1..=3).contains(&fetches), "globex's catch-up and notification only: {fetches}");
    assert!(b.log_rows().iter().all(|r| r.tenant != "acme"), "nothing of acme at B");

    // Someone at B subscribes to acme: B catches up on what A sent before
    // (no gap), then follows live.
    let mut acme_at_b = ws(&b, "acme", "", &b_acme).await;
    let mut late = Vec::new();
    for k in 5..10 {
        late.push(post(&a, "acme", &a_acme, "a1", "reading", k).await["id"].as_str().unwrap().to_string());
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let e = next_event(&mut acme_at_b).await;
        seen.push(e["event"]["id"].as_str().unwrap().to_string());
    }
    let mut want: Vec<String> = early.into_iter().chain(late).collect();
    want.sort();
    seen.sort();
    assert_eq!(seen, want, "every acme event of A reaches B's new subscriber once");
    assert_eq!(b.log_rows().iter().filter(|r| r.tenant == "acme" && r.origin_site == "site-a").count(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tenant_does_not_wake_a_listening_site_on_every_commit() {
    // Every commit that notifies wakes each backend listening in the
    // database. A site that fetches once per round leaves the channel of a
    // tenant that announced something before its round was due, and the
    // round fetches up to what central's `sites` table says, so a busy
    // fleet costs each listening site about one notification per round,
    // not one per batch any site commits, and nothing is missed.
    let pg = Pg::start();
    let a = TestApp::start_with(|c| {
        central(c, &pg.url(), "site-a");
        c.central.batch_wait = Duration::ZERO;
        c.central.max_batch_wait = Duration::ZERO;
    })
    .await;
    let b = TestApp::start_with(|c| central(c, &pg.url(), "site-b")).await;
    let devices = ["p0", "p1", "p2", "p3"];
    let mut tokens = Vec::new();
    for d in devices {
        tokens.push(a.device("acme", d).await);
    }
    let tb = b.device("acme", "dash-b").await;
    let mut w = ws(&b, "acme", "", &tb).await;
    assert!(eventually(T, || async { b.metric("outpost_listen_up").await == 1 }).await);
    assert!(eventually(T, || async { listen_connections(&pg).await == 1 }).await);
    // B's catch-up of the new tenant ran before it listens for rounds.
    let first = post(&a, "acme", &tokens[0], "p0", "warmup", 0).await;
    assert_eq!(next_event(&mut w).await["event"]["id"], first["id"]);

    let (batches0, notes0) =
        (a.metric("outpost_forward_batches_total").await, b.metric("outpost_remote_notifications_total").await);
    // One central commit per event, as fast as A forwards: each event is
    // posted once the one before is in central (looked at without a pause,
    // so the commits come far faster than B's rounds).
    const PER_DEVICE: i64 = 30;
    let c = pg.client().await;
    let started = std::time::Instant::now();
    let mut n = 1;
    for k in 0..PER_DEVICE {
        for (d, t) in devices.iter().zip(&tokens) {
            post(&a, "acme", t, d, "reading", k).await;
            n += 1;
            let deadline = std::time::Instant::now() + T;
            while c.query_one("SELECT count(*) FROM tenant_acme.events", &[]).await.unwrap().get::<_, i64>(0) < n {
                assert!(std::time::Instant::now() < deadline, "A did not forward {d}'s event {k}");
            }
        }
    }
    let took = started.elapsed();
    let mut next_k: HashMap<String, i64> = devices.iter().map(|d| (d.to_string(), 0)).collect();
    for _ in 0..devices.len() as i64 * PER_DEVICE {
        let e = next_event(&mut w).await;
        let device = e["event"]["device_id"].as_str().unwrap().to_string();
        let k = e["event"]["payload"]["k"].as_i64().unwrap();
        assert_eq!(k, next_k[&device], "{device}'s events reach B in order, each once");
        *next_k.get_mut(&device).unwrap() += 1;
    }
    assert!(eventually(T, || async { a.pending() == 0 }).await);
    let batches = a.metric("outpost_forward_batches_total").await - batches0;
    let notes = b.metric("outpost_remote_notifications_total").await - notes0;
    assert!(batches >= 100, "A committed only {batches} batches: not a busy tenant");
    // B fetches at most once per 50 ms (20 rounds a second): at 60 commits
    // a second or more, a listener woken by every commit would get three
    // notifications or more for each round it needs.
    let rate = batches as f64 / took.as_secs_f64();
    assert!(rate >= 60.0, "A committed {rate:.0} batches/s: not busy enough to tell");
    assert!(
        notes * 3 <= batches,
        "B received {notes} notifications for A's {batches} commits: it listens through its rounds"
    );
    assert!(next_json(&mut w, Duration::from_millis(500)).await.is_none(), "nothing twice");

    // Quiet again: once its rounds find nothing B listens to acme again,
    // so the next event comes by notification, not by B reading every 50 ms.
    assert!(
        eventually(T, || async { b.metric("outpost_remote_muted_tenants").await == 0 }).await,
        "B still reads acme by rounds after A went quiet"
    );
    let later = post(&a, "acme", &tokens[0], "p0", "later", 0).await;
    assert_eq!(next_event(&mut w).await["event"]["id"], later["id"]);
    let after = b.metric("outpost_remote_notifications_total").await - notes0;
    assert!(after > notes, "B is listening to acme again: {after} notifications, {notes} before the last event");
}

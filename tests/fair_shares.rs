//! Fair shares and honest edges (issue #27), black-box: no device or tenant
//! takes what belongs to all (stream subscribers, MQTT connections, the
//! status page's feed), a plain request to a WebSocket route is told so
//! (426), every constrained parameter is refused as documented, an
//! over-long request line gets the JSON error body, a malformed MQTT
//! remaining length closes at once, and a central that stops answering
//! mid-batch shows as stalled, never up.

mod common;

use std::time::{Duration, Instant};

use common::mqtt_raw::{Raw, v5};
use common::pg::Pg;
use common::proxy::{Mode, Proxy};
use common::{TestApp, eventually};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// Opens an SSE stream of `tenant` with `token`; the response (200 while open).
async fn sse(app: &TestApp, tenant: &str, token: &str) -> reqwest::Response {
    app.client.get(app.url(&format!("/api/v1/realtime/{tenant}/sse"))).bearer_auth(token).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_holding_its_shares_leaves_other_tenants_their_streams_and_connections() {
    let app = TestApp::start_with(|c| {
        c.stream.max_subscribers = 20;
        c.stream.max_subscribers_per_device = 4;
        c.stream.max_status_subscribers = 2;
        c.mqtt.max_connections_per_device = 3;
        c.mqtt.max_connects_per_minute = 0;
    })
    .await;
    let (a, b) = (app.device("acme", "a1").await, app.device("globex", "b1").await);
    // acme's device takes its share of stream slots; one more is refused
    // naming the share.
    let mut held = Vec::new();
    for _ in 0..4 {
        let r = sse(&app, "acme", &a).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let over = sse(&app, "acme", &a).await;
    assert_eq!(over.status(), 429, "one stream over the device's share");
    let r = common::Resp::from(over).await;
    r.assert_error(429, "too_many_subscribers", Some("stream.max_subscribers_per_device"));
    assert!(r.header("retry-after").is_some());
    // globex's device still streams (SSE and long-poll), and the status
    // page's feed has a pool of its own.
    assert_eq!(sse(&app, "globex", &b).await.status(), 200);
    let poll = app.get("/api/v1/realtime/globex/poll?timeout=0", Some(&b)).await;
    assert_eq!(poll.status, 200, "{}", poll.text);
    let feed = app.client.get(app.url("/api/v1/status/events")).send().await.unwrap();
    assert_eq!(feed.status(), 200);
    // MQTT: acme's device holds its share of connections; globex's gets in.
    let mut conns = Vec::new();
    for i in 0..3 {
        let (c, code) = Raw::connect(app.mqtt, &format!("a1-{i}"), "a1", &a, 30, None).await;
        assert_eq!(code, 0);
        conns.push(c);
    }
    let (_, ack) = Raw::connect_v5(app.mqtt, "a1-x", "a1", &a, 30, true, &[]).await;
    assert_eq!(ack.body[1], 0x97, "over the device's share: quota exceeded");
    let reason = v5::prop_string(&v5::props(&ack.body, 2), 0x1f).unwrap_or_default();
    assert!(reason.contains("mqtt.max_connections_per_device = 3"), "{reason}");
    let (_, code) = Raw::connect(app.mqtt, "b1", "b1", &b, 30, None).await;
    assert_eq!(code, 0, "another tenant's device connects");
    // A take-over of a connected client id is not one more.
    let (_taken_over_by, code) = Raw::connect(app.mqtt, "a1-0", "a1", &a, 30, None).await;
    assert_eq!(code, 0);
    // The use per tenant, in the status and /metrics.
    let status = app.get("/api/v1/status", None).await;
    let acme = status.body["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == "acme").cloned().unwrap();
    assert_eq!((acme["stream_subscribers"].as_u64(), acme["mqtt_connections"].as_u64()), (Some(4), Some(3)), "{acme}");
    assert_eq!(app.metric_labelled("outpost_tenant_stream_subscribers", "tenant=\"acme\"").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holding_its_share_of_persistent_sessions_gets_no_more() {
    let app = TestApp::start_with(|c| {
        c.mqtt.max_sessions_per_tenant = 2;
        c.mqtt.max_connects_per_minute = 0;
    })
    .await;
    let expiry = v5::prop_u32(0x11, 3600);
    let t1 = app.device("acme", "a1").await;
    let t2 = app.device("acme", "a2").await;
    for (d, t) in [("a1", &t1), ("a2", &t2)] {
        let (mut c, ack) = Raw::connect_v5(app.mqtt, d, d, t, 30, false, &expiry).await;
        assert_eq!(ack.body[1], 0, "{d}");
        c.disconnect().await;
    }
    // Both sessions are held while their devices are away: a third
    // device's persistent session would be one more (5.0 and 3.1.1).
    let t3 = app.device("acme", "a3").await;
    let (_, ack) = Raw::connect_v5(app.mqtt, "a3", "a3", &t3, 30, false, &expiry).await;
    assert_eq!(ack.body[1], 0x97, "over the tenant's share: quota exceeded");
    let reason = v5::prop_string(&v5::props(&ack.body, 2), 0x1f).unwrap_or_default();
    assert!(reason.contains("mqtt.max_sessions_per_tenant = 2"), "{reason}");
    let (_, code, _) = Raw::connect_session(app.mqtt, "a3", "a3", &t3, 30, None, false).await;
    assert_eq!(code, 3, "3.1.1: server unavailable");
    // A clean session is not held; a held session resumes; another
    // tenant has its own share.
    let (_, code) = Raw::connect(app.mqtt, "a3", "a3", &t3, 30, None).await;
    assert_eq!(code, 0);
    let (_, ack) = Raw::connect_v5(app.mqtt, "a1", "a1", &t1, 30, false, &expiry).await;
    assert_eq!((ack.body[1], ack.body[0] & 1), (0, 1), "resumed: session present");
    let g = app.device("globex", "g1").await;
    let (_, code, _) = Raw::connect_session(app.mqtt, "g1", "g1", &g, 30, None, false).await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_to_a_websocket_route_gets_426_with_upgrade() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    for (path, token) in [("/mqtt", None), ("/api/v1/realtime/acme/stream", Some(t.as_str()))] {
        let r = app.get(path, token).await;
        r.assert_error(426, "upgrade_required", None);
        assert_eq!(r.header("upgrade"), Some("websocket"), "{path}");
    }
    // A bad parameter is named first.
    let r = app.get("/api/v1/realtime/acme/stream?event_types=a..b", Some(&t)).await;
    r.assert_error(400, "invalid", Some("event_types"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_parameters_are_refused_as_the_document_declares() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    for route in ["poll?timeout=0&", "sse?"] {
        for (query, field) in [
            ("device_id=bad%20id", "device_id"),
            ("device_id=", "device_id"),
            ("event_types=a%20b", "event_types"),
            ("event_types=a,,b", "event_types"),
            ("after=-1", "after"),
        ] {
            let r = app.get(&format!("/api/v1/realtime/acme/{route}{query}"), Some(&t)).await;
            r.assert_error(400, "invalid", Some(field));
        }
    }
    let r = app.get("/api/v1/realtime/acme/poll?timeout=0&device_id=d1&event_types=temp.*,x", Some(&t)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_request_line_gets_the_json_error_body() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let patterns = vec!["a.b"; 10_000].join(",");
    let r = app.get(&format!("/api/v1/realtime/acme/poll?timeout=0&event_types={patterns}"), Some(&t)).await;
    r.assert_error(414, "uri_too_long", None);
    // The server is fine afterwards.
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remaining_length_of_five_bytes_closes_the_connection_at_once() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let (mut c, code) = Raw::connect(app.mqtt, "d1", "d1", &t, 30, None).await;
    assert_eq!(code, 0);
    c.send(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    let started = Instant::now();
    assert!(c.closed(Duration::from_secs(3)).await, "still open after 3 s");
    assert!(started.elapsed() < Duration::from_secs(1), "closed after {:?}", started.elapsed());
    // Before the CONNECT too.
    let mut c = Raw::connect_tcp(app.mqtt).await;
    c.send(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    assert!(c.closed(Duration::from_secs(1)).await, "a malformed first packet is not waited on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_that_stops_answering_mid_batch_shows_stalled_at_once() {
    let pg = Pg::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let app = TestApp::start_with(|c| {
        common::central(c, &url);
        c.central.answer_timeout = Duration::from_secs(1);
        // The batch itself is given up only much later.
        c.central.statement_timeout = Duration::from_secs(60);
    })
    .await;
    let t = app.device("acme", "d1").await;
    assert_eq!(app.post_event("acme", &t, "d1", json!({"n": 0})).await.status, 201);
    assert!(eventually(T, || async { app.pending() == 0 }).await, "forwarding works first");
    // A middlebox that keeps the connection and passes no byte (its kernel
    // acks, so TCP cannot see it).
    proxy.set(Mode::Blackhole);
    let sent = Instant::now();
    for n in 1..=20 {
        assert_eq!(app.post_event("acme", &t, "d1", json!({"n": n})).await.status, 201);
    }
    let stalled = eventually(T, || async {
        let s = app.get("/api/v1/status", None).await.body;
        s["uplink"]["state"] == "stalled" && s["uplink"]["batch_waiting_seconds"].as_f64().is_some_and(|w| w >= 1.0)
    })
    .await;
    assert!(stalled, "the status never showed the stall");
    assert!(sent.elapsed() < Duration::from_secs(5), "shown after {:?}", sent.elapsed());
    let s = app.get("/api/v1/status", None).await.body;
    assert!(s["uplink"]["last_error"].as_str().unwrap().contains("no answer from central"), "{s}");
    assert_eq!(app.metric("outpost_uplink_up").await, 0, "never up while nothing moves");
    // The page shows it too.
    let page = app.get("/", None).await.text;
    assert!(page.contains("STALLED"), "the page does not say so");
    assert_eq!(app.pending(), 20, "nothing acked is lost: all 20 wait");
}

//! The status page v2: the new figures of `/api/v1/status`, the optional
//! status token over the page, its JSON, its event feed and `/metrics`, and
//! the page's site-wide feed that never carries a payload.

mod common;

use std::time::Duration;

use common::TestApp;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

/// Reads `event` frames of an SSE response until `n` arrived; returns their
/// data and every byte read.
async fn feed_events(resp: &mut reqwest::Response, n: usize) -> (Vec<Value>, String) {
    let (mut buf, mut all, mut out) = (String::new(), String::new(), Vec::new());
    while out.len() < n {
        let chunk = tokio::time::timeout(T, resp.chunk()).await.expect("feed timeout").unwrap().expect("feed ended");
        let text = std::str::from_utf8(&chunk).unwrap();
        all.push_str(text);
        buf.push_str(text);
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.lines().any(|l| l == "event: event" || l == "event:event") {
                let data = block.lines().find_map(|l| l.strip_prefix("data:")).unwrap().trim();
                out.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    (out, all)
}

#[tokio::test]
async fn status_json_adds_ingest_disk_devices_and_buffering_only() {
    let app = TestApp::start().await;
    let d1 = app.device("acme", "pump-1").await;
    app.device("acme", "pump-2").await;
    for i in 0..3 {
        assert_eq!(app.post_event("acme", &d1, "pump-1", json!({"i": i})).await.status, 201);
    }
    // The rate needs half a second of history: poll until it shows.
    let mut s = Value::Null;
    let deadline = std::time::Instant::now() + T;
    let mut rated = false;
    while !rated && std::time::Instant::now() < deadline {
        s = app.get("/api/v1/status", None).await.body;
        rated = s["ingest"]["http"].as_f64().unwrap_or(0.0) > 0.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rated, "no HTTP ingest rate: {s}");
    // Every field of v1 is still there.
    for key in ["site_id", "version", "uptime_seconds", "log", "uplink", "drain_eta_seconds"] {
        assert!(s.get(key).is_some(), "{key} missing: {s}");
    }
    assert_eq!(s["log"]["total_rows"], 3);
    assert_eq!(s["uplink"]["state"], "disabled");
    assert_eq!(s["buffering_only"], true);
    assert_eq!(s["ingest"]["mqtt"], 0.0);
    assert_eq!(s["ingest"]["ws"], 0.0);
    assert!(s["ingest"]["window_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(s["disk"]["log_max_bytes"], app.config.log.max_bytes);
    assert!(s["disk"]["log_bytes"].as_u64().unwrap() > 0);
    assert!(s["disk"]["data_dir_free_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["disk"]["data_dir_total_bytes"].as_u64().unwrap() >= s["disk"]["data_dir_free_bytes"].as_u64().unwrap());
    assert!(s["disk"]["write_bytes_per_day"].is_number() || s["disk"]["write_bytes_per_day"].is_null());
    // Three events written in the window, on a real disk: bytes per event.
    assert!(s["disk"]["write_bytes_per_event"].as_f64().is_some_and(|b| b > 0.0), "{s}");
    // The wear counters behind it.
    assert_eq!(app.metric("outpost_log_events_written_total").await, 3);
    assert!(app.metric("outpost_log_write_bytes_total").await > 0);
    // Most recently seen first; a device never seen comes last.
    let devices = s["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{s}");
    assert_eq!(devices[0]["device_id"], "pump-1");
    assert!(devices[0]["last_seen"].is_string());
    assert_eq!(devices[1]["device_id"], "pump-2");
    assert!(devices[1]["last_seen"].is_null());
    assert_eq!(devices[1]["online"], false);
    assert!(devices[0].get("token").is_none());

    let page = app.get("/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text.contains("site-a") && page.text.contains("id=\"tail\""), "{}", page.text);
}

#[tokio::test]
async fn status_token_guards_page_json_feed_and_metrics() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("status.token");
    std::fs::write(&file, "s3cret-status-token-0123\n").unwrap();
    let app = TestApp::start_with(|c| c.http.status_token_file = Some(file.clone())).await;
    for path in ["/", "/api/v1/status", "/api/v1/status/events", "/metrics"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        assert!(r.headers().contains_key("www-authenticate"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "missing_token", "{path}: {body}");

        let r = app.client.get(app.url(path)).bearer_auth("wrong-token-wrong-token").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");

        let r = app.client.get(app.url(path)).bearer_auth("s3cret-status-token-0123").send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} with the bearer token");
        let r = app.client.get(app.url(&format!("{path}?token=s3cret-status-token-0123"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} with ?token=");
    }
    // Liveness and readiness stay open for probes.
    assert_eq!(app.get("/healthz", None).await.status, 200);
    assert_eq!(app.get("/readyz", None).await.status, 200);
}

#[test]
fn a_short_or_missing_status_token_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::test_config(dir.path());
    c.http.status_token_file = Some(dir.path().join("absent"));
    let problems = c.validate().unwrap_err().join("\n");
    assert!(problems.contains("http.status_token_file"), "{problems}");
    std::fs::write(dir.path().join("short"), "abc").unwrap();
    c.http.status_token_file = Some(dir.path().join("short"));
    assert!(c.validate().unwrap_err().join("\n").contains("at least 16"));
}

#[tokio::test]
async fn page_feed_shows_device_and_type_but_never_a_payload() {
    let app = TestApp::start().await;
    let a = app.device("acme", "pump-1").await;
    let b = app.device("globex", "meter-9").await;
    let secret = json!({"secret": "do-not-show-0xC0FFEE"});
    assert_eq!(app.post_event("acme", &a, "pump-1", secret.clone()).await.status, 201);

    let mut feed = app.client.get(app.url("/api/v1/status/events")).send().await.unwrap();
    assert_eq!(feed.status(), 200);
    assert!(feed.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    // The recent event first, then a live one of another tenant.
    let (first, raw_first) = feed_events(&mut feed, 1).await;
    assert_eq!(app.post_event("globex", &b, "meter-9", secret).await.status, 201);
    let (live, raw) = feed_events(&mut feed, 1).await;
    let seen = [&first[0], &live[0]];
    assert_eq!((seen[0]["tenant"].as_str(), seen[0]["device_id"].as_str()), (Some("acme"), Some("pump-1")));
    assert_eq!((seen[1]["tenant"].as_str(), seen[1]["device_id"].as_str()), (Some("globex"), Some("meter-9")));
    for e in seen {
        assert_eq!(e["event_type"], "test.reading");
        assert!(e["received_at"].is_string() && e["seq"].is_i64());
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["device_id", "event_type", "received_at", "seq", "tenant"], "{e}");
    }
    let raw = raw_first + &raw;
    assert!(!raw.contains("C0FFEE") && !raw.contains("payload"), "{raw}");
}

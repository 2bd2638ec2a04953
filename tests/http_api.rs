//! HTTP API against the real appliance: happy paths, every auth refusal, every
//! validation error, body and rate limits, the byte budget, duplicates,
//! batches and restarts. Each refusal also checks that nothing was written.

mod common;

use std::time::Duration;

use common::{Resp, TestApp, issuer};
use serde_json::{Value, json};

const EVENT: &str = "/api/v1/realtime/acme/event";
const EVENTS: &str = "/api/v1/realtime/acme/events";

#[tokio::test]
async fn post_event_is_stored_and_queryable_with_filters_and_cursor() {
    let app = TestApp::start().await;
    let t1 = app.device("acme", "pump-1").await;
    let t2 = app.device("acme", "pump-2").await;
    let r = app.post_event("acme", &t1, "pump-1", json!({"c": 1})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["duplicate"], false);
    assert_eq!(r.body["seq"], 1);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    // A device's own timestamp, a day back (within limits.max_event_age).
    let day = time::OffsetDateTime::now_utc().date().previous_day().unwrap();
    let rfc = |d: time::Date| format!("{d}T00:00:00Z");
    let r = app
        .post(
            EVENT,
            Some(&t2),
            &json!({"device_id": "pump-2", "event_type": "alarm.high", "payload": {"c": 2},
                    "timestamp": rfc(day), "id": "0f8fad5b-d9cb-469f-a165-70867728950e"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["id"], "0f8fad5b-d9cb-469f-a165-70867728950e");
    app.post_event("acme", &t1, "pump-1", json!({"c": 3})).await;

    let all = app.get(EVENTS, Some(&t1)).await;
    assert_eq!(all.status, 200);
    let events = all.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["id"], id);
    assert_eq!(events[0]["payload"], json!({"c": 1}));
    assert_eq!(events[0]["origin_site"], "site-a");
    assert_eq!(all.body["next"], 3);

    let by_device = app.get(&format!("{EVENTS}?device_id=pump-2"), Some(&t1)).await;
    assert_eq!(by_device.body["events"].as_array().unwrap().len(), 1);
    assert_eq!(by_device.body["events"][0]["timestamp"], rfc(day));
    let by_type = app.get(&format!("{EVENTS}?event_type=test.reading"), Some(&t1)).await;
    assert_eq!(by_type.body["events"].as_array().unwrap().len(), 2);
    let (from, to) = (rfc(day.previous_day().unwrap()), rfc(day.next_day().unwrap()));
    let by_time = app.get(&format!("{EVENTS}?start_time={from}&end_time={to}"), Some(&t1)).await;
    assert_eq!(by_time.body["events"].as_array().unwrap().len(), 1);

    let page1 = app.get(&format!("{EVENTS}?limit=2"), Some(&t1)).await;
    assert_eq!(page1.body["events"].as_array().unwrap().len(), 2);
    assert_eq!(page1.body["has_more"], true);
    let next = page1.body["next"].as_i64().unwrap();
    let page2 = app.get(&format!("{EVENTS}?limit=2&after={next}"), Some(&t1)).await;
    assert_eq!(page2.body["events"].as_array().unwrap().len(), 1);
    assert_eq!(page2.body["events"][0]["seq"], 3);
    assert_eq!(page2.body["has_more"], false);
}

#[tokio::test]
async fn query_parameters_are_validated_by_name() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d").await;
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=-1", "after"),
        ("start_time=yesterday", "start_time"),
        ("event_type=a%20b", "event_type"),
        ("colour=red", "colour"),
    ] {
        app.get(&format!("{EVENTS}?{q}"), Some(&t)).await.assert_error(400, "invalid", Some(field));
    }
}

#[tokio::test]
async fn batch_accepts_json_array_and_ndjson_in_one_commit() {
    let app = TestApp::start_with(|c| c.limits.per_second = 100).await;
    let t = app.device("acme", "d1").await;
    let batch: Vec<Value> =
        (0..20).map(|i| json!({"device_id": "d1", "event_type": "b", "payload": {"i": i}})).collect();
    let r = app.post(EVENTS, Some(&t), &json!(batch)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["accepted"], 20);
    let results = r.body["results"].as_array().unwrap();
    let seqs: Vec<i64> = results.iter().map(|x| x["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());

    let nd: String =
        (0..5).map(|i| format!("{}\n", json!({"device_id": "d1", "event_type": "n", "payload": {"i": i}}))).collect();
    let r = app
        .client
        .post(app.url(EVENTS))
        .bearer_auth(&t)
        .header("content-type", "application/x-ndjson")
        .body(nd)
        .send()
        .await
        .unwrap();
    let r = Resp::from(r).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["accepted"], 5);
    assert_eq!(app.log_rows().len(), 25);
    // The commit histogram saw one 20-row group: a group in (10, 20].
    let m = app.get("/metrics", None).await.text;
    let bucket = |le: &str| -> u64 {
        let name = format!("outpost_commit_batch_rows_bucket{{le=\"{le}\"}} ");
        m.lines().find_map(|l| l.strip_prefix(&name)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{m}"))
    };
    assert!(bucket("20.0") - bucket("10.0") >= 1, "no group of 11-20 rows:\n{m}");
}

/// Five posts: 40 ms apart, one commit under `log.commit_delay` (or a
/// `log.write_budget` holding groups open); without either, one commit
/// each (each post is sent once the previous one was acked, so a slow
/// fsync cannot put two in one group). Returns the commits and the app.
async fn commits_for_spread_posts(delay: Duration) -> u64 {
    commits_for_spread_posts_with(delay, |_| {}).await.0
}

async fn commits_for_spread_posts_with(
    delay: Duration,
    configure: impl FnOnce(&mut outpost::config::Config),
) -> (u64, TestApp) {
    let app = TestApp::start_with(|c| {
        c.limits.per_second = 100;
        c.log.commit_delay = delay;
        configure(c);
    })
    .await;
    let spread = !delay.is_zero() || app.config.log.write_budget > 0;
    let t = app.device("acme", "d1").await;
    // Group commits so far.
    let before = app.metric("outpost_commit_batch_rows_count").await;
    let post = |i: u64| {
        let (app, t) = (&app, &t);
        async move { app.post(EVENT, Some(t), &json!({"device_id": "d1", "event_type": "x", "payload": {"i": i}})).await }
    };
    if !spread {
        for i in 0..5u64 {
            let r = post(i).await;
            assert_eq!(r.status, 201, "{}", r.text);
        }
    } else {
        let posts = (0..5u64).map(|i| {
            let post = &post;
            async move {
                tokio::time::sleep(Duration::from_millis(40 * i)).await;
                post(i).await
            }
        });
        for r in futures_util::future::join_all(posts).await {
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }
    assert_eq!(app.log_rows().len(), 5);
    let commits = app.metric("outpost_commit_batch_rows_count").await - before;
    (commits, app)
}

#[tokio::test]
async fn device_counters_reach_the_table_within_ten_seconds_when_idle() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    assert_eq!(app.post_event("acme", &t, "d1", json!({})).await.status, 201);
    let stored = || async {
        let conn = outpost::log::open(&app.config.log_path(), true).unwrap();
        let devices = outpost::log::schema::devices(&conn, Some("acme")).unwrap();
        devices.iter().any(|d| d.device_id == "d1" && d.event_count == 1 && d.last_seen.is_some())
    };
    assert!(common::eventually(Duration::from_secs(20), stored).await, "event_count not stored while idle");
}

/// A write budget the ingest rate does not allow (1 byte a day) holds every
/// group open for `log.max_commit_delay`, and never longer: the five
/// spread posts share one commit. The budget, the hold and the projected
/// storage life show in `/metrics` and the status.
#[tokio::test]
async fn a_write_budget_holds_groups_open_up_to_max_commit_delay_and_shows() {
    let (commits, app) = commits_for_spread_posts_with(Duration::ZERO, |c| {
        c.log.write_budget = 1;
        c.log.max_commit_delay = Duration::from_secs(1);
        c.disk.endurance_tbw = 30.0;
    })
    .await;
    assert_eq!(commits, 1, "the budget held the group open");
    assert_eq!(app.metric("outpost_log_write_budget_bytes_per_day").await, 1);
    let m = app.get("/metrics", None).await.text;
    assert!(m.lines().any(|l| l == "outpost_log_commit_hold_seconds 1.0"), "{m}");
    let s = app.get("/api/v1/status", None).await.body;
    assert_eq!(s["disk"]["write_budget_bytes_per_day"], 1, "{s}");
    // Five events written on a real disk in the window: a write rate, so a
    // projected life of 30 TB at it.
    let (rate, life) = (s["disk"]["write_bytes_per_day"].as_f64(), s["disk"]["endurance_days"].as_f64());
    if let Some(rate) = rate.filter(|r| *r > 0.0) {
        let want = 30e12 / rate;
        assert!(life.is_some_and(|d| (d - want).abs() / want < 0.5), "{s}");
    }
    // Without a budget: none shown, and no endurance without a rating.
    let plain = TestApp::start().await;
    let s = plain.get("/api/v1/status", None).await.body;
    assert!(s["disk"]["write_budget_bytes_per_day"].is_null() && s["disk"]["endurance_days"].is_null(), "{s}");
}

#[tokio::test]
async fn commit_delay_gathers_spread_requests_into_one_commit() {
    assert_eq!(commits_for_spread_posts(Duration::from_secs(1)).await, 1);
    assert_eq!(commits_for_spread_posts(Duration::ZERO).await, 5);
}

#[tokio::test]
async fn one_invalid_item_rejects_the_whole_batch_naming_its_index() {
    let app = TestApp::start_with(|c| c.limits.per_second = 100).await;
    let t = app.device("acme", "d1").await;
    let mut batch: Vec<Value> =
        (0..5).map(|i| json!({"device_id": "d1", "event_type": "b", "payload": {"i": i}})).collect();
    batch[3]["event_type"] = json!("bad type");
    let r = app.post(EVENTS, Some(&t), &json!(batch)).await;
    r.assert_error(400, "invalid", Some("event_type"));
    assert_eq!(r.body["index"], 3);
    // A type error deep in the JSON is located too.
    batch[3]["event_type"] = json!("b");
    batch[2]["payload"] = json!("text");
    let r = app.post(EVENTS, Some(&t), &json!(batch)).await;
    r.assert_error(400, "invalid", Some("payload"));
    assert_eq!(r.body["index"], 2);
    batch[2] = json!({"device_id": "d1", "event_type": 7, "payload": {}});
    let r = app.post(EVENTS, Some(&t), &json!(batch)).await;
    r.assert_error(400, "invalid_json", Some("event_type"));
    assert_eq!(r.body["index"], 2);
    // An id already owned by another device conflicts: the batch is refused whole.
    let other = app.device("acme", "d2").await;
    let taken = app.post_event("acme", &other, "d2", json!({})).await.body["id"].clone();
    batch[2] = json!({"device_id": "d1", "event_type": "b", "payload": {}, "id": taken});
    let r = app.post(EVENTS, Some(&t), &json!(batch)).await;
    r.assert_error(409, "id_conflict", Some("id"));
    assert_eq!(r.body["index"], 2);
    // Not an array at all.
    app.post(EVENTS, Some(&t), &json!({"device_id": "d1"})).await.assert_error(400, "invalid", Some("events"));
    app.post(EVENTS, Some(&t), &json!([])).await.assert_error(400, "invalid", Some("events"));
    assert_eq!(app.log_rows().len(), 1, "only d2's event is in the log");
}

/// serde's derive reads a struct from an array of its fields in order; the
/// API takes objects only (found by schemathesis: `[null, null]` registered
/// a device).
#[tokio::test]
async fn an_array_of_field_values_is_not_an_object() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let event = json!(["d1", "b", {}]);
    app.post("/api/v1/realtime/acme/event", Some(&t), &event).await.assert_error(400, "invalid_json", None);
    let r = app.post(EVENTS, Some(&t), &json!([{"device_id": "d1", "event_type": "b", "payload": {}}, event])).await;
    r.assert_error(400, "invalid_json", None);
    assert_eq!(r.body["index"], 1);
    let r = app.post("/api/v1/realtime/acme/device/register", Some(&app.admin), &json!([null, null])).await;
    r.assert_error(400, "invalid_json", None);
    assert!(app.log_rows().is_empty());
    let devices = app.get("/api/v1/realtime/acme/devices", Some(&app.admin)).await;
    assert_eq!(devices.body["devices"].as_array().unwrap().len(), 1, "only d1: {}", devices.text);
}

/// A device name is up to 255 characters, not bytes (found by schemathesis).
#[tokio::test]
async fn device_names_are_limited_in_characters() {
    let app = TestApp::start().await;
    let reg = "/api/v1/realtime/acme/device/register";
    let r = app.post(reg, Some(&app.admin), &json!({"device_id": "n1", "name": "é".repeat(255)})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = app.post(reg, Some(&app.admin), &json!({"device_id": "n2", "name": "é".repeat(256)})).await;
    r.assert_error(400, "invalid", Some("name"));
}

#[tokio::test]
async fn oversized_batch_is_refused() {
    let app = TestApp::start_with(|c| {
        c.limits.max_batch = 3;
        c.limits.per_second = 100;
    })
    .await;
    let t = app.device("acme", "d1").await;
    let batch: Vec<Value> = (0..4).map(|_| json!({"device_id": "d1", "event_type": "b", "payload": {}})).collect();
    app.post(EVENTS, Some(&t), &json!(batch)).await.assert_error(413, "batch_too_large", None);
    assert!(app.log_rows().is_empty());
}

#[tokio::test]
async fn repeated_id_returns_the_original_and_writes_nothing() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let body = json!({"device_id": "d1", "event_type": "x", "payload": {"v": 1},
                      "id": "7d444840-9dc0-11d1-b245-5ffdce74fad2"});
    let first = app.post(EVENT, Some(&t), &body).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body["duplicate"], false);
    let again = app.post(EVENT, Some(&t), &body).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["seq"], first.body["seq"]);
    assert_eq!(app.log_rows().len(), 1);
    // The same id inside one batch: the second copy is the duplicate.
    let t2 = app.device("acme", "d2").await;
    let item =
        json!({"device_id": "d2", "event_type": "x", "payload": {}, "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"});
    let r = app.post(EVENTS, Some(&t2), &json!([item, item])).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["accepted"], 1);
    assert_eq!(r.body["duplicates"], 1);
    assert_eq!(app.log_rows().len(), 2);
}

#[tokio::test]
async fn every_auth_refusal_has_its_status_and_code() {
    let app = TestApp::start().await;
    let good = app.device("acme", "d1").await;
    let body = json!({"device_id": "d1", "event_type": "x", "payload": {}});
    let auth = issuer(&app.config);

    // No token / not bearer.
    let r = app.post(EVENT, None, &body).await;
    r.assert_error(401, "missing_token", None);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    // Bad signature: a token signed with another secret.
    let other_dir = tempfile::tempdir().unwrap();
    let forged = issuer(&common::test_config(other_dir.path())).issue_device("acme", "d1", &common::RW, None).unwrap();
    app.post(EVENT, Some(&forged), &body).await.assert_error(401, "invalid_token", None);
    // Tampered payload keeps the old signature.
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    parts[1] = parts[1].chars().rev().collect();
    app.post(EVENT, Some(&parts.join(".")), &body).await.assert_error(401, "invalid_token", None);
    // alg: none.
    use base64_url as b64;
    let none = format!(
        "{}.{}.",
        b64::encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64::encode(r#"{"sub":"d1","tenant":"acme","perms":["write_events"],"exp":9999999999}"#)
    );
    app.post(EVENT, Some(&none), &body).await.assert_error(401, "invalid_token", None);
    // Garbage.
    app.post(EVENT, Some("not.a.jwt"), &body).await.assert_error(401, "invalid_token", None);
    // Expired (beyond the leeway).
    let claims = json!({"sub": "d1", "tenant": "acme", "perms": ["write_events"], "exp": 1_000_000_000, "jti": "x"});
    let secret = std::fs::read_to_string(app.config.secret_path()).unwrap();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    app.post(EVENT, Some(&expired), &body).await.assert_error(401, "token_expired", None);
    // Other tenant: the token is acme's, the path globex's.
    app.post("/api/v1/realtime/globex/event", Some(&good), &body).await.assert_error(403, "wrong_tenant", None);
    // Missing permission.
    let reader = app.register("acme", "ro", &["read_events"]).await;
    let ro_body = json!({"device_id": "ro", "event_type": "x", "payload": {}});
    app.post(EVENT, Some(&reader), &ro_body).await.assert_error(403, "missing_permission", None);
    let writer = app.register("acme", "wo", &["write_events"]).await;
    app.get(EVENTS, Some(&writer)).await.assert_error(403, "missing_permission", None);
    // Another device's id.
    let r = app.post(EVENT, Some(&good), &json!({"device_id": "d2", "event_type": "x", "payload": {}})).await;
    r.assert_error(403, "other_device", Some("device_id"));
    // Unknown device (valid signature, never registered).
    let ghost = auth.issue_device("acme", "ghost", &common::RW, None).unwrap();
    app.post(EVENT, Some(&ghost), &body).await.assert_error(401, "unknown_device", None);
    // Device tokens cannot administer.
    app.get("/api/v1/realtime/acme/devices", Some(&good)).await.assert_error(403, "admin_required", None);
    // Revoked: the same token that worked a moment ago.
    assert_eq!(app.post(EVENT, Some(&good), &body).await.status, 201);
    let r = app.client.delete(app.url("/api/v1/realtime/acme/device/d1")).bearer_auth(&app.admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.post(EVENT, Some(&good), &body).await.assert_error(401, "device_revoked", None);
    // A revoked id cannot be registered again (its old tokens would come back).
    let r = app.post("/api/v1/realtime/acme/device/register", Some(&app.admin), &json!({"device_id": "d1"})).await;
    r.assert_error(409, "device_exists", Some("device_id"));
    assert_eq!(app.log_rows().len(), 1, "only the one accepted event");
}

/// Minimal base64url without padding, for hand-made JWTs.
mod base64_url {
    pub fn encode(s: &str) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn every_validation_error_names_its_field_and_writes_nothing() {
    let app = TestApp::start_with(|c| {
        c.limits.per_second = 1000;
        c.limits.per_minute = 1000;
    })
    .await;
    let long_id = "d".repeat(256);
    let t = app.device("acme", "d1").await;
    let deep = (0..40).fold(json!({}), |acc, _| json!({"a": acc}));
    let big = json!({"x": "y".repeat(70 * 1024)});
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"device_id": long_id, "event_type": "x", "payload": {}}), 403, "other_device", "device_id"),
        (json!({"device_id": "d1", "event_type": "", "payload": {}}), 400, "invalid", "event_type"),
        (json!({"device_id": "d1", "event_type": "e".repeat(101), "payload": {}}), 400, "invalid", "event_type"),
        (json!({"device_id": "d1", "event_type": "a/b", "payload": {}}), 400, "invalid", "event_type"),
        (json!({"device_id": "d1", "event_type": "x", "payload": [1, 2]}), 400, "invalid", "payload"),
        (json!({"device_id": "d1", "event_type": "x", "payload": "s"}), 400, "invalid", "payload"),
        (json!({"device_id": "d1", "event_type": "x", "payload": deep}), 400, "invalid", "payload"),
        (json!({"device_id": "d1", "event_type": "x", "payload": big}), 400, "invalid", "payload"),
        (json!({"device_id": "d1", "event_type": "x", "payload": {}, "id": "123"}), 400, "invalid", "id"),
        (
            json!({"device_id": "d1", "event_type": "x", "payload": {}, "timestamp": "noon"}),
            400,
            "invalid",
            "timestamp",
        ),
        (json!({"device_id": "d1", "event_type": "x"}), 400, "invalid_json", "payload"),
        (json!({"event_type": "x", "payload": {}}), 400, "invalid_json", "device_id"),
        (json!({"device_id": "d1", "event_type": "x", "payload": {}, "colour": 1}), 400, "invalid_json", "colour"),
        (json!({"device_id": 5, "event_type": "x", "payload": {}}), 400, "invalid_json", "device_id"),
    ];
    for (body, status, code, field) in cases {
        let r = app.post(EVENT, Some(&t), &body).await;
        r.assert_error(status, code, Some(field));
    }
    // Not JSON at all.
    let r = app.client.post(app.url(EVENT)).bearer_auth(&t).body("{not json").send().await.unwrap();
    Resp::from(r).await.assert_error(400, "invalid_json", None);
    // The limit is named in the message.
    let r = app.post(EVENT, Some(&t), &json!({"device_id": "d1", "event_type": "x", "payload": big})).await;
    assert!(r.body["message"].as_str().unwrap().contains("65536"), "{}", r.text);
    // A bad tenant in the path.
    app.post("/api/v1/realtime/Acme!/event", Some(&t), &json!({})).await.assert_error(400, "invalid", Some("tenant"));
    assert!(app.log_rows().is_empty());
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("outpost_events_rejected_total{protocol=\"http\",reason=\"invalid\"}"), "{m}");
}

#[tokio::test]
async fn bodies_over_the_cap_get_413_before_being_read() {
    let app = TestApp::start_with(|c| {
        c.http.max_body_bytes = 8 * 1024;
        c.limits.max_payload_bytes = 4 * 1024;
    })
    .await;
    let t = app.device("acme", "d1").await;
    // Declared length over the cap.
    let body = json!({"device_id": "d1", "event_type": "x", "payload": {"x": "y".repeat(10_000)}});
    app.post(EVENT, Some(&t), &body).await.assert_error(413, "body_too_large", None);
    // Chunked (no Content-Length): cut off while streaming, without reading it all.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let head =
        format!("POST {EVENT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n");
    sock.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    let mut sent = 0;
    // Keep sending until the server answers (it must, well before 1 MiB).
    let mut reply = Vec::new();
    for _ in 0..1024 {
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 1024;
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), sock.read(&mut buf)).await {
            reply.extend_from_slice(&buf[..n]);
            if n > 0 {
                break;
            }
        }
    }
    if reply.is_empty() {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap().unwrap();
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("body_too_large"), "{reply}");
    assert!(sent < 1024 * 1024, "server read {sent} bytes before refusing");
    assert!(app.log_rows().is_empty());
}

async fn assert_window_refuses(set: impl FnOnce(&mut outpost::config::Config), window: &str, limit: usize) {
    let app = TestApp::start_with(|c| {
        c.limits.per_second = 1000;
        c.limits.per_minute = 1000;
        c.limits.per_hour = 1000;
        set(c);
    })
    .await;
    let t = app.device("acme", "d1").await;
    for i in 0..limit {
        let r = app.post_event("acme", &t, "d1", json!({"i": i})).await;
        assert_eq!(r.status, 201, "event {i}: {}", r.text);
    }
    let r = app.post_event("acme", &t, "d1", json!({})).await;
    r.assert_error(429, "rate_limited", Some(window));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    assert!(r.body["message"].as_str().unwrap().contains(window), "{}", r.text);
    // Another device is not affected.
    let t2 = app.device("acme", "d2").await;
    assert_eq!(app.post_event("acme", &t2, "d2", json!({})).await.status, 201);
    assert_eq!(app.log_rows().len(), limit + 1);
}

#[tokio::test]
async fn per_second_window_answers_429_with_retry_after() {
    assert_window_refuses(|c| c.limits.per_second = 5, "per_second", 5).await;
}

#[tokio::test]
async fn per_minute_window_answers_429_with_retry_after() {
    assert_window_refuses(|c| c.limits.per_minute = 4, "per_minute", 4).await;
}

#[tokio::test]
async fn per_hour_window_answers_429_with_retry_after() {
    assert_window_refuses(|c| c.limits.per_hour = 3, "per_hour", 3).await;
}

#[tokio::test]
async fn tenant_override_applies_to_its_devices_only() {
    let app = TestApp::start_with(|c| {
        c.limits
            .tenants
            .insert("acme".into(), outpost::config::RateOverride { per_second: Some(2), ..Default::default() });
    })
    .await;
    let a = app.device("acme", "d1").await;
    let g = app.device("globex", "d1").await;
    for _ in 0..2 {
        assert_eq!(app.post_event("acme", &a, "d1", json!({})).await.status, 201);
    }
    app.post_event("acme", &a, "d1", json!({})).await.assert_error(429, "rate_limited", Some("per_second"));
    for _ in 0..5 {
        assert_eq!(app.post_event("globex", &g, "d1", json!({})).await.status, 201);
    }
}

#[tokio::test]
async fn full_log_refuses_with_503_and_loses_nothing_acked() {
    let mut app = TestApp::start_with(|c| {
        c.log.max_bytes = 1024 * 1024;
        c.limits.per_second = 100_000;
        c.limits.per_minute = 100_000;
        c.limits.per_hour = 100_000;
    })
    .await;
    let t = app.device("acme", "d1").await;
    let mut acked = Vec::new();
    let refusal = loop {
        let r = app.post_event("acme", &t, "d1", json!({"pad": "p".repeat(8000)})).await;
        match r.status {
            201 => acked.push(r.body["id"].as_str().unwrap().to_string()),
            _ => break r,
        }
        assert!(acked.len() < 1000, "the budget never bit");
    };
    refusal.assert_error(503, "log_full", None);
    assert!(refusal.header("retry-after").is_some());
    assert!(acked.len() > 50, "{} acked before full", acked.len());
    // Still refused, still nothing dropped, and the rows survive a restart.
    app.post_event("acme", &t, "d1", json!({"pad": "p".repeat(8000)})).await.assert_error(503, "log_full", None);
    let m = app.get("/metrics", None).await.text;
    assert!(m.contains("reason=\"log_full\""), "{m}");
    app.restart().await;
    let ids: Vec<String> = app.log_rows().iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, acked);
}

#[tokio::test]
async fn restart_keeps_every_event_and_device() {
    let mut app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.post_event("acme", &t, "d1", json!({"i": i})).await.body["id"].clone());
    }
    app.restart().await;
    // The same token still works: device registry and secret survived.
    let r = app.post_event("acme", &t, "d1", json!({"i": 5})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["seq"], 6, "seq continues after restart");
    let got = app.get(EVENTS, Some(&t)).await;
    let got_ids: Vec<Value> = got.body["events"].as_array().unwrap().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(&got_ids[..5], &ids[..]);
}

#[tokio::test]
async fn device_admin_endpoints_register_list_and_revoke() {
    let mut app = TestApp::start().await;
    let r = app
        .post(
            "/api/v1/realtime/acme/device/register",
            Some(&app.admin),
            &json!({"device_id": "pump-7", "name": "Pump 7", "ttl": "1h"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["device"]["device_id"], "pump-7");
    let token = r.body["token"].as_str().unwrap().to_string();
    // Generated id when none is given.
    let r = app.post("/api/v1/realtime/acme/device/register", Some(&app.admin), &json!({})).await;
    assert!(r.body["device"]["device_id"].as_str().unwrap().starts_with("dev-"));
    // Bad inputs name their field.
    for (body, field) in [
        (json!({"device_id": "a/b"}), "device_id"),
        (json!({"device_id": "x", "perms": ["fly"]}), "perms"),
        (json!({"device_id": "y", "ttl": "soon"}), "ttl"),
        (json!({"device_id": "z", "colour": 1}), "colour"),
    ] {
        app.post("/api/v1/realtime/acme/device/register", Some(&app.admin), &body).await.assert_error(
            400,
            if field == "colour" { "invalid_json" } else { "invalid" },
            Some(field),
        );
    }
    app.post("/api/v1/realtime/acme/device/register", Some(&app.admin), &json!({"device_id": "pump-7"}))
        .await
        .assert_error(409, "device_exists", Some("device_id"));
    for _ in 0..3 {
        assert_eq!(app.post_event("acme", &token, "pump-7", json!({})).await.status, 201);
    }
    let list = app.get("/api/v1/realtime/acme/devices", Some(&app.admin)).await;
    let devices = list.body["devices"].as_array().unwrap();
    let p7 = devices.iter().find(|d| d["device_id"] == "pump-7").unwrap();
    assert_eq!(p7["event_count"], 3);
    assert!(p7["last_seen"].is_string());
    assert_eq!(p7["name"], "Pump 7");
    // The counters are stored every 10 s, and at a clean stop: another
    // process (the CLI) sees them after this restart.
    app.restart().await;
    let (ok, out, err) = common::cli(app.dir.path(), &["device", "list", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.contains("pump-7")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.split_whitespace().any(|w| w == "3"), "event_count 3 stored: {out}");
    let r =
        app.client.delete(app.url("/api/v1/realtime/acme/device/nobody")).bearer_auth(&app.admin).send().await.unwrap();
    Resp::from(r).await.assert_error(404, "device_not_found", None);
    let r =
        app.client.delete(app.url("/api/v1/realtime/acme/device/pump-7")).bearer_auth(&app.admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let list = app.get("/api/v1/realtime/acme/devices", Some(&app.admin)).await;
    let p7 = list.body["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == "pump-7").unwrap().clone();
    assert!(p7["revoked_at"].is_string());
}

#[tokio::test]
async fn health_readiness_metrics_status_and_page() {
    let app = TestApp::start().await;
    let t = app.device("acme", "d1").await;
    app.post_event("acme", &t, "d1", json!({})).await;
    assert_eq!(app.get("/healthz", None).await.status, 200);
    assert_eq!(app.get("/readyz", None).await.status, 200);
    let m = app.get("/metrics", None).await;
    assert_eq!(m.status, 200);
    for name in [
        "outpost_events_accepted_total{protocol=\"http\"} 1",
        "outpost_commit_duration_seconds_bucket",
        "outpost_backlog_rows 1",
        "outpost_log_bytes",
    ] {
        assert!(m.text.contains(name), "{name} missing:\n{}", m.text);
    }
    let s = app.get("/api/v1/status", None).await;
    assert_eq!(s.body["site_id"], "site-a");
    assert_eq!(s.body["log"]["backlog_rows"], 1);
    assert_eq!(s.body["log"]["devices"], 1);
    let page = app.get("/", None).await;
    assert_eq!(page.status, 200);
    // No central database in this test: the page says so instead of a bare backlog.
    assert!(page.text.contains("site-a") && page.text.contains("buffering only: no central database set"));
    app.get("/nope", None).await.assert_error(404, "not_found", None);
}

#[tokio::test]
async fn concurrent_posts_are_group_committed_and_all_acked() {
    let app = TestApp::start_with(|c| c.limits.per_second = 10_000).await;
    let mut tokens = Vec::new();
    for i in 0..16 {
        tokens.push((format!("d{i}"), app.device("acme", &format!("d{i}")).await));
    }
    let mut tasks = Vec::new();
    for (dev, tok) in tokens {
        let (client, url) = (app.client.clone(), app.url(EVENT));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let r = client
                    .post(&url)
                    .bearer_auth(&tok)
                    .json(&json!({"device_id": dev, "event_type": "c", "payload": {"i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                let v: Value = r.json().await.unwrap();
                ids.push(v["id"].as_str().unwrap().to_string());
            }
            ids
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let rows = app.log_rows();
    assert_eq!(rows.len(), 400);
    let stored: std::collections::HashSet<String> = rows.iter().map(|e| e.id.to_string()).collect();
    assert!(acked.iter().all(|id| stored.contains(id)));
    // Per device, log order is ack order.
    for d in 0..16 {
        let dev = format!("d{d}");
        let is: Vec<i64> = rows
            .iter()
            .filter(|e| e.device_id == dev)
            .map(|e| serde_json::from_str::<Value>(e.payload.get()).unwrap()["i"].as_i64().unwrap())
            .collect();
        assert_eq!(is, (0..25).collect::<Vec<_>>());
    }
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn browser_cors_preflight_with_authorization_succeeds_for_the_configured_origin() {
    const ORIGIN: &str = "https://dashboard.example";
    let app = TestApp::start_with(|c| c.stream.cors_origin = Some(ORIGIN.into())).await;
    let token = app.device("acme", "d1").await;
    // What a browser sends before `fetch(url, {method: "POST", headers: {Authorization, Content-Type}})`.
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/realtime/acme/event"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "preflight answered {}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h.get("access-control-allow-origin").unwrap(), ORIGIN);
    let allowed = h.get("access-control-allow-headers").unwrap().to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    assert!(h.get("access-control-allow-methods").unwrap().to_str().unwrap().contains("POST"));
    assert!(h.get_all("vary").iter().any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin")));
    // The request itself carries the origin back, and Vary: Origin.
    let r = app
        .client
        .post(app.url("/api/v1/realtime/acme/event"))
        .header("origin", ORIGIN)
        .bearer_auth(&token)
        .json(&json!({"device_id": "d1", "event_type": "cors", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), ORIGIN);
    assert!(r.headers().get_all("vary").iter().any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin")));
    // Another origin is not let in.
    let other = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/realtime/acme/event"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_json_error_body() {
    let app = TestApp::start().await;
    app.get("/no/such/thing", None).await.assert_error(404, "not_found", None);
    let r = app.client.delete(app.url("/api/v1/realtime/acme/events")).send().await.unwrap();
    Resp::from(r).await.assert_error(405, "method_not_allowed", None);
}

#[tokio::test]
async fn a_device_with_read_config_reads_the_limits_that_apply_to_it() {
    let app = TestApp::start_with(|c| {
        c.limits
            .tenants
            .insert("acme".into(), outpost::config::RateOverride { per_second: Some(3), ..Default::default() });
    })
    .await;
    let reader = app.register("acme", "cfg-1", &["write_events", "read_config"]).await;
    let r = app.get("/api/v1/realtime/acme/config", Some(&reader)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["device_id"], "cfg-1");
    assert_eq!(r.body["rate_limits"]["per_second"], 3);
    assert_eq!(r.body["max_payload_bytes"], app.config.limits.max_payload_bytes);
    // Without the permission: 403, naming it.
    let writer = app.register("acme", "cfg-2", &["write_events"]).await;
    app.get("/api/v1/realtime/acme/config", Some(&writer)).await.assert_error(403, "missing_permission", None);
}

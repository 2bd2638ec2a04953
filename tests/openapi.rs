//! The served OpenAPI document cannot drift from the code: every route
//! registered in `src/` is in it with its method, and every operation in it
//! is served by the appliance (neither 404 nor 405). Status codes and
//! response fields are checked by the schemathesis run in `make test`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::TestApp;
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// `(METHOD, path)` of every `.route("path", method(…))` call under `src/`
/// (a route spread over lines counts too; chained `.post(…)` on one route
/// as well).
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text: String = std::fs::read_to_string(&path).unwrap().split_whitespace().collect();
                for call in text.split(".route(\"").skip(1) {
                    let (route, rest) = call.split_once('"').unwrap();
                    // The method router: up to the end of this `.route(` call.
                    let mut depth = 1;
                    let end = rest
                        .char_indices()
                        .find(|(_, c)| {
                            depth += match c {
                                '(' => 1,
                                ')' => -1,
                                _ => 0,
                            };
                            depth == 0
                        })
                        .map_or(rest.len(), |(i, _)| i);
                    let router = &rest[..end];
                    let mut found = false;
                    for m in METHODS {
                        let called = |prefix: &str| router.contains(&format!("{prefix}{m}("));
                        if called(",") || called(",axum::routing::") || called(".") {
                            out.insert((m.to_uppercase(), route.to_string()));
                            found = true;
                        }
                    }
                    assert!(found, "{}: cannot tell the method of route {route}: {router}", path.display());
                }
            }
        }
    }
    out
}

fn routes_in_document(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_route_is_in_the_document_and_every_documented_route_is_served() {
    let app = TestApp::start().await;
    let resp = app.client.get(app.url("/api/v1/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let source = routes_in_source();
    assert!(source.len() >= 18, "the source scan found only {source:?}");
    let documented = routes_in_document(&doc);
    let missing: Vec<_> = source.difference(&documented).collect();
    assert!(missing.is_empty(), "routes in src/ missing from src/api/openapi.json: {missing:?}");
    let extra: Vec<_> = documented.difference(&source).collect();
    assert!(extra.is_empty(), "src/api/openapi.json documents routes src/ does not register: {extra:?}");

    // The running router serves each documented operation: no token, so the
    // answer is 401, 400, 200 or similar, never the fallbacks' 404 / 405.
    for (method, path) in &documented {
        let concrete = path.replace("{tenant}", "acme").replace("{device_id}", "d1");
        let req = app.client.request(method.parse().unwrap(), app.url(&concrete));
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = if resp.headers().get("content-type").is_some_and(|v| v == "text/event-stream") {
            String::new() // an endless stream: its headers are the answer
        } else {
            resp.text().await.unwrap()
        };
        assert!(
            !body.contains("\"not_found\"") && !body.contains("\"method_not_allowed\"") && status != 405,
            "{method} {concrete}: {status} {body}"
        );
    }
}

#[tokio::test]
async fn every_error_body_is_the_documented_error_schema() {
    // The WebSocket routes refuse a plain GET with the same JSON error body
    // as every other route (/mqtt used to answer text/plain).
    let app = TestApp::start().await;
    for path in ["/mqtt", "/api/v1/realtime/acme/stream?access_token=x"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{path}: {}", resp.status());
        assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].is_string() && body["message"].is_string(), "{path}: {body}");
    }
}

//! `GET /api/v1/openapi.json` (no auth): the HTTP API's OpenAPI 3.1
//! document. `openapi.json` beside this file is the contract, checked in;
//! what depends on the configuration (the batch, payload and body limits,
//! the version) is filled in from the running appliance. `tests/openapi.rs`
//! fails when a route in `src/` is missing from it or it names a route the
//! appliance does not serve, and `make test` runs schemathesis against it
//! (undocumented status codes or response fields fail that run).

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::config::LimitsConfig;

/// The checked-in document.
const DOCUMENT: &str = include_str!("openapi.json");

/// The document with this appliance's limits and version.
pub(crate) fn document(limits: &LimitsConfig, max_body_bytes: usize) -> Value {
    let mut doc: Value =
        serde_json::from_str(DOCUMENT).expect("src/api/openapi.json is valid JSON (a unit test checks)");
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let schemas = &mut doc["components"]["schemas"];
    schemas["EventBatch"]["maxItems"] = json!(limits.max_batch);
    let payload = &mut schemas["EventInput"]["properties"]["payload"];
    payload["x-max-bytes"] = json!(limits.max_payload_bytes);
    payload["x-max-depth"] = json!(limits.max_payload_depth);
    doc["info"]["x-max-body-bytes"] = json!(max_body_bytes);
    doc
}

/// The route, serving the document rendered once.
pub(super) fn routes<S: Clone + Send + Sync + 'static>(
    limits: &LimitsConfig,
    max_body_bytes: usize,
) -> axum::Router<S> {
    // Rendered once; each answer shares the bytes (no copy per request).
    let body = axum::body::Bytes::from(document(limits, max_body_bytes).to_string());
    axum::Router::new().route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_carries_the_configured_limits() {
        let limits = LimitsConfig { max_batch: 7, max_payload_bytes: 99, ..LimitsConfig::default() };
        let doc = document(&limits, 1234);
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["components"]["schemas"]["EventBatch"]["maxItems"], 7);
        assert_eq!(doc["components"]["schemas"]["EventInput"]["properties"]["payload"]["x-max-bytes"], 99);
        assert_eq!(doc["info"]["x-max-body-bytes"], 1234);
    }
}

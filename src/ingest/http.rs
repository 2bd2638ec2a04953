//! HTTP ingest: `POST /api/v1/realtime/{tenant}/event` (one event),
//! `POST /api/v1/realtime/{tenant}/events` (a JSON array or NDJSON batch,
//! all-or-nothing) and `POST /api/v1/realtime/{tenant}/devices/{device_id}/events/{event_type}`
//! (one event whose body is the device's payload as it is). All answer 201
//! only after the site-log commit.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;

use super::{Error, FULL_RETRY_AFTER, IngestHandle};
use crate::auth::Authenticator;
use crate::event::EventInput;
use crate::http::auth::Write;
use crate::http::extract::{BodyLimit, Object, media_type, parse_json, read_body, require_json, split_index};
use crate::http::{ApiError, TenantAccess};
use crate::log::Appended;
use crate::metrics::Protocol;

const PROTOCOL: Protocol = Protocol::Http;

/// What the ingest routes need.
#[derive(Clone, FromRef)]
pub struct IngestState {
    pub ingest: IngestHandle,
    pub auth: Arc<Authenticator>,
    pub max_body: BodyLimit,
}

/// `POST …/event` and `POST …/events`.
pub fn routes(state: IngestState) -> Router {
    Router::new()
        .route("/api/v1/realtime/{tenant}/event", post(post_event))
        .route("/api/v1/realtime/{tenant}/events", post(post_events))
        .route("/api/v1/realtime/{tenant}/devices/{device_id}/events/{event_type}", post(post_device_event))
        .with_state(state)
}

/// The token must allow writing to the path's tenant; refusals are counted.
fn writer(state: &IngestState, access: Result<TenantAccess<Write>, ApiError>) -> Result<TenantAccess<Write>, ApiError> {
    access.inspect_err(|e| match e.status {
        StatusCode::UNAUTHORIZED => state.ingest.count_rejected(PROTOCOL, "unauthenticated"),
        StatusCode::FORBIDDEN => state.ingest.count_rejected(PROTOCOL, "forbidden"),
        _ => {}
    })
}

/// `text/plain` or `application/octet-stream` (its parameters dropped).
fn raw_content_type(headers: &HeaderMap) -> Option<String> {
    media_type(headers).filter(|m| matches!(m.as_str(), "text/plain" | "application/octet-stream"))
}

/// `POST …/event`: one event as JSON; `201 {id, seq, duplicate}` after
/// commit.
async fn post_event(
    State(state): State<IngestState>,
    access: Result<TenantAccess<Write>, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Appended>), ApiError> {
    let access = writer(&state, access)?;
    if let Some(ct) = raw_content_type(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {ct:?} is not accepted here; send the event as application/json, or POST the payload \
                 as it is to /api/v1/realtime/{}/devices/<device_id>/events/<event_type>",
                access.tenant
            ),
        )
        .with_field("content-type"));
    }
    require_json(&headers, false)?;
    let bytes = read_body(&headers, body, state.max_body.0).await?;
    let Object(input) = parse_json::<Object<EventInput>>(&bytes)?;
    submit_one(&state, &access, input).await
}

/// Appends one event; `201 {id, seq, duplicate}` once it is committed.
async fn submit_one(
    state: &IngestState,
    access: &TenantAccess<Write>,
    input: EventInput,
) -> Result<(StatusCode, Json<Appended>), ApiError> {
    let mut appended = state.ingest.submit(&access.principal, &access.tenant, vec![input], false, PROTOCOL).await?;
    let first = appended.pop().ok_or_else(|| ApiError::internal("append", &"empty result"))?;
    Ok((StatusCode::CREATED, Json(first)))
}

/// `POST …/devices/{device_id}/events/{event_type}`: the body is the
/// device's payload as it is, of any Content-Type (kept as
/// `properties.content_type`), the way an MQTT device publishes to its
/// event topic: a JSON object stays the payload, anything else is kept
/// byte-exact (`crate::payload`). `201 {id, seq, duplicate}` after commit.
async fn post_device_event(
    State(state): State<IngestState>,
    access: Result<TenantAccess<Write>, ApiError>,
    Path((_, device_id, event_type)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Appended>), ApiError> {
    let access = writer(&state, access)?;
    let bytes = read_body(&headers, body, state.max_body.0).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::trim);
    let properties = crate::payload::event_properties(content_type, &[], None);
    let (payload, properties, sent_bytes) = crate::payload::from_device(&bytes, properties);
    let input = EventInput { device_id, event_type, payload, id: None, timestamp: None, properties, sent_bytes };
    submit_one(&state, &access, input).await
}

/// Answer to a batch.
#[derive(Serialize)]
pub struct BatchResult {
    pub accepted: usize,
    pub duplicates: usize,
    pub results: Vec<Appended>,
}

/// `POST …/events`: a JSON array, or NDJSON (`Content-Type:
/// application/x-ndjson`, one event per line). One invalid item refuses the
/// whole batch, naming its index; nothing is written.
async fn post_events(
    State(state): State<IngestState>,
    access: Result<TenantAccess<Write>, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BatchResult>), ApiError> {
    let access = writer(&state, access)?;
    require_json(&headers, true)?;
    let bytes = read_body(&headers, body, state.max_body.0).await?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl"));
    let inputs = if ndjson { parse_ndjson(&bytes, state.ingest.max_batch())? } else { parse_array(&bytes)? };
    let results = state.ingest.submit(&access.principal, &access.tenant, inputs, true, PROTOCOL).await?;
    let duplicates = results.iter().filter(|r| r.duplicate).count();
    Ok((StatusCode::CREATED, Json(BatchResult { accepted: results.len() - duplicates, duplicates, results })))
}

/// A JSON array of events; errors name the item (`index`) and its field.
pub fn parse_array(bytes: &[u8]) -> Result<Vec<EventInput>, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'[') {
        return Err(ApiError::bad_field(
            "events",
            "body must be a JSON array of events (or NDJSON with Content-Type: application/x-ndjson)",
        ));
    }
    let items = parse_json::<Vec<Object<EventInput>>>(bytes).map_err(|mut e| {
        if let Some(f) = e.field.take() {
            let (index, field) = split_index(&f);
            e.field = Some(field);
            e.index = index;
        }
        e
    })?;
    Ok(items.into_iter().map(|Object(i)| i).collect())
}

/// NDJSON, one event per line (blank lines skipped), at most `max_batch`.
pub fn parse_ndjson(bytes: &[u8], max_batch: usize) -> Result<Vec<EventInput>, ApiError> {
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == max_batch {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!("batch exceeds limits.max_batch = {max_batch}"),
            ));
        }
        let index = out.len();
        out.push(parse_json::<Object<EventInput>>(line).map_err(|e| e.with_index(Some(index)))?.0);
    }
    Ok(out)
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid { index, invalid } => ApiError::bad_field(invalid.field, message).with_index(index),
            Error::OtherDevice { index, .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "other_device", message).with_field("device_id").with_index(index)
            }
            // MQTT gateways only; HTTP has no children.
            Error::ChildRefused { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "other_device", message).with_field("device_id")
            }
            Error::BatchTooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", message),
            Error::EmptyBatch => ApiError::bad_field("events", message),
            Error::RateLimited(l) => ApiError {
                retry_after: Some(l.retry_after),
                field: Some(l.window.as_str().to_string()),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            },
            Error::Full { .. } => ApiError::unavailable("log_full", message, FULL_RETRY_AFTER),
            Error::IdConflict { index, .. } => {
                ApiError::new(StatusCode::CONFLICT, "id_conflict", message).with_field("id").with_index(index)
            }
            Error::Unavailable(inner) => {
                tracing::error!(error = %inner, "ingest: site log unavailable");
                ApiError::unavailable("unavailable", "site log unavailable; retry", Duration::from_secs(5))
            }
        }
    }
}

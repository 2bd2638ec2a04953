//! HTTP ingest: `POST /api/v1/realtime/{tenant}/event` (one event) and
//! `POST /api/v1/realtime/{tenant}/events` (a JSON array or NDJSON batch,
//! all-or-nothing). Both answer 201 only after the site-log commit.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Serialize;

use crate::auth::{Perm, Principal};
use crate::event::EventInput;
use crate::http::extract::{bearer, parse_json, read_body, split_index};
use crate::http::{ApiError, AppState, check_tenant};
use crate::log::Appended;

const PROTOCOL: &str = "http";

/// The token must allow writing to `tenant`; refusals are counted.
fn authorize_write(state: &AppState, headers: &HeaderMap, tenant: &str) -> Result<Principal, ApiError> {
    Ok(state.auth.authorize(bearer(headers), tenant, Perm::WriteEvents).inspect_err(|e| {
        state.metrics.reject(PROTOCOL, if e.is_unauthenticated() { "unauthenticated" } else { "forbidden" }, 1);
    })?)
}

/// `POST …/event`: one event; `201 {id, seq, duplicate}` after commit.
pub async fn post_event(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Appended>), ApiError> {
    check_tenant(&tenant)?;
    let principal = authorize_write(&state, &headers, &tenant)?;
    let bytes = read_body(&headers, body, state.max_body).await?;
    let input: EventInput = parse_json(&bytes)?;
    let mut appended = state.ingest.submit(&principal, &tenant, vec![input], false, PROTOCOL).await?;
    let first = appended.pop().ok_or_else(|| ApiError::internal("append", &"empty result"))?;
    Ok((StatusCode::CREATED, Json(first)))
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
pub async fn post_events(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BatchResult>), ApiError> {
    check_tenant(&tenant)?;
    let principal = authorize_write(&state, &headers, &tenant)?;
    let bytes = read_body(&headers, body, state.max_body).await?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl"));
    let inputs = if ndjson { parse_ndjson(&bytes, state.ingest.max_batch())? } else { parse_array(&bytes)? };
    let results = state.ingest.submit(&principal, &tenant, inputs, true, PROTOCOL).await?;
    let duplicates = results.iter().filter(|r| r.duplicate).count();
    Ok((StatusCode::CREATED, Json(BatchResult { accepted: results.len() - duplicates, duplicates, results })))
}

fn parse_array(bytes: &[u8]) -> Result<Vec<EventInput>, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'[') {
        return Err(ApiError::bad_field(
            "events",
            "body must be a JSON array of events (or NDJSON with Content-Type: application/x-ndjson)",
        ));
    }
    parse_json::<Vec<EventInput>>(bytes).map_err(|mut e| {
        if let Some(f) = e.field.take() {
            let (index, field) = split_index(&f);
            e.field = Some(field);
            e.index = index;
        }
        e
    })
}

fn parse_ndjson(bytes: &[u8], max_batch: usize) -> Result<Vec<EventInput>, ApiError> {
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
        out.push(parse_json::<EventInput>(line).map_err(|e| e.with_index(Some(index)))?);
    }
    Ok(out)
}

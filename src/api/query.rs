//! `GET /api/v1/realtime/{tenant}/events`: the site log, filtered and paged
//! by the `seq` cursor.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use serde::Serialize;

use super::ApiState;
use crate::event::{StoredEvent, parse_cursor, parse_rfc3339_us, validate_event_type};
use crate::http::auth::Read;
use crate::http::{ApiError, TenantAccess};
use crate::log::schema;

/// Default and largest page of `GET …/events`.
pub(crate) const DEFAULT_LIMIT: usize = 100;
pub(crate) const MAX_LIMIT: usize = 1000;

/// A page of events and the cursor to continue from.
#[derive(Serialize)]
pub(crate) struct EventsPage {
    pub events: Vec<StoredEvent>,
    /// Pass as `after=` to continue; equals the request's `after` when empty.
    pub next: i64,
    /// True when the page was full, so more may follow at once.
    pub has_more: bool,
}

/// `GET …/events?device_id&event_type&start_time&end_time&after&limit`.
pub(super) async fn query_events(
    State(state): State<ApiState>,
    access: TenantAccess<Read>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<EventsPage>, ApiError> {
    let tenant = access.tenant;
    const KNOWN: [&str; 6] = ["device_id", "event_type", "start_time", "end_time", "after", "limit"];
    if let Some(k) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_field(k.clone(), format!("unknown query parameter; known: {}", KNOWN.join(", "))));
    }
    let time = |k: &str| -> Result<Option<i64>, ApiError> {
        params
            .get(k)
            .map(|v| parse_rfc3339_us(v).ok_or_else(|| ApiError::bad_field(k, "must be an RFC 3339 date-time")))
            .transpose()
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_field("limit", format!("must be an integer 1..={MAX_LIMIT}")));
            }
        },
    };
    let after = match params.get("after") {
        None => 0,
        Some(v) => parse_cursor(v).map_err(|e| ApiError::bad_field(e.field, e.message))?,
    };
    if let Some(t) = params.get("event_type") {
        validate_event_type(t).map_err(|e| ApiError::bad_field(e.field, e.message))?;
    }
    let q = schema::Query {
        tenant: tenant.to_string(),
        device_id: params.get("device_id").cloned(),
        event_type: params.get("event_type").cloned(),
        start_us: time("start_time")?,
        end_us: time("end_time")?,
        after,
        limit,
    };
    let events = state.readers.with(move |c| schema::query(c, &q)).await?;
    let next = events.last().map_or(after, |e| e.seq);
    let has_more = events.len() == limit;
    Ok(Json(EventsPage { events, next, has_more }))
}

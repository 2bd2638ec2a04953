//! The status page at `/` for the installer on site (phone or laptop), its
//! payload-free event feed, and the optional status token that guards them
//! together with `/api/v1/status` and `/metrics`.
//!
//! The page is one HTML document with its CSS and JS embedded in the binary
//! (`status_page/`); it carries the status at render time and then polls
//! `/api/v1/status` and listens to `/api/v1/status/events` (SSE).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

use super::ApiState;
use super::status::{Status, current_status};
use crate::forward::Uplink;
use crate::http::ApiError;
use crate::stream::tail::TailItem;

const HTML: &str = include_str!("status_page/index.html");
const CSS: &str = include_str!("status_page/page.css");
const JS: &str = include_str!("status_page/page.js");

fn esc(v: &str) -> String {
    v.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `template` with each `{{KEY}}` of `values` replaced in one pass, so a
/// value (an error text, say) is never itself searched for placeholders.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match values.iter().find(|(k, _)| rest.starts_with(k)) {
            Some((k, v)) => {
                out.push_str(v);
                rest = &rest[k.len()..];
            }
            None => {
                out.push_str("{{");
                rest = &rest[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The figures the HTML carries as rendered (the JS takes over at once and
/// formats them the same way; without JS these are what the page shows).
fn first_paint(s: &Status) -> [(&'static str, String); 6] {
    let u = &s.uplink;
    let state = match u.state {
        Uplink::Up => "up",
        Uplink::Connecting => "connecting",
        Uplink::Down => "DOWN",
        Uplink::Stalled => "STALLED",
        Uplink::Disabled => "not configured",
    };
    let reason = match (&u.last_error, u.state) {
        (Some(e), _) => e.clone(),
        (None, Uplink::Disabled) => "no central.url set".into(),
        (None, _) => "—".into(),
    };
    let backlog = if s.buffering_only {
        "buffering only: no central database set".to_string()
    } else {
        format!("{} waiting to forward", s.log.backlog_rows)
    };
    let mib = |b: u64| b as f64 / 1_048_576.0;
    let since = u.since.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    [
        ("{{UPLINK}}", state.to_string()),
        ("{{UPLINK_SINCE}}", since),
        ("{{UPLINK_REASON}}", reason),
        ("{{BACKLOG}}", backlog),
        ("{{DEAD}}", s.log.dead_letters.to_string()),
        ("{{DISK_LOG}}", format!("log {:.1} MiB of {:.1} MiB", mib(s.disk.log_bytes), mib(s.disk.log_max_bytes))),
    ]
}

/// `GET /`: the page, its figures rendered, and the status embedded as JSON
/// for the script.
async fn index(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let s = current_status(&state).await?;
    // Inside <script>, `<` is the only character that could end it early.
    let json = serde_json::to_string(&s)
        .map_err(|e| ApiError::internal("status encoding failed", &e))?
        .replace('<', "\\u003c");
    let mut values: Vec<(&str, String)> = first_paint(&s).into_iter().map(|(k, v)| (k, esc(&v))).collect();
    values.extend([
        ("{{CSS}}", CSS.to_string()),
        ("{{JS}}", JS.replace("</", "<\\/")),
        ("{{SITE}}", esc(&s.site_id)),
        ("{{VERSION}}", esc(s.version)),
        ("{{STATUS}}", json),
    ]);
    let page = fill(HTML, &values);
    let mut resp = Html(page).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `GET /api/v1/status/events`: the newest events of the whole site as
/// `event` frames `{seq, tenant, device_id, event_type, received_at}` —
/// the recent ones first, then live. Never a payload.
async fn feed(State(state): State<ApiState>) -> Result<Response, ApiError> {
    // A pool of its own (`stream.max_status_subscribers`): no device can
    // take the installer's page away, nor the page the devices' slots.
    let slot = state.hub.slot("status", crate::stream::Owner::StatusPage).map_err(|full| full.api_error())?;
    let (recent, rx) = state.hub.tail.subscribe();
    let last = recent.last().map_or(0, |i| i.seq);
    let shutdown = state.shutdown.clone();
    let frame = |i: &TailItem| SseEvent::default().id(i.seq.to_string()).event("event").data(i.json.clone());
    let first = futures_util::stream::iter(recent.into_iter().map(move |i| Ok::<_, Infallible>(frame(&i))));
    let live = futures_util::stream::unfold(Some((rx, slot)), move |rx| {
        let shutdown = shutdown.clone();
        async move {
            let (mut rx, slot) = rx?;
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = rx.recv() => r,
                };
                match item {
                    Ok(i) if i.seq <= last => {} // already among the recent ones
                    Ok(i) => return Some((Ok::<_, Infallible>(frame(&i)), Some((rx, slot)))),
                    // A page that fell behind just skips ahead: it is a tail.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    let mut resp = Sse::new(futures_util::StreamExt::chain(first, live))
        .keep_alive(KeepAlive::new().text("heartbeat"))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// Equal without an early exit, so timing does not reveal a prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lets a request through when no status token is configured, or when it
/// carries it as `Authorization: Bearer …` or `?token=…`; else 401.
async fn guard(State(token): State<Option<Arc<str>>>, req: Request, next: Next) -> Response {
    let Some(token) = token else { return next.run(req).await };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    let query =
        || Query::<HashMap<String, String>>::try_from_uri(req.uri()).ok().and_then(|Query(mut q)| q.remove("token"));
    match bearer.or_else(query) {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", "wrong status token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "this status page needs the token of http.status_token_file: Authorization: Bearer <token> or ?token=<token>",
        )
        .into_response(),
    }
}

/// `/`, `/api/v1/status`, `/api/v1/status/events`, `/metrics` behind the
/// optional status token; `/healthz`, `/readyz` open.
pub(super) fn routes(state: &ApiState) -> axum::Router<ApiState> {
    use axum::routing::get;
    let (guarded, open) = super::status::routes();
    let guarded = guarded
        .route("/", get(index))
        .route("/api/v1/status/events", get(feed))
        .route_layer(axum::middleware::from_fn_with_state(state.status_token.clone(), guard));
    guarded.merge(open)
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_assets_stay_small() {
        let total = super::HTML.len() + super::CSS.len() + super::JS.len();
        assert!(total < 50 * 1024, "status page assets are {total} bytes");
    }

    #[test]
    fn placeholders_are_filled_once_and_values_not_rescanned() {
        let v = [("{{A}}", "{{B}}".to_string()), ("{{B}}", "b".to_string())];
        assert_eq!(super::fill("x{{A}}y{{B}}z{{C}}", &v), "x{{B}}ybz{{C}}");
    }

    #[test]
    fn token_comparison_needs_every_byte() {
        assert!(super::same(b"abcdef", b"abcdef"));
        assert!(!super::same(b"abcdef", b"abcdeg"));
        assert!(!super::same(b"abc", b"abcdef"));
    }
}

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
use super::status::current_status;
use crate::http::ApiError;
use crate::stream::tail::TailItem;

const HTML: &str = include_str!("status_page/index.html");
const CSS: &str = include_str!("status_page/page.css");
const JS: &str = include_str!("status_page/page.js");

fn esc(v: &str) -> String {
    v.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `GET /`: the page, with the current status embedded for the first paint.
async fn index(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let s = current_status(&state).await?;
    // Inside <script>, `<` is the only character that could end it early.
    let json = serde_json::to_string(&s)
        .map_err(|e| ApiError::internal("status encoding failed", &e))?
        .replace('<', "\\u003c");
    let page = HTML
        .replace("{{CSS}}", CSS)
        .replace("{{JS}}", &JS.replace("</", "<\\/"))
        .replace("{{SITE}}", &esc(&s.site_id))
        .replace("{{VERSION}}", &esc(s.version))
        .replace("{{STATUS}}", &json);
    let mut resp = Html(page).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `GET /api/v1/status/events`: the newest events of the whole site as
/// `event` frames `{seq, tenant, device_id, event_type, received_at}` —
/// the recent ones first, then live. Never a payload.
async fn feed(State(state): State<ApiState>) -> Response {
    let (recent, rx) = state.hub.tail.subscribe();
    let last = recent.last().map_or(0, |i| i.seq);
    let shutdown = state.shutdown.clone();
    let frame = |i: &TailItem| SseEvent::default().id(i.seq.to_string()).event("event").data(i.json.clone());
    let first = futures_util::stream::iter(recent.into_iter().map(move |i| Ok::<_, Infallible>(frame(&i))));
    let live = futures_util::stream::unfold(Some(rx), move |rx| {
        let shutdown = shutdown.clone();
        async move {
            let mut rx = rx?;
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = rx.recv() => r,
                };
                match item {
                    Ok(i) if i.seq <= last => {} // already among the recent ones
                    Ok(i) => return Some((Ok::<_, Infallible>(frame(&i)), Some(rx))),
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
    resp
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
    fn token_comparison_needs_every_byte() {
        assert!(super::same(b"abcdef", b"abcdef"));
        assert!(!super::same(b"abcdef", b"abcdeg"));
        assert!(!super::same(b"abc", b"abcdef"));
    }
}

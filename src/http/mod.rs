//! Leaf glue shared by every stage's routes: the one error type
//! ([`ApiError`]), the JSON body and auth extractors, the fallbacks that keep
//! 404 and 405 in the same JSON shape, CORS, and serving. It imports no
//! stage: each stage exports its own `routes()` and `app.rs` merges them.

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod extract;
mod line_guard;
mod serve;

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub(crate) use auth::{AdminAccess, TenantAccess};
pub(crate) use error::ApiError;
pub(crate) use extract::BodyLimit;

/// Unknown paths get the same JSON error shape.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// A known path with another method.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this endpoint does not take that method")
}

/// CORS for browser dashboards on another origin (`stream.cors_origin`, or
/// `*` for any): answers preflights (OPTIONS) for requests that carry
/// `Authorization`, and sends `Vary: Origin`. Without an origin configured
/// no cross-origin access is granted.
pub(crate) fn cors(origin: Option<&str>) -> CorsLayer {
    let allow = match origin {
        Some("*") => AllowOrigin::any(),
        Some(o) => match HeaderValue::from_str(o) {
            Ok(v) => AllowOrigin::list([v]),
            Err(_) => AllowOrigin::list([]),
        },
        None => AllowOrigin::list([]),
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("last-event-id")])
        .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
        .max_age(Duration::from_secs(600))
        .vary([header::ORIGIN])
}

/// The merged routes of every stage, with the JSON fallbacks and CORS.
pub(crate) fn finish(router: Router, cors_origin: Option<&str>) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .layer(cors(cors_origin))
}

/// Rejections axum's own extractors answer (a malformed query string, a
/// plain GET on a WebSocket endpoint) get the same JSON error body as ours.
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ if status.is_client_error() => "client_error",
        _ => "internal",
    };
    let mut out = axum::response::IntoResponse::into_response(ApiError::new(
        status,
        code,
        if message.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { message },
    ));
    for (k, v) in parts.headers.iter().filter(|(k, _)| *k != header::CONTENT_TYPE && *k != header::CONTENT_LENGTH) {
        out.headers_mut().insert(k.clone(), v.clone());
    }
    out
}

pub(crate) use serve::{Limits, PeerCert, accept, serve};

/// What a WebSocket `event` frame turns into: the ingest stage submits it and
/// answers the `ack` (or `error`) frame. The stream stage owns the socket and
/// hands event frames here, so neither stage imports the other.
pub trait EventFrames: Send + Sync {
    /// The reply frame for one `event` frame, sent only after the commit.
    fn event_frame<'a>(
        &'a self,
        principal: &'a crate::auth::Principal,
        tenant: &'a crate::event::Tenant,
        event: &'a serde_json::value::RawValue,
    ) -> futures_util::future::BoxFuture<'a, String>;
}

/// `{"type":"error","code":…,"message":…,"field":…}`: the WebSocket form of
/// an [`ApiError`].
pub(crate) fn error_frame(code: &str, message: &str, field: Option<&str>) -> String {
    let mut v = serde_json::json!({"type": "error", "code": code, "message": message});
    if let Some(f) = field {
        v["field"] = serde_json::json!(f);
    }
    v.to_string()
}

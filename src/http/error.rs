//! `ApiError`: the one error type every HTTP handler returns. Its body is
//! always `{"error": code, "message": …, "field": …, "index": …}`; 401 carries
//! `WWW-Authenticate`, 429 and 503 carry `Retry-After`. Internal details are
//! logged, never sent.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::{auth, log};

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub index: Option<usize>,
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, index: None, retry_after: None }
    }

    /// 400 naming the offending field.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message).with_field(field)
    }

    /// Names the field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Names the batch item.
    pub fn with_index(mut self, index: Option<usize>) -> Self {
        self.index = index;
        self
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: Duration) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message) }
    }

    /// 500 for an unexpected failure: logged here, described generically.
    pub fn internal(context: &str, err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the appliance log")
    }
}

fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.retry_after.map(retry_secs);
        let body = Body {
            error: self.code,
            message: &self.message,
            field: self.field.as_deref(),
            index: self.index,
            retry_after_seconds: retry,
        };
        let mut resp = (self.status, Json(body)).into_response();
        let h = resp.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            let v = format!("Bearer realm=\"outpost\", error=\"invalid_token\", error_description=\"{}\"", self.code);
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(secs) = retry {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        }
        resp
    }
}

/// 426 for a plain request to a WebSocket endpoint (with `Upgrade:
/// websocket`), naming what is missing.
pub(crate) fn upgrade_required(why: &axum::extract::ws::rejection::WebSocketUpgradeRejection) -> ApiError {
    ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
        format!("this endpoint is a WebSocket: open it with a WebSocket client ({why})"),
    )
}

impl From<auth::Error> for ApiError {
    fn from(e: auth::Error) -> Self {
        let (status, code) = match &e {
            auth::Error::Missing => (StatusCode::UNAUTHORIZED, "missing_token"),
            auth::Error::Expired => (StatusCode::UNAUTHORIZED, "token_expired"),
            auth::Error::Invalid(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            auth::Error::UnknownDevice(_) => (StatusCode::UNAUTHORIZED, "unknown_device"),
            auth::Error::Revoked(_) => (StatusCode::UNAUTHORIZED, "device_revoked"),
            auth::Error::WrongTenant { .. } => (StatusCode::FORBIDDEN, "wrong_tenant"),
            auth::Error::MissingPermission(_) => (StatusCode::FORBIDDEN, "missing_permission"),
            auth::Error::AdminRequired => (StatusCode::FORBIDDEN, "admin_required"),
            auth::Error::CannotIssue(_) | auth::Error::Key { .. } => {
                return ApiError::internal("token issuing failed", &e);
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<log::Error> for ApiError {
    fn from(e: log::Error) -> Self {
        match &e {
            log::Error::DeviceExists { .. } | log::Error::DeviceRevoked { .. } => {
                ApiError::new(StatusCode::CONFLICT, "device_exists", e.to_string()).with_field("device_id")
            }
            log::Error::DeviceNotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "device_not_found", e.to_string())
            }
            // The request is well-formed; the registry says no.
            log::Error::NotAGateway { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_a_gateway", e.to_string()).with_field("via")
            }
            _ => ApiError::internal("site log error", &e),
        }
    }
}

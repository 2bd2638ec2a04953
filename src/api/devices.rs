//! Device administration (admin token): register, revoke, list; and a
//! device reading its own limits (`read_config`).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::auth::{Perm, Principal, parse_perms, parse_ttl};
use crate::event::{new_device_id, validate_device_id};
use crate::http::auth::ReadConfig;
use crate::http::extract::{Object, parse_json, read_body, require_json};
use crate::http::{AdminAccess, ApiError, TenantAccess};
use crate::log::schema::{self, Device};

/// Body of `POST …/device/register`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub perms: Option<Vec<String>>,
    /// Token lifetime, e.g. "30d".
    #[serde(default)]
    pub ttl: Option<String>,
    /// Also give the device a short secret (`crate::auth::secret`), with
    /// the same permissions, returned once as `secret`.
    #[serde(default)]
    pub secret: bool,
    /// A gateway: it may publish for its children.
    #[serde(default)]
    pub gateway: bool,
    /// A child of this gateway.
    #[serde(default)]
    pub via: Option<String>,
}

/// Answer of `POST …/device/register`: the device and its token (shown once),
/// and its secret when one was asked for (shown once).
#[derive(Serialize)]
pub(crate) struct Registered {
    pub device: Device,
    pub token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `POST …/device/register` (admin): registers a device, returns its token once.
async fn register_device(
    State(state): State<ApiState>,
    AdminAccess { tenant }: AdminAccess,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    require_json(&headers, false)?;
    let bytes = read_body(&headers, body, 64 * 1024).await?;
    let Object(req) = if bytes.iter().all(u8::is_ascii_whitespace) {
        parse_json::<Object<RegisterRequest>>(b"{}")?
    } else {
        parse_json(&bytes)?
    };
    let device_id = req.device_id.unwrap_or_else(new_device_id);
    validate_device_id(&device_id).map_err(|e| ApiError::bad_field(e.field, e.message))?;
    if req.name.as_ref().is_some_and(|n| n.chars().count() > 255) {
        return Err(ApiError::bad_field("name", "must be at most 255 characters"));
    }
    let perms = match &req.perms {
        Some(p) => parse_perms(p).map_err(|m| ApiError::bad_field("perms", m))?,
        None => Perm::DEFAULT.to_vec(),
    };
    let ttl = req.ttl.as_deref().map(|t| parse_ttl(t).map_err(|m| ApiError::bad_field("ttl", m))).transpose()?;
    // The secret is hashed here, off the log writer (argon2 takes tens of ms).
    let secret = match req.secret {
        true => {
            let s = crate::auth::secret::generate().map_err(|e| ApiError::internal("secret", &e))?;
            let (plain, names) = (s.clone(), crate::auth::secret::perms_field(&perms));
            let hash = tokio::task::spawn_blocking(move || crate::auth::secret::hash(&plain))
                .await
                .map_err(|e| ApiError::internal("secret", &e))?
                .map_err(|e| ApiError::internal("secret", &e))?;
            Some((s, hash, names))
        }
        false => None,
    };
    let stored = secret.as_ref().map(|(_, hash, names)| (hash.clone(), names.clone()));
    let role = crate::log::schema::Role { gateway: req.gateway, via: req.via };
    let device = state.log.add_device(tenant.to_string(), device_id.clone(), req.name, role, stored).await?;
    state.auth.registry().set(&device);
    let token = state.auth.issue_device(&tenant, &device_id, &perms, ttl)?;
    tracing::info!(%tenant, device_id, secret = secret.is_some(), "device registered");
    Ok((StatusCode::CREATED, Json(Registered { device, token, secret: secret.map(|(s, _, _)| s) })))
}

/// `DELETE …/device/{device_id}` (admin): revokes at once.
async fn revoke_device(
    State(state): State<ApiState>,
    AdminAccess { tenant }: AdminAccess,
    Path((_, device_id)): Path<(String, String)>,
) -> Result<Json<Device>, ApiError> {
    let device = state.log.revoke_device(tenant.to_string(), device_id.clone()).await?;
    state.auth.registry().set(&device);
    tracing::info!(%tenant, device_id, "device revoked");
    Ok(Json(device))
}

/// `GET …/devices` (admin): registry with last_seen and event counts.
async fn list_devices(
    State(state): State<ApiState>,
    AdminAccess { tenant }: AdminAccess,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The counters still in memory are added to the table's; a flush
    // between the read and the overlay makes it read again.
    let mut tries = 0;
    let devices = loop {
        let flushes = state.log.device_flushes();
        let t = tenant.clone();
        let mut devices = state.readers.with(move |c| schema::devices(c, Some(&t))).await?;
        tries += 1;
        if state.log.overlay_devices(&mut devices, flushes) || tries == 5 {
            break devices;
        }
    };
    Ok(Json(serde_json::json!({ "devices": devices })))
}

/// `GET …/config` (`read_config`): the limits that apply to the calling
/// device (admins: the tenant's defaults), so firmware can pace itself.
async fn device_config(State(state): State<ApiState>, access: TenantAccess<ReadConfig>) -> Json<serde_json::Value> {
    let device_id = match &access.principal {
        Principal::Device { device_id, .. } => device_id.as_str(),
        Principal::Admin => "",
    };
    let limits = &state.limits;
    let rates = limits.rates_for(&access.tenant, device_id);
    Json(serde_json::json!({
        "tenant": access.tenant.as_str(),
        "device_id": (!device_id.is_empty()).then_some(device_id),
        "rate_limits": {"per_second": rates.per_second, "per_minute": rates.per_minute, "per_hour": rates.per_hour},
        "max_payload_bytes": limits.max_payload_bytes,
        "max_payload_depth": limits.max_payload_depth,
        "max_batch": limits.max_batch,
        "max_body_bytes": state.max_body,
    }))
}

/// Device administration and `…/config`.
pub(super) fn routes() -> axum::Router<ApiState> {
    use axum::routing::{delete, get, post};
    axum::Router::new()
        .route("/api/v1/realtime/{tenant}/device/register", post(register_device))
        .route("/api/v1/realtime/{tenant}/device/{device_id}", delete(revoke_device))
        .route("/api/v1/realtime/{tenant}/devices", get(list_devices))
        .route("/api/v1/realtime/{tenant}/config", get(device_config))
}

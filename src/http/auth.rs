//! The auth extractors: who is calling, for which tenant, with which right.
//! The tenant comes from the path (`{tenant}`) and is validated before
//! anything else; the token from `Authorization: Bearer`, or for stream
//! endpoints also `?access_token=` (browsers cannot set headers on
//! WebSocket or EventSource; query strings are never logged); or a device
//! secret as `Authorization: Basic` (`<tenant>/<device id>` : secret).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, Query, RawPathParams};
use axum::http::header;
use axum::http::request::Parts;

use super::ApiError;
use super::extract::{basic_secret, bearer};
use super::serve::PeerCert;
use crate::auth::{Authenticator, Perm, Principal};
use crate::event::Tenant;

/// What a route requires of a device token (admins pass every check).
pub(crate) trait Access: Send + Sync + 'static {
    /// The permission a device token must carry.
    const PERM: Perm;
    /// Whether `?access_token=` is accepted besides the header.
    const QUERY_TOKEN: bool = false;
}

/// `write_events`: ingest routes.
pub(crate) struct Write;
impl Access for Write {
    const PERM: Perm = Perm::WriteEvents;
}

/// `read_events`: queries.
pub(crate) struct Read;
impl Access for Read {
    const PERM: Perm = Perm::ReadEvents;
}

/// `read_events`, token also as `?access_token=`: stream endpoints.
pub(crate) struct Subscribe;
impl Access for Subscribe {
    const PERM: Perm = Perm::ReadEvents;
    const QUERY_TOKEN: bool = true;
}

/// `read_config`: a device reading its own limits.
pub(crate) struct ReadConfig;
impl Access for ReadConfig {
    const PERM: Perm = Perm::ReadConfig;
}

/// A caller allowed `A` on the path's tenant.
pub(crate) struct TenantAccess<A> {
    pub tenant: Tenant,
    pub principal: Principal,
    /// The token's `exp` (unix seconds): long-lived sessions end then.
    pub expires_at: i64,
    _access: PhantomData<A>,
}

/// An admin; `tenant` is the path's, validated, when the route has one.
pub(crate) struct AdminAccess {
    pub tenant: Tenant,
}

async fn path_tenant<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<Tenant, ApiError> {
    let params = RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::bad_field("tenant", e.to_string()))?;
    let raw = params.iter().find(|(k, _)| *k == "tenant").map(|(_, v)| v).unwrap_or("");
    Tenant::parse(raw).map_err(|e| ApiError::bad_field(e.field, e.message))
}

fn token(parts: &Parts, query: bool) -> Option<String> {
    if let Some(t) = bearer(&parts.headers) {
        return Some(t.to_string());
    }
    if !query {
        return None;
    }
    let Query(q) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri).ok()?;
    q.get("access_token").cloned()
}

impl<S, A> FromRequestParts<S> for TenantAccess<A>
where
    S: Send + Sync,
    A: Access,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let tenant = path_tenant(parts, state).await?;
        let auth = Arc::<Authenticator>::from_ref(state);
        let cert = parts.extensions.get::<PeerCert>().filter(|_| !parts.headers.contains_key(header::AUTHORIZATION));
        let login = if let Some(PeerCert(cert)) = cert {
            // A client certificate (HTTPS with tls.client_ca_file), when the
            // request carries no other credential.
            let cert = cert.as_ref().map_err(|why| crate::auth::Error::Invalid(why.clone()))?;
            Some(auth.cert_login(&cert.tenant, &cert.device_id)?)
        } else if let Some((user, secret)) = basic_secret(&parts.headers) {
            // A device secret, for firmware that cannot hold a token.
            Some(auth.verify_secret(auth.secret_login(&user)?, &secret).await?)
        } else {
            None
        };
        let (principal, expires_at) = match login {
            Some(login) => {
                auth.permit(&login.0, &tenant, A::PERM)?;
                login
            }
            None => auth.authorize_expiring(token(parts, A::QUERY_TOKEN).as_deref(), &tenant, A::PERM)?,
        };
        Ok(Self { tenant, principal, expires_at, _access: PhantomData })
    }
}

impl<S> FromRequestParts<S> for AdminAccess
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let tenant = path_tenant(parts, state).await?;
        Arc::<Authenticator>::from_ref(state).authorize_admin(token(parts, false).as_deref())?;
        Ok(Self { tenant })
    }
}

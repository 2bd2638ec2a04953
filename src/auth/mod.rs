//! Device and admin tokens (JWT), checked the same way for HTTP, WebSocket and
//! MQTT. The algorithm is pinned by config, never read from the token, so
//! `alg: none` and algorithm-confusion tokens fail signature checks. A device
//! token works only while its device is registered and not revoked; the
//! registry is cached in memory and refreshed when any process changes it.

mod crypto;
mod registry;
pub mod secret;

pub use crate::log::schema::Child;
pub use registry::{REGISTRY_POLL, Registry, run_registry_refresh};

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, AuthConfig, Config};

/// A device permission carried in the token's `perms` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Perm {
    WriteEvents,
    ReadEvents,
    ReadConfig,
}

impl Perm {
    /// The claim spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::WriteEvents => "write_events",
            Perm::ReadEvents => "read_events",
            Perm::ReadConfig => "read_config",
        }
    }

    /// Parses a claim spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "write_events" => Some(Perm::WriteEvents),
            "read_events" => Some(Perm::ReadEvents),
            "read_config" => Some(Perm::ReadConfig),
            _ => None,
        }
    }

    /// What a device gets when nothing else is asked for.
    pub const DEFAULT: [Perm; 2] = [Perm::WriteEvents, Perm::ReadEvents];
}

/// Parses permission names, naming the first unknown one.
pub fn parse_perms(perms: &[String]) -> Result<Vec<Perm>, String> {
    perms
        .iter()
        .map(|p| {
            Perm::parse(p)
                .ok_or_else(|| format!("unknown permission {p:?}; known: write_events, read_events, read_config"))
        })
        .collect()
}

/// Parses a token lifetime like "30d" or "12h" (at least one minute).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30d or 12h: {e}"))?;
    if d < Duration::from_secs(60) {
        return Err(format!("{s:?} is shorter than 1m"));
    }
    Ok(d)
}

/// Token claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub perms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    #[serde(default)]
    pub jti: String,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Device { tenant: String, device_id: String, perms: Vec<Perm> },
    Admin,
}

impl Principal {
    /// The device it speaks for; `None` for an admin.
    pub fn device_id(&self) -> Option<&str> {
        match self {
            Principal::Device { device_id, .. } => Some(device_id),
            Principal::Admin => None,
        }
    }
}

/// Why a token was refused, or keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("unknown device {0}")]
    UnknownDevice(String),
    #[error("device {0} is revoked")]
    Revoked(String),
    #[error("token is for tenant {token:?}, not {path:?}")]
    WrongTenant { token: String, path: String },
    #[error("token lacks permission {0}")]
    MissingPermission(&'static str),
    #[error("admin token required")]
    AdminRequired,
    #[error("this appliance cannot issue {0:?} tokens without auth.private_key_file")]
    CannotIssue(Algorithm),
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
}

impl Error {
    /// True for refusals that mean "who are you?" (401) rather than "not allowed" (403).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Error::Missing | Error::Expired | Error::Invalid(_) | Error::UnknownDevice(_) | Error::Revoked(_)
        )
    }
}

/// Why an open session had to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The device was revoked (or is no longer registered).
    Revoked,
    /// The token's `exp` passed.
    Expired,
}

impl SessionEnd {
    /// `revoked` / `token_expired`: the code in error frames.
    pub fn code(self) -> &'static str {
        match self {
            SessionEnd::Revoked => "revoked",
            SessionEnd::Expired => "token_expired",
        }
    }
}

/// A secret login's device, found from its username (`secret_login`).
pub struct SecretLogin {
    pub tenant: String,
    pub device_id: String,
    /// The argon2id PHC string.
    phc: String,
    /// `secret::perms_field`.
    perms: String,
}

/// The refusal of a secret login, whether the device or the secret was wrong.
const WRONG_SECRET: &str = "unknown device or wrong secret";

/// A secret login's username: `<tenant>/<device id>`, or the id alone.
fn split_login(username: &str) -> (Option<&str>, &str) {
    match username.split_once('/') {
        Some((t, d)) => (Some(t), d),
        None => (None, username),
    }
}

/// The "expiry" of a login that has none of its own (a secret, a client
/// certificate): a century on, as far as session timers go.
fn no_expiry() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 100 * 365 * 86_400
}

/// Verifies and issues tokens.
pub struct Authenticator {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    ttl: Duration,
    registry: Arc<Registry>,
    /// Bounds the secret verifications running at once (each holds 19 MiB).
    verifies: Arc<tokio::sync::Semaphore>,
}

fn jwt_alg(a: Algorithm) -> jsonwebtoken::Algorithm {
    match a {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
    }
}

fn key_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Key { path: path.display().to_string(), message: message.into() }
}

/// Reads the HS256 secret, creating it (mode 0600) when absent.
/// Returns the secret and whether it was just created.
pub fn load_or_create_secret(path: &Path) -> Result<(Vec<u8>, bool), Error> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let secret = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
            if secret.len() < 32 {
                return Err(key_err(path, "secret is shorter than 32 bytes"));
            }
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "signing secret is readable by other users; chmod 600 it");
            }
            Ok((secret, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| key_err(path, format!("no randomness: {e}")))?;
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                crate::config::create_private_dir(dir).map_err(|e| key_err(path, e.to_string()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| key_err(path, e.to_string()))?;
            f.write_all(hex.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(|e| key_err(path, e.to_string()))?;
            Ok((hex.into_bytes(), true))
        }
        Err(e) => Err(key_err(path, e.to_string())),
    }
}

impl Authenticator {
    /// Loads keys as configured (creating the HS256 secret on first start).
    /// Returns whether a new secret was created.
    pub fn from_config(config: &Config, registry: Arc<Registry>) -> Result<(Self, bool), Error> {
        crypto::install();
        let a: &AuthConfig = &config.auth;
        let read = |p: &Path| std::fs::read(p).map_err(|e| key_err(p, e.to_string()));
        let (decoding, encoding, created) = match a.algorithm {
            Algorithm::HS256 => {
                let (secret, created) = load_or_create_secret(&config.secret_path())?;
                (DecodingKey::from_secret(&secret), Some(EncodingKey::from_secret(&secret)), created)
            }
            Algorithm::EdDSA | Algorithm::ES256 => {
                let pub_path = a
                    .public_key_file
                    .as_deref()
                    .ok_or_else(|| key_err(Path::new("auth.public_key_file"), "not set"))?;
                let pem = read(pub_path)?;
                let decoding = match a.algorithm {
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => DecodingKey::from_ec_pem(&pem),
                }
                .map_err(|e| key_err(pub_path, e.to_string()))?;
                let encoding = match &a.private_key_file {
                    Some(p) => {
                        let pem = read(p)?;
                        Some(
                            match a.algorithm {
                                Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                                _ => EncodingKey::from_ec_pem(&pem),
                            }
                            .map_err(|e| key_err(p, e.to_string()))?,
                        )
                    }
                    None => None,
                };
                (decoding, encoding, false)
            }
        };
        let mut validation = Validation::new(jwt_alg(a.algorithm));
        validation.leeway = a.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        let verifies = Arc::new(tokio::sync::Semaphore::new(secret::CONCURRENT_VERIFIES));
        Ok((
            Self { algorithm: a.algorithm, decoding, encoding, validation, ttl: a.token_ttl, registry, verifies },
            created,
        ))
    }

    /// The registry this authenticator consults.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Checks signature, expiry and, for devices, registration.
    pub fn verify(&self, token: &str) -> Result<Principal, Error> {
        self.verify_expiring(token).map(|(p, _)| p)
    }

    /// `verify`, also returning the token's `exp` (unix seconds): a session
    /// opened with it ends then (see [`Authenticator::session_end`]).
    pub fn verify_expiring(&self, token: &str) -> Result<(Principal, i64), Error> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => Error::Expired,
            jsonwebtoken::errors::ErrorKind::InvalidSignature => Error::Invalid("bad signature".into()),
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                Error::Invalid(format!("algorithm must be {:?}", self.algorithm))
            }
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) => Error::Invalid(format!("missing claim {c}")),
            _ => Error::Invalid("malformed token".into()),
        })?;
        let c = data.claims;
        if c.role.as_deref() == Some("admin") {
            return Ok((Principal::Admin, c.exp));
        }
        let tenant = c.tenant.ok_or_else(|| Error::Invalid("missing claim tenant".into()))?;
        self.registered(&tenant, &c.sub)?;
        let perms = c.perms.iter().filter_map(|p| Perm::parse(p)).collect();
        Ok((Principal::Device { tenant, device_id: c.sub, perms }, c.exp))
    }

    /// The device a secret login names, with its stored hash: the device
    /// must have a secret and be registered and not revoked. Known before
    /// the (costly) hash, so a caller can charge the device's connect
    /// budget first.
    pub fn secret_login(&self, username: &str) -> Result<SecretLogin, Error> {
        let (tenant, device_id) = split_login(username);
        let (tenant, phc, perms) =
            self.registry.secret(tenant, device_id).ok_or_else(|| Error::Invalid(WRONG_SECRET.into()))?;
        self.registered(&tenant, device_id)?;
        Ok(SecretLogin { tenant, device_id: device_id.to_string(), phc, perms })
    }

    /// A device's logins work only while it is registered and not revoked.
    fn registered(&self, tenant: &str, device_id: &str) -> Result<(), Error> {
        match self.registry.lookup(tenant, device_id) {
            None => Err(Error::UnknownDevice(format!("{tenant}/{device_id}"))),
            Some(true) => Err(Error::Revoked(format!("{tenant}/{device_id}"))),
            Some(false) => Ok(()),
        }
    }

    /// Checks `secret` against a [`SecretLogin`] (`secret::is_secret`):
    /// `username` was `<tenant>/<device id>`, or the device id alone when
    /// one tenant has it. The session it opens has no expiry of its own;
    /// revoking the device ends it (`session_end`).
    pub async fn verify_secret(&self, login: SecretLogin, secret: &str) -> Result<(Principal, i64), Error> {
        let wrong = || Error::Invalid(WRONG_SECRET.into());
        let permit = self.verifies.clone().acquire_owned().await.map_err(|_| wrong())?;
        let (phc, given) = (login.phc, secret.to_string());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            secret::verify(&phc, &given)
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Err(wrong());
        }
        let perms = secret::parse_perms_field(&login.perms);
        Ok((Principal::Device { tenant: login.tenant, device_id: login.device_id, perms }, no_expiry()))
    }

    /// The device a verified client certificate names (`tls::ClientCert`):
    /// it must be registered and not revoked, and gets the default
    /// permissions. Like a secret's, the session has no expiry of its own;
    /// revoking the device ends it (`session_end`).
    pub fn cert_login(&self, tenant: &str, device_id: &str) -> Result<(Principal, i64), Error> {
        self.registered(tenant, device_id)?;
        let principal = Principal::Device {
            tenant: tenant.to_string(),
            device_id: device_id.to_string(),
            perms: Perm::DEFAULT.to_vec(),
        };
        Ok((principal, no_expiry()))
    }

    /// `verify`, then the tenant must match and the permission be held.
    /// Admins pass every tenant and permission check.
    pub fn authorize(&self, token: Option<&str>, tenant: &str, perm: Perm) -> Result<Principal, Error> {
        self.authorize_expiring(token, tenant, perm).map(|(p, _)| p)
    }

    /// `authorize`, also returning the token's `exp`.
    pub fn authorize_expiring(&self, token: Option<&str>, tenant: &str, perm: Perm) -> Result<(Principal, i64), Error> {
        let (p, exp) = self.verify_expiring(token.ok_or(Error::Missing)?)?;
        self.permit(&p, tenant, perm)?;
        Ok((p, exp))
    }

    /// A verified login may act on `tenant` with `perm`: a device only in
    /// its own tenant and with the permission; an admin anywhere.
    pub fn permit(&self, p: &Principal, tenant: &str, perm: Perm) -> Result<(), Error> {
        if let Principal::Device { tenant: t, perms, .. } = p {
            if t != tenant {
                return Err(Error::WrongTenant { token: t.clone(), path: tenant.to_string() });
            }
            if !perms.contains(&perm) {
                return Err(Error::MissingPermission(perm.as_str()));
            }
        }
        Ok(())
    }

    /// Resolves when a session opened by `principal` with a token expiring
    /// at `exp` (unix seconds) must end: the device was revoked (through
    /// this process at once, through the CLI within `REGISTRY_POLL`) or the
    /// token expired. Says which.
    pub async fn session_end(&self, principal: &Principal, exp: i64) -> SessionEnd {
        let mut changes = self.registry.changes();
        loop {
            if let Principal::Device { tenant, device_id, .. } = principal
                && self.registry.lookup(tenant, device_id) != Some(false)
            {
                return SessionEnd::Revoked;
            }
            let left = exp.saturating_sub(time::OffsetDateTime::now_utc().unix_timestamp());
            if left <= 0 {
                return SessionEnd::Expired;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    // The registry is gone (shutdown): only expiry remains.
                    tokio::time::sleep(Duration::from_secs(left.unsigned_abs())).await;
                    return SessionEnd::Expired;
                },
                _ = tokio::time::sleep(Duration::from_secs(left.unsigned_abs())) => return SessionEnd::Expired,
            }
        }
    }

    /// `verify`, then the token must be an admin's.
    pub fn authorize_admin(&self, token: Option<&str>) -> Result<(), Error> {
        match self.verify(token.ok_or(Error::Missing)?)? {
            Principal::Admin => Ok(()),
            Principal::Device { .. } => Err(Error::AdminRequired),
        }
    }

    fn issue(&self, mut claims: Claims, ttl: Option<Duration>) -> Result<String, Error> {
        let key = self.encoding.as_ref().ok_or(Error::CannotIssue(self.algorithm))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let ttl = i64::try_from(ttl.unwrap_or(self.ttl).as_secs()).unwrap_or(i64::MAX / 2);
        claims.iat = now;
        claims.exp = now.saturating_add(ttl);
        claims.jti = uuid::Uuid::new_v4().to_string();
        encode(&Header::new(jwt_alg(self.algorithm)), &claims, key).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// A device token.
    pub fn issue_device(
        &self,
        tenant: &str,
        device_id: &str,
        perms: &[Perm],
        ttl: Option<Duration>,
    ) -> Result<String, Error> {
        self.issue(
            Claims {
                sub: device_id.to_string(),
                tenant: Some(tenant.to_string()),
                perms: perms.iter().map(|p| p.as_str().to_string()).collect(),
                role: None,
                exp: 0,
                iat: 0,
                jti: String::new(),
            },
            ttl,
        )
    }

    /// An admin token.
    pub fn issue_admin(&self, ttl: Option<Duration>) -> Result<String, Error> {
        self.issue(
            Claims {
                sub: "admin".into(),
                tenant: None,
                perms: Vec::new(),
                role: Some("admin".into()),
                exp: 0,
                iat: 0,
                jti: String::new(),
            },
            ttl,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &Path) -> Authenticator {
        let mut c = Config::default();
        c.site.data_dir = dir.to_path_buf();
        let reg = Arc::new(Registry::default());
        reg.set(&crate::log::schema::testing::device("acme", "d1", false));
        reg.set(&crate::log::schema::testing::device("acme", "gone", true));
        Authenticator::from_config(&c, reg).unwrap().0
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let (a, created) = load_or_create_secret(&p).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (b, created) = load_or_create_secret(&p).unwrap();
        assert!(!created);
        assert_eq!(a, b);
    }

    #[test]
    fn device_token_round_trips_and_checks_tenant_and_perm() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t = a.issue_device("acme", "d1", &[Perm::WriteEvents], None).unwrap();
        assert!(a.authorize(Some(&t), "acme", Perm::WriteEvents).is_ok());
        assert!(matches!(a.authorize(Some(&t), "globex", Perm::WriteEvents), Err(Error::WrongTenant { .. })));
        assert!(matches!(a.authorize(Some(&t), "acme", Perm::ReadEvents), Err(Error::MissingPermission(_))));
    }

    #[test]
    fn unknown_and_revoked_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t = a.issue_device("acme", "nobody", &Perm::DEFAULT, None).unwrap();
        assert!(matches!(a.verify(&t), Err(Error::UnknownDevice(_))));
        let t = a.issue_device("acme", "gone", &Perm::DEFAULT, None).unwrap();
        assert!(matches!(a.verify(&t), Err(Error::Revoked(_))));
    }

    #[test]
    fn alg_none_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        // {"alg":"none","typ":"JWT"} . {"sub":"d1","tenant":"acme","perms":["write_events"],"exp":9999999999}
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJkMSIsInRlbmFudCI6ImFjbWUiLCJwZXJtcyI6WyJ3cml0ZV9ldmVudHMiXSwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(matches!(a.verify(t), Err(Error::Invalid(_))));
    }
}

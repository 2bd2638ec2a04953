//! Bytes → `Authenticator::verify` (HS256, the real secret file and registry).
//!
//! First byte picks the mode:
//! - bit 0 clear: the rest is the token string, as sent;
//! - bit 0 set: the rest is claims JSON (or, with bit 1 set, `header\0claims`),
//!   signed with the real secret, so the claim parsing and the registry check
//!   after the signature check are reached.
//!
//! A device principal must always be the one registered device.
#![no_main]

use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use outpost::auth::{Authenticator, Principal, Registry};
use outpost::config::Config;

/// A fixed 64-hex-char secret, as `outpost` writes to `jwt.secret`.
const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("outpost-fuzz-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("jwt.secret"), format!("{SECRET}\n")).expect("write secret");
        let mut config = Config::default();
        config.site.data_dir = dir.clone();
        let registry = Arc::new(Registry::default());
        registry.set(&device("d1", false));
        registry.set(&device("gone", true));
        let (auth, created) = Authenticator::from_config(&config, registry).expect("authenticator");
        assert!(!created, "the fixed secret must be used");
        let _ = std::fs::remove_dir_all(&dir);
        auth
    })
}

/// A registry row of `acme/<id>`, revoked or not.
fn device(id: &str, revoked: bool) -> outpost::log::schema::Device {
    let at = time::OffsetDateTime::UNIX_EPOCH;
    outpost::log::schema::Device {
        tenant: "acme".into(),
        device_id: id.into(),
        name: None,
        created_at: at,
        revoked_at: revoked.then_some(at),
        last_seen: None,
        online: false,
        event_count: 0,
        gateway: false,
        via: None,
    }
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else if mode & 2 != 0 {
        let (h, c) = rest.split_at(rest.iter().position(|b| *b == 0).unwrap_or(rest.len()));
        sign(h, c.get(1..).unwrap_or_default())
    } else {
        sign(HEADER.as_bytes(), rest)
    };
    let auth = auth();
    match auth.verify(&token) {
        Ok(Principal::Device { tenant, device_id, .. }) => {
            assert_eq!(
                (tenant.as_str(), device_id.as_str()),
                ("acme", "d1"),
                "unregistered or revoked device accepted"
            );
        }
        Ok(Principal::Admin) | Err(_) => {}
    }
});

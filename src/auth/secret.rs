//! Per-device secrets (issue #31): a login that fits in firmware. A device
//! token is 283 characters; common MQTT stacks cap the password far below
//! that (ESP-AT: 64 bytes, WiseConnect: 60 with the terminator), and an
//! installer types it into a web form by hand. A secret is at most
//! [`MAX_SECRET`] characters (generated: 24 of `[A-Za-z0-9]`, about 143
//! bits), kept only as an argon2id hash (RustCrypto `argon2`, its default
//! OWASP parameters: 19 MiB, 2 passes).
//!
//! A password of at most [`MAX_SECRET`] characters is a secret; a longer
//! one is a token (a JWT is never that short). Verifying costs tens of
//! milliseconds of CPU and 19 MiB, so at most [`CONCURRENT_VERIFIES`] run at
//! once, off the async workers.

use argon2::Argon2;

use super::Perm;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Longest secret.
pub const MAX_SECRET: usize = 32;
/// Shortest secret accepted when given (`outpost device secret --set`).
pub const MIN_SECRET: usize = 16;
/// Length of a generated secret.
const GENERATED: usize = 24;
/// Secret verifications running at once, at most (each holds 19 MiB).
pub const CONCURRENT_VERIFIES: usize = 2;

/// The permissions a secret grants, as stored beside its hash
/// (comma-separated).
pub fn perms_field(perms: &[Perm]) -> String {
    perms.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

/// [`perms_field`] read back (unknown names are dropped).
pub fn parse_perms_field(field: &str) -> Vec<Perm> {
    field.split(',').filter_map(Perm::parse).collect()
}

/// Whether a password is a secret rather than a token.
pub fn is_secret(password: &str) -> bool {
    password.len() <= MAX_SECRET
}

/// A new secret: [`GENERATED`] characters of `[A-Za-z0-9]`.
pub fn generate() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(GENERATED);
    while out.len() < GENERATED {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b)?;
        // 248 = 4 × 62: bytes at or above it are dropped, so every
        // character is equally likely.
        out.extend(
            b.iter().filter(|x| **x < 248).map(|x| ALPHABET[usize::from(*x % 62)] as char).take(GENERATED - out.len()),
        );
    }
    Ok(out)
}

/// Checks a secret someone chose: [`MIN_SECRET`]-[`MAX_SECRET`] printable
/// ASCII characters without spaces (what a web form and firmware keep as is).
pub fn check(secret: &str) -> Result<(), String> {
    if !(MIN_SECRET..=MAX_SECRET).contains(&secret.len()) {
        return Err(format!("must be {MIN_SECRET}-{MAX_SECRET} characters (it is {})", secret.len()));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("may contain only printable ASCII characters, no spaces".into());
    }
    Ok(())
}

/// The argon2id PHC string of `secret`, with a fresh 16-byte salt.
pub fn hash(secret: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(secret.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `secret` matches the stored PHC string (blocking: tens of ms).
pub fn verify(phc: &str, secret: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(secret.as_bytes(), &h).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_fits_firmware_and_verifies_only_itself() {
        let s = generate().unwrap();
        assert_eq!(s.len(), 24);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(is_secret(&s) && check(&s).is_ok());
        let phc = hash(&s).unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains(&s), "only the hash is kept");
        assert!(verify(&phc, &s));
        assert!(!verify(&phc, &generate().unwrap()));
        assert!(!verify("not a hash", &s));
        assert_ne!(hash(&s).unwrap(), phc, "a fresh salt each time");
    }

    #[test]
    fn a_chosen_secret_is_checked_and_a_token_is_never_taken_for_one() {
        assert!(check("short").unwrap_err().contains("16-32"));
        assert!(check(&"x".repeat(33)).is_err());
        assert!(check("with a space in it!!").is_err());
        assert!(check("Relay-1:kitchen#2026").is_ok());
        assert!(!is_secret(&"t".repeat(283)), "a token is longer than any secret");
    }
}

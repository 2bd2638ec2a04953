//! The signature algorithms jsonwebtoken runs, on `ring` (already linked for
//! rustls): HS256, EdDSA (Ed25519) and ES256 (P-256), the three outpost can
//! be configured with. jsonwebtoken's own RustCrypto provider would link RSA
//! (RUSTSEC-2023-0071) and P-384 for algorithms we never accept; any other
//! algorithm is refused here as well as by the pinned `Validation`.

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::rand::SystemRandom;
use ring::{hmac, signature as sig};
use signature::{Signer, Verifier};

/// The provider; installed once per process by [`install`].
static PROVIDER: CryptoProvider =
    CryptoProvider { signer_factory: signer, verifier_factory: verifier, jwk_utils: JwkUtils::new_unimplemented() };

/// Makes [`PROVIDER`] jsonwebtoken's provider (idempotent).
pub(super) fn install() {
    // Err means it is installed already: by an earlier call, which is fine.
    let _ = PROVIDER.install_default();
}

fn bad_signature() -> signature::Error {
    signature::Error::new()
}

struct Hs256(hmac::Key);

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        // Constant time.
        hmac::verify(&self.0, msg, signature).map_err(|_| bad_signature())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

/// A private key: Ed25519 or ECDSA P-256 (PKCS#8).
enum KeyPair {
    Ed(sig::Ed25519KeyPair),
    Es(sig::EcdsaKeyPair, SystemRandom),
}

impl Signer<Vec<u8>> for KeyPair {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        match self {
            KeyPair::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            KeyPair::Es(k, rng) => k.sign(rng, msg).map(|s| s.as_ref().to_vec()).map_err(|_| bad_signature()),
        }
    }
}

impl JwtSigner for KeyPair {
    fn algorithm(&self) -> Algorithm {
        match self {
            KeyPair::Ed(_) => Algorithm::EdDSA,
            KeyPair::Es(..) => Algorithm::ES256,
        }
    }
}

/// A public key (the raw Ed25519 key or the uncompressed P-256 point).
struct PublicKey {
    algorithm: Algorithm,
    key: Vec<u8>,
}

impl Verifier<Vec<u8>> for PublicKey {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let alg: &dyn sig::VerificationAlgorithm = match self.algorithm {
            Algorithm::EdDSA => &sig::ED25519,
            _ => &sig::ECDSA_P256_SHA256_FIXED,
        };
        sig::UnparsedPublicKey::new(alg, &self.key).verify(msg, signature).map_err(|_| bad_signature())
    }
}

impl JwtVerifier for PublicKey {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Ok(match algorithm {
        Algorithm::HS256 => Box::new(Hs256(hmac::Key::new(hmac::HMAC_SHA256, key.try_get_hmac_secret()?))),
        Algorithm::EdDSA => Box::new(KeyPair::Ed(
            sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.inner()).map_err(|_| ErrorKind::InvalidEddsaKey)?,
        )),
        Algorithm::ES256 => {
            let rng = SystemRandom::new();
            let k = sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, key.inner(), &rng)
                .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
            Box::new(KeyPair::Es(k, rng))
        }
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    })
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    Ok(match algorithm {
        Algorithm::HS256 => Box::new(Hs256(hmac::Key::new(hmac::HMAC_SHA256, key.try_get_hmac_secret()?))),
        Algorithm::EdDSA | Algorithm::ES256 => {
            Box::new(PublicKey { algorithm: *algorithm, key: key.as_bytes().to_vec() })
        }
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    })
}

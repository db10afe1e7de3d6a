//! A stand-in identity provider: an ES256 key made at run time, its JWKS, and tokens it signs.

use anyhow::{anyhow, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

pub struct Idp {
    key: EcdsaKeyPair,
    pub kid: String,
    pub issuer: String,
}

impl Idp {
    pub fn new(issuer: &str, kid: &str) -> Result<Idp> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|e| anyhow!("{e}"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Idp { key, kid: kid.into(), issuer: issuer.into() })
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let point = self.key.public_key().as_ref(); // 0x04 || x || y
        let (x, y) = point.get(1..).unwrap_or_default().split_at(32);
        json!({ "kty": "EC", "crv": "P-256", "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y) })
    }

    /// A token with these claims (iss is added), signed ES256.
    pub fn token(&self, mut claims: Value) -> String {
        claims["iss"] = self.issuer.clone().into();
        let header = json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig =
            self.key.sign(&SystemRandom::new(), input.as_bytes()).map(|s| s.as_ref().to_vec()).unwrap_or_default();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

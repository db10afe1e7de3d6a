//! A stand-in identity provider: a key made at run time (ES256 or RS256), its JWK, and tokens it
//! signs — including the malformed and malicious ones a verifier must refuse.

use anyhow::{anyhow, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};

enum Key {
    /// P-256 (ES256), or P-384 for wrong-curve tests.
    Ec { pair: Box<EcdsaKeyPair>, crv: &'static str },
    /// The key, and the same key in ring for fast signing.
    Rsa(Box<RsaPrivateKey>, Box<ring::signature::RsaKeyPair>),
}

pub struct Idp {
    key: Key,
    pub kid: String,
    pub issuer: String,
}

impl Idp {
    /// An ES256 (P-256) key.
    pub fn new(issuer: &str, kid: &str) -> Result<Idp> {
        Self::ec(issuer, kid, &ECDSA_P256_SHA256_FIXED_SIGNING, "P-256")
    }

    /// A P-384 key (its tokens are ES384, which verifiers here must refuse).
    pub fn p384(issuer: &str, kid: &str) -> Result<Idp> {
        Self::ec(issuer, kid, &ECDSA_P384_SHA384_FIXED_SIGNING, "P-384")
    }

    fn ec(
        issuer: &str,
        kid: &str,
        alg: &'static ring::signature::EcdsaSigningAlgorithm,
        crv: &'static str,
    ) -> Result<Idp> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow!("{e}"))?;
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| anyhow!("{e}"))?;
        Ok(Idp { key: Key::Ec { pair: Box::new(pair), crv }, kid: kid.into(), issuer: issuer.into() })
    }

    /// An RS256 key of 2048 bits, as GitLab's.
    pub fn rs256(issuer: &str, kid: &str) -> Result<Idp> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut seed).map_err(|e| anyhow!("{e}"))?;
        let mut rng = <rand_chacha::ChaCha20Rng as rand_chacha::rand_core::SeedableRng>::from_seed(seed);
        let key = RsaPrivateKey::new(&mut rng, 2048)?;
        let der = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key)?;
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(|e| anyhow!("{e}"))?;
        Ok(Idp { key: Key::Rsa(Box::new(key), Box::new(pair)), kid: kid.into(), issuer: issuer.into() })
    }

    pub fn alg(&self) -> &'static str {
        match &self.key {
            Key::Rsa(..) => "RS256",
            Key::Ec { crv: "P-256", .. } => "ES256",
            Key::Ec { .. } => "ES384",
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Ec { pair, crv } => {
                let point = pair.public_key().as_ref(); // 0x04 || x || y
                let (x, y) = point.get(1..).unwrap_or_default().split_at((point.len() - 1) / 2);
                json!({ "kty": "EC", "crv": crv, "kid": self.kid, "use": "sig", "x": b64(x), "y": b64(y) })
            }
            Key::Rsa(key, _) => {
                let (n, e) = (key.n().to_bytes_be(), key.e().to_bytes_be());
                json!({ "kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": b64(&n), "e": b64(&e) })
            }
        }
    }

    /// A token with these claims (iss is added), signed with this key's algorithm.
    pub fn token(&self, mut claims: Value) -> String {
        claims["iss"] = self.issuer.clone().into();
        self.sign_as(json!({ "alg": self.alg(), "kid": self.kid, "typ": "JWT" }), &claims)
    }

    /// Signs `claims` under any header (whatever its `alg` says) with this key.
    pub fn sign_as(&self, header: Value, claims: &Value) -> String {
        let input = signing_input(&header, claims);
        let sig = match &self.key {
            Key::Ec { pair, .. } => {
                pair.sign(&SystemRandom::new(), input.as_bytes()).map(|s| s.as_ref().to_vec()).unwrap_or_default()
            }
            Key::Rsa(_, pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                match pair.sign(&ring::signature::RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut sig) {
                    Ok(()) => sig,
                    Err(_) => Vec::new(),
                }
            }
        };
        format!("{input}.{}", b64(&sig))
    }

    /// The classic algorithm-confusion forgery: HS256 "signed" with the public key as the secret
    /// (the JWK's `n`, or the EC point, as bytes).
    pub fn hs256_with_public_key(&self, claims: &Value) -> String {
        let secret = match &self.key {
            Key::Rsa(key, _) => key.n().to_bytes_be(),
            Key::Ec { pair, .. } => pair.public_key().as_ref().to_vec(),
        };
        let input = signing_input(&json!({ "alg": "HS256", "kid": self.kid, "typ": "JWT" }), claims);
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret), input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    }
}

/// An unsigned token (`alg: none`).
pub fn unsigned(kid: &str, claims: &Value) -> String {
    format!("{}.", signing_input(&json!({ "alg": "none", "kid": kid, "typ": "JWT" }), claims))
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

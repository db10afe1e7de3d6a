//! JSON Web Tokens: JWKS parsing, signature verification (RS256, ES256) and claims validation.
//!
//! Only asymmetric algorithms exist here, and a key is used only with the algorithm of its own
//! type: `alg: none`, every HS*, PS*, a token whose algorithm does not fit the key's type, or a
//! key whose JWK `alg` says otherwise, is refused before any signature check. That is what
//! prevents algorithm confusion (an HS256 token "signed" with the public key as secret cannot
//! even be expressed). Keys are parsed once, when a JWKS is loaded, never per request.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
#[cfg(not(feature = "native-crypto"))]
use sha2::{Digest, Sha256};

use crate::generic::json::{self, Field, Object, Reader, Value};

use crate::generic::rs256::Rs256Key;
use std::cell::OnceCell;

/// The algorithms a token may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    ES256,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::RS256),
            "ES256" => Some(Alg::ES256),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlg(String),
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("no key fits the token's algorithm")]
    NoKeyForAlg,
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("issuer {0:?} is not accepted")]
    WrongIssuer(String),
    #[error("audience not accepted")]
    WrongAudience,
    #[error("claim `{0}` is missing or invalid")]
    MissingClaim(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("invalid JWKS: {0}")]
    Json(#[from] json::Error),
    #[error("invalid JWKS: key {index} ({kid:?}): {reason}")]
    Key { index: usize, kid: Option<String>, reason: &'static str },
}

#[derive(Debug, Clone)]
// Natively the first field only checks the key (aws-lc verifies).
#[cfg_attr(feature = "native-crypto", allow(dead_code))]
enum KeyMaterial {
    /// RSA with e = 65537, the exponent every JWKS in practice uses (keys with another exponent
    /// are left out as unusable: supporting them would double the module for no real issuer).
    Rsa65537(Rs256Key, NativeKey),
    P256(p256::ecdsa::VerifyingKey, NativeKey),
}

/// The key prepared for aws-lc, which the native build verifies with (well kept, BoringSSL's
/// code, faster than the wasm build's own): parsed once, with its Montgomery constants, not at
/// every verification. Empty in the wasm build.
#[derive(Debug, Clone)]
struct NativeKey {
    #[cfg(feature = "native-crypto")]
    key: aws_lc_rs::signature::ParsedPublicKey,
}

impl NativeKey {
    /// RSA with e = 65537, from its big-endian modulus.
    #[cfg_attr(not(feature = "native-crypto"), allow(unused_variables))]
    fn rsa(n: &[u8]) -> Option<Self> {
        #[cfg(feature = "native-crypto")]
        {
            use aws_lc_rs::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};
            let components = RsaPublicKeyComponents { n, e: &[1u8, 0, 1][..] };
            components.to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256).ok().map(|key| NativeKey { key })
        }
        #[cfg(not(feature = "native-crypto"))]
        Some(NativeKey {})
    }

    /// P-256, from its uncompressed point (0x04 ‖ x ‖ y).
    #[cfg_attr(not(feature = "native-crypto"), allow(unused_variables))]
    fn p256(point: &[u8]) -> Option<Self> {
        #[cfg(feature = "native-crypto")]
        {
            use aws_lc_rs::signature::{ParsedPublicKey, ECDSA_P256_SHA256_FIXED};
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).ok().map(|key| NativeKey { key })
        }
        #[cfg(not(feature = "native-crypto"))]
        Some(NativeKey {})
    }
}

impl KeyMaterial {
    fn alg(&self) -> Alg {
        match self {
            KeyMaterial::Rsa65537(..) => Alg::RS256,
            KeyMaterial::P256(..) => Alg::ES256,
        }
    }

    /// Checks a signature over `input` (`digest`: its SHA-256, computed once for every key tried).
    #[cfg(not(feature = "native-crypto"))]
    fn verify(&self, input: &[u8], digest: &OnceCell<[u8; 32]>, signature: &[u8]) -> bool {
        let digest = digest.get_or_init(|| Sha256::digest(input).into());
        match self {
            KeyMaterial::Rsa65537(key, _) => key.verify(digest, signature),
            KeyMaterial::P256(key, _) => verify_es256(key, digest, signature),
        }
    }

    #[cfg(feature = "native-crypto")]
    fn verify(&self, input: &[u8], _digest: &OnceCell<[u8; 32]>, signature: &[u8]) -> bool {
        match self {
            KeyMaterial::Rsa65537(_, native) | KeyMaterial::P256(_, native) => {
                native.key.verify_sig(input, signature).is_ok()
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    key: KeyMaterial,
}

impl Jwk {
    /// Checks a signature over `input` with this key, by its own algorithm (RS256 for an RSA key,
    /// ES256, r ‖ s, for a P-256 key): the check a token's signature gets, for any bytes.
    pub fn verify(&self, input: &[u8], signature: &[u8]) -> bool {
        self.key.verify(input, &OnceCell::new(), signature)
    }
}

/// The usable signing keys of a JWKS. Keys of other types (symmetric `oct`, other curves) and
/// keys not meant for signatures are left out, so they can never verify anything.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

/// A JWK as written (RFC 7517; members this module does not use are skipped).
#[derive(Default)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// `{"keys": [JWK, ...]}`.
#[inline(never)] // see `crate::generic::json`
fn read_jwks(json: &[u8]) -> Result<Vec<RawJwk>, json::Error> {
    let mut keys = None;
    let mut r = Reader::new(json);
    r.object(&Field::Root, |r, name| {
        let at = Field::Root.key(&name);
        if name != "keys" {
            return r.skip(&at);
        }
        let mut list = Vec::new();
        r.array(&at, |r, i| {
            let at = at.index(i);
            let mut k = RawJwk::default();
            let mut kty = None;
            r.object(&at, |r, name| {
                let field = at.key(&name);
                let slot = match &*name {
                    "kty" => &mut kty,
                    "kid" => &mut k.kid,
                    "alg" => &mut k.alg,
                    "use" => &mut k.use_,
                    "n" => &mut k.n,
                    "e" => &mut k.e,
                    "crv" => &mut k.crv,
                    "x" => &mut k.x,
                    "y" => &mut k.y,
                    _ => return r.skip(&field),
                };
                *slot = r.opt_string(&field)?;
                Ok(())
            })?;
            k.kty = kty.ok_or_else(|| at.key("kty").missing())?;
            list.push(k);
            Ok(())
        })?;
        keys = Some(list);
        Ok(())
    })?;
    r.end()?;
    keys.ok_or_else(|| Field::Root.key("keys").missing())
}

const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

impl Jwks {
    /// Parses a JWKS document. A usable key that is malformed is an error (the whole document is
    /// refused, so that a broken rotation never replaces good keys); unusable keys are skipped.
    #[inline(never)] // see `crate::generic::json`
    pub fn from_json(json: &[u8]) -> Result<Jwks, JwksError> {
        let raw = read_jwks(json)?;
        let mut keys = Vec::with_capacity(raw.len());
        for (index, k) in raw.into_iter().enumerate() {
            let bad = |reason| JwksError::Key { index, kid: k.kid.clone(), reason };
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.crv.as_deref()) {
                ("RSA", _) => {
                    let n = b64(k.n.as_deref()).ok_or_else(|| bad("n is missing or not base64url"))?;
                    let e = b64(k.e.as_deref()).ok_or_else(|| bad("e is missing or not base64url"))?;
                    let small_e = if e.len() <= 8 { e.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64) } else { 0 };
                    let n = n.get(n.iter().take_while(|b| **b == 0).count()..).unwrap_or_default();
                    if n.len() * 8 > MAX_RSA_BITS {
                        return Err(bad("RSA keys may have at most 8192 bits"));
                    }
                    match Rs256Key::new(n, small_e) {
                        Some(key) if key.bits() < MIN_RSA_BITS => {
                            return Err(bad("RSA keys must have at least 2048 bits"))
                        }
                        Some(key) => KeyMaterial::Rsa65537(
                            key,
                            NativeKey::rsa(n).ok_or_else(|| bad("not a valid RSA public key"))?,
                        ),
                        None if small_e == 65537 => return Err(bad("not a valid RSA public key")),
                        None => continue,
                    }
                }
                ("EC", Some("P-256")) => {
                    let x = b64(k.x.as_deref())
                        .filter(|v| v.len() == 32)
                        .ok_or_else(|| bad("x must be 32 bytes of base64url"))?;
                    let y = b64(k.y.as_deref())
                        .filter(|v| v.len() == 32)
                        .ok_or_else(|| bad("y must be 32 bytes of base64url"))?;
                    let point =
                        p256::EncodedPoint::from_affine_coordinates(x.as_slice().into(), y.as_slice().into(), false);
                    KeyMaterial::P256(
                        p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                            .map_err(|_| bad("not a point on P-256"))?,
                        NativeKey::p256(point.as_bytes()).ok_or_else(|| bad("not a point on P-256"))?,
                    )
                }
                _ => continue,
            };
            // A key pinned to another algorithm is never used for this one.
            if let Some(alg) = k.alg.as_deref() {
                if Alg::parse(alg) != Some(key.alg()) {
                    continue;
                }
            }
            keys.push(Jwk { kid: k.kid, key });
        }
        Ok(Jwks { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The usable keys, in the document's order.
    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }
}

fn b64(s: Option<&str>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s?).ok()
}

struct Header {
    alg: String,
    kid: Option<String>,
    /// Critical extensions (RFC 7515 4.1.11): none is understood here.
    crit: bool,
}

impl Header {
    #[inline(never)]
    fn read(json: &[u8]) -> Option<Header> {
        let (mut alg, mut kid, mut crit) = (None, None, false);
        let mut r = Reader::new(json);
        r.object(&Field::Root, |r, name| {
            let at = Field::Root.key(&name);
            match &*name {
                "alg" => alg = Some(r.string(&at)?),
                "kid" => kid = r.opt_string(&at)?,
                "crit" => {
                    crit = !r.null();
                    if crit {
                        r.skip(&at)?;
                    }
                }
                _ => r.skip(&at)?,
            }
            Ok::<_, json::Error>(())
        })
        .ok()?;
        r.end().ok()?;
        Some(Header { alg: alg?, kid, crit })
    }
}

/// The token's payload: a JSON object.
#[inline(never)]
fn read_claims(json: &[u8]) -> Option<Object> {
    let mut r = Reader::new(json);
    let Value::Object(claims) = r.value(&Field::Root).ok()? else {
        return None;
    };
    r.end().ok()?;
    Some(claims)
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Object,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Unverified<'a> {
    /// Splits and decodes a compact JWS. Refuses anything but RS256 and ES256 here, before any key
    /// is looked at.
    #[inline(never)]
    pub fn parse(token: &'a str) -> Result<Unverified<'a>, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed("expected three dot-separated parts"));
        };
        let header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| Header::read(&b))
            .ok_or(JwtError::Malformed("header is not base64url JSON"))?;
        if header.crit {
            return Err(JwtError::Malformed("critical header extensions are not supported"));
        }
        let alg = Alg::parse(&header.alg).ok_or_else(|| JwtError::UnsupportedAlg(header.alg.clone()))?;
        let claims = URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| read_claims(&b))
            .ok_or(JwtError::Malformed("payload is not a base64url JSON object"))?;
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed("signature is not base64url"))?;
        let signing_input = token.get(..h.len() + 1 + p.len()).ok_or(JwtError::Malformed("token"))?;
        Ok(Unverified { alg, kid: header.kid, claims, signing_input, signature })
    }

    /// The `iss` claim, unverified: only for choosing whose keys to verify with.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Checks the signature with the key the token names (or, without `kid`, any key of the
    /// right type) and returns the claims.
    #[inline(never)]
    pub fn verify(self, jwks: &Jwks) -> Result<Object, JwtError> {
        let mut candidates = jwks.keys.iter().filter(|k| self.kid.is_none() || k.kid == self.kid).peekable();
        if candidates.peek().is_none() {
            return Err(match self.kid {
                Some(kid) => JwtError::UnknownKid(kid),
                None => JwtError::NoKeyForAlg,
            });
        }
        let mut fitting = candidates.filter(|k| k.key.alg() == self.alg).peekable();
        if fitting.peek().is_none() {
            return Err(JwtError::NoKeyForAlg);
        }
        let digest = OnceCell::new();
        let input = self.signing_input.as_bytes();
        let ok = fitting.any(|k| k.key.verify(input, &digest, &self.signature));
        if ok {
            Ok(self.claims)
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

/// ES256 on the SHA-256 digest `verify` already has. Its own function: inlined, the elliptic
/// curve code made `verify`'s closure the largest function of the modules that verify tokens.
#[inline(never)]
#[cfg(not(feature = "native-crypto"))]
fn verify_es256(key: &p256::ecdsa::VerifyingKey, digest: &[u8; 32], signature: &[u8]) -> bool {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    p256::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify_prehash(digest, &sig).is_ok())
}

/// What verified claims must satisfy.
#[derive(Debug, Clone)]
pub struct Validation {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    /// Clock skew tolerated on exp, nbf and iat, in seconds.
    pub leeway: u64,
    /// Claims that must be present (exp always is).
    pub required: Vec<String>,
}

impl Validation {
    pub fn check(&self, claims: &Object, now: u64) -> Result<(), JwtError> {
        let time = |name: &str| -> Result<Option<u64>, JwtError> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|t| *t >= 0.0)
                    .map(|t| Some(t as u64))
                    .ok_or_else(|| JwtError::MissingClaim(name.into())),
            }
        };
        let exp = time("exp")?.ok_or_else(|| JwtError::MissingClaim("exp".into()))?;
        if now >= exp.saturating_add(self.leeway) {
            return Err(JwtError::Expired);
        }
        if time("nbf")?.is_some_and(|nbf| nbf > now.saturating_add(self.leeway)) {
            return Err(JwtError::NotYetValid);
        }
        if time("iat")?.is_some_and(|iat| iat > now.saturating_add(self.leeway)) {
            return Err(JwtError::IssuedInFuture);
        }
        let iss = claims.get("iss").and_then(Value::as_str).ok_or_else(|| JwtError::MissingClaim("iss".into()))?;
        if !self.issuers.iter().any(|i| i == iss) {
            return Err(JwtError::WrongIssuer(iss.into()));
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.audiences.contains(a),
            Some(Value::Array(list)) => {
                list.iter().filter_map(Value::as_str).any(|a| self.audiences.iter().any(|x| x == a))
            }
            _ => false,
        };
        if !audience_ok {
            return Err(JwtError::WrongAudience);
        }
        if let Some(missing) = self.required.iter().find(|c| claims.get(c.as_str()).is_none_or(Value::is_null)) {
            return Err(JwtError::MissingClaim(missing.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use rand_chacha::rand_core::SeedableRng;
    use rsa::traits::PublicKeyParts;
    use rsa::Pkcs1v15Sign;
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::sync::OnceLock;

    fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(seed)
    }

    /// One RSA key for all tests: generating 2048-bit keys is slow, above all as wasm.
    fn rsa_key() -> &'static rsa::RsaPrivateKey {
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rng(1), 2048).unwrap())
    }

    fn ec_key(seed: u64) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::random(&mut rng(seed))
    }

    fn enc(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn rsa_jwk(kid: &str, alg: Option<&str>) -> Value {
        let k = rsa_key().to_public_key();
        let mut v = serde_json::json!({"kty":"RSA","kid":kid,"use":"sig","n":enc(&k.n().to_bytes_be()),"e":enc(&k.e().to_bytes_be())});
        if let Some(alg) = alg {
            v["alg"] = alg.into();
        }
        v
    }

    fn ec_jwk(kid: &str, key: &p256::ecdsa::SigningKey) -> Value {
        let point = key.verifying_key().to_encoded_point(false);
        serde_json::json!({"kty":"EC","crv":"P-256","kid":kid,"x":enc(point.x().unwrap()),"y":enc(point.y().unwrap())})
    }

    fn jwks(keys: Vec<Value>) -> Jwks {
        Jwks::from_json(serde_json::json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn claims(now: u64) -> Value {
        serde_json::json!({"iss":"https://gitlab.com","aud":"gitlab-ai-gateway","sub":"instance-1","exp":now+600,"iat":now,"nbf":now,"scopes":["code_suggestions"]})
    }

    fn token(header: Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", enc(header.to_string().as_bytes()), enc(claims.to_string().as_bytes()));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", enc(&sig))
    }

    fn rs256(input: &[u8]) -> Vec<u8> {
        rsa_key().sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input)).unwrap()
    }

    fn es256(key: &p256::ecdsa::SigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        move |input| {
            let sig: p256::ecdsa::Signature = key.sign(input);
            sig.to_bytes().to_vec()
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn validation() -> Validation {
        Validation {
            issuers: vec!["https://gitlab.com".into()],
            audiences: vec!["gitlab-ai-gateway".into()],
            leeway: 30,
            required: vec!["sub".into()],
        }
    }

    fn verify(token: &str, keys: &Jwks) -> Result<Value, JwtError> {
        let claims = Unverified::parse(token)?.verify(keys)?;
        validation().check(&claims, NOW)?;
        Ok(json::Value::Object(claims).to_serde())
    }

    #[test]
    fn documents_are_read_strictly_where_it_matters() {
        // JWKS: members this module does not use, of any type, are skipped; a used one of the
        // wrong type, or no `keys`, refuses the document.
        let mut k = rsa_jwk("r1", None);
        k["x5c"] = serde_json::json!(["MIIB", {"nested": [1, 2.5e3, null, true]}]);
        let doc = serde_json::json!({"keys": [k, {"kty": "oct", "k": "c2VjcmV0"}], "extra": {"a": 1}}).to_string();
        assert_eq!(Jwks::from_json(doc.as_bytes()).unwrap().len(), 1);
        for bad in [r#"{"keys":[{"kty":"RSA","kid":5}]}"#, r#"{"keys":[{"kid":"a"}]}"#, r#"{"other":[]}"#, "[]"] {
            assert!(matches!(Jwks::from_json(bad.as_bytes()), Err(JwksError::Json(_))), "{bad}");
        }
        // Tokens: a duplicated claim, a payload that is not an object, a header without alg.
        let keys = jwks(vec![rsa_jwk("r1", None)]);
        let raw = |header: &str, payload: &str| {
            let input = format!("{}.{}", enc(header.as_bytes()), enc(payload.as_bytes()));
            let sig = rs256(input.as_bytes());
            format!("{input}.{}", enc(&sig))
        };
        let good = claims(NOW).to_string();
        assert!(verify(&raw(r#"{"alg":"RS256","kid":"r1"}"#, &good), &keys).is_ok());
        let dup = good.replacen('{', r#"{"sub":"admin","#, 1);
        let cases = [
            (raw(r#"{"alg":"RS256","kid":"r1"}"#, &dup), "payload"),
            (raw(r#"{"alg":"RS256","kid":"r1"}"#, "[1]"), "payload"),
            (raw(r#"{"kid":"r1"}"#, &good), "header"),
            (raw(r#"{"alg":"RS256","alg":"RS256"}"#, &good), "header"),
            (raw(r#"{"alg":"RS256","crit":["exp"]}"#, &good), "critical"),
        ];
        for (t, want) in cases {
            let err = verify(&t, &keys).unwrap_err().to_string();
            assert!(err.contains(want), "{t}: {err}");
        }
    }

    #[test]
    fn rs256_and_es256_tokens_verify() {
        let ec = ec_key(2);
        let keys = jwks(vec![rsa_jwk("r1", Some("RS256")), ec_jwk("e1", &ec)]);
        assert_eq!(keys.len(), 2);
        let t = token(serde_json::json!({"alg":"RS256","kid":"r1","typ":"JWT"}), &claims(NOW), rs256);
        assert_eq!(verify(&t, &keys).unwrap()["sub"], "instance-1");
        let t = token(serde_json::json!({"alg":"ES256","kid":"e1"}), &claims(NOW), es256(&ec));
        assert_eq!(verify(&t, &keys).unwrap()["scopes"][0], "code_suggestions");
        // Without a kid, any key of the right type is tried.
        let t = token(serde_json::json!({"alg":"ES256"}), &claims(NOW), es256(&ec));
        assert!(verify(&t, &keys).is_ok());
    }

    #[test]
    fn algorithm_confusion_and_forgery_are_refused() {
        let ec = ec_key(3);
        let keys = jwks(vec![rsa_jwk("r1", None), ec_jwk("e1", &ec)]);
        let c = claims(NOW);
        let public_n = rsa_key().to_public_key().n().to_bytes_be();
        let cases: Vec<(String, JwtError)> = vec![
            (
                token(serde_json::json!({"alg":"none","kid":"r1"}), &c, |_| vec![]),
                JwtError::UnsupportedAlg("none".into()),
            ),
            (
                token(serde_json::json!({"alg":"HS256","kid":"r1"}), &c, |_| public_n.clone()),
                JwtError::UnsupportedAlg("HS256".into()),
            ),
            (token(serde_json::json!({"alg":"PS256","kid":"r1"}), &c, rs256), JwtError::UnsupportedAlg("PS256".into())),
            // ES256 named on an RSA key, RS256 on an EC key.
            (token(serde_json::json!({"alg":"ES256","kid":"r1"}), &c, es256(&ec)), JwtError::NoKeyForAlg),
            (token(serde_json::json!({"alg":"RS256","kid":"e1"}), &c, rs256), JwtError::NoKeyForAlg),
            // Signed by another EC key, or with the payload changed after signing.
            (token(serde_json::json!({"alg":"ES256","kid":"e1"}), &c, es256(&ec_key(4))), JwtError::BadSignature),
            (token(serde_json::json!({"alg":"RS256","kid":"nope"}), &c, rs256), JwtError::UnknownKid("nope".into())),
            (
                token(serde_json::json!({"alg":"RS256","kid":"r1","crit":["x"]}), &c, rs256),
                JwtError::Malformed("critical header extensions are not supported"),
            ),
        ];
        for (t, want) in cases {
            assert_eq!(verify(&t, &keys).unwrap_err(), want, "{t}");
        }
        let good = token(serde_json::json!({"alg":"RS256","kid":"r1"}), &c, rs256);
        let parts: Vec<&str> = good.split('.').collect();
        let mut forged_claims = c.clone();
        forged_claims["sub"] = "someone-else".into();
        let forged = format!("{}.{}.{}", parts[0], enc(forged_claims.to_string().as_bytes()), parts[2]);
        assert_eq!(verify(&forged, &keys).unwrap_err(), JwtError::BadSignature);
        for bad in ["", "a.b", "a.b.c.d", "!!!.e30.", &format!("{}.!!!.{}", parts[0], parts[2])] {
            assert!(matches!(verify(bad, &keys), Err(JwtError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn keys_pinned_to_another_algorithm_or_use_are_never_used() {
        let keys = jwks(vec![
            rsa_jwk("r1", Some("RS512")),
            serde_json::json!({"kty":"oct","kid":"h1","k":"c2VjcmV0"}),
            serde_json::json!({"kty":"EC","crv":"P-384","kid":"p384","x":"AA","y":"AA"}),
            {
                let mut k = rsa_jwk("enc", None);
                k["use"] = "enc".into();
                k
            },
            {
                // e = 3: no issuer uses it, and only e = 65537 is implemented.
                let mut k = rsa_jwk("e3", None);
                k["e"] = "Aw".into();
                k
            },
        ]);
        assert!(keys.is_empty(), "{keys:?}");
        let t = token(serde_json::json!({"alg":"RS256","kid":"r1"}), &claims(NOW), rs256);
        assert_eq!(verify(&t, &keys).unwrap_err(), JwtError::UnknownKid("r1".into()));
    }

    #[test]
    fn malformed_jwks_are_refused_whole() {
        let short = rsa::RsaPrivateKey::new(&mut rng(5), 1024).unwrap().to_public_key();
        let cases = [
            serde_json::json!({"keys":[{"kty":"RSA","kid":"a","n":"!!","e":"AQAB"}]}),
            serde_json::json!({"keys":[{"kty":"RSA","kid":"a","e":"AQAB"}]}),
            serde_json::json!({"keys":[{"kty":"RSA","kid":"short","n":enc(&short.n().to_bytes_be()),"e":"AQAB"}]}),
            serde_json::json!({"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":enc(&[1; 32]),"y":enc(&[2; 32])}]}),
            serde_json::json!({"nokeys":[]}),
        ];
        for doc in cases {
            assert!(Jwks::from_json(doc.to_string().as_bytes()).is_err(), "{doc}");
        }
    }

    #[test]
    fn claims_are_validated_with_leeway() {
        let keys = jwks(vec![rsa_jwk("r1", None)]);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims(NOW);
            f(&mut c);
            verify(&token(serde_json::json!({"alg":"RS256","kid":"r1"}), &c, rs256), &keys)
        };
        assert!(with(&|c| c["exp"] = (NOW - 10).into()).is_ok(), "expired within the leeway");
        assert_eq!(with(&|c| c["exp"] = (NOW - 30).into()).unwrap_err(), JwtError::Expired);
        assert_eq!(with(&|c| c["nbf"] = (NOW + 31).into()).unwrap_err(), JwtError::NotYetValid);
        assert!(with(&|c| c["nbf"] = (NOW + 30).into()).is_ok());
        assert_eq!(with(&|c| c["iat"] = (NOW + 100).into()).unwrap_err(), JwtError::IssuedInFuture);
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })
            .unwrap_err(),
            JwtError::MissingClaim("exp".into())
        );
        assert_eq!(with(&|c| c["exp"] = "soon".into()).unwrap_err(), JwtError::MissingClaim("exp".into()));
        assert_eq!(
            with(&|c| c["iss"] = "https://evil.example".into()).unwrap_err(),
            JwtError::WrongIssuer("https://evil.example".into())
        );
        assert_eq!(with(&|c| c["aud"] = "other".into()).unwrap_err(), JwtError::WrongAudience);
        assert!(with(&|c| c["aud"] = serde_json::json!(["other", "gitlab-ai-gateway"])).is_ok());
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            })
            .unwrap_err(),
            JwtError::WrongAudience
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            })
            .unwrap_err(),
            JwtError::MissingClaim("sub".into())
        );
    }

    #[test]
    fn the_unverified_issuer_is_readable_for_key_selection() {
        let t = token(serde_json::json!({"alg":"RS256","kid":"r1"}), &claims(NOW), rs256);
        let u = Unverified::parse(&t).unwrap();
        assert_eq!((u.issuer(), u.alg, u.kid.as_deref()), (Some("https://gitlab.com"), Alg::RS256, Some("r1")));
    }
}

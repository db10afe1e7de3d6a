//! Tokens and the documents keys come in: JWTs verified against a fixed key set, JWKS, OpenID
//! discovery documents.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use serde_json::Value as Serde;
use sha2::{Digest, Sha256};

use super::json::{json_differential, out_of_range, strict, to_serde};
use super::shown;
use crate::generic::auth::keys;
use crate::generic::json::Value;
use crate::generic::jwt::{Alg, Jwks, Unverified, Validation};

/// The keys tokens are verified with: RSA (`rsa-1`, pinned to RS256) and P-256 (`ec-1`, and one
/// without a kid). Their private halves signed the tokens of `fuzz/corpus/jwt/` and were thrown
/// away.
pub const FIXED_JWKS: &str = concat!(
    r#"{"keys":[{"kty":"RSA","kid":"rsa-1","use":"sig","alg":"RS256","e":"AQAB","n":""#,
    "uTyqmQrwdXWnYKEHloA9FdrGM6r7cKvCXENYlnP4wvCPXfbUXXXQ1_c-Ceojwx1aVSzEOQAXCTIpD7oWU3Fuff7WefHEAXhWBvoH",
    "CUGNRW1ZTxrsl5I72aMfGB-t1ioheiItGVuh9DQnU1g4gGhR4F3NP00C5rs3A34-vqPJI0DTcw1nuLAfJkME6jeIC11JAzHp95Tt",
    "ft3ghY3MevgjAWixAgTNfZpIjl2BL9_p5XLcfYBI3pRvkT5h3HeuZXXzoLgZX2UbkI5U1QFPnlMsf6tr6HSqYcDPPbePiJx93d6n",
    "S3AgH6R049FFtEHEpg1IbA4hfS1KDk8D-b0NzaJbVQ",
    r#""},"#,
    r#"{"kty":"EC","crv":"P-256","kid":"ec-1","#,
    r#""x":"Ap0jEhkDmba2umd29caeSbkY-wQJ_HyV9EvLPex_3tw","y":"Bmr3dxv8R9QjJLMFelaprE7HvLni91hFESN-WT4GKpk"},"#,
    r#"{"kty":"EC","crv":"P-256","#,
    r#""x":"IuDt_Z0FQ0pE_SoVVmMZvhM54ro6D28mgx4-RvuZ6ug","y":"hYaIkhyAp9i0DqNooP-9sQOLmx9F1MfGBshO4oyQRbY"}"#,
    "]}"
);

/// The issuer discovery documents are read for.
const ISSUER: &str = "https://gitlab.com";
/// The time claims are validated at.
const NOW: u64 = 1_800_000_000;

/// A key of `FIXED_JWKS` as the reference crates hold it.
struct Reference {
    kid: Option<String>,
    key: ReferenceKey,
}

enum ReferenceKey {
    Rsa(RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl Reference {
    fn alg(&self) -> Alg {
        match self.key {
            ReferenceKey::Rsa(_) => Alg::RS256,
            ReferenceKey::P256(_) => Alg::ES256,
        }
    }

    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            ReferenceKey::Rsa(key) => {
                key.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input), signature).is_ok()
            }
            ReferenceKey::P256(key) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify(input, &signature).is_ok()),
        }
    }
}

/// `FIXED_JWKS` read by `crate::generic::jwt`, and by serde_json into the reference crates' keys.
fn fixed() -> &'static (Jwks, Vec<Reference>) {
    static KEYS: OnceLock<(Jwks, Vec<Reference>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let jwks = Jwks::from_json(FIXED_JWKS.as_bytes()).expect("FIXED_JWKS is a valid JWKS");
        let doc: Serde = serde_json::from_str(FIXED_JWKS).expect("FIXED_JWKS is JSON");
        let member = |k: &Serde, name: &str| {
            let text = k.get(name).and_then(Serde::as_str).expect("a member of FIXED_JWKS");
            URL_SAFE_NO_PAD.decode(text).expect("base64url in FIXED_JWKS")
        };
        let references = doc
            .get("keys")
            .and_then(Serde::as_array)
            .into_iter()
            .flatten()
            .map(|k| {
                let key = if k.get("kty").and_then(Serde::as_str) == Some("RSA") {
                    let (n, e) = (BigUint::from_bytes_be(&member(k, "n")), BigUint::from_bytes_be(&member(k, "e")));
                    ReferenceKey::Rsa(RsaPublicKey::new(n, e).expect("an RSA key"))
                } else {
                    let mut point = vec![4];
                    point.extend(member(k, "x"));
                    point.extend(member(k, "y"));
                    ReferenceKey::P256(p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("a P-256 key"))
                };
                Reference { kid: k.get("kid").and_then(Serde::as_str).map(String::from), key }
            })
            .collect();
        (jwks, references)
    })
}

/// A token: `Unverified::parse` reads its header and claims as serde_json does, and `verify`
/// with `FIXED_JWKS` succeeds exactly when the `rsa` or `p256` crate verifies the signature with
/// a key the token may use (its kid, or any without one; the key's type fits `alg`).
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Unverified::parse(token) else {
        return;
    };
    let [header, payload, signature] = *token.split('.').collect::<Vec<_>>().as_slice() else {
        panic!("{token:?} parsed, but it is not three parts");
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).expect("a part the token parsed from is base64url");
    let alg = match parsed.alg {
        Alg::RS256 => "RS256",
        Alg::ES256 => "ES256",
    };
    match strict(&decode(header)) {
        Ok(h) => {
            assert_eq!(h.get("alg").and_then(Serde::as_str), Some(alg), "{token:?}: alg");
            assert!(h.get("kid").is_none_or(|k| k.is_null() || k.is_string()), "{token:?}: kid");
            assert_eq!(h.get("kid").and_then(Serde::as_str), parsed.kid.as_deref(), "{token:?}: kid");
            assert!(h.get("crit").is_none_or(Serde::is_null), "{token:?}: crit");
        }
        Err(e) => assert!(out_of_range(&e), "{token:?}: the header is not JSON to serde_json: {e}"),
    }
    let claims = decode(payload);
    json_differential(&claims);
    if let Ok(theirs) = strict(&claims) {
        assert_eq!(to_serde(&Value::Object(parsed.claims.clone())), theirs, "{token:?}: claims");
    }

    let (input, _) = token.rsplit_once('.').expect("three parts");
    let signature = decode(signature);
    let (jwks, references) = fixed();
    let expected = references
        .iter()
        .filter(|r| parsed.kid.is_none() || r.kid == parsed.kid)
        .filter(|r| r.alg() == parsed.alg)
        .any(|r| r.verifies(input.as_bytes(), &signature));
    let _ = parsed.issuer();
    let verified = parsed.verify(jwks);
    assert_eq!(verified.is_ok(), expected, "{token:?}: verified {verified:?}, the reference says {expected}");
    if let Ok(claims) = verified {
        let validation = Validation {
            issuers: vec![ISSUER.into()],
            audiences: vec!["gitlab-ai-gateway".into()],
            leeway: 30,
            required: vec!["sub".into()],
        };
        let _ = validation.check(&claims, NOW);
    }
}

/// A JWKS document: what `Jwks::from_json` accepts is JSON with a `keys` array, and the keys it
/// keeps are some of those, in order; none verifies an empty or all-zero signature.
pub fn jwks(doc: &[u8]) {
    let Ok(jwks) = Jwks::from_json(doc) else {
        return;
    };
    match strict(doc) {
        Ok(theirs) => {
            let listed = theirs.get("keys").and_then(Serde::as_array).expect("a JWKS accepted has a keys array");
            let mut listed = listed.iter().map(|k| k.get("kid").and_then(Serde::as_str));
            for key in jwks.keys() {
                assert!(listed.any(|kid| kid == key.kid.as_deref()), "{}: key {:?} out of order", shown(doc), key.kid);
            }
        }
        Err(e) => assert!(out_of_range(&e), "{}: accepted, serde_json says {e}", shown(doc)),
    }
    for key in jwks.keys() {
        for len in [0, 64, 256, 512] {
            assert!(!key.verify(b"input", &vec![0; len]), "{}: a zero signature of {len} bytes verifies", shown(doc));
        }
    }
}

/// An OpenID discovery document: `jwks_uri` accepts one for `ISSUER` whose `jwks_uri` is https
/// and splits it into a host-and-port authority and a visible-ASCII path; `max_age` reads any
/// text.
pub fn discovery(doc: &[u8]) {
    let _ = keys::max_age(&String::from_utf8_lossy(doc));
    let Ok((authority, path)) = keys::jwks_uri(doc, ISSUER) else {
        return;
    };
    let host_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']');
    assert!(!authority.is_empty() && authority.bytes().all(host_char), "{}: authority {authority:?}", shown(doc));
    assert!(path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()), "{}: path {path:?}", shown(doc));
    match strict(doc) {
        Ok(theirs) => {
            assert_eq!(theirs.get("issuer").and_then(Serde::as_str), Some(ISSUER), "{}", shown(doc));
            let uri = theirs.get("jwks_uri").and_then(Serde::as_str).expect("a jwks_uri");
            // What was read is the URI, less a fragment, with a `/` before a bare query or
            // nothing.
            let uri = uri.split_once('#').map_or(uri, |(before, _)| before);
            let written = format!("https://{authority}{path}");
            let bare = format!("https://{authority}{}", path.strip_prefix('/').unwrap_or(&path));
            assert!(uri == written || uri == bare, "{uri:?} -> {written:?}");
        }
        Err(e) => assert!(out_of_range(&e), "{}: accepted, serde_json says {e}", shown(doc)),
    }
}

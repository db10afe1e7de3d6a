//! Mesh identity propagation (GEP-3792): the out-of-cluster gateway authenticates the end user
//! and forwards the user's identity in headers; the mesh sidecar keeps those headers only when
//! the mTLS peer is an allowed gateway identity, so a workload can trust them exactly when the
//! gateway vouched for them.
//!
//! One filter, two roles, chosen by `"role"` in the configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::generic::json::Value;
use serde::Deserialize;

use crate::generic::auth::{bearer, check_token_cache_size, default_token_cache_size, Expiring, TokenCache};
use crate::generic::config::ConfigError;
use crate::generic::json::{self, FromJson};
use crate::generic::jwt::{Jwks, Unverified, Validation};
use crate::generic::reply::Reply;

pub const DEFAULT_USER_HEADER: &str = "x-edgewise-user";

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "role", rename_all = "lowercase", deny_unknown_fields)]
pub enum Config {
    Gateway(GatewayConfig),
    Sidecar(SidecarConfig),
}

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The issuer's keys (a JWKS document, inline).
    #[cfg_attr(feature = "schema", schemars(with = "serde_json::Value"))]
    pub jwks: json::Raw,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Claim -> header carrying it to the workload. Default: `sub` -> `x-edgewise-user`.
    #[serde(default = "default_claim_headers")]
    pub claim_headers: BTreeMap<String, String>,
    /// Pass the user's bearer token on to the workload. Off by default: the identity headers
    /// replace it, and the token never crosses a hop that may be plaintext.
    #[serde(default)]
    pub forward_token: bool,
    /// Verified tokens remembered per worker (until they expire), so that a token's signature is
    /// checked once, not on every request. 0 turns the cache off.
    #[serde(default = "default_token_cache_size")]
    pub token_cache_size: usize,
}

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// SPIFFE IDs of the gateways whose identity headers are believed.
    pub trusted_gateways: Vec<String>,
    /// The identity headers; removed unless the peer is a trusted gateway.
    #[serde(default = "default_identity_headers")]
    pub identity_headers: Vec<String>,
}

fn default_leeway() -> u64 {
    30
}
fn default_claim_headers() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_string(), DEFAULT_USER_HEADER.to_string())])
}
fn default_identity_headers() -> Vec<String> {
    vec![DEFAULT_USER_HEADER.to_string()]
}

fn header_name_ok(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The gateway role, compiled.
#[derive(Debug)]
pub struct Gateway {
    jwks: Jwks,
    validation: Validation,
    claim_headers: Vec<(String, String)>,
    pub forward_token: bool,
    pub token_cache_size: usize,
}

/// A verified token's identity headers, cached until the token expires.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub headers: Vec<(String, String)>,
    valid_until: u64,
}

impl Expiring for Verified {
    fn valid_until(&self) -> u64 {
        self.valid_until
    }
}

/// The sidecar role, compiled.
#[derive(Debug)]
pub struct Sidecar {
    trusted: Vec<String>,
    pub identity_headers: Vec<String>,
}

#[derive(Debug)]
pub enum Role {
    Gateway(Gateway),
    Sidecar(Sidecar),
}

impl Role {
    #[inline(never)] // see `crate::generic::json`
    pub fn from_json(json: &[u8]) -> Result<Role, ConfigError> {
        match json::parse::<Config>(json)? {
            Config::Gateway(c) => {
                check_token_cache_size(c.token_cache_size)?;
                let jwks =
                    Jwks::from_json(c.jwks.0.as_bytes()).map_err(|e| ConfigError::field("jwks", e.to_string()))?;
                if jwks.is_empty() {
                    return Err(ConfigError::field("jwks", "has no usable RS256 or ES256 key"));
                }
                if c.issuers.is_empty() {
                    return Err(ConfigError::field("issuers", "must name at least one issuer"));
                }
                if c.audiences.is_empty() {
                    return Err(ConfigError::field("audiences", "must name at least one audience"));
                }
                if let Some((_, h)) = c.claim_headers.iter().find(|(_, h)| !header_name_ok(h)) {
                    return Err(ConfigError::field("claim_headers", format!("{h:?} is not a lowercase header name")));
                }
                let validation = Validation {
                    issuers: c.issuers,
                    audiences: c.audiences,
                    leeway: c.leeway_seconds,
                    required: vec![],
                };
                Ok(Role::Gateway(Gateway {
                    jwks,
                    validation,
                    claim_headers: c.claim_headers.into_iter().collect(),
                    forward_token: c.forward_token,
                    token_cache_size: c.token_cache_size,
                }))
            }
            Config::Sidecar(c) => {
                if let Some(bad) = c.trusted_gateways.iter().find(|id| !id.starts_with("spiffe://") || id.len() <= 9) {
                    return Err(ConfigError::field("trusted_gateways", format!("{bad:?} is not a SPIFFE ID")));
                }
                if c.trusted_gateways.is_empty() {
                    return Err(ConfigError::field("trusted_gateways", "must name at least one gateway identity"));
                }
                if let Some(h) = c.identity_headers.iter().find(|h| !header_name_ok(h)) {
                    return Err(ConfigError::field(
                        "identity_headers",
                        format!("{h:?} is not a lowercase header name"),
                    ));
                }
                Ok(Role::Sidecar(Sidecar { trusted: c.trusted_gateways, identity_headers: c.identity_headers }))
            }
        }
    }
}

impl Gateway {
    /// Every header this role sets; the filter removes client-sent values of all of them first.
    pub fn identity_headers(&self) -> impl Iterator<Item = &str> {
        self.claim_headers.iter().map(|(_, h)| h.as_str())
    }

    /// Authenticates `Authorization: Bearer <JWT>` (or finds the token verified in the cache);
    /// on success, the (header, value) pairs to set.
    #[inline(never)]
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        now: u64,
        cache: &mut TokenCache<Verified>,
    ) -> Result<Arc<Verified>, Reply> {
        let Some(token) = bearer(authorization) else {
            return Err(Reply::new(401, "unauthenticated", "an Authorization: Bearer token is required"));
        };
        if let Some(verified) = cache.get(token, now) {
            return Ok(verified.clone());
        }
        let invalid = |e: crate::generic::jwt::JwtError| Reply::new(401, "invalid_token", e.to_string());
        let claims = Unverified::parse(token).and_then(|t| t.verify(&self.jwks)).map_err(invalid)?;
        self.validation.check(&claims, now).map_err(invalid)?;
        let headers = self
            .claim_headers
            .iter()
            .filter_map(|(claim, header)| {
                let value = match claims.get(claim)? {
                    Value::String(s) => s.clone(),
                    Value::Array(items) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                // Header values must not carry line breaks or other control characters.
                (!value.bytes().any(|b| b < b' ' || b == 0x7f)).then_some((header.clone(), value))
            })
            .collect();
        // Cached only with an `exp`, and until then (plus the leeway `check` allowed).
        let exp = claims.get("exp").and_then(Value::as_u64);
        let verified =
            Arc::new(Verified { headers, valid_until: exp.map_or(0, |e| e.saturating_add(self.validation.leeway)) });
        if exp.is_some() {
            cache.insert(token, verified.clone(), now);
        }
        Ok(verified)
    }
}

impl Sidecar {
    /// Whether the mTLS peer (its URI SAN, as Envoy reports it) is a trusted gateway.
    pub fn trusts(&self, peer_uri_san: Option<&str>) -> bool {
        peer_uri_san.is_some_and(|peer| self.trusted.iter().any(|t| t == peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derived reader reads every document as the serde derives (the JSON Schema's source) do.
    #[test]
    fn the_reader_agrees_with_the_schema_types() {
        let docs = [
            r#"{"role":"sidecar","trusted_gateways":["spiffe://a/b"]}"#,
            r#"{"trusted_gateways":[],"identity_headers":["x-a"],"role":"sidecar"}"#,
            r#"{"role":"gateway","jwks":{"keys":[{"e":"AQAB","kty":"RSA","n":"x"}]},"issuers":["i"],"audiences":["a"]}"#,
            r#"{"issuers":[],"audiences":[],"jwks":{"keys":[]},"leeway_seconds":1,"claim_headers":{"sub":"x-u","g":"x-g"},
                "forward_token":true,"token_cache_size":3,"role":"gateway"}"#,
            r#"{"role":"gateway","jwks":{},"issuers":[],"audiences":[],"claim_headers":{}}"#,
            r#"{"role":"other"}"#,
            r#"{"trusted_gateways":[]}"#,
            r#"{"role":"sidecar","trusted_gateways":[],"jwks":{}}"#,
            r#"{"role":"gateway","issuers":[],"audiences":[]}"#,
            r#"{"role":"gateway","jwks":{},"issuers":[],"audiences":[],"trusted_gateways":[]}"#,
            r#"{"role":5,"trusted_gateways":[]}"#,
            r#"{"role":"sidecar","trusted_gateways":[]} x"#,
        ];
        crate::generic::json::assert_reads_like_serde::<Config, _>(&docs, crate::generic::json::parse::<Config>);
    }

    #[test]
    fn the_sidecar_trusts_exactly_the_listed_gateways() {
        let Role::Sidecar(s) =
            Role::from_json(br#"{"role":"sidecar","trusted_gateways":["spiffe://gw.example/ns/edge/sa/gateway"]}"#)
                .unwrap()
        else {
            panic!("role")
        };
        assert!(s.trusts(Some("spiffe://gw.example/ns/edge/sa/gateway")));
        for peer in [
            None,
            Some(""),
            Some("spiffe://gw.example/ns/edge/sa/gateway2"),
            Some("spiffe://gw.example/ns/edge/sa"),
            Some("spiffe://cluster.local/ns/edge/sa/gateway"),
        ] {
            assert!(!s.trusts(peer), "{peer:?}");
        }
        assert_eq!(s.identity_headers, ["x-edgewise-user"]);
    }

    #[test]
    fn the_gateway_turns_a_verified_token_into_identity_headers() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        use p256::ecdsa::signature::Signer;
        use rand_chacha::rand_core::SeedableRng;
        let key = p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(9));
        let point = key.verifying_key().to_encoded_point(false);
        let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let config = serde_json::json!({
            "role": "gateway",
            "jwks": {"keys": [{"kty":"EC","crv":"P-256","kid":"k1","x":enc(point.x().unwrap()),"y":enc(point.y().unwrap())}]},
            "issuers": ["https://idp.example"], "audiences": ["shop"],
            "claim_headers": {"sub": "x-edgewise-user", "groups": "x-edgewise-user-groups"}
        });
        let Role::Gateway(g) = Role::from_json(config.to_string().as_bytes()).unwrap() else { panic!("role") };
        let sign = |claims: serde_json::Value| {
            let input = format!("{}.{}", enc(br#"{"alg":"ES256","kid":"k1"}"#), enc(claims.to_string().as_bytes()));
            let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
            format!("Bearer {input}.{}", enc(&sig.to_bytes()))
        };
        let now = 1_800_000_000u64;
        let good = sign(
            serde_json::json!({"iss":"https://idp.example","aud":"shop","sub":"alice","groups":["admins","devs"],"exp":now+60}),
        );
        let mut cache = TokenCache::new(10);
        let verified = g.authenticate(Some(&good), now, &mut cache).unwrap();
        let pair = |h: &str, v: &str| (h.to_string(), v.to_string());
        assert_eq!(
            verified.headers,
            vec![pair("x-edgewise-user-groups", "admins,devs"), pair("x-edgewise-user", "alice")]
        );
        // Verified once, then served from the cache until exp + leeway, and not after.
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&verified, &g.authenticate(Some(&good), now + 89, &mut cache).unwrap()));
        let mut unverifiable = good.clone();
        unverifiable.push('A');
        assert!(g.authenticate(Some(&unverifiable), now, &mut cache).is_err(), "another token is verified on its own");
        assert_eq!(g.authenticate(Some(&good), now + 90, &mut cache).unwrap_err().detail, "token expired");
        assert_eq!(g.identity_headers().collect::<Vec<_>>(), ["x-edgewise-user-groups", "x-edgewise-user"]);
        // A claim value with a line break never becomes a header.
        let crlf = sign(
            serde_json::json!({"iss":"https://idp.example","aud":"shop","sub":"alice\r\nx-admin: 1","exp":now+60}),
        );
        assert!(g.authenticate(Some(&crlf), now, &mut cache).unwrap().headers.is_empty());
        let reply = |auth: Option<&str>| g.authenticate(auth, now, &mut TokenCache::new(10)).unwrap_err();
        assert_eq!(reply(None).error, "unauthenticated");
        assert_eq!(reply(Some("Basic abc")).error, "unauthenticated");
        assert_eq!(reply(Some("Bearer x.y.z")).error, "invalid_token");
        let expired = sign(serde_json::json!({"iss":"https://idp.example","aud":"shop","sub":"alice","exp":now-60}));
        assert_eq!(reply(Some(&expired)).detail, "token expired");
        let other_aud =
            sign(serde_json::json!({"iss":"https://idp.example","aud":"billing","sub":"alice","exp":now+60}));
        assert_eq!(reply(Some(&other_aud)).detail, "audience not accepted");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (r#"{"role":"sidecar","trusted_gateways":[]}"#, "`trusted_gateways`"),
            (
                r#"{"role":"sidecar","trusted_gateways":["gateway"]}"#,
                "`trusted_gateways` \"gateway\" is not a SPIFFE ID",
            ),
            (
                r#"{"role":"sidecar","trusted_gateways":["spiffe://a/b"],"identity_headers":["X User"]}"#,
                "`identity_headers`",
            ),
            (r#"{"role":"sidecar","trusted_gateways":["spiffe://a/b"],"extra":1}"#, "unknown field `extra`"),
            (r#"{"role":"router"}"#, "`role` must be gateway or sidecar"),
            (r#"{"trusted_gateways":[]}"#, "`role` is required"),
            (r#"{"role":"gateway","jwks":{"keys":[]},"issuers":["i"],"audiences":["a"]}"#, "`jwks` has no usable"),
            (r#"{"role":"gateway","jwks":{"nokeys":1},"issuers":["i"],"audiences":["a"]}"#, "`jwks`"),
            (
                r#"{"role":"gateway","jwks":{"keys":[]},"issuers":["i"],"audiences":["a"],"token_cache_size":2000000}"#,
                "`token_cache_size` must be at most 1000000",
            ),
        ];
        for (json, want) in cases {
            let err = Role::from_json(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: got {err:?}, want {want:?}");
        }
    }
}

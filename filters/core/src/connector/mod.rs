//! Cloud Connector gateway: one public edge in front of private feature backends.
//!
//! A request is routed by path prefix to a feature, authenticated by its bearer token (a JWT of a
//! configured issuer, verified against that issuer's JWKS), authorized by the feature's scopes,
//! rate limited per organization, and forwarded with identity headers the gateway sets itself.
//! The filter crate fetches keys, keeps buckets in shared data and applies what this module decides.

pub mod config;
pub mod limiter;

use std::fmt::Write;
use std::rc::Rc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{AuthError, JwksConfig, Verifier};
pub use crate::auth::{Identity, Issuer, IssuerKeys, Keyring, TokenCache, MAX_SCOPES};
use crate::config::ConfigError;
use crate::reply::Reply;
use config::HeadersConfig;
use limiter::{Limit, Verdict};

/// The compiled configuration.
#[derive(Debug)]
pub struct Gateway {
    /// Issuers, claims checks, and the scopes the features require.
    pub verifier: Verifier,
    pub features: Vec<Feature>,
    pub jwks: JwksConfig,
    pub slots: u32,
    /// After this long untouched, every bucket is full again (so its slot is free).
    pub idle_ms: u64,
    pub token_cache_size: usize,
    pub headers: HeadersConfig,
    /// HMAC-SHA256 keyed with the shared secret, prepared once (the key schedule is not
    /// repeated per request): each signature clones it.
    pub(crate) mac: Option<Hmac<Sha256>>,
    pub cluster_header: String,
    pub health_path: String,
    pub public_paths: Vec<String>,
    pub forward_authorization: bool,
}

#[derive(Debug)]
pub struct Feature {
    pub name: String,
    /// Without a trailing `/`.
    pub prefix: String,
    pub required_scopes: Vec<String>,
    scope_mask: u64,
    pub cluster: String,
    rewrite_prefix: Option<String>,
    pub limit: Option<Limit>,
}

/// What a request came to, for metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    NotFound,
    Unauthenticated,
    Forbidden,
    RateLimited,
    KeysUnavailable,
    /// A header the gateway must read is not text.
    BadRequest,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Allowed,
        Outcome::NotFound,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::KeysUnavailable,
        Outcome::BadRequest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::NotFound => "not_found",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::KeysUnavailable => "keys_unavailable",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    NotFound,
    MissingToken,
    InvalidToken(String),
    /// The token's issuer has no keys yet (never fetched): fail closed, 503.
    KeysUnavailable {
        issuer: usize,
    },
    /// No key with the token's `kid`: the keys may have rotated (the filter may refetch once).
    UnknownKid {
        issuer: usize,
    },
    Forbidden {
        scope: String,
    },
    RateLimited(Verdict),
    /// A header the gateway must interpret is not UTF-8: 400 (`reply::header_text`).
    BadHeader(Reply),
}

impl Denial {
    pub fn outcome(&self) -> Outcome {
        match self {
            Denial::NotFound => Outcome::NotFound,
            Denial::MissingToken | Denial::InvalidToken(_) | Denial::UnknownKid { .. } => Outcome::Unauthenticated,
            Denial::KeysUnavailable { .. } => Outcome::KeysUnavailable,
            Denial::Forbidden { .. } => Outcome::Forbidden,
            Denial::RateLimited(_) => Outcome::RateLimited,
            Denial::BadHeader(_) => Outcome::BadRequest,
        }
    }

    /// The reply and its extra headers (WWW-Authenticate, Retry-After, RateLimit-*).
    pub fn reply(&self, path: &str, feature: Option<&Feature>) -> (Reply, Vec<(&'static str, String)>) {
        let invalid = |detail: String| {
            (
                Reply::new(401, "invalid_token", detail),
                vec![("www-authenticate", "Bearer error=\"invalid_token\"".to_string())],
            )
        };
        match self {
            Denial::BadHeader(reply) => (reply.clone(), vec![]),
            Denial::NotFound => (Reply::new(404, "not_found", format!("no feature is served at {path}")), vec![]),
            Denial::MissingToken => (
                Reply::new(401, "unauthenticated", "send the access token as `Authorization: Bearer <token>`"),
                vec![("www-authenticate", "Bearer".into())],
            ),
            Denial::InvalidToken(detail) => invalid(detail.clone()),
            Denial::UnknownKid { .. } => invalid("the token is signed with a key its issuer does not publish".into()),
            Denial::KeysUnavailable { .. } => (
                Reply::new(503, "keys_unavailable", "the token's issuer keys could not be fetched yet; retry shortly"),
                vec![("retry-after", "5".into())],
            ),
            Denial::Forbidden { scope } => (
                Reply::new(
                    403,
                    "insufficient_scope",
                    format!("{} requires the scope {scope:?}", feature.map_or("this feature", |f| f.name.as_str())),
                ),
                vec![("www-authenticate", format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""))],
            ),
            Denial::RateLimited(v) => {
                let policy = feature
                    .and_then(|f| f.limit)
                    .map(|l| format!("{};w={};burst={}", l.requests, l.period_ms / 1000, l.burst))
                    .unwrap_or_default();
                (
                    Reply::new(
                        429,
                        "rate_limited",
                        format!(
                            "the organization's limit for {} is used up; retry in {} s",
                            feature.map_or("this feature", |f| f.name.as_str()),
                            v.retry_after_s
                        ),
                    ),
                    vec![
                        ("retry-after", v.retry_after_s.to_string()),
                        ("ratelimit-limit", v.limit.to_string()),
                        ("ratelimit-remaining", v.remaining.to_string()),
                        ("ratelimit-reset", v.reset_s.to_string()),
                        ("ratelimit-policy", policy),
                    ],
                )
            }
        }
    }
}

impl From<AuthError> for Denial {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Invalid(detail) => Denial::InvalidToken(detail),
            AuthError::KeysUnavailable { issuer } => Denial::KeysUnavailable { issuer },
            AuthError::UnknownKid { issuer } => Denial::UnknownKid { issuer },
        }
    }
}

impl Gateway {
    pub fn from_json(json: &[u8]) -> Result<Gateway, ConfigError> {
        Self::from_json_env(json, |var| std::env::var(var).ok())
    }

    #[inline(never)] // see `crate::json`
    pub fn from_json_env(json: &[u8], env: impl Fn(&str) -> Option<String>) -> Result<Gateway, ConfigError> {
        config::Config::read(json)?.compile(env)
    }

    /// The feature serving `path` (whole-segment prefix match, longest first).
    pub fn route(&self, path: &str) -> Option<(usize, &Feature)> {
        let bare = path.split(['?', '#']).next().unwrap_or_default();
        self.features.iter().enumerate().find(|(_, f)| {
            bare.strip_prefix(f.prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// The path the backend sees: the prefix rewritten, the rest (and query) kept.
    pub fn rewrite(&self, feature: &Feature, path: &str) -> Option<String> {
        let rewrite = feature.rewrite_prefix.as_deref()?;
        let rest = path.get(feature.prefix.len()..).unwrap_or_default();
        Some(match (rewrite, rest.starts_with('/')) {
            ("", true) => rest.to_string(),
            ("", false) => format!("/{rest}"),
            _ => format!("{rewrite}{rest}"),
        })
    }

    /// The token from an `Authorization` header value.
    pub fn bearer(authorization: Option<&str>) -> Result<&str, Denial> {
        crate::auth::bearer(authorization).ok_or(Denial::MissingToken)
    }

    /// Verifies a token (or finds it verified in the cache) and returns who it identifies.
    pub fn authenticate(
        &self,
        token: &str,
        keys: &Keyring,
        cache: &mut TokenCache,
        now: u64,
    ) -> Result<Rc<Identity>, Denial> {
        Ok(self.verifier.authenticate(token, keys, cache, now)?)
    }

    pub fn issuers(&self) -> &[Issuer] {
        &self.verifier.issuers
    }

    /// The client's own claims about itself must agree with its token.
    pub fn check_client_headers(
        &self,
        id: &Identity,
        instance_id: Option<&str>,
        realm: Option<&str>,
    ) -> Result<(), Denial> {
        if instance_id.is_some_and(|v| v != id.instance_id) {
            return Err(Denial::InvalidToken("X-Gitlab-Instance-Id does not match the token's subject".into()));
        }
        if realm.is_some_and(|v| Some(v) != id.realm.as_deref()) {
            return Err(Denial::InvalidToken("X-Gitlab-Realm does not match the token's gitlab_realm".into()));
        }
        Ok(())
    }

    /// Every scope the feature requires must be in the token.
    pub fn authorize(&self, feature: &Feature, id: &Identity) -> Result<(), Denial> {
        let missing = feature.scope_mask & !id.scope_mask;
        if missing == 0 {
            return Ok(());
        }
        let scope = self.verifier.scopes.get(missing.trailing_zeros() as usize).cloned().unwrap_or_default();
        Err(Denial::Forbidden { scope })
    }

    /// The authenticity header value, if a secret is configured (see [`signature`]).
    pub fn sign(&self, unix_s: u64, method: &str, path: &str, instance_id: &str) -> Option<String> {
        self.mac.as_ref().map(|mac| sign_with(mac.clone(), unix_s, method, path, instance_id))
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "v1\n<t>\n<METHOD>\n<path>\n<instance id>")>`,
/// over the path as the backend receives it (query included).
pub fn signature(secret: &[u8], unix_s: u64, method: &str, path: &str, instance_id: &str) -> String {
    // HMAC accepts keys of any length; the error arm cannot happen.
    let Ok(mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    sign_with(mac, unix_s, method, path, instance_id)
}

fn sign_with(mut mac: Hmac<Sha256>, unix_s: u64, method: &str, path: &str, instance_id: &str) -> String {
    let t = unix_s.to_string();
    for part in ["v1", &t, method, path, instance_id] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(t.len() + 6 + 64);
    out.push_str("t=");
    out.push_str(&t);
    out.push_str(",v1=");
    for b in tag {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests;

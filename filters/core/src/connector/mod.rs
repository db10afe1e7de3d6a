//! Cloud Connector gateway: one public edge in front of private feature backends.
//!
//! A request is routed by path prefix to a feature, authenticated by its bearer token (a JWT of a
//! configured issuer, verified against that issuer's JWKS), authorized by the feature's scopes,
//! rate limited per organization, and forwarded with identity headers the gateway sets itself.
//! The filter crate fetches keys, keeps buckets in shared data and applies what this module decides.

pub mod config;
pub mod keys;
pub mod limiter;

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::jwt::{Jwks, JwtError, Unverified, Validation};
use crate::reply::Reply;
use config::{HeadersConfig, JwksConfig};
use limiter::{Limit, Verdict};

/// Scopes are kept as a bit set per token and per feature.
pub const MAX_SCOPES: usize = 64;

/// The compiled configuration.
#[derive(Debug)]
pub struct Gateway {
    pub issuers: Vec<Issuer>,
    pub features: Vec<Feature>,
    /// Every scope some feature requires; bit i of a mask is `scopes[i]`.
    scopes: Vec<String>,
    validation: Validation,
    pub jwks: JwksConfig,
    key_claim: String,
    pub slots: u32,
    /// After this long untouched, every bucket is full again (so its slot is free).
    pub idle_ms: u64,
    pub token_cache_size: usize,
    pub headers: HeadersConfig,
    secret: Option<Vec<u8>>,
    pub cluster_header: String,
    pub health_path: String,
    pub public_paths: Vec<String>,
    pub forward_authorization: bool,
}

#[derive(Debug)]
pub struct Issuer {
    pub issuer: String,
    pub cluster: String,
    pub authority: String,
    /// Configured JWKS path; `None`: discover it.
    pub jwks_path: Option<String>,
    pub discovery_path: String,
    /// Metric label.
    pub name: String,
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
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::NotFound,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::KeysUnavailable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::NotFound => "not_found",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::KeysUnavailable => "keys_unavailable",
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
}

impl Denial {
    pub fn outcome(&self) -> Outcome {
        match self {
            Denial::NotFound => Outcome::NotFound,
            Denial::MissingToken | Denial::InvalidToken(_) | Denial::UnknownKid { .. } => Outcome::Unauthenticated,
            Denial::KeysUnavailable { .. } => Outcome::KeysUnavailable,
            Denial::Forbidden { .. } => Outcome::Forbidden,
            Denial::RateLimited(_) => Outcome::RateLimited,
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

/// The verified identity of a token, as the backends are told it.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: the GitLab instance id.
    pub instance_id: String,
    /// `gitlab_realm`, if the token has one.
    pub realm: Option<String>,
    /// The `scopes` claim, comma-separated.
    pub scopes: String,
    scope_mask: u64,
    pub issuer: usize,
    /// The rate-limit key claim's value (`sub` when the token lacks the claim).
    pub rate_key: String,
    /// Unix seconds after which the token is no longer accepted (exp + clock skew).
    valid_until: u64,
    /// The issuer's keys generation it was verified with.
    generation: u64,
}

/// One issuer's keys in force in this worker.
#[derive(Debug)]
pub struct IssuerKeys {
    pub jwks: Jwks,
    /// Bumped by every fetch that published new keys (shared across workers).
    pub generation: u64,
    pub fetched_ms: u64,
}

/// The keys in force, by issuer index.
#[derive(Debug, Default)]
pub struct Keyring {
    issuers: Vec<Option<IssuerKeys>>,
}

impl Keyring {
    pub fn new(issuers: usize) -> Self {
        Keyring { issuers: (0..issuers).map(|_| None).collect() }
    }

    pub fn get(&self, issuer: usize) -> Option<&IssuerKeys> {
        self.issuers.get(issuer)?.as_ref()
    }

    pub fn install(&mut self, issuer: usize, keys: IssuerKeys) {
        if let Some(slot) = self.issuers.get_mut(issuer) {
            *slot = Some(keys);
        }
    }
}

/// Verified tokens by sha256, bounded; an entry is used only until the token's `exp` and only
/// while its issuer's keys are the ones it was verified with (a removed key is not honoured
/// from the cache).
#[derive(Debug)]
pub struct TokenCache {
    map: HashMap<[u8; 32], Rc<Identity>, BuildHasherDefault<DigestHasher>>,
    capacity: usize,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache { map: HashMap::default(), capacity }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn insert(&mut self, digest: [u8; 32], identity: Rc<Identity>, now: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, id| id.valid_until > now);
        }
        if self.map.len() >= self.capacity {
            // Still full of live tokens: drop an arbitrary eighth (amortised O(1) per insert).
            let drop: Vec<[u8; 32]> = self.map.keys().take(self.capacity.div_ceil(8)).copied().collect();
            for k in drop {
                self.map.remove(&k);
            }
        }
        self.map.insert(digest, identity);
    }
}

/// The keys are sha256 digests already: their first 8 bytes are a perfectly good hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
}

impl Gateway {
    pub fn from_json(json: &[u8]) -> Result<Gateway, ConfigError> {
        Self::from_json_env(json, |var| std::env::var(var).ok())
    }

    pub fn from_json_env(json: &[u8], env: impl Fn(&str) -> Option<String>) -> Result<Gateway, ConfigError> {
        serde_json::from_slice::<config::Config>(json)?.compile(env)
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
        let value = authorization.ok_or(Denial::MissingToken)?.trim();
        let (scheme, token) = value.split_once(' ').ok_or(Denial::MissingToken)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(Denial::MissingToken);
        }
        Ok(token)
    }

    /// Verifies a token (or finds it verified in the cache) and returns who it identifies.
    pub fn authenticate(
        &self,
        token: &str,
        keys: &Keyring,
        cache: &mut TokenCache,
        now: u64,
    ) -> Result<Rc<Identity>, Denial> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(id) = cache.map.get(&digest) {
            if now < id.valid_until && keys.get(id.issuer).is_some_and(|k| k.generation == id.generation) {
                return Ok(id.clone());
            }
        }
        let invalid = |e: JwtError| Denial::InvalidToken(e.to_string());
        let unverified = Unverified::parse(token).map_err(invalid)?;
        let iss = unverified.issuer().unwrap_or_default();
        let issuer = self
            .issuers
            .iter()
            .position(|i| i.issuer == iss)
            .ok_or_else(|| Denial::InvalidToken(format!("issuer {iss:?} is not accepted")))?;
        let issuer_keys = keys.get(issuer).ok_or(Denial::KeysUnavailable { issuer })?;
        let claims = match unverified.verify(&issuer_keys.jwks) {
            Err(JwtError::UnknownKid(_)) => return Err(Denial::UnknownKid { issuer }),
            other => other.map_err(invalid)?,
        };
        self.validation.check(&claims, now).map_err(invalid)?;
        let identity = Rc::new(self.identity(&claims, issuer, issuer_keys.generation)?);
        cache.insert(digest, identity.clone(), now);
        Ok(identity)
    }

    fn identity(&self, claims: &Map<String, Value>, issuer: usize, generation: u64) -> Result<Identity, Denial> {
        let string = |name: &str| match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Denial::InvalidToken(format!("claim `{name}` must be a string"))),
        };
        let instance_id = string("sub")?.ok_or_else(|| Denial::InvalidToken("claim `sub` is missing".into()))?;
        let scope_list: Vec<&str> = match claims.get("scopes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|s| s.as_str().ok_or_else(|| Denial::InvalidToken("`scopes` must be strings".into())))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Denial::InvalidToken("claim `scopes` must be an array".into())),
        };
        let scope_mask = self
            .scopes
            .iter()
            .enumerate()
            .filter(|(_, s)| scope_list.contains(&s.as_str()))
            .fold(0u64, |m, (bit, _)| m | 1 << bit);
        let rate_key = match claims.get(&self.key_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => instance_id.clone(),
        };
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0) as u64;
        Ok(Identity {
            realm: string("gitlab_realm")?,
            scopes: scope_list.join(","),
            scope_mask,
            issuer,
            rate_key,
            valid_until: exp.saturating_add(self.validation.leeway),
            generation,
            instance_id,
        })
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
        let scope = self.scopes.get(missing.trailing_zeros() as usize).cloned().unwrap_or_default();
        Err(Denial::Forbidden { scope })
    }

    /// The authenticity header value, if a secret is configured (see [`signature`]).
    pub fn sign(&self, unix_s: u64, method: &str, path: &str, instance_id: &str) -> Option<String> {
        self.secret.as_deref().map(|secret| signature(secret, unix_s, method, path, instance_id))
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "v1\n<t>\n<METHOD>\n<path>\n<instance id>")>`,
/// over the path as the backend receives it (query included).
pub fn signature(secret: &[u8], unix_s: u64, method: &str, path: &str, instance_id: &str) -> String {
    // HMAC accepts keys of any length; the error arm cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
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

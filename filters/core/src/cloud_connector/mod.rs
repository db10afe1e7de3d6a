//! Cloud Connector gateway: one public edge in front of private feature backends.
//!
//! A request is routed by path prefix to a feature, authenticated by its bearer token (a JWT of a
//! configured issuer, verified against that issuer's JWKS), authorized by the feature's scopes,
//! rate limited per organization, and forwarded with identity headers the gateway sets itself.
//! The filter crate fetches keys, keeps buckets in shared data and applies what this module decides.

pub mod config;
pub mod limiter;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::generic::auth::{AuthError, JwksConfig, Verifier};
pub use crate::generic::auth::{Identity, Issuer, IssuerKeys, Keyring, TokenCache, MAX_SCOPES};
use crate::generic::config::ConfigError;
use crate::generic::edits::Edits;
use crate::generic::reply::Reply;
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
    /// What a forwarded request loses first ([`Gateway::forward_headers`]).
    pub(crate) forward_remove: Vec<String>,
}

/// The most (name, value) pairs [`Gateway::forward_headers`] sets: path, cluster, the four
/// identity headers, signature, feature and rate-limit key.
pub const FORWARD_EDITS: usize = 9;

/// Every header the gateway owns, removed from what the client sent before they are set from
/// the verified identity; and Authorization unless it is forwarded.
///
/// A forwarded Authorization is left as the client sent it: a request is forwarded only when
/// that header's value was one bearer JWT, and a second Authorization header would have made it
/// another value (both hosts read repeated headers joined by commas, which no JWT holds).
pub(crate) fn forward_remove(h: &HeadersConfig, cluster_header: &str, forward_authorization: bool) -> Vec<String> {
    let mut remove: Vec<String> =
        [&h.instance_id, &h.realm, &h.scopes, &h.issuer, &h.signature].into_iter().cloned().collect();
    remove.push(cluster_header.to_string());
    remove.extend(h.feature.iter().chain(&h.rate_limit_key).chain(&h.strip).cloned());
    if !forward_authorization {
        remove.push("authorization".into());
    }
    remove
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

    #[inline(never)] // see `crate::generic::json`
    pub fn from_json_env(json: &[u8], env: impl Fn(&str) -> Option<String>) -> Result<Gateway, ConfigError> {
        crate::generic::json::parse::<config::Config>(json)?.compile(env)
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
        let mut out = String::new();
        self.rewrite_into(feature, path, &mut out).then_some(out)
    }

    /// [`Gateway::rewrite`] into `out`; false (and `out` left alone) when the feature keeps paths.
    fn rewrite_into(&self, feature: &Feature, path: &str, out: &mut String) -> bool {
        let Some(rewrite) = feature.rewrite_prefix.as_deref() else { return false };
        let rest = path.get(feature.prefix.len()..).unwrap_or_default();
        out.clear();
        if rewrite.is_empty() {
            if !rest.starts_with('/') {
                out.push('/');
            }
        } else {
            out.push_str(rewrite);
        }
        out.push_str(rest);
        true
    }

    /// The token from an `Authorization` header value.
    pub fn bearer(authorization: Option<&str>) -> Result<&str, Denial> {
        crate::generic::auth::bearer(authorization).ok_or(Denial::MissingToken)
    }

    /// Verifies a token (or finds it verified in the cache) and returns who it identifies.
    pub fn authenticate(
        &self,
        token: &str,
        keys: &Keyring,
        cache: &mut TokenCache,
        now: u64,
    ) -> Result<Arc<Identity>, Denial> {
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
        let mut out = String::new();
        let mac = self.mac.as_ref()?;
        sign_into(mac.clone(), unix_s, method, path, instance_id, &mut out);
        Some(out)
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "v1\n<t>\n<METHOD>\n<path>\n<instance id>")>`,
/// over the path as the backend receives it (query included).
pub fn signature(secret: &[u8], unix_s: u64, method: &str, path: &str, instance_id: &str) -> String {
    // HMAC accepts keys of any length; the error arm cannot happen.
    let mut out = String::new();
    if let Ok(mac) = Hmac::<Sha256>::new_from_slice(secret) {
        sign_into(mac, unix_s, method, path, instance_id, &mut out);
    }
    out
}

/// [`signature`] written into `out` (cleared first), with the MAC prepared from the secret.
fn sign_into(mut mac: Hmac<Sha256>, unix_s: u64, method: &str, path: &str, instance_id: &str, out: &mut String) {
    // Written digit by digit: core::fmt's machinery costs more than the 74 characters.
    out.clear();
    out.push_str("t=");
    push_decimal(out, unix_s);
    let t = out.get(2..).unwrap_or_default();
    for part in ["v1", t, method, path, instance_id] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    let tag = mac.finalize().into_bytes();
    out.push_str(",v1=");
    for b in tag {
        for nibble in [b >> 4, b & 0xf] {
            out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
}

/// `n` in decimal.
fn push_decimal(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut rest = n;
    let mut len = 0;
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
        len += 1;
        if rest == 0 {
            break;
        }
    }
    let start = digits.len() - len;
    out.push_str(std::str::from_utf8(digits.get(start..).unwrap_or_default()).unwrap_or_default());
}

/// The headers of a request the gateway reads, as text (`reply::header_text` refused any that
/// were not).
#[derive(Debug, Default, Clone, Copy)]
pub struct Request<'a> {
    pub path: &'a str,
    pub method: &'a str,
    pub authorization: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub realm: Option<&'a str>,
}

/// What the decision needs from the state the gateway keeps (keys, verified tokens, buckets),
/// which each host keeps its own way.
pub trait State {
    /// Verifies a token against the keys in force (through the cache of verified tokens).
    fn authenticate(&mut self, gw: &Gateway, token: &str, now_ms: u64) -> Result<Arc<Identity>, Denial>;
    /// A token named an unknown kid: schedules a refetch unless one was asked for within the
    /// cooldown. True if one was.
    fn refetch_for_unknown_kid(&mut self, issuer: usize, now_ms: u64) -> bool;
    /// Completed key fetches of an issuer so far (a paused request waits for the next).
    fn completed_fetches(&mut self, issuer: usize) -> u64;
    /// Takes a token from the bucket of (feature, organization).
    fn take(&mut self, limit: &Limit, feature: usize, key: &str, now_ms: u64) -> Verdict;
}

/// What a forwarded request carries that depends on the request itself ([`Gateway::forward`]),
/// written in place: a worker reuses one, so forwarding allocates nothing once warm.
#[derive(Debug, Default, Clone)]
pub struct Forwarded {
    path: String,
    rewritten: bool,
    signature: String,
    signed: bool,
}

impl Forwarded {
    /// The path the backend sees, when the feature rewrites it.
    pub fn path(&self) -> Option<&str> {
        self.rewritten.then_some(self.path.as_str())
    }

    /// The authenticity signature, when a secret is configured.
    pub fn signature(&self) -> Option<&str> {
        self.signed.then_some(self.signature.as_str())
    }
}

/// What wakes a paused request (besides its deadline, `jwks.wait_ms` after it was paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The issuer had no keys: wake once it has (a failed fetch is retried within the wait).
    Keys,
    /// The token's kid was unknown: wake when the refetch completed (this count changed),
    /// whether it brought the kid or not.
    Refetch { completed: u64 },
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// The readiness endpoint: answer with the key state.
    Health,
    /// A public path: forwarded without authentication (the routing header removed).
    Public,
    /// Authenticated and allowed: forward to the feature's backend ([`Gateway::forward_headers`]).
    Forward { feature: usize, id: Arc<Identity> },
    /// Refused: `feature` (when the path named one) and `id` (when the token was verified) are
    /// for metrics and the access log.
    Deny { feature: Option<usize>, denial: Denial, id: Option<Arc<Identity>> },
    /// Hold the request until its issuer's keys arrive, or its wait is over.
    Wait { issuer: usize, wake: Wake },
}

impl Gateway {
    /// Decides a request, in the order: health, public paths, feature, token, client headers,
    /// scopes, rate limit. A request whose issuer's keys are missing, or whose kid is unknown
    /// while a refetch can be scheduled, waits (when `may_wait`; a woken request may not).
    pub fn decide(&self, req: &Request, state: &mut impl State, now_ms: u64, may_wait: bool) -> Decision {
        let bare = req.path.split('?').next().unwrap_or_default();
        if bare == self.health_path {
            return Decision::Health;
        }
        if self.public_paths.iter().any(|p| p == bare) {
            return Decision::Public;
        }
        let Some((index, feature)) = self.route(req.path) else {
            return Decision::Deny { feature: None, denial: Denial::NotFound, id: None };
        };
        let deny = |denial, id| Decision::Deny { feature: Some(index), denial, id };
        let token = match Gateway::bearer(req.authorization) {
            Ok(token) => token,
            Err(denial) => return deny(denial, None),
        };
        let id = match state.authenticate(self, token, now_ms) {
            Ok(id) => id,
            Err(Denial::KeysUnavailable { issuer }) if may_wait => return Decision::Wait { issuer, wake: Wake::Keys },
            Err(Denial::UnknownKid { issuer }) if may_wait && state.refetch_for_unknown_kid(issuer, now_ms) => {
                let completed = state.completed_fetches(issuer);
                return Decision::Wait { issuer, wake: Wake::Refetch { completed } };
            }
            Err(denial) => return deny(denial, None),
        };
        let checked =
            self.check_client_headers(&id, req.instance_id, req.realm).and_then(|()| self.authorize(feature, &id));
        if let Err(denial) = checked {
            return deny(denial, Some(id));
        }
        if let Some(limit) = &feature.limit {
            let verdict = state.take(limit, index, &id.rate_key, now_ms);
            if !verdict.allowed {
                return deny(Denial::RateLimited(verdict), Some(id));
            }
        }
        Decision::Forward { feature: index, id }
    }

    /// What a forwarded request carries that depends on the request itself, into `out`: the
    /// path the backend sees (when the feature rewrites it) and the authenticity signature over it.
    pub fn forward(&self, feature: &Feature, id: &Identity, req: &Request, now_ms: u64, out: &mut Forwarded) {
        let Forwarded { path, rewritten, signature, signed } = out;
        *rewritten = self.rewrite_into(feature, req.path, path);
        let backend_path = if *rewritten { path.as_str() } else { req.path };
        *signed = self.mac.as_ref().is_some_and(|mac| {
            sign_into(mac.clone(), now_ms / 1000, req.method, backend_path, &id.instance_id, signature);
            true
        });
    }

    /// The forwarded request's header edits: every header the gateway owns is removed from what
    /// the client sent, then set from the verified identity, with the signature and the
    /// backend's cluster. (Names to remove, then (name, value) pairs to set.)
    pub fn forward_headers<'a>(
        &'a self,
        feature: &'a Feature,
        id: &'a Identity,
        fw: &'a Forwarded,
    ) -> (&'a [String], Edits<'a, FORWARD_EDITS>) {
        let h = &self.headers;
        let issuer = self.issuers().get(id.issuer).map_or("", |i| i.issuer.as_str());
        let mut set = Edits::default();
        if let Some(path) = fw.path() {
            set.push(":path", path.as_bytes());
        }
        set.push(&self.cluster_header, feature.cluster.as_bytes());
        set.push(&h.instance_id, id.instance_id.as_bytes());
        if let Some(realm) = &id.realm {
            set.push(&h.realm, realm.as_bytes());
        }
        set.push(&h.scopes, id.scopes.as_bytes());
        set.push(&h.issuer, issuer.as_bytes());
        if let Some(sig) = fw.signature() {
            set.push(&h.signature, sig.as_bytes());
        }
        if let Some(name) = &h.feature {
            set.push(name, feature.name.as_bytes());
        }
        if let Some(name) = &h.rate_limit_key {
            set.push(name, id.rate_key.as_bytes());
        }
        (&self.forward_remove, set)
    }

    /// `{"status":"ok"|"unavailable","issuers":{"<name>":{"keys":n,"age_seconds":s}}}` and its
    /// status: 200 when every issuer has keys, else 503 (a readiness probe).
    pub fn health(&self, keys: &Keyring, now_ms: u64) -> (u32, String) {
        let mut all = true;
        let mut issuers = Vec::new();
        for (i, issuer) in self.issuers().iter().enumerate() {
            let state = keys.get(i).map(|k| (k.jwks.len(), now_ms.saturating_sub(k.fetched_ms) / 1000));
            all &= state.is_some();
            let (n, age) = state.unwrap_or((0, 0));
            issuers.push(format!("\"{}\":{{\"keys\":{n},\"age_seconds\":{age}}}", issuer.name));
        }
        let status = if all { "ok" } else { "unavailable" };
        (if all { 200 } else { 503 }, format!("{{\"status\":\"{status}\",\"issuers\":{{{}}}}}", issuers.join(",")))
    }
}

#[cfg(test)]
mod tests;

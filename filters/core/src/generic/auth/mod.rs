//! Bearer-token authentication shared by the filters that verify JWTs (cloud-connector,
//! tunnel-auth): issuers and how their keys are found, the keys in force, and a cache of
//! verified tokens. Signature and claims checks are `crate::generic::jwt`'s.

pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::generic::config::ConfigError;
use crate::generic::json::{FromJson, Object, Value};
use crate::generic::jwt::{Jwks, JwtError, Unverified, Validation};

/// Scopes are kept as a bit set per token.
pub const MAX_SCOPES: usize = 64;

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` value, an https URL.
    pub issuer: String,
    /// Envoy cluster the keys are fetched through. Default: the issuer's host.
    pub cluster: Option<String>,
    /// `:authority` of the key requests. Default: the issuer's host (and port).
    pub authority: Option<String>,
    /// Fetch the JWKS from this path instead of discovering `jwks_uri` through
    /// `<issuer>/.well-known/openid-configuration`.
    pub jwks_path: Option<String>,
    /// Metric label. Default: the issuer's host with dots as `_`.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    /// Refresh interval when the issuer sends no `Cache-Control: max-age`.
    pub refresh_seconds: u64,
    /// Bounds applied to `max-age`.
    pub min_refresh_seconds: u64,
    pub max_refresh_seconds: u64,
    /// Retry interval after a failed fetch (keys in force stay in use).
    pub retry_seconds: u64,
    /// A token whose `kid` is unknown triggers at most one refetch per this many seconds.
    pub kid_miss_cooldown_seconds: u64,
    /// Timeout of each discovery or JWKS request.
    pub timeout_ms: u64,
    /// How long a request waits for keys that are being fetched (first fetch, unknown kid)
    /// before it is answered 503 (or 401 for a kid still unknown).
    pub wait_ms: u64,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh_seconds: 3600,
            min_refresh_seconds: 60,
            max_refresh_seconds: 86400,
            retry_seconds: 10,
            kid_miss_cooldown_seconds: 60,
            timeout_ms: 5000,
            wait_ms: 3000,
        }
    }
}

impl JwksConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        let j = self;
        if j.min_refresh_seconds == 0 || j.min_refresh_seconds > j.max_refresh_seconds {
            return Err(ConfigError::field(
                "jwks.min_refresh_seconds",
                "must be at least 1 and at most max_refresh_seconds",
            ));
        }
        if !(j.min_refresh_seconds..=j.max_refresh_seconds).contains(&j.refresh_seconds) {
            return Err(ConfigError::field(
                "jwks.refresh_seconds",
                "must lie between min_refresh_seconds and max_refresh_seconds",
            ));
        }
        if j.retry_seconds == 0 || j.timeout_ms == 0 {
            return Err(ConfigError::field("jwks.retry_seconds", "retry_seconds and timeout_ms must be positive"));
        }

        Ok(())
    }
}

pub fn default_issuers() -> Vec<IssuerConfig> {
    ["https://gitlab.com", "https://customers.gitlab.com"]
        .map(|issuer| IssuerConfig {
            issuer: issuer.into(),
            cluster: None,
            authority: None,
            jwks_path: None,
            name: None,
        })
        .into()
}
pub fn default_audiences() -> Vec<String> {
    vec!["gitlab-ai-gateway".into()]
}
pub fn default_clock_skew() -> u64 {
    60
}

/// Compiles the `issuers` field.
pub fn compile_issuers(configs: &[IssuerConfig]) -> Result<Vec<Issuer>, ConfigError> {
    if configs.is_empty() {
        return Err(ConfigError::field("issuers", "must name at least one issuer"));
    }
    let mut issuers = Vec::with_capacity(configs.len());
    for (i, c) in configs.iter().enumerate() {
        let f = |name: &str| format!("issuers[{i}].{name}");
        let host = c
            .issuer
            .strip_prefix("https://")
            .map(|rest| rest.split('/').next().unwrap_or_default())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConfigError::field(f("issuer"), format!("{:?} is not an https URL", c.issuer)))?;
        if issuers.iter().any(|other: &Issuer| other.issuer == c.issuer) {
            return Err(ConfigError::field(f("issuer"), format!("{:?} is listed twice", c.issuer)));
        }
        if c.jwks_path.as_deref().is_some_and(|p| !p.starts_with('/')) {
            return Err(ConfigError::field(f("jwks_path"), "must start with /"));
        }
        let bare_host = host.split(':').next().unwrap_or(host);
        issuers.push(Issuer {
            issuer: c.issuer.clone(),
            cluster: c.cluster.clone().unwrap_or_else(|| bare_host.into()),
            authority: c.authority.clone().unwrap_or_else(|| host.into()),
            jwks_path: c.jwks_path.clone(),
            discovery_path: format!(
                "{}/.well-known/openid-configuration",
                c.issuer.trim_end_matches('/').get(8 + host.len()..).unwrap_or_default()
            ),
            name: label(c.name.as_deref().unwrap_or(bare_host), &f("name"))?,
        });
    }
    Ok(issuers)
}

/// A bounded metric label: letters, digits and `_` (dots and dashes become `_`).
pub fn label(raw: &str, field: &str) -> Result<String, ConfigError> {
    let label: String = raw.chars().map(|c| if c == '.' || c == '-' { '_' } else { c }).collect();
    if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::field(field, format!("{raw:?} must be letters, digits, '_', '-' or '.'")));
    }
    Ok(label)
}

#[derive(Debug, Clone)]
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

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Invalid(String),
    /// The token's issuer has no keys yet (never fetched): fail closed, 503.
    KeysUnavailable {
        issuer: usize,
    },
    /// No key with the token's `kid`: the keys may have rotated (the filter may refetch once).
    UnknownKid {
        issuer: usize,
    },
}

/// Verifies tokens of the configured issuers and turns their claims into an [`Identity`].
#[derive(Debug)]
pub struct Verifier {
    pub issuers: Vec<Issuer>,
    pub validation: Validation,
    /// Every scope that matters; bit i of a mask is `scopes[i]`.
    pub scopes: Vec<String>,
    /// Claim naming the organization (rate-limit buckets); `sub` when absent.
    pub key_claim: String,
    /// Claim whose values (a string or an array of strings) the filter authorizes against.
    pub access_claim: Option<String>,
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
    pub(crate) scope_mask: u64,
    /// The values of the verifier's `access_claim`.
    pub access: Vec<String>,
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

/// What a verified token is cached as, and until when (unix seconds) it may be served.
pub trait Expiring {
    fn valid_until(&self) -> u64;
}

impl Expiring for Identity {
    fn valid_until(&self) -> u64 {
        self.valid_until
    }
}

/// Verified tokens, bounded; an entry is used only until the token's `exp` (and, for an
/// [`Identity`], only while its issuer's keys are the ones it was verified with: a removed key is
/// not honoured from the cache).
///
/// Keyed by the token itself, as Envoy's jwt_authn keys its cache: a hit is a whole-token
/// comparison, so the hash only spreads entries and need not resist forgery (only verified tokens
/// are ever inserted), and a hit costs a fast hash of the token instead of a SHA-256 of it.
#[derive(Debug)]
pub struct TokenCache<T = Identity> {
    map: HashMap<Box<str>, Arc<T>, foldhash::fast::RandomState>,
    capacity: usize,
}

// Entries are shared, not copied: no `T: Clone` needed.
impl<T> Clone for TokenCache<T> {
    fn clone(&self) -> Self {
        TokenCache { map: self.map.clone(), capacity: self.capacity }
    }
}

pub fn default_token_cache_size() -> usize {
    10_000
}

/// A `token_cache_size` is bounded: every entry holds a verified token and its identity in each
/// worker.
pub fn check_token_cache_size(size: usize) -> Result<(), ConfigError> {
    if size > 1_000_000 {
        return Err(ConfigError::field("token_cache_size", "must be at most 1000000"));
    }
    Ok(())
}

impl<T: Expiring> TokenCache<T> {
    pub fn new(capacity: usize) -> Self {
        TokenCache { map: HashMap::default(), capacity }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of a token, if it is still valid at `now`.
    pub fn get(&self, token: &str, now: u64) -> Option<&Arc<T>> {
        self.map.get(token).filter(|v| now < v.valid_until())
    }

    pub fn insert(&mut self, token: &str, value: Arc<T>, now: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, v| v.valid_until() > now);
        }
        if self.map.len() >= self.capacity {
            // Still full of live tokens: drop an arbitrary eighth (amortised O(1) per insert).
            let mut drop = self.capacity.div_ceil(8);
            self.map.retain(|_, _| {
                let keep = drop == 0;
                drop = drop.saturating_sub(1);
                keep
            });
        }
        self.map.insert(token.into(), value);
    }
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Verifier {
    /// Verifies a token (or finds it verified in the cache) and returns who it identifies.
    #[inline(never)] // see `crate::generic::json`
    pub fn authenticate(
        &self,
        token: &str,
        keys: &Keyring,
        cache: &mut TokenCache,
        now: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(id) = cache.get(token, now) {
            if keys.get(id.issuer).is_some_and(|k| k.generation == id.generation) {
                return Ok(id.clone());
            }
        }
        let invalid = |e: JwtError| AuthError::Invalid(e.to_string());
        let unverified = Unverified::parse(token).map_err(invalid)?;
        let iss = unverified.issuer().unwrap_or_default();
        let issuer = self
            .issuers
            .iter()
            .position(|i| i.issuer == iss)
            .ok_or_else(|| AuthError::Invalid(format!("issuer {iss:?} is not accepted")))?;
        let issuer_keys = keys.get(issuer).ok_or(AuthError::KeysUnavailable { issuer })?;
        let claims = match unverified.verify(&issuer_keys.jwks) {
            Err(JwtError::UnknownKid(_)) => return Err(AuthError::UnknownKid { issuer }),
            other => other.map_err(invalid)?,
        };
        self.validation.check(&claims, now).map_err(invalid)?;
        let identity = Arc::new(self.identity(&claims, issuer, issuer_keys.generation)?);
        cache.insert(token, identity.clone(), now);
        Ok(identity)
    }

    #[inline(never)]
    fn identity(&self, claims: &Object, issuer: usize, generation: u64) -> Result<Identity, AuthError> {
        let string = |name: &str| match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(AuthError::Invalid(format!("claim `{name}` must be a string"))),
        };
        let instance_id = string("sub")?.ok_or_else(|| AuthError::Invalid("claim `sub` is missing".into()))?;
        let scope_list: Vec<&str> = match claims.get("scopes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|s| s.as_str().ok_or_else(|| AuthError::Invalid("`scopes` must be strings".into())))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(AuthError::Invalid("claim `scopes` must be an array".into())),
        };
        let scope_mask = self
            .scopes
            .iter()
            .enumerate()
            .filter(|(_, s)| scope_list.contains(&s.as_str()))
            .fold(0u64, |m, (bit, _)| m | 1 << bit);
        let rate_key = match claims.get(&self.key_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.clone(),
            _ => instance_id.clone(),
        };
        let access = match self.access_claim.as_ref().and_then(|c| claims.get(c)) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| AuthError::Invalid("the access claim must hold strings".into()))?,
            Some(_) => return Err(AuthError::Invalid("the access claim must be a string or an array".into())),
        };
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0) as u64;
        Ok(Identity {
            realm: string("gitlab_realm")?,
            scopes: scope_list.join(","),
            scope_mask,
            access,
            issuer,
            rate_key,
            valid_until: exp.saturating_add(self.validation.leeway),
            generation,
            instance_id,
        })
    }

    /// The bit set of the given scope names (unknown ones are ignored).
    pub fn scope_mask<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> u64 {
        names.into_iter().filter_map(|n| self.scopes.iter().position(|s| s == n)).fold(0, |m, bit| m | 1 << bit)
    }
}

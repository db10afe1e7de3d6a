//! The `cloud-connector` plugin configuration, as written in the Envoy YAML, and its compilation.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::generic::config::ConfigError;
use crate::generic::json::FromJson;
use crate::generic::jwt::Validation;

use super::limiter::Limit;
use super::{Feature, Gateway, MAX_SCOPES};
use crate::generic::auth::{
    check_token_cache_size, compile_issuers, default_audiences, default_clock_skew, default_issuers,
    default_token_cache_size, label, IssuerConfig, JwksConfig, Verifier,
};

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Accepted token issuers. Default: https://gitlab.com and https://customers.gitlab.com,
    /// each fetched through the Envoy cluster named after its host.
    #[serde(default = "default_issuers")]
    pub issuers: Vec<IssuerConfig>,
    /// Accepted `aud` values (one must match).
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// Claims every token must carry besides `iss`, `aud`, `exp` and `sub`.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Path prefix -> feature. The longest matching prefix wins; a path no feature matches is 404.
    pub features: Vec<FeatureConfig>,
    #[serde(default)]
    pub jwks: JwksConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Verified tokens remembered per worker (sha256 of the token -> claims), until their `exp`.
    #[serde(default = "default_token_cache_size")]
    pub token_cache_size: usize,
    #[serde(default)]
    pub headers: HeadersConfig,
    /// Signs what reaches the backends (docs/cloud-connector.md, "Signature for backends").
    pub authenticity: Option<AuthenticityConfig>,
    /// Cluster header the route reads to pick the feature's backend (`cluster_header`).
    #[serde(default = "default_cluster_header")]
    pub cluster_header: String,
    /// Paths the filter answers itself with the key status of every issuer (200 or 503).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Paths left to Envoy's routes without authentication (e.g. `/-/metrics`).
    #[serde(default = "default_public_paths")]
    pub public_paths: Vec<String>,
    /// Forward the client's `Authorization` header to the backend.
    #[serde(default = "default_true")]
    pub forward_authorization: bool,
}

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// Metric label and the name in replies, e.g. `code_suggestions`.
    pub name: String,
    /// Path prefix, matched on whole segments: `/ai` matches `/ai` and `/ai/x`, not `/aix`.
    pub prefix: String,
    /// Scopes the token must all carry (`scopes` claim). Empty: any valid token.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Envoy cluster of the backend.
    pub cluster: String,
    /// Replaces `prefix` in the forwarded path (`""` strips it).
    pub rewrite_prefix: Option<String>,
    /// Per-organization limit on this feature.
    pub rate_limit: Option<LimitConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Sustained rate: `requests` per `per`.
    pub requests: u64,
    pub per: Period,
    /// Bucket size: requests allowed at once after idling. Default: `requests`.
    pub burst: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Second,
    Minute,
    Hour,
}

impl Period {
    pub fn ms(self) -> u64 {
        match self {
            Period::Second => 1_000,
            Period::Minute => 60_000,
            Period::Hour => 3_600_000,
        }
    }
}

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Claim that names the organization a bucket belongs to (falls back to `sub` when absent).
    pub key_claim: String,
    /// Buckets kept across all workers (bounded memory; idle buckets are reused).
    pub slots: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { key_claim: "sub".into(), slots: 16384 }
    }
}

/// Headers the gateway owns: whatever a client sends under these names is replaced or removed.
#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    pub instance_id: String,
    pub realm: String,
    pub scopes: String,
    pub issuer: String,
    pub signature: String,
    /// If set, the feature's name goes in this header (for Envoy's global rate limit filter).
    pub feature: Option<String>,
    /// If set, the organization's rate-limit key (`rate_limit.key_claim`) goes in this header,
    /// so a fleet of gateways can share limits through Envoy's global rate limit service.
    pub rate_limit_key: Option<String>,
    /// Further headers removed from every forwarded request.
    pub strip: Vec<String>,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            instance_id: "x-gitlab-instance-id".into(),
            realm: "x-gitlab-realm".into(),
            scopes: "x-gitlab-scopes".into(),
            issuer: "x-gitlab-token-issuer".into(),
            signature: "x-edgewise-signature".into(),
            feature: None,
            rate_limit_key: None,
            strip: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AuthenticityConfig {
    /// Environment variable holding the shared secret (Envoy: `vm_config.environment_variables`).
    pub secret_env: Option<String>,
    /// The shared secret inline (prefer `secret_env`).
    pub secret: Option<String>,
}

fn default_cluster_header() -> String {
    "x-edgewise-backend".into()
}
fn default_health_path() -> String {
    "/-/health".into()
}
fn default_public_paths() -> Vec<String> {
    vec!["/-/metrics".into()]
}
fn default_true() -> bool {
    true
}

const MIN_SECRET_BYTES: usize = 32;

impl Config {
    /// Checks every field and builds the gateway. `env` reads the VM's environment variables.
    #[inline(never)] // see `crate::generic::json`
    pub fn compile(self, env: impl Fn(&str) -> Option<String>) -> Result<Gateway, ConfigError> {
        let issuers = compile_issuers(&self.issuers)?;
        if self.audiences.is_empty() {
            return Err(ConfigError::field("audiences", "must name at least one audience"));
        }
        if self.features.is_empty() {
            return Err(ConfigError::field("features", "must route at least one path prefix"));
        }
        let mut scopes: Vec<String> = Vec::new();
        let mut features = Vec::with_capacity(self.features.len());
        for (i, c) in self.features.into_iter().enumerate() {
            let feature = compile_feature(i, c, &features, &mut scopes)?;
            features.push(feature);
        }
        // Longest prefix first, so the first match is the most specific.
        features.sort_by_key(|f| std::cmp::Reverse(f.prefix.len()));
        self.jwks.check()?;
        if self.rate_limit.slots == 0 || self.rate_limit.key_claim.is_empty() {
            return Err(ConfigError::field("rate_limit.slots", "slots must be positive and key_claim non-empty"));
        }
        check_token_cache_size(self.token_cache_size)?;
        let h = &self.headers;
        for (name, value) in [
            ("headers.instance_id", &h.instance_id),
            ("headers.realm", &h.realm),
            ("headers.scopes", &h.scopes),
            ("headers.issuer", &h.issuer),
            ("headers.signature", &h.signature),
            ("cluster_header", &self.cluster_header),
        ] {
            if !is_header_name(value) {
                return Err(ConfigError::field(name, format!("{value:?} is not a lowercase header name")));
            }
        }
        if let Some(bad) = h.feature.iter().chain(&h.rate_limit_key).chain(&h.strip).find(|s| !is_header_name(s)) {
            return Err(ConfigError::field("headers", format!("{bad:?} is not a lowercase header name")));
        }
        let secret = self.authenticity.map(|a| compile_secret(a, env)).transpose()?.flatten();
        let mut required = self.required_claims;
        required.push("sub".into());
        let idle_ms = features.iter().filter_map(|f| f.limit.map(|l| l.refill_ms())).max().unwrap_or(0);
        let forward_remove = super::forward_remove(&self.headers, &self.cluster_header, self.forward_authorization);
        Ok(Gateway {
            forward_remove,
            verifier: Verifier {
                validation: Validation {
                    issuers: issuers.iter().map(|i| i.issuer.clone()).collect(),
                    audiences: self.audiences,
                    leeway: self.clock_skew_seconds,
                    required,
                },
                issuers,
                scopes,
                key_claim: self.rate_limit.key_claim,
                access_claim: None,
            },
            features,
            jwks: self.jwks,
            slots: self.rate_limit.slots,
            idle_ms,
            token_cache_size: self.token_cache_size,
            headers: self.headers,
            mac: secret,
            cluster_header: self.cluster_header,
            health_path: self.health_path,
            public_paths: self.public_paths,
            forward_authorization: self.forward_authorization,
        })
    }
}

/// One entry of `features`, checked against the ones before it; its scopes get bits in `scopes`.
// Out of `compile`: one large function costs Envoy more memory to compile than its parts.
#[inline(never)]
fn compile_feature(
    i: usize,
    c: FeatureConfig,
    features: &[Feature],
    scopes: &mut Vec<String>,
) -> Result<Feature, ConfigError> {
    let f = |name: &str| format!("features[{i}].{name}");
    let prefix = c.prefix.trim_end_matches('/');
    if !c.prefix.starts_with('/') || c.prefix.contains(['?', '#']) {
        return Err(ConfigError::field(f("prefix"), "must be a path starting with /"));
    }
    if features.iter().any(|x: &Feature| x.prefix == prefix) {
        return Err(ConfigError::field(f("prefix"), format!("{:?} is routed twice", c.prefix)));
    }
    if c.cluster.is_empty() {
        return Err(ConfigError::field(f("cluster"), "must name an Envoy cluster"));
    }
    let mut mask = 0u64;
    for s in &c.scopes {
        let bit = match scopes.iter().position(|x| x == s) {
            Some(bit) => bit,
            None if scopes.len() < MAX_SCOPES => {
                scopes.push(s.clone());
                scopes.len() - 1
            }
            None => return Err(ConfigError::field(f("scopes"), format!("more than {MAX_SCOPES} distinct scopes"))),
        };
        mask |= 1 << bit;
    }
    if let Some(rewrite) = &c.rewrite_prefix {
        if !(rewrite.is_empty() || rewrite.starts_with('/')) {
            return Err(ConfigError::field(f("rewrite_prefix"), "must be empty or start with /"));
        }
    }
    let limit = c
        .rate_limit
        .map(|l| Limit::new(l.requests, l.per.ms(), l.burst).map_err(|why| ConfigError::field(f("rate_limit"), why)))
        .transpose()?;
    Ok(Feature {
        name: label(&c.name, &f("name"))?,
        prefix: prefix.into(),
        required_scopes: c.scopes,
        scope_mask: mask,
        cluster: c.cluster,
        rewrite_prefix: c.rewrite_prefix.map(|r| r.trim_end_matches('/').into()),
        limit,
    })
}

/// The HMAC key of `authenticity`, from the VM's environment or inline.
#[inline(never)]
fn compile_secret(
    a: AuthenticityConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Hmac<Sha256>>, ConfigError> {
    let secret = match (a.secret_env, a.secret) {
        (Some(var), None) => env(&var).ok_or_else(|| {
            ConfigError::field("authenticity.secret_env", format!("environment variable {var} is not set in the VM"))
        })?,
        (None, Some(secret)) => secret,
        _ => return Err(ConfigError::field("authenticity", "set exactly one of secret_env and secret")),
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::field(
            "authenticity",
            format!("the secret must have at least {MIN_SECRET_BYTES} bytes"),
        ));
    }
    // HMAC accepts keys of any length.
    Ok(Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok())
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

//! Tunnel hub access: who may reach which private cluster through its reverse tunnel.
//!
//! Users call `/<prefix>/<cluster id>/<Kubernetes API path>` with a bearer JWT. The caller is
//! authenticated (`crate::generic::auth`), authorized for that cluster (a claim listing cluster ids, a
//! configured table subject -> cluster ids, or both), and the request goes to the tunnel of that
//! cluster: the filter sets the tunnel-selection header itself (whatever the client sent is
//! overwritten) and strips the prefix, so the agent's kubectl proxy sees a plain API path.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::generic::auth::{
    compile_issuers, default_clock_skew, default_token_cache_size, AuthError, Identity, IssuerConfig, JwksConfig,
    Keyring, TokenCache, Verifier,
};
use crate::generic::config::ConfigError;
use crate::generic::json::{self, FromJson};
use crate::generic::jwt::Validation;
use crate::generic::reply::Reply;

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Issuers of the users' tokens.
    pub issuers: Vec<IssuerConfig>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    #[serde(default)]
    pub jwks: JwksConfig,
    /// Verified tokens remembered per worker.
    #[serde(default = "default_token_cache_size")]
    pub token_cache_size: usize,
    /// Requests are `<path_prefix>/<cluster id>/...`.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// The header the hub's reverse-connection cluster selects the tunnel by.
    #[serde(default = "default_cluster_header")]
    pub cluster_header: String,
    /// Claim listing the cluster ids the caller may reach (a string or an array of strings).
    pub clusters_claim: Option<String>,
    /// Subject (`sub`) -> cluster ids it may reach, in addition to the claim.
    #[serde(default)]
    pub allow: BTreeMap<String, Vec<String>>,
    /// Forward the user's `Authorization` header through the tunnel (off: the cluster's own
    /// credentials are the agent's service account, the user's token is for the hub only).
    #[serde(default)]
    pub forward_authorization: bool,
}

fn default_path_prefix() -> String {
    "/clusters".into()
}
fn default_cluster_header() -> String {
    "x-edgewise-tunnel-cluster".into()
}

#[derive(Debug)]
pub struct Hub {
    pub verifier: Verifier,
    pub jwks: JwksConfig,
    pub token_cache_size: usize,
    prefix: String,
    pub cluster_header: String,
    allow: BTreeMap<String, Vec<String>>,
    pub forward_authorization: bool,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    NotFound,
    Unauthenticated,
    Forbidden,
    KeysUnavailable,
    /// A header the hub must read is not text.
    BadRequest,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::NotFound,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::KeysUnavailable,
        Outcome::BadRequest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::NotFound => "not_found",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::KeysUnavailable => "keys_unavailable",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// The decision on one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Send it through `cluster`'s tunnel with this path (both read from the request's path).
    Forward {
        cluster: &'a str,
        path: Cow<'a, str>,
    },
    Deny {
        outcome: Outcome,
        reply: Reply,
        www_authenticate: Option<&'static str>,
    },
    /// Like `Deny` for an unknown kid; the filter may schedule a key refetch for `issuer`.
    UnknownKid {
        issuer: usize,
        reply: Reply,
    },
}

impl Hub {
    #[inline(never)] // see `crate::generic::json`
    pub fn from_json(json: &[u8]) -> Result<Hub, ConfigError> {
        let c = json::parse::<Config>(json)?;
        let issuers = compile_issuers(&c.issuers)?;
        if c.audiences.is_empty() {
            return Err(ConfigError::field("audiences", "must name at least one audience"));
        }
        c.jwks.check()?;
        if c.clusters_claim.is_none() && c.allow.is_empty() {
            return Err(ConfigError::field(
                "clusters_claim",
                "set clusters_claim or allow (or both): nobody could reach any cluster",
            ));
        }
        let prefix = c.path_prefix.trim_end_matches('/').to_string();
        if !c.path_prefix.starts_with('/') {
            return Err(ConfigError::field("path_prefix", "must start with /"));
        }
        if let Some((sub, bad)) =
            c.allow.iter().find_map(|(s, ids)| ids.iter().find(|id| !is_cluster_id(id)).map(|id| (s, id)))
        {
            return Err(ConfigError::field(
                format!("allow.{sub}"),
                format!("{bad:?} is not a cluster id (a DNS label)"),
            ));
        }
        if c.cluster_header.is_empty() || c.cluster_header.bytes().any(|b| !(b.is_ascii_lowercase() || b == b'-')) {
            return Err(ConfigError::field("cluster_header", "must be a lowercase header name"));
        }
        Ok(Hub {
            verifier: Verifier {
                validation: Validation {
                    issuers: issuers.iter().map(|i| i.issuer.clone()).collect(),
                    audiences: c.audiences,
                    leeway: c.clock_skew_seconds,
                    required: vec!["sub".into()],
                },
                issuers,
                scopes: Vec::new(),
                key_claim: "sub".into(),
                access_claim: c.clusters_claim,
            },
            jwks: c.jwks,
            token_cache_size: c.token_cache_size,
            prefix,
            cluster_header: c.cluster_header,
            allow: c.allow,
            forward_authorization: c.forward_authorization,
        })
    }

    /// `(cluster id, path for the cluster)` of `/<prefix>/<id>/<rest>`.
    pub fn target<'a>(&self, path: &'a str) -> Option<(&'a str, Cow<'a, str>)> {
        let rest = path.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (id, tail) = rest.split_at(end);
        if !is_cluster_id(id) {
            return None;
        }
        let tail = match tail {
            "" => Cow::Borrowed("/"),
            _ if tail.starts_with('/') => Cow::Borrowed(tail),
            _ => Cow::Owned(format!("/{tail}")),
        };
        Some((id, tail))
    }

    pub fn may_reach(&self, id: &Identity, cluster: &str) -> bool {
        id.access.iter().any(|c| c == cluster)
            || self.allow.get(&id.instance_id).is_some_and(|ids| ids.iter().any(|c| c == cluster))
    }

    /// Decides a request from its path and `Authorization` header.
    pub fn decide<'a>(
        &self,
        path: &'a str,
        authorization: Option<&str>,
        keys: &Keyring,
        cache: &mut TokenCache,
        now: u64,
    ) -> Decision<'a> {
        let deny = |outcome, status, error, detail: String, www| Decision::Deny {
            outcome,
            reply: Reply::new(status, error, detail),
            www_authenticate: www,
        };
        let Some((cluster, rest)) = self.target(path) else {
            return deny(
                Outcome::NotFound,
                404,
                "not_found",
                format!("use {}/<cluster id>/<API path>", self.prefix),
                None,
            );
        };
        let Some(token) = crate::generic::auth::bearer(authorization) else {
            let detail = "send a token as `Authorization: Bearer <token>`".to_string();
            return deny(Outcome::Unauthenticated, 401, "unauthenticated", detail, Some("Bearer"));
        };
        let id = match self.verifier.authenticate(token, keys, cache, now) {
            Ok(id) => id,
            Err(AuthError::Invalid(detail)) => {
                return deny(
                    Outcome::Unauthenticated,
                    401,
                    "invalid_token",
                    detail,
                    Some("Bearer error=\"invalid_token\""),
                )
            }
            Err(AuthError::UnknownKid { issuer }) => {
                let detail = "the token is signed with a key its issuer does not publish";
                return Decision::UnknownKid { issuer, reply: Reply::new(401, "invalid_token", detail) };
            }
            Err(AuthError::KeysUnavailable { .. }) => {
                let detail = "the token issuer's keys could not be fetched yet; retry shortly".to_string();
                return deny(Outcome::KeysUnavailable, 503, "keys_unavailable", detail, None);
            }
        };
        if !self.may_reach(&id, cluster) {
            let detail = format!("{} may not reach cluster {cluster}", id.instance_id);
            return deny(Outcome::Forbidden, 403, "forbidden", detail, None);
        }
        Decision::Forward { cluster, path: rest }
    }
}

/// A cluster id is a DNS label: it becomes a host id in the hub's reverse-connection cluster,
/// so arbitrary client strings must not reach it.
fn is_cluster_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generic::auth::IssuerKeys;
    use crate::generic::jwt::Jwks;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    use rand_chacha::rand_core::SeedableRng;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(7))
    }

    fn token(claims: serde_json::Value) -> String {
        let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let input = format!("{}.{}", enc(br#"{"alg":"ES256","kid":"u1"}"#), enc(claims.to_string().as_bytes()));
        let sig: p256::ecdsa::Signature = key().sign(input.as_bytes());
        format!("{input}.{}", enc(&sig.to_bytes()))
    }

    fn hub() -> (Hub, Keyring) {
        let config = json!({
            "issuers": [{"issuer": "https://gitlab.com", "jwks_path": "/keys"}],
            "audiences": ["tunnel-hub"],
            "clusters_claim": "clusters",
            "allow": {"ops-bot": ["cluster-b"]}
        });
        let hub = Hub::from_json(config.to_string().as_bytes()).unwrap();
        let p = key().verifying_key().to_encoded_point(false);
        let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let jwks =
            json!({"keys":[{"kty":"EC","crv":"P-256","kid":"u1","x":enc(p.x().unwrap()),"y":enc(p.y().unwrap())}]});
        let mut ring = Keyring::new(1);
        ring.install(
            0,
            IssuerKeys { jwks: Jwks::from_json(jwks.to_string().as_bytes()).unwrap(), generation: 1, fetched_ms: 0 },
        );
        (hub, ring)
    }

    fn user(sub: &str, clusters: serde_json::Value) -> String {
        token(json!({"iss":"https://gitlab.com","aud":"tunnel-hub","sub":sub,"exp":NOW+60,"clusters":clusters}))
    }

    #[test]
    fn paths_name_a_cluster() {
        let (hub, _) = hub();
        assert_eq!(
            hub.target("/clusters/cluster-a/api/v1/pods?watch=1"),
            Some(("cluster-a", "/api/v1/pods?watch=1".into()))
        );
        assert_eq!(hub.target("/clusters/cluster-a"), Some(("cluster-a", "/".into())));
        assert_eq!(hub.target("/clusters/cluster-a?x"), Some(("cluster-a", "/?x".into())));
        for bad in [
            "/clusters/",
            "/clusters//api",
            "/clusters/Cluster-A/api",
            "/clusters/a.b/api",
            "/clustersx/a",
            "/api/v1",
            "/clusters/-a/",
        ] {
            assert_eq!(hub.target(bad), None, "{bad}");
        }
    }

    #[test]
    fn callers_reach_only_their_clusters() {
        let (hub, ring) = hub();
        let mut cache = TokenCache::new(10);
        let mut decide = |path: &'static str, token: &str| {
            let auth = format!("Bearer {token}");
            hub.decide(path, Some(&auth), &ring, &mut cache, NOW)
        };
        let alice = user("alice", json!(["cluster-a"]));
        assert_eq!(
            decide("/clusters/cluster-a/api", &alice),
            Decision::Forward { cluster: "cluster-a", path: "/api".into() }
        );
        assert!(matches!(
            decide("/clusters/cluster-b/api", &alice),
            Decision::Deny { outcome: Outcome::Forbidden, .. }
        ));
        let bot = user("ops-bot", json!(null));
        assert!(matches!(decide("/clusters/cluster-b/api", &bot), Decision::Forward { .. }), "from the table");
        assert!(matches!(decide("/clusters/cluster-a/api", &bot), Decision::Deny { outcome: Outcome::Forbidden, .. }));
        assert!(matches!(decide("/nope", &alice), Decision::Deny { outcome: Outcome::NotFound, .. }));
        assert!(matches!(
            decide("/clusters/cluster-a/api", "garbage"),
            Decision::Deny { outcome: Outcome::Unauthenticated, .. }
        ));
        let single = user("carol", json!("cluster-a"));
        assert!(matches!(decide("/clusters/cluster-a/", &single), Decision::Forward { .. }));
        let missing = hub.decide("/clusters/cluster-a/api", None, &ring, &mut cache, NOW);
        assert!(matches!(
            missing,
            Decision::Deny { outcome: Outcome::Unauthenticated, www_authenticate: Some("Bearer"), .. }
        ));
        let no_keys = hub.decide(
            "/clusters/cluster-a/api",
            Some(&format!("Bearer {alice}")),
            &Keyring::new(1),
            &mut TokenCache::new(0),
            NOW,
        );
        assert!(matches!(no_keys, Decision::Deny { outcome: Outcome::KeysUnavailable, .. }));
    }

    /// The derived reader reads every document as the serde derive (the JSON Schema's source) does.
    #[test]
    fn the_reader_agrees_with_the_schema_types() {
        let docs = [
            r#"{"issuers":[{"issuer":"https://a"}],"audiences":["x"]}"#,
            r#"{"issuers":[],"audiences":[],"clock_skew_seconds":1,"jwks":{"wait_ms":1},"token_cache_size":2,
                "path_prefix":"/p","cluster_header":"x-c","clusters_claim":"cl","allow":{"alice":["a","b"],"bob":[]},
                "forward_authorization":true}"#,
            r#"{"issuers":[],"audiences":[],"clusters_claim":null,"allow":{}}"#,
            r#"{"audiences":[]}"#,
            r#"{"issuers":[]}"#,
            r#"{"issuers":[],"audiences":[],"allow":{"a":"b"}}"#,
            r#"{"issuers":[],"audiences":[],"allow":[]}"#,
            r#"{"issuers":[],"audiences":[],"path":"/"}"#,
            r#"{"issuers":[],"audiences":[],"forward_authorization":null}"#,
        ];
        crate::generic::json::assert_reads_like_serde::<Config, _>(&docs, crate::generic::json::parse::<Config>);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let base = json!({"issuers":[{"issuer":"https://gitlab.com"}],"audiences":["a"],"clusters_claim":"c"});
        let cases = [
            ("clusters_claim", json!(null)),
            ("audiences", json!([])),
            ("path_prefix", json!("clusters")),
            ("cluster_header", json!("X-Tunnel")),
        ];
        for (field, value) in cases {
            let mut c = base.clone();
            c[field] = value;
            let err = Hub::from_json(c.to_string().as_bytes()).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let mut c = base.clone();
        c["allow"] = json!({"bob": ["Not_A_Label"]});
        assert!(Hub::from_json(c.to_string().as_bytes()).unwrap_err().to_string().contains("allow.bob"));
    }
}

//! envoy/cloud-connector.yaml: the public front certificate, the token issuers (one TLS stand-in
//! serving OIDC discovery and JWKS for every issuer host) and the feature backends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde_json::{json, Value};

use crate::certs::{self, Ca, LeafSpec};
use crate::envoy::{Build, Config};
use crate::server::{Answer, Listen, Seen, Server};
use crate::tls;

/// Fixed ports of the shipped YAML.
pub mod ports {
    pub const FRONT: u16 = 10446;
    pub const ADMIN: u16 = 9907;
    pub const AI_GATEWAY: u16 = 19401;
    pub const OBSERVABILITY: u16 = 19402;
    /// edgewise-ratelimit (gRPC: the rate_limit_service cluster of the shipped YAML; HTTP) and
    /// its Redis.
    pub const RATE_LIMIT_GRPC: u16 = 18081;
    pub const RATE_LIMIT_HTTP: u16 = 18082;
    pub const REDIS: u16 = 16379;
}

pub const GITLAB: &str = "https://gitlab.com";
pub const CUSTOMERS: &str = "https://customers.gitlab.com";
pub const AUDIENCE: &str = "gitlab-ai-gateway";
pub use crate::envoy::{DEMO_SECRET, SECRET_ENV};
/// Where the JWKS lives on the issuer stand-in (announced by discovery).
pub const JWKS_PATH: &str = "/oauth/discovery/keys";

pub struct Pki {
    pub dir: PathBuf,
    pub front_ca: Ca,
    pub issuer_ca: Ca,
}

impl Pki {
    pub fn install(run_dir: &Path) -> Result<Pki> {
        let dir = run_dir.join("cloud-connector");
        let pki = Pki { dir: dir.clone(), front_ca: Ca::new("edgewise front CA")?, issuer_ca: Ca::new("issuer CA")? };
        let front = pki.front_ca.issue(&LeafSpec::server(&["cloud.gitlab.com"]))?;
        certs::write_leaf(&dir.join("certs/front"), &front)?;
        certs::write_pem(&dir, "front-ca.pem", &pki.front_ca.pem)?;
        certs::write_pem(&dir, "issuer-ca.pem", &pki.issuer_ca.pem)?;
        super::install_sds("cloud-connector", run_dir)?;
        Ok(pki)
    }

    /// An HTTPS client for the public listener (SNI cloud.gitlab.com).
    pub fn front_client(&self, h2: bool) -> Result<crate::client::Client> {
        let alpn: &[&str] = if h2 { &["h2"] } else { &["http/1.1"] };
        Ok(crate::client::Client::tls(tls::client(&[&self.front_ca.pem], None, alpn)?).sni("cloud.gitlab.com"))
    }

    /// The shipped YAML pointed at this run: issuers at the stand-in (trusting its CA), backends
    /// at theirs, the public listener on a free port, admin (also /-/metrics' upstream) on `admin`.
    pub fn config(&self, run_dir: &Path, issuers: u16, ai: u16, observability: u16, admin: u16) -> Config {
        self.config_on(Build::current(), run_dir, 0, issuers, ai, observability, admin)
    }

    /// The same for `build`, with the public listener on `front`.
    #[allow(clippy::too_many_arguments)]
    pub fn config_on(
        &self,
        build: Build,
        run_dir: &Path,
        front: u16,
        issuers: u16,
        ai: u16,
        observability: u16,
        admin: u16,
    ) -> Config {
        let issuer_ca = self.dir.join("issuer-ca.pem");
        Config::shipped_as("cloud-connector", build)
            .run_dir(run_dir)
            .port(ports::FRONT, front)
            .port(ports::AI_GATEWAY, ai)
            .port(ports::OBSERVABILITY, observability)
            .port(ports::ADMIN, admin)
            .replace("/etc/ssl/certs/ca-certificates.crt", &issuer_ca.display().to_string())
            .replace(
                "{ address: gitlab.com, port_value: 443 }",
                &format!("{{ address: 127.0.0.1, port_value: {issuers} }}"),
            )
            .replace(
                "{ address: customers.gitlab.com, port_value: 443 }",
                &format!("{{ address: 127.0.0.1, port_value: {issuers} }}"),
            )
    }
}

/// What one issuer host publishes, and what was asked of it.
#[derive(Default)]
struct Published {
    keys: Vec<Value>,
    down: bool,
    max_age: Option<u64>,
    jwks_fetches: usize,
    discovery_fetches: usize,
}

/// The issuers' web servers: `/.well-known/openid-configuration` and the JWKS, per Host.
#[derive(Clone, Default)]
pub struct Issuers {
    hosts: Arc<Mutex<HashMap<String, Published>>>,
}

impl Issuers {
    /// Starts the TLS stand-in for gitlab.com and customers.gitlab.com (issued by `ca`).
    pub async fn start(ca: &Ca) -> Result<(Issuers, Server)> {
        Self::start_on(ca, 0).await
    }

    /// The same on a fixed port (0: any).
    pub async fn start_on(ca: &Ca, port: u16) -> Result<(Issuers, Server)> {
        let leaf = ca.issue(&LeafSpec::server(&["gitlab.com", "customers.gitlab.com"]))?;
        let issuers = Issuers::default();
        let handler = {
            let issuers = issuers.clone();
            Arc::new(move |seen: &Seen| issuers.answer(seen))
        };
        let tls = tls::server(&leaf, &[], &["http/1.1"])?;
        let server = Server::start("issuers", Listen { tls: Some(tls), port, ..Listen::default() }, handler).await?;
        Ok((issuers, server))
    }

    fn with<T>(&self, host: &str, f: impl FnOnce(&mut Published) -> T) -> T {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        f(hosts.entry(host.to_string()).or_default())
    }

    /// Publishes these JWKs (replacing the previous set) for `issuer` (`https://host`).
    pub fn publish(&self, issuer: &str, keys: Vec<Value>) {
        self.with(host_of(issuer), |p| p.keys = keys);
    }

    /// Makes the issuer answer 503 to everything (`true`) or serve again.
    pub fn set_down(&self, issuer: &str, down: bool) {
        self.with(host_of(issuer), |p| p.down = down);
    }

    pub fn set_max_age(&self, issuer: &str, max_age: Option<u64>) {
        self.with(host_of(issuer), |p| p.max_age = max_age);
    }

    /// JWKS documents served (successfully) so far.
    pub fn jwks_fetches(&self, issuer: &str) -> usize {
        self.with(host_of(issuer), |p| p.jwks_fetches)
    }

    pub fn discovery_fetches(&self, issuer: &str) -> usize {
        self.with(host_of(issuer), |p| p.discovery_fetches)
    }

    fn answer(&self, seen: &Seen) -> Answer {
        let host = seen.host.split(':').next().unwrap_or_default().to_string();
        self.with(&host, |p| {
            if p.down {
                return Answer::json(503, r#"{"error":"down on purpose"}"#);
            }
            match seen.path.as_str() {
                "/.well-known/openid-configuration" => {
                    p.discovery_fetches += 1;
                    let doc = json!({ "issuer": format!("https://{host}"), "jwks_uri": format!("https://{host}{JWKS_PATH}") });
                    Answer::json(200, doc.to_string())
                }
                JWKS_PATH => {
                    p.jwks_fetches += 1;
                    let mut a = Answer::json(200, json!({ "keys": p.keys }).to_string());
                    if let Some(age) = p.max_age {
                        a.headers.push(("cache-control".into(), format!("public, max-age={age}")));
                    }
                    a
                }
                _ => Answer::json(404, "{}"),
            }
        })
    }
}

fn host_of(issuer: &str) -> &str {
    issuer.strip_prefix("https://").unwrap_or(issuer)
}

/// Claims of a Cloud Connector token for `instance` with `scopes`, valid for ten minutes.
pub fn claims(instance: &str, scopes: &[&str]) -> Value {
    let now = crate::idp::now();
    json!({ "aud": AUDIENCE, "sub": instance, "gitlab_realm": "self-managed", "scopes": scopes,
            "iat": now, "nbf": now, "exp": now + 600, "jti": format!("{instance}-{now}") })
}

/// Checks an `x-edgewise-signature` value the way a backend would (the recipe in docs/cloud-connector.md).
pub fn signature_valid(secret: &[u8], header: &str, method: &str, path: &str, instance: &str) -> bool {
    let Some((t, v1)) = header.strip_prefix("t=").and_then(|rest| rest.split_once(",v1=")) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let message = format!("v1\n{t}\n{method}\n{path}\n{instance}\n");
    let Ok(tag) =
        (0..v1.len() / 2).map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    ring::hmac::verify(&key, message.as_bytes(), &tag).is_ok()
}

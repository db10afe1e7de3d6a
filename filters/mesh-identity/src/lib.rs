//! Filter `mesh-identity` (GEP-3792 identity propagation), in one of two roles:
//!
//! - `gateway`: drops identity headers a client sent, authenticates the user's bearer token
//!   (JWT, `edgewise_core::generic::jwt`) and sets the identity headers from its claims; 401 otherwise.
//! - `sidecar`: keeps the identity headers only when the mTLS peer's SPIFFE ID is a trusted
//!   gateway, and removes them otherwise, so a workload can trust them exactly when the gateway
//!   vouched for them.

use std::sync::Mutex;

use edgewise_core::generic::auth::TokenCache;
use edgewise_core::generic::reply::header_text;
use edgewise_core::mesh_identity::{Role, Verified};
use edgewise_host::{lock, ConfigError, Counter, Filter, Flow, Setup, Stream};

pub struct MeshIdentity {
    role: Role,
    /// Verified tokens (gateway role).
    cache: Mutex<TokenCache<Verified>>,
    authenticated: Counter,
    unauthenticated: Counter,
    invalid_token: Counter,
    bad_request: Counter,
    trusted_peer: Counter,
    untrusted_peer: Counter,
}

impl Filter for MeshIdentity {
    const NAME: &'static str = "mesh-identity";
    type PerStream = ();

    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError> {
        let role = Role::from_json(config)?;
        let mut c = |name: &str| setup.counter(&format!("edgewise.mesh_identity.{name}"));
        let cache_size = match &role {
            Role::Gateway(g) => g.token_cache_size,
            Role::Sidecar(_) => 0,
        };
        Ok(MeshIdentity {
            cache: Mutex::new(TokenCache::new(cache_size)),
            authenticated: c("gateway.authenticated"),
            unauthenticated: c("gateway.unauthenticated"),
            invalid_token: c("gateway.invalid_token"),
            bad_request: c("gateway.bad_request"),
            trusted_peer: c("sidecar.trusted_peer"),
            untrusted_peer: c("sidecar.untrusted_peer"),
            role,
        })
    }

    fn on_request_headers<S: Stream>(&self, s: &mut S, _: &mut ()) -> Flow {
        match &self.role {
            Role::Gateway(gateway) => {
                let now_s = s.now_ms() / 1000;
                // The verified value, when it is forwarded: it replaces every Authorization sent.
                let mut verified: Option<String> = None;
                let authenticated = {
                    let authorization = s.request_header("authorization");
                    header_text("authorization", authorization.as_deref()).and_then(|authorization| {
                        if gateway.forward_token {
                            verified = authorization.map(str::to_string);
                        }
                        gateway.authenticate(authorization, now_s, &mut lock(&self.cache))
                    })
                };
                let headers = gateway.identity_headers();
                match authenticated {
                    Ok(identity) => {
                        let mut remove: Vec<&str> = headers.collect();
                        remove.push("authorization");
                        let mut set: Vec<(&str, &[u8])> =
                            identity.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
                        if let Some(authorization) = &verified {
                            set.push(("authorization", authorization.as_bytes()));
                        }
                        s.edit_request_headers(&remove, &set);
                        s.increment(self.authenticated);
                        Flow::Continue
                    }
                    Err(reply) => {
                        let (counter, challenge) = match (reply.error, reply.status) {
                            ("invalid_token", _) => (self.invalid_token, "Bearer error=\"invalid_token\""),
                            (_, 400) => (self.bad_request, "Bearer error=\"invalid_request\""),
                            _ => (self.unauthenticated, "Bearer"),
                        };
                        s.increment(counter);
                        s.reply(&reply, &[("www-authenticate", challenge)])
                    }
                }
            }
            Role::Sidecar(sidecar) => {
                if sidecar.trusts(s.peer_uri_san().as_deref()) {
                    s.increment(self.trusted_peer);
                } else {
                    let remove: Vec<&str> = sidecar.identity_headers.iter().map(String::as_str).collect();
                    s.edit_request_headers(&remove, &[]);
                    s.increment(self.untrusted_peer);
                }
                Flow::Continue
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(MeshIdentity);

#[cfg(test)]
mod tests;

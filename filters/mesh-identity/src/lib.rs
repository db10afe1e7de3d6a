//! Filter `mesh-identity` (GEP-3792 identity propagation), in one of two roles:
//!
//! - `gateway`: drops identity headers a client sent, authenticates the user's bearer token
//!   (JWT, `edgewise_core::generic::jwt`) and sets the identity headers from its claims; 401 otherwise.
//! - `sidecar`: keeps the identity headers only when the mTLS peer's SPIFFE ID is a trusted
//!   gateway, and removes them otherwise, so a workload can trust them exactly when the gateway
//!   vouched for them.

use edgewise_core::generic::auth::TokenCache;
use edgewise_core::generic::reply::header_text;
use edgewise_core::mesh_identity::{Role, Verified};
use edgewise_host::per_thread::PerThread;
use edgewise_host::{ConfigError, Counter, Filter, Flow, Setup, Stream};

#[derive(Clone)]
struct Work {
    cache: TokenCache<Verified>,
    authorization: String,
}

pub struct MeshIdentity {
    role: Role,
    /// Each worker's verified tokens (gateway role) and a copy of the Authorization it forwards:
    /// no lock between workers, no allocation per request once warm.
    work: PerThread<Work>,
    /// What an authenticated request loses first: every identity header and Authorization.
    forward_remove: Vec<String>,
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
        let (cache_size, forward_remove) = match &role {
            Role::Gateway(g) => {
                (g.token_cache_size, g.identity_headers().chain(["authorization"]).map(String::from).collect())
            }
            Role::Sidecar(_) => (0, Vec::new()),
        };
        Ok(MeshIdentity {
            work: PerThread::new(Work { cache: TokenCache::new(cache_size), authorization: String::new() }),
            forward_remove,
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
                self.work.with(|work| {
                    let Work { cache, authorization: verified } = work;
                    let authenticated = {
                        let authorization = s.request_header("authorization");
                        header_text("authorization", authorization.as_deref()).and_then(|authorization| {
                            // The verified value, when it is forwarded: it replaces every
                            // Authorization sent.
                            verified.clear();
                            verified.push_str(authorization.unwrap_or_default());
                            gateway.authenticate(authorization, now_s, cache)
                        })
                    };
                    match authenticated {
                        Ok(identity) => {
                            s.edit_request_headers(&self.forward_remove, &identity.headers);
                            if gateway.forward_token {
                                s.set_request_header("authorization", verified.as_bytes());
                            }
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
                })
            }
            Role::Sidecar(sidecar) => {
                if sidecar.trusts(s.peer_uri_san().as_deref()) {
                    s.increment(self.trusted_peer);
                } else {
                    s.edit_request_headers::<_, &str, &[u8]>(&sidecar.identity_headers, &[]);
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

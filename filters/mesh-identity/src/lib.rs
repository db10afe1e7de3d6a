//! proxy-wasm filter `mesh-identity` (GEP-3792 identity propagation), in one of two roles:
//!
//! - `gateway`: drops identity headers a client sent, authenticates the user's bearer token
//!   (JWT, `edgewise_core::jwt`) and sets the identity headers from its claims; 401 otherwise.
//! - `sidecar`: keeps the identity headers only when the mTLS peer's SPIFFE ID is a trusted
//!   gateway, and removes them otherwise, so a workload can trust them exactly when the gateway
//!   vouched for them.

use std::cell::RefCell;
use std::rc::Rc;

use edgewise_core::auth::TokenCache;
use edgewise_core::mesh::{Role, Verified};
use edgewise_core::reply::header_text;
use edgewise_host as host;
use host::Counter;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    role: Role,
    /// Verified tokens of this worker (gateway role).
    cache: RefCell<TokenCache<Verified>>,
    authenticated: Counter,
    unauthenticated: Counter,
    invalid_token: Counter,
    bad_request: Counter,
    trusted_peer: Counter,
    untrusted_peer: Counter,
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(role) = host::configure("mesh-identity", Role::from_json) else {
            return false;
        };
        let c = |name: &str| Counter::define(&format!("edgewise.mesh_identity.{name}"));
        let cache_size = match &role {
            Role::Gateway(g) => g.token_cache_size,
            Role::Sidecar(_) => 0,
        };
        self.shared = Some(Rc::new(Shared {
            role,
            cache: RefCell::new(TokenCache::new(cache_size)),
            authenticated: c("gateway.authenticated"),
            unauthenticated: c("gateway.unauthenticated"),
            invalid_token: c("gateway.invalid_token"),
            bad_request: c("gateway.bad_request"),
            trusted_peer: c("sidecar.trusted_peer"),
            untrusted_peer: c("sidecar.untrusted_peer"),
        }));
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { shared: self.shared.clone()? }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    shared: Rc<Shared>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let s = &self.shared;
        match &s.role {
            Role::Gateway(gateway) => {
                for header in gateway.identity_headers() {
                    host::set_request_header(header, None);
                }
                let authorization = host::request_header("authorization");
                // The cache is never borrowed twice on one thread; verify without it if it were.
                let mut uncached = TokenCache::new(0);
                let mut borrowed = s.cache.try_borrow_mut();
                let cache = match borrowed.as_deref_mut() {
                    Ok(cache) => cache,
                    Err(_) => &mut uncached,
                };
                let now_s = host::now_ms() / 1000;
                let authenticated = header_text("authorization", authorization.as_deref())
                    .and_then(|authorization| gateway.authenticate(authorization, now_s, cache));
                match authenticated {
                    Ok(identity) => {
                        for (header, value) in &identity.headers {
                            host::set_request_header(header, Some(value.as_bytes()));
                        }
                        if !gateway.forward_token {
                            host::set_request_header("authorization", None);
                        }
                        s.authenticated.inc();
                        Action::Continue
                    }
                    Err(reply) => {
                        let challenge = if reply.error == "invalid_token" {
                            s.invalid_token.inc();
                            "Bearer error=\"invalid_token\""
                        } else if reply.status == 400 {
                            s.bad_request.inc();
                            "Bearer error=\"invalid_request\""
                        } else {
                            s.unauthenticated.inc();
                            "Bearer"
                        };
                        host::reply_with(&reply, &[("www-authenticate", challenge)])
                    }
                }
            }
            Role::Sidecar(sidecar) => {
                let peer = host::property_string(&["connection", "uri_san_peer_certificate"]);
                if sidecar.trusts(peer.as_deref()) {
                    s.trusted_peer.inc();
                } else {
                    for header in &sidecar.identity_headers {
                        host::set_request_header(header, None);
                    }
                    s.untrusted_peer.inc();
                }
                Action::Continue
            }
        }
    }
}

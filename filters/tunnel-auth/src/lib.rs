//! proxy-wasm filter `tunnel-auth`, on the reverse-tunnel hub: authenticates the caller's JWT,
//! authorizes the cluster named in the path, and selects that cluster's tunnel by setting the
//! selection header itself (a client's own value never survives). The decisions live in
//! `edgewise_core::tunnel`; keys are fetched and shared by `edgewise_host::jwks`.
//!
//! Unlike cloud-connector, requests are not paused while keys are fetched: a hub caller is a
//! person or a CI job that retries, so a missing key set answers 503 at once and an unknown kid
//! 401 (after scheduling one refetch per cooldown).

use std::cell::RefCell;
use std::rc::Rc;

use edgewise_core::auth::{Keyring, TokenCache};
use edgewise_core::reply::header_text;
use edgewise_core::tunnel::{Decision, Hub, Outcome};
use edgewise_host as host;
use host::jwks::Fetcher;
use host::Counter;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    hub: Hub,
    keyring: RefCell<Keyring>,
    cache: RefCell<TokenCache>,
    fetcher: RefCell<Fetcher>,
    outcomes: [Counter; Outcome::ALL.len()],
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(s) = &self.shared else { return };
        if let (Ok(mut fetcher), Ok(mut keyring)) = (s.fetcher.try_borrow_mut(), s.keyring.try_borrow_mut()) {
            fetcher.on_response(token, body_size, &s.hub.verifier.issuers, &s.hub.jwks, &mut keyring);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(hub) = host::configure("tunnel-auth", Hub::from_json) else {
            return false;
        };
        let namespace = host::plugin_name("tunnel-auth");
        self.shared = Some(Rc::new(Shared {
            keyring: RefCell::new(Keyring::new(hub.verifier.issuers.len())),
            cache: RefCell::new(TokenCache::new(hub.token_cache_size)),
            fetcher: RefCell::new(Fetcher::new("tunnel_auth", &hub.verifier.issuers, &namespace)),
            outcomes: Outcome::ALL.map(|o| Counter::define(&format!("edgewise.tunnel_auth.requests.{}", o.name()))),
            hub,
        }));
        host::set_tick_period(std::time::Duration::from_millis(200));
        true
    }

    fn on_tick(&mut self) {
        let Some(s) = &self.shared else { return };
        if let (Ok(mut fetcher), Ok(mut keyring)) = (s.fetcher.try_borrow_mut(), s.keyring.try_borrow_mut()) {
            fetcher.on_tick(&s.hub.verifier.issuers, &s.hub.jwks, &mut keyring);
        }
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
        let hub = &s.hub;
        let headers = host::request_headers();
        let count = |o: Outcome| {
            if let Some(c) = s.outcomes.get(o as usize) {
                c.inc();
            }
        };
        let text = |name: &str| header_text(name, host::header(&headers, name));
        let (path, authorization) = match (text(":path"), text("authorization")) {
            (Ok(path), Ok(authorization)) => (path.unwrap_or_default(), authorization),
            (Err(reply), _) | (_, Err(reply)) => {
                count(Outcome::BadRequest);
                return host::reply(&reply);
            }
        };
        let now_ms = host::now_ms();
        let decide = || {
            let keyring = s.keyring.try_borrow().ok()?;
            let mut cache = s.cache.try_borrow_mut().ok()?;
            Some(hub.decide(path, authorization, &keyring, &mut cache, now_ms / 1000))
        };
        let mut decision = decide();
        if let Some(Decision::Deny { outcome: Outcome::KeysUnavailable, .. }) = decision {
            // Another worker may have fetched the keys since this one's last tick.
            if let (Ok(fetcher), Ok(mut keyring)) = (s.fetcher.try_borrow(), s.keyring.try_borrow_mut()) {
                for issuer in 0..hub.verifier.issuers.len() {
                    fetcher.sync(issuer, &mut keyring);
                }
            }
            decision = decide();
        }
        match decision {
            Some(Decision::Forward { cluster, path: rest }) => {
                count(Outcome::Allowed);
                let keep = |k: &[u8]| {
                    k != b":path"
                        && k != hub.cluster_header.as_bytes()
                        && (hub.forward_authorization || k != b"authorization")
                };
                let mut out: Vec<(&[u8], &[u8])> =
                    headers.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
                out.push((b":path", rest.as_bytes()));
                out.push((hub.cluster_header.as_bytes(), cluster.as_bytes()));
                host::set_request_headers(&out);
                Action::Continue
            }
            Some(Decision::Deny { outcome, reply, www_authenticate }) => {
                count(outcome);
                let extra: Vec<(&str, &str)> = www_authenticate.map(|w| ("www-authenticate", w)).into_iter().collect();
                host::reply_with(&reply, &extra)
            }
            Some(Decision::UnknownKid { issuer, reply }) => {
                count(Outcome::Unauthenticated);
                if let Ok(fetcher) = s.fetcher.try_borrow() {
                    fetcher.refetch_for_unknown_kid(issuer, now_ms, hub.jwks.kid_miss_cooldown_seconds * 1000);
                }
                host::reply_with(&reply, &[("www-authenticate", "Bearer error=\"invalid_token\"")])
            }
            None => host::reply(&edgewise_core::reply::Reply::new(500, "internal", "filter state busy")),
        }
    }
}

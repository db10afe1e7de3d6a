//! proxy-wasm filter `egress`: `FOO.egress.local[:port]` -> `FOO` for allowlisted destinations.
//! The policy lives in `edgewise_core::egress`; this crate reads `:authority`, applies the
//! decision, and counts requests, responses and upstream latency per allowlist entry (so the
//! number of metrics is bounded by the allowlist, whatever hosts are asked for).
//!
//! The rest of the egress path is Envoy's: the dynamic forward proxy resolves `FOO`, RBAC refuses
//! private and reserved upstream addresses unless this filter marked the destination as allowed
//! to be private, and the cluster originates TLS to `FOO` with SNI and certificate checks.

use std::rc::Rc;

use edgewise_core::egress::{Decision, Denial, Policy};
use edgewise_core::reply::header_text;
use edgewise_host as host;
use host::{Counter, Histogram};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

/// Set on every allowed request (overwriting whatever a client sent): the allowlist entry's label,
/// prefixed with `private:` when the destination may resolve to a private address. The RBAC
/// policy in envoy/egress.yaml lets only the prefixed ones reach private addresses, and the local
/// reply mapper uses the header to tell an RBAC denial from other 403s. It never leaves Envoy.
const DEST_HEADER: &str = "x-edgewise-egress-destination";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    policy: Policy,
    denied: [Counter; Denial::ALL.len()],
    destinations: Vec<Destination>,
}

/// Metrics of one allowlist entry.
struct Destination {
    requests: Counter,
    /// 1xx .. 5xx
    responses: [Counter; 5],
    upstream_ms: Histogram,
}

impl Shared {
    fn new(policy: Policy) -> Self {
        let p = "edgewise.egress";
        let destinations = policy
            .labels()
            .map(|label| Destination {
                requests: Counter::define(&format!("{p}.dest.{label}.requests")),
                responses: [1, 2, 3, 4, 5].map(|c| Counter::define(&format!("{p}.dest.{label}.responses.{c}xx"))),
                upstream_ms: Histogram::define(&format!("{p}.dest.{label}.upstream_ms")),
            })
            .collect();
        let denied = Denial::ALL.map(|d| Counter::define(&format!("{p}.denied.{}", d.name())));
        Shared { policy, denied, destinations }
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(policy) = host::configure("egress", Policy::from_json) else {
            return false;
        };
        self.shared = Some(Rc::new(Shared::new(policy)));
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { shared: self.shared.clone()?, destination: None, started_ms: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    shared: Rc<Shared>,
    /// The allowlist entry this request went out under.
    destination: Option<usize>,
    started_ms: u64,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let shared = &self.shared;
        let authority = host::request_header(":authority");
        let decision = match header_text(":authority", authority.as_deref()) {
            Ok(authority) => shared.policy.decide(authority.unwrap_or_default()),
            Err(reply) => Decision::Deny(Denial::InvalidDestination, reply),
        };
        match decision {
            Decision::Allow(allowed) => {
                host::set_request_header(":authority", Some(allowed.authority.as_bytes()));
                host::set_request_header(DEST_HEADER, Some(allowed.marker.as_bytes()));
                if let Some(d) = shared.destinations.get(allowed.entry) {
                    d.requests.inc();
                }
                self.destination = Some(allowed.entry);
                self.started_ms = host::now_ms();
                Action::Continue
            }
            Decision::Deny(denial, reply) => {
                if let Some(c) = shared.denied.get(denial as usize) {
                    c.inc();
                }
                host::reply(&reply)
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(d) = self.destination.and_then(|i| self.shared.destinations.get(i)) else {
            return Action::Continue;
        };
        let status = host::response_header(":status");
        let class =
            status.as_deref().and_then(|s| std::str::from_utf8(s).ok()?.parse::<usize>().ok()).map_or(5, |s| s / 100);
        if let Some(c) = class.checked_sub(1).and_then(|i| d.responses.get(i)) {
            c.inc();
        }
        d.upstream_ms.record(host::now_ms().saturating_sub(self.started_ms));
        Action::Continue
    }
}

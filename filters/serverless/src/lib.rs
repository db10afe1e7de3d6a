//! proxy-wasm filter `serverless`: decodes function hosts, rewrites Host to the function's Knative
//! host and selects the customer's cluster. The decisions live in `edgewise_core::serverless`;
//! this crate reads headers, polls the management service and applies what core decides.

mod poller;

use std::cell::RefCell;
use std::rc::Rc;

use edgewise_core::reply::{header_text, Reply};
use edgewise_core::serverless::{Decision, Outcome, Router, Scratch};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use edgewise_host as host;
use host::{Counter, Gauge};
use poller::Poller;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// What every request of this VM reads: the compiled router, scratch space and metric handles.
struct Shared {
    router: RefCell<Router>,
    scratch: RefCell<Scratch>,
    metrics: Metrics,
    /// Present when a management service is configured.
    poller: Option<RefCell<Poller>>,
}

struct Metrics {
    outcomes: [Counter; Outcome::ALL.len()],
    fetch_ok: Counter,
    fetch_not_modified: Counter,
    fetch_failed: Counter,
    table_version: Gauge,
    table_routes: Gauge,
    table_age_seconds: Gauge,
}

impl Metrics {
    fn define() -> Self {
        let p = "edgewise.serverless";
        Metrics {
            outcomes: Outcome::ALL.map(|o| Counter::define(&format!("{p}.requests.{}", o.name()))),
            fetch_ok: Counter::define(&format!("{p}.management_fetch.ok")),
            fetch_not_modified: Counter::define(&format!("{p}.management_fetch.not_modified")),
            fetch_failed: Counter::define(&format!("{p}.management_fetch.failed")),
            table_version: Gauge::define(&format!("{p}.table.version")),
            table_routes: Gauge::define(&format!("{p}.table.routes")),
            table_age_seconds: Gauge::define(&format!("{p}.table.age_seconds")),
        }
    }

    fn count(&self, outcome: Outcome) {
        // `Outcome::ALL` lists every variant in declaration order.
        if let Some(counter) = self.outcomes.get(outcome as usize) {
            counter.inc();
        }
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl Root {
    fn with_poller(&self, f: impl FnOnce(&mut Poller, &Rc<Shared>)) {
        if let Some(shared) = &self.shared {
            if let Some(Ok(mut poller)) = shared.poller.as_ref().map(RefCell::try_borrow_mut) {
                f(&mut poller, shared);
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        self.with_poller(|poller, shared| poller.on_response(token, body_size, shared));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(router) = host::configure("serverless", Router::from_json) else {
            return false;
        };
        let metrics = Metrics::define();
        metrics.table_routes.set(0);
        let poller = router.management.clone().map(|m| Poller::new(m, &host::plugin_name("serverless")));
        if let Some(poller) = &poller {
            host::set_tick_period(poller.tick_period());
        }
        let scratch = RefCell::new(router.decoder.scratch());
        self.shared =
            Some(Rc::new(Shared { router: RefCell::new(router), scratch, metrics, poller: poller.map(RefCell::new) }));
        true
    }

    fn on_tick(&mut self) {
        self.with_poller(|poller, shared| poller.on_tick(shared));
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

impl Filter {
    /// Decides and applies; `None` when the route table has not been loaded in this VM yet.
    fn route(&self, authority: &str) -> Option<Action> {
        let shared = &self.shared;
        let (Ok(router), Ok(mut scratch)) = (shared.router.try_borrow(), shared.scratch.try_borrow_mut()) else {
            return Some(host::reply(&Reply::new(500, "internal", "router busy")));
        };
        // Only the filter may choose the cluster: a value a client sent is removed (or, on a
        // routed request, overwritten).
        Some(match router.decide(authority, &mut scratch) {
            Decision::PassThrough => {
                host::set_request_header(&router.cluster_header, None);
                Action::Continue
            }
            Decision::Route(target) => {
                host::set_request_header("x-forwarded-host", Some(authority.as_bytes()));
                host::set_request_header(&router.cluster_header, Some(target.cluster.as_bytes()));
                host::set_request_header(":authority", Some(target.host.as_bytes()));
                shared.metrics.count(Outcome::Routed);
                Action::Continue
            }
            Decision::Reject(Outcome::TableUnavailable, _) if shared.poller.is_some() => return None,
            Decision::Reject(outcome, reply) => {
                shared.metrics.count(outcome);
                host::reply(&reply)
            }
        })
    }
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let authority = host::request_header(":authority");
        let authority = match header_text(":authority", authority.as_deref()) {
            Ok(Some(authority)) => authority,
            Ok(None) => {
                if let Ok(router) = self.shared.router.try_borrow() {
                    host::set_request_header(&router.cluster_header, None);
                }
                return Action::Continue;
            }
            Err(reply) => {
                self.shared.metrics.count(Outcome::MalformedHost);
                return host::reply(&reply);
            }
        };
        if let Some(action) = self.route(authority) {
            return action;
        }
        // No table in this VM yet: another worker may have loaded one since this VM's last tick.
        if let Some(Ok(mut poller)) = self.shared.poller.as_ref().map(RefCell::try_borrow_mut) {
            poller.sync(&self.shared);
        }
        self.route(authority).unwrap_or_else(|| {
            self.shared.metrics.count(Outcome::TableUnavailable);
            host::reply(&Reply::new(
                503,
                "route_table_unavailable",
                format!("the route table has not been loaded yet; cannot route {authority}"),
            ))
        })
    }
}

//! Filter `serverless`: decodes function hosts, rewrites Host to the function's Knative host and
//! selects the customer's cluster. The decisions are `edgewise_core::serverless`'s; this crate
//! reads `:authority`, polls the management service (`poller`) and applies what core decides.

mod poller;

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use edgewise_core::generic::reply::{header_text, Reply};
use edgewise_core::serverless::{Decision, Outcome, Router, Scratch};
use edgewise_host::{lock, read, Background, ConfigError, Counter, Fetched, Filter, Flow, Gauge, Hooks, Host};
use edgewise_host::{Setup, Stream};

use poller::Poller;

pub struct Serverless {
    router: RwLock<Router>,
    /// Matching space for host patterns, one per request in flight (no allocation per request).
    scratch: Mutex<Vec<Scratch>>,
    metrics: Metrics,
    /// Present when a management service is configured.
    poller: Option<Poller>,
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
    fn define(setup: &mut dyn Setup) -> Self {
        let p = "edgewise.serverless";
        Metrics {
            outcomes: Outcome::ALL.map(|o| setup.counter(&format!("{p}.requests.{}", o.name()))),
            fetch_ok: setup.counter(&format!("{p}.management_fetch.ok")),
            fetch_not_modified: setup.counter(&format!("{p}.management_fetch.not_modified")),
            fetch_failed: setup.counter(&format!("{p}.management_fetch.failed")),
            table_version: setup.gauge(&format!("{p}.table.version")),
            table_routes: setup.gauge(&format!("{p}.table.routes")),
            table_age_seconds: setup.gauge(&format!("{p}.table.age_seconds")),
        }
    }

    fn count(&self, host: &impl Host, outcome: Outcome) {
        // `Outcome::ALL` lists every variant in declaration order.
        if let Some(&counter) = self.outcomes.get(outcome as usize) {
            host.increment(counter);
        }
    }
}

impl Filter for Serverless {
    const NAME: &'static str = "serverless";
    const HOOKS: Hooks = Hooks { response_headers: false, background: true };
    type PerStream = ();

    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError> {
        let router = Router::from_json(config)?;
        let metrics = Metrics::define(setup);
        let share = !setup.shared_by_workers();
        let poller = router.management.clone().map(|m| Poller::new(m, setup.instance(), share));
        let scratch = Mutex::new(vec![router.decoder.scratch()]);
        Ok(Serverless { router: RwLock::new(router), scratch, metrics, poller })
    }

    fn on_request_headers<S: Stream>(&self, s: &mut S, _: &mut ()) -> Flow {
        // A copy: natively the value is Envoy's own, and the writes below would invalidate it.
        let authority = s.request_header(":authority").map(|a| a.into_owned());
        let authority = match header_text(":authority", authority.as_deref()) {
            Ok(Some(authority)) => authority,
            Ok(None) => return self.pass_through(s),
            Err(reply) => {
                self.metrics.count(s, Outcome::MalformedHost);
                return s.reply(&reply, &[]);
            }
        };
        match self.route(s, authority) {
            Some(flow) => flow,
            None => {
                // No table here yet: another worker may have loaded one since this one's last tick.
                if let Some(poller) = &self.poller {
                    poller.sync(s, self);
                }
                self.route(s, authority).unwrap_or_else(|| {
                    self.metrics.count(s, Outcome::TableUnavailable);
                    let detail = format!("the route table has not been loaded yet; cannot route {authority}");
                    s.reply(&Reply::new(503, "route_table_unavailable", detail), &[])
                })
            }
        }
    }

    fn tick_period(&self) -> Option<Duration> {
        self.poller.as_ref().map(Poller::tick_period)
    }

    fn on_tick<B: Background>(&self, bg: &mut B) {
        if let Some(poller) = &self.poller {
            poller.on_tick(bg, self);
        }
    }

    fn on_fetched<B: Background>(&self, bg: &mut B, id: u64, response: &Fetched) {
        if let Some(poller) = &self.poller {
            poller.on_fetched(bg, id, response, self);
        }
    }
}

impl Serverless {
    /// Decides and applies; `None` when a management service is configured and no route table
    /// has been loaded yet.
    fn route(&self, s: &mut impl Stream, authority: &str) -> Option<Flow> {
        let router = read(&self.router);
        let mut scratch = lock(&self.scratch).pop().unwrap_or_else(|| router.decoder.scratch());
        let decision = router.decide(authority, &mut scratch);
        let flow = match decision {
            // Only the filter may choose the cluster: a value a client sent is removed (or, on a
            // routed request, overwritten).
            Decision::PassThrough => {
                s.remove_request_header(&router.cluster_header);
                Some(Flow::Continue)
            }
            Decision::Route(target) => {
                s.set_request_header("x-forwarded-host", authority.as_bytes());
                s.set_request_header(&router.cluster_header, target.cluster.as_bytes());
                s.set_request_header(":authority", target.host.as_bytes());
                self.metrics.count(s, Outcome::Routed);
                Some(Flow::Continue)
            }
            Decision::Reject(Outcome::TableUnavailable, _) if self.poller.is_some() => None,
            Decision::Reject(outcome, reply) => {
                self.metrics.count(s, outcome);
                Some(s.reply(&reply, &[]))
            }
        };
        lock(&self.scratch).push(scratch);
        flow
    }

    fn pass_through(&self, s: &mut impl Stream) -> Flow {
        s.remove_request_header(&read(&self.router).cluster_header);
        Flow::Continue
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(Serverless);

#[cfg(test)]
mod tests;

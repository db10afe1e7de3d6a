//! Filter `serverless`: decodes function hosts, rewrites Host to the function's Knative host and
//! selects the customer's cluster. The decisions are `edgewise_core::serverless`'s; this crate
//! reads `:authority`, keeps the management service's routes (`watch`, `store`) and applies
//! what core decides.

mod store;
mod watch;

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use edgewise_core::generic::reply::header_text;
use edgewise_core::serverless::{Decision, ManagedRoutes, Outcome, Router, Scratch};
use edgewise_host::per_thread::PerThread;
use edgewise_host::{Background, ConfigError, Counter, Fetched, Filter, Flow, Gauge, Hooks, Host};
use edgewise_host::{Setup, Stream, StreamEvent};

use watch::Watcher;

pub struct Serverless {
    router: Router,
    /// Each worker's space for a request (no allocation per request, no lock between workers).
    work: PerThread<Work>,
    metrics: Metrics,
    /// Present when a management service is configured.
    watcher: Option<Arc<Watcher>>,
}

/// The watcher of a configuration. On proxy-wasm each VM has its own, and the copies share the
/// table and one watch through shared data. Natively the table is in the watcher, so every
/// configuration of the same name and bytes in the process (a listener's filter chains that
/// repeat the filter, a listener being replaced) shares one watcher: one table, one watch. A
/// configuration of the same name and other bytes gets a namespace of its own.
fn native_watcher(instance: &str, config: &[u8], make: impl FnOnce(&str) -> Watcher) -> Arc<Watcher> {
    type Registry = (u64, Vec<(String, Vec<u8>, Weak<Watcher>)>);
    static WATCHERS: Mutex<Registry> = Mutex::new((0, Vec::new()));
    let mut guard = WATCHERS.lock().unwrap_or_else(PoisonError::into_inner);
    let (made, watchers) = &mut *guard;
    watchers.retain(|(_, _, w)| w.strong_count() > 0);
    let found = watchers.iter().find(|(i, c, _)| i == instance && c == config).and_then(|(_, _, w)| w.upgrade());
    found.unwrap_or_else(|| {
        *made += 1;
        let watcher = Arc::new(make(&format!("{instance}.{made}")));
        watchers.push((instance.to_string(), config.to_vec(), Arc::downgrade(&watcher)));
        watcher
    })
}

#[derive(Clone)]
struct Work {
    /// Matching space for host patterns and the route's key and bucket.
    scratch: Scratch,
    /// A copy of `:authority`: natively the value is Envoy's own, and the writes of a routed
    /// request would invalidate it.
    authority: Vec<u8>,
}

struct Metrics {
    outcomes: [Counter; Outcome::ALL.len()],
    fetch_ok: Counter,
    fetch_not_modified: Counter,
    fetch_failed: Counter,
    fetch_rejected: Counter,
    fetch_gone: Counter,
    full_loads: Counter,
    table_version: Gauge,
    table_routes: Gauge,
    table_age_seconds: Gauge,
    table_change_age_seconds: Gauge,
}

impl Metrics {
    fn define(setup: &mut dyn Setup) -> Self {
        let p = "edgewise.serverless";
        Metrics {
            outcomes: Outcome::ALL.map(|o| setup.counter(&format!("{p}.requests.{}", o.name()))),
            fetch_ok: setup.counter(&format!("{p}.management_fetch.ok")),
            fetch_not_modified: setup.counter(&format!("{p}.management_fetch.not_modified")),
            fetch_failed: setup.counter(&format!("{p}.management_fetch.failed")),
            fetch_rejected: setup.counter(&format!("{p}.management_fetch.rejected")),
            fetch_gone: setup.counter(&format!("{p}.management_fetch.gone")),
            full_loads: setup.counter(&format!("{p}.table.full_loads")),
            table_version: setup.gauge(&format!("{p}.table.version")),
            table_routes: setup.gauge(&format!("{p}.table.routes")),
            table_age_seconds: setup.gauge(&format!("{p}.table.age_seconds")),
            table_change_age_seconds: setup.gauge(&format!("{p}.table.change_age_seconds")),
        }
    }

    fn count(&self, host: &impl Host, outcome: Outcome) {
        // `Outcome::ALL` lists every variant in declaration order.
        if let Some(&counter) = self.outcomes.get(outcome as usize) {
            host.increment(counter);
        }
    }
}

impl Serverless {
    fn route<S: Stream>(&self, s: &mut S, work: &mut Work) -> Flow {
        let Work { scratch, authority } = work;
        authority.clear();
        let present = s.request_header(":authority").map(|a| authority.extend_from_slice(&a)).is_some();
        let authority = match header_text(":authority", present.then_some(authority.as_slice())) {
            Ok(Some(authority)) => authority,
            Ok(None) => {
                s.remove_request_header(&self.router.cluster_header);
                return Flow::Continue;
            }
            Err(reply) => {
                self.metrics.count(s, Outcome::MalformedHost);
                return s.reply(&reply, &[]);
            }
        };
        let view = self.watcher.as_ref().map(|w| w.store.view(&*s));
        match self.router.decide(authority, scratch, view.as_ref().map(|v| v as &dyn ManagedRoutes)) {
            // Only the filter may choose the cluster: a value a client sent is removed (or, on a
            // routed request, overwritten).
            Decision::PassThrough => {
                s.remove_request_header(&self.router.cluster_header);
                Flow::Continue
            }
            Decision::Route(target) => {
                s.set_request_header("x-forwarded-host", authority.as_bytes());
                s.set_request_header(&self.router.cluster_header, target.cluster.as_bytes());
                s.set_request_header(":authority", target.host.as_bytes());
                self.metrics.count(s, Outcome::Routed);
                Flow::Continue
            }
            Decision::Reject(outcome, reply) => {
                self.metrics.count(s, outcome);
                s.reply(&reply, &[])
            }
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
        let shared = !setup.shared_by_workers();
        let instance = setup.instance();
        let watcher = router.management.clone().map(|m| match shared {
            true => Arc::new(Watcher::new(m, instance, true)),
            false => native_watcher(instance, config, |namespace| Watcher::new(m, namespace, false)),
        });
        let work = PerThread::new(Work { scratch: router.decoder.scratch(), authority: Vec::with_capacity(256) });
        Ok(Serverless { router, work, metrics, watcher })
    }

    fn on_request_headers<S: Stream>(&self, s: &mut S, _: &mut ()) -> Flow {
        self.work.with(|work| self.route(s, work))
    }

    fn tick_period(&self) -> Option<Duration> {
        self.watcher.as_deref().map(Watcher::tick_period)
    }

    fn on_tick<B: Background>(&self, bg: &mut B) {
        if let Some(w) = &self.watcher {
            w.on_tick(bg, &self.router, &self.metrics);
        }
    }

    fn on_fetched<B: Background>(&self, bg: &mut B, id: u64, response: &Fetched) {
        if let Some(w) = &self.watcher {
            w.on_fetched(bg, id, response, &self.router, &self.metrics);
        }
    }

    fn on_stream<B: Background>(&self, bg: &mut B, id: u64, event: StreamEvent<'_>) {
        if let Some(w) = &self.watcher {
            w.on_stream(bg, id, event, &self.router, &self.metrics);
        }
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(Serverless);

#[cfg(test)]
mod tests;

//! Filter `cloud-connector`: the public edge in front of private feature backends. Routes by path
//! prefix to a feature, authenticates the bearer JWT against its issuer's keys, checks the
//! feature's scopes, applies per-organization rate limits, and forwards with identity headers the
//! gateway sets itself. The decisions are `edgewise_core::cloud_connector`'s (check order, when to
//! wait, which headers to strip and set); this crate reads the request, keeps keys fresh
//! (`edgewise_host::jwks`) and token buckets in shared data (`buckets`), and applies them.
//!
//! A request whose issuer's keys are being fetched (before the first fetch, or after a token named
//! an unknown kid) is paused, bounded by `jwks.wait_ms`; the background wakes it when the fetch
//! completes or its wait is over, and it is decided again.

mod buckets;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewise_core::cloud_connector::limiter::{Limit, Verdict};
use edgewise_core::cloud_connector::{
    Decision, Denial, Feature, Forwarded, Gateway, Identity, Outcome, Request, State, TokenCache, Wake,
};
use edgewise_core::generic::reply::{header_text, Reply};
use edgewise_host::jwks::Keys;
use edgewise_host::per_thread::PerThread;
use edgewise_host::{lock, Background, ConfigError, Counter, Fetched, Filter, Flow, Hooks, Host, Setup, Stream, Waker};

use buckets::Buckets;

pub struct CloudConnector {
    gw: Gateway,
    keys: Keys,
    /// Each worker's verified tokens and forwarding space: no lock between workers, no
    /// allocation per request once warm (a worker verifies a token once).
    work: PerThread<Work>,
    buckets: Buckets,
    waiters: Mutex<Vec<Waiter>>,
    /// Per feature (and a last row for "no feature"), one counter per outcome.
    requests: Vec<[Counter; Outcome::ALL.len()]>,
}

#[derive(Clone)]
struct Work {
    cache: TokenCache,
    forwarded: Forwarded,
}

/// A request paused until its issuer's keys arrive, or until its wait is over.
struct Waiter {
    waker: Waker,
    issuer: usize,
    wake: Wake,
    deadline_ms: u64,
}

impl Filter for CloudConnector {
    const NAME: &'static str = "cloud-connector";
    const HOOKS: Hooks = Hooks { response_headers: false, background: true };
    type PerStream = ();

    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError> {
        let gw = Gateway::from_json(config)?;
        let requests = gw
            .features
            .iter()
            .map(|f| f.name.as_str())
            .chain(["none"])
            .map(|feature| {
                Outcome::ALL
                    .map(|o| setup.counter(&format!("edgewise.cloud_connector.requests.{feature}.{}", o.name())))
            })
            .collect();
        Ok(CloudConnector {
            keys: Keys::new(setup, "cloud_connector", gw.issuers(), &gw.jwks),
            work: PerThread::new(Work { cache: TokenCache::new(gw.token_cache_size), forwarded: Forwarded::default() }),
            buckets: Buckets::new(setup.shared_by_workers(), setup.instance(), gw.slots, gw.idle_ms),
            waiters: Mutex::new(Vec::new()),
            requests,
            gw,
        })
    }

    fn on_request_headers<S: Stream>(&self, stream: &mut S, _: &mut ()) -> Flow {
        self.handle(stream, true)
    }

    fn on_resume<S: Stream>(&self, stream: &mut S) -> Flow {
        self.handle(stream, false)
    }

    // Often enough to take a due lease promptly and to wake paused requests soon after another
    // worker fetched their keys.
    fn tick_period(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }

    fn on_tick<B: Background>(&self, bg: &mut B) {
        self.keys.on_tick(bg);
        self.wake_waiters(bg);
    }

    fn on_fetched<B: Background>(&self, bg: &mut B, id: u64, response: &Fetched) {
        self.keys.on_fetched(bg, id, response);
        self.wake_waiters(bg);
    }
}

/// What a decision comes to once the request's headers are no longer needed.
enum Apply<'a> {
    Health,
    Public,
    /// The request's forwarding space is filled in.
    Forward {
        feature: &'a Feature,
        index: usize,
        id: Arc<Identity>,
    },
    Deny {
        feature: Option<usize>,
        denial: Denial,
        id: Option<Arc<Identity>>,
        reply: Reply,
        headers: Vec<(&'static str, String)>,
    },
    Wait {
        issuer: usize,
        wake: Wake,
    },
}

impl CloudConnector {
    /// Decides the request and applies the decision.
    fn handle<S: Stream>(&self, s: &mut S, may_wait: bool) -> Flow {
        self.work.with(|work| {
            let now_ms = s.now_ms();
            let mut may_wait = may_wait;
            loop {
                let apply = match self.decide(s, now_ms, may_wait, work) {
                    // Without a waker the request cannot wait: decided again, not waiting.
                    Apply::Wait { issuer, wake } => match s.waker() {
                        Some(waker) => {
                            let deadline_ms = now_ms + self.gw.jwks.wait_ms;
                            lock(&self.waiters).push(Waiter { waker, issuer, wake, deadline_ms });
                            return Flow::Stop;
                        }
                        None => {
                            may_wait = false;
                            continue;
                        }
                    },
                    apply => apply,
                };
                return self.apply(s, apply, &work.forwarded, now_ms);
            }
        })
    }

    fn apply<S: Stream>(&self, s: &mut S, apply: Apply, forwarded: &Forwarded, now_ms: u64) -> Flow {
        match apply {
            Apply::Health => self.health(s, now_ms),
            Apply::Public => {
                s.remove_request_header(&self.gw.cluster_header);
                Flow::Continue
            }
            Apply::Forward { feature, index, id } => {
                let (remove, set) = self.gw.forward_headers(feature, &id, forwarded);
                s.edit_request_headers(remove, set.as_slice());
                self.count(s, Some(index), Outcome::Allowed);
                self.log_state(s, Some(index), Outcome::Allowed, Some(&id));
                Flow::Continue
            }
            Apply::Deny { feature, denial, id, reply, headers } => {
                let outcome = denial.outcome();
                self.count(s, feature, outcome);
                self.log_state(s, feature, outcome, id.as_deref());
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                s.reply(&reply, &headers)
            }
            // Decided again without waiting (`handle`).
            Apply::Wait { .. } => Flow::Stop,
        }
    }

    /// Reads what the gateway interprets (as text: any other bytes are a 400) and decides.
    fn decide<S: Stream>(&self, s: &S, now_ms: u64, may_wait: bool, work: &mut Work) -> Apply<'_> {
        let h = &self.gw.headers;
        let (path, method) = (s.request_header(":path"), s.request_header(":method"));
        let (authorization, instance_id, realm) =
            (s.request_header("authorization"), s.request_header(&h.instance_id), s.request_header(&h.realm));
        fn text<'a>(name: &str, value: &'a Option<Cow<[u8]>>) -> Result<Option<&'a str>, Reply> {
            header_text(name, value.as_deref())
        }
        let req = match (
            text(":path", &path),
            text(":method", &method),
            text("authorization", &authorization),
            text(&h.instance_id, &instance_id),
            text(&h.realm, &realm),
        ) {
            (Ok(path), Ok(method), Ok(authorization), Ok(instance_id), Ok(realm)) => Request {
                path: path.unwrap_or_default(),
                method: method.unwrap_or_default(),
                authorization,
                instance_id,
                realm,
            },
            (Err(reply), ..)
            | (_, Err(reply), ..)
            | (_, _, Err(reply), ..)
            | (.., Err(reply), _)
            | (.., Err(reply)) => {
                let feature = path.as_deref().and_then(|p| self.gw.route(std::str::from_utf8(p).ok()?)).map(|(i, _)| i);
                let denial = Denial::BadHeader(reply.clone());
                return Apply::Deny { feature, denial, id: None, reply, headers: vec![] };
            }
        };
        let Work { cache, forwarded } = work;
        let mut state = Ctx { cc: self, host: s, cache };
        match self.gw.decide(&req, &mut state, now_ms, may_wait) {
            Decision::Health => Apply::Health,
            Decision::Public => Apply::Public,
            Decision::Forward { feature: index, id } => match self.gw.features.get(index) {
                Some(feature) => {
                    self.gw.forward(feature, &id, &req, now_ms, forwarded);
                    Apply::Forward { feature, index, id }
                }
                None => {
                    let (reply, headers) = Denial::NotFound.reply(req.path, None);
                    Apply::Deny { feature: None, denial: Denial::NotFound, id: None, reply, headers }
                }
            },
            Decision::Deny { feature, denial, id } => {
                let (reply, headers) = denial.reply(req.path, feature.and_then(|i| self.gw.features.get(i)));
                Apply::Deny { feature, denial, id, reply, headers }
            }
            Decision::Wait { issuer, wake } => Apply::Wait { issuer, wake },
        }
    }

    fn count(&self, host: &impl Host, feature: Option<usize>, outcome: Outcome) {
        let row = feature.unwrap_or(self.requests.len().saturating_sub(1));
        if let Some(&counter) = self.requests.get(row).and_then(|r| r.get(outcome as usize)) {
            host.increment(counter);
        }
    }

    /// What the access log prints (`%FILTER_STATE(<prefix>.cloud_connector_<field>:PLAIN)%`).
    fn log_state(&self, s: &mut impl Stream, feature: Option<usize>, outcome: Outcome, id: Option<&Identity>) {
        let name = feature.and_then(|i| self.gw.features.get(i)).map_or("none", |f| f.name.as_str());
        s.log_field("cloud_connector_feature", name);
        s.log_field("cloud_connector_outcome", outcome.name());
        if let Some(id) = id {
            s.log_field("cloud_connector_instance", &id.instance_id);
        }
    }

    /// The readiness endpoint: 200 when every issuer has keys, else 503.
    fn health(&self, s: &mut impl Stream, now_ms: u64) -> Flow {
        for issuer in 0..self.gw.issuers().len() {
            self.keys.sync(s, issuer);
        }
        let (status, body) = self.gw.health(&self.keys.keyring(), now_ms);
        s.send_reply(status, &edgewise_host::JSON_HEADERS, body.as_bytes());
        Flow::Stop
    }

    /// Wakes the paused requests whose issuer finished a fetch, or whose wait is over.
    fn wake_waiters(&self, bg: &mut impl Background) {
        let ready: Vec<Waker> = {
            let mut waiters = lock(&self.waiters);
            if waiters.is_empty() {
                return;
            }
            let now = bg.now_ms();
            // One shared-data read per issuer, not per waiter.
            let completed: Vec<u64> = (0..self.gw.issuers().len()).map(|i| self.keys.completed(bg, i)).collect();
            let keyring = self.keys.keyring();
            let mut ready = Vec::new();
            waiters.retain(|w| {
                let done = now >= w.deadline_ms
                    || match w.wake {
                        Wake::Keys => keyring.get(w.issuer).is_some(),
                        Wake::Refetch { completed: then } => completed.get(w.issuer) != Some(&then),
                    };
                if done {
                    ready.push(w.waker);
                }
                !done
            });
            ready
        };
        for waker in ready {
            bg.wake(waker);
        }
    }
}

/// The gateway's state as the decision sees it, on one host context.
struct Ctx<'a, H: Host> {
    cc: &'a CloudConnector,
    host: &'a H,
    cache: &'a mut TokenCache,
}

impl<H: Host> State for Ctx<'_, H> {
    fn authenticate(&mut self, gw: &Gateway, token: &str, now_ms: u64) -> Result<Arc<Identity>, Denial> {
        let keys = &self.cc.keys;
        // A statement of its own: the keyring's read guard must be gone before `sync` writes.
        let first = gw.authenticate(token, &keys.keyring(), self.cache, now_ms / 1000);
        match first {
            // No keys here yet: another worker may have fetched them since the last tick.
            Err(Denial::KeysUnavailable { issuer }) if keys.sync(self.host, issuer) => {
                gw.authenticate(token, &keys.keyring(), self.cache, now_ms / 1000)
            }
            result => result,
        }
    }

    fn refetch_for_unknown_kid(&mut self, issuer: usize, now_ms: u64) -> bool {
        self.cc.keys.refetch_for_unknown_kid(self.host, issuer, now_ms)
    }

    fn completed_fetches(&mut self, issuer: usize) -> u64 {
        self.cc.keys.completed(self.host, issuer)
    }

    fn take(&mut self, limit: &Limit, feature: usize, key: &str, now_ms: u64) -> Verdict {
        self.cc.buckets.take(self.host, limit, feature, key, now_ms)
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(CloudConnector);

#[cfg(test)]
mod tests;

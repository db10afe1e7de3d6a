//! proxy-wasm filter `cloud-connector`: the public edge in front of private feature backends.
//! Routes by path prefix to a feature, authenticates the bearer JWT against its issuer's keys,
//! checks the feature's scopes, applies per-organization rate limits, and forwards with identity
//! headers the gateway sets itself. The decisions live in `edgewise_core::connector`; this crate
//! reads headers, keeps keys fresh (`edgewise_host::jwks`), keeps token buckets in shared data (`buckets`) and
//! applies what core decides.
//!
//! A request whose issuer's keys are being fetched (before the first fetch, or after a token named
//! an unknown kid) is paused, bounded by `jwks.wait_ms`; the root context resumes it when the
//! fetch completes, by running the same decision on the paused stream.

mod buckets;

use std::cell::RefCell;
use std::rc::Rc;

use edgewise_core::connector::{Denial, Feature, Gateway, Identity, Keyring, Outcome, TokenCache};
use edgewise_core::reply::header_text;
use edgewise_host as host;
use host::Counter;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use buckets::Buckets;
use host::jwks::Fetcher;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, shared: None }) });
}}

/// Everything the requests of this VM share.
struct Shared {
    gw: Gateway,
    keyring: RefCell<Keyring>,
    cache: RefCell<TokenCache>,
    fetcher: RefCell<Fetcher>,
    buckets: Buckets,
    waiters: RefCell<Vec<Waiter>>,
    /// Per feature (and a last row for "no feature"), one counter per outcome.
    requests: Vec<[Counter; Outcome::ALL.len()]>,
    root_id: u32,
}

/// A request paused until its issuer's keys arrive, or until its wait is over.
struct Waiter {
    context_id: u32,
    issuer: usize,
    wake: Wake,
    deadline_ms: u64,
}

enum Wake {
    /// The issuer had no keys: wake once it has (a failed fetch is retried within the wait).
    Keys,
    /// The token's kid was unknown: wake when the refetch completed (this count changed),
    /// whether it brought the kid or not.
    Refetch { completed: u64 },
}

enum Step {
    Continue,
    Replied,
    Wait,
}

struct Root {
    id: u32,
    shared: Option<Rc<Shared>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(shared) = &self.shared else { return };
        if let (Ok(mut fetcher), Ok(mut keyring)) = (shared.fetcher.try_borrow_mut(), shared.keyring.try_borrow_mut()) {
            fetcher.on_response(token, body_size, shared.gw.issuers(), &shared.gw.jwks, &mut keyring);
        }
        shared.resume_waiters();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(gw) = host::configure("cloud-connector", Gateway::from_json) else {
            return false;
        };
        let namespace = host::plugin_name("cloud-connector");
        let requests = gw
            .features
            .iter()
            .map(|f| f.name.as_str())
            .chain(["none"])
            .map(|feature| {
                Outcome::ALL
                    .map(|o| Counter::define(&format!("edgewise.cloud_connector.requests.{feature}.{}", o.name())))
            })
            .collect();
        self.shared = Some(Rc::new(Shared {
            keyring: RefCell::new(Keyring::new(gw.issuers().len())),
            cache: RefCell::new(TokenCache::new(gw.token_cache_size)),
            fetcher: RefCell::new(Fetcher::new("cloud_connector", gw.issuers(), &namespace)),
            buckets: Buckets::new(&namespace, gw.slots, gw.idle_ms),
            waiters: RefCell::new(Vec::new()),
            requests,
            root_id: self.id,
            gw,
        }));
        // Often enough to take a due lease promptly and to wake paused requests soon after
        // another worker fetched their keys.
        host::set_tick_period(std::time::Duration::from_millis(100));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        if let (Ok(mut fetcher), Ok(mut keyring)) = (shared.fetcher.try_borrow_mut(), shared.keyring.try_borrow_mut()) {
            fetcher.on_tick(shared.gw.issuers(), &shared.gw.jwks, &mut keyring);
        }
        shared.resume_waiters();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { id: context_id, shared: self.shared.clone()? }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    id: u32,
    shared: Rc<Shared>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.shared.handle(self.id, true) {
            Step::Continue => Action::Continue,
            Step::Replied | Step::Wait => Action::Pause,
        }
    }

    // No on_log to forget a paused request the client gave up on: its waiter expires at its
    // deadline, and resuming a context Envoy deleted fails harmlessly (set_effective_context).
    // Without the export Envoy does not enter the VM once more per request.
}

impl Shared {
    /// Decides a request and applies the decision to the current (effective) stream.
    // The steps it calls once are kept out of it (`#[inline(never)]`): see edgewise_core::config::from_json.
    fn handle(&self, context_id: u32, may_wait: bool) -> Step {
        let gw = &self.gw;
        // One host call for every header this needs; one more to write them back. Headers the
        // gateway interprets must be text; the others pass through as the client sent them.
        let headers = host::request_headers();
        let text = |name: &str| header_text(name, host::header(&headers, name));
        let path = match text(":path") {
            Ok(path) => path.unwrap_or_default(),
            Err(reply) => return self.deny(None, "", Denial::BadHeader(reply), None),
        };
        let bare = path.split('?').next().unwrap_or_default();
        if bare == gw.health_path {
            return self.health();
        }
        if gw.public_paths.iter().any(|p| p == bare) {
            host::set_request_header(&gw.cluster_header, None);
            return Step::Continue;
        }
        let Some((index, feature)) = gw.route(path) else {
            return self.deny(None, path, Denial::NotFound, None);
        };
        let (authorization, method, instance_id, realm) =
            match (text("authorization"), text(":method"), text(&gw.headers.instance_id), text(&gw.headers.realm)) {
                (Ok(a), Ok(m), Ok(i), Ok(r)) => (a, m.unwrap_or_default(), i, r),
                (Err(reply), ..) | (_, Err(reply), ..) | (.., Err(reply), _) | (.., Err(reply)) => {
                    return self.deny(Some((index, feature)), path, Denial::BadHeader(reply), None)
                }
            };
        let token = match Gateway::bearer(authorization) {
            Ok(token) => token,
            Err(denial) => return self.deny(Some((index, feature)), path, denial, None),
        };
        let now_ms = host::now_ms();
        let id = match self.authenticate(token, now_ms) {
            Ok(id) => id,
            Err(Denial::KeysUnavailable { issuer }) if may_wait => {
                return self.wait(Waiter { context_id, issuer, wake: Wake::Keys, deadline_ms: 0 }, now_ms)
            }
            Err(Denial::UnknownKid { issuer })
                if may_wait
                    && self.fetcher.try_borrow().is_ok_and(|f| {
                        f.refetch_for_unknown_kid(issuer, now_ms, gw.jwks.kid_miss_cooldown_seconds * 1000)
                    }) =>
            {
                let completed = self.fetcher.try_borrow().map_or(0, |f| f.completed(issuer));
                let wake = Wake::Refetch { completed };
                return self.wait(Waiter { context_id, issuer, wake, deadline_ms: 0 }, now_ms);
            }
            Err(denial) => return self.deny(Some((index, feature)), path, denial, None),
        };
        let checked = gw.check_client_headers(&id, instance_id, realm).and_then(|()| gw.authorize(feature, &id));
        if let Err(denial) = checked {
            return self.deny(Some((index, feature)), path, denial, Some(&id));
        }
        if let Some(limit) = &feature.limit {
            let verdict = self.buckets.take(limit, index, &id.rate_key, now_ms);
            if !verdict.allowed {
                return self.deny(Some((index, feature)), path, Denial::RateLimited(verdict), Some(&id));
            }
        }
        self.forward(&headers, path, method, feature, &id, now_ms);
        self.count(Some(index), Outcome::Allowed);
        log_state(&feature.name, Outcome::Allowed, Some(&id));
        Step::Continue
    }

    fn authenticate(&self, token: &str, now_ms: u64) -> Result<Rc<Identity>, Denial> {
        let busy = || Denial::InvalidToken("gateway busy".into());
        let attempt = || {
            let keyring = self.keyring.try_borrow().map_err(|_| busy())?;
            let mut cache = self.cache.try_borrow_mut().map_err(|_| busy())?;
            self.gw.authenticate(token, &keyring, &mut cache, now_ms / 1000)
        };
        match attempt() {
            // No keys in this worker yet: another worker may have fetched them since the last tick.
            Err(Denial::KeysUnavailable { issuer }) => {
                let synced = match (self.fetcher.try_borrow(), self.keyring.try_borrow_mut()) {
                    (Ok(fetcher), Ok(mut keyring)) => fetcher.sync(issuer, &mut keyring),
                    _ => false,
                };
                if synced {
                    attempt()
                } else {
                    Err(Denial::KeysUnavailable { issuer })
                }
            }
            result => result,
        }
    }

    /// Writes the forwarded request's headers: the client's, minus every header the gateway
    /// owns, plus the verified identity, the signature and the backend's cluster.
    #[inline(never)]
    fn forward(
        &self,
        headers: &[(Vec<u8>, Vec<u8>)],
        path: &str,
        method: &str,
        feature: &Feature,
        id: &Identity,
        now_ms: u64,
    ) {
        let gw = &self.gw;
        let h = &gw.headers;
        let rewritten = gw.rewrite(feature, path);
        let forwarded_path = rewritten.as_deref().unwrap_or(path);
        let signature = gw.sign(now_ms / 1000, method, forwarded_path, &id.instance_id);
        let issuer = gw.issuers().get(id.issuer).map_or("", |i| i.issuer.as_str());
        let owned = |name: &[u8]| {
            let Ok(name) = std::str::from_utf8(name) else { return false };
            name == h.instance_id
                || name == h.realm
                || name == h.scopes
                || name == h.issuer
                || name == h.signature
                || name == gw.cluster_header
                || (name == ":path" && rewritten.is_some())
                || (name == "authorization" && !gw.forward_authorization)
                || h.feature.as_deref() == Some(name)
                || h.rate_limit_key.as_deref() == Some(name)
                || h.strip.iter().any(|s| s == name)
        };
        let mut out: Vec<(&[u8], &[u8])> = Vec::with_capacity(headers.len() + 8);
        out.extend(headers.iter().filter(|(k, _)| !owned(k)).map(|(k, v)| (k.as_slice(), v.as_slice())));
        let mut set: Vec<(&str, &str)> = Vec::with_capacity(9);
        if rewritten.is_some() {
            set.push((":path", forwarded_path));
        }
        set.push((&gw.cluster_header, &feature.cluster));
        set.push((&h.instance_id, &id.instance_id));
        if let Some(realm) = &id.realm {
            set.push((&h.realm, realm));
        }
        set.push((&h.scopes, &id.scopes));
        set.push((&h.issuer, issuer));
        if let Some(sig) = &signature {
            set.push((&h.signature, sig));
        }
        if let Some(name) = &h.feature {
            set.push((name, &feature.name));
        }
        if let Some(name) = &h.rate_limit_key {
            set.push((name, &id.rate_key));
        }
        out.extend(set.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        host::set_request_headers(&out);
    }

    fn deny(&self, feature: Option<(usize, &Feature)>, path: &str, denial: Denial, id: Option<&Identity>) -> Step {
        let outcome = denial.outcome();
        self.count(feature.map(|(i, _)| i), outcome);
        log_state(feature.map_or("none", |(_, f)| f.name.as_str()), outcome, id);
        let (reply, headers) = denial.reply(path, feature.map(|(_, f)| f));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        host::reply_with(&reply, &headers);
        Step::Replied
    }

    fn count(&self, feature: Option<usize>, outcome: Outcome) {
        let row = feature.unwrap_or(self.requests.len().saturating_sub(1));
        if let Some(counter) = self.requests.get(row).and_then(|r| r.get(outcome as usize)) {
            counter.inc();
        }
    }

    #[inline(never)]
    fn wait(&self, mut waiter: Waiter, now_ms: u64) -> Step {
        waiter.deadline_ms = now_ms + self.gw.jwks.wait_ms;
        let context_id = waiter.context_id;
        if let Ok(mut waiters) = self.waiters.try_borrow_mut() {
            waiters.push(waiter);
            return Step::Wait;
        }
        self.handle(context_id, false)
    }

    /// Decides the paused requests whose issuer finished a fetch, or whose wait is over.
    fn resume_waiters(&self) {
        let ready: Vec<u32> = {
            let Ok(mut waiters) = self.waiters.try_borrow_mut() else { return };
            if waiters.is_empty() {
                return;
            }
            let now = host::now_ms();
            let (Ok(fetcher), Ok(keyring)) = (self.fetcher.try_borrow(), self.keyring.try_borrow()) else { return };
            // One shared-data read per issuer, not per waiter.
            let completed: Vec<u64> = (0..self.gw.issuers().len()).map(|i| fetcher.completed(i)).collect();
            let mut ready = Vec::new();
            waiters.retain(|w| {
                let done = now >= w.deadline_ms
                    || match w.wake {
                        Wake::Keys => keyring.get(w.issuer).is_some(),
                        Wake::Refetch { completed: then } => completed.get(w.issuer) != Some(&then),
                    };
                if done {
                    ready.push(w.context_id);
                }
                !done
            });
            ready
        };
        for context_id in ready {
            if host::set_effective_context(context_id) {
                if let Step::Continue = self.handle(context_id, false) {
                    host::resume_http_request();
                }
            }
        }
        host::set_effective_context(self.root_id);
    }

    /// `{"status":"ok"|"unavailable","issuers":{"<name>":{"keys":n,"age_seconds":s}}}`: 200 when
    /// every issuer has keys, else 503 (a readiness probe).
    #[inline(never)]
    fn health(&self) -> Step {
        let now = host::now_ms();
        let mut all = true;
        let mut issuers = Vec::new();
        for (i, issuer) in self.gw.issuers().iter().enumerate() {
            if let (Ok(fetcher), Ok(mut keyring)) = (self.fetcher.try_borrow(), self.keyring.try_borrow_mut()) {
                fetcher.sync(i, &mut keyring);
            }
            let keys = self
                .keyring
                .try_borrow()
                .ok()
                .and_then(|k| k.get(i).map(|k| (k.jwks.len(), now.saturating_sub(k.fetched_ms) / 1000)));
            all &= keys.is_some();
            let (n, age) = keys.unwrap_or((0, 0));
            issuers.push(format!("\"{}\":{{\"keys\":{n},\"age_seconds\":{age}}}", issuer.name));
        }
        let status = if all { "ok" } else { "unavailable" };
        let body = format!("{{\"status\":\"{status}\",\"issuers\":{{{}}}}}", issuers.join(","));
        host::respond(if all { 200 } else { 503 }, &[], body.as_bytes());
        Step::Replied
    }
}

/// What the access log prints (`%FILTER_STATE(wasm.cloud_connector_<field>:PLAIN)%`).
fn log_state(feature: &str, outcome: Outcome, id: Option<&Identity>) {
    host::set_property("cloud_connector_feature", feature);
    host::set_property("cloud_connector_outcome", outcome.name());
    if let Some(id) = id {
        host::set_property("cloud_connector_instance", &id.instance_id);
    }
}

//! The host interface on proxy-wasm: each filter's `.wasm` module (`export!`), for any Envoy with
//! the V8 runtime and for Istio's `WasmPlugin`.
//!
//! Every Envoy worker runs its own VM, so each has its own copy of the filter (built by the root
//! context's `on_configure`); shared data and the background tick of every VM are how the copies
//! agree. Host functions are called through `abi`, never through the SDK's `hostcalls`, which
//! panic on an unexpected status; the SDK still dispatches the contexts.

pub mod abi;
pub mod map;

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

pub use proxy_wasm;

use edgewise_host::phase::Decided;
use edgewise_host::{Background, Counter, Fetched, Filter, Flow, Gauge, Get, Histogram, Host, Setup, Stream, Waker};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

/// The `.wasm` module of a filter: sets up the SDK's dispatcher with this crate's contexts, and
/// records the filter's hooks in a custom section, from which the build removes the exports of
/// the callbacks it does not use (each costs a VM entry per request).
#[macro_export]
macro_rules! export {
    ($filter:ty) => {
        $crate::proxy_wasm::main! {{
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Info);
            $crate::proxy_wasm::set_root_context(|id| $crate::root::<$filter>(id));
        }}

        #[link_section = "edgewise.hooks"]
        #[used]
        static EDGEWISE_HOOKS: [u8; 2] = $crate::hooks::<$filter>();
    };
}

/// The declared hooks as the build reads them: [response headers, background].
pub const fn hooks<F: Filter>() -> [u8; 2] {
    [F::HOOKS.response_headers as u8, F::HOOKS.background as u8]
}

pub fn root<F: Filter>(id: u32) -> Box<dyn RootContext> {
    Box::new(Root::<F> { id, filter: None, panic_header: None, paused: Paused::default() })
}

/// The requests of this VM that a filter paused, by context id: only they may be woken (a late
/// or repeated wake-up changes nothing). Few at a time.
type Paused = Rc<RefCell<Vec<u32>>>;

/// The request of the current (effective) context.
pub struct WasmStream {
    context_id: u32,
    replied: bool,
    asked_waker: bool,
}

impl WasmStream {
    fn new(context_id: u32) -> Self {
        WasmStream { context_id, replied: false, asked_waker: false }
    }

    /// Applies what a request hook decided (`edgewise_host::phase`): held, forwarded or
    /// answered; a request held without a reply or a waker, which would hang, is answered 500.
    fn decided(&mut self, flow: Flow, paused: &Paused) -> Action {
        match Decided::of(flow, self.replied, self.asked_waker) {
            Decided::Forward => Action::Continue,
            Decided::Pause => {
                paused.borrow_mut().push(self.context_id);
                Action::Pause
            }
            Decided::Answered => Action::Pause,
            Decided::Stranded => {
                log::error!("a request was held without a reply or a waker: answered 500");
                self.reply(&edgewise_host::phase::failed(), &[]);
                Action::Pause
            }
        }
    }
}

/// Every context reaches the same host functions.
macro_rules! host_by_wasm {
    (impl$(<$g:ident: $bound:path>)? for $t:ty) => {
        impl$(<$g: $bound>)? Host for $t {
            fn now_ms(&self) -> u64 {
                abi::now_ns() / 1_000_000
            }
            fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                abi::shared_get(key)
            }
            fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
                abi::shared_set(key, value, cas)
            }
            fn increment(&self, counter: Counter) {
                abi::increment_metric(counter.0, 1);
            }
            fn set_gauge(&self, gauge: Gauge, value: u64) {
                abi::record_metric(gauge.0, value);
            }
            fn record(&self, histogram: Histogram, value: u64) {
                abi::record_metric(histogram.0, value);
            }
        }
    };
}

host_by_wasm!(impl for WasmStream);

impl Stream for WasmStream {
    fn request_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        abi::header(abi::REQUEST_HEADERS, name).map(Cow::Owned)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) {
        if value.is_empty() {
            // As natively, where the ABI cannot set an empty value.
            return self.remove_request_header(name);
        }
        if !abi::set_header(abi::REQUEST_HEADERS, name, Some(value)) {
            log::warn!("setting request header {name} failed");
        }
    }

    fn remove_request_header(&mut self, name: &str) {
        abi::set_header(abi::REQUEST_HEADERS, name, None);
    }

    /// Many edits as one read and one write of the whole map: each host call costs a VM exit.
    fn edit_request_headers<R: AsRef<str>, K: AsRef<str>, V: AsRef<[u8]>>(&mut self, remove: &[R], set: &[(K, V)]) {
        if remove.len() + set.len() <= 2 {
            for name in remove {
                self.remove_request_header(name.as_ref());
            }
            for (name, value) in set {
                self.set_request_header(name.as_ref(), value.as_ref());
            }
            return;
        }
        let current = abi::headers(abi::REQUEST_HEADERS);
        let replaced = |k: &[u8]| {
            remove.iter().any(|r| r.as_ref().as_bytes() == k) || set.iter().any(|(s, _)| s.as_ref().as_bytes() == k)
        };
        let mut out: Vec<(&[u8], &[u8])> = Vec::with_capacity(current.len() + set.len());
        out.extend(current.iter().filter(|(k, _)| !replaced(k)).map(|(k, v)| (k.as_slice(), v.as_slice())));
        out.extend(
            set.iter().filter(|(_, v)| !v.as_ref().is_empty()).map(|(k, v)| (k.as_ref().as_bytes(), v.as_ref())),
        );
        if !abi::set_headers(abi::REQUEST_HEADERS, &out) {
            log::warn!("replacing the request headers failed");
        }
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        abi::header(abi::RESPONSE_HEADERS, name).map(Cow::Owned)
    }

    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let headers: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
        if !abi::send_response(status, &headers, body) {
            log::error!("sending a local reply failed");
        }
        self.replied = true;
    }

    fn log_field(&mut self, name: &str, value: &str) {
        abi::set_property(name, value.as_bytes());
    }

    fn peer_uri_san(&self) -> Option<Cow<'_, str>> {
        abi::property(&["connection", "uri_san_peer_certificate"])
            .and_then(|v| String::from_utf8(v).ok())
            .map(Cow::Owned)
    }

    fn waker(&mut self) -> Option<Waker> {
        self.asked_waker = true;
        Some(Waker(u64::from(self.context_id)))
    }
}

/// The root context of a VM: its background.
pub struct WasmBackground<F: Filter> {
    root_id: u32,
    filter: Rc<F>,
    paused: Paused,
}

host_by_wasm!(impl<F: Filter> for WasmBackground<F>);

impl<F: Filter> Background for WasmBackground<F> {
    fn http_get(&mut self, get: &Get<'_>) -> Option<u64> {
        let mut all = vec![(":method", "GET"), (":path", get.path), (":authority", get.authority)];
        all.extend_from_slice(get.headers);
        // Through the SDK: its dispatcher must know the token to route the answer to the root
        // context (the statuses Envoy returns here are ones it handles).
        match proxy_wasm::hostcalls::dispatch_http_call(get.cluster, all, None, vec![], get.timeout) {
            Ok(token) => Some(u64::from(token)),
            Err(e) => {
                log::warn!("the call to cluster {} could not be started: {e:?}", get.cluster);
                None
            }
        }
    }

    /// Decides the paused request again on its own context, and resumes it unless it was
    /// answered or paused again. Only a paused request is decided again; one Envoy already
    /// finished is skipped (its context is gone).
    fn wake(&mut self, waker: Waker) {
        let Ok(context_id) = u32::try_from(waker.0) else { return };
        let was_paused = {
            let mut paused = self.paused.borrow_mut();
            let at = paused.iter().position(|&id| id == context_id);
            at.map(|at| paused.swap_remove(at)).is_some()
        };
        if was_paused && abi::set_effective_context(context_id) {
            let mut stream = WasmStream::new(context_id);
            let flow = self.filter.on_resume(&mut stream);
            if stream.decided(flow, &self.paused) == Action::Continue {
                abi::resume_request();
            }
        }
        abi::set_effective_context(self.root_id);
    }
}

struct WasmSetup {
    instance: String,
}

impl WasmSetup {
    fn metric(kind: u32, name: &str) -> u32 {
        // An id no metric has: using it fails quietly.
        abi::define_metric(kind, name).unwrap_or(u32::MAX)
    }
}

impl Setup for WasmSetup {
    fn counter(&mut self, name: &str) -> Counter {
        Counter(Self::metric(abi::COUNTER, name))
    }
    fn gauge(&mut self, name: &str) -> Gauge {
        Gauge(Self::metric(abi::GAUGE, name))
    }
    fn histogram(&mut self, name: &str) -> Histogram {
        Histogram(Self::metric(abi::HISTOGRAM, name))
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn shared_by_workers(&self) -> bool {
        false
    }
}

struct Root<F: Filter> {
    id: u32,
    filter: Option<Rc<F>>,
    paused: Paused,
    /// Test only (`EDGEWISE_TEST_PANIC_HEADER`, through `host_env_keys`): a request carrying this
    /// header traps the VM, to prove what `failure_policy` does then.
    panic_header: Option<Rc<str>>,
}

impl<F: Filter> Root<F> {
    fn background(&self) -> Option<WasmBackground<F>> {
        Some(WasmBackground { root_id: self.id, filter: self.filter.clone()?, paused: self.paused.clone() })
    }
}

impl<F: Filter> Context for Root<F> {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, _body_size: usize, _trailers: usize) {
        let Some(mut bg) = self.background() else { return };
        let headers: Vec<(String, Vec<u8>)> = abi::headers(abi::CALL_RESPONSE_HEADERS)
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, v)))
            .collect();
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0);
        let body = if status == 0 { Vec::new() } else { abi::call_response_body().unwrap_or_default() };
        let filter = bg.filter.clone();
        filter.on_fetched(&mut bg, u64::from(token), &Fetched { status, headers, body });
    }
}

impl<F: Filter> RootContext for Root<F> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let instance = abi::property(&["plugin_name"]).and_then(|n| String::from_utf8(n).ok());
        let mut setup = WasmSetup { instance: instance.unwrap_or_else(|| F::NAME.into()) };
        let config = abi::plugin_configuration().filter(|c| !c.is_empty());
        let configured = match config {
            None => Err(edgewise_host::ConfigError::Missing),
            Some(config) => F::configure(&config, &mut setup),
        };
        match configured {
            Ok(filter) => {
                if F::HOOKS.background {
                    if let Some(period) = filter.tick_period() {
                        abi::set_tick_period_ms(u32::try_from(period.as_millis()).unwrap_or(u32::MAX));
                    }
                }
                self.filter = Some(Rc::new(filter));
                self.panic_header =
                    std::env::var("EDGEWISE_TEST_PANIC_HEADER").ok().filter(|h| !h.is_empty()).map(Rc::from);
                true
            }
            Err(e) => {
                log::error!("{}: {e}", F::NAME);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(mut bg) = self.background() {
            let filter = bg.filter.clone();
            filter.on_tick(&mut bg);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            filter: self.filter.clone()?,
            state: F::PerStream::default(),
            panic_header: self.panic_header.clone(),
            paused: self.paused.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http<F: Filter> {
    context_id: u32,
    filter: Rc<F>,
    state: F::PerStream,
    panic_header: Option<Rc<str>>,
    paused: Paused,
}

impl<F: Filter> Drop for Http<F> {
    /// A request that ends while paused (its client gone) is never woken.
    fn drop(&mut self) {
        let mut paused = self.paused.borrow_mut();
        if !paused.is_empty() {
            paused.retain(|&id| id != self.context_id);
        }
    }
}

impl<F: Filter> Context for Http<F> {}

impl<F: Filter> HttpContext for Http<F> {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut stream = WasmStream::new(self.context_id);
        if let Some(header) = &self.panic_header {
            if stream.request_header(header).is_some() {
                #[allow(clippy::panic)]
                {
                    panic!("test panic ({header})");
                }
            }
        }
        let flow = self.filter.on_request_headers(&mut stream, &mut self.state);
        stream.decided(flow, &self.paused)
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut stream = WasmStream::new(self.context_id);
        self.filter.on_response_headers(&mut stream, &mut self.state);
        Action::Continue
    }
}

//! The host interface: what a filter needs from the proxy that runs it, implemented twice — on
//! proxy-wasm (`edgewise-proxy-wasm`: the `.wasm` modules) and on Envoy's dynamic-module ABI
//! (`edgewise-native`: `libedgewise.so`). Each filter's flow is written once against it
//! ([`Filter`]); its decisions are plain functions in `edgewise-core`.
//!
//! Where state lives differs between the two. A proxy-wasm module runs one VM per Envoy worker,
//! each with its own copy of the filter; a dynamic module has one filter object for every worker.
//! Both hosts give a filter shared data (a byte store with compare-and-swap, the same for every
//! worker) and a background tick (on proxy-wasm every VM ticks, natively only the main thread):
//! code that coordinates through shared data runs unchanged on both, and where there is a single
//! copy, its coordination simply always succeeds.
//!
//! Header values are bytes: HTTP/1.1 allows bytes that are not UTF-8 (obs-text), so a filter
//! decides what such a value means for the header at hand (`edgewise_core::generic::reply::header_text`).

pub mod fake;
pub mod jwks;
pub mod per_thread;
pub mod phase;
pub mod shared;

use std::borrow::Cow;
use std::time::Duration;

pub use edgewise_core::generic::config::ConfigError;
use edgewise_core::generic::reply::Reply;

/// A counter defined at configuration time ([`Setup::counter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter(pub u32);

/// A gauge defined at configuration time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gauge(pub u32);

/// A histogram defined at configuration time (the host computes the quantiles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram(pub u32);

/// What the host does with a request after a filter's hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// On to the next filter.
    Continue,
    /// Held: the filter replied, or paused the request and will resume it ([`Stream::waker`]).
    Stop,
}

/// A paused request, as the background names it to resume it ([`Background::wake`]). Opaque: each
/// host decides what the number means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waker(pub u64);

/// What every host context offers: the clock, shared data and metrics.
pub trait Host {
    fn now_ms(&self) -> u64;

    /// A shared-data value and its compare-and-swap token (`None` for a key never written).
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);

    /// Writes a shared-data value; with `cas`, only if nobody wrote it since that read.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;

    fn increment(&self, counter: Counter);

    fn set_gauge(&self, gauge: Gauge, value: u64);

    fn record(&self, histogram: Histogram, value: u64);
}

/// One request, in a hook of its own.
pub trait Stream: Host {
    /// A request header's value, as bytes; repeated, its values joined by ", " (as HTTP combines
    /// field lines: a second Authorization makes the value unusable, not the first one).
    fn request_header(&self, name: &str) -> Option<Cow<'_, [u8]>>;

    /// Sets a request header, replacing every value it had. An empty value removes it, on every
    /// host (Envoy's dynamic-module ABI cannot set an empty value).
    fn set_request_header(&mut self, name: &str, value: &[u8]);

    fn remove_request_header(&mut self, name: &str);

    /// Removes the headers in `remove`, then sets those in `set` (replacing their values): the
    /// whole rewrite of a forwarded request, which proxy-wasm applies in one host call.
    fn edit_request_headers<R: AsRef<str>, K: AsRef<str>, V: AsRef<[u8]>>(&mut self, remove: &[R], set: &[(K, V)]) {
        for name in remove {
            self.remove_request_header(name.as_ref());
        }
        for (name, value) in set {
            self.set_request_header(name.as_ref(), value.as_ref());
        }
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, [u8]>>;

    /// The response's status code, in the response hook (`None` when it is not a number).
    /// Natively Envoy's stream info holds it, which is cheaper than reading `:status`.
    fn response_status(&self) -> Option<u16> {
        let status = self.response_header(":status")?;
        std::str::from_utf8(&status).ok()?.parse().ok()
    }

    /// Answers the request locally (the filter then returns [`Flow::Stop`]). The host sends it
    /// once the hook has returned; the request hooks only (a response cannot be answered).
    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]);

    /// A value for the access log: filter state `<prefix>.<name>` (`wasm.` on proxy-wasm,
    /// `edgewise.` natively), printed with `%FILTER_STATE(<prefix>.<name>:PLAIN)%`.
    fn log_field(&mut self, name: &str, value: &str);

    /// The first URI SAN of the downstream peer's certificate (a SPIFFE ID), if it sent one.
    fn peer_uri_san(&self) -> Option<Cow<'_, str>>;

    /// A handle to resume this request from the background once the filter returns
    /// [`Flow::Stop`] without replying.
    fn waker(&mut self) -> Option<Waker>;

    /// A JSON error reply (`{"error":…,"detail":…}`) with extra headers.
    fn reply(&mut self, reply: &Reply, headers: &[(&str, &str)]) -> Flow {
        let mut all = Vec::with_capacity(JSON_HEADERS.len() + headers.len());
        all.extend_from_slice(&JSON_HEADERS);
        all.extend_from_slice(headers);
        self.send_reply(reply.status, &all, &reply.body());
        Flow::Stop
    }
}

/// The headers of every JSON answer a filter gives itself.
pub const JSON_HEADERS: [(&str, &str); 2] = [("content-type", "application/json"), ("cache-control", "no-store")];

/// A GET of the background: to `cluster`, with `authority` and `path`, `headers` beside them,
/// ended by the host after `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Get<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub timeout: Duration,
}

/// The background: periodic work and its outbound calls (key sets, route tables).
pub trait Background: Host {
    /// Starts `get`; the answer comes to [`Filter::on_fetched`] with the same id.
    fn http_get(&mut self, get: &Get<'_>) -> Option<u64>;

    /// Resumes a paused request: the host calls [`Filter::on_resume`] on its worker.
    fn wake(&mut self, waker: Waker);

    /// Starts `get` with its answer coming as it arrives, to [`Filter::on_stream`] with the same
    /// id. `None` when the call could not start, or the host has no such calls (proxy-wasm's
    /// take whole answers only).
    fn http_stream(&mut self, _get: &Get<'_>) -> Option<u64> {
        None
    }

    /// Ends a stream of [`Background::http_stream`]; no event of it comes after.
    fn reset_stream(&mut self, _id: u64) {}
}

/// What arrives of a stream started by [`Background::http_stream`], in this order: its head,
/// its body in pieces, its end.
#[derive(Debug, Clone, Copy)]
pub enum StreamEvent<'a> {
    /// The status and headers (its body is empty).
    Head(&'a Fetched),
    Data(&'a [u8]),
    /// The answer ended whole (`true`), or the stream failed or was reset (`false`).
    End(bool),
}

/// The answer to [`Background::http_get`].
#[derive(Debug, Default, Clone)]
pub struct Fetched {
    /// The HTTP status; 0 when there was no answer (unreachable, reset, timed out).
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Fetched {
    /// A response header, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let (_, value) = self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name))?;
        std::str::from_utf8(value).ok()
    }
}

/// What a filter can do while it is configured.
pub trait Setup {
    fn counter(&mut self, name: &str) -> Counter;
    fn gauge(&mut self, name: &str) -> Gauge;
    fn histogram(&mut self, name: &str) -> Histogram;
    /// The name of this filter instance, which namespaces its shared data.
    fn instance(&self) -> &str;
    /// True when one filter object serves every worker (natively): state in the filter is
    /// already everyone's. False when each worker has its own copy (proxy-wasm), which agree
    /// through shared data.
    fn shared_by_workers(&self) -> bool;
}

/// A filter, written once for both hosts. Its object is built once per configuration and used by
/// every request (concurrently, natively: hence `Send + Sync`).
pub trait Filter: Sized + Send + Sync + 'static {
    /// The name in `filter_name` (native) and in logs.
    const NAME: &'static str;

    /// The hooks it implements beyond request headers.
    const HOOKS: Hooks = Hooks { response_headers: false, background: false };

    /// What the filter keeps per request between its hooks.
    type PerStream: Default;

    /// Reads the configuration; an error names the field, and the host refuses to start.
    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError>;

    fn on_request_headers<S: Stream>(&self, stream: &mut S, state: &mut Self::PerStream) -> Flow;

    /// Observes the response headers (metrics, the access log): a response is never held, so
    /// there is nothing to decide.
    fn on_response_headers<S: Stream>(&self, _stream: &mut S, _state: &mut Self::PerStream) {}

    /// A request this filter paused was woken: decide it again (reply, or continue).
    fn on_resume<S: Stream>(&self, _stream: &mut S) -> Flow {
        Flow::Continue
    }

    /// How often the background ticks; `None`: no background work.
    fn tick_period(&self) -> Option<Duration> {
        None
    }

    fn on_tick<B: Background>(&self, _bg: &mut B) {}

    fn on_fetched<B: Background>(&self, _bg: &mut B, _id: u64, _response: &Fetched) {}

    fn on_stream<B: Background>(&self, _bg: &mut B, _id: u64, _event: StreamEvent<'_>) {}
}

/// The hooks a filter implements beyond request headers, which a host enters only when needed
/// (each costs a VM entry per request on proxy-wasm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub response_headers: bool,
    /// [`Filter::on_tick`], [`Filter::on_fetched`] and [`Filter::on_stream`].
    pub background: bool,
}

/// Locks a mutex whatever a panicking holder left (natively a panic in a hook is caught, and
/// must not make every later request fail on a poisoned lock).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn write<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

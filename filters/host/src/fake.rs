//! A host in memory, for testing filters without Envoy: a request's headers, what the filter
//! replied, the metrics it counted, its shared data, and the calls its background made.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::{Background, Counter, Gauge, Get, Histogram, Host, Setup, Stream, Waker};

thread_local! {
    /// Inside the fake host's own code (its allocations are not the filter's).
    static HOST_SIDE: Cell<u32> = const { Cell::new(0) };
    /// Inside [`allocations`], and how many allocations it saw.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNTED: Cell<u64> = const { Cell::new(0) };
}

/// Runs the fake host's side of a call: what it allocates is not counted against the filter.
fn host_side<T>(f: impl FnOnce() -> T) -> T {
    HOST_SIDE.with(|d| d.set(d.get() + 1));
    let value = f();
    HOST_SIDE.with(|d| d.set(d.get() - 1));
    value
}

/// The system allocator, counting what filter code allocates inside [`allocations`] on the
/// calling thread. A test binary that checks a path allocates nothing installs it:
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`
pub struct CountingAllocator;

impl CountingAllocator {
    fn note(&self) {
        // `try_with`: the thread-locals are gone while a thread exits.
        let filter_side = HOST_SIDE.try_with(|d| d.get() == 0).unwrap_or(false);
        if filter_side && COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = COUNTED.try_with(|c| c.set(c.get() + 1));
        }
    }
}

// SAFETY: every call is passed to the system allocator unchanged; counting touches only
// thread-locals with constant initializers, which do not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Runs `f` and counts the allocations (and reallocations) the filter code in it made on this
/// thread, the fake host's own left out (with [`CountingAllocator`] installed; 0 otherwise).
pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNTED.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let value = f();
    COUNTING.with(|c| c.set(false));
    (value, COUNTED.with(Cell::get))
}

/// Shared data, metrics and a clock: what every context sees.
#[derive(Default)]
pub struct FakeHost {
    pub now_ms: Cell<u64>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Metric values by name.
    pub metrics: RefCell<HashMap<String, u64>>,
    names: RefCell<Vec<String>>,
}

impl FakeHost {
    /// A metric's value by the name it was defined with (0 if it never moved).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics.borrow().get(name).copied().unwrap_or(0)
    }

    fn define(&self, name: &str) -> u32 {
        let mut names = self.names.borrow_mut();
        names.push(name.to_string());
        (names.len() - 1) as u32
    }

    fn update(&self, id: u32, f: impl FnOnce(&mut u64)) {
        if let Some(name) = self.names.borrow().get(id as usize) {
            f(self.metrics.borrow_mut().entry(name.clone()).or_default());
        }
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        host_side(|| self.now_ms.get())
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        host_side(|| match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        host_side(|| {
            let mut shared = self.shared.borrow_mut();
            let entry = shared.entry(key.to_string()).or_insert((Vec::new(), 0));
            if cas.is_some_and(|c| c != entry.1) && entry.1 != 0 {
                return false;
            }
            *entry = (value.to_vec(), entry.1 + 1);
            true
        })
    }

    fn increment(&self, counter: Counter) {
        host_side(|| {
            self.update(counter.0, |v| *v += 1);
        })
    }

    fn set_gauge(&self, gauge: Gauge, value: u64) {
        host_side(|| {
            self.update(gauge.0, |v| *v = value);
        })
    }

    fn record(&self, histogram: Histogram, value: u64) {
        host_side(|| {
            self.update(histogram.0, |v| *v = value);
        })
    }
}

/// Configuration time: metrics are defined on the host.
pub struct FakeSetup<'a> {
    pub host: &'a FakeHost,
    pub instance: String,
    pub shared_by_workers: bool,
}

impl Setup for FakeSetup<'_> {
    fn counter(&mut self, name: &str) -> Counter {
        Counter(self.host.define(name))
    }
    fn gauge(&mut self, name: &str) -> Gauge {
        Gauge(self.host.define(name))
    }
    fn histogram(&mut self, name: &str) -> Histogram {
        Histogram(self.host.define(name))
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn shared_by_workers(&self) -> bool {
        self.shared_by_workers
    }
}

/// A local reply the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replied {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// One request.
pub struct FakeStream<'a> {
    pub host: &'a FakeHost,
    pub request: Vec<(String, Vec<u8>)>,
    pub response: Vec<(String, Vec<u8>)>,
    pub replied: Option<Replied>,
    pub log: Vec<(String, String)>,
    pub peer_uri_san: Option<String>,
    pub waker: Option<Waker>,
}

impl<'a> FakeStream<'a> {
    pub fn new(host: &'a FakeHost, request: &[(&str, &[u8])]) -> Self {
        FakeStream {
            host,
            request: request.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
            response: Vec::new(),
            replied: None,
            log: Vec::new(),
            peer_uri_san: None,
            waker: Some(Waker(1)),
        }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.request.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

/// A stream or the background: the host's shared data, metrics and clock.
macro_rules! on_fake_host {
    ($t:ty) => {
        impl Host for $t {
            fn now_ms(&self) -> u64 {
                self.host.now_ms()
            }
            fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                self.host.shared_get(key)
            }
            fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
                self.host.shared_set(key, value, cas)
            }
            fn increment(&self, counter: Counter) {
                self.host.increment(counter)
            }
            fn set_gauge(&self, gauge: Gauge, value: u64) {
                self.host.set_gauge(gauge, value)
            }
            fn record(&self, histogram: Histogram, value: u64) {
                self.host.record(histogram, value)
            }
        }
    };
}

on_fake_host!(FakeStream<'_>);
on_fake_host!(FakeBackground<'_>);

impl Stream for FakeStream<'_> {
    fn request_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        host_side(|| self.header(name).map(Cow::Borrowed))
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) {
        host_side(|| {
            self.remove_request_header(name);
            if !value.is_empty() {
                self.request.push((name.to_string(), value.to_vec()));
            }
        })
    }

    fn remove_request_header(&mut self, name: &str) {
        host_side(|| {
            self.request.retain(|(k, _)| k != name);
        })
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        host_side(|| self.response.iter().find(|(k, _)| k == name).map(|(_, v)| Cow::Borrowed(v.as_slice())))
    }

    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        host_side(|| {
            let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            self.replied = Some(Replied { status, headers, body: body.to_vec() });
        })
    }

    fn log_field(&mut self, name: &str, value: &str) {
        host_side(|| {
            self.log.push((name.to_string(), value.to_string()));
        })
    }

    fn peer_uri_san(&self) -> Option<Cow<'_, str>> {
        host_side(|| self.peer_uri_san.as_deref().map(Cow::Borrowed))
    }

    fn waker(&mut self) -> Option<Waker> {
        host_side(|| self.waker)
    }
}

/// The background: the calls it started, and the requests it woke.
pub struct FakeBackground<'a> {
    pub host: &'a FakeHost,
    pub calls: Vec<(String, String, String)>,
    pub woken: Vec<Waker>,
    /// Calls cannot be started (as when Envoy has no such cluster yet): each is counted in
    /// `refused`, not made.
    pub refuse_calls: bool,
    pub refused: usize,
    /// Streamed calls can be started (as natively); their ids, and those reset.
    pub streaming: bool,
    pub streams: Vec<u64>,
    pub reset: Vec<u64>,
}

impl<'a> FakeBackground<'a> {
    pub fn new(host: &'a FakeHost) -> Self {
        FakeBackground {
            host,
            calls: Vec::new(),
            woken: Vec::new(),
            refuse_calls: false,
            refused: 0,
            streaming: false,
            streams: Vec::new(),
            reset: Vec::new(),
        }
    }
}

impl Background for FakeBackground<'_> {
    fn http_get(&mut self, get: &Get<'_>) -> Option<u64> {
        if self.refuse_calls {
            self.refused += 1;
            return None;
        }
        self.calls.push((get.cluster.to_string(), get.authority.to_string(), get.path.to_string()));
        Some(self.calls.len() as u64)
    }

    fn wake(&mut self, waker: Waker) {
        self.woken.push(waker);
    }

    fn http_stream(&mut self, get: &Get<'_>) -> Option<u64> {
        if !self.streaming {
            return None;
        }
        let id = self.http_get(get)?;
        self.streams.push(id);
        Some(id)
    }

    fn reset_stream(&mut self, id: u64) {
        self.reset.push(id);
    }
}

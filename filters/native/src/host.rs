//! The host interface on the dynamic-module ABI: a stream (a hook of one request, on its
//! worker), the background (the main thread) and configuration time.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use edgewise_host::{lock, Background, Counter, Gauge, Get, Histogram, Host, Setup, Stream, Waker};

use crate::abi::*;
use crate::{Config, Ptr};

/// Shared data: one store for the process, as Envoy keeps one for proxy-wasm VMs. Natively a
/// filter has one copy for every worker, so little goes through it (leases, published documents,
/// rate-limit buckets).
static SHARED: Mutex<Option<HashMap<String, (Vec<u8>, u32)>>> = Mutex::new(None);

fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    match lock(&SHARED).as_ref().and_then(|m| m.get(key)) {
        Some((value, cas)) => (Some(value.clone()), Some(*cas)),
        None => (None, None),
    }
}

/// Envoy's semantics: a write with a CAS token succeeds only if the value has not changed since
/// (a write to a missing key always succeeds).
fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    let mut shared = lock(&SHARED);
    let map = shared.get_or_insert_with(HashMap::new);
    match map.get_mut(key) {
        Some((current, token)) => {
            if cas.is_some_and(|c| c != *token) {
                return false;
            }
            current.clear();
            current.extend_from_slice(value);
            *token = token.wrapping_add(1).max(1);
        }
        None => {
            map.insert(key.to_string(), (value.to_vec(), 1));
        }
    }
    true
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn buf(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer::new(bytes)
}

/// One request inside one of its hooks. What the hook decided (a reply, a new route) is applied
/// by the binding after the hook, when nothing of the stream's object is in use any more: a
/// local reply can end the stream, and Envoy may destroy the filter inside that call.
pub struct NativeStream<'a> {
    pub envoy: EnvoyFilter,
    pub config: &'a Config,
    /// The id of this stream's scheduler in the config's wakers, once the filter asked for one.
    pub waker: Option<u64>,
    /// The filter asked for a waker in this hook: it will be woken to decide again.
    pub asked_waker: bool,
    /// Request headers were changed: the route must be chosen again (Envoy does that by itself
    /// for proxy-wasm filters, not for dynamic modules).
    pub rerouted: bool,
    /// The local reply the filter sent.
    pub reply: Option<LocalReply>,
}

/// A local reply, kept until the hook that made it has returned.
pub struct LocalReply {
    status: u32,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl LocalReply {
    pub fn new(status: u32, headers: &[(&str, &str)], body: &[u8]) -> LocalReply {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LocalReply { status, headers, body: body.to_vec() }
    }

    /// Sends it. Envoy may end the stream and destroy the filter inside this call: the caller
    /// touches nothing of the stream afterwards.
    pub fn send(&self, envoy: EnvoyFilter) {
        let mut headers: Vec<ModuleHttpHeader> =
            self.headers.iter().map(|(k, v)| ModuleHttpHeader::new(k.as_bytes(), v.as_bytes())).collect();
        // SAFETY: the stream handle is valid in the hook calling this; everything is read during
        // the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                envoy,
                self.status,
                headers.as_mut_ptr(),
                headers.len(),
                buf(&self.body),
                buf(b"edgewise"),
            )
        };
    }
}

impl<'a> NativeStream<'a> {
    pub fn new(envoy: EnvoyFilter, config: &'a Config, waker: Option<u64>) -> Self {
        NativeStream { envoy, config, waker, asked_waker: false, rerouted: false, reply: None }
    }

    fn has_header(&self, kind: HeaderType, name: &str) -> bool {
        let mut count = 0;
        self.value_at(kind, name, 0, &mut count).is_some() && count > 0
    }

    /// The `index`-th value of a header, and in `count` how many it has.
    fn value_at(&self, kind: HeaderType, name: &str, index: usize, count: &mut usize) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::NULL;
        // SAFETY: the stream handle is valid in this hook; the value stays valid until the
        // header map changes, which needs `&mut self` and so ends the borrow returned here.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.envoy,
                kind,
                buf(name.as_bytes()),
                &mut value,
                index,
                count,
            )
        };
        // SAFETY: as above.
        found.then(|| unsafe { value.as_bytes() })
    }

    /// A header's value; repeated, its values joined by ", " (as proxy-wasm does, and as HTTP
    /// combines field lines), so that both builds read the same.
    fn header(&self, kind: HeaderType, name: &str) -> Option<Cow<'_, [u8]>> {
        let mut count = 0;
        let first = self.value_at(kind, name, 0, &mut count).filter(|_| count > 0)?;
        if count == 1 {
            return Some(Cow::Borrowed(first));
        }
        let mut joined = first.to_vec();
        for index in 1..count {
            if let Some(value) = self.value_at(kind, name, index, &mut 0) {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(value);
            }
        }
        Some(Cow::Owned(joined))
    }
}

/// Both contexts reach the process's shared data and clock, and Envoy's metrics through the
/// callbacks of their own handle (a stream on its worker, the config on the main thread).
macro_rules! native_host {
    ($t:ty, $increment:ident, $set_gauge:ident, $record:ident) => {
        impl Host for $t {
            fn now_ms(&self) -> u64 {
                now_ms()
            }
            fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                shared_get(key)
            }
            fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
                shared_set(key, value, cas)
            }
            fn increment(&self, counter: Counter) {
                // SAFETY: the handle is valid in this context; no labels.
                unsafe { $increment(self.envoy, counter.0 as usize, null_mut(), 0, 1) };
            }
            fn set_gauge(&self, gauge: Gauge, value: u64) {
                // SAFETY: as above.
                unsafe { $set_gauge(self.envoy, gauge.0 as usize, null_mut(), 0, value) };
            }
            fn record(&self, histogram: Histogram, value: u64) {
                // SAFETY: as above.
                unsafe { $record(self.envoy, histogram.0 as usize, null_mut(), 0, value) };
            }
        }
    };
}

native_host!(
    NativeStream<'_>,
    envoy_dynamic_module_callback_http_filter_increment_counter,
    envoy_dynamic_module_callback_http_filter_set_gauge,
    envoy_dynamic_module_callback_http_filter_record_histogram_value
);

native_host!(
    NativeBackground<'_>,
    envoy_dynamic_module_callback_http_filter_config_increment_counter,
    envoy_dynamic_module_callback_http_filter_config_set_gauge,
    envoy_dynamic_module_callback_http_filter_config_record_histogram_value
);

impl Stream for NativeStream<'_> {
    fn request_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.header(HeaderType::REQUEST_HEADER, name)
    }

    /// An empty value removes the header: the ABI cannot set one (NULL or empty removes), and
    /// the wasm build does the same.
    fn set_request_header(&mut self, name: &str, value: &[u8]) {
        self.rerouted = true;
        // SAFETY: the stream handle is valid in this hook; the buffers are read during the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.envoy,
                HeaderType::REQUEST_HEADER,
                buf(name.as_bytes()),
                if value.is_empty() { ModuleBuffer::NULL } else { buf(value) },
            )
        };
    }

    /// Removing a header that is not there would change nothing, yet the route would be
    /// matched again: looked up first.
    fn remove_request_header(&mut self, name: &str) {
        if self.has_header(HeaderType::REQUEST_HEADER, name) {
            self.set_request_header(name, &[]);
        }
    }

    /// Every removal and every value set: the route is matched again once, after the hook. A
    /// name that is also set is not removed first: setting replaces every value it had.
    fn edit_request_headers<R: AsRef<str>, K: AsRef<str>, V: AsRef<[u8]>>(&mut self, remove: &[R], set: &[(K, V)]) {
        for name in remove {
            let name = name.as_ref();
            if !set.iter().any(|(k, v)| k.as_ref() == name && !v.as_ref().is_empty()) {
                self.set_request_header(name, &[]);
            }
        }
        for (name, value) in set {
            self.set_request_header(name.as_ref(), value.as_ref());
        }
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.header(HeaderType::RESPONSE_HEADER, name)
    }

    /// Kept, and sent by the binding after the hook (the first reply of a hook counts).
    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if self.reply.is_some() {
            log::error!("edgewise: a second local reply ({status}) for one request was dropped");
            return;
        }
        self.reply = Some(LocalReply::new(status, headers, body));
    }

    fn log_field(&mut self, name: &str, value: &str) {
        const PREFIX: &[u8] = b"edgewise.";
        // The key on the stack: the names are the filters' own, and short.
        let mut stack = [0u8; 96];
        let owned;
        let key: &[u8] = match stack.get_mut(..PREFIX.len() + name.len()) {
            Some(room) => {
                let (prefix, rest) = room.split_at_mut(PREFIX.len());
                prefix.copy_from_slice(PREFIX);
                rest.copy_from_slice(name.as_bytes());
                room
            }
            None => {
                owned = format!("edgewise.{name}");
                owned.as_bytes()
            }
        };
        // SAFETY: the stream handle is valid in this hook; the buffers are read during the call.
        let set = unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(self.envoy, buf(key), buf(value.as_bytes()))
        };
        // It fails when another filter made the key read-only: the access log then shows that
        // filter's value. Said once, not per request.
        static SAID: AtomicBool = AtomicBool::new(false);
        if !set && !SAID.swap(true, Ordering::Relaxed) {
            let key = String::from_utf8_lossy(key);
            log::warn!("edgewise: filter state {key} could not be set (read-only?): the access log will not show it");
        }
    }

    fn response_status(&self) -> Option<u16> {
        let mut code = 0u64;
        // SAFETY: the stream handle is valid in this hook; `code` outlives the call.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.envoy,
                AttributeId::RESPONSE_CODE,
                &mut code,
            )
        };
        found.then_some(code).and_then(|c| u16::try_from(c).ok())
    }

    fn peer_uri_san(&self) -> Option<Cow<'_, str>> {
        let mut value = EnvoyBuffer::NULL;
        // SAFETY: the stream handle is valid in this hook, and the value (the connection's) for
        // as long as the stream is borrowed.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.envoy,
                AttributeId::CONNECTION_URI_SAN_PEER_CERTIFICATE,
                &mut value,
            )
        };
        // SAFETY: as above.
        found.then(|| String::from_utf8_lossy(unsafe { value.as_bytes() })).filter(|s| !s.is_empty())
    }

    fn waker(&mut self) -> Option<Waker> {
        if let Some(id) = self.waker {
            self.asked_waker = true;
            return Some(Waker(id));
        }
        // SAFETY: the stream handle is valid in this hook; the scheduler is deleted exactly once,
        // when the stream is destroyed (`Config::forget_waker`).
        let scheduler = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.envoy) };
        if scheduler.is_null() {
            return None;
        }
        let id = self.config.remember_waker(Ptr(scheduler));
        (self.waker, self.asked_waker) = (Some(id), true);
        Some(Waker(id))
    }
}

/// The main thread, in a tick or a callout's answer.
pub struct NativeBackground<'a> {
    pub envoy: EnvoyFilterConfig,
    pub config: &'a Config,
}

impl Background for NativeBackground<'_> {
    fn http_get(&mut self, get: &Get<'_>) -> Option<u64> {
        let millis = u64::try_from(get.timeout.as_millis()).unwrap_or(u64::MAX);
        self.start("call", get, |envoy, id, cluster, headers, size| {
            // SAFETY: the config handle is valid; main thread; everything is read during the call.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_http_callout(
                    envoy,
                    id,
                    cluster,
                    headers,
                    size,
                    ModuleBuffer::NULL,
                    millis,
                )
            }
        })
    }

    fn wake(&mut self, waker: Waker) {
        self.config.wake(waker.0);
    }

    fn http_stream(&mut self, get: &Get<'_>) -> Option<u64> {
        // A timeout of 0 would end the stream at once.
        let millis = u64::try_from(get.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        self.start("stream", get, |envoy, id, cluster, headers, size| {
            // SAFETY: as for `http_get`.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_start_http_stream(
                    envoy,
                    id,
                    cluster,
                    headers,
                    size,
                    ModuleBuffer::NULL,
                    true,
                    millis,
                )
            }
        })
    }

    fn reset_stream(&mut self, id: u64) {
        // SAFETY: the config handle is valid; main thread. An id Envoy no longer has is ignored.
        unsafe { envoy_dynamic_module_callback_http_filter_config_reset_http_stream(self.envoy, id) }
    }
}

impl NativeBackground<'_> {
    /// Starts a GET of `path` on `cluster` with `start`: its id, or `None` (logged).
    fn start(
        &mut self,
        what: &str,
        get: &Get<'_>,
        start: impl FnOnce(EnvoyFilterConfig, &mut u64, ModuleBuffer, *mut ModuleHttpHeader, usize) -> HttpCalloutInitResult,
    ) -> Option<u64> {
        let mut all = request_headers(get);
        let mut id = 0;
        let result = start(self.envoy, &mut id, buf(get.cluster.as_bytes()), all.as_mut_ptr(), all.len());
        if result != HttpCalloutInitResult::SUCCESS {
            log::warn!("the {what} to cluster {} could not be started ({result:?})", get.cluster);
            return None;
        }
        Some(id)
    }
}

/// A GET's headers: the pseudo-headers and `host`, then its own.
fn request_headers(get: &Get<'_>) -> Vec<ModuleHttpHeader> {
    [(":method", "GET"), (":path", get.path), ("host", get.authority)]
        .iter()
        .chain(get.headers)
        .map(|(k, v)| ModuleHttpHeader::new(k.as_bytes(), v.as_bytes()))
        .collect()
}

/// Configuration time: metrics are defined on Envoy's config object.
pub struct NativeSetup {
    pub envoy: EnvoyFilterConfig,
    pub instance: String,
}

impl NativeSetup {
    /// Names drop the `edgewise.` the wasm build needs inside Envoy's `wasmcustom.` namespace:
    /// the native YAML's `metrics_namespace: edgewise` puts it back.
    fn define(
        &self,
        name: &str,
        define: unsafe extern "C" fn(
            EnvoyFilterConfig,
            ModuleBuffer,
            *mut ModuleBuffer,
            usize,
            *mut usize,
        ) -> MetricsResult,
    ) -> u32 {
        let name = name.strip_prefix("edgewise.").unwrap_or(name);
        let mut id = 0;
        // SAFETY: the config handle is valid in config_new; no labels.
        let result = unsafe { define(self.envoy, buf(name.as_bytes()), null_mut(), 0, &mut id) };
        if result != MetricsResult::SUCCESS {
            log::error!("defining metric {name} failed ({result:?})");
            return u32::MAX;
        }
        u32::try_from(id).unwrap_or(u32::MAX)
    }
}

impl Setup for NativeSetup {
    fn counter(&mut self, name: &str) -> Counter {
        Counter(self.define(name, envoy_dynamic_module_callback_http_filter_config_define_counter))
    }
    fn gauge(&mut self, name: &str) -> Gauge {
        Gauge(self.define(name, envoy_dynamic_module_callback_http_filter_config_define_gauge))
    }
    fn histogram(&mut self, name: &str) -> Histogram {
        Histogram(self.define(name, envoy_dynamic_module_callback_http_filter_config_define_histogram))
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn shared_by_workers(&self) -> bool {
        true
    }
}

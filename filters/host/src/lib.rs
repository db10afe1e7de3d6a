//! Host calls for the edgewise filters that cannot panic. The SDK's trait helpers `unwrap()`
//! host errors; on the request path a panic traps the VM and breaks every later request, so the
//! filters go through `hostcalls` here and degrade instead.

pub mod headers;
pub mod jwks;

use std::time::{Duration, UNIX_EPOCH};

use edgewise_core::config::ConfigError;
use edgewise_core::reply::Reply;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, Bytes, MapType, MetricType};

/// Reads and parses the plugin configuration; on error logs it, prefixed with the filter's
/// name, and returns `None` (the root context then returns false and Envoy refuses the config).
pub fn configure<T>(filter: &str, parse: impl FnOnce(&[u8]) -> Result<T, ConfigError>) -> Option<T> {
    match plugin_configuration().and_then(|json| parse(&json)) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            log::error!("{filter}: {e}");
            None
        }
    }
}

pub fn plugin_configuration() -> Result<Bytes, ConfigError> {
    match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(Some(bytes)) if !bytes.is_empty() => Ok(bytes),
        _ => Err(ConfigError::Missing),
    }
}

/// The plugin's name (`name` in the Envoy filter config), which namespaces its shared data.
pub fn plugin_name(fallback: &str) -> String {
    hostcalls::get_property(vec!["plugin_name"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| fallback.into())
}

/// A property as a string (e.g. `connection.uri_san_peer_certificate`).
pub fn property_string(path: &[&str]) -> Option<String> {
    hostcalls::get_property(path.to_vec()).ok().flatten().and_then(|b| String::from_utf8(b).ok())
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn set_tick_period(period: Duration) {
    if let Err(e) = hostcalls::set_tick_period(period) {
        log::error!("set_tick_period failed: {e:?}");
    }
}

/// A request header's value as bytes (any bytes: decide what a value that is not text means).
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    headers::get(MapType::HttpRequestHeaders, name)
}

/// Sets a request header, or removes it with `None`.
pub fn set_request_header(name: &str, value: Option<&[u8]>) {
    if !headers::set(MapType::HttpRequestHeaders, name, value) {
        log::warn!("setting request header {name} failed");
    }
}

/// Sends a local JSON reply and stops the request.
pub fn reply(reply: &Reply) -> Action {
    reply_with(reply, &[])
}

/// A local JSON reply with extra headers (e.g. WWW-Authenticate).
pub fn reply_with(reply: &Reply, extra: &[(&str, &str)]) -> Action {
    respond(reply.status, extra, &reply.body())
}

/// Sends a local JSON response and stops the request.
pub fn respond(status: u32, extra: &[(&str, &str)], body: &[u8]) -> Action {
    let mut headers = vec![("content-type", "application/json"), ("cache-control", "no-store")];
    headers.extend_from_slice(extra);
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
        log::error!("sending local reply failed: {e:?}");
    }
    Action::Pause
}

/// A header of an HTTP call's response, when it is text.
pub fn call_response_header(name: &str) -> Option<String> {
    headers::get(MapType::HttpCallResponseHeaders, name).and_then(|v| String::from_utf8(v).ok())
}

pub fn call_response_body(size: usize) -> Option<Bytes> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size).ok().flatten()
}

pub fn shared_get(key: &str) -> (Option<Bytes>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    hostcalls::set_shared_data(key, Some(value), cas).is_ok()
}

pub fn shared_u64(key: &str) -> (u64, Option<u32>) {
    let (value, cas) = shared_get(key);
    let n = value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes);
    (n, cas)
}

/// Compare-and-swap on a u64 in shared data. A missing key is created as 0 first, because the
/// host applies a write to a missing key whatever the CAS.
pub fn shared_u64_cas(key: &str, update: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    for _ in 0..8 {
        let (current, cas) = shared_u64(key);
        if cas.is_none() {
            shared_set(key, &0u64.to_le_bytes(), None);
            continue;
        }
        let next = update(current)?;
        if shared_set(key, &next.to_le_bytes(), cas) {
            return Some(next);
        }
    }
    None
}

pub fn dispatch_get(
    cluster: &str,
    authority: &str,
    path: &str,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Option<u32> {
    let mut headers =
        vec![(":method", "GET"), (":path", path), (":authority", authority), ("accept", "application/json")];
    headers.extend_from_slice(extra);
    match hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout) {
        Ok(token) => Some(token),
        Err(e) => {
            log::warn!("call to cluster {cluster} could not be dispatched: {e:?}");
            None
        }
    }
}

/// A counter defined by name; every VM defining the same name shares the same Envoy stat.
pub struct Counter(Option<u32>);

impl Counter {
    pub fn define(name: &str) -> Self {
        Counter(hostcalls::define_metric(MetricType::Counter, name).ok())
    }

    pub fn inc(&self) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

pub fn response_header(name: &str) -> Option<Vec<u8>> {
    headers::get(MapType::HttpResponseHeaders, name)
}

pub struct Gauge(Option<u32>);

impl Gauge {
    pub fn define(name: &str) -> Self {
        Gauge(hostcalls::define_metric(MetricType::Gauge, name).ok())
    }

    pub fn set(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// A histogram (Envoy computes the quantiles).
pub struct Histogram(Option<u32>);

impl Histogram {
    pub fn define(name: &str) -> Self {
        Histogram(hostcalls::define_metric(MetricType::Histogram, name).ok())
    }

    pub fn record(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Sets a property of the current stream; Envoy keeps it as filter state `wasm.<name>`, which
/// access logs print with `%FILTER_STATE(wasm.<name>:PLAIN)%`.
pub fn set_property(name: &str, value: &str) {
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

/// Makes later host calls act on another context (a paused stream, or back to the root).
pub fn set_effective_context(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

/// Resumes the effective context's paused request.
pub fn resume_http_request() {
    if let Err(e) = hostcalls::resume_http_request() {
        log::warn!("resuming a paused request failed: {e:?}");
    }
}

/// Every request header in one host call (cheaper than several single reads), as bytes.
pub fn request_headers() -> Vec<(Vec<u8>, Vec<u8>)> {
    headers::all(MapType::HttpRequestHeaders)
}

/// Replaces the whole request header map in one host call.
pub fn set_request_headers(pairs: &[(&[u8], &[u8])]) {
    if !headers::set_all(MapType::HttpRequestHeaders, pairs) {
        log::warn!("replacing the request headers failed");
    }
}

/// Looks a header up in a map read by [`request_headers`] (names are lowercase there).
pub fn header<'a>(headers: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice())
}

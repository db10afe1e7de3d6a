//! `libedgewise.so`: every edgewise filter as an Envoy dynamic module, chosen by `filter_name`,
//! configured with the same JSON as its `.wasm` build (a `StringValue`).
//!
//! One config object serves every worker: one key set per issuer, one route table, one set of
//! buckets. Background work (key sets, route tables) runs on the main thread: a module thread
//! ticks the config scheduler, whose events Envoy runs there, and the callouts' answers arrive
//! there too. A paused request is resumed through its own stream scheduler, on its worker.
//!
//! No panic crosses into Envoy: every hook runs under `catch_unwind`; a panic on a request is
//! logged, counted (`edgewise.<filter>.panics`) and answered with a 500 (fail closed).

// The exported hooks take Envoy's pointers, which the ABI guarantees valid for the call.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[allow(clippy::all, clippy::pedantic)]
mod abi;
mod host;

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edgewise_host::phase::{Decided, Phase};
use edgewise_host::{lock, ConfigError, Counter, Fetched, Filter, Flow, Host, Setup, StreamEvent};

use abi::*;
use host::{LocalReply, NativeBackground, NativeSetup, NativeStream};

/// A pointer Envoy handed over that may cross threads (schedulers: commit is thread-safe).
#[derive(Clone, Copy)]
struct Ptr(*mut std::ffi::c_void);
// SAFETY: only used with the ABI calls documented as callable from any thread (scheduler commit)
// or on the thread that owns the object.
unsafe impl Send for Ptr {}
// SAFETY: as above.
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer (a method, so that a closure captures the `Send` wrapper, not the field).
    fn get(self) -> *mut std::ffi::c_void {
        self.0
    }
}

/// A filter behind the ABI's untyped pointers.
trait Erased: Send + Sync {
    fn name(&self) -> &'static str;
    fn new_state(&self) -> Box<dyn Any>;
    /// Makes `state` a new stream's, if it is this filter's kind; false otherwise.
    fn reset_state(&self, state: &mut dyn Any) -> bool;
    fn request_headers(&self, s: &mut NativeStream, state: &mut dyn Any) -> Flow;
    fn response_headers(&self, s: &mut NativeStream, state: &mut dyn Any);
    fn resume(&self, s: &mut NativeStream) -> Flow;
    fn tick_period(&self) -> Option<Duration>;
    fn tick(&self, bg: &mut NativeBackground);
    fn fetched(&self, bg: &mut NativeBackground, id: u64, response: &Fetched);
    fn stream(&self, bg: &mut NativeBackground, id: u64, event: StreamEvent<'_>);
}

impl<F: Filter> Erased for F {
    fn name(&self) -> &'static str {
        F::NAME
    }
    fn new_state(&self) -> Box<dyn Any> {
        Box::new(F::PerStream::default())
    }
    fn reset_state(&self, state: &mut dyn Any) -> bool {
        state.downcast_mut::<F::PerStream>().map(|s| *s = F::PerStream::default()).is_some()
    }
    fn request_headers(&self, s: &mut NativeStream, state: &mut dyn Any) -> Flow {
        match state.downcast_mut::<F::PerStream>() {
            Some(state) => self.on_request_headers(s, state),
            // Not this filter's state: nothing can decide, so nothing passes.
            None => Flow::Stop,
        }
    }
    fn response_headers(&self, s: &mut NativeStream, state: &mut dyn Any) {
        match state.downcast_mut::<F::PerStream>() {
            Some(state) if F::HOOKS.response_headers => self.on_response_headers(s, state),
            _ => {}
        }
    }
    fn resume(&self, s: &mut NativeStream) -> Flow {
        self.on_resume(s)
    }
    fn tick_period(&self) -> Option<Duration> {
        if F::HOOKS.background {
            Filter::tick_period(self)
        } else {
            None
        }
    }
    fn tick(&self, bg: &mut NativeBackground) {
        self.on_tick(bg);
    }
    fn fetched(&self, bg: &mut NativeBackground, id: u64, response: &Fetched) {
        self.on_fetched(bg, id, response);
    }
    fn stream(&self, bg: &mut NativeBackground, id: u64, event: StreamEvent<'_>) {
        self.on_stream(bg, id, event);
    }
}

/// Builds the filter named by `filter_name`.
fn configure(name: &str, config: &[u8], setup: &mut dyn Setup) -> Result<Box<dyn Erased>, ConfigError> {
    fn build<F: Filter>(config: &[u8], setup: &mut dyn Setup) -> Result<Box<dyn Erased>, ConfigError> {
        Ok(Box::new(F::configure(config, setup)?))
    }
    match name {
        "serverless" => build::<serverless::Serverless>(config, setup),
        "egress" => build::<egress::Egress>(config, setup),
        "mesh-identity" => build::<mesh_identity::MeshIdentity>(config, setup),
        "cloud-connector" => build::<cloud_connector::CloudConnector>(config, setup),
        "tunnel-auth" => build::<tunnel_auth::TunnelAuth>(config, setup),
        other => Err(ConfigError::field(
            "filter_name",
            format!("{other:?} is none of serverless, egress, mesh-identity, cloud-connector, tunnel-auth"),
        )),
    }
}

/// One filter configuration: the module's object behind Envoy's.
pub(crate) struct Config {
    filter: Box<dyn Erased>,
    panics: Counter,
    /// The schedulers of paused streams, by waker id (a stream removes its own when destroyed).
    wakers: Mutex<HashMap<u64, Ptr>>,
    next_waker: AtomicU64,
    ticker: Mutex<Option<Ticker>>,
    /// Test only: a request carrying this header makes the filter panic in its request hook.
    panic_header: Option<String>,
    /// `x-edgewise-pending-<filter>` when the configuration guards the filter, removed from
    /// every request (see `pending_header`).
    pending_header: Option<String>,
}

impl Config {
    fn remember_waker(&self, scheduler: Ptr) -> u64 {
        let id = self.next_waker.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.wakers).insert(id, scheduler);
        id
    }

    fn wake(&self, id: u64) {
        if let Some(scheduler) = lock(&self.wakers).get(&id) {
            // SAFETY: the scheduler is alive while it is in the map (removed and deleted under
            // this lock); commit may be called from any thread.
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler.0, id) };
        }
    }

    fn forget_waker(&self, id: u64) {
        if let Some(scheduler) = lock(&self.wakers).remove(&id) {
            // SAFETY: created by scheduler_new for this stream, deleted once.
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler.0) };
        }
    }
}

/// The module thread that ticks the config scheduler (Envoy runs its events on the main thread).
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    scheduler: Ptr,
}

impl Ticker {
    fn start(envoy: EnvoyFilterConfig, period: Duration) -> Option<Ticker> {
        // SAFETY: the config handle is valid in config_new.
        let scheduler = Ptr(unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy) });
        if scheduler.0.is_null() {
            return None;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("edgewise-tick".into())
            .spawn(move || {
                let (flag, signal) = &*stopped;
                let mut stop = lock(flag);
                loop {
                    // SAFETY: the scheduler is deleted only after this thread was joined.
                    unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler.get(), 0) };
                    stop = match signal.wait_timeout(stop, period) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                    if *stop {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Ticker { stop, thread: Some(thread), scheduler })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // SAFETY: the thread that committed to it is gone; deleted once.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler.0) };
    }
}

/// One request: the module's object behind Envoy's stream. When the stream ends it goes back to
/// its worker's pool (`POOL`), so that a new stream allocates nothing.
struct StreamObj {
    /// Envoy destroys a filter configuration only after every stream of it (each of its C++
    /// filters holds the configuration), so a stream borrows it without a count of its own,
    /// which would be an atomic on a cache line every worker shares.
    config: *const Config,
    state: Box<dyn Any>,
    /// Its scheduler's id in the config's wakers, once the filter asked for one (deleted with
    /// the stream, whatever happened in between, a panic included).
    waker: Option<u64>,
    phase: Phase,
}

impl StreamObj {
    fn config(&self) -> &Config {
        // SAFETY: see the field: alive while the stream is.
        unsafe { &*self.config }
    }
}

/// The most stream objects a worker keeps for its next streams (the rest are freed).
const POOL_MAX: usize = 256;

thread_local! {
    // Boxes, not objects: Envoy holds the box's address as the stream's handle.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<StreamObj>>> = const { RefCell::new(Vec::new()) };
}

/// The stream object of a hook.
///
/// # Safety
/// `module` is null or the `StreamObj` this module returned from `filter_new`, alive until
/// `filter_destroy` and used on its own worker only. The reference must be dropped before any
/// call into Envoy that may re-enter the module for this stream (a local reply, continuing):
/// Envoy may run other hooks of the stream, or destroy it, inside such a call.
unsafe fn stream_obj<'a>(module: ModuleFilter) -> Option<&'a mut StreamObj> {
    (module as *mut StreamObj).as_mut()
}

/// Runs a hook body; a panic is logged and becomes `fallback` (it must not unwind into Envoy).
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            log::error!("edgewise: {hook} panicked: {what}");
            fallback
        }
    }
}

/// What a request hook of the filter comes to, applied by the hook once it no longer touches the
/// stream's object.
enum Apply {
    /// On to the next filter (after choosing the route again if headers changed).
    Forward { rerouted: bool },
    /// Held whole until the filter is woken.
    Hold,
    /// Answered: the reply is the last thing the hook does.
    Reply(LocalReply),
}

/// Decides the request with `body` (a filter's request hook) and records where it stands. A panic
/// is counted and answered with a 500 (fail closed), and so is a request held without a reply
/// or a waker, which would otherwise hang.
fn decide_request(
    envoy: EnvoyFilter,
    obj: &mut StreamObj,
    hook: &str,
    body: impl FnOnce(&mut NativeStream, &Config, &mut dyn Any) -> Flow,
) -> Apply {
    // SAFETY: see `StreamObj::config`; read through the pointer, not `obj`, whose state the
    // body borrows.
    let config: &Config = unsafe { &*obj.config };
    let mut stream = NativeStream::new(envoy, config, obj.waker);
    let flow = guarded(hook, None, || Some(body(&mut stream, config, obj.state.as_mut())));
    obj.waker = stream.waker;
    let decided = match flow {
        Some(flow) => Decided::of(flow, stream.reply.is_some(), stream.asked_waker),
        // Logged by `guarded`.
        None => Decided::Stranded,
    };
    if decided == Decided::Stranded {
        stream.increment(config.panics);
        if flow.is_some() {
            log::error!("edgewise: {}: {hook} held a request without a reply or a waker", config.filter.name());
        }
    }
    obj.phase = decided.phase();
    match decided {
        Decided::Forward => Apply::Forward { rerouted: stream.rerouted },
        Decided::Pause => Apply::Hold,
        Decided::Answered => Apply::Reply(stream.reply.unwrap_or_else(internal_error)),
        Decided::Stranded => Apply::Reply(internal_error()),
    }
}

fn internal_error() -> LocalReply {
    let reply = edgewise_host::phase::failed();
    LocalReply::new(reply.status, &edgewise_host::JSON_HEADERS, &reply.body())
}

/// `log` records into Envoy's `dynamic_modules` logger, formatted only when Envoy would print
/// them (its level, read per record: `-l` and the admin `/logging` endpoint apply).
struct Logger;

fn envoy_level(level: log::Level) -> LogLevel {
    match level {
        log::Level::Error => LogLevel::ERROR,
        log::Level::Warn => LogLevel::WARN,
        log::Level::Info => LogLevel::INFO,
        log::Level::Debug => LogLevel::DEBUG,
        log::Level::Trace => LogLevel::TRACE,
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // SAFETY: callable from any thread; no arguments to keep alive.
        unsafe { envoy_dynamic_module_callback_log_enabled(envoy_level(metadata.level())) }
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let file = record.file().unwrap_or_default();
        // SAFETY: the buffers are read during the call.
        unsafe {
            envoy_dynamic_module_callback_log_v2(
                envoy_level(record.level()),
                ModuleBuffer::new(message.as_bytes()),
                ModuleBuffer::new(file.as_bytes()),
                record.line().unwrap_or(0),
            )
        };
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// What the module states about itself, readable without loading it (`strings libedgewise.so |
/// grep edgewise-module:`; an exported symbol, `nm -D`): the edgewise version and the Envoy
/// release and dynamic-module ABI it is built for, the same literal `program_init` returns.
/// `make dist` writes RELEASE.md from it; tests/abi.rs checks it against the Envoy under test.
const STATEMENT: &str = concat!(
    "edgewise-module: edgewise=",
    env!("CARGO_PKG_VERSION"),
    " envoy=",
    envoy_release!(),
    " abi=",
    abi_version!(),
    "\0"
);

#[no_mangle]
#[used]
pub static EDGEWISE_MODULE: [u8; STATEMENT.len()] = bytes_of(STATEMENT);

#[allow(clippy::indexing_slicing)] // bounded by the array's own length, at compile time
const fn bytes_of<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = s.as_bytes()[i];
        i += 1;
    }
    out
}

/// A `filter_name` ending in this asks for the guard: `mesh-identity.guarded`.
const GUARDED: &str = ".guarded";

/// The request header a guarded configuration sets before this filter to learn whether the
/// filter ran: the binding removes it from every request it sees, before the filter decides.
/// Envoy 1.40 leaves a filter whose remote module failed to load out of the chain and forwards
/// requests without it (fails open); a request that still carries the header after the filter's
/// place was not seen by it, and the configuration refuses it
/// (envoy/native/mesh-gateway-remote.yaml). Only guarded configurations pay for the removal:
/// about 1,000 instructions per request, present or not (a lookup first costs as much).
fn pending_header(filter: &str) -> String {
    format!("x-edgewise-pending-{filter}")
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> AbiVersionPtr {
    guarded("program_init", std::ptr::null(), || {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
        ABI_VERSION.as_ptr().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: EnvoyFilterConfig,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ModuleFilterConfig {
    guarded("config_new", std::ptr::null(), || {
        // SAFETY: both are valid during this call, and copied before it returns.
        let (name, json) = unsafe { (name.as_bytes(), config.as_bytes()) };
        let name = String::from_utf8_lossy(name).into_owned();
        let (name, guarded) = match name.strip_suffix(GUARDED) {
            Some(filter) => (filter.to_string(), true),
            None => (name, false),
        };
        let mut setup = NativeSetup { envoy, instance: name.clone() };
        let filter = match configure(&name, json, &mut setup) {
            Ok(filter) => filter,
            Err(e) => {
                log::error!("{name}: {e}");
                return std::ptr::null();
            }
        };
        let panics = setup.counter(&format!("edgewise.{}.panics", filter.name().replace('-', "_")));
        let panic_header = std::env::var("EDGEWISE_TEST_PANIC_HEADER").ok().filter(|h| !h.is_empty());
        // SAFETY: main thread, in config_new.
        let validating = unsafe { envoy_dynamic_module_callback_is_validation_mode() };
        let ticker = match filter.tick_period() {
            Some(period) if !validating => Ticker::start(envoy, period),
            _ => None,
        };
        let config = Config {
            pending_header: guarded.then(|| pending_header(filter.name())),
            filter,
            panics,
            wakers: Mutex::new(HashMap::new()),
            next_waker: AtomicU64::new(0),
            ticker: Mutex::new(ticker),
            panic_header,
        };
        Arc::into_raw(Arc::new(config)).cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModuleFilterConfig) {
    guarded("config_destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: made by Arc::into_raw in config_new; Envoy destroys it once.
        let config = unsafe { Arc::from_raw(config.cast::<Config>()) };
        // Stop ticking before Envoy's config object goes.
        let ticked = lock(&config.ticker).take().is_some();
        log::info!(
            "edgewise: {}: configuration released{}",
            config.filter.name(),
            if ticked { ", its thread stopped" } else { "" }
        );
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    _event: u64,
) {
    guarded("config_scheduled", (), || {
        // SAFETY: the config object lives until config_destroy; main thread.
        let Some(config) = (unsafe { config.cast::<Config>().as_ref() }) else { return };
        config.filter.tick(&mut NativeBackground { envoy, config });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    id: u64,
    result: HttpCalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    chunks: *mut EnvoyBuffer,
    chunks_size: usize,
) {
    guarded("config_http_callout_done", (), || {
        // SAFETY: the config object lives until config_destroy; main thread.
        let Some(config) = (unsafe { config.cast::<Config>().as_ref() }) else { return };
        let mut response = Fetched::default();
        if result == HttpCalloutResult::SUCCESS {
            // SAFETY: Envoy's arrays, valid during this hook (copied here), or null with 0.
            response = unsafe { head(headers, headers_size) };
            // SAFETY: as above.
            for chunk in unsafe { slice(chunks, chunks_size) } {
                // SAFETY: as above.
                response.body.extend_from_slice(unsafe { chunk.as_bytes() });
            }
        }
        config.filter.fetched(&mut NativeBackground { envoy, config }, id, &response);
    })
}

/// An answer's status and headers, copied.
///
/// # Safety
/// As [`slice`], for the duration of the hook.
unsafe fn head(headers: *mut EnvoyHttpHeader, headers_size: usize) -> Fetched {
    let mut response = Fetched::default();
    for h in slice(headers, headers_size) {
        let (k, v) = h.as_pair();
        response.headers.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    response.status = response.header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    response
}

/// Hands one event of a config-level stream to its filter (main thread).
fn config_stream(envoy: EnvoyFilterConfig, config: ModuleFilterConfig, id: u64, event: StreamEvent<'_>) {
    // SAFETY: the config object lives until config_destroy; main thread.
    let Some(config) = (unsafe { config.cast::<Config>().as_ref() }) else { return };
    config.filter.stream(&mut NativeBackground { envoy, config }, id, event);
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    id: u64,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    _end_stream: bool,
) {
    guarded("config_http_stream_headers", (), || {
        // SAFETY: Envoy's array, valid during this hook (copied here).
        let head = unsafe { head(headers, headers_size) };
        config_stream(envoy, config, id, StreamEvent::Head(&head));
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    id: u64,
    data: *const EnvoyBuffer,
    data_count: usize,
    _end_stream: bool,
) {
    guarded("config_http_stream_data", (), || {
        // SAFETY: Envoy's buffers, valid during this hook.
        for chunk in unsafe { slice(data.cast_mut(), data_count) } {
            // SAFETY: as above.
            config_stream(envoy, config, id, StreamEvent::Data(unsafe { chunk.as_bytes() }));
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _: EnvoyFilterConfig,
    _: ModuleFilterConfig,
    _: u64,
    _: *mut EnvoyHttpHeader,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    id: u64,
) {
    guarded("config_http_stream_complete", (), || config_stream(envoy, config, id, StreamEvent::End(true)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    envoy: EnvoyFilterConfig,
    config: ModuleFilterConfig,
    id: u64,
    _reason: HttpStreamResetReason,
) {
    guarded("config_http_stream_reset", (), || config_stream(envoy, config, id, StreamEvent::End(false)))
}

/// An array Envoy handed over for the duration of a hook.
///
/// # Safety
/// `ptr` must be null or point to `len` valid elements for the lifetime chosen.
unsafe fn slice<'a, T>(ptr: *mut T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> ModulePerRouteConfig {
    log::error!("edgewise: the filters take no per-route configuration");
    std::ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: ModulePerRouteConfig) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModuleFilterConfig,
    _envoy: EnvoyFilter,
) -> ModuleFilter {
    guarded("filter_new", std::ptr::null(), || {
        let config_ptr = config.cast::<Config>();
        // SAFETY: made by Arc::into_raw in config_new and alive until config_destroy, which
        // Envoy calls only after every stream of the config is gone.
        let Some(config) = (unsafe { config_ptr.as_ref() }) else { return std::ptr::null() };
        let pooled = POOL.with(|pool| pool.try_borrow_mut().ok().and_then(|mut pool| pool.pop()));
        let obj = match pooled {
            Some(mut obj) => {
                if !config.filter.reset_state(obj.state.as_mut()) {
                    obj.state = config.filter.new_state();
                }
                obj.config = config_ptr;
                obj.waker = None;
                obj.phase = Phase::Undecided;
                obj
            }
            None => Box::new(StreamObj {
                config: config_ptr,
                state: config.filter.new_state(),
                waker: None,
                phase: Phase::Undecided,
            }),
        };
        Box::into_raw(obj).cast_const().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: EnvoyFilter,
    module: ModuleFilter,
    _end_of_stream: bool,
) -> RequestHeadersStatus {
    let apply = {
        // SAFETY: see stream_obj; the reference ends with this block.
        let Some(obj) = (unsafe { stream_obj(module) }) else {
            // No stream object (its creation failed): nothing can decide, so nothing passes.
            internal_error().send(envoy);
            return RequestHeadersStatus::STOP_ITERATION;
        };
        if let Some(pending) = &obj.config().pending_header {
            // SAFETY: the stream handle is valid in this hook; the name is read during the call,
            // and a NULL value removes the header (absent: nothing to do).
            unsafe {
                envoy_dynamic_module_callback_http_set_header(
                    envoy,
                    HeaderType::REQUEST_HEADER,
                    ModuleBuffer::new(pending.as_bytes()),
                    ModuleBuffer::NULL,
                )
            };
        }
        decide_request(envoy, obj, "request_headers", |s, config, state| {
            if let Some(header) = &config.panic_header {
                if edgewise_host::Stream::request_header(s, header).is_some() {
                    #[allow(clippy::panic)]
                    {
                        panic!("test panic ({header})");
                    }
                }
            }
            config.filter.request_headers(s, state)
        })
    };
    match apply {
        Apply::Forward { rerouted } => {
            if rerouted {
                // SAFETY: the stream handle is valid in this (request) hook.
                unsafe { envoy_dynamic_module_callback_http_clear_route_cache(envoy) };
            }
            RequestHeadersStatus::CONTINUE
        }
        // Headers, body and trailers all held, under flow control (the read side pauses once
        // Envoy's buffer limit is reached), as Envoy holds a paused proxy-wasm request: a body
        // never pushes the held headers on.
        Apply::Hold => RequestHeadersStatus::STOP_ALL_ITERATION_AND_WATERMARK,
        Apply::Reply(reply) => {
            reply.send(envoy);
            RequestHeadersStatus::STOP_ITERATION
        }
    }
}

/// Only a forwarded request's body goes on. Envoy holds a paused request's body itself (the
/// headers hook stopped all iteration); these hold it too should it reach them.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: EnvoyFilter,
    module: ModuleFilter,
    _: bool,
) -> RequestBodyStatus {
    // SAFETY: see stream_obj; only read.
    match unsafe { stream_obj(module) }.map(|obj| obj.phase) {
        Some(phase) if phase.passes_body() => RequestBodyStatus::CONTINUE,
        Some(Phase::Answered) => RequestBodyStatus::STOP_ITERATION_NO_BUFFER,
        _ => RequestBodyStatus::STOP_ITERATION_AND_WATERMARK,
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: EnvoyFilter,
    module: ModuleFilter,
) -> RequestTrailersStatus {
    // SAFETY: see stream_obj; only read.
    match unsafe { stream_obj(module) }.map(|obj| obj.phase) {
        Some(phase) if phase.passes_body() => RequestTrailersStatus::CONTINUE,
        _ => RequestTrailersStatus::STOP_ITERATION,
    }
}

/// Observed, never held (a response has nothing to wait for). Also runs for local replies,
/// possibly inside another hook's reply of this stream.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: EnvoyFilter,
    module: ModuleFilter,
    _end_of_stream: bool,
) -> ResponseHeadersStatus {
    guarded("response_headers", (), || {
        // SAFETY: see stream_obj; nothing here calls back into Envoy in a way that re-enters.
        let Some(obj) = (unsafe { stream_obj(module) }) else { return };
        // SAFETY: see `StreamObj::config`; read through the pointer, not `obj`.
        let config: &Config = unsafe { &*obj.config };
        let mut stream = NativeStream::new(envoy, config, obj.waker);
        config.filter.response_headers(&mut stream, obj.state.as_mut());
        obj.waker = stream.waker;
        if stream.reply.is_some() {
            log::error!("edgewise: {}: a reply to a response was dropped", config.filter.name());
        }
    });
    ResponseHeadersStatus::CONTINUE
}

/// A paused request was woken (`Background::wake`): decided again on its worker. A wake-up of
/// a request that is not paused (late, or repeated) changes nothing.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(envoy: EnvoyFilter, module: ModuleFilter, _event: u64) {
    let apply = {
        // SAFETY: see stream_obj; the reference ends with this block.
        let Some(obj) = (unsafe { stream_obj(module) }) else { return };
        if !obj.phase.resumable() {
            return;
        }
        decide_request(envoy, obj, "scheduled", |s, config, _| config.filter.resume(s))
    };
    match apply {
        Apply::Forward { rerouted } => {
            // SAFETY: the stream handle is valid in this hook; continuing is the last thing it
            // does (Envoy may finish and destroy the stream inside it).
            unsafe {
                if rerouted {
                    envoy_dynamic_module_callback_http_clear_route_cache(envoy);
                }
                envoy_dynamic_module_callback_http_filter_continue_decoding(envoy);
            }
        }
        Apply::Hold => {}
        Apply::Reply(reply) => reply.send(envoy),
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: ModuleFilter) {
    guarded("filter_destroy", (), || {
        if module.is_null() {
            return;
        }
        // SAFETY: made by Box::into_raw in filter_new; Envoy destroys it once, never inside
        // another hook of the stream that still uses it (the hooks drop their reference before
        // any call that may end the stream).
        let obj = unsafe { Box::from_raw(module as *mut StreamObj) };
        if let Some(id) = obj.waker {
            obj.config().forget_waker(id);
        }
        POOL.with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.len() < POOL_MAX {
                    pool.push(obj);
                }
            }
        });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: bool,
) -> ResponseBodyStatus {
    ResponseBodyStatus::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: EnvoyFilter,
    _: ModuleFilter,
) -> ResponseTrailersStatus {
    ResponseTrailersStatus::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_: EnvoyFilter, _: ModuleFilter) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: u64,
    _: HttpCalloutResult,
    _: *mut EnvoyHttpHeader,
    _: usize,
    _: *mut EnvoyBuffer,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: u64,
    _: *mut EnvoyHttpHeader,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: u64,
    _: *const EnvoyBuffer,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: u64,
    _: *mut EnvoyHttpHeader,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_: EnvoyFilter, _: ModuleFilter, _: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: EnvoyFilter,
    _: ModuleFilter,
    _: u64,
    _: HttpStreamResetReason,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: EnvoyFilter,
    _: ModuleFilter,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: EnvoyFilter,
    _: ModuleFilter,
) {
}

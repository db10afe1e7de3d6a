//! An Envoy 1.40 HTTP dynamic module whose hooks do nothing: every request hook returns CONTINUE
//! and no callback into Envoy is made. `make bench` loads it as the floor of any native filter,
//! so that what libedgewise.so adds over it is the cost of its own shell and logic, not of the
//! ABI's dispatch. The declarations follow filters/native/src/abi.rs (abi.h of Envoy 1.40).

use core::ffi::{c_char, c_void};

type Handle = *mut c_void;

/// `envoy_dynamic_module_type_envoy_buffer`: bytes Envoy owns.
#[repr(C)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

/// A non-null object for the configuration and for each stream (NULL would reject them).
static OBJECT: u8 = 0;

fn object() -> *const c_void {
    (&raw const OBJECT).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _envoy: Handle,
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    object()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    object()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(_config: *const c_void, _envoy: Handle) -> *const c_void {
    object()
}

/// Every status hook: CONTINUE (0).
macro_rules! continue_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[no_mangle]
        pub extern "C" fn $name(_envoy: Handle, _filter: *const c_void $(, $arg: $ty)*) -> u32 {
            let _ = ($($arg,)*);
            0
        }
    )*};
}

continue_hooks! {
    envoy_dynamic_module_on_http_filter_request_headers(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_request_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_request_trailers();
    envoy_dynamic_module_on_http_filter_response_headers(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_trailers();
}

/// Every hook with nothing to answer.
macro_rules! empty_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) {
            let _ = ($($arg,)*);
        }
    )*};
}

empty_hooks! {
    envoy_dynamic_module_on_http_filter_stream_complete(envoy: Handle, filter: *const c_void);
    envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void);
    envoy_dynamic_module_on_http_filter_http_callout_done(
        envoy: Handle, filter: *const c_void, id: u64, result: u32,
        headers: *mut c_void, headers_size: usize, body: *mut c_void, body_size: usize);
    envoy_dynamic_module_on_http_filter_http_stream_headers(
        envoy: Handle, filter: *const c_void, id: u64, headers: *mut c_void, size: usize, end: bool);
    envoy_dynamic_module_on_http_filter_http_stream_data(
        envoy: Handle, filter: *const c_void, id: u64, data: *const c_void, count: usize, end: bool);
    envoy_dynamic_module_on_http_filter_http_stream_trailers(
        envoy: Handle, filter: *const c_void, id: u64, trailers: *mut c_void, size: usize);
    envoy_dynamic_module_on_http_filter_http_stream_complete(envoy: Handle, filter: *const c_void, id: u64);
    envoy_dynamic_module_on_http_filter_http_stream_reset(envoy: Handle, filter: *const c_void, id: u64, reason: u32);
    envoy_dynamic_module_on_http_filter_scheduled(envoy: Handle, filter: *const c_void, event: u64);
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(envoy: Handle, filter: *const c_void);
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(envoy: Handle, filter: *const c_void);
}

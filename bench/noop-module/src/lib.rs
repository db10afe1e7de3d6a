//! An Envoy 1.40 HTTP dynamic module whose hooks do nothing: every request hook returns CONTINUE
//! and no callback into Envoy is made. `make bench` loads it as the floor of any native filter,
//! so that what libedgewise.so adds over it is the cost of its own shell and logic, not of the
//! ABI's dispatch. The declarations follow filters/native/src/abi.rs (abi.h of Envoy 1.40).
//!
//! Given a configuration, it makes fixed edits to every request and nothing else, separated by
//! newlines or `;`: `set <header> <value>`, `remove <header>`, `state <key> <value>` (filter
//! state, as the access log reads it) and `reroute` (the route matched again). That is the floor
//! of a filter making those edits: what Envoy spends on them, with no reading and no deciding.

// The hooks are Envoy's ABI: they take the pointers Envoy passes, and cannot be `unsafe fn`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use core::ffi::{c_char, c_void};

type Handle = *mut c_void;

/// `envoy_dynamic_module_type_envoy_buffer`: bytes Envoy owns.
#[repr(C)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes the module owns, read during the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

impl ModuleBuffer {
    const NULL: ModuleBuffer = ModuleBuffer { ptr: core::ptr::null(), length: 0 };

    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer { ptr: bytes.as_ptr(), length: bytes.len() }
    }
}

/// `envoy_dynamic_module_type_http_header_type`: the request's headers.
const REQUEST_HEADER: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_set_header(
        filter: Handle,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: Handle,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: Handle);
}

/// A non-null object for a configuration without edits and for each stream (NULL would reject
/// them).
static OBJECT: u8 = 0;

fn object() -> *const c_void {
    (&raw const OBJECT).cast()
}

/// One fixed edit of every request.
enum Edit {
    /// A request header set to a value, or removed (`None`).
    Header(Vec<u8>, Option<Vec<u8>>),
    State(Vec<u8>, Vec<u8>),
    Reroute,
}

/// The configuration: its edits, parsed once. An empty one is the module whose hooks do nothing.
struct Edits(Vec<Edit>);

impl Edits {
    /// None for a line it does not know: Envoy then refuses the configuration.
    fn parse(text: &[u8]) -> Option<Edits> {
        let text = core::str::from_utf8(text).ok()?;
        let mut edits = Vec::new();
        for line in text.split(['\n', ';']).map(str::trim).filter(|l| !l.is_empty()) {
            // A value is the rest of its line, spaces and all.
            let words: Vec<&[u8]> = line.splitn(3, ' ').map(str::as_bytes).collect();
            edits.push(match words.as_slice() {
                [b"set", name, value] => Edit::Header(name.to_vec(), Some(value.to_vec())),
                [b"remove", name] => Edit::Header(name.to_vec(), None),
                [b"state", key, value] => Edit::State(key.to_vec(), value.to_vec()),
                [b"reroute"] => Edit::Reroute,
                _ => return None,
            });
        }
        Some(Edits(edits))
    }

    /// SAFETY: `envoy` is the stream's handle, valid in the request headers hook.
    unsafe fn apply(&self, envoy: Handle) {
        for edit in &self.0 {
            match edit {
                // A NULL value removes the header.
                Edit::Header(name, value) => {
                    envoy_dynamic_module_callback_http_set_header(
                        envoy,
                        REQUEST_HEADER,
                        ModuleBuffer::of(name),
                        value.as_deref().map_or(ModuleBuffer::NULL, ModuleBuffer::of),
                    );
                }
                Edit::State(key, value) => {
                    envoy_dynamic_module_callback_http_set_filter_state_bytes(
                        envoy,
                        ModuleBuffer::of(key),
                        ModuleBuffer::of(value),
                    );
                }
                Edit::Reroute => envoy_dynamic_module_callback_http_clear_route_cache(envoy),
            }
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _envoy: Handle,
    _name: Buffer,
    config: Buffer,
) -> *const c_void {
    let text: &[u8] = if config.ptr.is_null() || config.length == 0 {
        &[]
    } else {
        // SAFETY: Envoy's buffer, valid during this call.
        unsafe { core::slice::from_raw_parts(config.ptr.cast(), config.length) }
    };
    match Edits::parse(text) {
        Some(edits) if edits.0.is_empty() => object(),
        Some(edits) => Box::into_raw(Box::new(edits)).cast_const().cast(),
        None => core::ptr::null(),
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if !config.is_null() && config != object() {
        // SAFETY: made by Box::into_raw in config_new, destroyed once.
        drop(unsafe { Box::from_raw(config.cast_mut().cast::<Edits>()) });
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    object()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: *const c_void) {}

/// A stream's object is its configuration: the edits, or the shared object of none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(config: *const c_void, _envoy: Handle) -> *const c_void {
    config
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: Handle,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    if !filter.is_null() && filter != object() {
        // SAFETY: a configuration's edits (config_new), alive while its streams are; the handle
        // is valid in this hook.
        unsafe { (*filter.cast::<Edits>()).apply(envoy) };
    }
    0
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

//! The proxy-wasm host functions the filters call, declared here rather than through the SDK's
//! `hostcalls`, which panic on any status they do not expect: a panic traps the VM and breaks
//! every later request on the worker. Every wrapper below turns a failed call into `None` or
//! `false`, and takes ownership of what the host allocated in this module's memory.

use std::ptr::null_mut;

const OK: u32 = 0;

pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
pub const CALL_RESPONSE_HEADERS: u32 = 6;
const CALL_RESPONSE_BODY: u32 = 4;
const PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_REQUEST: u32 = 0;
pub const COUNTER: u32 = 0;
pub const GAUGE: u32 = 1;
pub const HISTOGRAM: u32 = 2;

/// Declares the imports on wasm, and stand-ins elsewhere (clippy and docs build natively, where
/// there is no host: every call fails).
macro_rules! imports {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "env")]
        extern "C" {
            $(fn $name($($arg: $ty),*) -> u32;)*
        }
        $(
            #[cfg(not(target_arch = "wasm32"))]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name($(_: $ty),*) -> u32 {
                1
            }
        )*
    };
}

imports! {
    fn proxy_get_current_time_nanoseconds(time: *mut u64);
    fn proxy_set_tick_period_milliseconds(period: u32);
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize);
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize);
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize);
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, size: usize);
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize);
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize);
    fn proxy_get_property(path: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize);
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize);
    fn proxy_get_shared_data(key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize, cas: *mut u32);
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32);
    fn proxy_continue_stream(stream: u32);
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    );
    fn proxy_set_effective_context(context: u32);
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32);
    fn proxy_increment_metric(id: u32, offset: i64);
    fn proxy_record_metric(id: u32, value: u64);
}

/// Takes ownership of a buffer the host allocated in this module's memory (through the SDK's
/// `proxy_on_memory_allocate`: a `Vec<u8>` of exactly `size`).
///
/// # Safety
/// `data` must be null or a pointer the host returned with this `size`.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Calls a host function that returns a buffer; `None` unless it succeeded.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0);
    let status = call(&mut data, &mut size);
    // SAFETY: on success the host handed over a buffer of `size` bytes (or null).
    (status == OK).then(|| unsafe { take(data, size) })
}

pub fn now_ns() -> u64 {
    let mut t = 0;
    // SAFETY: a valid out-pointer.
    unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    t
}

pub fn set_tick_period_ms(period: u32) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_set_tick_period_milliseconds(period) == OK }
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    // SAFETY: valid out-pointers.
    returned(|d, s| unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, d, s) })
}

pub fn call_response_body() -> Option<Vec<u8>> {
    // SAFETY: valid out-pointers.
    returned(|d, s| unsafe { proxy_get_buffer_bytes(CALL_RESPONSE_BODY, 0, usize::MAX, d, s) })
}

/// One header's value (the first, if it is repeated), as bytes.
pub fn header(map: u32, name: &str) -> Option<Vec<u8>> {
    // SAFETY: a valid key slice and out-pointers.
    returned(|d, s| unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), d, s) })
}

/// Every header of a map, as bytes, in order.
pub fn headers(map: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    // SAFETY: valid out-pointers.
    let serialized = returned(|d, s| unsafe { proxy_get_header_map_pairs(map, d, s) });
    serialized.and_then(|m| crate::map::deserialize(&m)).unwrap_or_default()
}

/// Replaces a whole map (one host call, whatever the number of headers).
pub fn set_headers(map: u32, pairs: &[(&[u8], &[u8])]) -> bool {
    let serialized = crate::map::serialize(pairs);
    // SAFETY: a valid slice.
    unsafe { proxy_set_header_map_pairs(map, serialized.as_ptr(), serialized.len()) == OK }
}

/// Sets (replacing every value of) a header, or removes it when `value` is `None`.
pub fn set_header(map: u32, name: &str, value: Option<&[u8]>) -> bool {
    // SAFETY: valid slices.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    status == OK
}

/// A property (`["connection", "uri_san_peer_certificate"]`), as bytes.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let path = path.join("\0");
    // SAFETY: a valid path slice and out-pointers.
    returned(|d, s| unsafe { proxy_get_property(path.as_ptr(), path.len(), d, s) })
}

pub fn set_property(name: &str, value: &[u8]) -> bool {
    // SAFETY: valid slices.
    unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) == OK }
}

pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let (mut data, mut size, mut cas) = (null_mut(), 0, 0);
    // SAFETY: a valid key slice and out-pointers.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    if status != OK {
        return (None, None);
    }
    // SAFETY: on success the host handed over a buffer of `size` bytes (or null).
    (Some(unsafe { take(data, size) }), Some(cas))
}

pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    // SAFETY: valid slices.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) };
    status == OK
}

pub fn resume_request() -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_continue_stream(STREAM_REQUEST) == OK }
}

pub fn send_response(status: u32, headers: &[(&[u8], &[u8])], body: &[u8]) -> bool {
    let headers = crate::map::serialize(headers);
    // SAFETY: valid slices.
    let result = unsafe {
        proxy_send_local_response(
            status,
            [].as_ptr(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
    result == OK
}

pub fn set_effective_context(context: u32) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_set_effective_context(context) == OK }
}

pub fn define_metric(kind: u32, name: &str) -> Option<u32> {
    let mut id = 0;
    // SAFETY: a valid name slice and out-pointer.
    let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, offset: i64) {
    // SAFETY: no pointers.
    unsafe { proxy_increment_metric(id, offset) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no pointers.
    unsafe { proxy_record_metric(id, value) };
}

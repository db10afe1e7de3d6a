//! Header maps read and written as bytes, straight through the proxy-wasm ABI.
//!
//! The SDK's string reads panic on a value that is not UTF-8 (obs-text is legal in HTTP/1.1), and
//! its map calls panic on any status they do not expect; a panic traps the VM and breaks every
//! later request on the worker. These calls cannot panic: a failed call reads as absent.

use std::ptr::null_mut;

use proxy_wasm::types::MapType;

const OK: u32 = 0;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: MapType, return_map_data: *mut *mut u8, return_map_size: *mut usize)
        -> u32;
    fn proxy_set_header_map_pairs(map_type: MapType, map_data: *const u8, map_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: MapType, key_data: *const u8, key_size: usize) -> u32;
}

// Natively (clippy, docs) there is no host: every read is absent, every write fails.
#[cfg(not(target_arch = "wasm32"))]
mod no_host {
    #![allow(clippy::missing_safety_doc)]
    use super::MapType;
    const NOT_FOUND: u32 = 1;
    pub unsafe fn proxy_get_header_map_value(
        _: MapType,
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_header_map_pairs(_: MapType, _: *mut *mut u8, _: *mut usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_set_header_map_pairs(_: MapType, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_replace_header_map_value(_: MapType, _: *const u8, _: usize, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_remove_header_map_value(_: MapType, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
}
#[cfg(not(target_arch = "wasm32"))]
use no_host::*;

/// Takes ownership of a buffer the host allocated in this module's memory (through the SDK's
/// `proxy_on_memory_allocate`, a `Vec<u8>` of exactly `size`).
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

/// One header's value (the first, if it is repeated), as bytes.
pub fn get(map: MapType, name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: the key is a valid slice; the host writes the out-pointers only on success.
    let status = unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    // SAFETY: on success the host handed over a buffer of `size` bytes.
    (status == OK).then(|| unsafe { take(data, size) })
}

/// Every header of a map, as bytes, in order.
pub fn all(map: MapType) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: as in `get`.
    if unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } != OK {
        return Vec::new();
    }
    // SAFETY: as in `get`.
    let serialized = unsafe { take(data, size) };
    deserialize(&serialized).unwrap_or_default()
}

/// Replaces a whole map (one host call, whatever the number of headers).
pub fn set_all(map: MapType, pairs: &[(&[u8], &[u8])]) -> bool {
    let serialized = serialize(pairs);
    // SAFETY: a valid slice.
    unsafe { proxy_set_header_map_pairs(map, serialized.as_ptr(), serialized.len()) == OK }
}

/// Sets (replacing every value of) a header, or removes it when `value` is `None`.
pub fn set(map: MapType, name: &str, value: Option<&[u8]>) -> bool {
    // SAFETY: valid slices.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    status == OK
}

/// The proxy-wasm map encoding: a u32 count, a (u32 name size, u32 value size) pair per header,
/// then each name and value followed by a NUL byte (little endian throughout).
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Reads the map encoding; `None` when it is malformed (nothing the host should send).
pub fn deserialize(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
    };
    let count = u32_at(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count.min(bytes.len() / 10));
    for i in 0..count {
        let (k, v) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(data..data.checked_add(k)?)?;
        data = data.checked_add(k)?.checked_add(1)?;
        let value = bytes.get(data..data.checked_add(v)?)?;
        data = data.checked_add(v)?.checked_add(1)?;
        out.push((key.to_vec(), value.to_vec()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_any_bytes() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/"), (b"x-any", b"caf\xe9\x00\xff"), (b"empty", b"")];
        let back = deserialize(&serialize(&pairs)).unwrap();
        let back: Vec<(&[u8], &[u8])> = back.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        assert_eq!(back, pairs);
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = serialize(&[(b"a", b"b")]);
        for cut in 0..good.len() - 1 {
            assert!(deserialize(&good[..cut]).is_none(), "cut at {cut}");
        }
        assert!(deserialize(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert_eq!(deserialize(&0u32.to_le_bytes()), Some(vec![]));
    }
}

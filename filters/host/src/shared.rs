//! Numbers in shared data, updated by compare-and-swap: leases, generations, counts that every
//! worker sees.

use crate::Host;

/// A u64 in shared data (0 when missing or malformed) and its CAS token.
pub fn get_u64(host: &impl Host, key: &str) -> (u64, Option<u32>) {
    let (value, cas) = host.shared_get(key);
    let n = value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes);
    (n, cas)
}

pub fn set_u64(host: &impl Host, key: &str, value: u64) -> bool {
    host.shared_set(key, &value.to_le_bytes(), None)
}

/// Compare-and-swap on a u64: `update` maps the current value to the next, or `None` to leave
/// it. Returns the value written. A missing key is created as 0 first, because a write to a
/// missing key succeeds whatever the CAS.
pub fn update_u64(host: &impl Host, key: &str, update: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    for _ in 0..8 {
        let (current, cas) = get_u64(host, key);
        if cas.is_none() {
            host.shared_set(key, &0u64.to_le_bytes(), None);
            continue;
        }
        let next = update(current)?;
        if host.shared_set(key, &next.to_le_bytes(), cas) {
            return Some(next);
        }
    }
    None
}

/// Takes a lease that falls due at a time in shared data: true (and the next due time is
/// `next`) if it was due at `now`. Of all the workers ticking, one wins each period.
pub fn take_lease(host: &impl Host, key: &str, now: u64, next: u64) -> bool {
    update_u64(host, key, |due| (now >= due).then_some(next)).is_some()
}

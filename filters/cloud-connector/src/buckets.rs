//! Per-organization token buckets that every worker draws from. The arithmetic and slot policy
//! are `edgewise_core::cloud_connector::limiter`'s; this is where the slots live. Natively the one
//! filter object holds them, each behind its own lock. On proxy-wasm every worker has its own VM,
//! so they live in shared data, updated by compare-and-swap.

use std::cell::RefCell;
use std::sync::Mutex;

use edgewise_core::cloud_connector::limiter::{
    classify, fingerprint, probe_slots, slot_use, Bucket, Limit, SlotUse, Verdict,
};
use edgewise_host::{lock, Host};

/// Attempts before giving up on a contended shared slot (and letting the request through).
const CAS_ATTEMPTS: usize = 8;

pub enum Buckets {
    /// An organization's bucket is one for every worker, or its limit would be multiplied by
    /// their number: a lock per slot, so two workers meet only on the same organization (or on
    /// slots its fingerprint probes).
    InMemory {
        slots: Vec<Mutex<Option<Bucket>>>,
        idle_ms: u64,
    },
    Shared {
        prefix: String,
        slots: u32,
        idle_ms: u64,
    },
}

thread_local! {
    /// The slot's shared-data key, rebuilt in place (no allocation per request).
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Buckets {
    pub fn new(in_memory: bool, namespace: &str, slots: u32, idle_ms: u64) -> Self {
        if in_memory {
            let slots = (0..slots).map(|_| Mutex::new(None)).collect();
            Buckets::InMemory { slots, idle_ms }
        } else {
            Buckets::Shared { prefix: format!("edgewise.cloud_connector.{namespace}.rl."), slots, idle_ms }
        }
    }

    /// Takes a token from the bucket of (feature, organization key).
    #[inline(never)]
    pub fn take(&self, host: &impl Host, limit: &Limit, feature: usize, key: &str, now_ms: u64) -> Verdict {
        let fp = fingerprint(feature, key);
        match self {
            Buckets::InMemory { slots, idle_ms } => take_in_memory(slots, *idle_ms, limit, fp, now_ms),
            Buckets::Shared { prefix, slots, idle_ms } => NAME.with(|name| match name.try_borrow_mut() {
                Ok(mut name) => take_shared(host, prefix, *slots, *idle_ms, limit, fp, now_ms, &mut name),
                Err(_) => take_shared(host, prefix, *slots, *idle_ms, limit, fp, now_ms, &mut String::new()),
            }),
        }
    }
}

/// The slot for `fp`: its own bucket, a free slot, or else the least recently used one probed.
fn take_in_memory(slots: &[Mutex<Option<Bucket>>], idle_ms: u64, limit: &Limit, fp: u64, now_ms: u64) -> Verdict {
    let mut oldest: Option<(u32, u64)> = None;
    for slot in probe_slots(fp, slots.len() as u32) {
        let Some(cell) = slots.get(slot as usize) else { continue };
        let mut bucket = lock(cell);
        match slot_use(*bucket, fp, now_ms, idle_ms) {
            SlotUse::Mine(mine) => return put(&mut bucket, limit.take(Some(mine), fp, now_ms)),
            SlotUse::Free => return put(&mut bucket, limit.take(None, fp, now_ms)),
            SlotUse::Busy { updated_ms } => {
                if oldest.is_none_or(|(_, t)| updated_ms < t) {
                    oldest = Some((slot, updated_ms));
                }
            }
        }
    }
    match oldest.and_then(|(slot, _)| slots.get(slot as usize)) {
        Some(cell) => put(&mut lock(cell), limit.take(None, fp, now_ms)),
        None => limit.take(None, fp, now_ms).1,
    }
}

fn put(slot: &mut Option<Bucket>, (bucket, verdict): (Bucket, Verdict)) -> Verdict {
    *slot = Some(bucket);
    verdict
}

#[allow(clippy::too_many_arguments)]
fn take_shared(
    host: &impl Host,
    prefix: &str,
    slots: u32,
    idle_ms: u64,
    limit: &Limit,
    fp: u64,
    now_ms: u64,
    name: &mut String,
) -> Verdict {
    for _ in 0..CAS_ATTEMPTS {
        let Some((slot, current, cas)) = find_shared(host, prefix, slots, idle_ms, fp, now_ms, name) else { continue };
        if cas.is_none() {
            // A slot never used: create it empty first, so the write below can be a CAS (the
            // host applies a write to a missing key whatever the CAS).
            host.shared_set(name, &[0; Bucket::SIZE], None);
            continue;
        }
        let (bucket, verdict) = limit.take(current, fp, now_ms);
        if host.shared_set(name, &bucket.encode(), cas) {
            return verdict;
        }
        log::debug!("cloud-connector: rate-limit slot {slot} changed under us; retrying");
    }
    // Only endless contention on one slot gets here; an unlimited request beats a wrong 429.
    log::warn!("cloud-connector: rate-limit slot contention; request let through");
    limit.take(None, fp, now_ms).1
}

/// The shared slot for `fp`: its own bucket, a free slot, or the least recently used one probed.
/// `name` is left holding the slot's shared-data key.
fn find_shared(
    host: &impl Host,
    prefix: &str,
    slots: u32,
    idle_ms: u64,
    fp: u64,
    now_ms: u64,
    name: &mut String,
) -> Option<(u32, Option<Bucket>, Option<u32>)> {
    let mut fallback: Option<(u32, u64, Option<u32>)> = None;
    for slot in probe_slots(fp, slots) {
        slot_name(prefix, slot, name);
        let (value, cas) = host.shared_get(name);
        match classify(value.as_deref(), fp, now_ms, idle_ms) {
            SlotUse::Mine(bucket) => return Some((slot, Some(bucket), cas)),
            SlotUse::Free => return Some((slot, None, cas)),
            SlotUse::Busy { updated_ms } => {
                if fallback.is_none_or(|(_, oldest, _)| updated_ms < oldest) {
                    fallback = Some((slot, updated_ms, cas));
                }
            }
        }
    }
    let (slot, _, cas) = fallback?;
    slot_name(prefix, slot, name);
    Some((slot, None, cas))
}

fn slot_name(prefix: &str, slot: u32, name: &mut String) {
    use std::fmt::Write;
    name.clear();
    name.push_str(prefix);
    let _ = write!(name, "{slot}");
}

//! Per-organization token buckets in shared data, so every worker draws from the same bucket.
//! The arithmetic and slot policy are `edgewise_core::connector::limiter`'s; this is the
//! compare-and-swap loop around them.

use std::cell::RefCell;

use edgewise_core::connector::limiter::{classify, fingerprint, probe_slots, Bucket, Limit, SlotUse, Verdict};
use edgewise_host::Host;

/// Attempts before giving up on a contended slot (and letting the request through).
const CAS_ATTEMPTS: usize = 8;

pub struct Buckets {
    prefix: String,
    slots: u32,
    idle_ms: u64,
}

thread_local! {
    /// The slot's shared-data key, rebuilt in place (no allocation per request).
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Buckets {
    pub fn new(namespace: &str, slots: u32, idle_ms: u64) -> Self {
        let prefix = format!("edgewise.cloud_connector.{namespace}.rl.");
        Buckets { prefix, slots, idle_ms }
    }

    /// Takes a token from the bucket of (feature, organization key).
    #[inline(never)]
    pub fn take(&self, host: &impl Host, limit: &Limit, feature: usize, key: &str, now_ms: u64) -> Verdict {
        NAME.with(|name| match name.try_borrow_mut() {
            Ok(mut name) => self.take_in(host, limit, fingerprint(feature, key), now_ms, &mut name),
            Err(_) => self.take_in(host, limit, fingerprint(feature, key), now_ms, &mut String::new()),
        })
    }

    fn take_in(&self, host: &impl Host, limit: &Limit, fp: u64, now_ms: u64, name: &mut String) -> Verdict {
        for _ in 0..CAS_ATTEMPTS {
            let Some((slot, current, cas)) = self.find(host, fp, now_ms, name) else { continue };
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

    /// The slot for `fp`: its own bucket, a free slot, or the least recently used one probed.
    /// `name` is left holding the slot's shared-data key.
    fn find(
        &self,
        host: &impl Host,
        fp: u64,
        now_ms: u64,
        name: &mut String,
    ) -> Option<(u32, Option<Bucket>, Option<u32>)> {
        let mut fallback: Option<(u32, u64, Option<u32>)> = None;
        for slot in probe_slots(fp, self.slots) {
            self.name(slot, name);
            let (value, cas) = host.shared_get(name);
            match classify(value.as_deref(), fp, now_ms, self.idle_ms) {
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
        self.name(slot, name);
        Some((slot, None, cas))
    }

    fn name(&self, slot: u32, name: &mut String) {
        use std::fmt::Write;
        name.clear();
        name.push_str(&self.prefix);
        let _ = write!(name, "{slot}");
    }
}

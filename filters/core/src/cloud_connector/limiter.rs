//! Token buckets for per-organization rate limits, as plain arithmetic on a 24-byte state that
//! the filter keeps in Envoy's shared data (one slot per bucket, updated by compare-and-swap).
//!
//! Buckets live in a fixed number of slots, so memory is bounded whatever the number of
//! organizations: a bucket goes to `slot = fingerprint % slots` or one of the next few; a slot
//! whose bucket has idled long enough to be full again is taken over (nothing is lost: a full
//! bucket and a new one are the same), and when every probed slot is busy the least recently
//! used one is.

/// Slots probed for a bucket before one is taken over.
pub const PROBES: u64 = 4;

/// Tokens are counted in thousandths, so slow rates refill smoothly with integer arithmetic.
const MILLI: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests: u64,
    pub period_ms: u64,
    pub burst: u64,
}

impl Limit {
    /// `requests` every `period_ms`, at most `burst` at once (default: `requests`).
    pub fn new(requests: u64, period_ms: u64, burst: Option<u64>) -> Result<Limit, String> {
        let burst = burst.unwrap_or(requests);
        if requests == 0 || burst == 0 || requests > 1_000_000 || burst > 1_000_000 {
            return Err("requests and burst must lie between 1 and 1000000".into());
        }
        if period_ms == 0 {
            return Err("the period must be at least a millisecond".into());
        }
        Ok(Limit { requests, period_ms, burst })
    }

    /// Time for an empty bucket to fill up.
    pub fn refill_ms(&self) -> u64 {
        (self.burst * self.period_ms).div_ceil(self.requests)
    }

    fn capacity(&self) -> u64 {
        self.burst * MILLI
    }

    fn level(&self, bucket: &Bucket, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(bucket.updated_ms) as u128;
        let refill = elapsed * (self.requests * MILLI) as u128 / self.period_ms as u128;
        (bucket.milli_tokens as u128 + refill).min(self.capacity() as u128) as u64
    }

    /// Takes one token from `bucket` (a new, full one if `None`).
    pub fn take(&self, bucket: Option<Bucket>, fingerprint: u64, now_ms: u64) -> (Bucket, Verdict) {
        let level = bucket.map_or(self.capacity(), |b| self.level(&b, now_ms));
        let allowed = level >= MILLI;
        let after = if allowed { level - MILLI } else { level };
        // Time until one whole token is there again, and until the bucket is full.
        let ms_for = |milli: u64| (milli * self.period_ms).div_ceil(self.requests * MILLI);
        let verdict = Verdict {
            allowed,
            limit: self.burst,
            remaining: after / MILLI,
            retry_after_s: if allowed { 0 } else { ms_for(MILLI - after).div_ceil(1000).max(1) },
            reset_s: ms_for(self.capacity() - after).div_ceil(1000),
        };
        (Bucket { fingerprint, milli_tokens: after, updated_ms: now_ms }, verdict)
    }
}

/// What the 429 (and the RateLimit-* headers) say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The bucket size (`RateLimit-Limit`).
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the next request can pass (`Retry-After`), 0 when allowed.
    pub retry_after_s: u64,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Whose bucket this is (see [`fingerprint`]); never 0.
    pub fingerprint: u64,
    pub milli_tokens: u64,
    pub updated_ms: u64,
}

impl Bucket {
    pub const SIZE: usize = 24;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        for (chunk, v) in out.chunks_exact_mut(8).zip([self.fingerprint, self.milli_tokens, self.updated_ms]) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        let mut words = bytes.chunks_exact(8).map(|c| c.try_into().map(u64::from_le_bytes));
        let (Some(Ok(fingerprint)), Some(Ok(milli_tokens)), Some(Ok(updated_ms)), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        Some(Bucket { fingerprint, milli_tokens, updated_ms }).filter(|b| b.fingerprint != 0)
    }
}

/// A stable 64-bit fingerprint of (feature, organization key): FNV-1a, never 0.
pub fn fingerprint(feature: usize, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in (feature as u64).to_le_bytes().iter().chain(key.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// Where a bucket may live: the slots probed, in order.
pub fn probe_slots(fingerprint: u64, slots: u32) -> impl Iterator<Item = u32> {
    let slots = slots.max(1) as u64;
    (0..PROBES.min(slots)).map(move |i| ((fingerprint % slots + i) % slots) as u32)
}

/// What to do with a probed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotUse {
    /// This organization's bucket.
    Mine(Bucket),
    /// Empty, or holding a bucket idle long enough to be full: start a new one here.
    Free,
    /// Another organization's live bucket.
    Busy { updated_ms: u64 },
}

/// Classifies a slot's content for `fingerprint`. `idle_ms` is the longest refill time of any
/// limit, after which every bucket is full.
pub fn classify(content: Option<&[u8]>, fingerprint: u64, now_ms: u64, idle_ms: u64) -> SlotUse {
    slot_use(content.and_then(Bucket::decode), fingerprint, now_ms, idle_ms)
}

/// [`classify`] of a slot held as a bucket (the native build's slots are in memory).
pub fn slot_use(bucket: Option<Bucket>, fingerprint: u64, now_ms: u64, idle_ms: u64) -> SlotUse {
    match bucket {
        None => SlotUse::Free,
        Some(b) if b.fingerprint == fingerprint => SlotUse::Mine(b),
        Some(b) if now_ms.saturating_sub(b.updated_ms) >= idle_ms => SlotUse::Free,
        Some(b) => SlotUse::Busy { updated_ms: b.updated_ms },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000;
    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 3_600_000;

    fn limit(requests: u64, period_ms: u64, burst: Option<u64>) -> Limit {
        Limit::new(requests, period_ms, burst).unwrap()
    }

    #[test]
    fn burst_then_steady_rate() {
        let l = limit(10, SECOND, Some(5));
        let fp = fingerprint(0, "org");
        let mut bucket = None;
        let mut allowed = 0;
        for _ in 0..20 {
            let (b, v) = l.take(bucket, fp, 1_000);
            bucket = Some(b);
            allowed += v.allowed as u32;
        }
        assert_eq!(allowed, 5, "a fresh bucket allows `burst` at once");
        // One token per 100 ms.
        let (b, v) = l.take(bucket, fp, 1_099);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_s, 1);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.limit, 5);
        let (_, v) = l.take(Some(b), fp, 1_100);
        assert!(v.allowed);
        // Over 10 s at 1 request per ms, exactly 10/s pass.
        let mut bucket = None;
        let passed = (0..10_000u64).filter(|t| {
            let (b, v) = l.take(bucket, fp, 50_000 + t);
            bucket = Some(b);
            v.allowed
        });
        assert_eq!(passed.count(), 5 + 100 - 1);
    }

    #[test]
    fn slow_rates_refill_in_fractions() {
        let l = limit(1, MINUTE, Some(1));
        let fp = fingerprint(0, "org");
        let (b, v) = l.take(None, fp, 0);
        assert!(v.allowed);
        let (_, v) = l.take(Some(b), fp, 30_000);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_s, 30);
        assert_eq!(v.reset_s, 30);
        let (_, v) = l.take(Some(b), fp, 60_000);
        assert!(v.allowed);
        assert_eq!(l.refill_ms(), 60_000);
    }

    #[test]
    fn bucket_round_trips_and_rejects_garbage() {
        let b = Bucket { fingerprint: 7, milli_tokens: 1234, updated_ms: u64::MAX };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(&[1, 2, 3]), None);
        assert_eq!(Bucket::decode(&[0; 24]), None, "fingerprint 0 means empty");
        assert_eq!(Bucket::decode(&[1; 25]), None);
    }

    #[test]
    fn slots_are_classified() {
        let mine = fingerprint(1, "a");
        let other = Bucket { fingerprint: fingerprint(1, "b"), milli_tokens: 0, updated_ms: 1000 };
        assert_eq!(classify(None, mine, 0, 500), SlotUse::Free);
        assert_eq!(classify(Some(&other.encode()), mine, 1200, 500), SlotUse::Busy { updated_ms: 1000 });
        assert_eq!(classify(Some(&other.encode()), mine, 1500, 500), SlotUse::Free, "idle: full again");
        let b = Bucket { fingerprint: mine, ..other };
        assert_eq!(classify(Some(&b.encode()), mine, 1200, 500), SlotUse::Mine(b));
        assert_ne!(fingerprint(0, "a"), fingerprint(1, "a"), "features have separate buckets");
        let slots: Vec<u32> = probe_slots(u64::MAX, 10).collect();
        assert_eq!(slots, vec![5, 6, 7, 8]);
        assert_eq!(probe_slots(3, 2).collect::<Vec<_>>(), vec![1, 0]);
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limit::new(0, SECOND, None).is_err());
        assert!(Limit::new(1, SECOND, Some(0)).is_err());
        assert!(Limit::new(1, 0, None).is_err());
        assert_eq!(limit(100, HOUR, None).refill_ms(), 3_600_000);
    }
}

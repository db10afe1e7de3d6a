//! The service's Prometheus metrics. Labels are bounded by the limits file (features) and fixed
//! outcomes, never by organizations.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the check latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// What became of one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    OverLimit,
    /// No limit for this feature (or another domain): allowed, not counted.
    Unlimited,
    /// The storage failed: the whole request is answered UNAVAILABLE.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Ok, Outcome::OverLimit, Outcome::Unlimited, Outcome::Error];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::OverLimit => "over_limit",
            Outcome::Unlimited => "unlimited",
            Outcome::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

pub struct Metrics {
    /// Per feature of the limits file (and `other`), per outcome.
    descriptors: BTreeMap<String, [AtomicU64; 4]>,
    requests: [AtomicU64; 4],
    storage_errors: AtomicU64,
    storage_up: AtomicU64,
    check: Histogram,
}

/// The feature label of a descriptor whose feature the file does not list.
const OTHER: &str = "other";

impl Metrics {
    pub fn new<'a>(features: impl IntoIterator<Item = &'a String>) -> Metrics {
        let mut descriptors: BTreeMap<String, [AtomicU64; 4]> =
            features.into_iter().map(|f| (f.clone(), Default::default())).collect();
        descriptors.entry(OTHER.into()).or_default();
        Metrics {
            descriptors,
            requests: Default::default(),
            storage_errors: AtomicU64::new(0),
            storage_up: AtomicU64::new(0),
            check: Histogram::default(),
        }
    }

    pub fn descriptor(&self, feature: &str, outcome: Outcome) {
        let counters = self.descriptors.get(feature).or_else(|| self.descriptors.get(OTHER));
        if let Some(c) = counters.and_then(|c| c.get(outcome.index())) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn request(&self, outcome: Outcome, took: Duration) {
        if let Some(c) = self.requests.get(outcome.index()) {
            c.fetch_add(1, Relaxed);
        }
        let seconds = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.check.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.check.count.fetch_add(1, Relaxed);
        self.check.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn storage_error(&self) {
        self.storage_errors.fetch_add(1, Relaxed);
    }

    pub fn set_storage_up(&self, up: bool) {
        self.storage_up.store(u64::from(up), Relaxed);
    }

    pub fn storage_up(&self) -> bool {
        self.storage_up.load(Relaxed) == 1
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP edgewise_ratelimit_requests_total RateLimitService calls by overall outcome.");
        let _ = writeln!(out, "# TYPE edgewise_ratelimit_requests_total counter");
        for o in Outcome::ALL {
            let n = self.requests.get(o.index()).map_or(0, |c| c.load(Relaxed));
            let _ = writeln!(out, "edgewise_ratelimit_requests_total{{outcome=\"{}\"}} {n}", o.label());
        }
        let _ =
            writeln!(out, "# HELP edgewise_ratelimit_descriptors_total Descriptors checked, by feature and outcome.");
        let _ = writeln!(out, "# TYPE edgewise_ratelimit_descriptors_total counter");
        for (feature, counters) in &self.descriptors {
            for o in Outcome::ALL {
                let n = counters.get(o.index()).map_or(0, |c| c.load(Relaxed));
                let _ = writeln!(
                    out,
                    "edgewise_ratelimit_descriptors_total{{feature=\"{feature}\",outcome=\"{}\"}} {n}",
                    o.label()
                );
            }
        }
        let _ = writeln!(out, "# HELP edgewise_ratelimit_storage_errors_total Failed calls to Redis.");
        let _ = writeln!(out, "# TYPE edgewise_ratelimit_storage_errors_total counter");
        let _ = writeln!(out, "edgewise_ratelimit_storage_errors_total {}", self.storage_errors.load(Relaxed));
        let _ = writeln!(out, "# HELP edgewise_ratelimit_storage_up 1 when the last call to Redis succeeded.");
        let _ = writeln!(out, "# TYPE edgewise_ratelimit_storage_up gauge");
        let _ = writeln!(out, "edgewise_ratelimit_storage_up {}", self.storage_up.load(Relaxed));
        let _ = writeln!(out, "# HELP edgewise_ratelimit_check_seconds Time to answer a RateLimitService call.");
        let _ = writeln!(out, "# TYPE edgewise_ratelimit_check_seconds histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.check.buckets) {
            let _ = writeln!(out, "edgewise_ratelimit_check_seconds_bucket{{le=\"{bound}\"}} {}", bucket.load(Relaxed));
        }
        let count = self.check.count.load(Relaxed);
        let _ = writeln!(out, "edgewise_ratelimit_check_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.check.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "edgewise_ratelimit_check_seconds_sum {sum}");
        let _ = writeln!(out, "edgewise_ratelimit_check_seconds_count {count}");
        out
    }
}

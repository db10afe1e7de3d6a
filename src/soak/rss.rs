//! Envoy's resident memory over the load, and the CPU the soak took.

use std::time::{Duration, Instant};

/// RSS sampling period.
const RSS_EVERY: Duration = Duration::from_secs(5);
/// The RSS growth that counts as a leak: over the second half of the load, both a slope above
/// this many MiB per minute and a growth above `RSS_GROWTH_MIB`.
const RSS_SLOPE_LIMIT: f64 = 1.0;
const RSS_GROWTH_MIB: f64 = 4.0;

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead"))) {
        return None;
    }
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// user + system CPU ticks of a process (`self`, or a pid).
pub fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// (busy, total) CPU ticks of the machine.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Least-squares slope of (minutes, MiB); 0 for fewer than three samples.
pub fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 3 {
        return 0.0;
    }
    let (sx, sy) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) =
        samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx) * (x - mx)));
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

pub struct RssSeries {
    pub role: &'static str,
    /// (minutes since the start of the load, MiB)
    pub samples: Vec<(f64, f64)>,
    /// When the process exited or became a zombie (seconds).
    pub gone_at: Option<f64>,
}

impl RssSeries {
    /// The samples of the second half of the load (after the warm-up).
    fn second_half(&self) -> Vec<(f64, f64)> {
        let half = self.samples.last().map_or(0.0, |s| s.0) / 2.0;
        self.samples.iter().copied().filter(|s| s.0 >= half).collect()
    }

    /// (first MiB, last MiB, slope, slope over the second half)
    pub fn summary(&self) -> (f64, f64, f64, f64) {
        let first = self.samples.first().map_or(0.0, |s| s.1);
        let last = self.samples.last().map_or(0.0, |s| s.1);
        (first, last, slope(&self.samples), slope(&self.second_half()))
    }

    /// Grows over the second half of the load: a slope above the limit and a growth above the
    /// limit in that half.
    pub fn leaking(&self) -> bool {
        let second = self.second_half();
        let growth = second.last().map_or(0.0, |s| s.1) - second.first().map_or(0.0, |s| s.1);
        slope(&second) > RSS_SLOPE_LIMIT && growth > RSS_GROWTH_MIB
    }
}

/// Samples each (role, pid) every `RSS_EVERY` from now until the deadline.
pub async fn sample_rss(envoys: Vec<(&'static str, u32)>, start: Instant, deadline: Instant) -> Vec<RssSeries> {
    let mut series: Vec<RssSeries> =
        envoys.iter().map(|(role, _)| RssSeries { role, samples: Vec::new(), gone_at: None }).collect();
    loop {
        let t = start.elapsed().as_secs_f64() / 60.0;
        for (s, (_, pid)) in series.iter_mut().zip(&envoys) {
            if s.gone_at.is_some() {
                continue;
            }
            match rss_mib(*pid) {
                Some(mib) => s.samples.push((t, mib)),
                None => s.gone_at = Some(t * 60.0),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return series;
        }
        tokio::time::sleep_until((now + RSS_EVERY).min(deadline).into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(samples: &[(f64, f64)]) -> RssSeries {
        RssSeries { role: "t", samples: samples.to_vec(), gone_at: None }
    }

    #[test]
    fn slope_is_the_least_squares_fit() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 3.0), (1.0, 5.0)]), 0.0);
    }

    #[test]
    fn a_leak_is_growth_in_the_second_half() {
        // Warm-up growth in the first half, flat after it.
        let warm: Vec<(f64, f64)> =
            (0..=10).map(|i| (f64::from(i), if i < 5 { f64::from(i) * 10.0 } else { 50.0 })).collect();
        assert!(!series(&warm).leaking());
        let steady: Vec<(f64, f64)> = (0..=10).map(|i| (f64::from(i), 50.0 + f64::from(i) * 2.0)).collect();
        assert!(series(&steady).leaking());
        // A slope above the limit but less than the growth limit over the half.
        let small: Vec<(f64, f64)> = (0..=10).map(|i| (f64::from(i) / 10.0, 50.0 + f64::from(i) * 0.5)).collect();
        assert!(!series(&small).leaking());
    }
}

//! Driving a scenario's load: the weighted pick of classes, the workers that send and classify,
//! and the counter snapshots taken before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::chaos::secs;
use super::class::{classify, Class};
use super::request::send;
use super::rss::{sample_rss, RssSeries};
use super::scenario::{key, Scenario};

/// Examples of unexpected answers kept per class.
const EXAMPLES: usize = 5;

/// What one class sent and got.
#[derive(Default)]
pub struct Tally {
    pub sent: u64,
    pub labels: BTreeMap<String, u64>,
    pub unexpected: u64,
    pub examples: Vec<String>,
    /// Answers whose counters are not known (hostile cases with no listed expectation).
    pub unknown_counters: u64,
    /// When the first request was sent (seconds since the start of the load).
    pub first: Option<f64>,
    /// When the last answer came.
    pub last: f64,
    pub latencies_ms: Vec<f32>,
}

/// What a scenario's load sent and got: per class, and the counters the answers add up to.
pub struct Load {
    pub tallies: Vec<Mutex<Tally>>,
    pub expected: Mutex<BTreeMap<String, u64>>,
    pub latencies_ms: Mutex<Vec<f32>>,
    /// The latest a request started after its slot (seconds).
    pub max_lag: Mutex<f64>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The class of request `n`: a fixed pseudo-random sequence, weighted by the classes' weights.
pub fn pick(classes: &[Class], n: u64) -> usize {
    pick_weighted(classes.iter().map(|c| c.weight), n)
}

fn pick_weighted(weights: impl Iterator<Item = u32> + Clone, n: u64) -> usize {
    let total: u64 = weights.clone().map(u64::from).sum();
    let mut r = splitmix(n) % total.max(1);
    for (i, w) in weights.enumerate() {
        if r < u64::from(w) {
            return i;
        }
        r -= u64::from(w);
    }
    0
}

async fn worker(
    sc: Arc<Scenario>,
    load: Arc<Load>,
    next: Arc<AtomicU64>,
    start: Instant,
    deadline: Instant,
    interval: f64,
) {
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let due = start + Duration::from_secs_f64(interval * n as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let lag = Instant::now().saturating_duration_since(due).as_secs_f64();
        let index = pick(&sc.classes, n);
        let class = &sc.classes[index];
        let during = sc.chaos.active();
        let sent_at = start.elapsed().as_secs_f64();
        let t = Instant::now();
        let got = send((class.make)(n)).await;
        let latency = t.elapsed();
        let label = got.label();
        let verdict = classify(class, &got, &label);
        if let Ok(mut l) = load.latencies_ms.lock() {
            l.push(latency.as_secs_f32() * 1000.0);
        }
        if let Ok(mut m) = load.max_lag.lock() {
            *m = m.max(lag);
        }
        let Ok(mut tally) = load.tallies[index].lock() else { continue };
        tally.sent += 1;
        *tally.labels.entry(label.clone()).or_default() += 1;
        tally.first.get_or_insert(sent_at);
        tally.last = tally.last.max(sent_at + latency.as_secs_f64());
        tally.latencies_ms.push(latency.as_secs_f32() * 1000.0);
        match verdict {
            Ok(Some(counters)) => {
                drop(tally);
                if let Ok(mut e) = load.expected.lock() {
                    for (k, v) in counters {
                        *e.entry(k).or_default() += v;
                    }
                }
            }
            Ok(None) => tally.unknown_counters += 1,
            Err(why) => {
                tally.unexpected += 1;
                if tally.examples.len() < EXAMPLES {
                    let after = sc.chaos.active();
                    tally.examples.push(format!(
                        "t={sent_at:.1} s, {:.0} ms, during: {during}{}: `{label}`: {why}; {}",
                        latency.as_secs_f64() * 1000.0,
                        if after == during { String::new() } else { format!(" (at the answer: {after})") },
                        got.detail()
                    ));
                }
                eprintln!("soak: {} / {}: unexpected `{label}` at t={sent_at:.1} s: {why}", sc.name, class.name);
            }
        }
    }
}

/// Every watched Envoy's stats and every stand-in's request count, at one moment.
pub struct Snapshot {
    pub stats: Vec<BTreeMap<String, u64>>,
    pub stand_ins: Vec<u64>,
}

pub async fn snapshot(sc: &Scenario) -> Snapshot {
    let mut stats = Vec::new();
    for w in &sc.watched {
        stats.push(w.envoy.stats().await.unwrap_or_default());
    }
    Snapshot { stats, stand_ins: sc.stand_ins.iter().map(|(_, f)| f()).collect() }
}

/// The counters compared with what was sent, by key.
pub fn tracked(sc: &Scenario, snap: &Snapshot) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (w, stats) in sc.watched.iter().zip(&snap.stats) {
        for (k, v) in stats {
            let name = k.strip_prefix("wasmcustom.").unwrap_or(k);
            if w.prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                out.insert(key(w.role, name), *v);
            }
        }
    }
    for ((name, _), v) in sc.stand_ins.iter().zip(&snap.stand_ins) {
        out.insert(format!("stand-in: {name}"), *v);
    }
    out
}

pub fn deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0)))).collect()
}

/// What one scenario's run leaves for its checks (`report::check`).
pub struct Ran {
    pub load: Arc<Load>,
    pub baseline: Snapshot,
    pub last: Snapshot,
    pub rss: Vec<RssSeries>,
}

/// A counter's key as the tables show it: without the role and the filter's prefix
/// (`edgewise.<filter>.`), stand-ins and peers named as such.
pub fn short(counter: &str) -> String {
    let (role, name) = counter.split_once(": ").unwrap_or(("", counter));
    let name = name.strip_prefix("edgewise.").and_then(|rest| rest.split_once('.')).map_or(name, |(_, rest)| rest);
    if role == "stand-in" || role == "peers" {
        format!("{role} {name}")
    } else {
        name.to_string()
    }
}

/// Runs one scenario's load and chaos from `start` to `deadline`.
pub async fn run(sc: Arc<Scenario>, workers: usize, rps: f64, start: Instant, deadline: Instant) -> Ran {
    let load = Arc::new(Load {
        tallies: sc.classes.iter().map(|_| Mutex::new(Tally::default())).collect(),
        expected: Mutex::new(BTreeMap::new()),
        latencies_ms: Mutex::new(Vec::new()),
        max_lag: Mutex::new(0.0),
    });
    let baseline = snapshot(&sc).await;
    tokio::time::sleep_until(start.into()).await;
    if let Ok(mut t0) = sc.chaos.t0.lock() {
        *t0 = Some(start);
    }
    let chaos = sc.chaos_fn.lock().ok().and_then(|mut f| f.take()).map(|f| tokio::spawn(f(sc.chaos.clone(), deadline)));
    let pids: Vec<(&'static str, u32)> = sc.watched.iter().map(|w| (w.role, w.envoy.pid())).collect();
    let rss = tokio::spawn(sample_rss(pids, start, deadline));
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(worker(sc.clone(), load.clone(), next.clone(), start, deadline, 1.0 / rps)))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            sc.chaos.problem(format!("a load task failed: {e}"));
        }
    }
    if let Some(chaos) = chaos {
        if tokio::time::timeout(secs(40), chaos).await.is_err() {
            sc.chaos.problem("the chaos task did not finish 40 s after the deadline");
        }
    }
    let rss = rss.await.unwrap_or_default();
    let last = snapshot(&sc).await;
    Ran { load, baseline, last, rss }
}

/// SOAK_PROBE=1: each class once, on a quiet Envoy: its answer and the counters it moved.
pub async fn probe(scenarios: &[Arc<Scenario>]) {
    for sc in scenarios {
        println!("== {}", sc.name);
        for (n, c) in sc.classes.iter().enumerate() {
            let before = tracked(sc, &snapshot(sc).await);
            let sent = Instant::now();
            let got = send((c.make)(n as u64)).await;
            let took = sent.elapsed();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = tracked(sc, &snapshot(sc).await);
            let label = got.label();
            let listed = |counters: Vec<(String, u64)>| -> BTreeSet<String> {
                counters
                    .into_iter()
                    .filter(|(k, v)| *v > 0 && !sc.relational.contains(k))
                    .map(|(k, v)| format!("{} +{v}", short(&k)))
                    .collect()
            };
            let moved = listed(deltas(&before, &after).into_iter().collect());
            let verdict = match classify(c, &got, &label) {
                Ok(Some(counters)) => {
                    let want = listed(counters);
                    if want == moved {
                        "ok".to_string()
                    } else {
                        format!("COUNTERS expected [{}]", want.into_iter().collect::<Vec<_>>().join(", "))
                    }
                }
                Ok(None) => "ok (counters not known)".into(),
                Err(e) => format!("UNEXPECTED ({e}): {}", got.detail()),
            };
            let moved: Vec<String> = moved.into_iter().collect();
            println!(
                "{:<18} {:<70} {:>5} ms `{label}` [{}] {verdict}",
                c.kind.name(),
                c.name,
                took.as_millis(),
                moved.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_the_role_and_the_filter() {
        assert_eq!(short("serverless: edgewise.serverless.requests.routed"), "requests.routed");
        assert_eq!(short("egress: http.egress.rbac.denied"), "http.egress.rbac.denied");
        assert_eq!(short("stand-in: customer-a"), "stand-in customer-a");
        assert_eq!(short("peers: answered by catalog"), "peers answered by catalog");
    }

    #[test]
    fn picks_follow_the_weights() {
        let weights = [10u32, 0, 5, 1];
        let mut seen = [0u32; 4];
        for n in 0..16_000 {
            seen[pick_weighted(weights.iter().copied(), n)] += 1;
        }
        assert_eq!(seen[1], 0);
        for (w, s) in weights.iter().zip(seen) {
            let share = f64::from(s) / 16_000.0;
            assert!((share - f64::from(*w) / 16.0).abs() < 0.02, "weight {w}: share {share}");
        }
        // The sequence is fixed: the same request number always picks the same class.
        assert_eq!(pick_weighted(weights.iter().copied(), 42), pick_weighted(weights.iter().copied(), 42));
    }
}

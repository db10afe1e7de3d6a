//! What a scenario's chaos did and what is going on right now, and the pieces chaos is made of.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::envoy::Envoy;
use crate::scenarios::cloud_connector::Issuers;

/// The chaos of one scenario: its log, the conditions in force (named in the examples of
/// unexpected answers), its problems and how many events of each kind happened.
#[derive(Default)]
pub struct Chaos {
    pub(crate) t0: Mutex<Option<Instant>>,
    pub(crate) events: Mutex<Vec<String>>,
    active: Mutex<BTreeSet<String>>,
    pub(crate) problems: Mutex<Vec<String>>,
    pub(crate) counts: Mutex<BTreeMap<String, u64>>,
}

impl Chaos {
    fn t(&self) -> f64 {
        self.t0.lock().ok().and_then(|t| t.map(|t| t.elapsed().as_secs_f64())).unwrap_or(0.0)
    }

    /// Logs an event and counts it under `kind`.
    pub fn event(&self, kind: &str, what: impl Into<String>) {
        let line = format!("t={:.1} s: {}", self.t(), what.into());
        if let Ok(mut e) = self.events.lock() {
            e.push(line);
        }
        self.tally(kind);
    }

    /// Counts an event of this kind without logging it.
    pub fn tally(&self, kind: &str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// Puts a condition in force, or ends it.
    pub fn set(&self, condition: &str, on: bool) {
        if let Ok(mut a) = self.active.lock() {
            if on {
                a.insert(condition.to_string());
            } else {
                a.remove(condition);
            }
        }
    }

    /// The conditions in force, or `steady`.
    pub fn active(&self) -> String {
        let a = self.active.lock().map(|a| a.iter().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default();
        if a.is_empty() {
            "steady".into()
        } else {
            a
        }
    }

    pub fn problem(&self, what: impl Into<String>) {
        let line = format!("t={:.1} s: {}", self.t(), what.into());
        eprintln!("soak: chaos problem: {line}");
        if let Ok(mut p) = self.problems.lock() {
            p.push(line);
        }
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.counts.lock().map(|c| c.get(kind).copied().unwrap_or(0)).unwrap_or(0)
    }
}

/// Sleeps `d` or until the deadline; true if there is time left after it.
pub async fn nap(d: Duration, deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    tokio::time::sleep_until((now + d).min(deadline).into()).await;
    Instant::now() < deadline
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The sum of `*.ssl_context_update_by_sds`: how often Envoy rebuilt a TLS context from SDS.
pub async fn tls_updates(envoy: &Envoy) -> u64 {
    envoy
        .stats()
        .await
        .map(|s| s.iter().filter(|(k, _)| k.ends_with(".ssl_context_update_by_sds")).map(|(_, v)| v).sum())
        .unwrap_or(0)
}

/// Takes the issuers down in turn: each of `hosts`, then all of them, 8 s each, ~7 s apart.
pub async fn issuer_chaos(chaos: std::sync::Arc<Chaos>, deadline: Instant, issuers: Issuers, hosts: &[&str]) {
    let mut i = 0usize;
    while nap(secs(if i == 0 { 3 } else { 7 }), deadline).await {
        let down: Vec<&str> = match hosts.get(i % (hosts.len() + 1)) {
            Some(h) if hosts.len() > 1 => vec![*h],
            _ => hosts.to_vec(),
        };
        let condition = format!(
            "issuer {} down",
            down.iter().map(|h| h.trim_start_matches("https://")).collect::<Vec<_>>().join(" and ")
        );
        for h in &down {
            issuers.set_down(h, true);
            chaos.tally(&format!("outages of {}", h.trim_start_matches("https://")));
        }
        chaos.set(&condition, true);
        chaos.event("issuer flaps", condition.clone());
        nap(secs(8), deadline).await;
        for h in &down {
            issuers.set_down(h, false);
        }
        chaos.set(&condition, false);
        chaos.event("issuer restores", condition.replace(" down", " up again"));
        i += 1;
    }
}

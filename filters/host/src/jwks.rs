//! Keeps every issuer's keys fresh, for any number of workers.
//!
//! The background ticks (on proxy-wasm in every worker's VM, natively on the main thread). Per
//! issuer, a lease in shared data (the time the next fetch is due, taken by compare-and-swap) lets
//! exactly one ticker fetch per refresh: OpenID discovery (unless a JWKS path is configured), then
//! the JWKS. A usable JWKS is stored in shared data and a generation counter bumped when it
//! changed; a worker whose keys are older installs them then. A failed fetch changes nothing but
//! the retry time: the keys in force stay in use. Every completed attempt bumps a counter, which
//! is what paused requests wait for.

use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use edgewise_core::generic::auth::keys::{self, decode_shared, encode_shared};
use edgewise_core::generic::auth::{Issuer, IssuerKeys, JwksConfig, Keyring};
use edgewise_core::generic::jwt::Jwks;

use crate::shared::{get_u64, set_u64, take_lease, update_u64};
use crate::{lock, read, write, Background, Counter, Fetched, Gauge, Get, Host, Setup};

/// Shared-data keys and metrics of one issuer.
struct Slot {
    key_jwks: String,
    key_generation: String,
    key_lease: String,
    key_fetched: String,
    key_completed: String,
    key_kid_miss: String,
    /// The discovered JWKS location, shared so that one discovery serves every worker.
    key_jwks_at: String,
    /// (authority, path) of the JWKS: configured, or learned by discovery.
    jwks_at: Option<(String, String)>,
    in_flight: Option<(u64, Stage)>,
    fetch_ok: Counter,
    fetch_failed: Counter,
    key_age: Gauge,
    key_count: Gauge,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Discovery,
    Jwks,
}

/// The keys in force (read by every request) and the fetches that renew them.
pub struct Keys {
    issuers: Vec<Issuer>,
    cfg: JwksConfig,
    /// Read by every request of every worker; written only when a fetch installs keys, so
    /// requests never wait on each other.
    keyring: RwLock<Keyring>,
    /// The fetch state: the background's, never taken by a request that finds its keys.
    slots: Mutex<Vec<Slot>>,
}

impl Keys {
    /// `filter` names the metrics (`edgewise.<filter>.jwks.<issuer>.*`); the instance name
    /// namespaces the shared data.
    pub fn new(setup: &mut dyn Setup, filter: &str, issuers: &[Issuer], cfg: &JwksConfig) -> Self {
        let namespace = setup.instance().to_string();
        let slots = issuers
            .iter()
            .enumerate()
            .map(|(i, issuer)| {
                let key = |k: &str| format!("edgewise.{filter}.{namespace}.{i}.{k}");
                let metric = |m: &str| format!("edgewise.{filter}.jwks.{}.{m}", issuer.name);
                Slot {
                    key_jwks: key("jwks"),
                    key_generation: key("generation"),
                    key_lease: key("lease"),
                    key_fetched: key("fetched_ms"),
                    key_completed: key("completed"),
                    key_kid_miss: key("kid_miss_ms"),
                    key_jwks_at: key("jwks_at"),
                    jwks_at: issuer.jwks_path.clone().map(|p| (issuer.authority.clone(), p)),
                    in_flight: None,
                    fetch_ok: setup.counter(&metric("fetch.ok")),
                    fetch_failed: setup.counter(&metric("fetch.failed")),
                    key_age: setup.gauge(&metric("key_age_seconds")),
                    key_count: setup.gauge(&metric("keys")),
                }
            })
            .collect();
        Keys {
            issuers: issuers.to_vec(),
            cfg: cfg.clone(),
            keyring: RwLock::new(Keyring::new(issuers.len())),
            slots: Mutex::new(slots),
        }
    }

    /// The keys in force in this worker.
    pub fn keyring(&self) -> RwLockReadGuard<'_, Keyring> {
        read(&self.keyring)
    }

    /// Completed fetch attempts for `issuer` (any worker), for paused requests to wait on.
    pub fn completed(&self, host: &impl Host, issuer: usize) -> u64 {
        let key = lock(&self.slots).get(issuer).map(|s| s.key_completed.clone());
        key.map_or(0, |k| get_u64(host, &k).0)
    }

    /// Installs keys another worker published. Returns true if something new was installed.
    pub fn sync(&self, host: &impl Host, issuer: usize) -> bool {
        let slots = lock(&self.slots);
        let Some(slot) = slots.get(issuer) else { return false };
        let (generation, _) = get_u64(host, &slot.key_generation);
        if generation == 0 || self.keyring().get(issuer).is_some_and(|k| k.generation == generation) {
            return false;
        }
        let (Some(value), _) = host.shared_get(&slot.key_jwks) else { return false };
        let Some((fetched_ms, doc)) = decode_shared(&value) else { return false };
        match Jwks::from_json(doc) {
            Ok(jwks) => {
                host.set_gauge(slot.key_count, jwks.len() as u64);
                write(&self.keyring).install(issuer, IssuerKeys { jwks, generation, fetched_ms });
                true
            }
            Err(e) => {
                log::error!("jwks: shared keys of issuer {issuer} do not parse: {e}");
                false
            }
        }
    }

    /// A token named a kid no key has: unless one was asked for within the cooldown, make the
    /// next fetch due now. Returns whether a refetch was scheduled.
    pub fn refetch_for_unknown_kid(&self, host: &impl Host, issuer: usize, now_ms: u64) -> bool {
        let cooldown_ms = self.cfg.kid_miss_cooldown_seconds * 1000;
        let slots = lock(&self.slots);
        let Some(slot) = slots.get(issuer) else { return false };
        let scheduled =
            update_u64(host, &slot.key_kid_miss, |last| (last == 0 || now_ms >= last + cooldown_ms).then_some(now_ms));
        scheduled.is_some() && set_u64(host, &slot.key_lease, 0)
    }

    /// Per tick: installs keys other workers fetched, and starts due fetches.
    pub fn on_tick(&self, bg: &mut impl Background) {
        let now = bg.now_ms();
        for issuer in 0..self.issuers.len() {
            self.sync(bg, issuer);
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(issuer) else { continue };
            if let Some(keys) = self.keyring().get(issuer) {
                let (fetched, _) = get_u64(bg, &slot.key_fetched);
                bg.set_gauge(slot.key_age, now.saturating_sub(fetched.max(keys.fetched_ms)) / 1000);
            }
            if slot.in_flight.is_some() {
                continue;
            }
            if take_lease(bg, &slot.key_lease, now, now + self.cfg.retry_seconds * 1000) {
                self.start(bg, slot, issuer);
            }
        }
    }

    fn start(&self, bg: &mut impl Background, slot: &mut Slot, issuer: usize) {
        let Some(cfg) = self.issuers.get(issuer) else { return };
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        if slot.jwks_at.is_none() {
            // Another worker may have discovered it already ("authority path").
            let (shared, _) = bg.shared_get(&slot.key_jwks_at);
            let text = shared.and_then(|v| String::from_utf8(v).ok()).unwrap_or_default();
            slot.jwks_at = text.split_once(' ').map(|(a, p)| (a.to_string(), p.to_string()));
        }
        let (stage, authority, path) = match &slot.jwks_at {
            Some((authority, path)) => (Stage::Jwks, authority.as_str(), path.as_str()),
            None => (Stage::Discovery, cfg.authority.as_str(), cfg.discovery_path.as_str()),
        };
        let accept = [("accept", "application/json")];
        match bg.http_get(&Get { cluster: &cfg.cluster, authority, path, headers: &accept, timeout }) {
            Some(id) => slot.in_flight = Some((id, stage)),
            None => {
                log::warn!("jwks: the call to cluster {} could not be started", cfg.cluster);
                Self::complete(bg, slot, false);
            }
        }
    }

    /// A discovery or JWKS response (or its failure). Returns true if new keys were installed;
    /// false also when the call was not one of these.
    pub fn on_fetched(&self, bg: &mut impl Background, id: u64, response: &Fetched) -> bool {
        let mut slots = lock(&self.slots);
        let Some(issuer) = slots.iter().position(|s| s.in_flight.is_some_and(|(t, _)| t == id)) else {
            return false;
        };
        let (Some(slot), Some(cfg)) = (slots.get_mut(issuer), self.issuers.get(issuer)) else { return false };
        let Some((_, stage)) = slot.in_flight.take() else { return false };
        if response.status != 200 {
            log::warn!(
                "jwks: {} of {} answered {}; keeping the keys in force",
                if stage == Stage::Jwks { "JWKS" } else { "OpenID configuration" },
                cfg.issuer,
                if response.status == 0 {
                    "nothing (unreachable or timed out)".into()
                } else {
                    response.status.to_string()
                }
            );
            if stage == Stage::Jwks && cfg.jwks_path.is_none() {
                // Discover again next time: the jwks_uri may have moved.
                slot.jwks_at = None;
                bg.shared_set(&slot.key_jwks_at, b"", None);
            }
            Self::complete(bg, slot, false);
            return false;
        }
        let body = &response.body;
        match stage {
            Stage::Discovery => match keys::jwks_uri(body, &cfg.issuer) {
                Ok(at) => {
                    bg.shared_set(&slot.key_jwks_at, format!("{} {}", at.0, at.1).as_bytes(), None);
                    slot.jwks_at = Some(at);
                    self.start(bg, slot, issuer);
                    false
                }
                Err(e) => {
                    log::warn!("jwks: OpenID configuration of {}: {e}", cfg.issuer);
                    Self::complete(bg, slot, false);
                    false
                }
            },
            Stage::Jwks => match Jwks::from_json(body) {
                Ok(parsed) if !parsed.is_empty() => {
                    let now = bg.now_ms();
                    let refresh_ms = keys::refresh_after(response.header("cache-control"), &self.cfg) * 1000;
                    set_u64(bg, &slot.key_lease, now + refresh_ms);
                    set_u64(bg, &slot.key_fetched, now);
                    let installed = self.publish(bg, slot, issuer, body, parsed, now);
                    Self::complete(bg, slot, true);
                    installed
                }
                Ok(_) => {
                    log::warn!("jwks: JWKS of {} has no usable signing key; keeping the keys in force", cfg.issuer);
                    Self::complete(bg, slot, false);
                    false
                }
                Err(e) => {
                    log::warn!("jwks: JWKS of {}: {e}; keeping the keys in force", cfg.issuer);
                    Self::complete(bg, slot, false);
                    false
                }
            },
        }
    }

    /// Shares a fetched JWKS if it differs from the one in force, and installs it here.
    fn publish(&self, host: &impl Host, slot: &Slot, issuer: usize, doc: &[u8], jwks: Jwks, now: u64) -> bool {
        let (current, _) = host.shared_get(&slot.key_jwks);
        if current.as_deref().and_then(decode_shared).is_some_and(|(_, d)| d == doc) {
            return false;
        }
        if !host.shared_set(&slot.key_jwks, &encode_shared(now, doc), None) {
            return false;
        }
        let Some(generation) = update_u64(host, &slot.key_generation, |g| Some(g + 1)) else { return false };
        log::info!("jwks: {} keys of issuer {issuer} in force (generation {generation})", jwks.len());
        host.set_gauge(slot.key_count, jwks.len() as u64);
        write(&self.keyring).install(issuer, IssuerKeys { jwks, generation, fetched_ms: now });
        true
    }

    fn complete(host: &impl Host, slot: &Slot, ok: bool) {
        host.increment(if ok { slot.fetch_ok } else { slot.fetch_failed });
        update_u64(host, &slot.key_completed, |n| Some(n + 1));
    }
}

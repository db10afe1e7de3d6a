//! Keeps every issuer's keys fresh in all workers.
//!
//! Each worker's root context ticks. Per issuer, a lease in shared data (the time the next fetch
//! is due, taken by compare-and-swap) lets exactly one worker fetch per refresh: OIDC discovery
//! (unless a JWKS path is configured), then the JWKS. A usable JWKS is stored in shared data and
//! a generation counter bumped when it changed; every worker re-parses the keys only then. A
//! failed fetch changes nothing but the retry time: the keys in force stay in use. Every
//! completed attempt bumps a counter, which is what paused requests wait for.

use std::time::Duration;

use edgewise_core::auth::keys::{self, decode_shared, encode_shared};
use edgewise_core::auth::{Issuer, IssuerKeys, JwksConfig, Keyring};
use edgewise_core::jwt::Jwks;

use crate as host;
use crate::{Counter, Gauge};

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
    in_flight: Option<(u32, Stage)>,
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

pub struct Fetcher {
    slots: Vec<Slot>,
}

impl Fetcher {
    /// `filter` names the metrics (`edgewise.<filter>.jwks.<issuer>.*`); `namespace` (the plugin
    /// name) the shared data.
    pub fn new(filter: &str, issuers: &[Issuer], namespace: &str) -> Self {
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
                    fetch_ok: Counter::define(&metric("fetch.ok")),
                    fetch_failed: Counter::define(&metric("fetch.failed")),
                    key_age: Gauge::define(&metric("key_age_seconds")),
                    key_count: Gauge::define(&metric("keys")),
                }
            })
            .collect();
        Fetcher { slots }
    }

    /// Completed fetch attempts for `issuer` (any worker), for paused requests to wait on.
    pub fn completed(&self, issuer: usize) -> u64 {
        self.slots.get(issuer).map_or(0, |s| host::shared_u64(&s.key_completed).0)
    }

    /// Installs keys another worker published. Returns true if something new was installed.
    pub fn sync(&self, issuer: usize, keyring: &mut Keyring) -> bool {
        let Some(slot) = self.slots.get(issuer) else { return false };
        let (generation, _) = host::shared_u64(&slot.key_generation);
        if generation == 0 || keyring.get(issuer).is_some_and(|k| k.generation == generation) {
            return false;
        }
        let (Some(value), _) = host::shared_get(&slot.key_jwks) else { return false };
        let Some((fetched_ms, doc)) = decode_shared(&value) else { return false };
        match Jwks::from_json(doc) {
            Ok(jwks) => {
                slot.key_count.set(jwks.len() as u64);
                keyring.install(issuer, IssuerKeys { jwks, generation, fetched_ms });
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
    pub fn refetch_for_unknown_kid(&self, issuer: usize, now_ms: u64, cooldown_ms: u64) -> bool {
        let Some(slot) = self.slots.get(issuer) else { return false };
        let scheduled = host::shared_u64_cas(&slot.key_kid_miss, |last| {
            (last == 0 || now_ms >= last + cooldown_ms).then_some(now_ms)
        });
        scheduled.is_some() && host::shared_set(&slot.key_lease, &0u64.to_le_bytes(), None)
    }

    /// Per tick: installs keys other workers fetched, and starts due fetches.
    pub fn on_tick(&mut self, issuers: &[Issuer], cfg: &JwksConfig, keyring: &mut Keyring) -> bool {
        let now = host::now_ms();
        let mut changed = false;
        for issuer in 0..self.slots.len() {
            changed |= self.sync(issuer, keyring);
            let Some(slot) = self.slots.get_mut(issuer) else { continue };
            if let Some(keys) = keyring.get(issuer) {
                let (fetched, _) = host::shared_u64(&slot.key_fetched);
                slot.key_age.set(now.saturating_sub(fetched.max(keys.fetched_ms)) / 1000);
            }
            if slot.in_flight.is_some() {
                continue;
            }
            let retry_ms = cfg.retry_seconds * 1000;
            if host::shared_u64_cas(&slot.key_lease, |due| (now >= due).then_some(now + retry_ms)).is_some() {
                Self::start(slot, issuers, cfg, issuer);
            }
        }
        changed
    }

    fn start(slot: &mut Slot, issuers: &[Issuer], jwks: &JwksConfig, issuer: usize) {
        let Some(cfg) = issuers.get(issuer) else { return };
        let timeout = Duration::from_millis(jwks.timeout_ms);
        if slot.jwks_at.is_none() {
            // Another worker may have discovered it already ("authority path").
            let (shared, _) = host::shared_get(&slot.key_jwks_at);
            let text = shared.and_then(|v| String::from_utf8(v).ok()).unwrap_or_default();
            slot.jwks_at = text.split_once(' ').map(|(a, p)| (a.to_string(), p.to_string()));
        }
        let (stage, authority, path) = match &slot.jwks_at {
            Some((authority, path)) => (Stage::Jwks, authority.as_str(), path.as_str()),
            None => (Stage::Discovery, cfg.authority.as_str(), cfg.discovery_path.as_str()),
        };
        match host::dispatch_get(&cfg.cluster, authority, path, &[], timeout) {
            Some(token) => slot.in_flight = Some((token, stage)),
            None => Self::complete(slot, false),
        }
    }

    /// A discovery or JWKS response (or its failure). Returns true if new keys were installed.
    pub fn on_response(
        &mut self,
        token: u32,
        body_size: usize,
        issuers: &[Issuer],
        jwks: &JwksConfig,
        keyring: &mut Keyring,
    ) -> bool {
        let Some(issuer) = self.slots.iter().position(|s| s.in_flight.is_some_and(|(t, _)| t == token)) else {
            return false;
        };
        let (Some(slot), Some(cfg)) = (self.slots.get_mut(issuer), issuers.get(issuer)) else { return false };
        let Some((_, stage)) = slot.in_flight.take() else { return false };
        let status = host::call_response_header(":status");
        let body = if status.as_deref() == Some("200") { host::call_response_body(body_size) } else { None };
        let Some(body) = body else {
            log::warn!(
                "jwks: {} of {} answered {}; keeping the keys in force",
                if stage == Stage::Jwks { "JWKS" } else { "OpenID configuration" },
                cfg.issuer,
                status.as_deref().unwrap_or("nothing (unreachable or timed out)")
            );
            if stage == Stage::Jwks && cfg.jwks_path.is_none() {
                // Discover again next time: the jwks_uri may have moved.
                slot.jwks_at = None;
                host::shared_set(&slot.key_jwks_at, b"", None);
            }
            Self::complete(slot, false);
            return false;
        };
        match stage {
            Stage::Discovery => match keys::jwks_uri(&body, &cfg.issuer) {
                Ok(at) => {
                    host::shared_set(&slot.key_jwks_at, format!("{} {}", at.0, at.1).as_bytes(), None);
                    slot.jwks_at = Some(at);
                    Self::start(slot, issuers, jwks, issuer);
                    false
                }
                Err(e) => {
                    log::warn!("jwks: OpenID configuration of {}: {e}", cfg.issuer);
                    Self::complete(slot, false);
                    false
                }
            },
            Stage::Jwks => match Jwks::from_json(&body) {
                Ok(parsed) if !parsed.is_empty() => {
                    let now = host::now_ms();
                    let refresh_ms =
                        keys::refresh_after(host::call_response_header("cache-control").as_deref(), jwks) * 1000;
                    host::shared_set(&slot.key_lease, &(now + refresh_ms).to_le_bytes(), None);
                    host::shared_set(&slot.key_fetched, &now.to_le_bytes(), None);
                    let installed = Self::publish(slot, issuer, &body, parsed, now, keyring);
                    Self::complete(slot, true);
                    installed
                }
                Ok(_) => {
                    log::warn!("jwks: JWKS of {} has no usable signing key; keeping the keys in force", cfg.issuer);
                    Self::complete(slot, false);
                    false
                }
                Err(e) => {
                    log::warn!("jwks: JWKS of {}: {e}; keeping the keys in force", cfg.issuer);
                    Self::complete(slot, false);
                    false
                }
            },
        }
    }

    /// Shares a fetched JWKS if it differs from the one in force, and installs it here.
    fn publish(slot: &Slot, issuer: usize, doc: &[u8], jwks: Jwks, now: u64, keyring: &mut Keyring) -> bool {
        let (current, _) = host::shared_get(&slot.key_jwks);
        if current.as_deref().and_then(decode_shared).is_some_and(|(_, d)| d == doc) {
            return false;
        }
        if !host::shared_set(&slot.key_jwks, &encode_shared(now, doc), None) {
            return false;
        }
        let Some(generation) = host::shared_u64_cas(&slot.key_generation, |g| Some(g + 1)) else { return false };
        log::info!("jwks: {} keys of issuer {issuer} in force (generation {generation})", jwks.len());
        slot.key_count.set(jwks.len() as u64);
        keyring.install(issuer, IssuerKeys { jwks, generation, fetched_ms: now });
        true
    }

    fn complete(slot: &Slot, ok: bool) {
        if ok { &slot.fetch_ok } else { &slot.fetch_failed }.inc();
        host::shared_u64_cas(&slot.key_completed, |n| Some(n + 1));
    }
}

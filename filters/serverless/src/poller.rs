//! Polls the management service for the route table and shares it with every worker.
//!
//! On proxy-wasm each Envoy worker runs its own VM with its own filter, and all of them tick; a
//! lease in shared data (the time the next fetch is due, taken by compare-and-swap) lets exactly
//! one of them fetch per interval. The fetcher validates the document, stores it in shared data
//! and bumps a generation counter; every other copy re-parses the table only when the generation
//! changes. Natively there is one filter and one ticker: the lease is always won and there is no
//! other copy. A failed, slow or garbled fetch changes nothing: the last good table stays in force.

use std::sync::Mutex;
use std::time::Duration;

use edgewise_core::serverless::Management;
use edgewise_host::shared::{get_u64, set_u64, take_lease, update_u64};
use edgewise_host::{lock, write, Background, Fetched, Host};

use crate::Serverless;

pub struct Poller {
    mgmt: Management,
    /// Shared-data keys, namespaced by the filter instance.
    key_table: String,
    key_generation: String,
    key_lease: String,
    key_checked: String,
    /// Each worker has its own filter (proxy-wasm): a fetched table is shared for the others.
    share: bool,
    state: Mutex<State>,
}

/// The table this copy of the filter has installed, and the fetch it has in flight.
#[derive(Default)]
struct State {
    generation: u64,
    etag: String,
    in_flight: Option<u64>,
}

impl Poller {
    pub fn new(mgmt: Management, namespace: &str, share: bool) -> Self {
        let key = |k: &str| format!("edgewise.serverless.{namespace}.{k}");
        Poller {
            key_table: key("table"),
            key_generation: key("generation"),
            key_lease: key("lease"),
            key_checked: key("checked_ms"),
            share,
            mgmt,
            state: Mutex::new(State::default()),
        }
    }

    /// Ticks often enough to pick up a table another worker fetched, and to take the lease on
    /// time: four ticks an interval, so that a tick a little early for the lease does not
    /// postpone the fetch by a whole interval.
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis((self.mgmt.poll_interval_ms / 4).clamp(100, 1000))
    }

    pub fn on_tick(&self, bg: &mut impl Background, sl: &Serverless) {
        self.sync(bg, sl);
        let now = bg.now_ms();
        let (checked, _) = get_u64(bg, &self.key_checked);
        if checked > 0 {
            bg.set_gauge(sl.metrics.table_age_seconds, now.saturating_sub(checked) / 1000);
        }
        let mut state = lock(&self.state);
        if state.in_flight.is_some() || !take_lease(bg, &self.key_lease, now, now + self.mgmt.poll_interval_ms) {
            return;
        }
        let if_none_match = [("if-none-match", state.etag.as_str()), ("accept", "application/json")];
        let headers = if state.etag.is_empty() { &if_none_match[1..] } else { &if_none_match[..] };
        let timeout = Duration::from_millis(self.mgmt.timeout_ms);
        state.in_flight = bg.http_get(&self.mgmt.cluster, &self.mgmt.authority, &self.mgmt.path, headers, timeout);
        if state.in_flight.is_none() {
            bg.increment(sl.metrics.fetch_failed);
        }
    }

    pub fn on_fetched(&self, bg: &mut impl Background, id: u64, response: &Fetched, sl: &Serverless) {
        let mut state = lock(&self.state);
        if state.in_flight != Some(id) {
            return;
        }
        state.in_flight = None;
        let m = &sl.metrics;
        match response.status {
            304 => {
                set_u64(bg, &self.key_checked, bg.now_ms());
                bg.increment(m.fetch_not_modified);
            }
            200 => {
                let etag = response.header("etag").unwrap_or_default();
                if self.publish(bg, &mut state, &response.body, etag, sl) {
                    set_u64(bg, &self.key_checked, bg.now_ms());
                    bg.increment(m.fetch_ok);
                } else {
                    bg.increment(m.fetch_failed);
                }
            }
            status => {
                log::warn!(
                    "serverless: management service {} answered {}; keeping the route table in force",
                    self.mgmt.cluster,
                    if status == 0 { "nothing (unreachable or timed out)".into() } else { status.to_string() }
                );
                bg.increment(m.fetch_failed);
            }
        }
    }

    /// Validates a fetched table, installs it here and shares it with the other workers.
    fn publish(&self, host: &impl Host, state: &mut State, body: &[u8], etag: &str, sl: &Serverless) -> bool {
        let table = match edgewise_host::read(&sl.router).compile_table(body) {
            Ok(table) => table,
            Err(e) => {
                log::warn!("serverless: management service sent an unusable table ({e}); keeping the one in force");
                return false;
            }
        };
        let Ok(etag_len) = u16::try_from(etag.len()) else {
            return false;
        };
        // Same version and ETag as the table in force: nothing for the other workers to re-parse.
        let same = edgewise_host::read(&sl.router).polled().is_some_and(|t| t.version == table.version);
        if same && etag == state.etag {
            return true;
        }
        let mut generation = state.generation;
        if self.share {
            // Shared value: the document, then the ETag, then the ETag's length (u16 LE).
            let mut value = Vec::with_capacity(body.len() + etag.len() + 2);
            value.extend_from_slice(body);
            value.extend_from_slice(etag.as_bytes());
            value.extend_from_slice(&etag_len.to_le_bytes());
            if !host.shared_set(&self.key_table, &value, None) {
                return false;
            }
            let Some(next) = update_u64(host, &self.key_generation, |g| Some(g + 1)) else {
                return false;
            };
            generation = next;
        }
        log::info!("serverless: route table version {} with {} routes is in force", table.version, table.len());
        host.set_gauge(sl.metrics.table_version, table.version);
        host.set_gauge(sl.metrics.table_routes, table.len() as u64);
        write(&sl.router).install(table);
        state.generation = generation;
        state.etag = etag.to_owned();
        true
    }

    /// Installs the shared table if another worker published a newer one.
    pub fn sync(&self, host: &impl Host, sl: &Serverless) {
        let (generation, _) = get_u64(host, &self.key_generation);
        let mut state = lock(&self.state);
        if generation == state.generation {
            return;
        }
        let (Some(value), _) = host.shared_get(&self.key_table) else {
            return;
        };
        let Some((body, etag)) = split_value(&value) else {
            return;
        };
        let compiled = edgewise_host::read(&sl.router).compile_table(body);
        match compiled {
            Ok(table) => {
                host.set_gauge(sl.metrics.table_version, table.version);
                host.set_gauge(sl.metrics.table_routes, table.len() as u64);
                write(&sl.router).install(table);
                state.generation = generation;
                state.etag = String::from_utf8_lossy(etag).into_owned();
            }
            Err(e) => log::error!("serverless: shared route table does not compile: {e}"),
        }
    }
}

/// Splits a shared table value into document and ETag (see `publish`).
fn split_value(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let (rest, len) = value.split_at_checked(value.len().checked_sub(2)?)?;
    let etag_len = u16::from_le_bytes(len.try_into().ok()?) as usize;
    rest.split_at_checked(rest.len().checked_sub(etag_len)?)
}

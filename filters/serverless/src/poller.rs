//! Polls the management service for the route table and shares it with every worker.
//!
//! Each Envoy worker runs its own VM with its own root context, and all of them tick. A lease in
//! shared data (the time the next fetch is due, taken by compare-and-swap) lets exactly one of
//! them fetch per interval. The fetcher validates the document, stores it in shared data and bumps
//! a generation counter; every VM re-parses the table only when the generation changes. A failed,
//! slow or garbled fetch changes nothing: the last good table stays in force.

use std::rc::Rc;
use std::time::Duration;

use edgewise_core::serverless::Management;

use crate::Shared;
use edgewise_host as host;

pub struct Poller {
    mgmt: Management,
    /// Shared-data keys, namespaced by plugin name.
    key_table: String,
    key_generation: String,
    key_lease: String,
    key_checked: String,
    /// The generation and ETag of the table this VM has installed.
    generation: u64,
    etag: String,
    in_flight: Option<u32>,
}

impl Poller {
    pub fn new(mgmt: Management, namespace: &str) -> Self {
        let key = |k: &str| format!("edgewise.serverless.{namespace}.{k}");
        Poller {
            key_table: key("table"),
            key_generation: key("generation"),
            key_lease: key("lease"),
            key_checked: key("checked_ms"),
            mgmt,
            generation: 0,
            etag: String::new(),
            in_flight: None,
        }
    }

    /// Ticks often enough to pick up a table another worker fetched, and to take the lease on time.
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis(self.mgmt.poll_interval_ms.clamp(100, 1000))
    }

    pub fn on_tick(&mut self, shared: &Rc<Shared>) {
        self.sync(shared);
        let now = host::now_ms();
        let (checked, _) = host::shared_u64(&self.key_checked);
        if checked > 0 {
            shared.metrics.table_age_seconds.set(now.saturating_sub(checked) / 1000);
        }
        if self.in_flight.is_some() || !self.take_lease(now) {
            return;
        }
        let if_none_match = [("if-none-match", self.etag.as_str())];
        let extra: &[(&str, &str)] = if self.etag.is_empty() { &[] } else { &if_none_match };
        let timeout = Duration::from_millis(self.mgmt.timeout_ms);
        self.in_flight = host::dispatch_get(&self.mgmt.cluster, &self.mgmt.authority, &self.mgmt.path, extra, timeout);
        if self.in_flight.is_none() {
            shared.metrics.fetch_failed.inc();
        }
    }

    /// Takes the fetch lease if the next fetch is due.
    fn take_lease(&self, now: u64) -> bool {
        let next = now + self.mgmt.poll_interval_ms;
        host::shared_u64_cas(&self.key_lease, |due| (now >= due).then_some(next)).is_some()
    }

    pub fn on_response(&mut self, token: u32, body_size: usize, shared: &Rc<Shared>) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let m = &shared.metrics;
        let status = host::call_response_header(":status");
        match status.as_deref() {
            Some("304") => {
                self.mark_checked();
                m.fetch_not_modified.inc();
            }
            Some("200") => {
                let body = host::call_response_body(body_size).unwrap_or_default();
                let etag = host::call_response_header("etag").unwrap_or_default();
                if self.publish(body, &etag, shared) {
                    self.mark_checked();
                    m.fetch_ok.inc();
                } else {
                    m.fetch_failed.inc();
                }
            }
            other => {
                log::warn!(
                    "serverless: management service {} answered {}; keeping the route table in force",
                    self.mgmt.cluster,
                    other.unwrap_or("nothing (unreachable or timed out)")
                );
                m.fetch_failed.inc();
            }
        }
    }

    /// Validates a fetched table, installs it here and shares it with the other workers.
    fn publish(&mut self, mut body: Vec<u8>, etag: &str, shared: &Rc<Shared>) -> bool {
        let Ok(mut router) = shared.router.try_borrow_mut() else {
            return false;
        };
        let table = match router.compile_table(&body) {
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
        if router.polled().is_some_and(|t| t.version == table.version) && etag == self.etag {
            return true;
        }
        // Shared value: the document, then the ETag, then the ETag's length (u16 LE). Appending
        // to the body avoids a second copy of what may be megabytes.
        body.extend_from_slice(etag.as_bytes());
        body.extend_from_slice(&etag_len.to_le_bytes());
        if !host::shared_set(&self.key_table, &body, None) {
            return false;
        }
        let Some(generation) = host::shared_u64_cas(&self.key_generation, |g| Some(g + 1)) else {
            return false;
        };
        log::info!("serverless: route table version {} with {} routes is in force", table.version, table.len());
        shared.metrics.table_version.set(table.version);
        shared.metrics.table_routes.set(table.len() as u64);
        router.install(table);
        self.generation = generation;
        self.etag = etag.to_owned();
        true
    }

    /// Installs the shared table if another worker published a newer one.
    pub fn sync(&mut self, shared: &Rc<Shared>) {
        let (generation, _) = host::shared_u64(&self.key_generation);
        if generation == self.generation {
            return;
        }
        let (Some(value), _) = host::shared_get(&self.key_table) else {
            return;
        };
        let Some((body, etag)) = split_value(&value) else {
            return;
        };
        let Ok(mut router) = shared.router.try_borrow_mut() else {
            return;
        };
        match router.compile_table(body) {
            Ok(table) => {
                shared.metrics.table_version.set(table.version);
                shared.metrics.table_routes.set(table.len() as u64);
                router.install(table);
                self.generation = generation;
                self.etag = String::from_utf8_lossy(etag).into_owned();
            }
            Err(e) => log::error!("serverless: shared route table does not compile: {e}"),
        }
    }

    fn mark_checked(&self) {
        host::shared_set(&self.key_checked, &host::now_ms().to_le_bytes(), None);
    }
}

/// Splits a shared table value into document and ETag (see `publish`).
fn split_value(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let (rest, len) = value.split_at_checked(value.len().checked_sub(2)?)?;
    let etag_len = u16::from_le_bytes(len.try_into().ok()?) as usize;
    rest.split_at_checked(rest.len().checked_sub(etag_len)?)
}

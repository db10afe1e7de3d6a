//! Loads the route table from the management service and watches it for changes, once per
//! Envoy (docs/serverless-control.md, "The route watch").
//!
//! One copy of the filter at a time holds the lease in shared data and has the one call in
//! flight; natively there is one copy. The state every copy needs (cursor, version, back-off)
//! is in shared data too, so whichever copy takes the lease next carries on from it.
//!
//! - No table, or no cursor (a 410, an answer refused): the whole table, page by page, into a
//!   staging table; it is put in force after the last page. A service whose answers carry no
//!   cursor does not watch: its table is fetched again every `poll_interval_ms`, with
//!   `If-None-Match`.
//! - A cursor: a watch, held by the service until something changes; its changes are applied
//!   in place and the next watch leaves at once. Natively (`stream`), one streamed watch: the
//!   service keeps the answer open and writes each change to it as a line, and a line with no
//!   change every `wait_seconds`; a stream silent for longer is ended and watched again.
//!
//! An answer that fails, does not read or does not fit (a version going backwards, a delete
//! of a route not in the table, no cursor, too large) changes nothing: it is counted, the next
//! attempt waits (250 ms doubling to `max_backoff_ms`, less up to half of it at random) and, for
//! an answer refused, loads the whole table again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use edgewise_core::serverless::protocol::{read_changes, read_page, Changes};
use edgewise_core::serverless::table::Batch;
use edgewise_core::serverless::{Management, Router};
use edgewise_host::shared::{get_u64, set_u64, update_u64};
use edgewise_host::{lock, Background, Fetched, Get, Host, StreamEvent};

use crate::store::{Staging, Store};
use crate::Metrics;

/// The cursor header of the management service's answers.
pub const CURSOR: &str = "x-edgewise-cursor";
/// A lease holds for at most 2^44 ms from the epoch; the owner is in the bits above.
const UNTIL: u64 = (1 << 44) - 1;
/// The media type of a streamed watch: one JSON document per line.
const LINES: &str = "application/x-ndjson";
/// Longest a streamed watch lasts before the host ends it (the service ends its own sooner).
const STREAM_LIMIT: Duration = Duration::from_secs(900);

pub struct Watcher {
    mgmt: Management,
    keys: Keys,
    pub store: Store,
    owner: OnceLock<u64>,
    local: Mutex<Local>,
    /// A stream that ended while its start was in progress (the host reported it from within
    /// `http_stream`), plus one.
    ended_inline: AtomicU64,
    /// This copy's draw of the back-off (`Management::backoff_ms`), at random.
    seed: u64,
}

/// Shared-data keys, namespaced by the filter instance.
struct Keys {
    copies: String,
    lease: String,
    cursor: String,
    etag: String,
    version: String,
    catch_up: String,
    failures: String,
    routes: String,
    checked: String,
    changed: String,
}

/// What this copy has in flight.
#[derive(Default)]
struct Local {
    /// The call, what it asks, when it was sent and when its answer is overdue.
    in_flight: Option<(u64, Ask, u64, u64)>,
    load: Option<Load>,
    /// Calls in a row that could not be started (Envoy has no such cluster yet: at start-up a
    /// cluster with health checks comes a few ms after the first tick).
    unstarted: u32,
    /// What has come of the streamed watch in flight.
    stream: Streamed,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ask {
    Page,
    Watch,
    Stream,
}

/// A streamed watch's answer so far: its head, and what has not been read as lines yet.
#[derive(Default)]
struct Streamed {
    head: Fetched,
    /// The service streams (`LINES`); otherwise the answer is a plain watch's, read whole.
    lines: bool,
    pending: Vec<u8>,
}

/// A full load in progress.
struct Load {
    staging: Staging,
    /// The cursor and version of the first page: the watch starts there.
    cursor: String,
    etag: String,
    version: u64,
    /// The version of the last page: changes replayed up to it may delete what a later page
    /// no longer had.
    last: u64,
    next: Option<String>,
    /// The routes of the page being put, its memory kept for the next.
    batch: Batch,
}

/// After an answer.
enum Then {
    Now,
    At(u64),
    Failed,
}

impl Watcher {
    pub fn new(mgmt: Management, namespace: &str, shared: bool) -> Self {
        let ns = format!("edgewise.serverless.{namespace}");
        let key = |k: &str| format!("{ns}.{k}");
        Watcher {
            keys: Keys {
                copies: key("copies"),
                lease: key("lease"),
                cursor: key("cursor"),
                etag: key("etag"),
                version: key("version"),
                catch_up: key("catch_up"),
                failures: key("failures"),
                routes: key("routes"),
                checked: key("checked_ms"),
                changed: key("changed_ms"),
            },
            store: Store::new(&ns, shared),
            owner: OnceLock::new(),
            local: Mutex::new(Local::default()),
            ended_inline: AtomicU64::new(0),
            seed: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), namespace),
            mgmt,
        }
    }

    /// Often enough to take over a lease on time and to see a new generation quickly.
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis(250)
    }

    pub fn on_tick(&self, bg: &mut impl Background, router: &Router, m: &Metrics) {
        self.store.refresh(bg);
        let now = bg.now_ms();
        let checked = get_u64(bg, &self.keys.checked).0;
        if checked > 0 {
            bg.set_gauge(m.table_age_seconds, now.saturating_sub(checked) / 1000);
        }
        let changed = get_u64(bg, &self.keys.changed).0;
        if changed > 0 {
            bg.set_gauge(m.table_change_age_seconds, now.saturating_sub(changed) / 1000);
        }
        let mut local = lock(&self.local);
        // An answer past its timeout will not come: the configuration that sent the call (this
        // watcher may serve several) is gone, and Envoy cancelled it with it. A stream silent
        // past its heartbeats is stalled: it is ended.
        let mut stalled = None;
        if let Some((id, ask, _, overdue)) = local.in_flight.filter(|(_, _, _, overdue)| now >= *overdue) {
            if ask == Ask::Stream {
                log::warn!("serverless: the streamed watch was silent for {} ms; watching again", now - overdue);
                stalled = Some(id);
                local.stream = Streamed::default();
            }
            local.in_flight = None;
            local.load = None;
            bg.increment(m.fetch_failed);
        }
        if let Some(id) = stalled {
            // Not under the lock: the host may report the end from within the call.
            drop(local);
            bg.reset_stream(id);
            local = lock(&self.local);
        }
        if local.in_flight.is_some() || !self.take_lease(bg, now) {
            return;
        }
        self.next(bg, &mut local, router, m);
    }

    pub fn on_fetched(&self, bg: &mut impl Background, id: u64, response: &Fetched, router: &Router, m: &Metrics) {
        let mut local = lock(&self.local);
        let Some((_, ask, sent, _)) = local.in_flight.take_if(|(i, _, _, _)| *i == id) else {
            return;
        };
        let now = bg.now_ms();
        let then = if response.body.len() as u64 > self.mgmt.max_answer_bytes {
            self.refused(bg, m, &format!("an answer of {} bytes", response.body.len()))
        } else {
            match ask {
                Ask::Page => self.on_page(bg, &mut local, response, router, m),
                Ask::Watch | Ask::Stream => self.on_watch(bg, response, now.saturating_sub(sent), router, m),
            }
        };
        self.then(bg, &mut local, then, router, m);
    }

    /// What comes of a streamed watch: its head, its lines as they arrive, its end.
    pub fn on_stream(&self, bg: &mut impl Background, id: u64, event: StreamEvent<'_>, router: &Router, m: &Metrics) {
        // The host may report a stream's end from within `http_stream` or `reset_stream`,
        // while this watcher holds its lock.
        let Ok(mut local) = self.local.try_lock() else {
            if matches!(event, StreamEvent::End(_)) {
                self.ended_inline.store(id + 1, Relaxed);
            }
            return;
        };
        let Some((_, _, sent, _)) = local.in_flight.filter(|(i, ask, _, _)| *i == id && *ask == Ask::Stream) else {
            return;
        };
        let now = bg.now_ms();
        let limit = self.mgmt.max_answer_bytes as usize;
        let then = match event {
            StreamEvent::Head(head) => {
                let lines = head.status == 200 && head.header("content-type").is_some_and(|t| t.starts_with(LINES));
                local.stream = Streamed { head: head.clone(), lines, pending: Vec::new() };
                None
            }
            StreamEvent::Data(bytes) if local.stream.pending.len() + bytes.len() > limit => {
                Some(self.refused(bg, m, &format!("a streamed answer with more than {limit} bytes unread")))
            }
            StreamEvent::Data(bytes) => {
                local.stream.pending.extend_from_slice(bytes);
                if local.stream.lines {
                    self.read_lines(bg, &mut local.stream.pending, router, m)
                } else {
                    None
                }
            }
            StreamEvent::End(false) => Some(self.failed(bg, m, 0)),
            StreamEvent::End(true) => {
                let Streamed { head, lines, pending } = std::mem::take(&mut local.stream);
                Some(match lines {
                    // The service ended the stream: watch again from the cursor (not in a loop,
                    // should it end its streams at once).
                    true if pending.is_empty() && now.saturating_sub(sent) < 1000 => Then::At(now + 1000),
                    true if pending.is_empty() => Then::Now,
                    true => self.refused(bg, m, "a streamed line cut short"),
                    // A service that does not stream answered as to a plain watch.
                    false => {
                        let whole = Fetched { body: pending, ..head };
                        self.on_watch(bg, &whole, now.saturating_sub(sent), router, m)
                    }
                })
            }
        };
        let Some(then) = then else {
            // Still streaming: heard from, so not stalled.
            let silence = self.silence_ms();
            if let Some(in_flight) = local.in_flight.as_mut() {
                in_flight.3 = now + silence;
            }
            self.renew(bg, now + silence);
            return;
        };
        local.in_flight = None;
        local.stream = Streamed::default();
        if !matches!(event, StreamEvent::End(_)) {
            drop(local);
            bg.reset_stream(id);
            local = lock(&self.local);
        }
        self.then(bg, &mut local, then, router, m);
    }

    /// Applies each whole line of a streamed watch, leaving a partial one in `pending`: `None`
    /// while the stream goes on, or what to do once it must end.
    fn read_lines(&self, bg: &impl Host, pending: &mut Vec<u8>, router: &Router, m: &Metrics) -> Option<Then> {
        let end = pending.iter().rposition(|&b| b == b'\n')?;
        for line in pending.get(..end).unwrap_or_default().split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let changes = match read_changes(&router.decoder, line) {
                Ok(changes) => changes,
                Err(e) => return Some(self.refused(bg, m, &format!("a streamed line that does not read ({e})"))),
            };
            let cursor = match changes.cursor.as_deref() {
                Some(c) if token(c) => c.to_owned(),
                other => return Some(self.refused(bg, m, &format!("a streamed line with the cursor {other:?}"))),
            };
            if changes.changes.is_empty() {
                // Nothing changed in `wait_seconds`: the stream is alive.
                bg.increment(m.fetch_not_modified);
                set_u64(bg, &self.keys.checked, bg.now_ms());
                set_u64(bg, &self.keys.failures, 0);
                continue;
            }
            if let Then::Failed = self.apply(bg, changes, &cursor, m) {
                return Some(Then::Failed);
            }
        }
        pending.drain(..=end);
        None
    }

    /// Longest a streamed watch may stay silent: the service writes at least every `wait_seconds`.
    fn silence_ms(&self) -> u64 {
        self.mgmt.wait_seconds * 1000 + self.mgmt.timeout_ms
    }

    fn then(&self, bg: &mut impl Background, local: &mut Local, then: Then, router: &Router, m: &Metrics) {
        match then {
            Then::Now => self.next(bg, local, router, m),
            Then::At(due) => self.release(bg, due),
            Then::Failed => {
                local.load = None;
                let failures = update_u64(bg, &self.keys.failures, |f| Some(f + 1)).unwrap_or(1);
                self.release(bg, bg.now_ms() + self.mgmt.backoff_ms(failures, self.seed));
            }
        }
    }

    /// Sends the next call: a page of the whole table, or a watch.
    fn next(&self, bg: &mut impl Background, local: &mut Local, router: &Router, m: &Metrics) {
        let _ = router;
        let mgmt = &self.mgmt;
        let cursor = self.text(bg, &self.keys.cursor);
        let (ask, path, timeout_ms, etag) = match &local.load {
            None if !cursor.is_empty() && self.store.loaded(bg) => (
                Ask::Watch,
                format!("{}?since={cursor}&wait={}", mgmt.path, mgmt.wait_seconds),
                mgmt.wait_seconds * 1000 + mgmt.timeout_ms,
                String::new(),
            ),
            None => {
                if let Some(due) = self.store.busy_until(bg) {
                    return self.release(bg, due);
                }
                // A table in force and an ETag: a service that does not watch may answer 304.
                let etag = if self.store.loaded(bg) { self.text(bg, &self.keys.etag) } else { String::new() };
                (Ask::Page, format!("{}?limit={}", mgmt.path, mgmt.page_size), mgmt.timeout_ms, etag)
            }
            Some(load) => {
                let after = load.next.as_deref().unwrap_or_default();
                (
                    Ask::Page,
                    format!("{}?limit={}&after={after}", mgmt.path, mgmt.page_size),
                    mgmt.timeout_ms,
                    String::new(),
                )
            }
        };
        let now = bg.now_ms();
        self.renew(bg, now + timeout_ms + 1000);
        let headers = [("accept", "application/json"), ("if-none-match", etag.as_str())];
        let headers = if etag.is_empty() { &headers[..1] } else { &headers[..] };
        let timeout = Duration::from_millis(timeout_ms);
        let streamed = match ask == Ask::Watch && mgmt.stream {
            true => self.start_stream(bg, &format!("{path}&stream=1")),
            false => None,
        };
        let started = streamed.map(|id| (id, Ask::Stream, self.silence_ms()));
        let started = started.or_else(|| {
            let get = Get { cluster: &mgmt.cluster, authority: &mgmt.authority, path: &path, headers, timeout };
            let id = bg.http_get(&get)?;
            Some((id, ask, timeout_ms + 1000))
        });
        match started {
            Some((id, ask, overdue)) => {
                local.in_flight = Some((id, ask, now, now + overdue));
                local.unstarted = 0;
            }
            None => {
                bg.increment(m.fetch_failed);
                local.load = None;
                // At the next tick, then less often: 250 ms, 500 ms, then every second.
                let delay = 250 << local.unstarted.min(2);
                local.unstarted += 1;
                self.release(bg, now + delay);
            }
        }
    }

    /// Starts a streamed watch, when the host has them: its id.
    fn start_stream(&self, bg: &mut impl Background, path: &str) -> Option<u64> {
        let mgmt = &self.mgmt;
        let headers = [("accept", LINES)];
        self.ended_inline.store(0, Relaxed);
        let get =
            Get { cluster: &mgmt.cluster, authority: &mgmt.authority, path, headers: &headers, timeout: STREAM_LIMIT };
        let id = bg.http_stream(&get)?;
        // Ended as it started (no upstream to send it to): a plain watch instead, this once.
        (self.ended_inline.swap(0, Relaxed) != id + 1).then_some(id)
    }

    fn on_page(&self, bg: &impl Host, local: &mut Local, r: &Fetched, router: &Router, m: &Metrics) -> Then {
        let now = bg.now_ms();
        match r.status {
            304 if local.load.is_none() => {
                bg.increment(m.fetch_not_modified);
                set_u64(bg, &self.keys.checked, now);
                set_u64(bg, &self.keys.failures, 0);
                return Then::At(now + self.mgmt.poll_interval_ms);
            }
            200 => {}
            status => return self.failed(bg, m, status),
        }
        let mut load = match local.load.take() {
            Some(load) => load,
            None => Load {
                staging: match self.store.stage(bg) {
                    Some(staging) => staging,
                    // Another copy is emptying the set this load would fill: the first page again, shortly.
                    None => return Then::At(now + 200),
                },
                cursor: String::new(),
                etag: r.header("etag").unwrap_or_default().to_owned(),
                version: 0,
                last: 0,
                next: None,
                batch: Batch::default(),
            },
        };
        let first = load.next.is_none();
        let page = match read_page(&router.decoder, &r.body, &mut load.batch) {
            Ok(page) => page,
            Err(e) => return self.refused(bg, m, &format!("a page of the table that does not read ({e})")),
        };
        self.store.stage_batch(bg, &mut load.staging, &load.batch);
        if first {
            load.version = page.version;
            load.cursor = match r.header(CURSOR) {
                None => String::new(),
                Some(c) if token(c) => c.to_owned(),
                Some(c) => return self.refused(bg, m, &format!("the cursor {c:?}")),
            };
        } else if page.version < load.last {
            return self.refused(bg, m, &format!("a page at version {} after one at {}", page.version, load.last));
        }
        load.last = page.version;
        bg.increment(m.fetch_ok);
        match page.next {
            Some(next) if !token(&next) => self.refused(bg, m, &format!("the page token {next:?}")),
            Some(next) => {
                load.next = Some(next);
                local.load = Some(load);
                Then::Now
            }
            None => self.commit(bg, load, m),
        }
    }

    /// Puts a fully loaded table in force.
    fn commit(&self, bg: &impl Host, load: Load, m: &Metrics) -> Then {
        let now = bg.now_ms();
        let routes = self.store.commit(bg, load.staging);
        let k = &self.keys;
        for (key, value) in [(&k.routes, routes), (&k.version, load.version), (&k.catch_up, load.last)] {
            set_u64(bg, key, value);
        }
        for (key, value) in [(&k.checked, now), (&k.changed, now), (&k.failures, 0)] {
            set_u64(bg, key, value);
        }
        bg.shared_set(&k.cursor, load.cursor.as_bytes(), None);
        bg.shared_set(&k.etag, load.etag.as_bytes(), None);
        bg.increment(m.full_loads);
        bg.set_gauge(m.table_version, load.version);
        bg.set_gauge(m.table_routes, routes);
        log::info!("serverless: route table version {} with {routes} routes is in force", load.version);
        if load.cursor.is_empty() {
            Then::At(now + self.mgmt.poll_interval_ms)
        } else {
            Then::Now
        }
    }

    fn on_watch(&self, bg: &impl Host, r: &Fetched, took_ms: u64, router: &Router, m: &Metrics) -> Then {
        let now = bg.now_ms();
        match r.status {
            200 => {}
            304 => {
                bg.increment(m.fetch_not_modified);
                set_u64(bg, &self.keys.checked, now);
                set_u64(bg, &self.keys.failures, 0);
                // A service that answers at once instead of holding the watch is not asked in a loop.
                return if took_ms * 2 < self.mgmt.wait_seconds * 1000 { Then::At(now + 1000) } else { Then::Now };
            }
            410 => {
                bg.increment(m.fetch_gone);
                log::info!(
                    "serverless: the management service no longer serves from this cursor; loading the whole table"
                );
                self.forget_cursor(bg);
                return Then::Now;
            }
            status => return self.failed(bg, m, status),
        }
        let changes = match read_changes(&router.decoder, &r.body) {
            Ok(changes) => changes,
            Err(e) => return self.refused(bg, m, &format!("changes that do not read ({e})")),
        };
        let cursor = match r.header(CURSOR) {
            Some(c) if token(c) => c,
            other => return self.refused(bg, m, &format!("changes with the cursor {other:?}")),
        };
        self.apply(bg, changes, cursor, m)
    }

    /// Applies the changes of a watch answer, or of a streamed line, whose cursor is `cursor`.
    fn apply(&self, bg: &impl Host, changes: Changes, cursor: &str, m: &Metrics) -> Then {
        let now = bg.now_ms();
        let version = get_u64(bg, &self.keys.version).0;
        if changes.version <= version {
            return self.refused(bg, m, &format!("version {} after version {version}", changes.version));
        }
        // Every delete must name a route in the table (as the changes before it leave it), but
        // while replaying the changes a full load overlapped.
        let strict = version >= get_u64(bg, &self.keys.catch_up).0;
        let mut present: HashMap<&[u8], bool> = HashMap::new();
        for c in &changes.changes {
            let here = present.get(&c.key[..]).copied().unwrap_or_else(|| self.store.contains(bg, &c.key));
            if c.record.is_none() && !here && strict {
                return self.refused(bg, m, "a delete of a route not in the table");
            }
            present.insert(&c.key, c.record.is_some());
        }
        let mut delta = 0i64;
        for c in &changes.changes {
            delta += self.store.edit(bg, &c.key, c.record.as_deref());
        }
        let routes = update_u64(bg, &self.keys.routes, |n| Some(n.saturating_add_signed(delta))).unwrap_or(0);
        set_u64(bg, &self.keys.version, changes.version);
        bg.shared_set(&self.keys.cursor, cursor.as_bytes(), None);
        for (key, value) in [(&self.keys.checked, now), (&self.keys.changed, now), (&self.keys.failures, 0)] {
            set_u64(bg, key, value);
        }
        bg.increment(m.fetch_ok);
        bg.set_gauge(m.table_version, changes.version);
        bg.set_gauge(m.table_routes, routes);
        Then::Now
    }

    fn failed(&self, bg: &impl Host, m: &Metrics, status: u16) -> Then {
        log::warn!(
            "serverless: management service {} answered {}; keeping the route table in force",
            self.mgmt.cluster,
            if status == 0 { "nothing (unreachable or timed out)".into() } else { status.to_string() }
        );
        bg.increment(m.fetch_failed);
        Then::Failed
    }

    /// An answer refused: nothing changes, and the next attempt loads the whole table.
    fn refused(&self, bg: &impl Host, m: &Metrics, what: &str) -> Then {
        log::warn!(
            "serverless: management service {} sent {what}; keeping the route table in force",
            self.mgmt.cluster
        );
        bg.increment(m.fetch_rejected);
        self.forget_cursor(bg);
        Then::Failed
    }

    fn forget_cursor(&self, bg: &impl Host) {
        bg.shared_set(&self.keys.cursor, &[], None);
        bg.shared_set(&self.keys.etag, &[], None);
    }

    fn text(&self, host: &impl Host, key: &str) -> String {
        host.shared_get(key).0.and_then(|v| String::from_utf8(v).ok()).unwrap_or_default()
    }

    fn owner(&self, host: &impl Host) -> u64 {
        *self.owner.get_or_init(|| update_u64(host, &self.keys.copies, |n| Some(n + 1)).unwrap_or(1) & 0xfffff)
    }

    /// Takes the lease if it is free (or already this copy's).
    fn take_lease(&self, host: &impl Host, now: u64) -> bool {
        let me = self.owner(host);
        let lease = |owner: u64, until: u64| owner << 44 | until & UNTIL;
        update_u64(host, &self.keys.lease, |v| (v >> 44 == me || now >= v & UNTIL).then_some(lease(me, now + 1000)))
            .is_some()
    }

    fn renew(&self, host: &impl Host, until: u64) {
        let me = self.owner(host);
        update_u64(host, &self.keys.lease, |_| Some(me << 44 | until & UNTIL));
    }

    /// Gives the lease up; nobody takes it before `due`.
    fn release(&self, host: &impl Host, due: u64) {
        set_u64(host, &self.keys.lease, due & UNTIL);
    }
}

/// Cursors and page tokens go into a query as they are: unreserved URL characters only.
fn token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

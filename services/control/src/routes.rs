//! The published route table and its history: every change is a numbered entry of the route
//! log (a route put, or one deleted, keyed by its match), persisted with the store, so that a
//! poller holding a cursor is sent what changed after it, and one too far behind, or from
//! another history, is told to fetch the whole table again.
//!
//! A cursor is `<history>.<version>`: the history is chosen when the store is created, the
//! version is the number of the last change the client has. Clients treat it as opaque.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use edgewise_core::serverless::query::{self, Cursor};
use hyper::body::Bytes;
use serde::Serialize;

use crate::model::Function;

/// An edit putting `f`'s route under `key`.
pub fn put(key: &str, f: &Function) -> Edit {
    Edit { key: key.to_string(), put: true, json: route_json(f) }
}

/// An edit deleting `f`'s route under `key`.
pub fn delete(key: &str, f: &Function) -> Edit {
    Edit { key: key.to_string(), put: false, json: match_json(f) }
}
use crate::store::{LoggedChange, Store};

/// Where the route changes are numbered and kept.
pub enum Log<'a> {
    /// The local store: each change takes the next version and is logged in it.
    Store(&'a mut Store),
    /// The shared store: the changes of one revision take its number; etcd keeps the history.
    Revision(u64),
}

/// Changes kept for watchers, in memory and in the store; a cursor older than these is gone.
pub const HISTORY: usize = 10_000;
/// Changes sent in one answer at most; the client asks again from its new cursor.
pub const MAX_CHANGES: usize = 1_000;
/// Routes sent in one page at most.
pub const MAX_PAGE: usize = 100_000;

/// One route as the filter reads it: `{"match": {...}, "cluster": "...", "host": "..."}`.
pub fn route_json(f: &Function) -> String {
    #[derive(Serialize)]
    struct Route<'a> {
        #[serde(rename = "match")]
        matches: &'a BTreeMap<String, String>,
        cluster: &'a str,
        host: &'a str,
    }
    serde_json::to_string(&Route { matches: &f.matches, cluster: &f.customer, host: &f.host }).unwrap_or_default()
}

/// A route removed: `{"match": {...}}`.
pub fn match_json(f: &Function) -> String {
    #[derive(Serialize)]
    struct Match<'a> {
        #[serde(rename = "match")]
        matches: &'a BTreeMap<String, String>,
    }
    serde_json::to_string(&Match { matches: &f.matches }).unwrap_or_default()
}

/// An edit of the table: the route under `key` put (its JSON) or deleted (its match's JSON).
pub struct Edit {
    pub key: String,
    pub put: bool,
    pub json: String,
}

/// A change as sent: `{"put": <route>}` or `{"delete": {"match": ...}}`.
struct Change {
    version: u64,
    json: Arc<str>,
}

/// The whole table at one version.
#[derive(Debug)]
pub struct FullTable {
    pub version: u64,
    pub cursor: String,
    pub etag: String,
    pub body: Bytes,
}

/// What a watcher at a cursor is owed.
pub enum Since {
    /// Nothing yet: it has the current version.
    Current,
    /// The changes after its cursor (at most `MAX_CHANGES`), and the cursor after them.
    Changes { cursor: String, version: u64, changes: Vec<Arc<str>> },
    /// It must fetch the whole table: why.
    Gone(String),
}

/// The route log: the table's version and the recent changes. The table itself is the
/// functions of published customers (`Functions`), not kept twice.
pub struct Routes {
    history: u64,
    version: u64,
    /// The changes after `horizon`, oldest first.
    recent: VecDeque<Change>,
    horizon: u64,
    /// Versions are the shared store's revisions: a cursor ahead of this replica is of one
    /// that has applied more, and waits here until this one has.
    shared: bool,
    /// The last streamed line made: the streams at the same cursor are sent these bytes, so a
    /// change is formatted once, not once per watcher. Cleared by every change.
    last_line: Option<(String, Line)>,
}

/// A streamed watch's line: the changes after a cursor, and the cursor after them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub cursor: String,
    pub version: u64,
    pub bytes: Bytes,
}

/// `{"version":V,"cursor":"C","changes":[...]}` and a newline; the cursor only on a streamed
/// line (a watch answer names it in its header).
pub fn changes_json(version: u64, cursor: Option<&str>, changes: &[Arc<str>]) -> Bytes {
    let mut body = format!("{{\"version\":{version},");
    if let Some(cursor) = cursor {
        // A cursor is the service's own `<hex>.<digits>`: nothing to escape.
        body.push_str(&format!("\"cursor\":\"{cursor}\","));
    }
    body.push_str("\"changes\":[");
    for (i, change) in changes.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(change);
    }
    body.push_str("]}\n");
    Bytes::from(body)
}

fn change_json(put: bool, json: &str) -> Arc<str> {
    Arc::from(if put { format!("{{\"put\":{json}}}") } else { format!("{{\"delete\":{json}}}") })
}

impl Routes {
    /// The log as the store holds it: its history, horizon, last version and the changes after
    /// the horizon.
    pub fn load(contents: &crate::store::Contents) -> Routes {
        let recent = contents
            .recent
            .iter()
            .map(|entry| Change { version: entry.version, json: change_json(entry.put, &entry.json) })
            .collect();
        Routes {
            history: contents.routes_history,
            version: contents.routes_version,
            recent,
            horizon: contents.routes_horizon,
            shared: false,
            last_line: None,
        }
    }

    /// An empty log at `version` of the shared store, whose history is `history`.
    pub fn at(history: u64, version: u64) -> Routes {
        Routes { history, version, recent: VecDeque::new(), horizon: version, shared: true, last_line: None }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn cursor(&self) -> String {
        Cursor { history: self.history, version: self.version }.to_string()
    }

    /// Applies `edits` (each changes the table: the caller knows what it holds), each under the
    /// next version, persisted first: the new version, or `None` when there was none.
    pub fn apply(&mut self, log: Log<'_>, edits: Vec<Edit>) -> Result<Option<u64>, String> {
        if edits.is_empty() {
            return Ok(None);
        }
        self.last_line = None;
        let store = match log {
            Log::Store(store) => store,
            Log::Revision(revision) => return Ok(self.apply_at(revision, edits)),
        };
        let first = self.version + 1;
        let last = self.version + edits.len() as u64;
        let horizon = last.saturating_sub(HISTORY as u64).max(self.horizon);
        let logged: Vec<LoggedChange> = edits
            .into_iter()
            .zip(first..)
            .map(|(e, version)| LoggedChange { version, key: e.key, put: e.put, json: e.json })
            .collect();
        store.append_routes(&logged, self.horizon, horizon)?;
        for c in logged {
            self.recent.push_back(Change { version: c.version, json: change_json(c.put, &c.json) });
        }
        while self.recent.front().is_some_and(|c| c.version <= horizon) {
            self.recent.pop_front();
        }
        (self.version, self.horizon) = (last, horizon);
        Ok(Some(last))
    }

    /// The changes of one revision of the shared store (several calls for one revision come
    /// under one lock: a watcher never sees part of it).
    fn apply_at(&mut self, revision: u64, edits: Vec<Edit>) -> Option<u64> {
        if revision < self.version {
            return None;
        }
        for e in edits {
            self.recent.push_back(Change { version: revision, json: change_json(e.put, &e.json) });
        }
        while self.recent.len() > HISTORY {
            if let Some(gone) = self.recent.pop_front() {
                self.horizon = gone.version;
            }
        }
        // The horizon's own version must be whole: drop the rest of it.
        while self.recent.front().is_some_and(|c| c.version <= self.horizon) {
            self.recent.pop_front();
        }
        self.version = revision;
        Some(revision)
    }

    /// A streamed watch's next line from `cursor`: the cursor after it and the line, `None` when
    /// `cursor` is current, or why it is gone.
    pub fn line_since(&mut self, cursor: &str) -> Result<Option<Line>, String> {
        if let Some((_, line)) = self.last_line.as_ref().filter(|(from, _)| from == cursor) {
            return Ok(Some(line.clone()));
        }
        match self.since(cursor) {
            Since::Gone(why) => Err(why),
            Since::Current => Ok(None),
            Since::Changes { cursor: to, version, changes } => {
                let line = Line { bytes: changes_json(version, Some(&to), &changes), cursor: to, version };
                self.last_line = Some((cursor.to_string(), line.clone()));
                Ok(Some(line))
            }
        }
    }

    /// What a watcher holding `cursor` is owed.
    pub fn since(&self, cursor: &str) -> Since {
        let Some(Cursor { history, version }) = Cursor::read(cursor) else {
            return Since::Gone(format!("{cursor:?} is no cursor of this service"));
        };
        if history != self.history {
            return Since::Gone("the cursor is of another history (another store)".into());
        }
        if version > self.version && self.shared {
            return Since::Current;
        }
        if version > self.version {
            return Since::Gone(format!("version {version} is ahead of this service's {}", self.version));
        }
        if version < self.horizon {
            return Since::Gone(format!("version {version} is older than the history kept (after {})", self.horizon));
        }
        if version == self.version {
            return Since::Current;
        }
        let start = self.recent.partition_point(|c| c.version <= version);
        let mut changes: Vec<&Change> = self.recent.range(start..).take(MAX_CHANGES).collect();
        // A version's changes go whole: the cursor after them names it.
        let mut more = self.recent.range(start + changes.len()..);
        while let Some(next) = more.next().filter(|n| changes.last().is_some_and(|l| l.version == n.version)) {
            changes.push(next);
        }
        if changes.is_empty() {
            return Since::Current;
        }
        let last = changes.last().map_or(version, |c| c.version);
        Since::Changes {
            cursor: Cursor { history: self.history, version: last }.to_string(),
            version: last,
            changes: changes.into_iter().map(|c| c.json.clone()).collect(),
        }
    }
}

/// A page token: the 16 hex digits of a position in the table's page order.
pub fn page_token(position: u64) -> String {
    query::page_token(position)
}

pub fn read_page_token(token: &str) -> Result<u64, String> {
    query::read_page_token(token).ok_or_else(|| format!("{token:?} is not a page token of this service"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(label: &str, host: &str) -> Function {
        Function {
            matches: BTreeMap::from([("function".to_string(), label.to_string())]),
            customer: "customer-a".into(),
            host: host.into(),
        }
    }

    fn open(dir: &std::path::Path) -> (Store, Routes) {
        let store = Store::open(&dir.join("control.db")).unwrap();
        let routes = Routes::load(&store.load().unwrap());
        (store, routes)
    }

    /// The route table the store's log ends with.
    fn table(store: &Store) -> Vec<(String, String)> {
        let mut table = Vec::new();
        store.logged_routes(|key, json| table.push((key, json))).unwrap();
        table
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("edgewise-routes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn changes(since: Since) -> (u64, Vec<String>) {
        match since {
            Since::Changes { version, changes, cursor } => {
                assert!(cursor.ends_with(&format!(".{version}")), "{cursor}");
                (version, changes.iter().map(|c| c.to_string()).collect())
            }
            Since::Current => panic!("current"),
            Since::Gone(why) => panic!("gone: {why}"),
        }
    }

    #[test]
    fn a_watcher_gets_the_changes_after_its_cursor_in_order_and_nothing_else() {
        let dir = scratch("order");
        let (mut store, mut routes) = open(&dir);
        let start = routes.cursor();
        let (a, b) = (function("a", "a.example"), function("b", "b.example"));
        assert_eq!(routes.apply(Log::Store(&mut store), vec![put("ka", &a), put("kb", &b)]).unwrap(), Some(2));
        let (version, sent) = changes(routes.since(&start));
        assert_eq!(version, 2);
        assert_eq!(
            sent,
            [
                r#"{"put":{"match":{"function":"a"},"cluster":"customer-a","host":"a.example"}}"#,
                r#"{"put":{"match":{"function":"b"},"cluster":"customer-a","host":"b.example"}}"#
            ]
        );
        let at_two = routes.cursor();
        assert!(matches!(routes.since(&at_two), Since::Current));
        assert_eq!(routes.apply(Log::Store(&mut store), vec![]).unwrap(), None, "no edit, no version");
        assert_eq!(routes.apply(Log::Store(&mut store), vec![delete("ka", &a)]).unwrap(), Some(3));
        assert_eq!(changes(routes.since(&at_two)).1, [r#"{"delete":{"match":{"function":"a"}}}"#]);
        assert_eq!(
            table(&store),
            [("kb".to_string(), r#"{"match":{"function":"b"},"cluster":"customer-a","host":"b.example"}"#.to_string())]
        );
        let (history, _) = start.split_once('.').unwrap();
        let other = u64::from_str_radix(history, 16).unwrap() ^ 1;
        for (cursor, why) in [
            (format!("{other:x}.1"), "another history"),
            (format!("{history}.4"), "ahead"),
            ("garbage".to_string(), "no cursor"),
            (format!("{history}.x"), "no cursor"),
            (String::new(), "no cursor"),
        ] {
            match routes.since(&cursor) {
                Since::Gone(reason) => assert!(reason.contains(why), "{cursor:?}: {reason}"),
                _ => panic!("{cursor:?} is not gone"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streams_at_one_cursor_share_one_line_and_a_change_makes_a_new_one() {
        let dir = scratch("line");
        let (mut store, mut routes) = open(&dir);
        let start = routes.cursor();
        assert_eq!(routes.line_since(&start), Ok(None), "current: no line");
        let (a, b) = (function("a", "a.example"), function("b", "b.example"));
        routes.apply(Log::Store(&mut store), vec![put("ka", &a)]).unwrap();
        let Line { cursor: to, version, bytes: line } = routes.line_since(&start).unwrap().unwrap();
        assert_eq!((to.as_str(), version), (routes.cursor().as_str(), 1));
        let expected = format!(
            "{{\"version\":1,\"cursor\":\"{to}\",\"changes\":[{}]}}\n",
            r#"{"put":{"match":{"function":"a"},"cluster":"customer-a","host":"a.example"}}"#
        );
        assert_eq!(line, expected.as_bytes());
        let again = routes.line_since(&start).unwrap().unwrap();
        assert_eq!(
            (again.cursor.as_str(), again.bytes.as_ptr()),
            (to.as_str(), line.as_ptr()),
            "the same bytes, not made again"
        );
        assert_eq!(routes.line_since(&to), Ok(None));

        // A change: the cursor behind gets both, the one after the first gets the second.
        routes.apply(Log::Store(&mut store), vec![put("kb", &b)]).unwrap();
        let both = routes.line_since(&start).unwrap().unwrap().bytes;
        assert_ne!(both.as_ptr(), line.as_ptr());
        assert_eq!(String::from_utf8_lossy(&both).matches("{\"put\":").count(), 2, "{both:?}");
        let second = routes.line_since(&to).unwrap().unwrap();
        assert_eq!(second.version, 2);
        let second = String::from_utf8_lossy(&second.bytes);
        assert!(second.contains("b.example") && !second.contains("a.example"), "{second}");
        assert!(routes.line_since("garbage").unwrap_err().contains("no cursor"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_log_survives_a_restart_keeps_its_history_and_only_the_routes_in_force_behind_it() {
        let dir = scratch("restart");
        let (mut store, mut routes) = open(&dir);
        // 12,000 changes over 100 routes: puts, re-puts with another host, deletes.
        for round in 0..2 {
            let edits = (0..6000)
                .map(|i| {
                    let (key, f) =
                        (format!("k{}", i % 100), function(&format!("f{}", i % 100), &format!("h{round}-{i}")));
                    if i % 7 == 3 {
                        delete(&key, &f)
                    } else {
                        put(&key, &f)
                    }
                })
                .collect();
            routes.apply(Log::Store(&mut store), edits).unwrap();
        }
        let (version, full, recent) = (routes.version(), table(&store), routes.cursor());
        let behind = format!("{}.{}", recent.split_once('.').unwrap().0, version - 2 * MAX_CHANGES as u64);
        let before = changes(routes.since(&behind));
        drop((store, routes));

        let (store, routes) = open(&dir);
        assert_eq!(routes.version(), version);
        assert_eq!(table(&store), full, "the same table after the restart");
        assert!(!full.is_empty() && full.len() <= 100);
        assert!(matches!(routes.since(&recent), Since::Current), "a cursor of before the restart is current");
        assert_eq!(changes(routes.since(&behind)), before, "and one behind it gets the same changes");
        assert_eq!(before.1.len(), MAX_CHANGES, "at most {MAX_CHANGES} changes an answer");
        assert!(matches!(routes.since(&format!("{}.1", recent.split_once('.').unwrap().0)), Since::Gone(_)));
        let recent = store.load().unwrap().recent;
        assert_eq!(recent.len(), HISTORY, "the changes after the horizon");
        let kept: i64 = store.count_log_entries();
        assert!(kept as usize <= HISTORY + 100, "{kept} entries kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn on_the_shared_store_a_revision_s_changes_go_whole_and_a_cursor_ahead_waits() {
        let mut routes = Routes::at(0xab, 100);
        let f = |i: usize| function(&format!("f{i}"), "h.example");
        // One revision with more changes than an answer holds (a customer deleted), then one more.
        let many: Vec<Edit> = (0..MAX_CHANGES + 5).map(|i| delete(&format!("k{i}"), &f(i))).collect();
        assert_eq!(routes.apply(Log::Revision(105), many).unwrap(), Some(105));
        assert_eq!(routes.apply(Log::Revision(109), vec![put("k0", &f(0))]).unwrap(), Some(109));
        assert_eq!(routes.apply(Log::Revision(107), vec![put("k1", &f(1))]).unwrap(), None, "an older revision");
        let (version, sent) = changes(routes.since("ab.100"));
        assert_eq!((version, sent.len()), (105, MAX_CHANGES + 5), "revision 105 whole, and not 109");
        let (version, sent) = changes(routes.since("ab.105"));
        assert_eq!((version, sent.len()), (109, 1));
        // Between two revisions, nothing changed after it but 109.
        assert_eq!(changes(routes.since("ab.107")).0, 109);
        assert!(matches!(routes.since("ab.109"), Since::Current));
        // Ahead: another replica has applied more; this one is current until it catches up.
        assert!(matches!(routes.since("ab.120"), Since::Current));
        assert!(matches!(routes.since("ab.99"), Since::Gone(_)), "before the log began");
        assert!(matches!(routes.since("ac.105"), Since::Gone(_)), "another etcd cluster");
        // The log keeps the last HISTORY changes, whole revisions only.
        for revision in 110..110 + HISTORY as u64 {
            routes.apply(Log::Revision(revision), vec![put("k", &f(2))]).unwrap();
        }
        assert!(matches!(routes.since("ab.105"), Since::Gone(_)), "behind the horizon (109)");
        assert_eq!(changes(routes.since("ab.109")).0, 109 + MAX_CHANGES as u64, "an answer at most");
        assert_eq!(changes(routes.since(&format!("ab.{}", 110 + HISTORY as u64 - 2))).1.len(), 1);
    }
}

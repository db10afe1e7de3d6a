//! The published route table and its history: every change is a numbered entry of the route
//! log (a route put, or one deleted, keyed by its match), persisted with the store, so that a
//! poller holding a cursor is sent what changed after it, and one too far behind, or from
//! another history, is told to fetch the whole table again.
//!
//! A cursor is `<history>.<version>`: the history is chosen when the store is created, the
//! version is the number of the last change the client has. Clients treat it as opaque.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

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

/// The full table, serialized once per version when someone asks for it.
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

pub struct Routes {
    history: u64,
    version: u64,
    /// key -> route JSON of the published routes.
    table: BTreeMap<String, Arc<str>>,
    /// The changes after `horizon`, oldest first.
    recent: VecDeque<Change>,
    horizon: u64,
    full: Option<Arc<FullTable>>,
}

fn change_json(put: bool, json: &str) -> Arc<str> {
    Arc::from(if put { format!("{{\"put\":{json}}}") } else { format!("{{\"delete\":{json}}}") })
}

impl Routes {
    /// The table and history the store's route log holds.
    pub fn load(history: u64, horizon: u64, log: Vec<LoggedChange>) -> Routes {
        let mut routes =
            Routes { history, version: horizon, table: BTreeMap::new(), recent: VecDeque::new(), horizon, full: None };
        for entry in log {
            routes.version = routes.version.max(entry.version);
            if entry.put {
                routes.table.insert(entry.key, Arc::from(entry.json.as_str()));
            } else {
                routes.table.remove(&entry.key);
            }
            if entry.version > horizon {
                routes.recent.push_back(Change { version: entry.version, json: change_json(entry.put, &entry.json) });
            }
        }
        routes
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Routes in the table.
    pub fn count(&self) -> usize {
        self.table.len()
    }

    pub fn cursor(&self) -> String {
        format!("{:x}.{}", self.history, self.version)
    }

    /// The edits that make the table hold exactly `wanted` (key -> route JSON).
    pub fn reconcile(&self, wanted: &BTreeMap<String, String>) -> Vec<Edit> {
        let mut edits = Vec::new();
        for (key, json) in &self.table {
            if !wanted.contains_key(key) {
                // The deleted route's match is in its route JSON: the delete names it alone.
                let matches = serde_json::from_str::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v.get("match").map(|m| serde_json::json!({ "match": m }).to_string()))
                    .unwrap_or_default();
                edits.push(Edit { key: key.clone(), put: false, json: matches });
            }
        }
        for (key, route) in wanted {
            if self.table.get(key).is_none_or(|have| **have != **route) {
                edits.push(Edit { key: key.clone(), put: true, json: route.clone() });
            }
        }
        edits
    }

    /// Applies `edits` (those that change nothing are dropped), each under the next version,
    /// persisted first: the new version, or `None` when nothing changed.
    pub fn apply(&mut self, store: &mut Store, edits: Vec<Edit>) -> Result<Option<u64>, String> {
        let edits: Vec<Edit> = edits
            .into_iter()
            .filter(|e| {
                if e.put {
                    self.table.get(&e.key).is_none_or(|r| **r != *e.json)
                } else {
                    self.table.contains_key(&e.key)
                }
            })
            .collect();
        if edits.is_empty() {
            return Ok(None);
        }
        let first = self.version + 1;
        let last = self.version + edits.len() as u64;
        let horizon = last.saturating_sub(HISTORY as u64).max(self.horizon);
        let logged: Vec<LoggedChange> = edits
            .iter()
            .zip(first..)
            .map(|(e, version)| LoggedChange { version, key: e.key.clone(), put: e.put, json: e.json.clone() })
            .collect();
        store.append_routes(&logged, self.horizon, horizon)?;
        for (e, version) in edits.into_iter().zip(first..) {
            self.recent.push_back(Change { version, json: change_json(e.put, &e.json) });
            if e.put {
                self.table.insert(e.key, Arc::from(e.json));
            } else {
                self.table.remove(&e.key);
            }
        }
        while self.recent.front().is_some_and(|c| c.version <= horizon) {
            self.recent.pop_front();
        }
        (self.version, self.horizon, self.full) = (last, horizon, None);
        Ok(Some(last))
    }

    /// What a watcher holding `cursor` is owed.
    pub fn since(&self, cursor: &str) -> Since {
        let parsed =
            cursor.split_once('.').and_then(|(h, v)| Some((u64::from_str_radix(h, 16).ok()?, v.parse::<u64>().ok()?)));
        let Some((history, version)) = parsed else {
            return Since::Gone(format!("{cursor:?} is no cursor of this service"));
        };
        if history != self.history {
            return Since::Gone("the cursor is of another history (another store)".into());
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
        let changes: Vec<&Change> = self.recent.range(start..).take(MAX_CHANGES).collect();
        let last = changes.last().map_or(version, |c| c.version);
        Since::Changes {
            cursor: format!("{:x}.{last}", self.history),
            version: last,
            changes: changes.into_iter().map(|c| c.json.clone()).collect(),
        }
    }

    /// A page of the table: at most `limit` routes in key order after the page token `after`
    /// (`{"version": N, "routes": [...], "next": "<token>"}`, no `next` on the last page), and
    /// the cursor to watch from. Tokens are the hex of the last key sent.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Result<(String, Bytes), String> {
        let after = match after {
            None => None,
            Some(token) => Some(unhex(token).ok_or_else(|| format!("{token:?} is not a page token of this service"))?),
        };
        let mut range = match &after {
            None => self.table.range::<String, _>(..),
            Some(key) => self.table.range::<String, _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)),
        };
        let mut body = format!("{{\"version\":{},\"routes\":[", self.version);
        let mut last = None;
        for (i, (key, route)) in range.by_ref().take(limit.clamp(1, MAX_PAGE)).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(route);
            last = Some(key);
        }
        body.push(']');
        if let (Some(last), Some(_)) = (last, range.next()) {
            body.push_str(",\"next\":\"");
            body.extend(last.bytes().map(|b| format!("{b:02x}")));
            body.push('"');
        }
        body.push_str("}\n");
        Ok((self.cursor(), Bytes::from(body)))
    }

    /// The whole table (`{"version": N, "routes": [...]}`), built once per version.
    pub fn full(&mut self) -> Arc<FullTable> {
        if let Some(full) = &self.full {
            return full.clone();
        }
        let mut body = format!("{{\"version\":{},\"routes\":[", self.version);
        for (i, route) in self.table.values().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(route);
        }
        body.push_str("]}");
        let full = Arc::new(FullTable {
            version: self.version,
            cursor: self.cursor(),
            etag: format!("\"{}\"", self.version),
            body: Bytes::from(body),
        });
        self.full = Some(full.clone());
        full
    }
}

/// A page token back to the key it names.
fn unhex(token: &str) -> Option<String> {
    if token.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok());
    String::from_utf8(bytes.collect::<Option<Vec<u8>>>()?).ok()
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
        let contents = store.load().unwrap();
        let routes = Routes::load(contents.routes_history, contents.routes_horizon, contents.route_log);
        (store, routes)
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
        assert_eq!(routes.apply(&mut store, vec![put("ka", &a), put("kb", &b)]).unwrap(), Some(2));
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
        assert_eq!(routes.apply(&mut store, vec![put("kb", &b)]).unwrap(), None, "a put that changes nothing");
        assert_eq!(routes.apply(&mut store, vec![delete("ka", &a)]).unwrap(), Some(3));
        assert_eq!(changes(routes.since(&at_two)).1, [r#"{"delete":{"match":{"function":"a"}}}"#]);
        assert_eq!(
            &routes.full().body[..],
            br#"{"version":3,"routes":[{"match":{"function":"b"},"cluster":"customer-a","host":"b.example"}]}"#
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
    fn pages_cover_the_table_once_in_key_order() {
        let dir = scratch("pages");
        let (mut store, mut routes) = open(&dir);
        let edits = (0..25).map(|i| put(&format!("k{i:02}"), &function(&format!("f{i}"), "h.example"))).collect();
        routes.apply(&mut store, edits).unwrap();
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (cursor, body) = routes.page(after.as_deref(), 10).unwrap();
            assert_eq!(cursor, routes.cursor());
            let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(page["version"], 25);
            seen.extend(page["routes"].as_array().unwrap().iter().map(|r| r["match"]["function"].to_string()));
            pages += 1;
            match page.get("next").and_then(|n| n.as_str()) {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        assert_eq!((pages, seen.len()), (3, 25));
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 25, "each route once");
        for bad in ["zz", "6", "ff"] {
            assert!(routes.page(Some(bad), 10).is_err(), "{bad}");
        }
        let (_, last) = routes.page(Some("6b3234"), 10).unwrap(); // after "k24": nothing
        assert_eq!(&last[..], b"{\"version\":25,\"routes\":[]}\n");
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
            routes.apply(&mut store, edits).unwrap();
        }
        let (version, full, recent) = (routes.version(), routes.full().body.clone(), routes.cursor());
        let behind = format!("{}.{}", recent.split_once('.').unwrap().0, version - 2 * MAX_CHANGES as u64);
        let before = changes(routes.since(&behind));
        drop((store, routes));

        let (store, mut routes) = open(&dir);
        assert_eq!(routes.version(), version);
        assert_eq!(routes.full().body, full, "the same table after the restart");
        assert!(matches!(routes.since(&recent), Since::Current), "a cursor of before the restart is current");
        assert_eq!(changes(routes.since(&behind)), before, "and one behind it gets the same changes");
        assert_eq!(before.1.len(), MAX_CHANGES, "at most {MAX_CHANGES} changes an answer");
        assert!(matches!(routes.since(&format!("{}.1", recent.split_once('.').unwrap().0)), Since::Gone(_)));
        let log = store.load().unwrap().route_log;
        assert!(log.len() <= HISTORY + 100, "{} entries kept", log.len());
        assert!(log.len() >= HISTORY, "{} entries kept", log.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The persistent store: one SQLite file. Every change is a transaction that is on disk before
//! the API answers, so a restart (or a crash) loses nothing that was acknowledged.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::domains::Domain;
use crate::model::{Customer, Function};

pub struct Store {
    db: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS customers (
    name    TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    ca      TEXT NOT NULL,
    san     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (
    name     TEXT PRIMARY KEY,
    key      TEXT NOT NULL UNIQUE,
    matches  TEXT NOT NULL,
    customer TEXT NOT NULL REFERENCES customers(name) ON DELETE CASCADE,
    host     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS functions_customer ON functions(customer);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS route_log (
    version INTEGER PRIMARY KEY,
    key     TEXT NOT NULL,
    put     INTEGER NOT NULL,
    json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS route_log_key ON route_log(key, version);
CREATE TABLE IF NOT EXISTS domains (
    name     TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    state    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// One entry of the route log: the route under `key` put (`json`: the route) or deleted
/// (`json`: its match), as change number `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    pub version: u64,
    pub key: String,
    pub put: bool,
    pub json: String,
}

type Result<T> = std::result::Result<T, String>;

fn db_error(e: rusqlite::Error) -> String {
    format!("database: {e}")
}

/// What the store holds, read at start, but the functions and the route table, which are read
/// one at a time (`functions`, `logged_routes`): a million of them is the size to plan for.
#[derive(Debug, Default)]
pub struct Contents {
    pub customers: BTreeMap<String, Customer>,
    /// The route log's history id, made when the store was created.
    pub routes_history: u64,
    /// The log holds every change after this version (and, before it, the routes in force).
    pub routes_horizon: u64,
    /// The last change's version.
    pub routes_version: u64,
    /// The changes after the horizon, in order.
    pub recent: Vec<LoggedChange>,
}

impl Store {
    /// Opens (or creates) the file, readable and writable by this user alone: it holds the
    /// custom domains' private keys and the ACME account key (SQLite gives its WAL and journal
    /// files the same mode).
    pub fn open(path: &Path) -> Result<Store> {
        let db = Connection::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: making it private: {e}", path.display()))?;
        }
        // WAL: readers never wait for the writer; FULL: a commit survives a power loss.
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .and_then(|()| db.execute_batch(SCHEMA))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Store { db })
    }

    pub fn load(&self) -> Result<Contents> {
        let mut contents = Contents::default();
        let mut customers = self.db.prepare("SELECT name, address, ca, san FROM customers").map_err(db_error)?;
        let rows = customers
            .query_map([], |r| Ok((r.get(0)?, Customer { address: r.get(1)?, ca: r.get(2)?, san: r.get(3)? })))
            .map_err(db_error)?;
        for row in rows {
            let (name, customer) = row.map_err(db_error)?;
            contents.customers.insert(name, customer);
        }
        let meta = |key: &str| {
            self.db
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(db_error)
        };
        // A store from before the route log: its table version is where the log begins.
        let legacy = meta("routes_version")?.map_or(0, |v| v.max(0) as u64);
        contents.routes_horizon = meta("routes_horizon")?.map_or(legacy, |v| v.max(0) as u64);
        contents.routes_history = match meta("routes_history")? {
            Some(h) => h as u64,
            None => {
                let history = new_history();
                self.db
                    .execute("INSERT INTO meta (key, value) VALUES ('routes_history', ?1)", [history as i64])
                    .map_err(db_error)?;
                history
            }
        };
        let last: Option<i64> =
            self.db.query_row("SELECT MAX(version) FROM route_log", [], |r| r.get(0)).map_err(db_error)?;
        contents.routes_version = last.map_or(0, |v| v.max(0) as u64).max(contents.routes_horizon);
        let mut recent = self
            .db
            .prepare("SELECT version, key, put, json FROM route_log WHERE version > ?1 ORDER BY version")
            .map_err(db_error)?;
        let horizon = i64::try_from(contents.routes_horizon).map_err(|e| e.to_string())?;
        let rows = recent.query_map([horizon], logged).map_err(db_error)?;
        for row in rows {
            contents.recent.push(row.map_err(db_error)?);
        }
        Ok(contents)
    }

    /// Every function, one at a time: (name, route key, function).
    pub fn functions(&self, mut each: impl FnMut(String, String, Function)) -> Result<()> {
        let mut functions =
            self.db.prepare("SELECT name, key, matches, customer, host FROM functions").map_err(db_error)?;
        let mut rows = functions.query([]).map_err(db_error)?;
        while let Some(r) = rows.next().map_err(db_error)? {
            let name: String = r.get(0).map_err(db_error)?;
            let matches: String = r.get(2).map_err(db_error)?;
            let matches = serde_json::from_str(&matches).map_err(|e| format!("database: function {name}: {e}"))?;
            let function =
                Function { matches, customer: r.get(3).map_err(db_error)?, host: r.get(4).map_err(db_error)? };
            each(name, r.get(1).map_err(db_error)?, function);
        }
        Ok(())
    }

    /// The route table the log ends with, one route at a time: (route key, route JSON).
    pub fn logged_routes(&self, mut each: impl FnMut(String, String)) -> Result<()> {
        let mut log =
            self.db.prepare("SELECT version, key, put, json FROM route_log ORDER BY key, version").map_err(db_error)?;
        let mut last: Option<LoggedChange> = None;
        for row in log.query_map([], logged).map_err(db_error)? {
            let change = row.map_err(db_error)?;
            if let Some(done) = last.take().filter(|l| l.key != change.key && l.put) {
                each(done.key, done.json);
            }
            last = Some(change);
        }
        if let Some(done) = last.filter(|l| l.put) {
            each(done.key, done.json);
        }
        Ok(())
    }

    /// Opens a change: the writes until [`Store::commit`] reach the disk together, with one
    /// sync, or none does ([`Store::rollback`]).
    pub fn begin(&mut self) -> Result<()> {
        self.db.execute_batch("SAVEPOINT change").map_err(db_error)
    }

    pub fn commit(&mut self) -> Result<()> {
        self.db.execute_batch("RELEASE change").map_err(db_error)
    }

    pub fn rollback(&mut self) {
        if let Err(e) = self.db.execute_batch("ROLLBACK TO change; RELEASE change") {
            eprintln!("edgewise-control: rolling a change back: {e}");
        }
    }

    /// Appends `changes` to the route log in one transaction (or within the open change), and
    /// moves its horizon from `from` to `to`: behind the horizon only the routes in force stay
    /// (an entry superseded by a later one for its key, or a deletion, goes).
    pub fn append_routes(&mut self, changes: &[LoggedChange], from: u64, to: u64) -> Result<()> {
        let int = |v: u64| i64::try_from(v).map_err(|e| e.to_string());
        let (from_version, to_version) = (int(from)?, int(to)?);
        let tx = self.db.savepoint().map_err(db_error)?;
        {
            let mut superseded =
                tx.prepare_cached("DELETE FROM route_log WHERE key = ?1 AND version <= ?2").map_err(db_error)?;
            let mut insert = tx
                .prepare_cached("INSERT INTO route_log (version, key, put, json) VALUES (?1, ?2, ?3, ?4)")
                .map_err(db_error)?;
            for c in changes {
                superseded.execute(params![c.key, to_version]).map_err(db_error)?;
                insert.execute(params![int(c.version)?, c.key, i64::from(c.put), c.json]).map_err(db_error)?;
            }
        }
        if to > from {
            tx.prepare_cached(
                "DELETE FROM route_log WHERE version > ?1 AND version <= ?2 AND (put = 0 OR EXISTS
                 (SELECT 1 FROM route_log later WHERE later.key = route_log.key AND later.version > route_log.version))",
            )
            .and_then(|mut s| s.execute(params![from_version, to_version]))
            .map_err(db_error)?;
        }
        tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('routes_horizon', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
        )
        .and_then(|mut s| s.execute([to_version]))
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }

    /// The stored customers, or the one named.
    pub fn customers(&self, only: Option<&str>) -> Result<Vec<(String, Customer)>> {
        let sql = "SELECT name, address, ca, san FROM customers WHERE ?1 IS NULL OR name = ?1 ORDER BY name";
        let mut query = self.db.prepare_cached(sql).map_err(db_error)?;
        let rows = query
            .query_map([only], |r| Ok((r.get(0)?, Customer { address: r.get(1)?, ca: r.get(2)?, san: r.get(3)? })))
            .map_err(db_error)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_error)
    }

    pub fn put_customer(&mut self, name: &str, c: &Customer) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO customers (name, address, ca, san) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET address = ?2, ca = ?3, san = ?4",
                params![name, c.address, c.ca, c.san],
            )
            .map(drop)
            .map_err(db_error)
    }

    /// Deletes a customer and its functions.
    pub fn delete_customer(&mut self, name: &str) -> Result<()> {
        self.db.execute("DELETE FROM customers WHERE name = ?1", [name]).map(drop).map_err(db_error)
    }

    pub fn put_function(&mut self, name: &str, key: &str, f: &Function) -> Result<()> {
        let matches = serde_json::to_string(&f.matches).map_err(|e| e.to_string())?;
        self.db
            .prepare_cached(
                "INSERT INTO functions (name, key, matches, customer, host) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET key = ?2, matches = ?3, customer = ?4, host = ?5",
            )
            .and_then(|mut s| s.execute(params![name, key, matches, f.customer, f.host]))
            .map(drop)
            .map_err(db_error)
    }

    pub fn delete_function(&mut self, name: &str) -> Result<()> {
        self.db
            .prepare_cached("DELETE FROM functions WHERE name = ?1")
            .and_then(|mut s| s.execute([name]))
            .map(drop)
            .map_err(db_error)
    }

    /// Every custom domain.
    pub fn domains(&self) -> Result<Vec<(String, Domain)>> {
        let mut rows = self.db.prepare("SELECT name, state FROM domains ORDER BY name").map_err(db_error)?;
        let rows = rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (name, state) = row.map_err(db_error)?;
            let domain = serde_json::from_str(&state).map_err(|e| format!("stored domain {name}: {e}"))?;
            out.push((name, domain));
        }
        Ok(out)
    }

    pub fn put_domain(&mut self, name: &str, d: &Domain) -> Result<()> {
        let state = serde_json::to_string(d).map_err(|e| e.to_string())?;
        self.db
            .execute(
                "INSERT INTO domains (name, function, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET function = ?2, state = ?3",
                params![name, d.function, state],
            )
            .map(drop)
            .map_err(db_error)
    }

    pub fn delete_domain(&mut self, name: &str) -> Result<()> {
        self.db.execute("DELETE FROM domains WHERE name = ?1", [name]).map(drop).map_err(db_error)
    }

    /// A secret the service keeps (the ACME account's credentials).
    pub fn secret(&self, key: &str) -> Result<Option<String>> {
        self.db.query_row("SELECT value FROM secrets WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(db_error)
    }

    pub fn put_secret(&mut self, key: &str, value: &str) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO secrets (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map(drop)
            .map_err(db_error)
    }

    /// Many customers and functions in one transaction (seeding a large installation; the
    /// benchmark's 10,000 customers and 100,000 functions). The caller has checked them.
    pub fn seed<'a>(
        &mut self,
        customers: impl IntoIterator<Item = (&'a str, &'a Customer)>,
        functions: impl IntoIterator<Item = (&'a str, &'a str, &'a Function)>,
    ) -> Result<()> {
        let tx = self.db.transaction().map_err(db_error)?;
        {
            let mut put = tx
                .prepare("INSERT OR REPLACE INTO customers (name, address, ca, san) VALUES (?1, ?2, ?3, ?4)")
                .map_err(db_error)?;
            for (name, c) in customers {
                put.execute(params![name, c.address, c.ca, c.san]).map_err(db_error)?;
            }
            let mut put = tx
                .prepare(
                    "INSERT OR REPLACE INTO functions (name, key, matches, customer, host) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db_error)?;
            for (name, key, f) in functions {
                let matches = serde_json::to_string(&f.matches).map_err(|e| e.to_string())?;
                put.execute(params![name, key, matches, f.customer, f.host]).map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }
}

impl Store {
    /// Entries in the route log (the tests' measure of what it keeps).
    #[cfg(test)]
    pub fn count_log_entries(&self) -> i64 {
        self.db.query_row("SELECT COUNT(*) FROM route_log", [], |r| r.get(0)).unwrap_or(-1)
    }
}

fn logged(r: &rusqlite::Row<'_>) -> rusqlite::Result<LoggedChange> {
    Ok(LoggedChange {
        version: r.get::<_, i64>(0)?.max(0) as u64,
        key: r.get(1)?,
        put: r.get::<_, i64>(2)? != 0,
        json: r.get(3)?,
    })
}

/// A history id no other store has: the time and the process, hashed (63 bits: SQLite's
/// integers are signed).
pub fn new_history() -> u64 {
    use sha2::{Digest, Sha256};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = format!("{}.{}.{}", now.as_nanos(), std::process::id(), std::ptr::from_ref(&now) as usize);
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(bytes) >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_stored_survives_a_reopen_and_deleting_a_customer_deletes_its_functions() {
        let dir = std::env::temp_dir().join(format!("edgewise-control-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.db");
        let a = Customer { address: "127.0.0.1:1".into(), ca: "pem".into(), san: "a.example".into() };
        let f = Function {
            matches: BTreeMap::from([("function".into(), "f".into())]),
            customer: "a".into(),
            host: "h.example".into(),
        };
        {
            let mut store = Store::open(&path).unwrap();
            store.put_customer("a", &a).unwrap();
            store.put_customer("b", &a).unwrap();
            store.put_function("f1", "f", &f).unwrap();
            let unknown = Function { customer: "nobody".into(), ..f.clone() };
            assert!(store.put_function("f2", "g", &unknown).unwrap_err().contains("FOREIGN KEY"));
            assert!(store.put_function("f3", "f", &f).unwrap_err().contains("UNIQUE"));
        }
        let mut store = Store::open(&path).unwrap();
        let contents = store.load().unwrap();
        assert_eq!(contents.customers.len(), 2);
        assert_eq!(contents.customers["a"], a);
        let mut functions = Vec::new();
        store.functions(|name, key, f| functions.push((name, key, f))).unwrap();
        assert_eq!(functions, [("f1".to_string(), "f".to_string(), f.clone())]);
        assert_eq!((contents.recent, contents.routes_version), (vec![], 0));
        assert_eq!(contents.routes_history, store.load().unwrap().routes_history, "the history id is kept");
        store.delete_customer("a").unwrap();
        let contents = store.load().unwrap();
        assert_eq!(contents.customers.keys().collect::<Vec<_>>(), ["b"]);
        let mut functions = 0;
        store.functions(|_, _, _| functions += 1).unwrap();
        assert_eq!(functions, 0);

        // A change (a function and its route log entry) is one transaction: rolled back whole,
        // or committed whole.
        let change = |version| LoggedChange { version, key: "g".into(), put: true, json: "{}".into() };
        let g = Function { customer: "b".into(), ..f.clone() };
        store.begin().unwrap();
        store.put_function("g1", "g", &g).unwrap();
        store.append_routes(&[change(1)], 0, 0).unwrap();
        store.rollback();
        let (mut functions, contents) = (0, store.load().unwrap());
        store.functions(|_, _, _| functions += 1).unwrap();
        assert_eq!((functions, contents.recent.len()), (0, 0), "the log entry went with the function");
        store.begin().unwrap();
        store.put_function("g1", "g", &g).unwrap();
        store.append_routes(&[change(1)], 0, 0).unwrap();
        store.commit().unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let (mut functions, contents) = (0, store.load().unwrap());
        store.functions(|_, _, _| functions += 1).unwrap();
        assert_eq!((functions, contents.recent.len()), (1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

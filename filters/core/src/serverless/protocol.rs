//! The management service's documents (docs/serverless-control.md, "The route watch"):
//!
//! - a page of the whole table, `{"version": N, "routes": [...], "next": "<token>"}` (`next`
//!   absent on the last page; a service that does not page sends one page);
//! - a watch answer, `{"version": N, "changes": [{"put": <route>}, {"delete": {"match": {...}}}]}`.
//!
//! Both are read whole and checked before anything is applied: a document that does not read
//! changes nothing.

use std::collections::BTreeMap;

use super::table::Batch;
use super::{record_of, route_key, HostDecoder, RouteSpec};
use crate::generic::config::ConfigError;
use crate::generic::json::{Field, FromJson, Reader};

/// A page read: its version and the token of the next one.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub version: u64,
    pub next: Option<String>,
    pub routes: usize,
}

/// Reads a page into `batch` (emptied first), sorted by bucket. A key twice in one page is
/// refused.
pub fn read_page(decoder: &HostDecoder, doc: &[u8], batch: &mut Batch) -> Result<Page, ConfigError> {
    batch.clear();
    let (mut version, mut next, mut routes) = (None, None, false);
    let mut r = Reader::new(doc);
    r.object(&Field::Root, |r, key| {
        let at = Field::Root.key(&key);
        match &*key {
            "version" => version = Some(r.u64(&at)?),
            "next" => next = r.opt_string(&at)?,
            "routes" => {
                r.array(&at, |r, i| {
                    let at = at.index(i);
                    let spec = <RouteSpec as FromJson>::from_json(r, &at)?;
                    let key = route_key(decoder, &spec, &at)?;
                    batch.push(&key, &spec.cluster, &spec.host).map_err(|e| ConfigError::field(at.to_string(), e))?;
                    Ok::<_, ConfigError>(())
                })?;
                routes = true;
            }
            other => return Err(Field::Root.unknown(other, &["version", "routes", "next"]).into()),
        }
        Ok::<_, ConfigError>(())
    })?;
    r.end()?;
    let version = version.ok_or_else(|| Field::Root.key("version").missing())?;
    if !routes {
        return Err(Field::Root.key("routes").missing().into());
    }
    if next.as_deref() == Some("") {
        return Err(ConfigError::field("next", "is empty"));
    }
    if let Err(i) = batch.sort() {
        return Err(ConfigError::field(format!("routes[{i}].match"), "duplicates an earlier route"));
    }
    Ok(Page { version, next, routes: batch.len() })
}

/// One change of a watch answer: the route of `key` put (its record) or deleted.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub record: Option<Vec<u8>>,
}

/// A watch answer read, or one line of a streamed watch (which carries its cursor).
#[derive(Debug, PartialEq, Eq)]
pub struct Changes {
    pub version: u64,
    pub cursor: Option<String>,
    pub changes: Vec<Change>,
}

/// Reads a watch answer, or a line of a streamed watch.
pub fn read_changes(decoder: &HostDecoder, doc: &[u8]) -> Result<Changes, ConfigError> {
    let (mut version, mut cursor, mut changes) = (None, None, None);
    let mut r = Reader::new(doc);
    r.object(&Field::Root, |r, key| {
        let at = Field::Root.key(&key);
        match &*key {
            "version" => version = Some(r.u64(&at)?),
            "cursor" => cursor = Some(r.string(&at)?),
            "changes" => {
                let mut list = Vec::new();
                r.array(&at, |r, i| {
                    let at = at.index(i);
                    let mut change = None;
                    r.object(&at, |r, op| {
                        let at = at.key(&op);
                        if change.is_some() {
                            return Err(at
                                .error("is a second operation; a change is one `put` or one `delete`")
                                .into());
                        }
                        change = Some(match &*op {
                            "put" => {
                                let (key, record) = record_of(decoder, &RouteSpec::from_json(r, &at)?, &at)?;
                                Change { key, record: Some(record) }
                            }
                            "delete" => {
                                let key = match read_match(r, &at)? {
                                    Deleted::Match(matches) => decoder
                                        .key_of(&matches)
                                        .map_err(|e| ConfigError::field(format!("{at}.match"), e))?,
                                    Deleted::Domain(domain) => decoder
                                        .custom_domain_key(&domain)
                                        .map_err(|e| ConfigError::field(format!("{at}.domain"), e))?,
                                };
                                Change { key, record: None }
                            }
                            other => return Err(at.unknown(other, &["put", "delete"]).into()),
                        });
                        Ok::<_, ConfigError>(())
                    })?;
                    list.push(change.ok_or_else(|| at.error("is empty; a change is one `put` or one `delete`"))?);
                    Ok::<_, ConfigError>(())
                })?;
                changes = Some(list);
            }
            other => return Err(Field::Root.unknown(other, &["version", "cursor", "changes"]).into()),
        }
        Ok::<_, ConfigError>(())
    })?;
    r.end()?;
    let version = version.ok_or_else(|| Field::Root.key("version").missing())?;
    let changes = changes.ok_or_else(|| Field::Root.key("changes").missing())?;
    Ok(Changes { version, cursor, changes })
}

/// What a delete names.
enum Deleted {
    Match(BTreeMap<String, String>),
    Domain(String),
}

/// `{"match": {...}}` or `{"domain": "..."}`, the whole of a delete.
fn read_match(r: &mut Reader, at: &Field) -> Result<Deleted, ConfigError> {
    let mut deleted = None;
    r.object(at, |r, key| {
        let at = at.key(&key);
        if deleted.is_some() {
            return Err(at.error("is a second route; a delete names one `match` or one `domain`").into());
        }
        match &*key {
            "domain" => deleted = Some(Deleted::Domain(r.string(&at)?)),
            "match" => {
                let mut m = BTreeMap::new();
                r.object(&at, |r, group| {
                    let value = r.string(&at.key(&group))?;
                    m.insert(group.into_owned(), value);
                    Ok::<_, ConfigError>(())
                })?;
                deleted = Some(Deleted::Match(m));
            }
            other => return Err(at.unknown(other, &["match", "domain"]).into()),
        }
        Ok::<_, ConfigError>(())
    })?;
    Ok(deleted.ok_or_else(|| at.key("match").missing())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serverless::table::{find, LocalTable, RouteRef, MANAGED_BITS};

    fn decoder() -> HostDecoder {
        HostDecoder::new("serverless.example", crate::serverless::DEFAULT_PATTERN).unwrap()
    }

    const A: &str = r#"{"match":{"project":"0000000A","environment":"0000000b","function":"000000000c"},"cluster":"ca","host":"a.example"}"#;
    const A_MATCH: &str = r#"{"match":{"project":"0000000a","environment":"0000000b","function":"000000000C"}}"#;

    #[test]
    fn pages_hand_over_every_route_and_their_next_token() {
        let d = decoder();
        let mut batch = Batch::default();
        let doc = format!(r#"{{"version":9,"routes":[{A}],"next":"6b31"}}"#);
        let page = read_page(&d, doc.as_bytes(), &mut batch).unwrap();
        assert_eq!(page, Page { version: 9, next: Some("6b31".into()), routes: 1 });
        let mut table = LocalTable::new(MANAGED_BITS);
        table.put_batch(&batch);
        let key = [0, 0, 0, 0x0a, 0, 0, 0, 0x0b, 0, 0, 0, 0, 0x0c];
        assert_eq!(table.get(&key), Some(RouteRef { cluster: "ca", host: "a.example" }));
        let last = read_page(&d, br#"{"routes":[],"version":3,"next":null}"#, &mut batch).unwrap();
        assert_eq!((last, batch.len()), (Page { version: 3, next: None, routes: 0 }, 0), "the batch is emptied");
    }

    #[test]
    fn watch_answers_read_puts_and_deletes_in_order() {
        let d = decoder();
        let doc = format!(r#"{{"version":12,"changes":[{{"put":{A}}},{{"delete":{A_MATCH}}}]}}"#);
        let changes = read_changes(&d, doc.as_bytes()).unwrap();
        assert_eq!((changes.version, changes.cursor.as_deref()), (12, None));
        let [put, delete] = &changes.changes[..] else { panic!("{changes:?}") };
        assert_eq!(put.key, delete.key, "a match names the same route whatever its case");
        assert!(put.record.is_some() && delete.record.is_none());
        // A line of a streamed watch names its cursor.
        let line = read_changes(&d, br#"{"version":13,"cursor":"ab.13","changes":[]}"#).unwrap();
        assert_eq!((line.version, line.cursor.as_deref(), line.changes.len()), (13, Some("ab.13"), 0));
    }

    #[test]
    fn custom_domains_are_put_and_deleted_by_name() {
        let d = decoder();
        let doc = r#"{"version":3,"changes":[{"put":{"domain":"App.Example.com","cluster":"ca","host":"a.example"}},{"delete":{"domain":"app.example.com."}}]}"#;
        let changes = read_changes(&d, doc.as_bytes()).unwrap();
        let [put, delete] = &changes.changes[..] else { panic!("{changes:?}") };
        assert_eq!(put.key, delete.key);
        assert_eq!(find(put.record.as_deref().unwrap(), &put.key), Some(RouteRef { cluster: "ca", host: "a.example" }));
        for (doc, want) in [
            (r#"{"version":1,"changes":[{"delete":{"domain":"a.com","match":{}}}]}"#, "second route"),
            (r#"{"version":1,"changes":[{"delete":{"domain":"x.serverless.example"}}]}"#, "`changes[0].delete.domain`"),
            (r#"{"version":1,"changes":[{"delete":{"domain":7}}]}"#, "`changes[0].delete.domain`"),
        ] {
            let got = read_changes(&d, doc.as_bytes()).unwrap_err().to_string();
            assert!(got.contains(want), "{doc}: {got}");
        }
    }

    #[test]
    fn documents_that_do_not_read_are_refused_naming_what_is_wrong() {
        let d = decoder();
        let page = |doc: &str| read_page(&d, doc.as_bytes(), &mut Batch::default()).unwrap_err().to_string();
        let changes = |doc: &str| read_changes(&d, doc.as_bytes()).unwrap_err().to_string();
        for (got, want) in [
            (page("{}"), "`version` is required"),
            (page(r#"{"version":1}"#), "`routes` is required"),
            (page(&format!(r#"{{"version":1,"routes":[{A},{A}]}}"#)), "`routes[1].match` duplicates"),
            (page(r#"{"version":1,"routes":[],"next":""}"#), "`next` is empty"),
            (page(r#"{"version":1,"routes":[],"more":1}"#), "unknown field `more`"),
            (page(&format!(r#"{{"version":1,"routes":[{A}]"#)), "JSON"),
            (changes(r#"{"version":1}"#), "`changes` is required"),
            (changes(r#"{"version":1,"changes":[{}]}"#), "`changes[0]` is empty"),
            (changes(&format!(r#"{{"version":1,"changes":[{{"put":{A},"delete":{A_MATCH}}}]}}"#)), "second operation"),
            (changes(r#"{"version":1,"changes":[{"move":{}}]}"#), "unknown field `move`"),
            (changes(r#"{"version":1,"changes":[{"delete":{}}]}"#), "`changes[0].delete.match` is required"),
            (
                changes(r#"{"version":1,"changes":[{"delete":{"match":{"project":"x"}}}]}"#),
                "`changes[0].delete.match` must name exactly",
            ),
            (
                changes(
                    r#"{"version":1,"changes":[{"delete":{"match":{"project":"0000000g","environment":"0000000b","function":"000000000c"}}}]}"#,
                ),
                "hex digits",
            ),
            (changes(r#"{"version":-1,"changes":[]}"#), "`version` must be a non-negative integer"),
            (changes(r#"{"version":1,"cursor":7,"changes":[]}"#), "`cursor`"),
        ] {
            assert!(got.contains(want), "got {got:?}, want {want:?}");
        }
        assert!(read_changes(&d, b"\xff\xfe").is_err());
    }
}

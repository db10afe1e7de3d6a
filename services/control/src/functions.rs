//! The functions as the service holds them in memory, sized for a million: each function once,
//! in a slot of one allocation (its name, its match values as given, its Host) and its
//! customer's interned name, found through ordered indexes of 64-bit hashes and slot numbers (by
//! name, and by route key). The route-key index is also the route table's page order: the
//! filter's own hash of the key (`table::key_hash`), so that pages come bucket by bucket and a
//! full load writes each bucket of the filter's table once. A page token is the hash of the last
//! key sent, the same in every replica and after a restart. Both indexes use that fixed hash: the
//! REST API that adds functions is authenticated, so chosen collisions cost only the caller's own
//! lookups.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use edgewise_core::serverless::{table, HostDecoder};

use crate::model::Function;
use crate::routes::Edit;

/// A function in memory: `text` is its name, its match values (in the pattern's group order,
/// joined by '/') and its Host, one after the other.
struct Slot {
    text: Box<str>,
    customer: Arc<str>,
    name_len: u16,
    values_len: u16,
}

impl Slot {
    fn name(&self) -> &str {
        self.text.get(..usize::from(self.name_len)).unwrap_or_default()
    }

    fn values(&self) -> &str {
        let start = usize::from(self.name_len);
        self.text.get(start..start + usize::from(self.values_len)).unwrap_or_default()
    }

    fn host(&self) -> &str {
        self.text.get(usize::from(self.name_len) + usize::from(self.values_len)..).unwrap_or_default()
    }
}

/// `s` as a JSON string, as serde_json writes it.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

pub struct Functions {
    /// The filter's host decoder: the pattern's groups and its route keys.
    decoder: Arc<HostDecoder>,
    /// The pattern's group names, in order.
    groups: Vec<String>,
    /// The groups' indexes in the order of their names (the order of a route's `match`).
    sorted_groups: Vec<usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    by_name: BTreeSet<(u64, u32)>,
    by_key: BTreeSet<(u64, u32)>,
    /// customer -> its functions' slots; its keys are the interned customer names.
    by_customer: HashMap<Arc<str>, Vec<u32>>,
}

impl Functions {
    pub fn new(decoder: Arc<HostDecoder>) -> Functions {
        let groups = decoder.groups().to_vec();
        Functions {
            decoder,
            sorted_groups: {
                let mut order: Vec<usize> = (0..groups.len()).collect();
                order.sort_by_key(|&i| groups.get(i));
                order
            },
            groups,
            slots: Vec::new(),
            free: Vec::new(),
            by_name: BTreeSet::new(),
            by_key: BTreeSet::new(),
            by_customer: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The place in the page order of the route of match values (joined by '/', any case): the
    /// filter's hash of its route key.
    fn key_hash(&self, values: &str) -> u64 {
        match self.decoder.key_of_values(values) {
            Some(key) => table::key_hash(&key),
            // Not a key the filter takes (checked functions always are): any fixed place.
            None => table::key_hash(values.to_ascii_lowercase().as_bytes()),
        }
    }

    fn slot(&self, index: u32) -> Option<&Slot> {
        self.slots.get(index as usize).and_then(Option::as_ref)
    }

    fn find(&self, index: &BTreeSet<(u64, u32)>, h: u64, matches: impl Fn(&Slot) -> bool) -> Option<u32> {
        index.range((h, 0)..=(h, u32::MAX)).map(|&(_, i)| i).find(|&i| self.slot(i).is_some_and(&matches))
    }

    fn by_name(&self, name: &str) -> Option<u32> {
        self.find(&self.by_name, table::key_hash(name.as_bytes()), |s| s.name() == name)
    }

    fn function(&self, slot: &Slot) -> Function {
        let values = slot.values().split('/');
        Function {
            matches: self.groups.iter().cloned().zip(values.map(str::to_string)).collect(),
            customer: slot.customer.to_string(),
            host: slot.host().to_string(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name(name).is_some()
    }

    pub fn get(&self, name: &str) -> Option<Function> {
        self.by_name(name).and_then(|i| self.slot(i)).map(|s| self.function(s))
    }

    /// The function whose route key is `key`.
    pub fn owner_of(&self, key: &str) -> Option<&str> {
        let found = self.find(&self.by_key, self.key_hash(key), |s| s.values().eq_ignore_ascii_case(key));
        found.and_then(|i| self.slot(i)).map(Slot::name)
    }

    /// Adds or replaces `name`; the function it replaces, and its route key. `f` has been checked (`FunctionRules`):
    /// its match names the pattern's groups, and its values hold no '/'.
    pub fn put(&mut self, name: &str, f: &Function) -> Option<(String, Function)> {
        let old = self.remove(name);
        let values: Vec<&str> = self.groups.iter().map(|g| f.matches.get(g).map_or("", String::as_str)).collect();
        let values = values.join("/");
        let customer = match self.by_customer.get_key_value(f.customer.as_str()) {
            Some((interned, _)) => interned.clone(),
            None => Arc::from(f.customer.as_str()),
        };
        let slot = Slot {
            text: [name, &values, &f.host].concat().into_boxed_str(),
            customer: customer.clone(),
            name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
            values_len: u16::try_from(values.len()).unwrap_or(u16::MAX),
        };
        let index = match self.free.pop().and_then(|i| Some((i, self.slots.get_mut(i as usize)?))) {
            Some((i, free)) => {
                *free = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.by_name.insert((table::key_hash(name.as_bytes()), index));
        self.by_key.insert((self.key_hash(&values), index));
        self.by_customer.entry(customer).or_default().push(index);
        old
    }

    /// Removes `name`: its route key and the function.
    pub fn remove(&mut self, name: &str) -> Option<(String, Function)> {
        let index = self.by_name(name)?;
        let slot = self.slots.get_mut(index as usize)?.take()?;
        self.free.push(index);
        self.by_name.remove(&(table::key_hash(name.as_bytes()), index));
        self.by_key.remove(&(self.key_hash(slot.values()), index));
        if let Some(list) = self.by_customer.get_mut(&slot.customer) {
            list.retain(|&i| i != index);
            if list.is_empty() {
                self.by_customer.remove(&slot.customer);
            }
        }
        Some((slot.values().to_ascii_lowercase(), self.function(&slot)))
    }

    /// A customer's functions: (name, route key, function).
    pub fn of_customer(&self, customer: &str) -> Vec<(String, String, Function)> {
        let slots = self.by_customer.get(customer).map_or(&[][..], Vec::as_slice);
        slots
            .iter()
            .filter_map(|&i| self.slot(i))
            .map(|s| (s.name().to_string(), s.values().to_ascii_lowercase(), self.function(s)))
            .collect()
    }

    /// How many functions `customer` has.
    pub fn count_of(&self, customer: &str) -> usize {
        self.by_customer.get(customer).map_or(0, Vec::len)
    }

    /// Every function, (name, function), in no particular order.
    pub fn all(&self) -> impl Iterator<Item = (&str, Function)> + '_ {
        self.slots.iter().flatten().map(|s| (s.name(), self.function(s)))
    }

    /// The edits that make a logged table (route key -> route JSON, each key once) the routes
    /// of the functions of customers `visible` lets through.
    pub fn reconcile(
        &self,
        logged: impl FnOnce(&mut dyn FnMut(String, String)) -> Result<(), String>,
        visible: impl Fn(&str) -> bool,
    ) -> Result<Vec<Edit>, String> {
        let mut edits = Vec::new();
        let mut logged_slots = vec![false; self.slots.len()];
        logged(&mut |key, json| {
            let found = self.find(&self.by_key, self.key_hash(&key), |s| s.values().eq_ignore_ascii_case(&key));
            match found.and_then(|i| Some((i, self.slot(i)?))).filter(|(_, s)| visible(&s.customer)) {
                Some((i, slot)) => {
                    if let Some(seen) = logged_slots.get_mut(i as usize) {
                        *seen = true;
                    }
                    let route = self.route_json(slot);
                    if route != json {
                        edits.push(Edit { key, put: true, json: route });
                    }
                }
                // The match is in the route JSON: the delete names it alone.
                None => {
                    let matches = serde_json::from_str::<serde_json::Value>(&json)
                        .ok()
                        .and_then(|v| v.get("match").map(|m| serde_json::json!({ "match": m }).to_string()))
                        .unwrap_or_default();
                    edits.push(Edit { key, put: false, json: matches });
                }
            }
        })?;
        for (slot, seen) in self.slots.iter().zip(logged_slots) {
            if let Some(slot) = slot.as_ref().filter(|s| visible(&s.customer) && !seen) {
                edits.push(Edit { key: slot.values().to_ascii_lowercase(), put: true, json: self.route_json(slot) });
            }
        }
        Ok(edits)
    }

    /// One route as the filter reads it: `{"match": {...}, "cluster": "...", "host": "..."}`.
    fn route_json(&self, slot: &Slot) -> String {
        let mut out = String::new();
        self.write_route(slot, &mut out);
        out
    }

    /// `routes::route_json` of the slot's function, byte for byte (the match's names in sorted
    /// order, strings escaped as serde_json does), written straight from the slot: a page of
    /// the table is built without making its functions.
    fn write_route(&self, slot: &Slot, out: &mut String) {
        out.push_str("{\"match\":{");
        for (n, &g) in self.sorted_groups.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            push_json_str(out, self.groups.get(g).map_or("", String::as_str));
            out.push(':');
            push_json_str(out, slot.values().split('/').nth(g).unwrap_or_default());
        }
        out.push_str("},\"cluster\":");
        push_json_str(out, &slot.customer);
        out.push_str(",\"host\":");
        push_json_str(out, slot.host());
        out.push('}');
    }

    /// At most `limit` routes (of customers `visible` lets through) after the page token
    /// `after`, in token order, appended to `out` with commas between; the token of the last
    /// one when more follow. Routes sharing the last one's hash go in the same page, so that a
    /// token is a position no route straddles.
    pub fn page(
        &self,
        after: Option<u64>,
        limit: usize,
        visible: impl Fn(&str) -> bool,
        out: &mut String,
    ) -> Option<u64> {
        let start = match after {
            None => std::ops::Bound::Unbounded,
            Some(h) => std::ops::Bound::Excluded((h, u32::MAX)),
        };
        let mut sent = 0;
        let mut last = None;
        for &(h, i) in self.by_key.range((start, std::ops::Bound::Unbounded)) {
            let Some(slot) = self.slot(i).filter(|s| visible(&s.customer)) else { continue };
            if sent >= limit && last != Some(h) {
                return last;
            }
            if sent > 0 {
                out.push(',');
            }
            self.write_route(slot, out);
            (sent, last) = (sent + 1, Some(h));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A layout of two groups, `<project>-<function>`, whose route keys are the values.
    fn decoder() -> Arc<HostDecoder> {
        Arc::new(
            HostDecoder::new("serverless.example", "(?P<project>[0-9a-f]{8})-(?P<function>[0-9a-z]{1,10})").unwrap(),
        )
    }

    fn f(project: &str, function: &str, customer: &str) -> Function {
        Function {
            matches: BTreeMap::from([("project".into(), project.into()), ("function".into(), function.into())]),
            customer: customer.into(),
            host: format!("{function}.{customer}.example"),
        }
    }

    #[test]
    fn put_get_replace_remove_and_the_indexes_agree() {
        let mut fns = Functions::new(decoder());
        assert_eq!(fns.put("one", &f("0000000A", "b1", "c1")), None);
        assert_eq!(fns.put("two", &f("0000000a", "b2", "c1")), None);
        assert_eq!(fns.get("one"), Some(f("0000000A", "b1", "c1")), "the values as given");
        assert_eq!(fns.owner_of("0000000a/b1"), Some("one"), "found by the lowercased key");
        assert_eq!(fns.owner_of("0000000A/B1"), Some("one"));
        assert_eq!((fns.len(), fns.count_of("c1"), fns.count_of("c2")), (2, 2, 0));
        assert_eq!(fns.put("one", &f("0000000a", "b3", "c2")), Some(("0000000a/b1".into(), f("0000000A", "b1", "c1"))));
        assert_eq!((fns.owner_of("0000000a/b1"), fns.owner_of("0000000a/b3")), (None, Some("one")));
        assert_eq!((fns.len(), fns.count_of("c1"), fns.count_of("c2")), (2, 1, 1));
        let (key, gone) = fns.remove("two").unwrap();
        assert_eq!((key.as_str(), gone), ("0000000a/b2", f("0000000a", "b2", "c1")));
        assert_eq!((fns.get("two"), fns.remove("two").map(|r| r.0), fns.count_of("c1")), (None, None, 0));
        fns.put("three", &f("p", "q", "c2"));
        assert_eq!(fns.slots.len(), 2, "a freed slot is used again");
        let mut of = fns.of_customer("c2");
        of.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            of.iter().map(|(n, k, _)| (n.as_str(), k.as_str())).collect::<Vec<_>>(),
            [("one", "0000000a/b3"), ("three", "p/q")]
        );
    }

    #[test]
    fn pages_cover_the_visible_routes_once_and_a_token_is_a_position() {
        let mut fns = Functions::new(decoder());
        for i in 0..250 {
            fns.put(&format!("f{i}"), &f(&format!("{i:08x}"), "x", if i % 5 == 0 { "hidden" } else { "shown" }));
        }
        let visible = |c: &str| c == "shown";
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let mut out = String::new();
            let next = fns.page(after, 30, visible, &mut out);
            let routes: Vec<serde_json::Value> = serde_json::from_str(&format!("[{out}]")).unwrap();
            assert!(routes.len() <= 30 || next.is_none());
            seen.extend(routes.iter().map(|r| r["match"]["project"].as_str().unwrap().to_string()));
            pages += 1;
            match next {
                Some(token) => after = Some(token),
                None => break,
            }
        }
        assert_eq!((pages, seen.len()), (7, 200));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 200, "each route once");
        // A token from before a change still marks the same position: the new route is after
        // it exactly when its hash is.
        let mut first = String::new();
        let token = fns.page(None, 10, visible, &mut first).unwrap();
        for (name, project) in [("new", "ffffffff"), ("newer", "eeeeeeee")] {
            fns.put(name, &f(project, "y", "shown"));
            let mut rest = String::new();
            fns.page(Some(token), 1000, visible, &mut rest);
            let after = fns.key_hash(&format!("{project}/y")) > token;
            assert_eq!(rest.contains(project), after, "{project}");
            let routes: Vec<serde_json::Value> = serde_json::from_str(&format!("[{first},{rest}]")).unwrap();
            let news = usize::from(rest.contains("ffffffff")) + usize::from(rest.contains("eeeeeeee"));
            assert_eq!(routes.len(), 200 + news);
        }
    }

    #[test]
    fn pages_come_in_the_filters_bucket_order() {
        let layout =
            Arc::new(HostDecoder::new("serverless.example", edgewise_core::serverless::DEFAULT_PATTERN).unwrap());
        let mut fns = Functions::new(layout.clone());
        for i in 0..3000u32 {
            let f = Function {
                matches: BTreeMap::from([
                    ("project".into(), format!("{:08X}", i * 7)),
                    ("environment".into(), format!("{i:08x}")),
                    ("function".into(), format!("{:010x}", i * 13)),
                ]),
                customer: "c".into(),
                host: format!("f{i}.example"),
            };
            fns.put(&format!("f{i}"), &f);
        }
        let (mut buckets, mut after) = (Vec::new(), None);
        loop {
            let mut out = String::new();
            let next = fns.page(after, 700, |_| true, &mut out);
            let routes: Vec<crate::model::Function> =
                serde_json::from_str::<Vec<serde_json::Value>>(&format!("[{out}]"))
                    .unwrap()
                    .into_iter()
                    .map(|r| Function {
                        matches: serde_json::from_value(r["match"].clone()).unwrap(),
                        customer: String::new(),
                        host: String::new(),
                    })
                    .collect();
            for r in routes {
                let key = layout.key_of(&r.matches).unwrap();
                buckets.push(table::bucket_of(&key, table::MANAGED_BITS));
            }
            match next {
                Some(token) => after = Some(token),
                None => break,
            }
        }
        assert_eq!(buckets.len(), 3000);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "pages in bucket order, across pages too");
    }

    #[test]
    fn a_route_is_written_as_serde_json_writes_it() {
        let layout = HostDecoder::new("serverless.example", edgewise_core::serverless::DEFAULT_PATTERN).unwrap();
        let mut fns = Functions::new(Arc::new(layout));
        for (i, host) in ["h.example", "quote\".example", "back\\slash", "tab\t\u{1}", "ünïcode/é"].iter().enumerate()
        {
            let f = Function {
                matches: BTreeMap::from([
                    ("project".into(), format!("{i:08X}")),
                    ("environment".into(), "0000000b".into()),
                    ("function".into(), "000000000c".into()),
                ]),
                customer: "customer-a".into(),
                host: host.to_string(),
            };
            fns.put(&format!("f{i}"), &f);
            let index = fns.by_name(&format!("f{i}")).unwrap();
            let slot = fns.slot(index).unwrap();
            assert_eq!(fns.route_json(slot), crate::routes::route_json(&f), "{host:?}");
        }
    }

    #[test]
    fn reconciling_a_logged_table_puts_what_differs_or_is_missing_and_deletes_the_rest() {
        let mut fns = Functions::new(decoder());
        fns.put("same", &f("00000001", "a", "c1"));
        fns.put("changed", &f("00000002", "a", "c1"));
        fns.put("missing", &f("00000003", "a", "c1"));
        fns.put("hidden", &f("00000004", "a", "c2"));
        let same = crate::routes::route_json(&f("00000001", "a", "c1"));
        let logged = vec![
            ("00000001/a".to_string(), same),
            ("00000002/a".to_string(), crate::routes::route_json(&f("00000002", "a", "c9"))),
            ("00000005/a".to_string(), crate::routes::route_json(&f("00000005", "a", "c1"))),
        ];
        let edits = fns
            .reconcile(
                |each| {
                    logged.into_iter().for_each(|(k, j)| each(k, j));
                    Ok(())
                },
                |c| c == "c1",
            )
            .unwrap();
        let got: Vec<(String, bool, String)> = edits.into_iter().map(|e| (e.key, e.put, e.json)).collect();
        assert_eq!(
            got,
            [
                ("00000002/a".into(), true, crate::routes::route_json(&f("00000002", "a", "c1"))),
                ("00000005/a".into(), false, r#"{"match":{"function":"a","project":"00000005"}}"#.into()),
                ("00000003/a".into(), true, crate::routes::route_json(&f("00000003", "a", "c1"))),
            ]
        );
    }
}

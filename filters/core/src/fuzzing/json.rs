//! `crate::generic::json` against serde_json: the same documents accepted and refused, the same values.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value as Serde};

use super::shown;
use crate::generic::json::{Field, Reader, Value};

/// How deep `crate::generic::json` lets values nest: a value at this depth is refused.
const MAX_DEPTH: u32 = 32;

/// `Reader::value` then `Reader::end` against serde_json. The differences are exactly the
/// documented ones: the reader refuses a key seen twice in an object (serde_json keeps the last)
/// and a value nested 32 deep (serde_json allows 128), which `strict` adds to serde_json; and it
/// keeps a number beyond f64's range as written, where serde_json refuses the document.
pub fn json_differential(doc: &[u8]) {
    let mut r = Reader::new(doc);
    let ours = r.value(&Field::Root).and_then(|v| r.end().map(|()| v));
    match (ours, strict(doc)) {
        (Ok(ours), Ok(theirs)) => {
            assert_eq!(to_serde(&ours), theirs, "{}: read differently", shown(doc));
            check_numbers(&ours);
        }
        (Err(_), Err(_)) => {}
        (Ok(ours), Err(e)) if out_of_range(&e) => {
            let mut numbers = Vec::new();
            collect_numbers(&ours, &mut numbers);
            assert!(
                numbers.iter().any(|n| serde_json::from_str::<f64>(n).is_err()),
                "{}: serde_json says {e}, but every number is within f64's range",
                shown(doc)
            );
            check_numbers(&ours);
        }
        (ours, theirs) => panic!("{}: crate::generic::json reads {ours:?}, serde_json (strict) {theirs:?}", shown(doc)),
    }
}

/// serde_json's error for a number beyond f64's range (the one documented difference `strict`
/// does not remove).
pub(super) fn out_of_range(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("number out of range")
}

/// serde_json's reading of a document, with the two rules `crate::generic::json` adds: no key twice in an
/// object (compared unescaped) and no value nested `MAX_DEPTH` deep.
pub(super) fn strict(doc: &[u8]) -> Result<Serde, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(doc);
    let value = Strict(0).deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A value at this depth.
struct Strict(u32);

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Serde;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Serde, D::Error> {
        if self.0 >= MAX_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Serde;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Serde, E> {
        Ok(Serde::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Serde, E> {
        Ok(b.into())
    }

    fn visit_u64<E>(self, n: u64) -> Result<Serde, E> {
        Ok(n.into())
    }

    fn visit_i64<E>(self, n: i64) -> Result<Serde, E> {
        Ok(n.into())
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Serde, E> {
        serde_json::Number::from_f64(n).map(Serde::Number).ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, s: &str) -> Result<Serde, E> {
        Ok(s.into())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Serde, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Strict(self.0 + 1))? {
            items.push(item);
        }
        Ok(Serde::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Serde, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(Strict(self.0 + 1))?;
            object.insert(key, value);
        }
        Ok(Serde::Object(object))
    }
}

/// The value as serde_json would have it (a number read by serde_json from its text).
pub(super) fn to_serde(v: &Value) -> Serde {
    match v {
        Value::Null => Serde::Null,
        Value::Bool(b) => Serde::Bool(*b),
        Value::Number(n) => serde_json::from_str(n).unwrap_or_else(|e| panic!("number {n:?}: serde_json says {e}")),
        Value::String(s) => Serde::String(s.clone()),
        Value::Array(items) => items.iter().map(to_serde).collect(),
        Value::Object(o) => o.0.iter().map(|(k, v)| (k.clone(), to_serde(v))).collect(),
    }
}

fn collect_numbers<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::Number(n) => out.push(n),
        Value::Array(items) => items.iter().for_each(|v| collect_numbers(v, out)),
        Value::Object(o) => o.0.iter().for_each(|(_, v)| collect_numbers(v, out)),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

/// Every number's `as_u64` is serde_json's u64, and its `as_f64`: none for a number beyond f64's
/// range (a claim like `"exp":1e400` must not read as "never expires"), otherwise, when it reads
/// one, serde_json's f64 to the precision the method promises.
fn check_numbers(v: &Value) {
    let mut numbers = Vec::new();
    collect_numbers(v, &mut numbers);
    for n in numbers {
        let number = Value::Number(n.to_owned());
        assert_eq!(number.as_u64(), serde_json::from_str::<u64>(n).ok(), "{n}: as_u64");
        match (number.as_f64(), serde_json::from_str::<f64>(n)) {
            (None, _) => {}
            (Some(ours), Ok(theirs)) => {
                assert!(
                    (ours - theirs).abs() <= 1e-9 * theirs.abs().max(1.0),
                    "{n}: as_f64 is {ours}, serde_json {theirs}"
                )
            }
            (Some(ours), Err(e)) => panic!("{n}: as_f64 is {ours}, serde_json says {e}"),
        }
    }
}

//! A small pull reader for the JSON the filters parse (plugin configurations, polled route tables,
//! JWKS and OpenID documents, JWT headers and claims), and the string encoder replies need.
//!
//! Not serde_json: V8 compiles every function of a module when Envoy loads it, once per VM, so
//! code size is start-up time and memory (docs/design.md has the measurements). The reader walks a
//! document once, borrows strings that hold no escapes, builds only what it is asked for (a large
//! route table is compiled route by route), and names the field in its errors.
//!
//! Configuration types are declared once, with serde attributes (their JSON Schema comes from
//! them), and `#[derive(FromJson)]` generates their reader from the same attributes. Readers are
//! `#[inline(never)]`: one large function costs V8 more memory than the same code in several.

use std::borrow::Cow;
use std::fmt;

use crate::generic::config::ConfigError;

pub use edgewise_json_derive::FromJson;

/// What is wrong with a document, naming the field when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "`{field}` {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for ConfigError {
    fn from(e: Error) -> Self {
        match e.field {
            Some(field) => ConfigError::Field { field, reason: e.reason },
            None => ConfigError::Json(e.reason),
        }
    }
}

fn error(reason: String) -> Error {
    Error { field: None, reason }
}

/// Where a value sits in the document, for error messages (`routes[3].match`): a path of
/// borrowed links, so that naming fields costs nothing until an error is written.
#[derive(Clone, Copy)]
pub enum Field<'p> {
    Root,
    Key(&'p Field<'p>, &'p str),
    Index(&'p Field<'p>, usize),
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Field::Root => Ok(()),
            Field::Key(Field::Root, key) => f.write_str(key),
            Field::Key(parent, key) => write!(f, "{parent}.{key}"),
            Field::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

impl<'p> Field<'p> {
    pub fn key(&'p self, key: &'p str) -> Field<'p> {
        Field::Key(self, key)
    }

    pub fn index(&'p self, i: usize) -> Field<'p> {
        Field::Index(self, i)
    }

    pub fn error(&self, reason: impl Into<String>) -> Error {
        match self {
            Field::Root => error(format!("the document {}", reason.into())),
            _ => Error { field: Some(self.to_string()), reason: reason.into() },
        }
    }

    /// A key the object at this field does not have.
    pub fn unknown(&self, key: &str, known: &[&str]) -> Error {
        self.unknown_field(key, None, known)
    }

    /// A key the object at this field does not have, where `tag` (an internally tagged enum's) is
    /// known too.
    pub fn unknown_field(&self, key: &str, tag: Option<&str>, known: &[&str]) -> Error {
        let mut expected = String::new();
        for name in tag.iter().chain(known) {
            if !expected.is_empty() {
                expected.push_str("`, `");
            }
            expected.push_str(name);
        }
        error(format!("unknown field `{key}`{}, expected one of `{expected}`", self.within()))
    }

    /// This key is missing from its object.
    pub fn missing(&self) -> Error {
        self.error("is required")
    }

    fn within(&self) -> String {
        match self {
            Field::Root => String::new(),
            _ => format!(" in `{self}`"),
        }
    }
}

/// A whole JSON value, for documents whose fields are not known in advance (JWT claims).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number as written: passed on verbatim (a numeric rate-limit key), read on demand.
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Object),
}

/// An object's members in document order (keys are unique: the reader refuses duplicates). A
/// token has a dozen claims: a scan finds one faster than a map is built.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object(pub Vec<(String, Value)>);

impl Object {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A non-negative integer written without fraction or exponent.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// Any number, to about 15 significant digits (enough for times; no float parser is linked).
    /// A number beyond f64's range is none: serde_json refuses such a document, and a claim like
    /// `"exp":1e400` must not read as "never expires".
    pub fn as_f64(&self) -> Option<f64> {
        let Value::Number(n) = self else {
            return None;
        };
        let (mantissa, exponent) = n.split_once(['e', 'E']).unwrap_or((n, "0"));
        let (negative, mantissa) = mantissa.strip_prefix('-').map_or((false, mantissa), |m| (true, m));
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = |s: &str| s.bytes().fold(0.0, |acc, d| acc * 10.0 + f64::from(d - b'0'));
        let exponent: i32 = exponent.strip_prefix('+').unwrap_or(exponent).parse().ok()?;
        let frac_len = i32::try_from(frac.len()).ok()?;
        let value = (digits(int) * 10f64.powi(frac_len) + digits(frac)) * 10f64.powi(exponent.saturating_sub(frac_len));
        value.is_finite().then_some(if negative { -value } else { value })
    }
}

#[cfg(test)]
impl Value {
    /// The same value as serde_json's, for tests that compare or index.
    pub fn to_serde(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Number(n) => serde_json::from_str(n).unwrap_or_default(),
            Value::String(s) => s.as_str().into(),
            Value::Array(items) => items.iter().map(Value::to_serde).collect(),
            Value::Object(o) => o.0.iter().map(|(k, v)| (k.clone(), v.to_serde())).collect(),
        }
    }
}

/// How deeply values read whole may nest: they come from clients (token payloads).
const MAX_DEPTH: u32 = 32;

#[derive(Clone)]
pub struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a [u8]) -> Self {
        Reader { src, pos: 0 }
    }

    fn syntax(&self, expected: &str) -> Error {
        error(format!("not valid JSON at byte {}: expected {expected}", self.pos))
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.src.get(self.pos) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        if found {
            self.pos += 1;
        }
        found
    }

    fn literal(&mut self, word: &str) -> bool {
        let found = self.peek().is_some() && self.src.get(self.pos..self.pos + word.len()) == Some(word.as_bytes());
        if found {
            self.pos += word.len();
        }
        found
    }

    /// The value is `null` (consumed): what an optional field reads as absent.
    pub fn null(&mut self) -> bool {
        self.literal("null")
    }

    /// Reads an object, calling `each` with every key in document order and the reader at its
    /// value, which `each` must read. A key seen twice is refused.
    pub fn object<E: From<Error>>(
        &mut self,
        at: &Field,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.object_dyn(at, &mut each)
    }

    // One loop per error type, not one per caller: the callers' closures are called through a
    // pointer (configuration time, or once per token). Never inlined, here and in the readers
    // built on it (see the module's comment).
    #[inline(never)]
    fn object_dyn<E: From<Error>>(
        &mut self,
        at: &Field,
        each: &mut dyn FnMut(&mut Self, Cow<'a, str>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.peek() != Some(b'{') {
            return Err(self.type_error(at, "must be an object").into());
        }
        self.pos += 1;
        if self.eat(b'}') {
            return Ok(());
        }
        // Keys unescaped (`"\u0061"` and `"a"` are the same key): objects are small, a scan
        // beats hashing, and a key without escapes is borrowed, not copied.
        let mut seen: Vec<Cow<'a, str>> = Vec::new();
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.syntax("a string key").into());
            }
            let key = self.string_token().map_err(E::from)?;
            if seen.contains(&key) {
                return Err(error(format!("duplicate field `{key}`{}", at.within())).into());
            }
            seen.push(key.clone());
            if !self.eat(b':') {
                return Err(self.syntax("`:`").into());
            }
            each(self, key)?;
            if self.eat(b',') {
                continue;
            }
            if self.eat(b'}') {
                return Ok(());
            }
            return Err(self.syntax("`,` or `}`").into());
        }
    }

    /// A key a struct does not have: refused, unless it is `tag`, the tag of the enum the struct
    /// is a variant of (a string the enum's reader has checked), which is passed over. For the
    /// derived readers; one function, not code in each of them.
    #[inline(never)]
    pub fn tag_or_unknown(&mut self, at: &Field, key: &str, tag: Option<&str>, known: &[&str]) -> Result<(), Error> {
        if tag == Some(key) {
            return self.str(&at.key(key)).map(drop);
        }
        Err(at.unknown_field(key, tag, known))
    }

    /// Reads an array, calling `each` with the index of every element and the reader at it.
    pub fn array<E: From<Error>>(
        &mut self,
        at: &Field,
        mut each: impl FnMut(&mut Self, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        self.array_dyn(at, &mut each)
    }

    #[inline(never)] // as `object_dyn`
    fn array_dyn<E: From<Error>>(
        &mut self,
        at: &Field,
        each: &mut dyn FnMut(&mut Self, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.peek() != Some(b'[') {
            return Err(self.type_error(at, "must be an array").into());
        }
        self.pos += 1;
        if self.eat(b']') {
            return Ok(());
        }
        let mut i = 0;
        loop {
            each(self, i)?;
            i += 1;
            if self.eat(b',') {
                continue;
            }
            if self.eat(b']') {
                return Ok(());
            }
            return Err(self.syntax("`,` or `]`").into());
        }
    }

    pub fn string(&mut self, at: &Field) -> Result<String, Error> {
        self.str(at).map(Cow::into_owned)
    }

    /// A string, borrowed from the document unless it holds escapes.
    pub fn str(&mut self, at: &Field) -> Result<Cow<'a, str>, Error> {
        if self.peek() != Some(b'"') {
            return Err(self.type_error(at, "must be a string"));
        }
        self.string_token()
    }

    pub fn strings(&mut self, at: &Field) -> Result<Vec<String>, Error> {
        self.list(at, |r, at| r.string(at))
    }

    /// An array whose elements `item` reads, each with its own field (`at[i]`).
    pub fn list<T>(
        &mut self,
        at: &Field,
        mut item: impl FnMut(&mut Self, &Field) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut list = Vec::new();
        self.array(at, |r, i| {
            list.push(item(r, &at.index(i))?);
            Ok::<_, Error>(())
        })?;
        Ok(list)
    }

    /// `null` for none, or what `read` reads: an optional field's value.
    pub fn optional<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<Option<T>, Error> {
        if self.null() {
            return Ok(None);
        }
        read(self).map(Some)
    }

    pub fn opt_string(&mut self, at: &Field) -> Result<Option<String>, Error> {
        self.optional(|r| r.string(at))
    }

    pub fn opt_u64(&mut self, at: &Field) -> Result<Option<u64>, Error> {
        self.optional(|r| r.u64(at))
    }

    /// A non-negative integer that fits `T` (`u32`, `usize`).
    pub fn uint<T: TryFrom<u64>>(&mut self, at: &Field) -> Result<T, Error> {
        T::try_from(self.u64(at)?).map_err(|_| at.error("is too large"))
    }

    pub fn u64(&mut self, at: &Field) -> Result<u64, Error> {
        let start = self.pos;
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.type_error(at, "must be a non-negative integer"));
        }
        let digits_start = self.pos;
        while matches!(self.src.get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        let digits = self.src.get(digits_start..self.pos).unwrap_or_default();
        if matches!(self.src.get(self.pos), Some(b'.' | b'e' | b'E'))
            || (digits.len() > 1 && digits.first() == Some(&b'0'))
        {
            self.pos = start;
            return Err(self.type_error(at, "must be a non-negative integer"));
        }
        digits
            .iter()
            .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| at.error("is too large"))
    }

    /// Any value, read whole.
    pub fn value(&mut self, at: &Field) -> Result<Value, Error> {
        self.value_within(at, 0)
    }

    /// Reads a value and drops it (an unknown member of a document that may have any).
    pub fn skip(&mut self, at: &Field) -> Result<(), Error> {
        self.value(at).map(drop)
    }

    /// A value as written (checked, not built): a document embedded in another.
    pub fn raw(&mut self, at: &Field) -> Result<&'a str, Error> {
        self.peek();
        let start = self.pos;
        self.skip(at)?;
        self.src.get(start..self.pos).and_then(|v| std::str::from_utf8(v).ok()).ok_or_else(|| self.syntax("UTF-8 text"))
    }

    fn value_within(&mut self, at: &Field, depth: u32) -> Result<Value, Error> {
        if depth >= MAX_DEPTH {
            return Err(self.syntax("less nesting"));
        }
        Ok(match self.peek() {
            Some(b'{') => {
                let mut members = Vec::new();
                self.object(at, |r, key| {
                    members.push((key.into_owned(), r.value_within(at, depth + 1)?));
                    Ok::<_, Error>(())
                })?;
                Value::Object(Object(members))
            }
            Some(b'[') => {
                let mut items = Vec::new();
                self.array(at, |r, _| {
                    items.push(r.value_within(at, depth + 1)?);
                    Ok::<_, Error>(())
                })?;
                Value::Array(items)
            }
            Some(b'"') => Value::String(self.string(at)?),
            Some(b'-' | b'0'..=b'9') => Value::Number(self.number()?.to_owned()),
            _ if self.null() => Value::Null,
            _ => Value::Bool(self.bool(at)?),
        })
    }

    /// A number token: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Result<&'a str, Error> {
        let start = self.pos;
        let src = self.src;
        let digits = |pos: &mut usize| {
            let from = *pos;
            while matches!(src.get(*pos), Some(b'0'..=b'9')) {
                *pos += 1;
            }
            *pos - from
        };
        let mut pos = self.pos;
        if src.get(pos) == Some(&b'-') {
            pos += 1;
        }
        let int = digits(&mut pos);
        let mut ok = int == 1 || (int > 1 && src.get(pos - int) != Some(&b'0'));
        if src.get(pos) == Some(&b'.') {
            pos += 1;
            ok &= digits(&mut pos) > 0;
        }
        if matches!(src.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            if matches!(src.get(pos), Some(b'+' | b'-')) {
                pos += 1;
            }
            ok &= digits(&mut pos) > 0;
        }
        if !ok {
            return Err(self.syntax("a number"));
        }
        self.pos = pos;
        src.get(start..pos).and_then(|n| std::str::from_utf8(n).ok()).ok_or_else(|| self.syntax("a number"))
    }

    pub fn bool(&mut self, at: &Field) -> Result<bool, Error> {
        if self.literal("true") {
            Ok(true)
        } else if self.literal("false") {
            Ok(false)
        } else {
            Err(self.type_error(at, "must be true or false"))
        }
    }

    /// The document holds nothing more.
    pub fn end(&mut self) -> Result<(), Error> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.syntax("the end of the document (trailing characters)")),
        }
    }

    /// A value of the wrong type, or no valid value at all.
    fn type_error(&mut self, at: &Field, reason: &str) -> Error {
        let rest = self.src.get(self.pos..).unwrap_or_default();
        let value = match self.peek() {
            Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9') => true,
            Some(_) => [&b"true"[..], b"false", b"null"].iter().any(|w| rest.starts_with(w)),
            None => false,
        };
        if value {
            at.error(reason)
        } else {
            self.syntax("a value")
        }
    }

    /// A string token at `pos` (which is `"`), unescaped.
    fn string_token(&mut self) -> Result<Cow<'a, str>, Error> {
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.src.get(self.pos) {
                None => return Err(self.syntax("the end of a string")),
                Some(b'"') => {
                    let raw = self.src.get(start..self.pos).unwrap_or_default();
                    self.pos += 1;
                    return std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| self.syntax("UTF-8 text"));
                }
                Some(b'\\') => break,
                Some(&b) if b < 0x20 => return Err(self.syntax("an escape for a control character")),
                Some(_) => self.pos += 1,
            }
        }
        let mut bytes = self.src.get(start..self.pos).unwrap_or_default().to_vec();
        loop {
            match self.src.get(self.pos) {
                None => return Err(self.syntax("the end of a string")),
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(bytes).map(Cow::Owned).map_err(|_| self.syntax("UTF-8 text"));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = match self.src.get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape()?,
                        _ => return Err(self.syntax("a valid escape")),
                    };
                    self.pos += 1;
                    bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                Some(&b) if b < 0x20 => return Err(self.syntax("an escape for a control character")),
                Some(&b) => {
                    bytes.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    /// `\uXXXX` (with `pos` at the `u`), and its low surrogate if it is a high one; leaves `pos`
    /// at the last hex digit.
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let hex4 = |r: &Self, at: usize| {
            let s = r.src.get(at..at + 4)?;
            u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok().filter(|_| s.iter().all(u8::is_ascii_hexdigit))
        };
        let high = hex4(self, self.pos + 1).ok_or_else(|| self.syntax("4 hex digits after \\u"))?;
        self.pos += 4;
        if !(0xd800..0xdc00).contains(&high) {
            return char::from_u32(high).ok_or_else(|| self.syntax("a low surrogate to pair with"));
        }
        let low = (self.src.get(self.pos + 1..self.pos + 3) == Some(b"\\u"))
            .then(|| hex4(self, self.pos + 3))
            .flatten()
            .filter(|l| (0xdc00..0xe000).contains(l))
            .ok_or_else(|| self.syntax("a low surrogate after a high one"))?;
        self.pos += 6;
        char::from_u32(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)).ok_or_else(|| self.syntax("a character"))
    }
}

/// Test support: `read` accepts and refuses each document as the serde derive of `T` (the JSON
/// Schema's source) does, and reads the same value.
#[cfg(test)]
pub fn assert_reads_like_serde<T, E>(docs: &[&str], read: impl Fn(&[u8]) -> Result<T, E>)
where
    T: serde::de::DeserializeOwned + fmt::Debug,
    E: fmt::Debug,
{
    for doc in docs {
        let ours = read(doc.as_bytes()).map(|v| format!("{v:?}"));
        let theirs = serde_json::from_str::<T>(doc).map(|v| format!("{v:?}"));
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{doc}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{doc}: the reader says {ours:?}, serde says {theirs:?}"),
        }
    }
}

/// Appends `s` to `out` as a JSON string.
pub fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let hex = |n: u32| char::from_digit(n, 16).unwrap_or('0');
                out.push_str("\\u00");
                out.push(hex(c as u32 >> 4));
                out.push(hex(c as u32 & 0xf));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A value read from JSON at a field. Configuration types derive it (`#[derive(FromJson)]`).
pub trait FromJson: Sized {
    fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error>;
}

/// An object's fields read into a struct; `tag` is a key to pass over (the tag of the enum the
/// struct is a variant of). Derived with `FromJson`.
pub trait FromJsonObject: Sized {
    fn from_object(r: &mut Reader<'_>, at: &Field<'_>, tag: Option<&str>) -> Result<Self, Error>;
}

/// Reads a whole document as `T`: nothing may follow the value.
#[inline(never)]
pub fn parse<T: FromJson>(doc: &[u8]) -> Result<T, Error> {
    let mut r = Reader::new(doc);
    let value = T::from_json(&mut r, &Field::Root)?;
    r.end()?;
    Ok(value)
}

/// Leaf values: each read by the reader's own method.
macro_rules! leaf {
    ($($ty:ty => $read:ident),*) => {$(
        impl FromJson for $ty {
            fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error> {
                r.$read(at)
            }
        }
    )*};
}

leaf!(String => string, bool => bool, u64 => u64, u32 => uint, usize => uint);

impl<T: FromJson> FromJson for Option<T> {
    fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error> {
        r.optional(|r| T::from_json(r, at))
    }
}

impl<T: FromJson> FromJson for Vec<T> {
    fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error> {
        r.list(at, |r, at| T::from_json(r, at))
    }
}

impl<T: FromJson> FromJson for std::collections::BTreeMap<String, T> {
    fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error> {
        let mut map = std::collections::BTreeMap::new();
        r.object(at, |r, key| {
            let value = T::from_json(r, &at.key(&key))?;
            map.insert(key.into_owned(), value);
            Ok::<_, Error>(())
        })?;
        Ok(map)
    }
}

/// A JSON document embedded in another, kept as written (serde, which writes the JSON Schema and
/// is the tests' reference, reads it as a value and writes it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub String);

impl FromJson for Raw {
    fn from_json(r: &mut Reader<'_>, at: &Field<'_>) -> Result<Self, Error> {
        r.raw(at).map(|raw| Raw(raw.to_owned()))
    }
}

impl<'de> serde::Deserialize<'de> for Raw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(|v| Raw(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &Field = &Field::Root;

    /// Reads any document into a serde_json::Value with the typed readers.
    fn value(r: &mut Reader, at: &Field) -> Result<serde_json::Value, Error> {
        use serde_json::Value;
        Ok(match r.peek() {
            Some(b'{') => {
                let mut map = serde_json::Map::new();
                r.object(at, |r, k| {
                    let v = value(r, at)?;
                    map.insert(k.into_owned(), v);
                    Ok(())
                })?;
                Value::Object(map)
            }
            Some(b'[') => {
                let mut list = Vec::new();
                r.array(at, |r, _| {
                    list.push(value(r, at)?);
                    Ok(())
                })?;
                Value::Array(list)
            }
            Some(b'"') => Value::String(r.string(at)?),
            Some(b't' | b'f') => Value::Bool(r.bool(at)?),
            Some(b'n') if r.null() => Value::Null,
            _ => Value::from(r.u64(at)?),
        })
    }

    fn read(doc: &str) -> Result<serde_json::Value, String> {
        let mut r = Reader::new(doc.as_bytes());
        let v = value(&mut r, TOP).map_err(|e| e.to_string())?;
        r.end().map_err(|e| e.to_string())?;
        Ok(v)
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let docs = [
            r#"{"a":[1,2,{"b":"c"}],"d":true,"e":false,"f":null,"g":{}, "h":[]}"#,
            " \t\r\n{ \"k\" : \"v\" } \n",
            r#""esc \" \\ \/ \b \f \n \r \t \u00e9 \ud83d\ude00 \u2028""#,
            r#""plain ünïcødé""#,
            "18446744073709551615",
            "0",
        ];
        for doc in docs {
            let want: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert_eq!(read(doc).unwrap(), want, "{doc}");
        }
    }

    #[test]
    fn refuses_what_is_not_json() {
        let cases = [
            ("", "expected a value"),
            ("not json", "byte 0: expected a value"),
            (r#"{"a":1,}"#, "byte 7: expected a string key"),
            (r#"{"a" 1}"#, "expected `:`"),
            (r#"{"a":1 "b":2}"#, "expected `,` or `}`"),
            ("[1 2]", "expected `,` or `]`"),
            ("[1,]", "expected a value"),
            (r#""open"#, "the end of a string"),
            ("\"tab\there\"", "control character"),
            (r#""\x""#, "a valid escape"),
            (r#""\u12""#, "4 hex digits"),
            (r#""\ud800""#, "low surrogate"),
            (r#""\ud800\u0041""#, "low surrogate"),
            ("{} {}", "trailing characters"),
            ("\u{feff}{}", "expected a value"),
            (r#"{"a":1,"a":2}"#, "duplicate field `a`"),
            (r#"{"\u0061":1,"a":2}"#, "duplicate field `a`"),
            (r#"{"a\/b":1,"a/b":2}"#, "duplicate field `a/b`"),
            ("18446744073709551616", "is too large"),
            ("01", "non-negative integer"),
            ("-1", "non-negative integer"),
            ("1.5", "non-negative integer"),
            ("1e3", "non-negative integer"),
        ];
        for (doc, want) in cases {
            let err = read(doc).unwrap_err();
            assert!(err.contains(want), "{doc:?}: got {err:?}, want {want:?}");
        }
        let mut r = Reader::new(b"\"\xff\"");
        assert!(r.string(TOP).unwrap_err().to_string().contains("UTF-8"));
        let mut r = Reader::new(b"\"\\u00e9\xff\"");
        assert!(r.string(TOP).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn errors_name_the_field() {
        let doc = br#"{"routes":[{"host":1}]}"#;
        let mut r = Reader::new(doc);
        let err = r
            .object(TOP, |r, k| {
                let routes = TOP.key(&k);
                r.array(&routes, |r, i| {
                    let route = routes.index(i);
                    r.object(&route, |r, k| r.string(&route.key(&k)).map(drop))
                })
            })
            .unwrap_err();
        assert_eq!(err, Error { field: Some("routes[0].host".into()), reason: "must be a string".into() });
        assert_eq!(
            ConfigError::from(err).to_string(),
            "invalid plugin configuration: `routes[0].host` must be a string"
        );
        assert_eq!(TOP.key("a").index(2).key("b").to_string(), "a[2].b");
        let unknown = TOP.key("management").unknown("x", &["cluster", "path"]).to_string();
        assert_eq!(unknown, "unknown field `x` in `management`, expected one of `cluster`, `path`");
        assert_eq!(TOP.unknown("x", &["a"]).to_string(), "unknown field `x`, expected one of `a`");
    }

    #[test]
    fn values_read_whole_match_serde_json() {
        let docs = [
            r#"{"iss":"https://a","aud":["x","y"],"exp":1800000000,"f":-1.5e-3,"n":null,"t":true,"o":{"k":[{}]}}"#,
            "[0, -0, 1.25, 1E+2, 12345678901234567890]",
            r#""s""#,
        ];
        for doc in docs {
            let mut r = Reader::new(doc.as_bytes());
            let v = r.value(TOP).unwrap();
            r.end().unwrap();
            assert_eq!(v.to_serde(), serde_json::from_str::<serde_json::Value>(doc).unwrap(), "{doc}");
        }
        let mut r = Reader::new(br#"{"exp":1800000000,"f":1.8e9,"g":-2.5,"big":1e400,"s":"1"}"#);
        let Value::Object(o) = r.value(TOP).unwrap() else { panic!("an object") };
        assert_eq!(o.get("exp").and_then(Value::as_u64), Some(1_800_000_000));
        assert_eq!(o.get("exp").and_then(Value::as_f64), Some(1.8e9));
        assert_eq!(o.get("f").and_then(Value::as_f64), Some(1.8e9));
        assert_eq!(o.get("f").and_then(Value::as_u64), None);
        assert_eq!(o.get("g").and_then(Value::as_f64), Some(-2.5));
        assert_eq!(o.get("big").and_then(Value::as_f64), None, "beyond f64's range");
        assert_eq!(o.get("s").and_then(Value::as_f64), None);
        assert_eq!(o.get("missing"), None);
        for bad in ["01", "1.", "-", "1e", "1e+", ".5", "+1", "--1"] {
            let mut r = Reader::new(bad.as_bytes());
            assert!(r.value(TOP).is_err() || r.end().is_err(), "{bad} is not a number");
        }
        let deep = "[".repeat(40) + &"]".repeat(40);
        assert!(Reader::new(deep.as_bytes()).value(TOP).unwrap_err().reason.contains("less nesting"));
        let ok = "[".repeat(30) + &"]".repeat(30);
        assert!(Reader::new(ok.as_bytes()).value(TOP).is_ok());
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let mut r = Reader::new(br#"["plain","esc\n"]"#);
        let mut kinds = Vec::new();
        r.array(TOP, |r, _| {
            kinds.push(matches!(r.str(TOP)?, Cow::Borrowed(_)));
            Ok::<_, Error>(())
        })
        .unwrap();
        assert_eq!(kinds, [true, false]);
    }

    #[test]
    fn quote_round_trips_through_serde_json() {
        for s in ["plain", "q\"b\\s/", "ctl \u{0}\u{1f}\n\r\t\u{7f}", "ünï 😀 \u{2028}"] {
            let mut out = String::new();
            quote(s, &mut out);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
        }
    }
}

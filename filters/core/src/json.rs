//! A small pull reader for the JSON documents a filter parses (its plugin configuration, the
//! route tables it polls), and the one string encoder its replies need.
//!
//! Why not serde_json: V8 compiles every function of a module with TurboFan when Envoy loads it,
//! so load time and memory grow with code size, and serde_json's deserializers, instantiated for
//! each configuration type, were a sixth of the serverless module (measured). The reader walks
//! the document once, borrows strings that need no unescaping, builds nothing it is not asked
//! for (so a 100,000-route table is compiled route by route), and names the field in its errors.
//! The serde derives on the configuration types stay: they generate the JSON Schemas and, in the
//! tests, check that this reader accepts and refuses what they do.

use std::borrow::Cow;
use std::fmt;

use crate::config::ConfigError;

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

    pub fn error(&self, reason: impl Into<String>) -> ConfigError {
        match self {
            Field::Root => ConfigError::Json(format!("the document {}", reason.into())),
            _ => ConfigError::field(self.to_string(), reason),
        }
    }

    /// A key the object at this field does not have.
    pub fn unknown(&self, key: &str, known: &[&str]) -> ConfigError {
        let within = match self {
            Field::Root => String::new(),
            _ => format!(" in `{self}`"),
        };
        ConfigError::Json(format!("unknown field `{key}`{within}, expected one of `{}`", known.join("`, `")))
    }

    /// This key is missing from its object.
    pub fn missing(&self) -> ConfigError {
        self.error("is required")
    }
}

pub struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a [u8]) -> Self {
        Reader { src, pos: 0 }
    }

    fn syntax(&self, expected: &str) -> ConfigError {
        ConfigError::Json(format!("not valid JSON at byte {}: expected {expected}", self.pos))
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
    // Never inlined, here and in the readers built on it: see `config::from_json`.
    #[inline(never)]
    pub fn object(
        &mut self,
        at: &Field,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        if self.peek() != Some(b'{') {
            return Err(self.type_error(at, "must be an object"));
        }
        self.pos += 1;
        if self.eat(b'}') {
            return Ok(());
        }
        // Keys as they appear (escapes included): objects are small, a scan beats hashing.
        let mut seen: Vec<&'a [u8]> = Vec::new();
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.syntax("a string key"));
            }
            let start = self.pos;
            let key = self.string_token()?;
            let raw = self.src.get(start..self.pos).unwrap_or_default();
            if seen.contains(&raw) {
                return Err(ConfigError::Json(format!("duplicate field `{key}` in `{at}`")));
            }
            seen.push(raw);
            if !self.eat(b':') {
                return Err(self.syntax("`:`"));
            }
            each(self, key)?;
            if self.eat(b',') {
                continue;
            }
            if self.eat(b'}') {
                return Ok(());
            }
            return Err(self.syntax("`,` or `}`"));
        }
    }

    /// Reads an array, calling `each` with the index of every element and the reader at it.
    #[inline(never)]
    pub fn array(
        &mut self,
        at: &Field,
        mut each: impl FnMut(&mut Self, usize) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        if self.peek() != Some(b'[') {
            return Err(self.type_error(at, "must be an array"));
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
            return Err(self.syntax("`,` or `]`"));
        }
    }

    pub fn string(&mut self, at: &Field) -> Result<String, ConfigError> {
        self.str(at).map(Cow::into_owned)
    }

    /// A string, borrowed from the document unless it holds escapes.
    pub fn str(&mut self, at: &Field) -> Result<Cow<'a, str>, ConfigError> {
        if self.peek() != Some(b'"') {
            return Err(self.type_error(at, "must be a string"));
        }
        self.string_token()
    }

    pub fn strings(&mut self, at: &Field) -> Result<Vec<String>, ConfigError> {
        let mut list = Vec::new();
        self.array(at, |r, i| {
            list.push(r.string(&at.index(i))?);
            Ok(())
        })?;
        Ok(list)
    }

    pub fn u64(&mut self, at: &Field) -> Result<u64, ConfigError> {
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

    pub fn bool(&mut self, at: &Field) -> Result<bool, ConfigError> {
        if self.literal("true") {
            Ok(true)
        } else if self.literal("false") {
            Ok(false)
        } else {
            Err(self.type_error(at, "must be true or false"))
        }
    }

    /// The document holds nothing more.
    pub fn end(&mut self) -> Result<(), ConfigError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.syntax("the end of the document (trailing characters)")),
        }
    }

    /// A value of the wrong type, or no valid value at all.
    fn type_error(&mut self, at: &Field, reason: &str) -> ConfigError {
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
    fn string_token(&mut self) -> Result<Cow<'a, str>, ConfigError> {
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
    fn unicode_escape(&mut self) -> Result<char, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &Field = &Field::Root;

    /// Reads any document into a serde_json::Value, to compare with serde_json's reading.
    fn value(r: &mut Reader, at: &Field) -> Result<serde_json::Value, ConfigError> {
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
        assert_eq!(err.to_string(), "invalid plugin configuration: `routes[0].host` must be a string");
        assert_eq!(TOP.key("a").index(2).key("b").to_string(), "a[2].b");
        let unknown = TOP.key("management").unknown("x", &["cluster", "path"]).to_string();
        assert!(unknown.ends_with("unknown field `x` in `management`, expected one of `cluster`, `path`"), "{unknown}");
        assert_eq!(
            TOP.unknown("x", &["a"]).to_string(),
            "invalid plugin configuration: unknown field `x`, expected one of `a`"
        );
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let mut r = Reader::new(br#"["plain","esc\n"]"#);
        let mut kinds = Vec::new();
        r.array(TOP, |r, _| {
            kinds.push(matches!(r.str(TOP)?, Cow::Borrowed(_)));
            Ok(())
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

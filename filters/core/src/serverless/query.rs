//! The routes endpoint's query as a service reads it (docs/serverless-control.md, "The route
//! watch"): `since` (a cursor) and `wait` (seconds) for a watch, `limit` and `after` (a page
//! token) for a page of the whole table.
//!
//! Cursors and page tokens are opaque to clients, so a service reads back only the exact form it
//! issues: edgewise-control's cursor is `<history, lowercase hex>.<version, decimal>` and its page
//! token 16 lowercase hex digits. A sign, an uppercase digit or a leading zero is not a form it
//! issues, so it is refused rather than read as the same value. Numbers are decimal digits only.

use std::fmt;

/// The parameters of the query, as given (the last of a repeated one; unknown ones ignored).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query<'a> {
    pub since: Option<&'a str>,
    pub wait: Option<&'a str>,
    pub limit: Option<&'a str>,
    pub after: Option<&'a str>,
    /// A streamed watch (`stream=1`).
    pub stream: Option<&'a str>,
}

impl<'a> Query<'a> {
    pub fn read(query: &'a str) -> Query<'a> {
        let mut q = Query::default();
        for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
            match name {
                "since" => q.since = Some(value),
                "wait" => q.wait = Some(value),
                "limit" => q.limit = Some(value),
                "after" => q.after = Some(value),
                "stream" => q.stream = Some(value),
                _ => {}
            }
        }
        q
    }
}

/// Where a watcher is: the history (the store the versions belong to) and the version it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub history: u64,
    pub version: u64,
}

impl Cursor {
    /// The cursor `text` names, if it is in the form [`Cursor`]'s `Display` writes.
    pub fn read(text: &str) -> Option<Cursor> {
        let (history, version) = text.split_once('.')?;
        let history = canonical(history, 16)?;
        let version = canonical(version, 10)?;
        Some(Cursor { history, version })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{}", self.history, self.version)
    }
}

const PAGE_TOKEN_DIGITS: usize = 16;

/// The token of the page that starts at `position`.
pub fn page_token(position: u64) -> String {
    format!("{position:016x}")
}

/// The position a page token names, if it is one [`page_token`] writes.
pub fn read_page_token(token: &str) -> Option<u64> {
    let digits =
        token.len() == PAGE_TOKEN_DIGITS && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    digits.then(|| u64::from_str_radix(token, 16).ok()).flatten()
}

/// A count or a number of seconds: decimal digits only (no sign, no space), within `u64`.
pub fn read_number(text: &str) -> Option<u64> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// `text` in `radix` with lowercase digits, no sign and no leading zero (`0` itself aside).
fn canonical(text: &str, radix: u32) -> Option<u64> {
    let digit = |b: u8| b.is_ascii_digit() || (radix == 16 && (b'a'..=b'f').contains(&b));
    let leading_zero = text.len() > 1 && text.starts_with('0');
    if text.is_empty() || leading_zero || !text.bytes().all(digit) {
        return None;
    }
    u64::from_str_radix(text, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_read_by_name_and_the_last_of_a_repeated_parameter_wins() {
        let q = Query::read("since=1a.5&wait=30&x=y&novalue&since=1a.6&stream=1");
        assert_eq!(q, Query { since: Some("1a.6"), wait: Some("30"), limit: None, after: None, stream: Some("1") });
        let q = Query::read("limit=10000&after=00000000000000ff");
        assert_eq!((q.limit, q.after), (Some("10000"), Some("00000000000000ff")));
        assert_eq!(Query::read(""), Query::default());
    }

    #[test]
    fn only_the_cursors_the_service_writes_are_read_back() {
        let c = Cursor { history: 0x1a2b, version: 42 };
        assert_eq!(c.to_string(), "1a2b.42");
        assert_eq!(Cursor::read("1a2b.42"), Some(c));
        assert_eq!(Cursor::read("0.0"), Some(Cursor { history: 0, version: 0 }));
        let max = Cursor { history: u64::MAX, version: u64::MAX };
        assert_eq!(Cursor::read(&max.to_string()), Some(max));
        for other in [
            "",
            ".",
            "1a2b",
            "1a2b.",
            ".42",
            "+1a2b.42",
            "1a2b.+42",
            "1A2B.42",
            "01a2b.42",
            "1a2b.042",
            "1a2b.42.1",
            "1a2b.4 2",
            "1a2b.-1",
            "1a2b.18446744073709551616",
            "10000000000000000.1",
            "1a2b.0x2a",
            "١.٢",
        ] {
            assert_eq!(Cursor::read(other), None, "{other:?}");
        }
    }

    #[test]
    fn only_the_page_tokens_the_service_writes_are_read_back() {
        assert_eq!(page_token(255), "00000000000000ff");
        assert_eq!(read_page_token("00000000000000ff"), Some(255));
        assert_eq!(read_page_token(&page_token(u64::MAX)), Some(u64::MAX));
        for other in [
            "",
            "ff",
            "00000000000000FF",
            "+0000000000000ff",
            "000000000000000g",
            "0000000000000000ff",
            "00000000000000é",
        ] {
            assert_eq!(read_page_token(other), None, "{other:?}");
        }
    }

    #[test]
    fn numbers_are_decimal_digits() {
        assert_eq!(read_number("30"), Some(30));
        assert_eq!(read_number("007"), Some(7));
        assert_eq!(read_number(&u64::MAX.to_string()), Some(u64::MAX));
        for other in ["", "+5", "-5", " 5", "5 ", "0x5", "18446744073709551616", "٥"] {
            assert_eq!(read_number(other), None, "{other:?}");
        }
    }
}

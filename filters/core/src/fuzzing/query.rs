//! The routes endpoint's query, cursors and page tokens (`serverless::query`), which
//! edgewise-control reads from every watcher's request line.

use crate::serverless::query::{page_token, read_number, read_page_token, Cursor, Query};

use super::shown;

/// Any bytes as a query: its parameters are the last `name=value` of each name, every value
/// read is read back only in the form the service writes, and a number is what the standard
/// library reads from decimal digits.
pub fn route_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let q = Query::read(text);
    let last = |name: &str| {
        text.split('&').filter_map(|p| p.split_once('=')).filter(|(n, _)| *n == name).map(|(_, v)| v).next_back()
    };
    assert_eq!(
        q,
        Query {
            since: last("since"),
            wait: last("wait"),
            limit: last("limit"),
            after: last("after"),
            stream: last("stream")
        },
        "{}",
        shown(data)
    );
    for value in [text, q.since.unwrap_or_default(), q.wait.unwrap_or_default(), q.after.unwrap_or_default()] {
        if let Some(cursor) = Cursor::read(value) {
            assert_eq!(cursor.to_string(), value, "cursor {} read as {cursor:?}", shown(data));
        }
        if let Some(position) = read_page_token(value) {
            assert_eq!(page_token(position), value, "page token {} read as {position}", shown(data));
        }
        let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        assert_eq!(read_number(value), value.parse::<u64>().ok().filter(|_| digits), "number {}", shown(data));
    }
}

//! What reads a request's host: host patterns (against regex-lite), the authority helpers, and the
//! decisions of the shipped serverless and egress configurations.

use std::sync::OnceLock;

use super::configs::{EGRESS, ROUTERS};
use super::shown;
use crate::egress::Policy;
use crate::generic::authority;
use crate::generic::pattern::{Pattern, MAX_TEXT};
use crate::serverless::Router;

/// A pattern, then texts, separated by NUL bytes. A pattern that compiles compiles in regex-lite
/// too, anchored and ASCII case-insensitive (`^(?:pattern)$`), with the same group names, and
/// matches each ASCII text of a host's length exactly when regex-lite does, with the same groups
/// (as the tests in `crate::generic::pattern` compare them). A text that is longer, or not ASCII, matches
/// nothing.
pub fn pattern(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0);
    let Some(Ok(source)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let Ok(ours) = Pattern::new(source) else {
        return;
    };
    if regex_lite_misfolds(source) {
        return;
    }
    let theirs = regex_lite::RegexBuilder::new(&format!("^(?:{source})$"))
        .case_insensitive(true)
        .build()
        .unwrap_or_else(|e| panic!("{source:?} compiles, regex-lite refuses it: {e}"));
    let names: Vec<&str> = theirs.capture_names().flatten().collect();
    assert_eq!(ours.names(), names, "{source:?}: group names");
    let mut scratch = ours.scratch();
    for text in parts {
        let Ok(text) = std::str::from_utf8(text) else {
            continue;
        };
        let matched = ours.matches(text, &mut scratch);
        if !text.is_ascii() || text.len() > MAX_TEXT {
            assert!(!matched, "{source:?} matches {text:?}");
            continue;
        }
        let expected = theirs.captures(text);
        assert_eq!(matched, expected.is_some(), "{source:?} on {text:?}");
        if let Some(caps) = expected {
            for (i, name) in names.iter().enumerate() {
                let want = caps.name(name).map(|m| (m.start(), m.end()));
                assert_eq!(ours.group(i, &scratch), want, "{source:?} on {text:?}: group {name}");
            }
        }
    }
}

/// Whether the pattern may have a class range regex-lite 0.1 folds wrongly: one that spans both
/// cases (from `Z` or below to `a`..`y`) gets only its lowercase part folded, so `[9-a]` matches
/// `a` and `A`-`Z` but not `b`-`z` (found by this target; the regex crate folds the whole range,
/// as `crate::generic::pattern` does). A hyphen between such bytes anywhere in the pattern counts.
fn regex_lite_misfolds(source: &str) -> bool {
    source.as_bytes().windows(3).any(|w| matches!(*w, [from, b'-', to] if from <= b'Z' && (b'a'..=b'y').contains(&to)))
}

/// An authority, optionally a newline and a domain. `split` returns a non-empty host and the
/// port the authority ends with, and nothing else of it (one trailing dot aside);
/// `normalize_domain` returns a lowercase name it returns unchanged; `strip_domain` returns what
/// precedes `.<domain>` compared ASCII case-insensitively. The shipped serverless and egress
/// configurations decide on the authority without panicking.
pub fn authority(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (raw, domain) = text.split_once('\n').unwrap_or((text, "serverless.gitlab.io"));
    let host = match authority::split(raw) {
        Some((host, port)) => {
            check_split(raw, host, port);
            host
        }
        None => raw,
    };
    if let Ok(d) = authority::normalize_domain(domain) {
        assert_eq!(d, d.to_ascii_lowercase(), "{domain:?}");
        assert_eq!(authority::normalize_domain(&d).as_ref(), Ok(&d), "{domain:?}");
        assert!(!d.is_empty() && d.len() <= 253 && !d.starts_with('.') && !d.ends_with('.'), "{domain:?} -> {d:?}");
        let lower = host.to_ascii_lowercase();
        let prefix = lower.strip_suffix(d.as_str()).and_then(|p| p.strip_suffix('.')).filter(|p| !p.is_empty());
        let expected = prefix.and_then(|p| host.get(..p.len()));
        assert_eq!(authority::strip_domain(host, &d), expected, "{host:?} under {d:?}");
    }
    let (policy, routers) = fixed();
    let _ = policy.decide(raw);
    for router in routers {
        let mut scratch = router.decoder.scratch();
        let _ = router.decide(raw, &mut scratch, None);
    }
}

/// The authority is the host, perhaps a dot (not after an IPv6 literal), and `:port`.
fn check_split(raw: &str, host: &str, port: Option<u16>) {
    assert!(!host.is_empty(), "{}", shown(raw.as_bytes()));
    let rest = raw.strip_prefix(host).unwrap_or_else(|| panic!("{raw:?}: the host {host:?} is not its start"));
    let rest = if host.starts_with('[') { rest } else { rest.strip_prefix('.').unwrap_or(rest) };
    match port {
        None => assert!(rest.is_empty(), "{raw:?}: {rest:?} left over"),
        Some(port) => {
            let digits = rest.strip_prefix(':').unwrap_or_else(|| panic!("{raw:?}: no `:` before the port"));
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{raw:?}: port {digits:?}");
            assert_eq!(digits.parse(), Ok(port), "{raw:?}");
        }
    }
}

fn fixed() -> &'static (Policy, Vec<Router>) {
    static FIXED: OnceLock<(Policy, Vec<Router>)> = OnceLock::new();
    FIXED.get_or_init(|| {
        let policy = Policy::from_json(EGRESS.as_bytes()).expect("the egress configuration");
        let routers = ROUTERS.iter().map(|c| Router::from_json(c.as_bytes()).expect("a serverless configuration"));
        (policy, routers.collect())
    })
}

//! Splitting an HTTP authority (`:authority` / `Host`) into host and port.

/// The host and optional port of an authority, with one trailing dot removed from the host.
/// IPv6 literals keep their brackets (`[::1]`), so they can never look like a DNS name.
/// Returns `None` for an authority that is empty or has a malformed port.
pub fn split(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if rest.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match rfind_byte(authority, b':') {
            Some(colon) => (authority.get(..colon)?, Some(authority.get(colon + 1..)?)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

/// The last position of an ASCII byte: a plain loop, which for the few dozen bytes of a host
/// costs less than a char search sets up.
pub fn rfind_byte(s: &str, byte: u8) -> Option<usize> {
    s.as_bytes().iter().rposition(|&b| b == byte)
}

/// If `host` ends with `.<domain>` (ASCII case-insensitive), the part in front of it.
/// `domain` must be lowercase, without leading or trailing dots.
pub fn strip_domain<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let cut = host.len().checked_sub(domain.len() + 1)?;
    let (prefix, rest) = (host.get(..cut)?, host.get(cut..)?);
    // Not `split_at(1)`: the byte at `cut` may begin a multi-byte character (found by fuzzing).
    let tail = rest.strip_prefix('.')?;
    (tail.eq_ignore_ascii_case(domain) && !prefix.is_empty()).then_some(prefix)
}

/// Lowercases a configured domain name and checks that it is a plausible DNS name.
pub fn normalize_domain(domain: &str) -> Result<String, &'static str> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if d.is_empty() || d.len() > 253 || !d.split('.').all(label_ok) {
        return Err("must be a DNS name such as example.com");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_and_port() {
        let cases: &[(&str, Option<(&str, Option<u16>)>)] = &[
            ("example.com", Some(("example.com", None))),
            ("example.com:8443", Some(("example.com", Some(8443)))),
            ("Example.COM.:80", Some(("Example.COM", Some(80)))),
            ("example.com.", Some(("example.com", None))),
            ("[::1]", Some(("[::1]", None))),
            ("[::1]:443", Some(("[::1]", Some(443)))),
            ("[::1]x", None),
            ("[::1", None),
            ("example.com:", None),
            ("example.com:99999", None),
            ("example.com:8a", None),
            ("", None),
            (".", None),
            (":80", None),
        ];
        for (input, want) in cases {
            assert_eq!(split(input), *want, "authority {input:?}");
        }
    }

    #[test]
    fn strips_domain_case_insensitively() {
        assert_eq!(strip_domain("a.b.Example.com", "example.com"), Some("a.b"));
        assert_eq!(strip_domain("example.com", "example.com"), None);
        assert_eq!(strip_domain(".example.com", "example.com"), None);
        assert_eq!(strip_domain("aexample.com", "example.com"), None);
        assert_eq!(strip_domain("a.example.org", "example.com"), None);
        assert_eq!(strip_domain("é.example.com", "example.com"), Some("é"));
        assert_eq!(strip_domain("xé.com", "example.com"), None);
        // A multi-byte character where the dot would be: no match, no panic (the egress and
        // serverless filters call this on any authority a client sends).
        assert_eq!(strip_domain("éxample.com", "example.com"), None);
        assert_eq!(strip_domain("aéxample.com", "example.com"), None);
    }

    #[test]
    fn normalizes_domains() {
        assert_eq!(normalize_domain("Serverless.GitLab.io.").as_deref(), Ok("serverless.gitlab.io"));
        for bad in ["", ".", "a..b", "-a.com", "a b.com", "a/b"] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
    }
}

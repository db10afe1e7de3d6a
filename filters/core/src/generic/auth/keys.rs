//! Fetching issuers' keys: OIDC discovery, Cache-Control, and the value shared between workers.

use super::JwksConfig;
use crate::generic::json::{self, Field, Reader};

/// The two members of an OpenID Provider configuration this needs (it has dozens).
#[inline(never)] // see `crate::generic::json`
fn read_discovery(json: &[u8]) -> Result<(String, String), json::Error> {
    let (mut issuer, mut jwks_uri) = (None, None);
    let mut r = Reader::new(json);
    r.object(&Field::Root, |r, name| {
        let at = Field::Root.key(&name);
        match &*name {
            "issuer" => issuer = Some(r.string(&at)?),
            "jwks_uri" => jwks_uri = Some(r.string(&at)?),
            _ => r.skip(&at)?,
        }
        Ok::<_, json::Error>(())
    })?;
    r.end()?;
    let issuer = issuer.ok_or_else(|| Field::Root.key("issuer").missing())?;
    Ok((issuer, jwks_uri.ok_or_else(|| Field::Root.key("jwks_uri").missing())?))
}

/// The `jwks_uri` of an OpenID Provider configuration, as (authority, path). The document must
/// name the issuer it was fetched for (OpenID Connect Discovery §4.3) and the URI must be https,
/// with a host (and port) only in its authority and nothing but visible ASCII in its path; a
/// fragment is not part of a request and is dropped.
pub fn jwks_uri(discovery: &[u8], issuer: &str) -> Result<(String, String), String> {
    let (configured, jwks_uri) = read_discovery(discovery).map_err(|e| format!("not an OpenID configuration: {e}"))?;
    if configured != issuer {
        return Err(format!("the configuration is for issuer {configured:?}"));
    }
    let rest = jwks_uri.strip_prefix("https://").ok_or_else(|| format!("jwks_uri {jwks_uri:?} is not https"))?;
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    // The authority ends at the first `/` or `?` (RFC 3986 §3.2).
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host_ok = |h: &str| h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let literal_ok = |h: &str| {
        h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    };
    match crate::generic::authority::split(authority) {
        Some((host, _)) if host_ok(host) || literal_ok(host) => {}
        _ => return Err(format!("jwks_uri {jwks_uri:?} has no usable host")),
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("jwks_uri {jwks_uri:?} has a path that is not visible ASCII"));
    }
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Ok((authority.into(), path))
}

/// `max-age` of a Cache-Control value (`no-store`/`no-cache` count as 0).
pub fn max_age(cache_control: &str) -> Option<u64> {
    let mut age = None;
    for directive in cache_control.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(0);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v.trim_matches('"').parse().ok();
        }
    }
    age
}

/// Seconds until the next refresh after a successful fetch.
pub fn refresh_after(cache_control: Option<&str>, cfg: &JwksConfig) -> u64 {
    cache_control
        .and_then(max_age)
        .map_or(cfg.refresh_seconds, |age| age.clamp(cfg.min_refresh_seconds, cfg.max_refresh_seconds))
}

/// The shared value of an issuer's keys: fetch time (ms, LE) then the JWKS document.
pub fn encode_shared(fetched_ms: u64, jwks: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + jwks.len());
    v.extend_from_slice(&fetched_ms.to_le_bytes());
    v.extend_from_slice(jwks);
    v
}

pub fn decode_shared(value: &[u8]) -> Option<(u64, &[u8])> {
    let (time, jwks) = value.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*time), jwks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_names_the_issuer_and_an_https_jwks_uri() {
        let doc = br#"{"issuer":"https://gitlab.com","jwks_uri":"https://gitlab.com/oauth/discovery/keys","x":1}"#;
        assert_eq!(jwks_uri(doc, "https://gitlab.com").unwrap(), ("gitlab.com".into(), "/oauth/discovery/keys".into()));
        assert!(jwks_uri(doc, "https://customers.gitlab.com").unwrap_err().contains("issuer"));
        let plain = br#"{"issuer":"https://a","jwks_uri":"http://a/keys"}"#;
        assert!(jwks_uri(plain, "https://a").unwrap_err().contains("not https"));
        let bare = br#"{"issuer":"https://a","jwks_uri":"https://a:8443"}"#;
        assert_eq!(jwks_uri(bare, "https://a").unwrap(), ("a:8443".into(), "/".into()));
        let uri = |u: &str| jwks_uri(format!(r#"{{"issuer":"https://a","jwks_uri":"{u}"}}"#).as_bytes(), "https://a");
        // The authority ends at `?` too; a fragment is dropped; an IPv6 literal is a host.
        assert_eq!(uri("https://keys.a?x=1").unwrap(), ("keys.a".into(), "/?x=1".into()));
        assert_eq!(uri("https://keys.a/k#frag").unwrap(), ("keys.a".into(), "/k".into()));
        assert_eq!(uri("https://[::1]:8443/k").unwrap(), ("[::1]:8443".into(), "/k".into()));
        for bad in [
            "https://user@keys.a/k",
            "https://keys a/k",
            "https://keys.a\\u0000/k",
            "https://keys.a\\r\\nx: y/k",
            "https://k\\u00e9ys.a/k",
            "https://keys.a:99999/k",
            "https:///k",
            "https://[nothost]/k",
        ] {
            assert!(uri(bad).unwrap_err().contains("no usable host"), "{bad}");
        }
        for bad in ["https://keys.a/k k", "https://keys.a/k\\u0007", "https://keys.a/k\\u00e9"] {
            assert!(uri(bad).unwrap_err().contains("not visible ASCII"), "{bad}");
        }
        assert!(jwks_uri(b"{}", "https://a").is_err());
        assert!(jwks_uri(br#"{"issuer":"https://a","jwks_uri":"https:///k"}"#, "https://a").is_err());
    }

    #[test]
    fn max_age_is_bounded() {
        let cfg = JwksConfig {
            refresh_seconds: 300,
            min_refresh_seconds: 60,
            max_refresh_seconds: 3600,
            ..Default::default()
        };
        assert_eq!(max_age("public, max-age=120"), Some(120));
        assert_eq!(max_age("no-store"), Some(0));
        assert_eq!(max_age("private"), None);
        assert_eq!(refresh_after(Some("max-age=120"), &cfg), 120);
        assert_eq!(refresh_after(Some("max-age=5"), &cfg), 60);
        assert_eq!(refresh_after(Some("max-age=999999"), &cfg), 3600);
        assert_eq!(refresh_after(Some("no-cache"), &cfg), 60);
        assert_eq!(refresh_after(None, &cfg), 300);
    }

    #[test]
    fn shared_value_round_trips() {
        let v = encode_shared(42, b"{\"keys\":[]}");
        assert_eq!(decode_shared(&v), Some((42, &b"{\"keys\":[]}"[..])));
        assert_eq!(decode_shared(b"short"), None);
    }
}

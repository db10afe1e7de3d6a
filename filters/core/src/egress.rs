//! Egress: `http://FOO.egress.local[:port]/...` -> HTTPS to `FOO` (port 443 unless the name
//! carries another), for allowlisted destinations only.
//!
//! What this module decides happens before DNS: the authority must be under the suffix, the
//! destination must be a well-formed DNS name on the allowlist, and IP literals and names that
//! are loopback by definition (`localhost`, `*.localhost`) are refused. What a name resolves to
//! is checked after DNS by Envoy's RBAC filter on the upstream address (see envoy/egress.yaml);
//! this module only says whether a destination may resolve to a private address.

use std::net::Ipv6Addr;

use serde::Deserialize;

use crate::generic::authority;
use crate::generic::config::ConfigError;
use crate::generic::json::{self, FromJson};
use crate::generic::reply::Reply;

pub const DEFAULT_SUFFIX: &str = "egress.local";

#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Applications call `http://<destination>.<suffix>`.
    #[serde(default = "default_suffix")]
    pub suffix: String,
    /// Allowed destinations: `api.github.com`, `*.googleapis.com` (any subdomain, not the apex),
    /// optionally with `:port`. An entry without a port allows port 443 only.
    pub allow: Vec<String>,
    /// Destinations (entries of `allow`, written the same way) that may be IP literals or resolve
    /// to loopback, link-local, private or unspecified addresses. Empty by default.
    #[serde(default)]
    pub allow_private: Vec<String>,
}

fn default_suffix() -> String {
    DEFAULT_SUFFIX.into()
}

/// One allowlist entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `api.github.com`, or for `*.googleapis.com` the suffix `.googleapis.com`.
    name: String,
    wildcard: bool,
    port: u16,
    private_ok: bool,
    /// Bounded metric label: the entry as written, with `*` as `wildcard` and dots as `_`.
    label: String,
    /// `label`, or `private:label` when the destination may be private: what the filter tells
    /// Envoy's RBAC policy.
    marker: String,
}

impl Entry {
    fn parse(raw: &str, field: &str) -> Result<Entry, ConfigError> {
        let bad = |why: &str| ConfigError::field(field, format!("{raw:?} {why}"));
        let (name, port) = match raw.rsplit_once(':') {
            Some((name, port)) => {
                (name, port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("has an invalid port"))?)
            }
            None => (raw, 443),
        };
        let (wildcard, bare) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let bare = bare.to_ascii_lowercase();
        if !(is_dns_name(&bare) || (!wildcard && ip_literal(&bare))) {
            return Err(bad("is not a DNS name, a *.suffix wildcard or an IP address"));
        }
        let name = if wildcard { format!(".{bare}") } else { bare };
        let label = raw.to_ascii_lowercase().replace("*.", "wildcard.").replace(['.', ':', '-'], "_");
        Ok(Entry { name, wildcard, port, private_ok: false, marker: label.clone(), label })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port
            && if self.wildcard {
                host.len() > self.name.len() && host.ends_with(&self.name)
            } else {
                host == self.name
            }
    }
}

/// A lowercase DNS name of letters, digits and hyphens whose last label is not numeric (so it
/// cannot be read as an IPv4 address by a resolver).
fn is_dns_name(name: &str) -> bool {
    if name.len() > 253 {
        return false;
    }
    // One pass over the bytes: every label 1..=63 of [a-z0-9-], not starting or ending with '-'.
    let mut label = 0;
    let mut last = b'.';
    for &b in name.as_bytes() {
        match b {
            b'.' if label == 0 || last == b'-' => return false,
            b'.' => label = 0,
            b'-' if label == 0 => return false,
            b'a'..=b'z' | b'0'..=b'9' | b'-' if label < 63 => label += 1,
            _ => return false,
        }
        last = b;
    }
    label > 0 && last != b'-' && !looks_numeric(last_label(name))
}

/// What follows the last dot (all of `host` without one).
fn last_label(host: &str) -> &str {
    authority::rfind_byte(host, b'.').and_then(|dot| host.get(dot + 1..)).unwrap_or(host)
}

/// `127`, `0x7f`, `0177`: what inet_aton would accept as part of an address.
fn looks_numeric(label: &str) -> bool {
    let hex = label.strip_prefix("0x").or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// An IP literal in any spelling a resolver might accept: dotted quads, the numeric shorthands
/// (`127.1`, `2130706433`, `0x7f.1`) and IPv6 with or without brackets.
/// A dotted quad, or any numeric form, ends in a numeric label; IPv6 needs a colon.
fn ip_literal(host: &str) -> bool {
    let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
    looks_numeric(last_label(host)) || (host.contains(':') && unbracketed.parse::<Ipv6Addr>().is_ok())
}

/// Names that are loopback by definition (RFC 6761), whatever DNS says.
fn loopback_name(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost") || host == "localhost.localdomain"
}

#[derive(Debug)]
pub struct Policy {
    suffix: String,
    entries: Vec<Entry>,
}

/// Why a request was refused, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    NotEgressHost,
    InvalidDestination,
    IpLiteral,
    LoopbackName,
    NotAllowed,
}

impl Denial {
    pub const ALL: [Denial; 5] = [
        Denial::NotEgressHost,
        Denial::InvalidDestination,
        Denial::IpLiteral,
        Denial::LoopbackName,
        Denial::NotAllowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Denial::NotEgressHost => "not_egress_host",
            Denial::InvalidDestination => "invalid_destination",
            Denial::IpLiteral => "ip_literal",
            Denial::LoopbackName => "loopback_name",
            Denial::NotAllowed => "not_allowed",
        }
    }
}

/// The new `:authority` of an allowed request, `FOO` or `FOO:port` (the port when not 443),
/// lowercase, on the stack: a DNS name has at most 253 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NewAuthority {
    bytes: [u8; 260],
    len: usize,
}

impl NewAuthority {
    /// `host` in lowercase; None when it is too long to be a DNS name.
    fn lowercase(host: &str) -> Option<Self> {
        if host.len() > 253 {
            return None;
        }
        let mut new = NewAuthority { bytes: [0; 260], len: 0 };
        new.push(host.as_bytes());
        if let Some(name) = new.bytes.get_mut(..new.len) {
            name.make_ascii_lowercase();
        }
        Some(new)
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(room) = self.bytes.get_mut(self.len..self.len + bytes.len()) {
            room.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn with_port(mut self, port: u16) -> Self {
        if port != 443 {
            let mut digits = [0u8; 6];
            let mut free: &mut [u8] = &mut digits;
            let _ = std::io::Write::write_fmt(&mut free, format_args!(":{port}"));
            let written = 6 - free.len();
            self.push(digits.get(..written).unwrap_or_default());
        }
        self
    }

    pub fn as_str(&self) -> &str {
        // Lowercased ASCII of a `&str` and ASCII digits: always UTF-8.
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }
}

impl std::fmt::Debug for NewAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// An allowed request: where it goes and which allowlist entry let it through.
#[derive(Debug, PartialEq, Eq)]
pub struct Allowed<'a> {
    /// The new `:authority`.
    pub authority: NewAuthority,
    /// Index of the entry, for per-destination metrics (bounded by the allowlist).
    pub entry: usize,
    pub label: &'a str,
    /// The destination may resolve to a private address.
    pub private_ok: bool,
    /// `label`, prefixed with `private:` when `private_ok`.
    pub marker: &'a str,
}

// The allowed variant carries the new authority on the stack, by design (no allocation).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow(Allowed<'a>),
    Deny(Denial, Reply),
}

impl Policy {
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        Self::new(json::parse::<Config>(json)?)
    }

    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let suffix = authority::normalize_domain(&config.suffix).map_err(|e| ConfigError::field("suffix", e))?;
        if config.allow.is_empty() {
            return Err(ConfigError::field("allow", "is empty: the egress proxy would refuse everything"));
        }
        let mut entries = Vec::with_capacity(config.allow.len());
        for (i, raw) in config.allow.iter().enumerate() {
            let entry = Entry::parse(raw, &format!("allow[{i}]"))?;
            if entries
                .iter()
                .any(|e: &Entry| e.name == entry.name && e.port == entry.port && e.wildcard == entry.wildcard)
            {
                return Err(ConfigError::field(format!("allow[{i}]"), format!("{raw:?} is listed twice")));
            }
            entries.push(entry);
        }
        for (i, raw) in config.allow_private.iter().enumerate() {
            let field = format!("allow_private[{i}]");
            let wanted = Entry::parse(raw, &field)?;
            let Some(entry) = entries
                .iter_mut()
                .find(|e| e.name == wanted.name && e.port == wanted.port && e.wildcard == wanted.wildcard)
            else {
                return Err(ConfigError::field(field, format!("{raw:?} is not an entry of `allow`")));
            };
            entry.private_ok = true;
            entry.marker = format!("private:{}", entry.label);
        }
        Ok(Policy { suffix, entries })
    }

    /// The metric labels of the allowlist entries, in order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.label.as_str())
    }

    pub fn decide(&self, authority: &str) -> Decision<'_> {
        let Some((host, port)) = authority::split(authority) else {
            return deny(
                Denial::NotEgressHost,
                403,
                "not_egress_host",
                format!("{authority:?} is not an egress host: call http://<destination>.{}", self.suffix),
            );
        };
        let Some(destination) = authority::strip_domain(host, &self.suffix) else {
            return deny(
                Denial::NotEgressHost,
                403,
                "not_egress_host",
                format!("{host} is not an egress host: call http://<destination>.{}", self.suffix),
            );
        };
        let port = port.unwrap_or(443);
        let Some(lower) = NewAuthority::lowercase(destination) else {
            return deny(
                Denial::InvalidDestination,
                403,
                "destination_not_allowed",
                format!(
                    "{} is not a valid DNS name",
                    if port == 443 { destination.to_string() } else { format!("{destination}:{port}") }
                ),
            );
        };
        let dest = lower.as_str();
        // How a refusal names the destination (made only for one).
        let shown = || lower.with_port(port).as_str().to_string();
        if ip_literal(dest) {
            // Only an exact allowlist entry that may be private lets an IP literal through.
            return match self.entries.iter().position(|e| e.private_ok && e.matches(dest, port)) {
                Some(i) => self.allow(i, lower.with_port(port)),
                None => deny(
                    Denial::IpLiteral,
                    403,
                    "destination_not_allowed",
                    format!("{}: IP addresses are not allowed as egress destinations", shown()),
                ),
            };
        }
        if !is_dns_name(dest) {
            return deny(
                Denial::InvalidDestination,
                403,
                "destination_not_allowed",
                format!("{} is not a valid DNS name", shown()),
            );
        }
        let entry = self.entries.iter().position(|e| e.matches(dest, port));
        match entry {
            Some(i) if loopback_name(dest) && !self.entries.get(i).is_some_and(|e| e.private_ok) => {
                deny(Denial::LoopbackName, 403, "destination_not_allowed", format!("{} is a loopback name", shown()))
            }
            Some(i) => self.allow(i, lower.with_port(port)),
            None if loopback_name(dest) => {
                deny(Denial::LoopbackName, 403, "destination_not_allowed", format!("{} is a loopback name", shown()))
            }
            None => deny(
                Denial::NotAllowed,
                403,
                "destination_not_allowed",
                format!("{} is not on the egress allowlist", shown()),
            ),
        }
    }

    fn allow(&self, i: usize, authority: NewAuthority) -> Decision<'_> {
        match self.entries.get(i) {
            Some(e) => Decision::Allow(Allowed {
                authority,
                entry: i,
                label: &e.label,
                private_ok: e.private_ok,
                marker: &e.marker,
            }),
            None => deny(Denial::NotAllowed, 403, "destination_not_allowed", authority.as_str().to_string()),
        }
    }
}

fn deny<'a>(denial: Denial, status: u32, error: &'static str, detail: String) -> Decision<'a> {
    Decision::Deny(denial, Reply::new(status, error, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip_literal` decides as the spelled-out check it replaced: every parse a resolver might
    /// accept, tried in turn.
    #[test]
    fn ip_literal_agrees_with_trying_every_parse() {
        fn every_parse(host: &str) -> bool {
            let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
            unbracketed.parse::<Ipv6Addr>().is_ok()
                || host.parse::<std::net::Ipv4Addr>().is_ok()
                || (!host.is_empty() && host.split('.').all(looks_numeric))
                || host.rsplit('.').next().is_some_and(looks_numeric)
        }
        let mut hosts: Vec<String> = [
            "",
            ".",
            "a.",
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0X7F.0.0.1",
            "0177.0.0.1",
            "::1",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "fe80::1%25eth0",
            "::",
            "1::",
            "[1.2.3.4]",
            "1.2.3.4.",
            "api.github.com",
            "a.b.c.123",
            "a.0x1f",
            "1e100.net",
            "dead:beef",
            "[dead:beef::]",
            "x:1",
            "0x",
            "a..b",
            "1.2.3.4:5",
        ]
        .map(String::from)
        .to_vec();
        // And every short string over the characters that matter.
        let alphabet = ['0', '1', 'x', 'f', '.', ':', '[', ']', 'a'];
        for len in 1..=4 {
            for mut n in 0..alphabet.len().pow(len) {
                let mut s = String::new();
                for _ in 0..len {
                    s.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                hosts.push(s);
            }
        }
        for host in &hosts {
            assert_eq!(ip_literal(host), every_parse(host), "{host:?}");
        }
    }

    /// `is_dns_name` decides as the label-by-label check it replaced.
    #[test]
    fn is_dns_name_agrees_with_checking_each_label() {
        fn each_label(name: &str) -> bool {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            };
            name.len() <= 253 && name.split('.').all(label_ok) && !name.rsplit('.').next().is_some_and(looks_numeric)
        }
        let mut names: Vec<String> = [
            "",
            ".",
            "a",
            "a.",
            ".a",
            "a..b",
            "a-b.c",
            "-a.b",
            "a-.b",
            "a.b-",
            "ab.0x1f",
            "a.123",
            "api.github.com",
            "xn--bcher-kva.example",
            "A.b",
            "a_b.c",
            "a.b.c.d.e",
        ]
        .map(String::from)
        .to_vec();
        names.push(format!("{}.com", "a".repeat(63)));
        names.push(format!("{}.com", "a".repeat(64)));
        names.push(["a"; 127].join("."));
        names.push(["a"; 128].join("."));
        let alphabet = ['a', '0', '-', '.', 'x', 'B'];
        for len in 1..=5 {
            for mut n in 0..alphabet.len().pow(len) {
                let mut s = String::new();
                for _ in 0..len {
                    s.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                names.push(s);
            }
        }
        for name in &names {
            assert_eq!(is_dns_name(name), each_label(name), "{name:?}");
        }
    }

    #[test]
    fn the_new_authority_is_the_lowercase_destination_and_a_port_other_than_443() {
        let new = |host: &str, port| NewAuthority::lowercase(host).map(|a| a.with_port(port).as_str().to_string());
        assert_eq!(new("API.GitHub.com", 443).as_deref(), Some("api.github.com"));
        assert_eq!(new("example.com", 8443).as_deref(), Some("example.com:8443"));
        assert_eq!(new("example.com", 0).as_deref(), Some("example.com:0"));
        assert_eq!(new("example.com", 65535).as_deref(), Some("example.com:65535"));
        let longest = "a".repeat(253);
        assert_eq!(new(&longest, 65535), Some(format!("{longest}:65535")));
        assert_eq!(new(&"a".repeat(254), 443), None, "longer than a DNS name");
    }

    /// The derived reader reads every document as the serde derive (the JSON Schema's source) does.
    #[test]
    fn the_reader_agrees_with_the_schema_types() {
        let docs = [
            r#"{"allow":["a.example"]}"#,
            r#"{"suffix":"x.local","allow":[],"allow_private":["a"]}"#,
            r#"{"suffix":"x.local"}"#,
            r#"{"allow":"a"}"#,
            r#"{"allow":[],"allow_private":null}"#,
            r#"{"allow":[],"deny":[]}"#,
            r#"{"allow":[1]}"#,
        ];
        crate::generic::json::assert_reads_like_serde::<Config, _>(&docs, crate::generic::json::parse::<Config>);
    }

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"allow":["api.github.com","*.googleapis.com","example.com:8443","intranet.corp.example","10.1.2.3","localhost:8080"],
                 "allow_private":["intranet.corp.example","10.1.2.3"]}"#,
        )
        .unwrap()
    }

    /// (authority, Ok((new authority, label, private_ok)) or Err(denial)).
    fn check(p: &Policy, authority: &str) -> Result<(String, String, bool), Denial> {
        match p.decide(authority) {
            Decision::Allow(a) => {
                let want = if a.private_ok { format!("private:{}", a.label) } else { a.label.to_string() };
                assert_eq!(a.marker, want, "{authority}");
                Ok((a.authority.as_str().to_string(), a.label.to_string(), a.private_ok))
            }
            Decision::Deny(d, reply) => {
                assert_eq!(reply.status, 403);
                Err(d)
            }
        }
    }

    #[test]
    fn rewrites_allowlisted_destinations() {
        let p = policy();
        let ok = |a: &str, l: &str, private: bool| Ok((a.to_string(), l.to_string(), private));
        let cases = [
            ("api.github.com.egress.local", ok("api.github.com", "api_github_com", false)),
            ("API.GitHub.com.Egress.Local.", ok("api.github.com", "api_github_com", false)),
            ("api.github.com.egress.local:443", ok("api.github.com", "api_github_com", false)),
            ("storage.googleapis.com.egress.local", ok("storage.googleapis.com", "wildcard_googleapis_com", false)),
            ("a.b.googleapis.com.egress.local", ok("a.b.googleapis.com", "wildcard_googleapis_com", false)),
            ("example.com.egress.local:8443", ok("example.com:8443", "example_com_8443", false)),
            ("intranet.corp.example.egress.local", ok("intranet.corp.example", "intranet_corp_example", true)),
            ("10.1.2.3.egress.local", ok("10.1.2.3", "10_1_2_3", true)),
        ];
        for (authority, want) in cases {
            assert_eq!(check(&p, authority), want, "{authority}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let p = policy();
        let cases = [
            ("api.github.com", Denial::NotEgressHost),
            ("egress.local", Denial::NotEgressHost),
            ("api.github.com.egress.local.evil.com", Denial::NotEgressHost),
            ("[::1]", Denial::NotEgressHost),
            ("[::1].egress.local", Denial::NotEgressHost),
            ("", Denial::NotEgressHost),
            ("api.github.com.egress.local:8443", Denial::NotAllowed),
            ("example.com.egress.local", Denial::NotAllowed),
            ("googleapis.com.egress.local", Denial::NotAllowed),
            ("evilgoogleapis.com.egress.local", Denial::NotAllowed),
            ("gist.github.com.egress.local", Denial::NotAllowed),
            ("127.0.0.1.egress.local", Denial::IpLiteral),
            ("169.254.169.254.egress.local", Denial::IpLiteral),
            ("10.1.2.4.egress.local", Denial::IpLiteral),
            ("127.1.egress.local", Denial::IpLiteral),
            ("2130706433.egress.local", Denial::IpLiteral),
            ("0x7f.0.0.1.egress.local", Denial::IpLiteral),
            ("0x7f000001.egress.local", Denial::IpLiteral),
            ("foo.1.egress.local", Denial::IpLiteral),
            ("localhost.egress.local", Denial::LoopbackName),
            ("localhost.egress.local:8080", Denial::LoopbackName),
            ("db.localhost.egress.local", Denial::LoopbackName),
            ("under_score.egress.local", Denial::InvalidDestination),
            ("a..b.egress.local", Denial::InvalidDestination),
            ("-a.egress.local", Denial::InvalidDestination),
        ];
        for (authority, want) in cases {
            assert_eq!(check(&p, authority), Err(want), "{authority}");
        }
    }

    #[test]
    fn deny_bodies_name_the_destination() {
        let Decision::Deny(_, reply) = policy().decide("gist.github.com.egress.local:444") else { panic!("allowed") };
        assert_eq!(reply.error, "destination_not_allowed");
        assert!(reply.detail.contains("gist.github.com:444"), "{}", reply.detail);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (r#"{}"#, "`allow` is required"),
            (r#"{"allow":[]}"#, "`allow` is empty"),
            (r#"{"allow":["a.com"],"sufix":"x"}"#, "unknown field `sufix`"),
            (r#"{"allow":["a.com"],"suffix":"a b"}"#, "`suffix`"),
            (r#"{"allow":["a.com:0"]}"#, "`allow[0]`"),
            (r#"{"allow":["a.com","b.com:x"]}"#, "`allow[1]`"),
            (r#"{"allow":["*.*.com"]}"#, "`allow[0]`"),
            (r#"{"allow":["*.10.0.0.1"]}"#, "`allow[0]`"),
            (r#"{"allow":["http://a.com"]}"#, "`allow[0]`"),
            (r#"{"allow":["a.com","A.com"]}"#, "`allow[1]` \"A.com\" is listed twice"),
            (
                r#"{"allow":["a.com"],"allow_private":["b.com"]}"#,
                "`allow_private[0]` \"b.com\" is not an entry of `allow`",
            ),
        ];
        for (json, want) in cases {
            let err = Policy::from_json(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: got {err:?}, want {want:?}");
        }
    }
}

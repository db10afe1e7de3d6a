//! Serverless ingress: `<8hex>-<8hex>-<10hex>.serverless.<domain>` -> the function's Knative host
//! and the Envoy cluster (one per customer cluster) that reaches it over mutual TLS.
//!
//! The host is decoded by a pattern with named groups (regex syntax, `crate::generic::pattern`), compiled
//! once at configure time. The values of the named groups, in pattern order, form the route key;
//! routes name the same groups.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;

use crate::generic::authority;
use crate::generic::config::ConfigError;
use crate::generic::json::{self, Field, FromJson, Reader};
use crate::generic::pattern::{self, Pattern};
use crate::generic::reply::Reply;

pub const DEFAULT_DOMAIN: &str = "serverless.gitlab.io";
/// Project id, environment id and function id, as in the original proposal.
pub const DEFAULT_PATTERN: &str = "(?P<project>[0-9a-f]{8})-(?P<environment>[0-9a-f]{8})-(?P<function>[0-9a-f]{10})";
pub const DEFAULT_CLUSTER_HEADER: &str = "x-edgewise-cluster";

// Declared once: the serde attributes give the JSON Schema and the derived reader (`FromJson`);
// serde's own reading is the tests' reference.
/// The plugin configuration, as JSON.
#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The public domain functions live under (default `serverless.gitlab.io`).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Regex with named groups for the labels in front of the domain; anchored and
    /// case-insensitive. The named groups are the route key. The syntax a host layout needs:
    /// literals, `.`, `\d \w \s` (and negations), classes, `(?P<name>...)`, `(?:...)`, `|`,
    /// `* + ? {n} {n,} {n,m}` (and lazy forms), `^`, `$`.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// Header the filter sets to the selected cluster, for a route's `cluster_header`. Any value a
    /// client sends is removed.
    #[serde(default = "default_cluster_header")]
    pub cluster_header: String,
    /// Routes known at configure time.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// A management service the filter polls for the route table.
    #[serde(default)]
    pub management: Option<Management>,
}

/// One function: the values of the pattern's named groups -> where it runs.
#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// The Envoy cluster of the customer's cluster (its ingress gateway, over mTLS).
    pub cluster: String,
    /// The Host the function's Knative service answers to.
    pub host: String,
}

/// Where the route table is polled from. The call goes through an Envoy cluster.
#[derive(Debug, Clone, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Management {
    pub cluster: String,
    #[serde(default = "default_mgmt_authority")]
    pub authority: String,
    #[serde(default = "default_mgmt_path")]
    pub path: String,
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_domain() -> String {
    DEFAULT_DOMAIN.into()
}
fn default_pattern() -> String {
    DEFAULT_PATTERN.into()
}
fn default_cluster_header() -> String {
    DEFAULT_CLUSTER_HEADER.into()
}
fn default_mgmt_authority() -> String {
    "management".into()
}
fn default_mgmt_path() -> String {
    "/v1/serverless/routes".into()
}
fn default_poll_interval_ms() -> u64 {
    10_000
}
fn default_timeout_ms() -> u64 {
    5_000
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub cluster: Arc<str>,
    pub host: Box<str>,
}

/// Decodes hosts: the domain suffix check and the compiled pattern.
#[derive(Debug)]
pub struct HostDecoder {
    domain: String,
    /// `None` for the default layout, which `decode_default` reads without the matcher.
    pattern: Option<Pattern>,
    groups: Vec<String>,
}

/// Per-VM scratch space, so that decoding a host allocates nothing.
#[derive(Debug)]
pub struct Scratch {
    matching: pattern::Scratch,
    key: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not under the serverless domain: leave the request alone.
    NotOurs,
    /// Under the domain but not a function host (wrong lengths, non-hex, extra labels).
    Malformed,
    /// A function host; the route key is in the scratch.
    Key,
}

impl HostDecoder {
    pub fn new(domain: &str, pattern: &str) -> Result<Self, ConfigError> {
        let domain = authority::normalize_domain(domain).map_err(|e| ConfigError::field("domain", e))?;
        if pattern == DEFAULT_PATTERN {
            let groups = ["project", "environment", "function"].map(String::from).to_vec();
            return Ok(HostDecoder { domain, pattern: None, groups });
        }
        Self::with_pattern(domain, pattern)
    }

    fn with_pattern(domain: String, pattern: &str) -> Result<Self, ConfigError> {
        let pattern = Pattern::new(pattern).map_err(|e| ConfigError::field("pattern", e))?;
        let groups = pattern.names().to_vec();
        if groups.is_empty() {
            return Err(ConfigError::field(
                "pattern",
                "needs at least one named group, e.g. (?P<function>[0-9a-f]{10})",
            ));
        }
        Ok(HostDecoder { domain, pattern: Some(pattern), groups })
    }

    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    pub fn scratch(&self) -> Scratch {
        let matching = self.pattern.as_ref().map(Pattern::scratch).unwrap_or_default();
        Scratch { matching, key: String::with_capacity(64) }
    }

    /// Decodes an authority. Only the authority counts: callers must never pass
    /// X-Forwarded-Host or similar client-controlled headers.
    pub fn decode(&self, authority: &str, scratch: &mut Scratch) -> Decoded {
        let Some((host, _port)) = authority::split(authority) else {
            return Decoded::NotOurs;
        };
        let Some(prefix) = authority::strip_domain(host, &self.domain) else {
            return Decoded::NotOurs;
        };
        scratch.key.clear();
        let Some(pattern) = &self.pattern else {
            return decode_default(prefix, &mut scratch.key);
        };
        if !pattern.matches(prefix, &mut scratch.matching) {
            return Decoded::Malformed;
        }
        for i in 0..self.groups.len() {
            if i > 0 {
                scratch.key.push('/');
            }
            if let Some(value) = pattern.group(i, &scratch.matching).and_then(|(s, e)| prefix.get(s..e)) {
                scratch.key.extend(value.chars().map(|c| c.to_ascii_lowercase()));
            }
        }
        Decoded::Key
    }

    /// Decodes with the matcher whatever the pattern (for the differential test).
    #[cfg(test)]
    fn decode_with_pattern(&self, authority: &str) -> (Decoded, String) {
        let Ok(slow) = HostDecoder::with_pattern(self.domain.clone(), DEFAULT_PATTERN) else {
            panic!("the default pattern compiles");
        };
        assert_eq!(slow.groups, self.groups);
        let mut scratch = slow.scratch();
        let decoded = slow.decode(authority, &mut scratch);
        (decoded, scratch.key)
    }

    /// The route key of a route's `match`, built the same way as a decoded host's.
    fn key_of(&self, matches: &BTreeMap<String, String>) -> Result<String, String> {
        if matches.len() != self.groups.len() || !self.groups.iter().all(|g| matches.contains_key(g)) {
            return Err(format!("must name exactly the pattern's groups {:?}", self.groups));
        }
        let mut key = String::new();
        for (i, group) in self.groups.iter().enumerate() {
            if i > 0 {
                key.push('/');
            }
            let value = matches.get(group).map(String::as_str).unwrap_or_default();
            if value.is_empty() || value.contains('/') {
                return Err(format!("group `{group}` has an invalid value {value:?}"));
            }
            key.push_str(&value.to_ascii_lowercase());
        }
        Ok(key)
    }
}

/// `DEFAULT_PATTERN` without the matcher: 8 hex, `-`, 8 hex, `-`, 10 hex; the key is the three
/// groups lowercased and joined by `/`, exactly as the pattern path builds it.
fn decode_default(prefix: &str, key: &mut String) -> Decoded {
    let b = prefix.as_bytes();
    let hex = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_hexdigit));
    if b.len() != 28 || b.get(8) != Some(&b'-') || b.get(17) != Some(&b'-') || !hex(0..8) || !hex(9..17) || !hex(18..28)
    {
        return Decoded::Malformed;
    }
    for (i, c) in prefix.chars().enumerate() {
        key.push(match i {
            8 | 17 => '/',
            _ => c.to_ascii_lowercase(),
        });
    }
    Decoded::Key
}

/// A compiled route table: key -> target. Lookups cost the same whatever its size.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    routes: HashMap<Box<str>, Target>,
}

impl RouteTable {
    #[inline(never)] // see `from_json`
    pub fn compile(
        decoder: &HostDecoder,
        specs: Vec<RouteSpec>,
        field: &str,
        version: u64,
    ) -> Result<Self, ConfigError> {
        let mut builder = TableBuilder::new(decoder, field);
        for spec in specs {
            builder.add(spec)?;
        }
        Ok(builder.finish(version))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Target> {
        self.routes.get(key)
    }
}

/// Compiles routes one at a time, so that a large table never exists twice in memory.
struct TableBuilder<'a> {
    decoder: &'a HostDecoder,
    field: &'a str,
    routes: HashMap<Box<str>, Target>,
    /// Customer clusters are few: one shared string per cluster name.
    clusters: HashMap<String, Arc<str>>,
}

impl<'a> TableBuilder<'a> {
    fn new(decoder: &'a HostDecoder, field: &'a str) -> Self {
        TableBuilder { decoder, field, routes: HashMap::new(), clusters: HashMap::new() }
    }

    fn add(&mut self, spec: RouteSpec) -> Result<(), ConfigError> {
        let i = self.routes.len();
        let at = |sub: &str| format!("{}[{i}].{sub}", self.field);
        let key = self.decoder.key_of(&spec.matches).map_err(|e| ConfigError::field(at("match"), e))?;
        if spec.cluster.is_empty() {
            return Err(ConfigError::field(at("cluster"), "must name an Envoy cluster"));
        }
        if authority::split(&spec.host).is_none() || spec.host.bytes().any(|b| b <= b' ' || b == b'/' || b >= 0x7f) {
            return Err(ConfigError::field(at("host"), format!("{:?} is not a valid Host", spec.host)));
        }
        let cluster = self.clusters.entry(spec.cluster).or_insert_with_key(|c| Arc::from(c.as_str())).clone();
        let target = Target { cluster, host: spec.host.into_boxed_str() };
        if self.routes.insert(key.clone().into_boxed_str(), target).is_some() {
            return Err(ConfigError::field(at("match"), format!("duplicates an earlier route ({key})")));
        }
        Ok(())
    }

    fn finish(mut self, version: u64) -> RouteTable {
        self.routes.shrink_to_fit();
        RouteTable { version, routes: self.routes }
    }
}

/// The configuration, compiled: everything a request needs, ready.
#[derive(Debug)]
pub struct Router {
    pub decoder: HostDecoder,
    pub cluster_header: String,
    pub management: Option<Management>,
    inline: RouteTable,
    polled: Option<RouteTable>,
}

/// What the filter does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    PassThrough,
    Route(&'a Target),
    Reject(Outcome, Reply),
}

/// Request outcomes, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Routed,
    UnknownFunction,
    MalformedHost,
    TableUnavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 4] =
        [Outcome::Routed, Outcome::UnknownFunction, Outcome::MalformedHost, Outcome::TableUnavailable];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::UnknownFunction => "unknown_function",
            Outcome::MalformedHost => "malformed_host",
            Outcome::TableUnavailable => "table_unavailable",
        }
    }
}

impl Router {
    #[inline(never)] // see `crate::generic::json`
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        Self::new(json::parse::<Config>(json)?)
    }

    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let decoder = HostDecoder::new(&config.domain, &config.pattern)?;
        let header = config.cluster_header.to_ascii_lowercase();
        if header.is_empty()
            || header.starts_with(':')
            || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::field("cluster_header", "must be a header name such as x-edgewise-cluster"));
        }
        if let Some(m) = &config.management {
            if m.cluster.is_empty() {
                return Err(ConfigError::field("management.cluster", "must name an Envoy cluster"));
            }
            if !m.path.starts_with('/') {
                return Err(ConfigError::field("management.path", "must start with /"));
            }
            if m.poll_interval_ms < 100 {
                return Err(ConfigError::field("management.poll_interval_ms", "must be at least 100"));
            }
            if m.timeout_ms == 0 {
                return Err(ConfigError::field("management.timeout_ms", "must be positive"));
            }
        } else if config.routes.is_empty() {
            return Err(ConfigError::field("routes", "is empty and no `management` service is configured"));
        }
        let inline = RouteTable::compile(&decoder, config.routes, "routes", 0)?;
        Ok(Router { decoder, cluster_header: header, management: config.management, inline, polled: None })
    }

    /// Parses and compiles a management document (`{"version": N, "routes": [...]}`) route by
    /// route, so that a large table never exists twice in memory; does not install it.
    pub fn compile_table(&self, doc: &[u8]) -> Result<RouteTable, ConfigError> {
        let (mut version, mut routes) = (None, None);
        let mut r = Reader::new(doc);
        r.object(&Field::Root, |r, key| {
            let at = Field::Root.key(&key);
            match &*key {
                "version" => version = Some(r.u64(&at)?),
                "routes" => {
                    let mut builder = TableBuilder::new(&self.decoder, "routes");
                    r.array(&at, |r, i| builder.add(<RouteSpec as FromJson>::from_json(r, &at.index(i))?))?;
                    routes = Some(builder);
                }
                other => return Err(Field::Root.unknown(other, &["version", "routes"]).into()),
            }
            Ok::<_, ConfigError>(())
        })?;
        r.end()?;
        let version = version.ok_or_else(|| Field::Root.key("version").missing())?;
        Ok(routes.ok_or_else(|| Field::Root.key("routes").missing())?.finish(version))
    }

    pub fn install(&mut self, table: RouteTable) {
        self.polled = Some(table);
    }

    pub fn polled(&self) -> Option<&RouteTable> {
        self.polled.as_ref()
    }

    pub fn decide<'a>(&'a self, authority: &str, scratch: &mut Scratch) -> Decision<'a> {
        match self.decoder.decode(authority, scratch) {
            Decoded::NotOurs => Decision::PassThrough,
            Decoded::Malformed => Decision::Reject(
                Outcome::MalformedHost,
                Reply::new(
                    404,
                    "malformed_host",
                    format!("{authority} is not a valid function host under {}", self.decoder.domain),
                ),
            ),
            Decoded::Key => {
                let key = scratch.key.as_str();
                if let Some(target) = self.polled.as_ref().and_then(|t| t.get(key)).or_else(|| self.inline.get(key)) {
                    return Decision::Route(target);
                }
                if self.management.is_some() && self.polled.is_none() {
                    return Decision::Reject(
                        Outcome::TableUnavailable,
                        Reply::new(
                            503,
                            "route_table_unavailable",
                            format!("the route table has not been loaded yet; cannot route {authority}"),
                        ),
                    );
                }
                Decision::Reject(
                    Outcome::UnknownFunction,
                    Reply::new(404, "unknown_function", format!("no function is deployed at {authority}")),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(json: &str) -> Router {
        Router::from_json(json.as_bytes()).unwrap()
    }

    fn config_error(json: &str) -> String {
        Router::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    const ONE_ROUTE: &str = r#"{"routes":[{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},
        "cluster":"customer-a","host":"hello.ns-42.knative.example.com"}]}"#;

    fn decide(r: &Router, authority: &str) -> Result<(String, String), (u32, &'static str)> {
        let mut s = r.decoder.scratch();
        match r.decide(authority, &mut s) {
            Decision::PassThrough => Err((0, "pass")),
            Decision::Route(t) => Ok((t.cluster.to_string(), t.host.to_string())),
            Decision::Reject(_, reply) => Err((reply.status, reply.error)),
        }
    }

    #[test]
    fn decodes_the_default_layout() {
        let r = router(ONE_ROUTE);
        let routed = Ok(("customer-a".to_string(), "hello.ns-42.knative.example.com".to_string()));
        let table: &[(&str, Result<(String, String), (u32, &str)>)] = &[
            ("0000000a-0000000b-000000000c.serverless.gitlab.io", routed.clone()),
            ("0000000A-0000000B-000000000C.Serverless.GitLab.IO", routed.clone()),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io.", routed.clone()),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io:443", routed.clone()),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io.:8443", routed),
            ("0000000a-0000000b-000000000d.serverless.gitlab.io", Err((404, "unknown_function"))),
            ("0000000a-0000000b-00000000c.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("0000000a-0000000b-0000000000c.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("0000000g-0000000b-000000000c.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("x.0000000a-0000000b-000000000c.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("0000000a-0000000b-000000000c.x.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("0000000a_0000000b_000000000c.serverless.gitlab.io", Err((404, "malformed_host"))),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io..", Err((0, "pass"))),
            ("serverless.gitlab.io", Err((0, "pass"))),
            ("www.example.com", Err((0, "pass"))),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io.evil.com", Err((0, "pass"))),
            ("0000000a-0000000b-000000000cserverless.gitlab.io", Err((0, "pass"))),
            ("[::1]:443", Err((0, "pass"))),
            ("", Err((0, "pass"))),
        ];
        for (authority, want) in table {
            assert_eq!(&decide(&r, authority), want, "authority {authority:?}");
        }
    }

    #[test]
    fn the_default_layout_fast_path_agrees_with_the_pattern() {
        let r = router(ONE_ROUTE);
        let mut a = r.decoder.scratch();
        let mut labels: Vec<String> = vec![
            "0000000a-0000000b-000000000c".into(),
            "0000000A-0000000B-000000000C".into(),
            "abcdef01-23456789-abcdef0123".into(),
            "0000000a-0000000b-000000000".into(),
            "0000000a-0000000b-000000000cc".into(),
            "0000000a_0000000b-000000000c".into(),
            "0000000g-0000000b-000000000c".into(),
            "0000000a-0000000b-000000000c-".into(),
            "-0000000a-0000000b-000000000c".into(),
            "é000000a-0000000b-000000000c".into(),
            "".into(),
        ];
        // Every single-character change of a valid label, at every position.
        let valid = "0123abcd-4567ef89-abcdef0123";
        for i in 0..valid.len() {
            for c in ['0', 'f', 'F', 'g', '-', '.', '_', 'é'] {
                let mut l: Vec<char> = valid.chars().collect();
                l[i] = c;
                labels.push(l.into_iter().collect());
            }
        }
        for label in labels {
            let host = format!("{label}.serverless.gitlab.io");
            let decoded = r.decoder.decode(&host, &mut a);
            assert_eq!((decoded, a.key.clone()), r.decoder.decode_with_pattern(&host), "{host}");
        }
    }

    #[test]
    fn custom_domain_and_pattern() {
        // The layout GitLab shipped: <function>-<cluster uuid: 14 hex><environment id hex>-<environment slug>.
        let r = router(
            r#"{"domain":"Pages.Example.com.",
                "pattern":"(?P<function>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<cluster>[0-9a-f]{14})(?P<environment>[0-9a-f]+)-(?:[a-z0-9-]+)",
                "routes":[{"match":{"function":"my-func","cluster":"a1b2c3d4e5f607","environment":"2a"},
                           "cluster":"k8s-7","host":"my-func.prod-42.example.net"}]}"#,
        );
        assert_eq!(r.decoder.groups(), ["function", "cluster", "environment"]);
        assert_eq!(
            decide(&r, "my-func-a1b2c3d4e5f6072a-production.pages.example.com"),
            Ok(("k8s-7".into(), "my-func.prod-42.example.net".into()))
        );
        assert_eq!(decide(&r, "my-func-a1b2c3d4e5f6072b-production.pages.example.com"), Err((404, "unknown_function")));
        assert_eq!(decide(&r, "my-func.pages.example.com"), Err((404, "malformed_host")));
        assert_eq!(decide(&r, "0000000a-0000000b-000000000c.serverless.gitlab.io"), Err((0, "pass")));
    }

    #[test]
    fn polled_table_wins_and_unknown_before_first_load_is_503() {
        let mut r = router(r#"{"management":{"cluster":"mgmt"}}"#);
        assert_eq!(
            decide(&r, "0000000a-0000000b-000000000c.serverless.gitlab.io"),
            Err((503, "route_table_unavailable"))
        );
        let t = r
            .compile_table(br#"{"version":7,"routes":[{"match":{"project":"0000000A","environment":"0000000b","function":"000000000c"},"cluster":"b","host":"h.example"}]}"#)
            .unwrap();
        assert_eq!(t.version, 7);
        r.install(t);
        assert_eq!(
            decide(&r, "0000000a-0000000b-000000000c.serverless.gitlab.io"),
            Ok(("b".into(), "h.example".into()))
        );
        assert_eq!(decide(&r, "0000000a-0000000b-000000000d.serverless.gitlab.io"), Err((404, "unknown_function")));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (r#"{"domian":"x"}"#, "unknown field `domian`"),
            (r#"{}"#, "`routes` is empty"),
            (r#"{"domain":"a b","routes":[]}"#, "`domain`"),
            (r#"{"pattern":"(","management":{"cluster":"m"}}"#, "`pattern`"),
            (r#"{"pattern":"[0-9a-f]+","management":{"cluster":"m"}}"#, "`pattern` needs at least one named group"),
            (
                r#"{"pattern":"(?P<a>x)(y)","management":{"cluster":"m"}}"#,
                "`pattern` at offset 9: a plain group; use (?:...)",
            ),
            (r#"{"cluster_header":":authority","management":{"cluster":"m"}}"#, "`cluster_header`"),
            (r#"{"management":{"cluster":"m","poll_interval_ms":5}}"#, "`management.poll_interval_ms`"),
            (r#"{"management":{"cluster":"m","path":"x"}}"#, "`management.path`"),
            (r#"{"routes":[{"match":{"project":"0000000a"},"cluster":"c","host":"h"}]}"#, "`routes[0].match`"),
            (
                r#"{"routes":[{"match":{"project":"a","environment":"b","function":"c"},"cluster":"","host":"h"}]}"#,
                "`routes[0].cluster`",
            ),
            (
                r#"{"routes":[{"match":{"project":"a","environment":"b","function":"c"},"cluster":"c","host":"h/x"}]}"#,
                "`routes[0].host`",
            ),
            (
                r#"{"routes":[{"match":{"project":"a","environment":"b","function":"c"},"cluster":"c","host":"h"},
                              {"match":{"project":"A","environment":"b","function":"c"},"cluster":"c","host":"h"}]}"#,
                "`routes[1].match` duplicates",
            ),
            (r#"{"routes":[{"match":{},"cluster":"c","host":"h","extra":1}]}"#, "unknown field `extra`"),
        ];
        for (json, want) in cases {
            let err = config_error(json);
            assert!(err.contains(want), "config {json}: got {err:?}, want it to contain {want:?}");
        }
    }

    /// The derived reader accepts exactly what the serde derive (the JSON Schema's source) accepts,
    /// with the same result.
    #[test]
    fn the_reader_agrees_with_the_schema_types() {
        let docs = [
            "{}",
            ONE_ROUTE,
            r#"{"domain":"d.example","pattern":"(?P<f>[a-z]+)","cluster_header":"x-c","routes":[],
                "management":{"cluster":"m","authority":"a","path":"/p","poll_interval_ms":100,"timeout_ms":1}}"#,
            r#"{"management":null}"#,
            r#"{"management":{"cluster":"m"}}"#,
            r#"{"routes":[{"match":{"a":"b"},"cluster":"c","host":"h"}],"routes":[]}"#,
            r#"{"management":{"path":"/p"}}"#,
            r#"{"management":{"cluster":"m","timeout_ms":-1}}"#,
            r#"{"management":{"cluster":"m","timeout_ms":1.5}}"#,
            r#"{"routes":[{"match":{"a":"b"},"cluster":"c"}]}"#,
            r#"{"routes":[{"match":{"a":1},"cluster":"c","host":"h"}]}"#,
            r#"{"routes":{}}"#,
            r#"{"routes":null}"#,
            r#"{"domain":null}"#,
            r#"{"pattern":"x","other":1}"#,
            r#"{"domain":"a\u0062c"}"#,
            "",
            "{} x",
        ];
        // Stricter where serde is lax: it would take a struct as the list of its fields' values.
        assert!(json::parse::<Config>(b"[]").is_err());
        crate::generic::json::assert_reads_like_serde::<Config, _>(&docs, crate::generic::json::parse::<Config>);
    }

    #[test]
    fn bad_management_documents_are_refused() {
        let r = router(r#"{"management":{"cluster":"mgmt"}}"#);
        let good = r#"{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},"cluster":"c","host":"h"}"#;
        let cases = [
            ("not json".to_string(), "not valid JSON at byte 0: expected a value"),
            ("{}".to_string(), "`version` is required"),
            (r#"{"version":1}"#.to_string(), "`routes` is required"),
            (r#"{"version":1,"routes":[],"extra":0}"#.to_string(), "unknown field `extra`"),
            (r#"{"version":-1,"routes":[]}"#.to_string(), "`version` must be a non-negative integer"),
            (r#"{"version":1,"routes":[{"match":{},"cluster":"c"}]}"#.to_string(), "`routes[0].host` is required"),
            (
                r#"{"version":1,"routes":[{"match":{"project":1}}]}"#.to_string(),
                "`routes[0].match.project` must be a string",
            ),
            (
                format!(r#"{{"version":1,"routes":[{good},{{"match":{{}},"cluster":"c","host":"h"}}]}}"#),
                "`routes[1].match`",
            ),
            (format!(r#"{{"version":1,"routes":[{good},{good}]}}"#), "`routes[1].match` duplicates"),
            (format!(r#"{{"version":1,"routes":[{good}]}} trailing"#), "trailing characters"),
            ("\u{feff}".to_string(), "expected a value"),
        ];
        for (doc, want) in cases {
            let err = r.compile_table(doc.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{doc}: got {err:?}, want {want:?}");
        }
        assert!(r.compile_table(b"\xff\xfe").is_err());
        assert_eq!(r.compile_table(format!(r#"{{"routes":[{good}],"version":3}}"#).as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn large_tables_load_and_serve() {
        let r = router(r#"{"management":{"cluster":"mgmt"}}"#);
        let mut doc = String::from(r#"{"version":1,"routes":["#);
        for i in 0..100_000u64 {
            if i > 0 {
                doc.push(',');
            }
            doc.push_str(&format!(
                r#"{{"match":{{"project":"{:08x}","environment":"{:08x}","function":"{:010x}"}},"cluster":"c{}","host":"f{i}.example"}}"#,
                i % 977,
                i / 977,
                i,
                i % 7
            ));
        }
        doc.push_str("]}");
        let table = r.compile_table(doc.as_bytes()).unwrap();
        assert_eq!(table.len(), 100_000);
        let mut r = r;
        r.install(table);
        let host = format!("{:08x}-{:08x}-{:010x}.serverless.gitlab.io", 99_999 % 977, 99_999 / 977, 99_999);
        assert_eq!(decide(&r, &host), Ok(("c4".into(), "f99999.example".into())));
    }
}

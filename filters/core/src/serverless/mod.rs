//! Serverless ingress: `<8hex>-<8hex>-<10hex>.serverless.<domain>` -> the function's Knative host
//! and the Envoy cluster (one per customer cluster) that reaches it over mutual TLS.
//!
//! The host is decoded by a pattern with named groups (regex syntax, `crate::generic::pattern`), compiled
//! once at configure time. The values of the named groups, in pattern order, form the route key;
//! routes name the same groups. Routes are kept as packed records in buckets (`table`); the
//! management service's documents (whole-table pages and watch answers) are read by `protocol`;
//! `query` is the service's side of the same protocol (its query, cursors and page tokens).

pub mod protocol;
pub mod query;
pub mod table;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::generic::authority;
use crate::generic::config::ConfigError;
use crate::generic::json::{self, Field, FromJson};
use crate::generic::pattern::{self, Pattern};
use crate::generic::reply::Reply;
use table::{LocalTable, RouteRef};

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
    /// A management service the filter loads and watches the route table from.
    #[serde(default)]
    pub management: Option<Management>,
}

/// One function: the values of the pattern's named groups (or a custom domain) -> where it runs.
#[derive(Debug, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The values of the pattern's named groups; empty for a custom domain's route.
    #[serde(rename = "match", default)]
    pub matches: BTreeMap<String, String>,
    /// A custom domain (a whole host outside the serverless domain, e.g. `app.example.com`)
    /// routed to the function instead of a decoded host; exclusive with `match`.
    #[serde(default)]
    pub domain: Option<String>,
    /// The Envoy cluster of the customer's cluster (its ingress gateway, over mTLS).
    pub cluster: String,
    /// The Host the function's Knative service answers to.
    pub host: String,
}

/// Where the route table comes from. The calls go through an Envoy cluster.
#[derive(Debug, Clone, Deserialize, FromJson)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Management {
    pub cluster: String,
    #[serde(default = "default_mgmt_authority")]
    pub authority: String,
    #[serde(default = "default_mgmt_path")]
    pub path: String,
    /// Between two fetches of the whole table, for a service that does not watch (its answers
    /// carry no cursor); a service that watches answers as soon as something changes.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Longest time one call may take, on top of the `wait_seconds` of a watch.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long the service may hold a watch with nothing to send (1 to 30).
    #[serde(default = "default_wait_seconds")]
    pub wait_seconds: u64,
    /// Routes asked for in one page of the whole table.
    #[serde(default = "default_page_size")]
    pub page_size: u64,
    /// Longest wait between attempts after failures (the wait doubles from 250 ms; an Envoy
    /// waits between half of it and all of it, at random, so that Envoys that failed together,
    /// as when a replica of the service goes, do not come back together).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Largest answer taken; a larger one is refused and changes nothing.
    #[serde(default = "default_max_answer_bytes")]
    pub max_answer_bytes: u64,
    /// Natively, watch through one streamed answer the service writes each change to
    /// (`&stream=1`), not one call per change; proxy-wasm always asks once per change.
    #[serde(default = "default_stream")]
    pub stream: bool,
}

impl Management {
    /// The wait after `failures` failed attempts in a row (at least 1), in ms: 250 ms doubling
    /// up to `max_backoff_ms`, less a part of up to half of it drawn from `seed` (one per Envoy,
    /// at random) and `failures`.
    pub fn backoff_ms(&self, failures: u64, seed: u64) -> u64 {
        let most = (250u64 << failures.min(10)).min(self.max_backoff_ms);
        most - mix(seed ^ failures) % (most / 2 + 1)
    }
}

/// splitmix64's finalizer: every bit of `x` moves every bit of the result.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
fn default_wait_seconds() -> u64 {
    25
}
fn default_page_size() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_max_answer_bytes() -> u64 {
    64 << 20
}
fn default_stream() -> bool {
    true
}

/// Decodes hosts: the domain suffix check and the compiled pattern.
#[derive(Debug)]
pub struct HostDecoder {
    domain: String,
    /// `None` for the default layout, which `decode_default` reads without the matcher.
    pattern: Option<Pattern>,
    groups: Vec<String>,
}

/// Per-request scratch space, reused, so that decoding a host and finding its route allocate
/// nothing.
#[derive(Debug, Clone)]
pub struct Scratch {
    matching: pattern::Scratch,
    key: Vec<u8>,
    /// The bucket of the key, when it comes from outside the filter (shared data).
    bucket: Vec<u8>,
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
        Scratch { matching, key: Vec::with_capacity(64), bucket: Vec::new() }
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
                scratch.key.push(b'/');
            }
            if let Some(value) = pattern.group(i, &scratch.matching).and_then(|(s, e)| prefix.get(s..e)) {
                scratch.key.extend(value.bytes().map(|c| c.to_ascii_lowercase()));
            }
        }
        Decoded::Key
    }

    /// Decodes with the matcher whatever the pattern (for the differential test).
    #[cfg(test)]
    fn decode_with_pattern(&self, authority: &str) -> (Decoded, Vec<u8>) {
        let Ok(slow) = HostDecoder::with_pattern(self.domain.clone(), DEFAULT_PATTERN) else {
            panic!("the default pattern compiles");
        };
        assert_eq!(slow.groups, self.groups);
        let mut scratch = slow.scratch();
        let decoded = slow.decode(authority, &mut scratch);
        let key = match decoded {
            Decoded::Key => pack_default(&scratch.key).unwrap_or_default(),
            _ => Vec::new(),
        };
        (decoded, key)
    }

    /// The route key of a custom domain route: a DNS name outside the serverless domain.
    pub fn custom_domain_key(&self, domain: &str) -> Result<Vec<u8>, String> {
        let name = authority::normalize_domain(domain).map_err(|e| format!("{domain:?} {e}"))?;
        if name == self.domain || authority::strip_domain(&name, &self.domain).is_some() {
            return Err(format!("{domain:?} is under the serverless domain {}", self.domain));
        }
        let mut key = Vec::with_capacity(DOMAIN_KEY_MIN.max(name.len() + 1));
        domain_key(&name, &mut key);
        Ok(key)
    }

    /// The route key of group values as a management service keeps them: in the pattern's
    /// group order, joined by '/'; `None` if they are not the default layout's hex digits.
    pub fn key_of_values(&self, values: &str) -> Option<Vec<u8>> {
        self.packed(values.to_ascii_lowercase().into_bytes())
    }

    /// The key of lowercased group values joined by '/': packed for the default layout (`None`
    /// if they are not its hex digits), as they are for a pattern of one's own.
    fn packed(&self, values: Vec<u8>) -> Option<Vec<u8>> {
        match self.pattern {
            None => pack_default(&values),
            Some(_) => Some(values),
        }
    }

    /// The route key of a route's `match`, built the same way as a decoded host's.
    pub fn key_of(&self, matches: &BTreeMap<String, String>) -> Result<Vec<u8>, String> {
        if matches.len() != self.groups.len() || !self.groups.iter().all(|g| matches.contains_key(g)) {
            return Err(format!("must name exactly the pattern's groups {:?}", self.groups));
        }
        let mut key = Vec::new();
        for (i, group) in self.groups.iter().enumerate() {
            if i > 0 {
                key.push(b'/');
            }
            let value = matches.get(group).map(String::as_str).unwrap_or_default();
            if value.is_empty() || value.contains('/') {
                return Err(format!("group `{group}` has an invalid value {value:?}"));
            }
            key.extend(value.bytes().map(|c| c.to_ascii_lowercase()));
        }
        self.packed(key)
            .ok_or_else(|| "must be 8, 8 and 10 hex digits for project, environment and function".to_string())
    }
}

/// `DEFAULT_PATTERN` without the matcher: 8 hex, `-`, 8 hex, `-`, 10 hex; the key is the 26
/// digits packed two to a byte (13 bytes), as `pack_default` packs a route's.
fn decode_default(prefix: &str, key: &mut Vec<u8>) -> Decoded {
    let b = prefix.as_bytes();
    let (Some(p), Some(e), Some(f)) = (b.get(0..8), b.get(9..17), b.get(18..28)) else {
        return Decoded::Malformed;
    };
    if b.len() != 28 || b.get(8) != Some(&b'-') || b.get(17) != Some(&b'-') {
        return Decoded::Malformed;
    }
    if pack_hex([p, e, f].into_iter().flatten().copied(), key) {
        Decoded::Key
    } else {
        key.clear();
        Decoded::Malformed
    }
}

/// Packs hex digits two to a byte; false at the first that is not one.
fn pack_hex(digits: impl Iterator<Item = u8>, out: &mut Vec<u8>) -> bool {
    let mut high = None;
    for d in digits {
        let Some(n) = (d as char).to_digit(16) else {
            return false;
        };
        match high.take() {
            None => high = Some(n as u8),
            Some(h) => out.push(h << 4 | n as u8),
        }
    }
    if let Some(h) = high {
        out.push(h << 4);
    }
    true
}

/// The default layout's key (`project/environment/function`, 8, 8 and 10 hex digits) packed.
fn pack_default(key: &[u8]) -> Option<Vec<u8>> {
    let mut parts = key.split(|&b| b == b'/');
    let (p, e, f) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || p.len() != 8 || e.len() != 8 || f.len() != 10 {
        return None;
    }
    let mut out = Vec::with_capacity(13);
    pack_hex([p, e, f].into_iter().flatten().copied(), &mut out).then_some(out)
}

/// Custom domain keys are at least this long, so that one is never a default-layout key (13
/// bytes); they begin with NUL, which no key of a decoded host holds. Route keys of both kinds
/// share one table.
const DOMAIN_KEY_MIN: usize = 14;

/// Whether a route key is a custom domain's.
pub fn is_domain_key(key: &[u8]) -> bool {
    key.len() >= DOMAIN_KEY_MIN && key.first() == Some(&0)
}

/// The route key of a custom domain (`host` without its port, any case, a trailing dot or not):
/// NUL, the lowercased name, NUL padding up to `DOMAIN_KEY_MIN`.
pub fn domain_key(host: &str, key: &mut Vec<u8>) {
    key.clear();
    key.push(0);
    key.extend(host.strip_suffix('.').unwrap_or(host).bytes().map(|b| b.to_ascii_lowercase()));
    if key.len() < DOMAIN_KEY_MIN {
        key.resize(DOMAIN_KEY_MIN, 0);
    }
}

/// Checks a route and packs it into its key and record (`table::encode`). `at` names the
/// route in errors (`routes[3]`).
pub fn record_of(decoder: &HostDecoder, spec: &RouteSpec, at: &Field) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let key = route_key(decoder, spec, at)?;
    let mut record = Vec::with_capacity(3 + key.len() + spec.cluster.len() + spec.host.len());
    table::encode(&key, &spec.cluster, &spec.host, &mut record).map_err(|e| ConfigError::field(at.to_string(), e))?;
    Ok((key, record))
}

/// Checks a route: its key.
pub fn route_key(decoder: &HostDecoder, spec: &RouteSpec, at: &Field) -> Result<Vec<u8>, ConfigError> {
    let key = match &spec.domain {
        None => decoder.key_of(&spec.matches).map_err(|e| ConfigError::field(format!("{at}.match"), e))?,
        Some(_) if !spec.matches.is_empty() => {
            return Err(ConfigError::field(format!("{at}.domain"), "and `match` are exclusive: a route has one"))
        }
        Some(domain) => decoder.custom_domain_key(domain).map_err(|e| ConfigError::field(format!("{at}.domain"), e))?,
    };
    if spec.cluster.is_empty() {
        return Err(ConfigError::field(format!("{at}.cluster"), "must name an Envoy cluster"));
    }
    if authority::split(&spec.host).is_none() || spec.host.bytes().any(|b| b <= b' ' || b == b'/' || b >= 0x7f) {
        return Err(ConfigError::field(format!("{at}.host"), format!("{:?} is not a valid Host", spec.host)));
    }
    Ok(key)
}

/// Where the routes of the management service are: the bucket of a key (or as much of it as
/// holds the key's record), copied into `into`.
pub trait ManagedRoutes {
    /// `false` while no table has been loaded.
    fn bucket(&self, key: &[u8], into: &mut Vec<u8>) -> bool;

    /// Asked when a key is not found: true if the table in force has changed since the last
    /// look (a copy may learn of a new table late), so that the lookup is worth repeating.
    fn moved(&self) -> bool {
        false
    }

    /// Asked when a key is not found: false while the table is still being loaded for the first
    /// time (the key may come with a later page).
    fn complete(&self) -> bool {
        true
    }

    /// False when the table holds no custom domain: a host outside the serverless domain is then
    /// left alone without a lookup.
    fn has_domains(&self) -> bool {
        true
    }
}

impl ManagedRoutes for LocalTable {
    /// Copies the key's record alone (the bucket stays where it is).
    fn bucket(&self, key: &[u8], into: &mut Vec<u8>) -> bool {
        into.clear();
        into.extend_from_slice(table::find_record(LocalTable::bucket(self, key), key).unwrap_or_default());
        true
    }

    fn has_domains(&self) -> bool {
        self.domains() > 0
    }
}

/// The configuration, compiled: everything a request needs, ready.
#[derive(Debug)]
pub struct Router {
    pub decoder: HostDecoder,
    pub cluster_header: String,
    pub management: Option<Management>,
    inline: LocalTable,
}

/// What the filter does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    PassThrough,
    Route(RouteRef<'a>),
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
            check_management(m)?;
        } else if config.routes.is_empty() {
            return Err(ConfigError::field("routes", "is empty and no `management` service is configured"));
        }
        let mut inline = LocalTable::new(LocalTable::bits_for(config.routes.len()));
        let routes = Field::Root.key("routes");
        for (i, spec) in config.routes.iter().enumerate() {
            let at = routes.index(i);
            let (_, record) = record_of(&decoder, spec, &at)?;
            if !inline.put(&record) {
                return Err(ConfigError::field(format!("{at}.match"), "duplicates an earlier route"));
            }
        }
        Ok(Router { decoder, cluster_header: header, management: config.management, inline })
    }

    /// Decides what to do with a request for `authority`. The management service's routes, when
    /// there is one, come first; then the routes of the configuration.
    pub fn decide<'a>(
        &'a self,
        authority: &str,
        scratch: &'a mut Scratch,
        managed: Option<&dyn ManagedRoutes>,
    ) -> Decision<'a> {
        match self.decoder.decode(authority, scratch) {
            Decoded::NotOurs => self.custom_domain(authority, scratch, managed),
            Decoded::Malformed => Decision::Reject(
                Outcome::MalformedHost,
                Reply::new(
                    404,
                    "malformed_host",
                    format!("{authority} is not a valid function host under {}", self.decoder.domain),
                ),
            ),
            Decoded::Key => {
                let key = &scratch.key;
                let mut loaded = managed.map(|m| m.bucket(key, &mut scratch.bucket));
                if let Some(m) =
                    managed.filter(|m| loaded == Some(true) && table::find(&scratch.bucket, key).is_none() && m.moved())
                {
                    loaded = Some(m.bucket(key, &mut scratch.bucket));
                }
                if loaded == Some(true) {
                    if let Some(route) = table::find(&scratch.bucket, key) {
                        return Decision::Route(route);
                    }
                }
                if let Some(route) = self.inline.get(key) {
                    return Decision::Route(route);
                }
                if loaded == Some(false) || managed.is_some_and(|m| !m.complete()) {
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

impl Router {
    /// A host outside the serverless domain: the function of the custom domain it names, if
    /// there is one; otherwise the request is left alone (the route configuration answers it).
    fn custom_domain<'a>(
        &'a self,
        authority: &str,
        scratch: &'a mut Scratch,
        managed: Option<&dyn ManagedRoutes>,
    ) -> Decision<'a> {
        if !self.inline.has_domains() && !managed.is_some_and(|m| m.has_domains()) {
            return Decision::PassThrough;
        }
        let Some((host, _)) = authority::split(authority) else {
            return Decision::PassThrough;
        };
        if host.is_empty() || host.len() > table::MAX_FIELD - 1 {
            return Decision::PassThrough;
        }
        domain_key(host, &mut scratch.key);
        let key = &scratch.key;
        if let Some(m) = managed {
            if m.bucket(key, &mut scratch.bucket) {
                if let Some(route) = table::find(&scratch.bucket, key) {
                    return Decision::Route(route);
                }
            }
        }
        match self.inline.get(key) {
            Some(route) => Decision::Route(route),
            None => Decision::PassThrough,
        }
    }
}

fn check_management(m: &Management) -> Result<(), ConfigError> {
    let field = |name: &str, reason: &str| Err(ConfigError::field(format!("management.{name}"), reason));
    if m.cluster.is_empty() {
        return field("cluster", "must name an Envoy cluster");
    }
    if !m.path.starts_with('/') || m.path.contains(['?', '#']) {
        return field("path", "must start with / and have no query");
    }
    if m.poll_interval_ms < 100 {
        return field("poll_interval_ms", "must be at least 100");
    }
    if m.timeout_ms == 0 {
        return field("timeout_ms", "must be positive");
    }
    if !(1..=30).contains(&m.wait_seconds) {
        return field("wait_seconds", "must be 1 to 30");
    }
    if !(1..=100_000).contains(&m.page_size) {
        return field("page_size", "must be 1 to 100000");
    }
    if m.max_backoff_ms < 250 {
        return field("max_backoff_ms", "must be at least 250");
    }
    if m.max_answer_bytes < 1024 {
        return field("max_answer_bytes", "must be at least 1024");
    }
    Ok(())
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
        decide_with(r, None, authority)
    }

    fn decide_with(
        r: &Router,
        managed: Option<&LocalTable>,
        authority: &str,
    ) -> Result<(String, String), (u32, &'static str)> {
        let mut s = r.decoder.scratch();
        match r.decide(authority, &mut s, managed.map(|m| m as &dyn ManagedRoutes)) {
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
    fn custom_domains_route_their_whole_host_and_nothing_else() {
        let r = router(
            r#"{"routes":[{"domain":"App.Example.COM","cluster":"customer-a","host":"hello.knative.example"},
            {"domain":"a.io","cluster":"customer-b","host":"b.knative.example"}]}"#,
        );
        let a = Ok(("customer-a".to_string(), "hello.knative.example".to_string()));
        let b = Ok(("customer-b".to_string(), "b.knative.example".to_string()));
        for (authority, want) in [
            ("app.example.com", a.clone()),
            ("APP.example.com:443", a.clone()),
            ("app.example.com.", a),
            ("a.io", b),
            ("www.app.example.com", Err((0, "pass"))),
            ("example.com", Err((0, "pass"))),
            ("app.example.com.evil", Err((0, "pass"))),
            ("app.example.com\0", Err((0, "pass"))),
            ("[::1]", Err((0, "pass"))),
            ("", Err((0, "pass"))),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io", Err((404, "unknown_function"))),
        ] {
            assert_eq!(decide(&r, authority), want, "authority {authority:?}");
        }
        // A domain key is never the key of a decoded host: a NUL first, and never 13 bytes.
        let mut key = Vec::new();
        domain_key("a.io", &mut key);
        assert_eq!(key, b"\0a.io\0\0\0\0\0\0\0\0\0");
        domain_key(&"x".repeat(40), &mut key);
        assert_eq!((key.len(), key[0]), (41, 0));
        for (bad, why) in [
            (r#"{"domain":"a.serverless.gitlab.io","cluster":"c","host":"h"}"#, "under the serverless domain"),
            (r#"{"domain":"serverless.gitlab.io","cluster":"c","host":"h"}"#, "under the serverless domain"),
            (r#"{"domain":"*.example.com","cluster":"c","host":"h"}"#, "DNS name"),
            (r#"{"domain":"a b.com","cluster":"c","host":"h"}"#, "DNS name"),
            (r#"{"domain":"a.com","match":{"project":"0000000a"},"cluster":"c","host":"h"}"#, "exclusive"),
        ] {
            let got = config_error(&format!(r#"{{"routes":[{bad}]}}"#));
            assert!(got.contains("routes[0].domain") && got.contains(why), "{bad}: {got}");
        }
    }

    /// A table without custom domains leaves other hosts alone with no lookup; one that has
    /// them (inline or from the management service) routes them, and stops once they are gone.
    #[test]
    fn custom_domains_of_the_management_service_are_counted_and_routed() {
        let r = router(ONE_ROUTE);
        assert!(!r.inline.has_domains());
        let mut managed = LocalTable::new(4);
        let (key, record) = record_of(
            &r.decoder,
            &RouteSpec {
                matches: BTreeMap::new(),
                domain: Some("app.example.com".into()),
                cluster: "customer-b".into(),
                host: "b.knative.example".into(),
            },
            &Field::Root,
        )
        .unwrap();
        assert!(is_domain_key(&key) && !is_domain_key(&pack_default(b"0000000a/0000000b/000000000c").unwrap()));
        assert_eq!(decide_with(&r, Some(&managed), "app.example.com"), Err((0, "pass")));
        assert!(managed.put(&record) && managed.has_domains());
        let routed = Ok(("customer-b".to_string(), "b.knative.example".to_string()));
        assert_eq!(decide_with(&r, Some(&managed), "App.Example.com"), routed);
        let edited = managed.edited(&key, None);
        managed.replace(edited, false);
        assert_eq!((managed.domains(), managed.len()), (0, 0));
        assert_eq!(decide_with(&r, Some(&managed), "app.example.com"), Err((0, "pass")));
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

    /// Reads a whole-table document into a table, as the filter does with a page.
    fn load(r: &Router, doc: &str) -> Result<(u64, LocalTable), String> {
        let mut table = LocalTable::new(table::MANAGED_BITS);
        let mut batch = table::Batch::default();
        let page = protocol::read_page(&r.decoder, doc.as_bytes(), &mut batch).map_err(|e| e.to_string())?;
        table.put_batch(&batch);
        Ok((page.version, table))
    }

    #[test]
    fn managed_routes_win_and_unknown_before_first_load_is_503() {
        struct Unloaded;
        impl ManagedRoutes for Unloaded {
            fn bucket(&self, _: &[u8], _: &mut Vec<u8>) -> bool {
                false
            }
        }
        let r = router(ONE_ROUTE);
        let a = "0000000a-0000000b-000000000c.serverless.gitlab.io";
        let mut s = r.decoder.scratch();
        let unloaded = r.decide("0000000a-0000000b-000000000d.serverless.gitlab.io", &mut s, Some(&Unloaded));
        assert!(matches!(unloaded, Decision::Reject(Outcome::TableUnavailable, _)), "{unloaded:?}");
        let inline = r.decide(a, &mut s, Some(&Unloaded));
        assert!(matches!(inline, Decision::Route(t) if t.cluster == "customer-a"), "configured routes serve meanwhile");
        let (version, t) = load(&r, r#"{"version":7,"routes":[{"match":{"project":"0000000A","environment":"0000000b","function":"000000000c"},"cluster":"b","host":"h.example"}]}"#).unwrap();
        assert_eq!(version, 7);
        assert_eq!(decide_with(&r, Some(&t), a), Ok(("b".into(), "h.example".into())));
        assert_eq!(
            decide_with(&r, Some(&t), "0000000a-0000000b-000000000d.serverless.gitlab.io"),
            Err((404, "unknown_function"))
        );
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
                r#"{"routes":[{"match":{"project":"a","environment":"b","function":"c"},"cluster":"c","host":"h"}]}"#,
                "`routes[0].match` must be 8, 8 and 10 hex digits",
            ),
            (
                r#"{"routes":[{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},"cluster":"","host":"h"}]}"#,
                "`routes[0].cluster`",
            ),
            (
                r#"{"routes":[{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},"cluster":"c","host":"h/x"}]}"#,
                "`routes[0].host`",
            ),
            (
                r#"{"routes":[{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},"cluster":"c","host":"h"},
                              {"match":{"project":"0000000A","environment":"0000000b","function":"000000000c"},"cluster":"c","host":"h"}]}"#,
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
    fn the_backoff_doubles_to_its_bound_and_each_envoy_waits_between_half_of_it_and_all_of_it() {
        let r = router(r#"{"management":{"cluster":"mgmt","max_backoff_ms":10000}}"#);
        let m = r.management.as_ref().unwrap();
        for (failures, most) in [(1, 500), (2, 1_000), (3, 2_000), (5, 8_000), (6, 10_000), (64, 10_000)] {
            let waits: Vec<u64> = (0..1_000u64).map(|seed| m.backoff_ms(failures, mix(seed))).collect();
            assert!(waits.iter().all(|w| (most / 2..=most).contains(w)), "{failures}: {waits:?}");
            // A fleet's Envoys (seeds) spread over the whole span: each quarter of it has its share.
            for quarter in 0..4 {
                let from = most / 2 + quarter * most / 8;
                let within = waits.iter().filter(|&&w| w >= from && w < from + most / 8).count();
                assert!((150..=350).contains(&within), "{failures}: {within} of 1000 in quarter {quarter}");
            }
        }
        // One Envoy's waits are not all the same fraction of the bound.
        let mine: Vec<u64> = (1..=5).map(|f| m.backoff_ms(f, 42) * 1000 / (250 << f)).collect();
        assert!(mine.windows(2).any(|w| w[0] != w[1]), "{mine:?}");
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
            (
                format!(
                    r#"{{"version":1,"routes":[{}]}}"#,
                    good.replace(r#""c","host""#, &format!("{:?},\"host\"", "c".repeat(256)))
                ),
                "`routes[0]` the cluster name is longer than 255 bytes",
            ),
            ("\u{feff}".to_string(), "expected a value"),
        ];
        for (doc, want) in cases {
            let err = load(&r, &doc).err().unwrap_or_default();
            assert!(err.contains(want), "{doc}: got {err:?}, want {want:?}");
        }
        assert!(protocol::read_page(&r.decoder, b"\xff\xfe", &mut table::Batch::default()).is_err());
        assert_eq!(load(&r, &format!(r#"{{"routes":[{good}],"version":3}}"#)).unwrap().1.len(), 1);
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
        let (_, table) = load(&r, &doc).unwrap();
        assert_eq!(table.len(), 100_000);
        let host = format!("{:08x}-{:08x}-{:010x}.serverless.gitlab.io", 99_999 % 977, 99_999 / 977, 99_999);
        assert_eq!(decide_with(&r, Some(&table), &host), Ok(("c4".into(), "f99999.example".into())));
    }
}

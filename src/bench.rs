//! The configurations `make bench` measures, shared by its instruments: edgewise-bench (CPU time
//! per request, paired against a reference Envoy) and edgewise-instructions (instructions per
//! request under callgrind). Each is a front Envoy (bench/front.yaml) with the filters under test
//! spliced in, the Host and path it is sent, and the bearer tokens it needs.

use std::fmt::Write as _;

use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::callgrind::{self, PerUnit, Profile};
use crate::envoy::{Config, Envoy, Options};
use crate::ratelimit::{RateLimitService, Redis};
use crate::server::{Document, Listen, Server};

pub const SERVERLESS_HOST: &str = "0000000a-0000000b-000000000c.serverless.gitlab.io";
pub const EGRESS_HOST: &str = "api.github.com.egress.local";

#[derive(Clone)]
pub struct Bench {
    pub name: &'static str,
    pub what: &'static str,
    /// The Host wrk sends, and the path.
    pub host: &'static str,
    pub path: &'static str,
    pub filters: String,
    /// Bearer tokens wrk sends, one per request in turn (none: no Authorization header).
    pub tokens: Tokens,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    None,
    /// The same token on every request (a cache hit after the first).
    One,
    /// A new token on every request (a cache miss, signature verified every time).
    Fresh,
    /// 1,000 tokens of 1,000 organizations in turn (cache hits after the first round): what a
    /// shared counter per organization sees from a busy gateway.
    Many,
}

pub fn wasm_filter(name: &str, config: &str) -> String {
    let file = crate::filters_dir().join(format!("{name}.wasm"));
    format!(
        r#"          - name: edgewise.{name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {file} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{config}'
"#,
        file = file.display()
    )
}

/// The same filter in libedgewise.so (the native build), with the same configuration.
pub fn native_filter(name: &str, config: &str) -> String {
    dynamic_module(name, &crate::filters_dir().join("libedgewise.so"), Some(config))
}

/// A filter of a dynamic module: `filter_name` and its configuration (a string), if any.
fn dynamic_module(name: &str, file: &Path, config: Option<&str>) -> String {
    let config = config.map_or(String::new(), |config| {
        format!(
            r#"              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{config}'
"#
        )
    });
    format!(
        r#"          - name: edgewise.{name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config:
                module: {{ local: {{ filename: {file} }} }}
                do_not_close: true
                metrics_namespace: edgewise
              filter_name: {name}
{config}"#,
        file = file.display()
    )
}

/// The native variant of a wasm configuration (`wasm_filter`'s output).
pub fn native(wasm: &str) -> String {
    let name = wasm.split("name: edgewise.").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default();
    let config = wasm.split("value: '").nth(1).and_then(|r| r.rsplit_once('\'')).map(|(c, _)| c).unwrap_or_default();
    native_filter(name, config)
}

/// The serverless filter's routes: `n` of them, the benchmarked host among them.
pub fn serverless_routes(n: u64) -> String {
    let mut routes = Vec::with_capacity(n as usize);
    routes.push(r#"{"match":{"project":"0000000a","environment":"0000000b","function":"000000000c"},"cluster":"upstream","host":"hello.ns-42.knative.example"}"#.to_string());
    for i in 1..n {
        routes.push(format!(
            r#"{{"match":{{"project":"{:08x}","environment":"{:08x}","function":"{:010x}"}},"cluster":"upstream","host":"f{i}.knative.example"}}"#,
            i % 1000 + 0x1000,
            i / 1000,
            i
        ));
    }
    routes.join(",")
}

pub fn serverless_config(n: u64) -> String {
    format!(r#"{{"routes":[{}]}}"#, serverless_routes(n))
}

/// The same host rewrite as the serverless filter, in Envoy's Lua filter (10 routes). Like the
/// filter, it has the route matched again: the cluster the route sends to is the one it chose.
/// (Lua's header edits leave the route Envoy matched before the filter in force.)
pub fn lua_serverless() -> String {
    let mut table = String::from(r#"["0000000a/0000000b/000000000c"] = {"upstream", "hello.ns-42.knative.example"},"#);
    for i in 1..10u64 {
        let _ =
            write!(table, r#"["{:08x}/{:08x}/{:010x}"] = {{"upstream", "f{i}.knative.example"}},"#, i + 0x1000, 0, i);
    }
    format!(
        r#"          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  local suffix = ".serverless.gitlab.io"
                  local routes = {{ {table} }}
                  function envoy_on_request(h)
                    local headers = h:headers()
                    headers:remove("x-edgewise-cluster")
                    local authority = headers:get(":authority")
                    if authority == nil then return end
                    local host = string.lower(authority):gsub(":%d+$", ""):gsub("%.$", "")
                    if host:sub(-#suffix) ~= suffix then return end
                    local p, e, f = host:sub(1, -#suffix - 1):match("^(%x%x%x%x%x%x%x%x)%-(%x%x%x%x%x%x%x%x)%-(%x%x%x%x%x%x%x%x%x%x)$")
                    if p == nil then
                      h:respond({{[":status"] = "404", ["content-type"] = "application/json"}}, '{{"error":"malformed_host"}}')
                      return
                    end
                    local t = routes[p .. "/" .. e .. "/" .. f]
                    if t == nil then
                      h:respond({{[":status"] = "404", ["content-type"] = "application/json"}}, '{{"error":"unknown_function"}}')
                      return
                    end
                    headers:replace("x-forwarded-host", authority)
                    headers:replace("x-edgewise-cluster", t[1])
                    headers:replace(":authority", t[2])
                    h:clearRouteCache()
                  end
"#
    )
}

/// The egress rewrite and allowlist check in Envoy's Lua filter (exact names only), the route
/// matched again as the filter has it: the shipped egress picks its virtual host by destination.
pub fn lua_egress() -> String {
    r#"          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  local suffix = ".egress.local"
                  local allow = { ["api.github.com"] = true, ["hooks.slack.com"] = true, ["example.com"] = true }
                  function envoy_on_request(h)
                    local headers = h:headers()
                    local host = string.lower(headers:get(":authority") or ""):gsub(":%d+$", ""):gsub("%.$", "")
                    if host:sub(-#suffix) ~= suffix then
                      h:respond({[":status"] = "403", ["content-type"] = "application/json"}, '{"error":"not_egress_host"}')
                      return
                    end
                    local dest = host:sub(1, -#suffix - 1)
                    if not allow[dest] then
                      h:respond({[":status"] = "403", ["content-type"] = "application/json"}, '{"error":"destination_not_allowed"}')
                      return
                    end
                    headers:replace(":authority", dest)
                    headers:replace("x-edgewise-egress-destination", dest)
                    h:clearRouteCache()
                  end
"#
    .to_string()
}

pub const ISSUER: &str = "https://gitlab.com";
pub const CC_HOST: &str = "cloud.gitlab.com";

/// cloud-connector as deployed: a feature with a scope, a rate limit that is never reached,
/// identity headers and the HMAC signature; keys from the issuer stand-in of the bench process.
/// With `global`, it also sets the descriptor headers of Envoy's ratelimit filter.
pub fn cloud_connector(lean: bool, global: bool) -> String {
    let (limit, authenticity) = if lean {
        ("", "")
    } else {
        (
            r#","rate_limit":{"requests":1000000,"per":"second"}"#,
            r#","authenticity":{"secret":"a-benchmark-secret-of-at-least-32-bytes"}"#,
        )
    };
    let headers = if global {
        r#","headers":{"feature":"x-edgewise-feature","rate_limit_key":"x-edgewise-ratelimit-key"}"#
    } else {
        ""
    };
    wasm_filter(
        "cloud-connector",
        &format!(
            r#"{{"issuers":[{{"issuer":"{ISSUER}","cluster":"issuer","jwks_path":"/jwks"}}],"features":[{{"name":"code_suggestions","prefix":"/","scopes":["code_suggestions"],"cluster":"upstream"{limit}}}],"cluster_header":"x-edgewise-cluster"{authenticity}{headers}}}"#
        ),
    )
}

/// Envoy's ratelimit filter as envoy/cloud-connector.yaml has it in global mode: every request
/// the filter let through is checked by edgewise-ratelimit (the route's rate_limits, front.yaml).
pub const GLOBAL_RATE_LIMIT: &str = r#"          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: cloud-connector
              failure_mode_deny: false
              timeout: 0.1s
              rate_limit_service:
                transport_api_version: V3
                grpc_service:
                  envoy_grpc: { cluster_name: rate_limit_service }
"#;

/// mesh-identity at the gateway: the same key, inline (its only key source).
pub fn mesh_identity(jwks: &str) -> String {
    wasm_filter(
        "mesh-identity",
        &format!(r#"{{"role":"gateway","jwks":{jwks},"issuers":["{ISSUER}"],"audiences":["gitlab-ai-gateway"]}}"#),
    )
}

/// tunnel-auth as on the hub, the bench's upstream standing in for a tunnel (its cluster id is
/// `upstream`, which the front's route selects by the header).
pub fn tunnel_auth() -> String {
    wasm_filter(
        "tunnel-auth",
        &format!(
            r#"{{"issuers":[{{"issuer":"{ISSUER}","cluster":"issuer","jwks_path":"/jwks"}}],"audiences":["gitlab-ai-gateway"],"allow":{{"instance-0-0":["upstream"]}},"cluster_header":"x-edgewise-cluster"}}"#
        ),
    )
}

/// Envoy's native JWT filter with the same key, optionally with its verified-token cache.
pub fn jwt_authn(jwks: &str, cache: bool) -> String {
    jwt_authn_with(jwks, if cache { JWT_CACHE } else { "" })
}

const JWT_CACHE: &str = "\n                  jwt_cache_config: { jwt_cache_size: 1000 }";

/// Envoy's JWT filter for the bench's issuer, with further lines of its provider.
fn jwt_authn_with(jwks: &str, provider: &str) -> String {
    format!(
        r#"          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                gitlab:
                  issuer: {ISSUER}
                  audiences: [gitlab-ai-gateway]
                  local_jwks: {{ inline_string: '{jwks}' }}
                  forward: true{provider}
              rules:
              - match: {{ prefix: / }}
                requires: {{ provider_name: gitlab }}
"#
    )
}

/// What a platform would run instead of cloud-connector, with Envoy's own filters: jwt_authn
/// (its cache on) copying the identity claims into headers and the payload into metadata, RBAC
/// on the scope claim for the feature's path prefix, local_ratelimit keyed by organization (the
/// instance id, one bucket each, never reached), and header_mutation setting the rest of the
/// identity headers. It does no HMAC signature.
pub fn stock_chain(jwks: &str) -> String {
    let provider = "
                  payload_in_metadata: payload
                  claim_to_headers:
                  - { header_name: x-gitlab-instance-id, claim_name: sub }
                  - { header_name: x-gitlab-realm, claim_name: gitlab_realm }";
    jwt_authn_with(jwks, &format!("{provider}{JWT_CACHE}"))
        + &format!(
            r#"          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  code_suggestions:
                    permissions: [{{ url_path: {{ path: {{ prefix: / }} }} }}]
                    principals:
                    - metadata:
                        filter: envoy.filters.http.jwt_authn
                        path: [{{ key: payload }}, {{ key: scopes }}]
                        value: {{ list_match: {{ one_of: {{ string_match: {{ exact: code_suggestions }} }} }} }}
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: organization
              token_bucket: {{ max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }}
              filter_enabled: {{ default_value: {{ numerator: 100 }} }}
              filter_enforced: {{ default_value: {{ numerator: 100 }} }}
              rate_limits:
              - actions:
                - request_headers: {{ header_name: x-gitlab-instance-id, descriptor_key: organization }}
              descriptors:
              - entries: [{{ key: organization }}]
                token_bucket: {{ max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s }}
              max_dynamic_descriptors: 10000
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - append:
                    header: {{ key: x-gitlab-token-issuer, value: "{ISSUER}" }}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - append:
                    header: {{ key: x-gitlab-feature, value: code_suggestions }}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
"#
        )
}

/// A dynamic module whose hooks do nothing (bench/noop-module), loaded like libedgewise.so.
pub fn noop_module(file: &Path) -> String {
    dynamic_module("noop", file, None)
}

/// The four identity headers cc-hit-lean-native sets on the request it forwards, as
/// bench/noop-module's edits (`set <name> <value>`).
const IDENTITY_EDITS: [&str; 4] = [
    "set x-gitlab-instance-id instance-0-0",
    "set x-gitlab-realm saas",
    "set x-gitlab-scopes code_suggestions,duo_chat",
    "set x-gitlab-token-issuer https://gitlab.com",
];

/// The rest of what cc-hit-lean-native asks of Envoy for the request it forwards: the backend's
/// cluster, the signature header (absent) removed, the access log's three fields.
const LEAN_EDITS: [&str; 5] = [
    "set x-edgewise-cluster upstream",
    "remove x-edgewise-signature",
    "state edgewise.cloud_connector_feature code_suggestions",
    "state edgewise.cloud_connector_outcome allowed",
    "state edgewise.cloud_connector_instance instance-0-0",
];

/// bench/noop-module making fixed edits to every request and nothing else.
pub fn edits_module(file: &Path, edits: &[&str]) -> String {
    dynamic_module("noop", file, Some(&edits.join(";")))
}

/// Every configuration `make bench` measures; `noop` is bench/noop-module's library.
pub fn benches(jwks: &str, noop: &Path) -> Vec<Bench> {
    let serverless = |n| wasm_filter("serverless", &serverless_config(n));
    let egress = wasm_filter(
        "egress",
        r#"{"allow":["api.github.com","*.googleapis.com","hooks.slack.com","example.com:8443"]}"#,
    );
    let egress_native = native(&egress);
    vec![
        Bench {
            name: "baseline",
            what: "no filter",
            host: SERVERLESS_HOST,
            path: "/",
            filters: String::new(),
            tokens: Tokens::None,
        },
        Bench {
            name: "baseline-token",
            what: "no filter, the cloud-connector request with its bearer token: what carrying the token costs Envoy",
            host: CC_HOST,
            path: "/",
            filters: String::new(),
            tokens: Tokens::One,
        },
        Bench {
            name: "serverless-10",
            what: "serverless.wasm, 10 routes",
            host: SERVERLESS_HOST,
            path: "/",
            filters: serverless(10),
            tokens: Tokens::None,
        },
        Bench {
            name: "serverless-100k",
            what: "serverless.wasm, 100,000 routes from the management service",
            host: SERVERLESS_HOST,
            path: "/",
            filters: wasm_filter("serverless", r#"{"management":{"cluster":"management","poll_interval_ms":10000}}"#),
            tokens: Tokens::None,
        },
        Bench {
            name: "wasm-floor",
            what: "serverless.wasm passing through a Host outside its domain: the fixed cost of any wasm filter",
            host: "www.example.com",
            path: "/",
            filters: serverless(10),
            tokens: Tokens::None,
        },
        Bench {
            name: "lua-serverless",
            what: "Lua, the serverless rewrite, 10 routes",
            host: SERVERLESS_HOST,
            path: "/",
            filters: lua_serverless(),
            tokens: Tokens::None,
        },
        Bench {
            name: "egress",
            what: "egress.wasm, 4 allowlist entries",
            host: EGRESS_HOST,
            path: "/",
            filters: egress,
            tokens: Tokens::None,
        },
        Bench {
            name: "lua-egress",
            what: "Lua, the egress rewrite, 3 names",
            host: EGRESS_HOST,
            path: "/",
            filters: lua_egress(),
            tokens: Tokens::None,
        },
        Bench {
            name: "cc-hit",
            what: "cloud-connector.wasm, RS256, the same token (cache hit)",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(false, false),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-hit-lean",
            what: "cloud-connector.wasm, cache hit, no rate limit and no signature",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(true, false),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-hit-global",
            what: "cc-hit and the fleet-wide check (Envoy's ratelimit filter, edgewise-ratelimit on Redis): one organization, one counter",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(false, true) + GLOBAL_RATE_LIMIT,
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-many",
            what: "cloud-connector.wasm, 1,000 organizations' tokens in turn (cache hits)",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(false, true),
            tokens: Tokens::Many,
        },
        Bench {
            name: "cc-many-global",
            what: "cc-many and the fleet-wide check: 1,000 counters",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(false, true) + GLOBAL_RATE_LIMIT,
            tokens: Tokens::Many,
        },
        Bench {
            name: "cc-miss",
            what: "cloud-connector.wasm, RS256, a new token per request",
            host: CC_HOST,
            path: "/",
            filters: cloud_connector(false, false),
            tokens: Tokens::Fresh,
        },
        Bench {
            name: "mesh-identity",
            what: "mesh-identity.wasm, gateway role, RS256 verified on every request (it has no token cache)",
            host: CC_HOST,
            path: "/",
            filters: mesh_identity(jwks),
            tokens: Tokens::One,
        },
        Bench {
            name: "tunnel-auth",
            what: "tunnel-auth.wasm, RS256 token (cache hit), tunnel selected from the path",
            host: "hub.example",
            path: "/clusters/upstream/api/v1/namespaces",
            filters: tunnel_auth(),
            tokens: Tokens::One,
        },
        Bench {
            name: "noop-module",
            what: "a dynamic module whose hooks do nothing: the ABI's own cost",
            host: "www.example.com",
            path: "/",
            filters: noop_module(noop),
            tokens: Tokens::None,
        },
        Bench {
            name: "identity-edits",
            what: "bench/noop-module setting the four identity headers cc-hit-lean-native sets, and doing nothing else",
            host: CC_HOST,
            path: "/",
            filters: edits_module(noop, &IDENTITY_EDITS),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-lean-edits",
            what: "bench/noop-module making cc-hit-lean-native's header and filter-state edits and no other work: the identity headers, the cluster header, a header removed, the access log's fields (the route is not matched again)",
            host: CC_HOST,
            path: "/",
            filters: edits_module(noop, &[&IDENTITY_EDITS[..], &LEAN_EDITS[..]].concat()),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-lean-edits-reroute",
            what: "cc-lean-edits and the route matched again, as cc-hit-lean-native has it: the floor of any native filter making its edits",
            host: CC_HOST,
            path: "/",
            filters: edits_module(noop, &[&IDENTITY_EDITS[..], &LEAN_EDITS[..], &["reroute"]].concat()),
            tokens: Tokens::One,
        },
        Bench {
            name: "native-floor",
            what:
                "libedgewise.so serverless passing through a Host outside its domain: the fixed cost of a native filter",
            host: "www.example.com",
            path: "/",
            filters: native(&serverless(10)),
            tokens: Tokens::None,
        },
        Bench {
            name: "serverless-10-native",
            what: "libedgewise.so serverless, 10 routes",
            host: SERVERLESS_HOST,
            path: "/",
            filters: native(&serverless(10)),
            tokens: Tokens::None,
        },
        Bench {
            name: "serverless-100k-native",
            what: "libedgewise.so serverless, 100,000 routes from the management service",
            host: SERVERLESS_HOST,
            path: "/",
            filters: native_filter("serverless", r#"{"management":{"cluster":"management","poll_interval_ms":10000}}"#),
            tokens: Tokens::None,
        },
        Bench {
            name: "egress-native",
            what: "libedgewise.so egress, 4 allowlist entries",
            host: EGRESS_HOST,
            path: "/",
            filters: egress_native,
            tokens: Tokens::None,
        },
        Bench {
            name: "cc-hit-native",
            what: "libedgewise.so cloud-connector, RS256, the same token (cache hit)",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(false, false)),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-hit-lean-native",
            what: "libedgewise.so cloud-connector, cache hit, no rate limit and no signature",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(true, false)),
            tokens: Tokens::One,
        },
        Bench {
            name: "cc-many-native",
            what: "libedgewise.so cloud-connector, 1,000 organizations' tokens in turn (cache hits)",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(false, true)),
            tokens: Tokens::Many,
        },
        Bench {
            name: "cc-many-global-native",
            what: "cc-many-native and the fleet-wide check: 1,000 counters",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(false, true)) + GLOBAL_RATE_LIMIT,
            tokens: Tokens::Many,
        },
        Bench {
            name: "cc-miss-native",
            what: "libedgewise.so cloud-connector, RS256 (aws-lc), a new token per request",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(false, false)),
            tokens: Tokens::Fresh,
        },
        Bench {
            name: "cc-miss-lean-native",
            what: "libedgewise.so cloud-connector, a new token per request, no rate limit and no signature (what jwt_authn does)",
            host: CC_HOST,
            path: "/",
            filters: native(&cloud_connector(true, false)),
            tokens: Tokens::Fresh,
        },
        Bench {
            name: "tunnel-auth-native",
            what: "libedgewise.so tunnel-auth, RS256 token (cache hit)",
            host: "hub.example",
            path: "/clusters/upstream/api/v1/namespaces",
            filters: native(&tunnel_auth()),
            tokens: Tokens::One,
        },
        Bench {
            name: "jwt_authn-cache",
            what: "native jwt_authn, RS256, jwt_cache_config, the same token",
            host: CC_HOST,
            path: "/",
            filters: jwt_authn(jwks, true),
            tokens: Tokens::One,
        },
        Bench {
            name: "jwt_authn",
            what: "native jwt_authn, RS256, no cache, a new token per request",
            host: CC_HOST,
            path: "/",
            filters: jwt_authn(jwks, false),
            tokens: Tokens::Fresh,
        },
        Bench {
            name: "stock-chain",
            what: "Envoy's own filters doing cloud-connector's job: jwt_authn (cached), RBAC on the scope, local_ratelimit per organization, header_mutation",
            host: CC_HOST,
            path: "/",
            filters: stock_chain(jwks),
            tokens: Tokens::One,
        },
    ]
}

/// The ports of what the bench process runs beside the front Envoys.
#[derive(Clone, Copy)]
pub struct Ports {
    pub upstream: u16,
    pub management: u16,
    pub issuer: u16,
    pub ratelimit: u16,
}

pub fn front_config(bench: &Bench, ports: Ports) -> Config {
    let template = std::fs::read_to_string(crate::repo_root().join("bench/front.yaml")).unwrap_or_default();
    let yaml = template.replace("          # FILTERS\n", &bench.filters);
    Config { name: format!("bench-{}", bench.name), yaml }
        .port(18000, ports.upstream)
        .port(18001, ports.management)
        .port(18002, ports.issuer)
        .port(18003, ports.ratelimit)
}

/// Organizations of `Tokens::Many`: the first this many tokens.
pub const MANY: usize = 1000;

/// `n` distinct tokens of the bench's issuer (signed on two threads), each with the audience,
/// realm and scopes the configurations require: the first is the one repeated (`Tokens::One`),
/// the first 1,000 are `Tokens::Many`'s organizations.
pub fn sign_tokens(idp: &crate::idp::Idp, n: usize) -> Vec<String> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                scope.spawn(move || {
                    (0..n / 2 + 1)
                        .map(|i| {
                            let mut claims = serde_json::json!({
                                "aud": "gitlab-ai-gateway", "sub": format!("instance-{w}-{i}"), "gitlab_realm": "saas",
                                "scopes": ["code_suggestions", "duo_chat"], "exp": crate::idp::now() + 7200,
                            });
                            claims["jti"] = format!("{w}-{i}").into();
                            idp.token(claims)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    })
}

/// What the front Envoys of `make bench` reach: the upstream Envoy (direct_response, on CPU 1),
/// the route-table service with 100,000 routes, the issuer's JWKS, and the fleet-wide check
/// (Redis and `ratelimit`, edgewise-ratelimit's binary, on CPU 1, with a limit never reached).
/// Dropping it stops them.
pub struct Services {
    pub ports: Ports,
    _upstream: Envoy,
    _management: Server,
    _issuer: Server,
    redis: Redis,
    ratelimit: RateLimitService,
}

impl Services {
    pub async fn start(work: &Path, jwks: &str, ratelimit: &Path) -> Result<Services> {
        let upstream_yaml = std::fs::read_to_string(crate::repo_root().join("bench/upstream.yaml"))?;
        let upstream = Envoy::start_with(
            &Config { name: "bench-upstream".into(), yaml: upstream_yaml },
            Options { concurrency: 1, log_level: "warning", cpu: Some(1), ..Options::default() },
        )
        .await?;
        let upstream_port = upstream.listener("upstream").await?.port();
        let table = Document::new(format!(r#"{{"version":1,"routes":[{}]}}"#, serverless_routes(100_000)));
        let management = Server::start("management", Listen::default(), table.handler()).await?;
        let issuer = Server::start("issuer", Listen::default(), Document::new(jwks.to_string()).handler()).await?;
        let redis = Redis::start_any(&work.join("redis")).await?;
        let limits = work.join("limits.json");
        std::fs::write(&limits, r#"{"limits":{"code_suggestions":{"requests":4000000000,"per":"hour"}}}"#)?;
        let ratelimit =
            RateLimitService::start(ratelimit, &limits, &redis.url(), 0, 0, &work.join("ratelimit.log")).await?;
        ratelimit.ready(Duration::from_secs(10)).await?;
        let services = Services {
            ports: Ports {
                upstream: upstream_port,
                management: management.port(),
                issuer: issuer.port(),
                ratelimit: ratelimit.grpc,
            },
            _upstream: upstream,
            _management: management,
            _issuer: issuer,
            redis,
            ratelimit,
        };
        for pid in services.ratelimit_pids() {
            Command::new("taskset").args(["-pc", "1", &pid.to_string()]).output()?;
        }
        Ok(services)
    }

    /// edgewise-ratelimit and Redis: their CPU is the fleet-wide check's too.
    pub fn ratelimit_pids(&self) -> Vec<u32> {
        [self.ratelimit.pid(), self.redis.pid()].into_iter().flatten().collect()
    }
}

/// The requests of one configuration, in order: the same bytes but for the bearer token. The
/// first token is kept for the readiness probe (`first`), which a fresh-token run never sends
/// again.
struct Requests {
    bench: Bench,
    tokens: Vec<String>,
    sent: usize,
}

impl Requests {
    fn first(&self) -> Vec<u8> {
        self.with(self.tokens.first().filter(|_| self.bench.tokens != Tokens::None))
    }

    fn next(&mut self) -> Vec<u8> {
        self.sent += 1;
        let token = match self.bench.tokens {
            Tokens::None => None,
            Tokens::One => self.tokens.first(),
            Tokens::Fresh => self.tokens.get(self.sent),
            Tokens::Many => self.tokens.get(self.sent % MANY),
        };
        self.with(token)
    }

    fn with(&self, token: Option<&String>) -> Vec<u8> {
        let mut request = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: edgewise-instructions\r\n",
            self.bench.path, self.bench.host
        );
        if let Some(token) = token {
            let _ = write!(request, "authorization: Bearer {token}\r\n");
        }
        request.push_str("\r\n");
        request.into_bytes()
    }
}

/// One keep-alive HTTP/1.1 connection, one request at a time.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn open(addr: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Connection { stream, buf: Vec::with_capacity(4096) })
    }

    /// Sends one request and reads its answer whole; returns the status.
    fn exchange(&mut self, request: &[u8]) -> Result<u16> {
        self.stream.write_all(request)?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let Some(length) = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                else {
                    bail!("an answer without content-length: {head}");
                };
                if self.buf.len() >= end + 4 + length {
                    self.buf.drain(..end + 4 + length);
                    return Ok(status);
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("Envoy closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `count` requests, each of which must be answered 200.
    fn run(&mut self, requests: &mut Requests, count: usize) -> Result<()> {
        for i in 0..count {
            let status = self.exchange(&requests.next())?;
            if status != 200 {
                bail!("request {i} of {count} answered {status}");
            }
        }
        Ok(())
    }
}

/// The phases of one configuration under callgrind, on a running Envoy: ready, warm, N, 3N.
fn phases(addr: SocketAddr, pid: u32, dir: &Path, mut requests: Requests, n: usize) -> Result<PerUnit> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let probe = requests.first();
    while !Connection::open(addr).and_then(|mut c| c.exchange(&probe)).is_ok_and(|s| s == 200) {
        if Instant::now() > deadline {
            bail!("no 200 within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut connection = Connection::open(addr)?;
    let warm_up = if requests.bench.tokens == Tokens::Many { MANY + 100 } else { 100 };
    connection.run(&mut requests, warm_up)?;
    callgrind::dump(dir, pid, 1)?;
    // A phase may catch one of Envoy's timers (the stats flush): the median of three.
    let mut measured = Vec::with_capacity(REPEATS);
    for r in 0..REPEATS {
        connection.run(&mut requests, n)?;
        let once = callgrind::dump(dir, pid, 2 + 2 * r)?;
        connection.run(&mut requests, 3 * n)?;
        let thrice = callgrind::dump(dir, pid, 3 + 2 * r)?;
        measured.push(Profile::per_unit(&once, &thrice, (2 * n) as f64));
    }
    measured.sort_by(|a, b| a.total.total_cmp(&b.total));
    measured.into_iter().nth(REPEATS / 2).ok_or_else(|| anyhow::anyhow!("no measurement"))
}

/// How many times the N and 3N phases are measured on one Envoy (the median is the figure).
pub const REPEATS: usize = 3;

/// The bearer tokens [`instructions`] needs with `n` (a fresh-token configuration never sends
/// one twice).
pub fn tokens_for(n: usize) -> usize {
    REPEATS * 4 * n + MANY + 200
}

/// One configuration in its own front Envoy (`--concurrency 1`) under callgrind: after a warm-up,
/// one keep-alive connection sends `n` requests and then `3n`, callgrind's counters dumped
/// between the phases; the difference over `2n` is what a request costs (what a phase costs
/// whatever its length cancels out), the median of [`REPEATS`]. Every request must be answered
/// 200.
pub async fn instructions(bench: &Bench, ports: Ports, tokens: &[String], n: usize, work: &Path) -> Result<PerUnit> {
    let dir = work.join(bench.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let envoy = Envoy::start_in(
        &front_config(bench, ports),
        &dir,
        Options {
            concurrency: 1,
            log_level: "warning",
            wrapper: callgrind::wrapper(&dir),
            ready_within: Duration::from_secs(600),
            ..Options::default()
        },
    )
    .await?;
    let addr = envoy.listener("bench").await?;
    let pid = envoy.pid();
    let requests = Requests { bench: bench.clone(), tokens: tokens.to_vec(), sent: 0 };
    let per = tokio::task::spawn_blocking(move || phases(addr, pid, &dir, requests, n)).await??;
    drop(envoy);
    Ok(per)
}

//! The message each bad field of each plugin configuration gets: what Envoy logs when it refuses
//! to start. One row per way a field can be wrong, through the same entry point the filters call.

#![allow(clippy::unwrap_used)]

use edgewise_core::{cloud_connector, egress, mesh_identity, serverless, tunnel_auth};

type Compile = fn(&[u8]) -> Result<(), String>;

fn serverless(doc: &[u8]) -> Result<(), String> {
    serverless::Router::from_json(doc).map(drop).map_err(|e| e.to_string())
}
fn egress(doc: &[u8]) -> Result<(), String> {
    egress::Policy::from_json(doc).map(drop).map_err(|e| e.to_string())
}
fn mesh(doc: &[u8]) -> Result<(), String> {
    mesh_identity::Role::from_json(doc).map(drop).map_err(|e| e.to_string())
}
fn connector(doc: &[u8]) -> Result<(), String> {
    cloud_connector::Gateway::from_json_env(doc, |_| None).map(drop).map_err(|e| e.to_string())
}
fn tunnel(doc: &[u8]) -> Result<(), String> {
    tunnel_auth::Hub::from_json(doc).map(drop).map_err(|e| e.to_string())
}

const JWKS: &str = r#"{"keys":[]}"#;
const FEATURE: &str = r#"{"name":"f","prefix":"/f","cluster":"c"}"#;
const ISSUER: &str = r#"{"issuer":"https://idp.example"}"#;

/// (filter, document, the whole message after "invalid plugin configuration: ").
fn table() -> Vec<(&'static str, Compile, String, &'static str)> {
    let cc = |rest: &str| format!(r#"{{"features":[{FEATURE}]{rest}}}"#);
    let tn = |rest: &str| format!(r#"{{"issuers":[{ISSUER}],"audiences":["a"]{rest}}}"#);
    let gw = |rest: &str| format!(r#"{{"role":"gateway","jwks":{JWKS},"issuers":["i"],"audiences":["a"]{rest}}}"#);
    vec![
        // The document itself.
        ("serverless", serverless, String::new(), "not valid JSON at byte 0: expected a value"),
        ("serverless", serverless, "[]".into(), "the document must be an object"),
        ("serverless", serverless, r#"{"domain":"d"} x"#.into(), "not valid JSON at byte 15: expected the end of the document (trailing characters)"),
        ("egress", egress, r#"{"allow":[],"allow":[]}"#.into(), "duplicate field `allow`"),
        ("egress", egress, r#"{"allow":[],"\u0061llow":[]}"#.into(), "duplicate field `allow`"),
        // Unknown fields, at the top and nested, with what was expected.
        ("egress", egress, r#"{"allow":[],"alow":[]}"#.into(), "unknown field `alow`, expected one of `suffix`, `allow`, `allow_private`"),
        ("serverless", serverless, r#"{"routes":[{"match":{},"cluster":"c","host":"h","hots":1}]}"#.into(), "unknown field `hots` in `routes[0]`, expected one of `match`, `domain`, `cluster`, `host`"),
        ("serverless", serverless, r#"{"management":{"cluster":"m","poll_ms":1}}"#.into(), "unknown field `poll_ms` in `management`, expected one of `cluster`, `authority`, `path`, `poll_interval_ms`, `timeout_ms`, `wait_seconds`, `page_size`, `max_backoff_ms`, `max_answer_bytes`, `stream`"),
        ("cloud-connector", connector, cc(r#","jwks":{"refresh":1}"#), "unknown field `refresh` in `jwks`, expected one of `refresh_seconds`, `min_refresh_seconds`, `max_refresh_seconds`, `retry_seconds`, `kid_miss_cooldown_seconds`, `timeout_ms`, `wait_ms`"),
        ("cloud-connector", connector, cc(r#","headers":{"realms":"x"}"#), "unknown field `realms` in `headers`, expected one of `instance_id`, `realm`, `scopes`, `issuer`, `signature`, `feature`, `rate_limit_key`, `strip`"),
        ("mesh-identity", mesh, gw(r#","leeway":1"#), "unknown field `leeway`, expected one of `role`, `jwks`, `issuers`, `audiences`, `leeway_seconds`, `claim_headers`, `forward_token`, `token_cache_size`"),
        ("mesh-identity", mesh, r#"{"role":"sidecar","trusted_gateways":[],"jwks":{}}"#.into(), "unknown field `jwks`, expected one of `role`, `trusted_gateways`, `identity_headers`"),
        ("tunnel-auth", tunnel, tn(r#","issuers":[]"#), "duplicate field `issuers`"),
        ("tunnel-auth", tunnel, format!(r#"{{"issuers":[{ISSUER},{{"issuer":"https://b","jwks":"/k"}}],"audiences":[]}}"#), "unknown field `jwks` in `issuers[1]`, expected one of `issuer`, `cluster`, `authority`, `jwks_path`, `name`"),
        // Required fields.
        ("egress", egress, "{}".into(), "`allow` is required"),
        ("serverless", serverless, r#"{"routes":[{"match":{},"host":"h"}]}"#.into(), "`routes[0].cluster` is required"),
        ("serverless", serverless, r#"{"management":{}}"#.into(), "`management.cluster` is required"),
        ("cloud-connector", connector, "{}".into(), "`features` is required"),
        ("cloud-connector", connector, r#"{"features":[{"name":"f","prefix":"/f"}]}"#.into(), "`features[0].cluster` is required"),
        ("cloud-connector", connector, cc(r#","issuers":[{"cluster":"c"}]"#), "`issuers[0].issuer` is required"),
        ("cloud-connector", connector, r#"{"features":[{"name":"f","prefix":"/f","cluster":"c","rate_limit":{"per":"second"}}]}"#.into(), "`features[0].rate_limit.requests` is required"),
        ("mesh-identity", mesh, r#"{"role":"gateway","issuers":[],"audiences":[]}"#.into(), "`jwks` is required"),
        ("mesh-identity", mesh, r#"{"role":"sidecar"}"#.into(), "`trusted_gateways` is required"),
        ("tunnel-auth", tunnel, r#"{"issuers":[]}"#.into(), "`audiences` is required"),
        // Values the compilation checks.
        ("serverless", serverless, r#"{"routes":[{"match":{"function":"7"},"cluster":"c","host":"h"}]}"#.into(), "`routes[0].match` must name exactly the pattern's groups [\"project\", \"environment\", \"function\"]"),
        // Types and values.
        ("egress", egress, r#"{"allow":"api.github.com"}"#.into(), "`allow` must be an array"),
        ("egress", egress, r#"{"allow":[1]}"#.into(), "`allow[0]` must be a string"),
        ("serverless", serverless, r#"{"routes":[{"match":{"function":7},"cluster":"c","host":"h"}]}"#.into(), "`routes[0].match.function` must be a string"),
        ("serverless", serverless, r#"{"management":{"cluster":"m","timeout_ms":-1}}"#.into(), "`management.timeout_ms` must be a non-negative integer"),
        ("serverless", serverless, r#"{"management":{"cluster":"m","timeout_ms":1e3}}"#.into(), "`management.timeout_ms` must be a non-negative integer"),
        ("serverless", serverless, r#"{"management":{"cluster":"m","timeout_ms":18446744073709551616}}"#.into(), "`management.timeout_ms` is too large"),
        ("cloud-connector", connector, cc(r#","token_cache_size":"10""#), "`token_cache_size` must be a non-negative integer"),
        ("cloud-connector", connector, cc(r#","rate_limit":{"slots":4294967296}"#), "`rate_limit.slots` is too large"),
        ("cloud-connector", connector, cc(r#","forward_authorization":"yes""#), "`forward_authorization` must be true or false"),
        ("cloud-connector", connector, cc(r#","audiences":null"#), "`audiences` must be an array"),
        ("cloud-connector", connector, r#"{"features":[{"name":"f","prefix":"/f","cluster":"c","rate_limit":{"requests":1,"per":"day"}}]}"#.into(), "`features[0].rate_limit.per` must be second, minute or hour"),
        ("mesh-identity", mesh, r#"{"jwks":{}}"#.into(), "`role` is required"),
        ("mesh-identity", mesh, r#"{"role":"ingress"}"#.into(), "`role` must be gateway or sidecar"),
        ("mesh-identity", mesh, r#"{"role":1}"#.into(), "`role` must be a string"),
        ("mesh-identity", mesh, gw(r#","claim_headers":{"sub":1}"#), "`claim_headers.sub` must be a string"),
        ("tunnel-auth", tunnel, tn(r#","allow":{"alice":"c1"}"#), "`allow.alice` must be an array"),
    ]
}

#[test]
fn each_bad_field_gets_its_message() {
    let mut wrong = Vec::new();
    for (filter, compile, doc, expected) in table() {
        let expected = format!("invalid plugin configuration: {expected}");
        match compile(doc.as_bytes()) {
            Err(message) if message == expected => {}
            got => wrong.push(format!("{filter} {doc}\n  expected: {expected}\n  got:      {got:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A JWKS with one ES256 key (the public key of a fixed scalar).
fn es256_jwks() -> String {
    use base64::Engine;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let key = p256::SecretKey::from_slice(&[7; 32]).unwrap().public_key().to_encoded_point(false);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k","x":"{}","y":"{}"}}]}}"#,
        b64(key.x().unwrap()),
        b64(key.y().unwrap())
    )
}

/// The documents of the table, fixed, are accepted: each row fails for the reason it names.
#[test]
fn the_valid_neighbours_compile() {
    let valid: [(Compile, String); 5] = [
        (serverless, r#"{"pattern":"(?P<function>[0-9]+)","routes":[{"match":{"function":"7"},"cluster":"c","host":"h"}],"management":{"cluster":"m","timeout_ms":1000}}"#.into()),
        (egress, r#"{"allow":["api.github.com"]}"#.into()),
        (mesh, format!(r#"{{"role":"gateway","jwks":{},"issuers":["i"],"audiences":["a"],"claim_headers":{{"sub":"x-user"}}}}"#, es256_jwks())),
        (connector, format!(r#"{{"features":[{{"name":"f","prefix":"/f","cluster":"c","rate_limit":{{"requests":1,"per":"minute"}}}}],"issuers":[{ISSUER}]}}"#)),
        (tunnel, format!(r#"{{"issuers":[{ISSUER}],"audiences":["a"],"allow":{{"alice":["c1"]}}}}"#)),
    ];
    for (compile, doc) in valid {
        assert_eq!(compile(doc.as_bytes()), Ok(()), "{doc}");
    }
}

use super::*;
use crate::generic::jwt::Jwks;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use rand_chacha::rand_core::SeedableRng;
use serde_json::json;
use serde_json::Value;

const NOW: u64 = 1_800_000_000;

fn ec_key(seed: u64) -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

fn enc(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn jwks(keys: &[(&str, &p256::ecdsa::SigningKey)]) -> Jwks {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, key)| {
            let p = key.verifying_key().to_encoded_point(false);
            json!({"kty":"EC","crv":"P-256","kid":kid,"x":enc(p.x().unwrap()),"y":enc(p.y().unwrap())})
        })
        .collect();
    Jwks::from_json(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
}

fn token(kid: &str, key: &p256::ecdsa::SigningKey, claims: &Value) -> String {
    let header = json!({"alg":"ES256","kid":kid,"typ":"JWT"});
    let input = format!("{}.{}", enc(header.to_string().as_bytes()), enc(claims.to_string().as_bytes()));
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    format!("{input}.{}", enc(&sig.to_bytes()))
}

fn claims() -> Value {
    json!({"iss":"https://gitlab.com","aud":"gitlab-ai-gateway","sub":"instance-1","gitlab_realm":"saas",
           "exp":NOW+600,"iat":NOW,"nbf":NOW,"scopes":["code_suggestions","duo_chat"],"namespace":"org-7"})
}

const CONFIG: &str = r#"{
  "features": [
    { "name": "code_suggestions", "prefix": "/ai/v2/code", "scopes": ["code_suggestions"], "cluster": "ai", "rewrite_prefix": "/v2/code" },
    { "name": "ai", "prefix": "/ai/", "scopes": ["duo_chat"], "cluster": "ai", "rewrite_prefix": "",
      "rate_limit": { "requests": 10, "per": "minute", "burst": 2 } },
    { "name": "search", "prefix": "/search", "scopes": ["duo_chat", "search"], "cluster": "search" }
  ],
  "rate_limit": { "key_claim": "namespace" }
}"#;

fn gateway() -> Gateway {
    Gateway::from_json_env(CONFIG.as_bytes(), |_| None).unwrap()
}

fn keyring(gw: &Gateway, keys: Jwks, generation: u64) -> Keyring {
    let mut ring = Keyring::new(gw.issuers().len());
    ring.install(0, IssuerKeys { jwks: keys, generation, fetched_ms: 0 });
    ring
}

#[test]
fn defaults_follow_gitlab() {
    let gw = gateway();
    let names: Vec<_> = gw.issuers().iter().map(|i| (i.issuer.as_str(), i.cluster.as_str(), i.name.as_str())).collect();
    assert_eq!(
        names,
        vec![
            ("https://gitlab.com", "gitlab.com", "gitlab_com"),
            ("https://customers.gitlab.com", "customers.gitlab.com", "customers_gitlab_com")
        ]
    );
    assert_eq!(gw.issuers()[0].discovery_path, "/.well-known/openid-configuration");
    assert_eq!(gw.verifier.validation.audiences, vec!["gitlab-ai-gateway"]);
    assert_eq!(gw.idle_ms, 12_000);
    let custom = r#"{"issuers":[{"issuer":"https://id.example:8443/realms/x/","jwks_path":"/keys"}],
                     "features":[{"name":"f","prefix":"/","cluster":"c"}]}"#;
    let gw = Gateway::from_json_env(custom.as_bytes(), |_| None).unwrap();
    assert_eq!(gw.issuers()[0].authority, "id.example:8443");
    assert_eq!(gw.issuers()[0].cluster, "id.example");
    assert_eq!(gw.issuers()[0].discovery_path, "/realms/x/.well-known/openid-configuration");
    assert_eq!(gw.route("/anything").map(|(i, _)| i), Some(0), "prefix / serves every path");
}

#[test]
fn longest_whole_segment_prefix_wins() {
    let gw = gateway();
    let name = |p: &str| gw.route(p).map(|(_, f)| f.name.as_str());
    assert_eq!(name("/ai/v2/code/completions"), Some("code_suggestions"));
    assert_eq!(name("/ai/v2/chat"), Some("ai"));
    assert_eq!(name("/ai"), Some("ai"));
    assert_eq!(name("/ai?x=1"), Some("ai"));
    assert_eq!(name("/aix"), None);
    assert_eq!(name("/search/x"), Some("search"));
    assert_eq!(name("/searching"), None);
    assert_eq!(name("/"), None);
    let rw = |p: &str| gw.route(p).and_then(|(_, f)| gw.rewrite(f, p));
    assert_eq!(rw("/ai/v2/chat?q=1").as_deref(), Some("/v2/chat?q=1"));
    assert_eq!(rw("/ai").as_deref(), Some("/"));
    assert_eq!(rw("/ai?q").as_deref(), Some("/?q"));
    assert_eq!(rw("/ai/v2/code/completions").as_deref(), Some("/v2/code/completions"));
    assert_eq!(rw("/search/x"), None, "no rewrite configured");
}

#[test]
fn bearer_tokens_are_required() {
    assert_eq!(Gateway::bearer(Some("Bearer abc")), Ok("abc"));
    assert_eq!(Gateway::bearer(Some("bearer  abc ")), Ok("abc"));
    for bad in [None, Some(""), Some("Bearer"), Some("Bearer  "), Some("Basic abc"), Some("abc")] {
        assert_eq!(Gateway::bearer(bad), Err(Denial::MissingToken), "{bad:?}");
    }
}

#[test]
fn tokens_are_verified_cached_and_revoked_with_their_key() {
    let gw = gateway();
    let k1 = ec_key(1);
    let ring = keyring(&gw, jwks(&[("k1", &k1)]), 1);
    let mut cache = TokenCache::new(100);
    let t = token("k1", &k1, &claims());
    let id = gw.authenticate(&t, &ring, &mut cache, NOW).unwrap();
    assert_eq!(id.instance_id, "instance-1");
    assert_eq!(id.realm.as_deref(), Some("saas"));
    assert_eq!(id.scopes, "code_suggestions,duo_chat");
    assert_eq!(id.rate_key, "org-7");
    assert_eq!(cache.len(), 1);
    // A cache hit gives the same identity without verifying again.
    let again = gw.authenticate(&t, &ring, &mut cache, NOW + 1).unwrap();
    assert!(Arc::ptr_eq(&id, &again));
    // Expired (exp + 60 s skew): not served from the cache.
    assert!(matches!(gw.authenticate(&t, &ring, &mut cache, NOW + 660), Err(Denial::InvalidToken(_))));
    // The issuer rotates k1 out: the cached token is checked again and refused.
    let k2 = ec_key(2);
    let rotated = keyring(&gw, jwks(&[("k2", &k2)]), 2);
    assert_eq!(gw.authenticate(&t, &rotated, &mut cache, NOW), Err(Denial::UnknownKid { issuer: 0 }));
    // No keys for the issuer yet: fail closed, and say which issuer.
    let empty = Keyring::new(2);
    assert_eq!(gw.authenticate(&t, &empty, &mut cache, NOW), Err(Denial::KeysUnavailable { issuer: 0 }));
}

#[test]
fn bad_tokens_are_refused() {
    let gw = gateway();
    let k1 = ec_key(1);
    let ring = keyring(&gw, jwks(&[("k1", &k1)]), 1);
    let mut cache = TokenCache::new(100);
    let mut check = |claims: Value, key: &p256::ecdsa::SigningKey| {
        let err = gw.authenticate(&token("k1", key, &claims), &ring, &mut cache, NOW).unwrap_err();
        assert!(matches!(err, Denial::InvalidToken(_)), "{claims}: {err:?}");
        err
    };
    check(json!({"exp": NOW + 60}), &k1);
    let mut c = claims();
    c["aud"] = "other".into();
    check(c, &k1);
    let mut c = claims();
    c["exp"] = (NOW - 61).into();
    check(c, &k1);
    let mut c = claims();
    c["nbf"] = (NOW + 61).into();
    check(c, &k1);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("sub");
    check(c, &k1);
    let mut c = claims();
    c["scopes"] = "duo_chat".into();
    check(c, &k1);
    let mut c = claims();
    c["iss"] = "https://evil.example".into();
    assert!(matches!(check(c, &k1), Denial::InvalidToken(d) if d.contains("evil")));
    // Signed by another key under the same kid.
    check(claims(), &ec_key(9));
    assert_eq!(cache.len(), 0, "nothing invalid is cached");
    // Within the skew, still good.
    let mut c = claims();
    c["exp"] = (NOW - 59).into();
    assert!(gw.authenticate(&token("k1", &k1, &c), &ring, &mut cache, NOW).is_ok());
}

#[test]
fn scopes_and_client_headers_are_checked() {
    let gw = gateway();
    let k1 = ec_key(1);
    let ring = keyring(&gw, jwks(&[("k1", &k1)]), 1);
    let mut cache = TokenCache::new(100);
    let id = gw.authenticate(&token("k1", &k1, &claims()), &ring, &mut cache, NOW).unwrap();
    let feature = |p: &str| gw.route(p).unwrap().1;
    assert_eq!(gw.authorize(feature("/ai/x"), &id), Ok(()));
    assert_eq!(gw.authorize(feature("/search"), &id), Err(Denial::Forbidden { scope: "search".into() }));
    let (reply, headers) = Denial::Forbidden { scope: "search".into() }.reply("/search", Some(feature("/search")));
    assert_eq!(reply.status, 403);
    assert_eq!(headers, vec![("www-authenticate", "Bearer error=\"insufficient_scope\", scope=\"search\"".into())]);
    assert_eq!(gw.check_client_headers(&id, Some("instance-1"), Some("saas")), Ok(()));
    assert_eq!(gw.check_client_headers(&id, None, None), Ok(()));
    assert!(gw.check_client_headers(&id, Some("instance-2"), None).is_err());
    assert!(gw.check_client_headers(&id, None, Some("self-managed")).is_err());
}

#[test]
fn replies_say_why() {
    let (r, h) = Denial::MissingToken.reply("/ai", None);
    assert_eq!((r.status, h), (401, vec![("www-authenticate", "Bearer".to_string())]));
    let (r, h) = Denial::InvalidToken("token expired".into()).reply("/ai", None);
    assert_eq!(r.status, 401);
    assert_eq!(h[0].1, "Bearer error=\"invalid_token\"");
    assert_eq!(Denial::NotFound.reply("/x", None).0.status, 404);
    assert_eq!(Denial::KeysUnavailable { issuer: 0 }.reply("/x", None).0.status, 503);
    let gw = gateway();
    let f = gw.route("/ai").unwrap().1;
    let v = limiter::Verdict { allowed: false, limit: 2, remaining: 0, retry_after_s: 6, reset_s: 12 };
    let (r, h) = Denial::RateLimited(v).reply("/ai", Some(f));
    assert_eq!(r.status, 429);
    assert!(h.contains(&("retry-after", "6".into())));
    assert!(h.contains(&("ratelimit-policy", "10;w=60;burst=2".into())));
    for o in Outcome::ALL {
        assert_eq!(Outcome::ALL[o as usize], o);
    }
}

#[test]
fn the_cache_is_bounded() {
    let gw = gateway();
    let k1 = ec_key(1);
    let ring = keyring(&gw, jwks(&[("k1", &k1)]), 1);
    let mut cache = TokenCache::new(16);
    for i in 0..40 {
        let mut c = claims();
        c["jti"] = i.into();
        gw.authenticate(&token("k1", &k1, &c), &ring, &mut cache, NOW).unwrap();
        assert!(cache.len() <= 16);
    }
    let mut none = TokenCache::new(0);
    gw.authenticate(&token("k1", &k1, &claims()), &ring, &mut none, NOW).unwrap();
    assert!(none.is_empty());
}

#[test]
fn signature_matches_the_documented_recipe() {
    // The recipe of docs/cloud-connector.md, spelled out: HMAC-SHA256 over "v1\n<t>\n<METHOD>\n<path>\n<instance id>\n".
    let secret = b"0123456789abcdef0123456789abcdef";
    let sig = signature(secret, 1_800_000_000, "POST", "/v2/code/completions?x=1", "instance-1");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(b"v1\n1800000000\nPOST\n/v2/code/completions?x=1\ninstance-1\n");
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sig, format!("t=1800000000,v1={expected}"));
    assert_ne!(sig, signature(secret, 1_800_000_000, "GET", "/v2/code/completions?x=1", "instance-1"));
    for t in [0, 7, 10, 1_000_000_000, u64::MAX] {
        assert!(signature(secret, t, "GET", "/", "i").starts_with(&format!("t={t},v1=")), "{t}");
    }
}

#[test]
fn bad_configs_name_the_field() {
    let feature = r#"{"name":"f","prefix":"/f","cluster":"c"}"#;
    let cases: Vec<(String, &str)> = vec![
        (r#"{"features":[]}"#.into(), "features"),
        (r#"{"issuers":[],"features":[F]}"#.into(), "issuers"),
        (r#"{"issuers":[{"issuer":"http://a"}],"features":[F]}"#.into(), "issuers[0].issuer"),
        (r#"{"issuers":[{"issuer":"https://a","jwks_path":"k"}],"features":[F]}"#.into(), "issuers[0].jwks_path"),
        (r#"{"audiences":[],"features":[F]}"#.into(), "audiences"),
        (r#"{"features":[{"name":"f","prefix":"f","cluster":"c"}]}"#.into(), "features[0].prefix"),
        (r#"{"features":[{"name":"f g","prefix":"/f","cluster":"c"}]}"#.into(), "features[0].name"),
        (r#"{"features":[F, F]}"#.into(), "features[1].prefix"),
        (
            r#"{"features":[{"name":"f","prefix":"/f","cluster":"c","rate_limit":{"requests":0,"per":"second"}}]}"#
                .into(),
            "features[0].rate_limit",
        ),
        (
            r#"{"features":[{"name":"f","prefix":"/f","cluster":"c","rewrite_prefix":"x"}]}"#.into(),
            "features[0].rewrite_prefix",
        ),
        (r#"{"features":[F],"jwks":{"refresh_seconds":1}}"#.into(), "jwks.refresh_seconds"),
        (r#"{"features":[F],"headers":{"realm":"X-Realm"}}"#.into(), "headers.realm"),
        (r#"{"features":[F],"authenticity":{"secret":"short"}}"#.into(), "authenticity"),
        (r#"{"features":[F],"authenticity":{"secret_env":"NOPE"}}"#.into(), "authenticity.secret_env"),
        (r#"{"features":[F],"typo":1}"#.into(), "typo"),
    ];
    for (json, field) in cases {
        let json = json.replace('F', feature);
        let err = Gateway::from_json_env(json.as_bytes(), |_| None).unwrap_err().to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
    let ok = r#"{"features":[F],"authenticity":{"secret_env":"S"}}"#.replace('F', feature);
    let gw = Gateway::from_json_env(ok.as_bytes(), |v| (v == "S").then(|| "s".repeat(32))).unwrap();
    assert!(gw.sign(1, "GET", "/", "i").is_some());
    assert!(gateway().sign(1, "GET", "/", "i").is_none());
}

/// The derived reader reads every document as the serde derive (the JSON Schema's source) does.
#[test]
fn the_reader_agrees_with_the_schema_types() {
    let docs = [
        CONFIG,
        r#"{"features":[]}"#,
        r#"{"issuers":[{"issuer":"https://a","cluster":"c","authority":"a:1","jwks_path":"/k","name":"n"},
                       {"issuer":"https://b","cluster":null}],
            "audiences":["x"],"clock_skew_seconds":5,"required_claims":["org"],
            "features":[{"name":"f","prefix":"/f","scopes":["s"],"cluster":"c","rewrite_prefix":null,
                         "rate_limit":{"requests":5,"per":"hour","burst":null}},
                        {"name":"g","prefix":"/g","cluster":"c","rate_limit":{"requests":1,"per":"second","burst":3}}],
            "jwks":{"refresh_seconds":10,"min_refresh_seconds":1,"max_refresh_seconds":20,"retry_seconds":2,
                    "kid_miss_cooldown_seconds":3,"timeout_ms":4,"wait_ms":5},
            "rate_limit":{"key_claim":"org","slots":7},"token_cache_size":0,
            "headers":{"instance_id":"a","realm":"b","scopes":"c","issuer":"d","signature":"e","feature":"f",
                       "rate_limit_key":"g","strip":["h"]},
            "authenticity":{"secret_env":"S","secret":null},"cluster_header":"x-b","health_path":"/h",
            "public_paths":[],"forward_authorization":false}"#,
        r#"{"features":[],"authenticity":null,"headers":{},"jwks":{},"rate_limit":{}}"#,
        // Refused by both:
        r#"{}"#,
        r#"{"features":[{"name":"f","prefix":"/f"}]}"#,
        r#"{"features":[],"clock_skew":1}"#,
        r#"{"features":[],"jwks":{"refresh":1}}"#,
        r#"{"features":[],"rate_limit":{"slots":4294967296}}"#,
        r#"{"features":[{"name":"f","prefix":"/","cluster":"c","rate_limit":{"requests":1,"per":"day"}}]}"#,
        r#"{"features":[{"name":"f","prefix":"/","cluster":"c","rate_limit":{"per":"hour"}}]}"#,
        r#"{"features":[],"issuers":[{"cluster":"c"}]}"#,
        r#"{"features":[],"issuers":null}"#,
        r#"{"features":[],"forward_authorization":"yes"}"#,
        r#"{"features":[],"token_cache_size":-1}"#,
        r#"{"features":[],"headers":{"strip":"x"}}"#,
        r#"{"features":[],"authenticity":{"key":"x"}}"#,
        r#"{"features":[]} x"#,
    ];
    crate::generic::json::assert_reads_like_serde::<config::Config, _>(
        &docs,
        crate::generic::json::parse::<config::Config>,
    );
    let err = Gateway::from_json_env(
        br#"{"features":[{"name":"f","prefix":"/","cluster":"c","rate_limit":{"requests":1,"per":"day"}}]}"#,
        |_| None,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid plugin configuration: `features[0].rate_limit.per` must be second, minute or hour"
    );
}

//! End-to-end: envoy/cloud-connector.yaml on real Envoy (two workers) with the freshly built
//! cloud-connector.wasm, a TLS stand-in for both token issuers (OIDC discovery + JWKS, counting
//! what it serves) and echo stand-ins for the private backends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgewise::client::{raw_get, raw_statuses, Client, Request, Response};
use edgewise::envoy::{Envoy, Options};
use edgewise::idp::{self, Idp};
use edgewise::ratelimit::{RateLimitService, Redis};
use edgewise::scenarios::cloud_connector::{self as cc, Issuers, Pki, CUSTOMERS, GITLAB};
use edgewise::server::{Listen, Server};
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-more-than-32-bytes-for-hmac";

struct Setup {
    _run: tempfile::TempDir,
    pki: Pki,
    issuers: Issuers,
    _issuer_server: Server,
    ai: Server,
    obs: Server,
    envoy: Envoy,
    front: SocketAddr,
    client: Client,
}

async fn setup(
    tweak: impl FnOnce(edgewise::envoy::Config) -> edgewise::envoy::Config,
    before: impl FnOnce(&Issuers),
) -> Setup {
    edgewise::init_crypto();
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let (issuers, issuer_server) = Issuers::start(&pki.issuer_ca).await.unwrap();
    before(&issuers);
    let ai = Server::echo("ai-gateway", Listen::default()).await.unwrap();
    let obs = Server::echo("observability", Listen::default()).await.unwrap();
    let admin = edgewise::free_port().unwrap();
    let config = tweak(pki.config(run.path(), issuer_server.port(), ai.port(), obs.port(), admin));
    let options = Options { env: vec![(cc::SECRET_ENV.into(), SECRET.into())], ..Options::default() };
    let work = run.path().join("envoy");
    std::fs::create_dir_all(&work).unwrap();
    let envoy = Envoy::start_in(&config, &work, options).await.unwrap();
    let front = envoy.listener("cloud_connector_https").await.unwrap();
    let client = pki.front_client(false).unwrap();
    Setup { _run: run, pki, issuers, _issuer_server: issuer_server, ai, obs, envoy, front, client }
}

impl Setup {
    async fn call(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Response {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut req = Request::get("cloud.gitlab.com", path);
        if let Some(b) = &bearer {
            req = req.header("authorization", b);
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        self.client.send(self.front, req).await.unwrap()
    }

    /// Waits until a token is accepted (keys fetched by some worker), at most `limit`.
    async fn until_accepted(&self, token: &str, limit: Duration) -> Response {
        let start = Instant::now();
        loop {
            let r = self.call("/ai/v2/code/completions", Some(token), &[]).await;
            if r.status == 200 || start.elapsed() > limit {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric(&self, name: &str) -> u64 {
        self.envoy.stat(&edgewise::envoy::stat(&format!("edgewise.cloud_connector.{name}"))).await.unwrap_or(0)
    }
}

fn published(keys: &[&Idp]) -> Vec<Value> {
    keys.iter().map(|k| k.jwk()).collect()
}

fn assert_invalid_token(r: &Response, why: &str) {
    assert_eq!(r.status, 401, "{why}: {}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer error=\"invalid_token\""), "{why}");
    assert_eq!(r.json()["error"], "invalid_token", "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_status_identity_headers_and_signature() {
    let gitlab = Idp::rs256(GITLAB, "gitlab-1").unwrap();
    let customers = Idp::new(CUSTOMERS, "customers-1").unwrap();
    let p384 = Idp::p384(GITLAB, "gitlab-p384").unwrap();
    let s = setup(
        |c| c,
        |i| {
            i.publish(GITLAB, published(&[&gitlab, &p384]));
            i.publish(CUSTOMERS, published(&[&customers]));
        },
    )
    .await;
    let instance = "6b1a2c3d-0000-4000-8000-000000000001";
    let token = gitlab.token(cc::claims(instance, &["code_suggestions", "duo_chat"]));
    assert_eq!(s.until_accepted(&token, Duration::from_secs(10)).await.status, 200);
    let ai_before = s.ai.count();

    // Allowed: rewritten path, verified identity, a signature the backend can check. Whatever the
    // client claimed in gateway-owned headers is replaced, and it cannot pick the backend.
    let forged = [
        ("x-gitlab-instance-id", instance),
        ("x-gitlab-realm", "self-managed"),
        ("x-gitlab-scopes", "admin_everything"),
        ("x-gitlab-token-issuer", "https://evil.example"),
        ("x-edgewise-signature", "t=1,v1=00"),
        ("x-edgewise-backend", "observability"),
        // Second values: setting a header replaces every value it had, on both builds.
        ("x-gitlab-scopes", "admin_everything"),
        ("x-gitlab-token-issuer", "https://evil.example"),
    ];
    let r = s.call("/ai/v2/code/completions?lang=rust", Some(&token), &forged).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.ai.seen().pop().unwrap();
    assert_eq!(seen.path, "/v2/code/completions?lang=rust");
    assert_eq!(seen.header("x-gitlab-instance-id"), Some(instance));
    assert_eq!(seen.header("x-gitlab-realm"), Some("self-managed"));
    assert_eq!(seen.header("x-gitlab-scopes"), Some("code_suggestions,duo_chat"));
    assert_eq!(seen.header("x-gitlab-token-issuer"), Some(GITLAB));
    assert_eq!(seen.header("x-edgewise-backend"), None, "the routing header never leaves Envoy");
    assert!(seen.header("authorization").is_some_and(|a| a.ends_with(&token)));
    for owned in ["x-gitlab-instance-id", "x-gitlab-realm", "x-gitlab-scopes", "x-gitlab-token-issuer", "authorization"]
    {
        let values = seen.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(owned)).count();
        assert_eq!(values, 1, "{owned}: {:?}", seen.headers);
    }
    // A second Authorization cannot ride along with a good one: the two are read as one value,
    // which is no token.
    let r = s.call("/ai/v2/code/completions", Some(&token), &[("authorization", "Bearer a-second-token")]).await;
    assert_invalid_token(&r, "a second Authorization header");
    let sig = seen.header("x-edgewise-signature").unwrap();
    assert!(cc::signature_valid(SECRET.as_bytes(), sig, "GET", "/v2/code/completions?lang=rust", instance), "{sig}");
    assert!(!cc::signature_valid(SECRET.as_bytes(), sig, "GET", "/v2/code/completions", instance));
    assert!(!cc::signature_valid(
        b"another-secret-another-secret-xx",
        sig,
        "GET",
        "/v2/code/completions?lang=rust",
        instance
    ));
    assert_eq!(s.obs.count(), 0, "x-edgewise-backend from the client chose nothing");

    // The other issuer, ES256, over HTTP/2, to another feature and backend.
    let obs_token = customers.token(cc::claims("instance-2", &["observability"]));
    let h2 = s.pki.front_client(true).unwrap();
    let bearer = format!("Bearer {obs_token}");
    let req = Request::get("cloud.gitlab.com", "/observability/v1/traces").header("authorization", &bearer);
    let r = h2.send(s.front, req).await.unwrap();
    assert_eq!((r.status, r.version), (200, hyper::Version::HTTP_2), "{}", r.text());
    let seen = s.obs.seen().pop().unwrap();
    assert_eq!(seen.path, "/v1/traces");
    assert_eq!(seen.header("x-gitlab-token-issuer"), Some(CUSTOMERS));
    assert_eq!(seen.header("x-gitlab-instance-id"), Some("instance-2"));

    // 401 without a token, with a token of another scheme, and for every bad token.
    let r = s.call("/ai/v2/code/completions", None, &[]).await;
    assert_eq!((r.status, r.header("www-authenticate")), (401, Some("Bearer")));
    assert_eq!(r.json()["error"], "unauthenticated");
    let basic = s
        .client
        .send(s.front, Request::get("cloud.gitlab.com", "/ai/v2/code").header("authorization", "Basic YTpi"))
        .await
        .unwrap();
    assert_eq!(basic.status, 401);
    let mut expired = cc::claims(instance, &["code_suggestions"]);
    expired["exp"] = (idp::now() - 120).into();
    let mut wrong_aud = cc::claims(instance, &["code_suggestions"]);
    wrong_aud["aud"] = "another-service".into();
    let mut future = cc::claims(instance, &["code_suggestions"]);
    future["nbf"] = (idp::now() + 600).into();
    let mut claims_gitlab = cc::claims(instance, &["code_suggestions"]);
    claims_gitlab["iss"] = GITLAB.into();
    let stranger = Idp::rs256("https://gitlab.example", "gitlab-1").unwrap();
    let impostor = Idp::rs256(GITLAB, "gitlab-1").unwrap(); // same kid, another key
    let bad: Vec<(&str, String)> = vec![
        ("expired", gitlab.token(expired)),
        ("wrong audience", gitlab.token(wrong_aud)),
        ("not yet valid", gitlab.token(future)),
        ("unknown issuer", stranger.token(cc::claims(instance, &["code_suggestions"]))),
        ("signed by another key", impostor.token(cc::claims(instance, &["code_suggestions"]))),
        ("alg none", idp::unsigned("gitlab-1", &claims_gitlab)),
        ("HS256 with the public key", gitlab.hs256_with_public_key(&claims_gitlab)),
        ("ES384 (P-384 key in the JWKS)", p384.token(cc::claims(instance, &["code_suggestions"]))),
        ("P-384 signature under ES256", p384.sign_as(json!({"alg":"ES256","kid":"gitlab-p384"}), &claims_gitlab)),
        ("RS256 header on the EC kid", gitlab.sign_as(json!({"alg":"RS256","kid":"gitlab-p384"}), &claims_gitlab)),
        ("garbage", "not.a.jwt".into()),
    ];
    for (why, t) in &bad {
        assert_invalid_token(&s.call("/ai/v2/code/completions", Some(t), &[]).await, why);
    }
    // The client's own identity headers must agree with the token.
    let r = s.call("/ai/v2/code/completions", Some(&token), &[("x-gitlab-instance-id", "someone-else")]).await;
    assert_invalid_token(&r, "X-Gitlab-Instance-Id mismatch");
    let r = s.call("/ai/v2/code/completions", Some(&token), &[("x-gitlab-realm", "saas")]).await;
    assert_invalid_token(&r, "X-Gitlab-Realm mismatch");

    // 403 names the missing scope; 404 for a path no feature serves.
    let chat_less = gitlab.token(cc::claims(instance, &["code_suggestions"]));
    let r = s.call("/ai/v1/chat/agent", Some(&chat_less), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer error=\"insufficient_scope\", scope=\"duo_chat\""));
    assert_eq!(r.json()["error"], "insufficient_scope");
    let r = s.call("/admin/users", Some(&token), &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "not_found");
    // Path tricks are normalised before the filter sees them.
    let r = s.call("/observability/../ai/v1/chat/agent", Some(&chat_less), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(s.ai.count(), ai_before + 1, "no denied request reached a backend");

    // An empty claim leaves its header out, on both builds (the dynamic-module ABI cannot set an
    // empty value, so the wasm build does not either).
    let mut no_realm = cc::claims(instance, &["code_suggestions"]);
    no_realm["gitlab_realm"] = "".into();
    let r = s.call("/ai/v2/code/completions", Some(&gitlab.token(no_realm)), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.ai.seen().pop().unwrap();
    assert_eq!(seen.header("x-gitlab-realm"), None, "{:?}", seen.headers);
    assert_eq!(seen.header("x-gitlab-instance-id"), Some(instance));

    // The gateway's own endpoints.
    let r = s.call("/-/health", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["issuers"]["gitlab_com"]["keys"], 1, "the P-384 key is not usable, so not counted");
    let r = s.call("/-/metrics", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    for series in [
        r#"edgewise_cloud_connector_requests{feature="code_suggestions",outcome="allowed"}"#,
        r#"edgewise_cloud_connector_requests{feature="code_suggestions",outcome="unauthenticated"}"#,
        r#"edgewise_cloud_connector_requests{feature="duo_chat",outcome="forbidden"}"#,
        r#"edgewise_cloud_connector_requests{feature="none",outcome="not_found"}"#,
        r#"edgewise_cloud_connector_jwks_fetch{issuer="gitlab_com",result="ok"}"#,
        r#"edgewise_cloud_connector_jwks_key_age_seconds{issuer="customers_gitlab_com"}"#,
    ] {
        let series = edgewise::envoy::prometheus(series);
        let line = text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if !series.contains("key_age") {
            assert!(value >= 1.0, "{line}");
        }
    }
    assert!(!text.contains("instance-2") && !text.contains(instance), "no per-instance label");
    assert_eq!(s.metric("requests.code_suggestions.allowed").await, 3);
    assert_eq!(s.metric("requests.duo_chat.forbidden").await, 2);

    // The access log names instance, feature and outcome (Envoy flushes it about once a second).
    let start = Instant::now();
    let entry: Value = loop {
        let log = s.envoy.log();
        if let Some(line) = log.lines().find(|l| l.contains("\"outcome\":\"forbidden\"")) {
            break serde_json::from_str(line.trim()).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no access log line with the outcome:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((entry["feature"].as_str(), entry["instance_id"].as_str()), (Some("duo_chat"), Some(instance)));
    assert_eq!(entry["status"], 403);
}

const JWKS_TIMING: &str = r#""refresh_seconds": 3600, "min_refresh_seconds": 60, "max_refresh_seconds": 86400,
                        "retry_seconds": 10, "kid_miss_cooldown_seconds": 60, "wait_ms": 3000"#;

fn jwks_timing(
    refresh: u64,
    retry: u64,
    cooldown: u64,
    wait_ms: u64,
) -> impl FnOnce(edgewise::envoy::Config) -> edgewise::envoy::Config {
    move |c| {
        c.replace(
            JWKS_TIMING,
            &format!(
                r#""refresh_seconds": {refresh}, "min_refresh_seconds": 1, "max_refresh_seconds": {refresh}, "retry_seconds": {retry}, "kid_miss_cooldown_seconds": {cooldown}, "wait_ms": {wait_ms}"#
            ),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_key_is_accepted_at_once_and_forged_kids_cause_no_fetch_storm() {
    let k1 = Idp::new(GITLAB, "k1").unwrap();
    let k2 = Idp::new(GITLAB, "k2").unwrap();
    let s = setup(jwks_timing(3600, 1, 30, 3000), |i| i.publish(GITLAB, published(&[&k1]))).await;
    let t1 = k1.token(cc::claims("instance-1", &["code_suggestions"]));
    assert_eq!(s.until_accepted(&t1, Duration::from_secs(10)).await.status, 200);
    let fetches = s.issuers.jwks_fetches(GITLAB);
    assert_eq!(fetches, 1, "one fetch for both workers");

    // The issuer adds k2 and signs with it: the unknown kid triggers one refetch, and the request
    // waits for it instead of failing.
    s.issuers.publish(GITLAB, published(&[&k1, &k2]));
    let t2 = k2.token(cc::claims("instance-1", &["code_suggestions"]));
    let r = s.call("/ai/v2/code/completions", Some(&t2), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.issuers.jwks_fetches(GITLAB), fetches + 1);

    // Tokens naming kids nobody publishes: refused, and within the cooldown no fetch at all.
    for i in 0..30 {
        let forged = k2.sign_as(json!({"alg":"ES256","kid":format!("forged-{i}")}), &json!({"iss": GITLAB}));
        assert_invalid_token(&s.call("/ai/v2/code/completions", Some(&forged), &[]).await, "forged kid");
    }
    assert_eq!(s.issuers.jwks_fetches(GITLAB), fetches + 1, "forged kids caused fetches");
    assert_eq!(s.metric("jwks.gitlab_com.fetch.ok").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_refresh_by_max_age_once_for_all_workers_and_survive_a_failing_issuer() {
    let k1 = Idp::rs256(GITLAB, "k1").unwrap();
    let k2 = Idp::new(GITLAB, "k2").unwrap();
    let s = setup(jwks_timing(30, 1, 30, 3000), |i| {
        i.publish(GITLAB, published(&[&k1, &k2]));
        i.set_max_age(GITLAB, Some(2));
    })
    .await;
    let t1 = k1.token(cc::claims("instance-1", &["code_suggestions"]));
    assert_eq!(s.until_accepted(&t1, Duration::from_secs(10)).await.status, 200);

    // max-age=2 (within the configured 1..30 s): a fetch every 2 s, by one worker of the two.
    let before = s.issuers.jwks_fetches(GITLAB);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let fetched = s.issuers.jwks_fetches(GITLAB) - before;
    assert!((3..=5).contains(&fetched), "{fetched} JWKS fetches in 8 s with max-age=2 and two workers");
    assert_eq!(s.issuers.discovery_fetches(GITLAB), 1, "the discovered jwks_uri is kept");

    // k1 is removed: after the next refresh its tokens are refused, even the one cached as valid.
    s.issuers.publish(GITLAB, published(&[&k2]));
    let start = Instant::now();
    loop {
        let r = s.call("/ai/v2/code/completions", Some(&t1), &[]).await;
        if r.status == 401 {
            assert_invalid_token(&r, "removed kid");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "k1 still accepted {:?} after removal", start.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("removed kid refused {:?} after the issuer dropped it", start.elapsed());

    // The issuer fails: refreshes fail, the keys in force stay in use.
    let t2 = k2.token(cc::claims("instance-1", &["code_suggestions"]));
    s.issuers.set_down(GITLAB, true);
    let failed = s.metric("jwks.gitlab_com.fetch.failed").await;
    let start = Instant::now();
    while s.metric("jwks.gitlab_com.fetch.failed").await < failed + 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no failed refresh");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = s.call("/ai/v2/code/completions", Some(&t2), &[]).await;
    assert_eq!(r.status, 200, "keys dropped after a failed refresh: {}", r.text());
    assert!(s.envoy.log().contains("keeping the keys in force"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_issuer_down_at_start_fails_closed_and_paused_requests_pass_once_it_is_up() {
    let k1 = Idp::rs256(GITLAB, "k1").unwrap();
    let c1 = Idp::new(CUSTOMERS, "c1").unwrap();
    let s = setup(jwks_timing(3600, 1, 30, 3000), |i| {
        i.publish(GITLAB, published(&[&k1]));
        i.publish(CUSTOMERS, published(&[&c1]));
        i.set_down(GITLAB, true);
    })
    .await;
    let token = k1.token(cc::claims("instance-1", &["code_suggestions"]));

    // Never fetched: 503 (never 401, never open), after waiting the configured bound.
    let start = Instant::now();
    let r = s.call("/ai/v2/code/completions", Some(&token), &[]).await;
    let waited = start.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "keys_unavailable");
    assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6), "answered after {waited:?}");
    let health = s.call("/-/health", None, &[]).await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["issuers"]["gitlab_com"]["keys"], 0);
    assert_eq!(health.json()["issuers"]["customers_gitlab_com"]["keys"], 1, "{}", health.text());
    assert_eq!(s.ai.count(), 0);
    assert!(s.metric("requests.code_suggestions.keys_unavailable").await >= 1);

    // A request arriving while the issuer is still down is paused, and passes once it is up.
    let paused = {
        let (client, front, token) = (s.client.clone(), s.front, token.clone());
        tokio::spawn(async move {
            let bearer = format!("Bearer {token}");
            let start = Instant::now();
            let r = client
                .send(front, Request::get("cloud.gitlab.com", "/ai/v2/code").header("authorization", &bearer))
                .await;
            (r.unwrap().status, start.elapsed())
        })
    };
    // With bodies, every way they come: held, then forwarded whole.
    let bearer = format!("Bearer {token}");
    let valid = [("authorization", bearer.as_bytes())];
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.issuers.set_down(GITLAB, false);
    };
    let (with_bodies, ()) = tokio::join!(
        edgewise::hostile::with_bodies(&s.client, s.front, "cloud.gitlab.com", "/ai/v2/code", &valid),
        release
    );
    let (status, took) = paused.await.unwrap();
    assert_eq!(status, 200, "paused request");
    assert!(took >= Duration::from_millis(500), "it was paused ({took:?}), not answered at once");
    println!("paused request answered {took:?} after it arrived (issuer up after 500 ms)");
    for (case, answer) in with_bodies {
        assert_eq!(answer, "200", "paused, then forwarded: {case}");
    }
    let seen = s.ai.seen();
    let whole = seen.iter().filter(|r| r.method == "POST" && r.body.as_bytes() == edgewise::hostile::BODY).count();
    assert_eq!(whole, 4, "each paused request reached the backend with its body, whole");
    assert!(seen.iter().any(|r| r.method == "POST" && r.body.len() == 2 * 1024 * 1024), "and the 2 MiB one");
    let r = s.call("/-/health", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_hold_across_two_workers() {
    let k1 = Idp::rs256(GITLAB, "k1").unwrap();
    let (rate, burst) = (40.0, 10.0);
    let s = setup(
        |c| {
            c.replace(
                r#""rate_limit": { "requests": 600, "per": "minute", "burst": 100 }"#,
                r#""rate_limit": { "requests": 40, "per": "second", "burst": 10 }"#,
            )
        },
        |i| i.publish(GITLAB, published(&[&k1])),
    )
    .await;
    let busy = k1.token(cc::claims("busy-org", &["code_suggestions"]));
    let quiet = k1.token(cc::claims("quiet-org", &["code_suggestions"]));
    // Accepted once (the keys are in), then the bucket is given time to fill up again.
    assert_eq!(s.until_accepted(&quiet, Duration::from_secs(10)).await.status, 200);
    let warm = s.call("/ai/v1/chat", Some(&busy), &[]).await; // another feature: its own bucket
    assert_eq!(warm.status, 403);

    // 16 clients hammer as fast as they can for 4 s over fresh connections, which Envoy spreads
    // over its two workers.
    let duration = Duration::from_secs(4);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, front, token) = (s.client.clone(), s.front, busy.clone());
        tasks.push(tokio::spawn(async move {
            let bearer = format!("Bearer {token}");
            let (mut ok, mut limited, mut retry_after) = (0u32, 0u32, None);
            while start.elapsed() < duration {
                let req = Request::get("cloud.gitlab.com", "/ai/v2/code/completions").header("authorization", &bearer);
                let r = client.send(front, req).await.unwrap();
                match r.status {
                    200 => ok += 1,
                    429 => {
                        limited += 1;
                        retry_after = r.header("retry-after").map(str::to_owned);
                        assert_eq!(r.header("ratelimit-limit"), Some("10"));
                        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
                        assert!(r.header("ratelimit-reset").is_some());
                        assert_eq!(r.header("ratelimit-policy"), Some("40;w=1;burst=10"));
                        assert_eq!(r.json()["error"], "rate_limited");
                    }
                    other => panic!("unexpected {other}: {}", r.text()),
                }
            }
            (ok, limited, retry_after)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l, retry) = t.await.unwrap();
        ok += o;
        limited += l;
        if l > 0 {
            assert_eq!(retry.as_deref(), Some("1"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let expected = burst + rate * elapsed;
    println!("rate limit: {ok} allowed, {limited} limited in {elapsed:.2} s; expected {expected:.0} allowed");
    assert!(limited > ok, "the load did not exceed the limit: {ok} allowed, {limited} limited");
    assert!((ok as f64 - expected).abs() <= 0.1 * expected, "{ok} allowed, expected {expected:.0} ± 10%");
    // Both workers took connections, so the bucket really was shared.
    let stats = s.envoy.stats().await.unwrap();
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            stats
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("listener.127.0.0.1_") && k.ends_with(&format!("worker_{w}.downstream_cx_total"))
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .collect();
    assert!(per_worker.iter().all(|n| *n > 20), "connections per worker: {per_worker:?}");
    // Another organization is not affected.
    assert_eq!(s.call("/ai/v2/code/completions", Some(&quiet), &[]).await.status, 200);
    assert_eq!(s.metric("requests.code_suggestions.rate_limited").await, limited as u64);
}

/// Redis and edgewise-ratelimit with the limits file `limits` (a path), both on ports the OS
/// picks, under `dir`.
async fn fleet_limits(dir: &std::path::Path, limits: &std::path::Path) -> (Redis, RateLimitService) {
    let redis = Redis::start_any(&dir.join("redis")).await.unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_edgewise-ratelimit"));
    let rls = RateLimitService::start(binary, limits, &redis.url(), 0, 0, &dir.join("ratelimit.log")).await.unwrap();
    rls.ready(Duration::from_secs(10)).await.unwrap();
    (redis, rls)
}

/// A gateway of the fleet: the shipped YAML in global mode, at the service's gRPC port.
async fn replica(rls: &RateLimitService, keys: &[&Idp]) -> Setup {
    let port = rls.grpc;
    let published = published(keys);
    setup(
        move |c| {
            c.replace("numerator: 0, denominator: HUNDRED", "numerator: 100, denominator: HUNDRED").port(18081, port)
        },
        move |i| i.publish(GITLAB, published),
    )
    .await
}

/// Sends `n` requests for `path` with `token`, alternating between the replicas, 8 at a time;
/// the responses.
async fn spread(replicas: &[&Setup], path: &str, token: &str, n: usize, headers: &[(&str, &str)]) -> Vec<Response> {
    let mut all = Vec::new();
    for round in 0..n.div_ceil(8) {
        let calls = (0..8.min(n - round * 8))
            .map(|i| replicas[(round * 8 + i) % replicas.len()].call(path, Some(token), headers));
        all.extend(futures_util::future::join_all(calls).await);
    }
    all
}

/// Waits until `check` holds, at most 15 s.
async fn until(what: &str, check: impl AsyncFn() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(15), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two gateways share one limit per organization and feature through edgewise-ratelimit on
/// Redis (the shipped limits file: observability 300 a minute), with the RateLimit headers and
/// Retry-After; another organization is unaffected; the descriptor comes from the verified
/// token only; a restart of the service (graceful: SIGTERM, exit 0) loses no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_shares_one_limit_per_organization_through_edgewise_ratelimit() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, mut rls) = fleet_limits(dir.path(), &edgewise::ratelimit::shipped_limits()).await;
    let k1 = Idp::new(GITLAB, "k1").unwrap();
    let (a, b) = (replica(&rls, &[&k1]).await, replica(&rls, &[&k1]).await);
    let busy = k1.token(cc::claims("busy-org", &["observability", "code_suggestions"]));
    let quiet = k1.token(cc::claims("quiet-org", &["observability", "code_suggestions"]));
    for s in [&a, &b] {
        assert_eq!(s.until_accepted(&busy, Duration::from_secs(10)).await.status, 200);
    }
    let limit = 300;

    // 1.5 times the limit, half through each gateway, concurrently.
    let responses = spread(&[&a, &b], "/observability/query", &busy, limit * 3 / 2, &[]).await;
    let allowed = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    println!("fleet: {allowed} allowed, {} limited of {}", limited.len(), responses.len());
    assert_eq!(allowed + limited.len(), responses.len(), "only 200 and 429");
    assert!(allowed.abs_diff(limit) <= limit / 50, "{allowed} allowed across the fleet, limit {limit} (± 2%)");
    for r in &limited {
        assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
        assert_eq!(r.header("ratelimit-limit"), Some("300"));
        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        assert_eq!(r.header("ratelimit-policy"), Some("300;w=60"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
    }
    // Both gateways refuse now, for this organization and this feature only.
    for s in [&a, &b] {
        assert_eq!(s.call("/observability/query", Some(&busy), &[]).await.status, 429);
        assert_eq!(s.call("/ai/v2/code/completions", Some(&busy), &[]).await.status, 200);
    }
    let r = a.call("/observability/query", Some(&quiet), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ratelimit-remaining"), Some("299"), "the quiet organization's own count");
    // Forged descriptor headers change nothing: the filter sets them from the token.
    let forged = [("x-edgewise-ratelimit-key", "quiet-org"), ("x-edgewise-feature", "code_suggestions")];
    assert_eq!(b.call("/observability/query", Some(&busy), &forged).await.status, 429);
    let seen = a.obs.seen().pop().unwrap();
    assert_eq!((seen.header("x-edgewise-feature"), seen.header("x-edgewise-ratelimit-key")), (None, None));

    // The service's metrics: labelled by feature, never by organization.
    let over = rls
        .metric("edgewise_ratelimit_descriptors_total{feature=\"observability\",outcome=\"over_limit\"}")
        .await
        .unwrap();
    assert!(over >= limited.len() as f64, "over_limit {over}");
    assert!(!rls.get("/metrics").await.unwrap().1.contains("busy-org"));

    // A restart keeps every count (they are in Redis).
    let status = rls.stop().await.unwrap();
    assert!(status.success(), "graceful shutdown: {status}; log: {}", rls.log());
    rls.start_again().await.unwrap();
    rls.ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(a.call("/observability/query", Some(&busy), &[]).await.status, 429);
    let r = b.call("/observability/query", Some(&quiet), &[]).await;
    assert_eq!((r.status, r.header("ratelimit-remaining")), (200, Some("298")));
}

/// What a gateway does when the shared counter cannot answer: Redis down, Redis too slow, the
/// service down. The request goes on to the gateway's own buckets (failure_mode_deny: false),
/// within the filter's 0.1 s timeout, counted by Envoy and the service; limits apply again once
/// Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_shared_counter_requests_fall_back_to_each_gateway_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.json");
    std::fs::write(&limits, r#"{"limits":{"observability":{"requests":5,"per":"minute"}}}"#).unwrap();
    let (mut redis, mut rls) = fleet_limits(dir.path(), &limits).await;
    let k1 = Idp::new(GITLAB, "k1").unwrap();
    let s = replica(&rls, &[&k1]).await;
    let token = k1.token(cc::claims("an-org", &["observability", "code_suggestions"]));
    assert_eq!(s.until_accepted(&token, Duration::from_secs(10)).await.status, 200);
    let statuses = |rs: Vec<Response>| rs.iter().map(|r| r.status).collect::<Vec<_>>();
    assert_eq!(
        statuses(spread(&[&s], "/observability/q", &token, 7, &[]).await).iter().filter(|s| **s == 200).count(),
        5
    );
    let fallback = || async { s.envoy.stat("cluster.observability.ratelimit.failure_mode_allowed").await.unwrap_or(0) };

    // Redis down: allowed (the gateway's buckets decide), quickly, and counted.
    redis.stop().await;
    for _ in 0..3 {
        let start = Instant::now();
        let r = s.call("/observability/q", Some(&token), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    }
    assert_eq!(fallback().await, 3);
    // Visible in the service: readiness and storage_up follow a PING on the counting connection.
    until("readyz 503 while Redis is down", async || rls.get("/readyz").await.unwrap().0 == 503).await;
    assert_eq!(rls.metric("edgewise_ratelimit_storage_up").await.unwrap(), 0.0);

    // Redis back (empty: no persistence here): the limit applies again.
    redis.restart().await.unwrap();
    until("ready again", async || rls.get("/readyz").await.unwrap().0 == 200).await;
    let after = statuses(spread(&[&s], "/observability/q", &token, 7, &[]).await);
    assert_eq!(after.iter().filter(|s| **s == 200).count(), 5, "{after:?}; log: {}", rls.log());
    assert_eq!(after.iter().filter(|s| **s == 429).count(), 2, "{after:?}");

    // Redis too slow (every client paused for 3 s): the 0.1 s timeout bounds the delay.
    assert_eq!(redis.command("CLIENT PAUSE 3000 ALL").await.unwrap(), "+OK");
    let before = fallback().await;
    let start = Instant::now();
    let r = s.call("/observability/q", Some(&token), &[]).await;
    let took = start.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took < Duration::from_millis(500), "a slow service added {took:?}");
    println!("with Redis paused the request took {took:?}");
    assert_eq!(fallback().await, before + 1);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The service down: the same.
    rls.stop().await.unwrap();
    let r = s.call("/observability/q", Some(&token), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(fallback().await, before + 2);
    assert!(s.envoy.stat("cluster.observability.ratelimit.error").await.unwrap_or(0) >= 2);
}

/// Header values that are not UTF-8 (obs-text, legal in HTTP/1.1) sent on a raw socket: one the
/// gateway must interpret gets a clear 400, one it only passes on reaches the backend byte for
/// byte, and every valid request after them is served (a trapped VM would fail them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_values_that_are_not_utf8_get_a_400_or_pass_untouched_and_break_nothing() {
    let gitlab = Idp::rs256(GITLAB, "gitlab-1").unwrap();
    let s = setup(|c| c, |i| i.publish(GITLAB, published(&[&gitlab]))).await;
    let instance = "6b1a2c3d-0000-4000-8000-000000000009";
    let token = gitlab.token(cc::claims(instance, &["code_suggestions"]));
    assert_eq!(s.until_accepted(&token, Duration::from_secs(10)).await.status, 200);
    let bearer = format!("Bearer {token}");
    let s = &s;
    let raw = |authorization: &[u8], extra: &[(&str, &[u8])]| {
        let headers = [&[("authorization", authorization)], extra].concat();
        let bytes = raw_get(b"cloud.gitlab.com", "/ai/v2/code/completions", &headers);
        async move { s.client.raw(s.front, "cloud.gitlab.com", &bytes).await.unwrap() }
    };

    let passed = raw(bearer.as_bytes(), &[("x-anything", b"caf\xe9 \x80\xff")]).await;
    assert_eq!(raw_statuses(&passed), [200], "{}", String::from_utf8_lossy(&passed));
    assert_eq!(s.ai.seen().pop().unwrap().header_bytes("x-anything"), Some(&b"caf\xe9 \x80\xff"[..]));

    let ai_before = s.ai.count();
    let bad_instance = [instance.as_bytes(), b"\xe9"].concat();
    for (what, out) in [
        ("authorization", raw(b"Bearer caf\xe9", &[]).await),
        ("instance id", raw(bearer.as_bytes(), &[("x-gitlab-instance-id", &bad_instance)]).await),
        ("realm", raw(bearer.as_bytes(), &[("x-gitlab-realm", b"saas\xff")]).await),
    ] {
        let text = String::from_utf8_lossy(&out);
        assert_eq!(raw_statuses(&out), [400], "{what}: {text}");
        assert!(text.contains("\"error\":\"invalid_header\"") && text.contains("is not valid UTF-8"), "{what}: {text}");
    }
    assert_eq!(s.ai.count(), ai_before, "no refused request reached the backend");
    assert_eq!(s.metric("requests.code_suggestions.bad_request").await, 3);
    for _ in 0..10 {
        assert_eq!(s.call("/ai/v2/code/completions", Some(&token), &[]).await.status, 200);
    }
}

/// The hostile class (edgewise::hostile) with a valid token: each gets a clear status, a second
/// Authorization never reaches the backend (it sees exactly the verified one), and the valid
/// requests after them are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_clear_statuses_and_break_nothing() {
    let gitlab = Idp::rs256(GITLAB, "gitlab-1").unwrap();
    let s = setup(|c| c, |i| i.publish(GITLAB, published(&[&gitlab]))).await;
    let token = gitlab.token(cc::claims("6b1a2c3d-0000-4000-8000-00000000000a", &["code_suggestions"]));
    assert_eq!(s.until_accepted(&token, Duration::from_secs(10)).await.status, 200);
    let bearer = format!("Bearer {token}");
    let ai_before = s.ai.count();
    let valid = [("authorization", bearer.as_bytes())];
    let report =
        edgewise::hostile::run(&s.client, s.front, "cloud.gitlab.com", "/ai/v2/code/completions", &valid).await;
    report.unwrap().check(&[
        ("obs-text in a header value", &[200]),
        ("control bytes in a header value", &[400]),
        ("a non-ASCII authority", &[400]),
        ("a 60 KiB header value", &[431]),
        ("200 headers", &[431]),
        // Two Authorization values read as one ("a, b"): not a bearer token, refused.
        ("a second Authorization", &[401]),
        ("a second Host", &[200]),
        ("two pipelined requests", &[200, 200]),
        ("a body on GET", &[200]),
        ("a POST with Content-Length", &[200]),
        ("a chunked POST with trailers", &[200]),
        ("a POST with Expect: 100-continue, its body at once", &[100, 200]),
    ]);
    let seen = s.ai.seen();
    assert_eq!(seen.len() - ai_before, 9, "only the accepted requests reached the backend");
    let bodies =
        seen[ai_before..].iter().filter(|r| r.method == "POST" && r.body.as_bytes() == edgewise::hostile::BODY);
    assert_eq!(bodies.count(), 3, "each POST's body reached the backend whole");
    for r in &seen[ai_before..] {
        let authorizations: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(authorizations, [bearer.as_str()], "exactly the verified token reaches the backend");
    }
    for _ in 0..10 {
        assert_eq!(s.call("/ai/v2/code/completions", Some(&token), &[]).await.status, 200);
    }
}

/// A request the gateway pauses while it fetches keys is held whole. A body, however it comes
/// (Content-Length, chunked with a trailer, after a `100 Continue`, over Envoy's buffer limit,
/// HTTP/2 DATA and trailers), never pushes it on to the backend: at start while the keys load,
/// and after an unknown kid, with a forged, an expired and an unknown-kid token. Each gets the
/// answer the same GET gets, and the backend sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_request_with_a_body_reaches_nothing_before_it_is_decided() {
    let k1 = Idp::rs256(GITLAB, "k1").unwrap();
    let impostor = Idp::rs256(GITLAB, "k1").unwrap();
    let stranger = Idp::rs256(GITLAB, "k-unknown").unwrap();
    let s = setup(jwks_timing(3600, 1, 1, 1500), |i| {
        i.publish(GITLAB, published(&[&k1]));
        i.set_down(GITLAB, true);
    })
    .await;
    let path = "/ai/v2/code/completions";
    let instance = "6b1a2c3d-0000-4000-8000-00000000000b";
    let claims = cc::claims(instance, &["code_suggestions"]);
    let mut expired = claims.clone();
    expired["exp"] = json!(idp::now() - 3600);
    let tokens = [
        ("forged", impostor.token(claims.clone())),
        ("expired", k1.token(expired)),
        ("unknown kid", stranger.token(claims.clone())),
    ];
    // The attacker also names the backend: a request that slipped through would reach it.
    let backend = ("x-edgewise-backend", &b"ai_gateway"[..]);
    let bodies = |token: &str| {
        let (s, bearer) = (&s, format!("Bearer {token}"));
        async move {
            let headers = [("authorization", bearer.as_bytes()), backend];
            edgewise::hostile::with_bodies(&s.client, s.front, "cloud.gitlab.com", path, &headers).await
        }
    };

    // At start, the issuer down: every token waits for keys, then 503, with a body or without.
    let (s, bodies) = (&s, &bodies);
    let rounds = tokens.iter().map(|(what, token)| async move {
        let (get, with_bodies) = tokio::join!(s.call(path, Some(token), &[]), bodies(token));
        (*what, get, with_bodies)
    });
    for (what, get, with_bodies) in futures_util::future::join_all(rounds).await {
        assert_eq!((get.status, get.json()["error"].as_str()), (503, Some("keys_unavailable")), "{what}");
        assert_eq!(with_bodies.len(), 5);
        for (case, answer) in with_bodies {
            assert_eq!(answer, "503", "at start, {what} token: {case}");
        }
    }
    assert_eq!((s.ai.count(), s.obs.count()), (0, 0), "nothing reached a backend while the keys were loading");

    // Keys in force: an unknown kid pauses the request for a refetch (one per cooldown, 1 s
    // here); forged and expired tokens are refused at once. Each case is sent on its own after
    // the cooldown, so that with an unknown kid it pauses for its own refetch.
    s.issuers.set_down(GITLAB, false);
    let good = k1.token(claims.clone());
    assert_eq!(s.until_accepted(&good, Duration::from_secs(10)).await.status, 200);
    let ai_before = s.ai.count();
    for (what, token) in &tokens[..2] {
        let (get, with_bodies) = tokio::join!(s.call(path, Some(token), &[]), bodies(token));
        assert_invalid_token(&get, what);
        for (case, answer) in with_bodies {
            assert_eq!(answer, "401", "after the keys, {what} token: {case}");
        }
    }
    let (what, unknown) = (&tokens[2].0, &tokens[2].1);
    let bearer = format!("Bearer {unknown}");
    let headers = [("authorization", bearer.as_bytes()), backend];
    let get = s.call(path, Some(unknown), &[]).await;
    assert_invalid_token(&get, what);
    for case in edgewise::hostile::body_cases("cloud.gitlab.com", path, &headers) {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let fetches = s.issuers.jwks_fetches(GITLAB);
        let answer = case.send(&s.client, s.front, "cloud.gitlab.com").await;
        assert_eq!(answer, "401", "after the keys, {what} token: {}", case.name);
        assert!(s.issuers.jwks_fetches(GITLAB) > fetches, "{} paused for a refetch", case.name);
    }
    assert_eq!(s.ai.count(), ai_before, "no refused request reached the backend");
    assert_eq!(s.obs.count(), 0);
    assert_eq!(s.call(path, Some(&good), &[]).await.status, 200, "and a valid request is served");
}

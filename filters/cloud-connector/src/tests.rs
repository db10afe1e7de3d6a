//! The filter's flow on the fake host: pausing for keys, the background fetching them, the
//! request resumed and forwarded with the gateway's headers, limits and refusals.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use edgewise_host::fake::{FakeBackground, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Fetched, Filter, Flow, Waker};
use p256::ecdsa::signature::Signer;
use rand_chacha::rand_core::SeedableRng;
use serde_json::json;

use crate::CloudConnector;

const NOW_S: u64 = 1_800_000_000;

const CONFIG: &str = r#"{
  "issuers": [{ "issuer": "https://gitlab.com" }],
  "features": [
    { "name": "code", "prefix": "/ai/v2/code", "scopes": ["code_suggestions"], "cluster": "ai", "rewrite_prefix": "/v2/code",
      "rate_limit": { "requests": 10, "per": "minute", "burst": 2 } }
  ],
  "public_paths": ["/status"]
}"#;

fn key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(7))
}

fn enc(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn token() -> String {
    let claims = json!({"iss":"https://gitlab.com","aud":"gitlab-ai-gateway","sub":"instance-1","gitlab_realm":"saas",
                        "exp":NOW_S+600,"iat":NOW_S,"scopes":["code_suggestions"]});
    let input = format!(
        "{}.{}",
        enc(json!({"alg":"ES256","kid":"k1"}).to_string().as_bytes()),
        enc(claims.to_string().as_bytes())
    );
    let sig: p256::ecdsa::Signature = key().sign(input.as_bytes());
    format!("{input}.{}", enc(&sig.to_bytes()))
}

fn jwks() -> Vec<u8> {
    let p = key().verifying_key().to_encoded_point(false);
    let x = p.x().map(|x| enc(x)).unwrap_or_default();
    let y = p.y().map(|y| enc(y)).unwrap_or_default();
    json!({"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":x,"y":y}]}).to_string().into_bytes()
}

fn ok(body: Vec<u8>) -> Fetched {
    Fetched { status: 200, headers: vec![(":status".into(), b"200".to_vec())], body }
}

fn configure(host: &FakeHost) -> CloudConnector {
    host.now_ms.set(NOW_S * 1000);
    let mut setup = FakeSetup { host, instance: "cc".into(), shared_by_workers: true };
    CloudConnector::configure(CONFIG.as_bytes(), &mut setup).unwrap()
}

fn request<'a>(host: &'a FakeHost, path: &str, authorization: &[u8]) -> FakeStream<'a> {
    let mut s = FakeStream::new(
        host,
        &[
            (":path", path.as_bytes()),
            (":method", b"GET"),
            ("authorization", authorization),
            ("x-gitlab-scopes", b"all"),
        ],
    );
    s.waker = Some(Waker(42));
    s
}

/// Fetches the issuer's keys through the background: discovery, then the JWKS.
fn fetch_keys(cc: &CloudConnector, host: &FakeHost) -> Vec<Waker> {
    let mut bg = FakeBackground::new(host);
    cc.on_tick(&mut bg);
    assert_eq!(bg.calls, [("gitlab.com".into(), "gitlab.com".into(), "/.well-known/openid-configuration".into())]);
    let discovery = json!({"issuer":"https://gitlab.com","jwks_uri":"https://gitlab.com/oauth/discovery/keys"});
    cc.on_fetched(&mut bg, 1, &ok(discovery.to_string().into_bytes()));
    assert_eq!(bg.calls[1], ("gitlab.com".into(), "gitlab.com".into(), "/oauth/discovery/keys".into()));
    cc.on_fetched(&mut bg, 2, &ok(jwks()));
    bg.woken
}

#[test]
fn a_request_waits_for_the_keys_and_is_forwarded_with_the_gateways_headers() {
    let host = FakeHost::default();
    let cc = configure(&host);
    let bearer = format!("Bearer {}", token());
    let mut s = request(&host, "/ai/v2/code/completions?x=1", bearer.as_bytes());
    assert_eq!(cc.on_request_headers(&mut s, &mut ()), Flow::Stop);
    assert_eq!(s.replied, None, "paused, not answered");

    assert_eq!(fetch_keys(&cc, &host), [Waker(42)], "the paused request is woken once the keys are in");
    assert_eq!(cc.on_resume(&mut s), Flow::Continue);
    assert_eq!(s.header(":path"), Some(&b"/v2/code/completions?x=1"[..]));
    assert_eq!(s.header("x-gitlab-instance-id"), Some(&b"instance-1"[..]));
    assert_eq!(s.header("x-gitlab-realm"), Some(&b"saas"[..]));
    assert_eq!(s.header("x-gitlab-scopes"), Some(&b"code_suggestions"[..]), "the client's value is replaced");
    assert_eq!(s.header("x-edgewise-backend"), Some(&b"ai"[..]));
    assert_eq!(s.header("authorization"), Some(bearer.as_bytes()), "forwarded as the client sent it");
    assert_eq!(host.metric("edgewise.cloud_connector.requests.code.allowed"), 1);
    assert!(s.log.contains(&("cloud_connector_outcome".into(), "allowed".into())), "{:?}", s.log);
}

#[test]
fn authorization_is_forwarded_untouched_or_removed() {
    for forward in [true, false] {
        let host = FakeHost::default();
        host.now_ms.set(NOW_S * 1000);
        let config = CONFIG.replacen('{', &format!("{{\"forward_authorization\":{forward},"), 1);
        let mut setup = FakeSetup { host: &host, instance: "cc".into(), shared_by_workers: true };
        let cc = CloudConnector::configure(config.as_bytes(), &mut setup).unwrap();
        fetch_keys(&cc, &host);
        let bearer = format!("Bearer {}", token());
        let mut s = request(&host, "/ai/v2/code/x", bearer.as_bytes());
        assert_eq!(cc.on_request_headers(&mut s, &mut ()), Flow::Continue);
        assert_eq!(s.header("authorization"), forward.then_some(bearer.as_bytes()), "forward_authorization {forward}");
    }
}

#[test]
fn limits_refusals_and_bytes_that_are_not_text() {
    let host = FakeHost::default();
    let cc = configure(&host);
    fetch_keys(&cc, &host);
    let bearer = format!("Bearer {}", token());
    // Burst 2 (the paused-and-resumed request of the other test is not here): the third is 429.
    for _ in 0..2 {
        assert_eq!(
            cc.on_request_headers(&mut request(&host, "/ai/v2/code/x", bearer.as_bytes()), &mut ()),
            Flow::Continue
        );
    }
    let mut limited = request(&host, "/ai/v2/code/x", bearer.as_bytes());
    assert_eq!(cc.on_request_headers(&mut limited, &mut ()), Flow::Stop);
    let reply = limited.replied.unwrap();
    assert_eq!(reply.status, 429);
    assert!(reply.headers.iter().any(|(k, _)| k == "retry-after"), "{:?}", reply.headers);

    let cases: [(&str, &[u8], u32); 4] = [
        ("/ai/v2/code/x", b"Bearer caf\xe9", 400),
        ("/ai/v2/code/x", b"", 401),
        ("/nowhere", bearer.as_bytes(), 404),
        ("/ai/v2/code/x", b"Bearer not.a.token", 401),
    ];
    for (path, authorization, status) in cases {
        let mut s = request(&host, path, authorization);
        assert_eq!(cc.on_request_headers(&mut s, &mut ()), Flow::Stop, "{path}");
        assert_eq!(s.replied.map(|r| r.status), Some(status), "{path} {authorization:?}");
    }
    assert_eq!(host.metric("edgewise.cloud_connector.requests.code.bad_request"), 1);
    assert_eq!(host.metric("edgewise.cloud_connector.requests.none.not_found"), 1);

    // A public path passes without a token; the routing header a client sent is removed.
    let mut public = FakeStream::new(&host, &[(":path", b"/status"), ("x-edgewise-backend", b"admin")]);
    assert_eq!(cc.on_request_headers(&mut public, &mut ()), Flow::Continue);
    assert_eq!(public.header("x-edgewise-backend"), None);
}

#[test]
fn a_paused_request_gets_503_when_its_wait_is_over_without_keys() {
    let host = FakeHost::default();
    let cc = configure(&host);
    let bearer = format!("Bearer {}", token());
    let mut s = request(&host, "/ai/v2/code/x", bearer.as_bytes());
    assert_eq!(cc.on_request_headers(&mut s, &mut ()), Flow::Stop);
    let mut bg = FakeBackground::new(&host);
    cc.on_tick(&mut bg);
    cc.on_fetched(&mut bg, 1, &Fetched::default());
    assert!(bg.woken.is_empty(), "a failed fetch wakes nobody: the wait goes on");
    host.now_ms.set(host.now_ms.get() + 3_001);
    cc.on_tick(&mut bg);
    assert_eq!(bg.woken, [Waker(42)]);
    assert_eq!(cc.on_resume(&mut s), Flow::Stop);
    assert_eq!(s.replied.map(|r| r.status), Some(503));
    assert_eq!(host.metric("edgewise.cloud_connector.jwks.gitlab_com.fetch.failed"), 1);
}

#[global_allocator]
static ALLOCATOR: edgewise_host::fake::CountingAllocator = edgewise_host::fake::CountingAllocator;

/// Once its token is cached, an allowed request allocates nothing: the token's lookup, the
/// scope, the organization's bucket, the identity headers and the signature.
#[test]
fn a_request_with_a_cached_token_allocates_nothing() {
    let host = FakeHost::default();
    host.now_ms.set(NOW_S * 1000);
    let config = CONFIG
        .replace(r#""requests": 10, "per": "minute", "burst": 2"#, r#""requests": 1000000, "per": "minute""#)
        .replace(
            r#""public_paths""#,
            r#""authenticity": { "secret": "a-test-secret-of-at-least-32-bytes-long" }, "public_paths""#,
        );
    let mut setup = FakeSetup { host: &host, instance: "cc".into(), shared_by_workers: false };
    let cc = CloudConnector::configure(config.as_bytes(), &mut setup).unwrap();
    fetch_keys(&cc, &host);
    let bearer = format!("Bearer {}", token());
    let counted: Vec<u64> = (0..3)
        .map(|_| {
            let mut s = request(&host, "/ai/v2/code/completions", bearer.as_bytes());
            let (flow, n) = edgewise_host::fake::allocations(|| cc.on_request_headers(&mut s, &mut ()));
            assert_eq!(flow, Flow::Continue, "{:?}", s.replied);
            assert!(s.header("x-edgewise-signature").is_some(), "signed: {:?}", s.request);
            n
        })
        .collect();
    assert_eq!(counted[2], 0, "allocations per request: {counted:?}");
}

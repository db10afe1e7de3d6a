//! The filter's flow on the fake host: keys fetched by the background, a caller forwarded
//! through its cluster's tunnel, and no allocation for a cached token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use edgewise_host::fake::{allocations, CountingAllocator, FakeBackground, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Fetched, Filter, Flow};
use p256::ecdsa::signature::Signer;
use rand_chacha::rand_core::SeedableRng;
use serde_json::json;

use crate::TunnelAuth;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const NOW_S: u64 = 1_800_000_000;

const CONFIG: &str = r#"{"issuers": [{"issuer": "https://gitlab.com", "cluster": "issuer", "jwks_path": "/jwks"}],
  "audiences": ["tunnel-hub"], "allow": {"ops-bot": ["cluster-b"]}, "cluster_header": "x-edgewise-cluster"}"#;

fn key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(11))
}

fn enc(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn token(sub: &str) -> String {
    let claims = json!({"iss":"https://gitlab.com","aud":"tunnel-hub","sub":sub,"exp":NOW_S+600});
    let input = format!("{}.{}", enc(br#"{"alg":"ES256","kid":"t1"}"#), enc(claims.to_string().as_bytes()));
    let sig: p256::ecdsa::Signature = key().sign(input.as_bytes());
    format!("{input}.{}", enc(&sig.to_bytes()))
}

fn configured(host: &FakeHost) -> TunnelAuth {
    host.now_ms.set(NOW_S * 1000);
    let mut setup = FakeSetup { host, instance: "ta".into(), shared_by_workers: false };
    let ta = TunnelAuth::configure(CONFIG.as_bytes(), &mut setup).unwrap();
    let mut bg = FakeBackground::new(host);
    ta.on_tick(&mut bg);
    assert_eq!(bg.calls, [("issuer".into(), "gitlab.com".into(), "/jwks".into())]);
    let p = key().verifying_key().to_encoded_point(false);
    let (x, y) = (p.x().map(|x| enc(x)).unwrap_or_default(), p.y().map(|y| enc(y)).unwrap_or_default());
    let jwks = json!({"keys":[{"kty":"EC","crv":"P-256","kid":"t1","x":x,"y":y}]}).to_string().into_bytes();
    ta.on_fetched(&mut bg, 1, &Fetched { status: 200, headers: Vec::new(), body: jwks });
    ta
}

fn request<'a>(host: &'a FakeHost, path: &str, bearer: &str) -> FakeStream<'a> {
    FakeStream::new(
        host,
        &[(":path", path.as_bytes()), ("authorization", bearer.as_bytes()), ("x-edgewise-cluster", b"forged")],
    )
}

#[test]
fn a_caller_goes_through_its_clusters_tunnel_and_nowhere_else() {
    let host = FakeHost::default();
    let ta = configured(&host);
    let bearer = format!("Bearer {}", token("ops-bot"));
    let mut s = request(&host, "/clusters/cluster-b/api/v1/pods?watch=1", &bearer);
    assert_eq!(ta.on_request_headers(&mut s, &mut ()), Flow::Continue);
    assert_eq!(s.header(":path"), Some(&b"/api/v1/pods?watch=1"[..]));
    assert_eq!(s.header("x-edgewise-cluster"), Some(&b"cluster-b"[..]), "the client's value is replaced");
    assert_eq!(s.header("authorization"), None, "the hub's token does not reach the cluster");

    let mut s = request(&host, "/clusters/cluster-a/api", &bearer);
    assert_eq!(ta.on_request_headers(&mut s, &mut ()), Flow::Stop);
    assert_eq!(s.replied.map(|r| r.status), Some(403));
    let mut s = request(&host, "/clusters/cluster-b", "Bearer not.a.token");
    assert_eq!(ta.on_request_headers(&mut s, &mut ()), Flow::Stop);
    assert_eq!(s.replied.map(|r| r.status), Some(401));
}

#[test]
fn a_request_with_a_cached_token_allocates_nothing() {
    let host = FakeHost::default();
    let ta = configured(&host);
    let bearer = format!("Bearer {}", token("ops-bot"));
    let counted: Vec<u64> = (0..3)
        .map(|_| {
            let mut s = request(&host, "/clusters/cluster-b/api/v1/namespaces", &bearer);
            let (flow, n) = allocations(|| ta.on_request_headers(&mut s, &mut ()));
            assert_eq!(flow, Flow::Continue, "{:?}", s.replied);
            n
        })
        .collect();
    assert_eq!(counted[2], 0, "allocations per request: {counted:?}");
}

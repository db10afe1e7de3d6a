//! Both roles on the fake host: identity headers survive only from a trusted gateway, and an
//! allowed request allocates nothing once warm.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use edgewise_host::fake::{allocations, CountingAllocator, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Filter, Flow};
use p256::ecdsa::signature::Signer;
use rand_chacha::rand_core::SeedableRng;

use crate::MeshIdentity;

#[test]
fn the_sidecar_keeps_identity_headers_only_from_a_trusted_gateway() {
    let host = FakeHost::default();
    let mut setup = FakeSetup { host: &host, instance: "m".into(), shared_by_workers: true };
    let config = br#"{"role": "sidecar", "trusted_gateways": ["spiffe://cluster.local/ns/edge/sa/gateway"]}"#;
    let mesh = MeshIdentity::configure(config, &mut setup).unwrap();
    for (peer, kept) in [
        (Some("spiffe://cluster.local/ns/edge/sa/gateway"), true),
        (Some("spiffe://cluster.local/ns/shop/sa/cart"), false),
        (None, false),
    ] {
        let mut s = FakeStream::new(&host, &[("x-edgewise-user", b"alice"), ("x-other", b"1")]);
        s.peer_uri_san = peer.map(str::to_string);
        assert_eq!(mesh.on_request_headers(&mut s, &mut ()), Flow::Continue);
        assert_eq!(s.header("x-edgewise-user").is_some(), kept, "{peer:?}");
        assert_eq!(s.header("x-other"), Some(&b"1"[..]));
    }
    assert_eq!(host.metric("edgewise.mesh_identity.sidecar.trusted_peer"), 1);
    assert_eq!(host.metric("edgewise.mesh_identity.sidecar.untrusted_peer"), 2);
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const NOW_S: u64 = 1_800_000_000;

/// The allocations of the third of three requests (the first two warm the filter up).
fn allocations_when_warm(mesh: &MeshIdentity, host: &FakeHost, request: &[(&str, &[u8])], peer: Option<&str>) -> u64 {
    let mut counted = Vec::new();
    for _ in 0..3 {
        let mut s = FakeStream::new(host, request);
        s.peer_uri_san = peer.map(str::to_string);
        let (flow, n) = allocations(|| mesh.on_request_headers(&mut s, &mut ()));
        assert_eq!(flow, Flow::Continue, "{:?}", s.replied);
        assert_eq!(s.header("x-edgewise-user"), Some(&b"alice"[..]));
        counted.push(n);
    }
    counted[2]
}

#[test]
fn an_allowed_request_allocates_nothing_in_either_role() {
    let host = FakeHost::default();
    host.now_ms.set(NOW_S * 1000);
    let key = p256::ecdsa::SigningKey::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(9));
    let point = key.verifying_key().to_encoded_point(false);
    let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let (x, y) = (point.x().map(|x| enc(x)).unwrap_or_default(), point.y().map(|y| enc(y)).unwrap_or_default());
    let claims = serde_json::json!({"iss":"https://idp.example","aud":"shop","sub":"alice","exp":NOW_S+600});
    let input = format!("{}.{}", enc(br#"{"alg":"ES256","kid":"k1"}"#), enc(claims.to_string().as_bytes()));
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    let bearer = format!("Bearer {input}.{}", enc(&sig.to_bytes()));
    for forward_token in [false, true] {
        let config = serde_json::json!({
            "role": "gateway", "issuers": ["https://idp.example"], "audiences": ["shop"], "forward_token": forward_token,
            "jwks": {"keys": [{"kty":"EC","crv":"P-256","kid":"k1","x":x,"y":y}]},
        });
        let mut setup = FakeSetup { host: &host, instance: "m".into(), shared_by_workers: false };
        let mesh = MeshIdentity::configure(config.to_string().as_bytes(), &mut setup).unwrap();
        let request: [(&str, &[u8]); 2] = [("authorization", bearer.as_bytes()), ("x-edgewise-user", b"mallory")];
        let n = allocations_when_warm(&mesh, &host, &request, None);
        assert_eq!(n, 0, "gateway, forward_token: {forward_token}");
    }
    let mut setup = FakeSetup { host: &host, instance: "m".into(), shared_by_workers: false };
    let config = br#"{"role": "sidecar", "trusted_gateways": ["spiffe://cluster.local/ns/edge/sa/gateway"]}"#;
    let mesh = MeshIdentity::configure(config, &mut setup).unwrap();
    let request: [(&str, &[u8]); 1] = [("x-edgewise-user", b"alice")];
    let n = allocations_when_warm(&mesh, &host, &request, Some("spiffe://cluster.local/ns/edge/sa/gateway"));
    assert_eq!(n, 0, "sidecar, a trusted gateway");
}

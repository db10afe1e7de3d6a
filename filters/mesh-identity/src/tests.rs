//! The sidecar role on the fake host: identity headers survive only from a trusted gateway.

use edgewise_host::fake::{FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Filter, Flow};

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

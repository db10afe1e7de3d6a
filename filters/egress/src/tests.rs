//! The filter's flow on the fake host.

use edgewise_host::fake::{FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Filter, Flow};

use crate::{Egress, Sent};

#[test]
fn allowed_destinations_are_rewritten_and_counted_by_response_class() {
    let host = FakeHost::default();
    let mut setup = FakeSetup { host: &host, instance: "eg".into(), shared_by_workers: true };
    let eg = Egress::configure(br#"{"allow": ["api.github.com", "*.example.com"]}"#, &mut setup).unwrap();
    let mut sent = Sent::default();
    let mut s = FakeStream::new(
        &host,
        &[(":authority", b"api.github.com.egress.local"), ("x-edgewise-egress-destination", b"private:x")],
    );
    assert_eq!(eg.on_request_headers(&mut s, &mut sent), Flow::Continue);
    assert_eq!(s.header(":authority"), Some(&b"api.github.com"[..]));
    assert_eq!(s.header("x-edgewise-egress-destination"), Some(&b"api_github_com"[..]));
    s.response = vec![(":status".into(), b"503".to_vec())];
    eg.on_response_headers(&mut s, &mut sent);
    assert_eq!(host.metric("edgewise.egress.dest.api_github_com.requests"), 1);
    assert_eq!(host.metric("edgewise.egress.dest.api_github_com.responses.5xx"), 1);

    for (authority, status) in
        [(&b"evil.test.egress.local"[..], 403), (b"10.0.0.1.egress.local", 403), (b"caf\xe9.egress.local", 400)]
    {
        let mut sent = Sent::default();
        let mut s = FakeStream::new(&host, &[(":authority", authority)]);
        assert_eq!(eg.on_request_headers(&mut s, &mut sent), Flow::Stop);
        assert_eq!(s.replied.as_ref().map(|r| r.status), Some(status), "{authority:?}");
        eg.on_response_headers(&mut s, &mut sent);
    }
    assert_eq!(host.metric("edgewise.egress.dest.api_github_com.responses.5xx"), 1, "nothing counted for a refusal");
    assert_eq!(host.metric("edgewise.egress.denied.not_allowed"), 1);
    assert_eq!(host.metric("edgewise.egress.denied.ip_literal"), 1);
}

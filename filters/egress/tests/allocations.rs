//! An allowed request allocates nothing once the filter is warm: the decision, the rewrite and
//! the metrics of its request and of its response.

use edgewise_host::fake::{allocations, CountingAllocator, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Filter, Flow};
use egress::{Egress, Sent};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn an_allowed_request_allocates_nothing() {
    let host = FakeHost::default();
    let mut setup = FakeSetup { host: &host, instance: "eg".into(), shared_by_workers: false };
    let config = br#"{"allow": ["api.github.com", "*.googleapis.com", "hooks.slack.com", "example.com:8443"]}"#;
    let eg = Egress::configure(config, &mut setup).unwrap();
    for authority in
        ["api.github.com.egress.local", "storage.googleapis.com.egress.local", "example.com.egress.local:8443"]
    {
        let mut counted = Vec::new();
        for _ in 0..3 {
            let mut s = FakeStream::new(&host, &[(":authority", authority.as_bytes())]);
            s.response = vec![(":status".into(), b"200".to_vec())];
            let mut sent = Sent::default();
            let (flow, n) = allocations(|| {
                let flow = eg.on_request_headers(&mut s, &mut sent);
                eg.on_response_headers(&mut s, &mut sent);
                flow
            });
            assert_eq!(flow, Flow::Continue, "{authority}");
            assert!(s.header("x-edgewise-egress-destination").is_some(), "{authority} was allowed");
            counted.push(n);
        }
        assert_eq!(counted[2], 0, "{authority}: allocations per request {counted:?}");
    }
}

//! A routed request allocates nothing once the filter is warm: from the configuration's routes
//! and from the table of the route service, natively (the table in the filter) and on proxy-wasm
//! (the table in shared data).

use edgewise_host::fake::{allocations, CountingAllocator, FakeBackground, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Fetched, Filter, Flow};
use serverless::Serverless;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const CONFIG: &str = r#"{
  "domain": "serverless.example",
  "routes": [{ "match": { "project": "0000000a", "environment": "0000000b", "function": "000000000c" },
               "cluster": "customer-a", "host": "hello.ns.knative.a.example" }],
  "management": { "cluster": "management", "poll_interval_ms": 1000 }
}"#;

const TABLE: &str = r#"{"version": 7, "routes": [{ "match": { "project": "1111111a", "environment": "2222222b", "function": "333333333c" },
                          "cluster": "customer-b", "host": "fn.knative.b.example" }]}"#;

/// Allocations of the third request to `authority` (the first two warm the filter up).
fn allocations_when_warm(sl: &Serverless, host: &FakeHost, authority: &str, cluster: &str) -> u64 {
    let mut counted = 0;
    for _ in 0..3 {
        let mut s = FakeStream::new(host, &[(":authority", authority.as_bytes()), ("x-edgewise-cluster", b"forged")]);
        let (flow, n) = allocations(|| sl.on_request_headers(&mut s, &mut ()));
        assert_eq!(flow, Flow::Continue);
        assert_eq!(s.header("x-edgewise-cluster"), Some(cluster.as_bytes()), "{authority} was routed");
        counted = n;
    }
    counted
}

#[test]
fn a_routed_request_allocates_nothing() {
    for shared_by_workers in [false, true] {
        let host = FakeHost::default();
        let mut setup = FakeSetup { host: &host, instance: "sl".into(), shared_by_workers };
        let sl = Serverless::configure(CONFIG.as_bytes(), &mut setup).unwrap();
        let mut bg = FakeBackground::new(&host);
        sl.on_tick(&mut bg);
        sl.on_fetched(&mut bg, 1, &Fetched { status: 200, headers: Vec::new(), body: TABLE.as_bytes().to_vec() });

        let n = allocations_when_warm(&sl, &host, "0000000a-0000000b-000000000c.serverless.example", "customer-a");
        assert_eq!(n, 0, "a route of the configuration (shared_by_workers: {shared_by_workers})");
        let n = allocations_when_warm(&sl, &host, "1111111a-2222222b-333333333c.serverless.example", "customer-b");
        assert_eq!(n, 0, "a route of the route service's table (shared_by_workers: {shared_by_workers})");
    }
}

//! The filter's flow on the fake host: routing, what a client may not steer, and the route
//! table polled from the management service.

use edgewise_host::fake::{FakeBackground, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Fetched, Filter, Flow};

use crate::Serverless;

const CONFIG: &str = r#"{
  "domain": "serverless.example",
  "routes": [{ "match": { "project": "0000000a", "environment": "0000000b", "function": "000000000c" },
               "cluster": "customer-a", "host": "hello.ns.knative.a.example" }],
  "management": { "cluster": "management", "poll_interval_ms": 1000 }
}"#;

const POLLED: &str = "1111111a-2222222b-333333333c.serverless.example";

fn configure(host: &FakeHost, shared_by_workers: bool) -> Serverless {
    let mut setup = FakeSetup { host, instance: "sl".into(), shared_by_workers };
    Serverless::configure(CONFIG.as_bytes(), &mut setup).unwrap()
}

fn get<'a>(sl: &Serverless, host: &'a FakeHost, authority: &[u8]) -> (Flow, FakeStream<'a>) {
    let mut s = FakeStream::new(host, &[(":authority", authority), ("x-edgewise-cluster", b"customer-b")]);
    (sl.on_request_headers(&mut s, &mut ()), s)
}

fn table() -> Fetched {
    let doc = r#"{"version": 7, "routes": [{ "match": { "project": "1111111a", "environment": "2222222b",
                  "function": "333333333c" }, "cluster": "customer-b", "host": "fn.knative.b.example" }]}"#;
    Fetched { status: 200, headers: vec![("etag".into(), b"\"v7\"".to_vec())], body: doc.as_bytes().to_vec() }
}

#[test]
fn hosts_are_routed_and_the_cluster_is_the_filters_alone() {
    let host = FakeHost::default();
    let sl = configure(&host, true);
    let (flow, s) = get(&sl, &host, b"0000000A-0000000B-000000000C.serverless.example:443");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(s.header(":authority"), Some(&b"hello.ns.knative.a.example"[..]));
    assert_eq!(s.header("x-edgewise-cluster"), Some(&b"customer-a"[..]), "the forged value is overwritten");
    assert_eq!(s.header("x-forwarded-host"), Some(&b"0000000A-0000000B-000000000C.serverless.example:443"[..]));

    let (flow, s) = get(&sl, &host, b"www.example.com");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(s.header("x-edgewise-cluster"), None, "a client never chooses the cluster");

    for (authority, status) in
        [(&b"0000000a-0000000b.serverless.example"[..], 404), (b"caf\xe9.serverless.example", 400)]
    {
        let (flow, s) = get(&sl, &host, authority);
        assert_eq!((flow, s.replied.map(|r| r.status)), (Flow::Stop, Some(status)));
    }
    assert_eq!(host.metric("edgewise.serverless.requests.malformed_host"), 2);
}

#[test]
fn the_polled_table_routes_once_fetched_and_is_shared_only_between_copies() {
    for shared_by_workers in [true, false] {
        let host = FakeHost::default();
        let sl = configure(&host, shared_by_workers);
        let (flow, s) = get(&sl, &host, POLLED.as_bytes());
        assert_eq!((flow, s.replied.map(|r| r.status)), (Flow::Stop, Some(503)), "no table yet");

        let mut bg = FakeBackground::new(&host);
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls, [("management".into(), "management".into(), "/v1/serverless/routes".into())]);
        sl.on_fetched(&mut bg, 1, &table());
        let (flow, s) = get(&sl, &host, POLLED.as_bytes());
        assert_eq!(flow, Flow::Continue);
        assert_eq!(s.header("x-edgewise-cluster"), Some(&b"customer-b"[..]));
        assert_eq!(host.metric("edgewise.serverless.table.version"), 7);
        assert_eq!(host.metric("edgewise.serverless.management_fetch.ok"), 1);

        // Proxy-wasm: another worker's copy installs the table from shared data; natively there
        // is no other copy and nothing is stored.
        let other = configure(&host, shared_by_workers);
        let (flow, _) = get(&other, &host, POLLED.as_bytes());
        assert_eq!(flow == Flow::Continue, !shared_by_workers, "shared_by_workers: {shared_by_workers}");

        // Within the interval no call; a failed fetch keeps the table in force.
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls.len(), 1);
        host.now_ms.set(1_000);
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls.len(), 2);
        sl.on_fetched(&mut bg, 2, &Fetched::default());
        assert_eq!(get(&sl, &host, POLLED.as_bytes()).0, Flow::Continue);
        assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 1);
    }
}

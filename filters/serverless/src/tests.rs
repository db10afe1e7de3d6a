//! The filter's flow on the fake host: routing, what a client may not steer, and the route
//! table polled from the management service.

use edgewise_host::fake::{FakeBackground, FakeHost, FakeSetup, FakeStream};
use edgewise_host::{Fetched, Filter, Flow, Host, StreamEvent};

use crate::Serverless;

const CONFIG: &str = r#"{
  "domain": "serverless.example",
  "routes": [{ "match": { "project": "0000000a", "environment": "0000000b", "function": "000000000c" },
               "cluster": "customer-a", "host": "hello.ns.knative.a.example" }],
  "management": { "cluster": "management", "poll_interval_ms": 1000, "max_answer_bytes": 1048576 }
}"#;

const POLLED: &str = "1111111a-2222222b-333333333c.serverless.example";

/// One instance name per host: the tests' hosts stand for separate Envoys.
fn instance(host: &FakeHost) -> String {
    format!("sl-{:p}", host)
}

fn configure(host: &FakeHost, shared_by_workers: bool) -> Serverless {
    let mut setup = FakeSetup { host, instance: instance(host), shared_by_workers };
    Serverless::configure(CONFIG.as_bytes(), &mut setup).unwrap()
}

fn get<'a>(sl: &Serverless, host: &'a FakeHost, authority: &[u8]) -> (Flow, FakeStream<'a>) {
    let mut s = FakeStream::new(host, &[(":authority", authority), ("x-edgewise-cluster", b"customer-b")]);
    (sl.on_request_headers(&mut s, &mut ()), s)
}

const B_ROUTE: &str = r#"{ "match": { "project": "1111111a", "environment": "2222222b", "function": "333333333c" },
                          "cluster": "customer-b", "host": "fn.knative.b.example" }"#;
const C_ROUTE: &str = r#"{ "match": { "project": "1111111a", "environment": "2222222b", "function": "00000000cc" },
                          "cluster": "customer-c", "host": "fn.knative.c.example" }"#;
const C: &str = "1111111a-2222222b-00000000cc.serverless.example";

fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Fetched {
    let headers = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    Fetched { status, headers, body: body.as_bytes().to_vec() }
}

/// A whole table from a service that does not watch.
fn table() -> Fetched {
    answer(200, &[("etag", "\"v7\"")], &format!(r#"{{"version": 7, "routes": [{B_ROUTE}]}}"#))
}

fn routed(sl: &Serverless, host: &FakeHost, authority: &str) -> Option<String> {
    let (flow, s) = get(sl, host, authority.as_bytes());
    let cluster = s.header("x-edgewise-cluster").map(|c| String::from_utf8_lossy(c).into_owned());
    (flow == Flow::Continue).then_some(cluster).flatten()
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
fn a_table_from_a_service_that_does_not_watch_is_polled_and_shared_by_every_copy() {
    for shared_by_workers in [true, false] {
        let host = FakeHost::default();
        let sl = configure(&host, shared_by_workers);
        let (flow, s) = get(&sl, &host, POLLED.as_bytes());
        assert_eq!((flow, s.replied.map(|r| r.status)), (Flow::Stop, Some(503)), "no table yet");

        let mut bg = FakeBackground::new(&host);
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls, [("management".into(), "management".into(), "/v1/serverless/routes?limit=10000".into())]);
        sl.on_fetched(&mut bg, 1, &table());
        assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"));
        assert_eq!(host.metric("edgewise.serverless.table.version"), 7);
        assert_eq!(host.metric("edgewise.serverless.management_fetch.ok"), 1);

        // Proxy-wasm: another worker's copy reads the same table from shared data; natively,
        // another configuration of the filter (a second filter chain) shares the watcher.
        let other = configure(&host, shared_by_workers);
        let (flow, _) = get(&other, &host, POLLED.as_bytes());
        assert_eq!(flow, Flow::Continue, "shared_by_workers: {shared_by_workers}");

        // No cursor: polled again after the interval; a failed fetch keeps the table in force.
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls.len(), 1);
        host.now_ms.set(1_000);
        sl.on_tick(&mut bg);
        assert_eq!(bg.calls.len(), 2);
        sl.on_fetched(&mut bg, 2, &Fetched::default());
        assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"));
        assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 1);
    }
}

/// Natively, configurations of one name share a watcher only with the same bytes (another
/// configuration has a table and a watch of its own), and a shared watcher whose call went out
/// through a configuration that is gone (its answer never comes) calls again once it is overdue.
#[test]
fn natively_a_watcher_is_shared_by_equal_configurations_and_outlives_the_one_that_called() {
    let host = FakeHost::default();
    let name = instance(&host);
    let setup = || FakeSetup { host: &host, instance: name.clone(), shared_by_workers: true };
    let first = Serverless::configure(CONFIG.as_bytes(), &mut setup()).unwrap();
    let other_bytes = CONFIG.replace("1048576", "1048577");
    let different = Serverless::configure(other_bytes.as_bytes(), &mut setup()).unwrap();

    let mut bg = FakeBackground::new(&host);
    first.on_tick(&mut bg);
    first.on_fetched(&mut bg, 1, &table());
    assert_eq!(routed(&first, &host, POLLED).as_deref(), Some("customer-b"));
    let (flow, s) = get(&different, &host, POLLED.as_bytes());
    assert_eq!((flow, s.replied.map(|r| r.status)), (Flow::Stop, Some(503)), "its own table, not loaded yet");
    let mut other_bg = FakeBackground::new(&host);
    different.on_tick(&mut other_bg);
    assert_eq!(other_bg.calls.len(), 1, "its own watch");

    // The first configuration calls again, then is replaced before the answer: the call is lost.
    host.now_ms.set(1_000);
    first.on_tick(&mut bg);
    assert_eq!(bg.calls.len(), 2);
    let second = Serverless::configure(CONFIG.as_bytes(), &mut setup()).unwrap();
    drop(first);
    assert_eq!(routed(&second, &host, POLLED).as_deref(), Some("customer-b"), "the same table");
    let mut second_bg = FakeBackground::new(&host);
    second.on_tick(&mut second_bg);
    assert!(second_bg.calls.is_empty(), "the lost call is not overdue yet");
    host.now_ms.set(1_000 + 30_000);
    second.on_tick(&mut second_bg);
    assert_eq!(second_bg.calls.len(), 1, "overdue: called again");
    assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 1);
}

/// A call that cannot be started (at start-up Envoy may not have the cluster yet) is tried again
/// at the next tick, then less often: the table comes a tick after the cluster does.
#[test]
fn a_call_that_cannot_start_is_tried_again_at_the_next_tick_then_less_often() {
    let host = FakeHost::default();
    let sl = configure(&host, true);
    let mut bg = FakeBackground::new(&host);
    bg.refuse_calls = true;
    let mut tried = Vec::new();
    for now in (0..=2_000).step_by(250) {
        host.now_ms.set(now);
        let before = bg.refused;
        sl.on_tick(&mut bg);
        if bg.refused > before {
            tried.push(now);
        }
    }
    assert_eq!(tried, [0, 250, 750, 1_750], "250 ms, 500 ms, then every second");
    bg.refuse_calls = false;
    host.now_ms.set(2_750);
    sl.on_tick(&mut bg);
    assert_eq!(bg.calls.len(), 1, "the cluster is there: the call goes");
    assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 4);
}

/// Drives the watcher through the fake background: the path of every call, answered in turn.
struct Service<'a> {
    sl: &'a Serverless,
    bg: FakeBackground<'a>,
}

impl<'a> Service<'a> {
    fn new(sl: &'a Serverless, host: &'a FakeHost) -> Self {
        Service { sl, bg: FakeBackground::new(host) }
    }

    /// The path of the call in flight, if one was made since the last answer.
    fn asked(&self) -> Option<&str> {
        self.bg.calls.last().map(|(_, _, path)| path.as_str())
    }

    fn answer(&mut self, r: Fetched) {
        let id = self.bg.calls.len() as u64;
        self.sl.on_fetched(&mut self.bg, id, &r);
    }

    fn tick_at(&mut self, ms: u64) {
        self.bg.host.now_ms.set(ms);
        self.sl.on_tick(&mut self.bg);
    }
}

#[test]
fn the_table_is_loaded_in_pages_then_watched_and_changes_apply_in_place() {
    for shared_by_workers in [true, false] {
        let host = FakeHost::default();
        let sl = configure(&host, shared_by_workers);
        let mut svc = Service::new(&sl, &host);
        svc.tick_at(0);
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"));
        svc.answer(answer(
            200,
            &[("x-edgewise-cursor", "h.5")],
            &format!(r#"{{"version":5,"routes":[{B_ROUTE}],"next":"p2"}}"#),
        ));
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000&after=p2"), "the next page at once");
        // The first load fills the table in force: what is loaded routes; what is not yet
        // loaded is 503 (the table is incomplete), not 404.
        assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"), "routed from the first page");
        assert_eq!(get(&sl, &host, C.as_bytes()).1.replied.map(|r| r.status), Some(503), "not loaded yet");
        svc.answer(answer(200, &[], &format!(r#"{{"version":6,"routes":[{C_ROUTE}]}}"#)));
        assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"));
        assert_eq!(routed(&sl, &host, C).as_deref(), Some("customer-c"));
        assert_eq!(host.metric("edgewise.serverless.table.routes"), 2);
        assert_eq!(host.metric("edgewise.serverless.table.full_loads"), 1);
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.5&wait=25"), "watching from the first page");

        // Replaying what overlapped the load: C was put at 6 and is put again; a route deleted
        // before a later page was read may be deleted again.
        let gone_early =
            r#"{"delete":{"match":{"project":"99999999","environment":"99999999","function":"9999999999"}}}"#;
        svc.answer(answer(
            200,
            &[("x-edgewise-cursor", "h.7")],
            &format!(r#"{{"version":7,"changes":[{{"put":{C_ROUTE}}},{gone_early}]}}"#),
        ));
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.7&wait=25"));
        let delete_b =
            r#"{"delete":{"match":{"project":"1111111a","environment":"2222222b","function":"333333333c"}}}"#;
        svc.answer(answer(200, &[("x-edgewise-cursor", "h.8")], &format!(r#"{{"version":8,"changes":[{delete_b}]}}"#)));
        assert_eq!(routed(&sl, &host, POLLED), None, "deleted in place");
        assert_eq!(get(&sl, &host, POLLED.as_bytes()).1.replied.map(|r| r.status), Some(404));
        assert_eq!(
            (host.metric("edgewise.serverless.table.routes"), host.metric("edgewise.serverless.table.version")),
            (1, 8)
        );

        // Nothing changed in `wait`: the next watch leaves at once.
        let calls = svc.bg.calls.len();
        svc.tick_at(26_000);
        svc.answer(answer(304, &[("x-edgewise-cursor", "h.8")], ""));
        assert_eq!(svc.bg.calls.len(), calls + 1);
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.8&wait=25"));

        // A 410: one full load, and the table stays in force meanwhile.
        svc.answer(answer(410, &[], r#"{"error":"gone"}"#));
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"));
        assert_eq!(routed(&sl, &host, C).as_deref(), Some("customer-c"));
        svc.answer(answer(200, &[("x-edgewise-cursor", "h.9")], &format!(r#"{{"version":9,"routes":[{B_ROUTE}]}}"#)));
        assert_eq!((routed(&sl, &host, C), routed(&sl, &host, POLLED).as_deref()), (None, Some("customer-b")));
        assert_eq!(host.metric("edgewise.serverless.management_fetch.gone"), 1);
        assert_eq!(host.metric("edgewise.serverless.table.full_loads"), 2);
    }
}

/// Proxy-wasm: a worker's copy that has not ticked since a full load replaced the table still
/// sees the changes made after it, and the table of before is emptied once it has settled.
#[test]
fn a_copy_that_learns_of_a_new_table_late_still_sees_every_change() {
    let host = FakeHost::default();
    let sl = configure(&host, false);
    let other = configure(&host, false);
    let mut svc = Service::new(&sl, &host);
    svc.tick_at(0);
    svc.answer(answer(200, &[("x-edgewise-cursor", "h.1")], &format!(r#"{{"version":1,"routes":[{B_ROUTE}]}}"#)));
    assert_eq!(routed(&other, &host, POLLED).as_deref(), Some("customer-b"), "the other copy reads generation 1");
    svc.answer(answer(410, &[], ""));
    svc.tick_at(2_500);
    assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"));
    svc.answer(answer(200, &[("x-edgewise-cursor", "h.2")], &format!(r#"{{"version":2,"routes":[{B_ROUTE}]}}"#)));
    svc.answer(answer(
        200,
        &[("x-edgewise-cursor", "h.3")],
        &format!(r#"{{"version":3,"changes":[{{"put":{C_ROUTE}}}]}}"#),
    ));
    let delete_b = r#"{"delete":{"match":{"project":"1111111a","environment":"2222222b","function":"333333333c"}}}"#;
    svc.answer(answer(200, &[("x-edgewise-cursor", "h.4")], &format!(r#"{{"version":4,"changes":[{delete_b}]}}"#)));
    assert_eq!(routed(&other, &host, C).as_deref(), Some("customer-c"), "a put after the flip");
    assert_eq!(routed(&other, &host, POLLED), None, "a delete after the flip");
    // Settled: the other copy ticks, the table of before is emptied.
    host.now_ms.set(5_000);
    other.on_tick(&mut FakeBackground::new(&host));
    assert_eq!(routed(&other, &host, C).as_deref(), Some("customer-c"));
    let left: usize = (0..1usize << 16)
        .filter(|i| {
            let bucket = format!("edgewise.serverless.{}.b1.{i:x}", instance(&host));
            host.shared_get(&bucket).0.is_some_and(|v| !v.is_empty())
        })
        .count();
    assert_eq!(left, 0, "generation 1's buckets are empty");
}

#[test]
fn hostile_answers_change_nothing_are_counted_and_lead_to_a_full_load_after_a_pause() {
    let put_c = format!(r#"{{"put":{C_ROUTE}}}"#);
    let delete_unknown =
        r#"{"delete":{"match":{"project":"99999999","environment":"99999999","function":"9999999999"}}}"#;
    let cases: Vec<(&str, Fetched)> = vec![
        ("garbage", answer(200, &[("x-edgewise-cursor", "h.4")], "\u{0}\u{ff}garbage")),
        ("truncated", answer(200, &[("x-edgewise-cursor", "h.4")], &format!(r#"{{"version":4,"changes":[{put_c}"#))),
        ("no cursor", answer(200, &[], &format!(r#"{{"version":4,"changes":[{put_c}]}}"#))),
        (
            "a cursor not fit for a URL",
            answer(200, &[("x-edgewise-cursor", "h 4\r\n")], &format!(r#"{{"version":4,"changes":[{put_c}]}}"#)),
        ),
        ("backwards", answer(200, &[("x-edgewise-cursor", "h.2")], &format!(r#"{{"version":2,"changes":[{put_c}]}}"#))),
        (
            "unknown delete",
            answer(
                200,
                &[("x-edgewise-cursor", "h.4")],
                &format!(r#"{{"version":4,"changes":[{put_c},{delete_unknown}]}}"#),
            ),
        ),
        (
            "over max_answer_bytes",
            answer(
                200,
                &[("x-edgewise-cursor", "h.4")],
                &format!(r#"{{"version":4,"changes":[{}]}}"#, vec![put_c.as_str(); 10_000].join(",")),
            ),
        ),
    ];
    for shared_by_workers in [true, false] {
        for (what, hostile) in &cases {
            let host = FakeHost::default();
            let sl = configure(&host, shared_by_workers);
            let mut svc = Service::new(&sl, &host);
            svc.tick_at(0);
            svc.answer(answer(
                200,
                &[("x-edgewise-cursor", "h.3")],
                &format!(r#"{{"version":3,"routes":[{B_ROUTE}]}}"#),
            ));
            assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.3&wait=25"), "{what}");
            let calls = svc.bg.calls.len();
            svc.answer(hostile.clone());
            assert_eq!(host.metric("edgewise.serverless.management_fetch.rejected"), 1, "{what}");
            assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"), "{what}: the table stays");
            assert_eq!(routed(&sl, &host, C), None, "{what}: nothing of the answer applied");
            assert_eq!(host.metric("edgewise.serverless.table.version"), 3, "{what}");
            assert_eq!(svc.bg.calls.len(), calls, "{what}: no call at once");
            svc.tick_at(100);
            assert_eq!(svc.bg.calls.len(), calls, "{what}: not before the back-off");
            svc.tick_at(600);
            assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"), "{what}: then the whole table");
        }
    }
}

/// A service streaming its watch (natively): the stream's head, then its lines.
impl Service<'_> {
    /// Loads a one-route table at `h.3` and answers the stream that follows with `head`: the
    /// stream's id.
    fn streaming(&mut self, head: &Fetched) -> u64 {
        self.bg.streaming = true;
        self.tick_at(self.bg.host.now_ms.get());
        self.answer(answer(200, &[("x-edgewise-cursor", "h.3")], &format!(r#"{{"version":3,"routes":[{B_ROUTE}]}}"#)));
        assert_eq!(self.asked(), Some("/v1/serverless/routes?since=h.3&wait=25&stream=1"));
        let id = self.bg.calls.len() as u64;
        assert_eq!(self.bg.streams.last(), Some(&id));
        self.event(id, StreamEvent::Head(head));
        id
    }

    fn event(&mut self, id: u64, event: StreamEvent<'_>) {
        self.sl.on_stream(&mut self.bg, id, event);
    }
}

/// The head of a streamed watch.
fn lines() -> Fetched {
    answer(200, &[("content-type", "application/x-ndjson")], "")
}

const DELETE_B: &str =
    r#"{"delete":{"match":{"project":"1111111a","environment":"2222222b","function":"333333333c"}}}"#;

#[test]
fn natively_the_watch_is_one_stream_whose_lines_apply_as_they_arrive() {
    let host = FakeHost::default();
    let sl = configure(&host, true);
    let mut svc = Service::new(&sl, &host);
    let id = svc.streaming(&lines());
    // A line in two pieces applies once whole.
    let c_route = C_ROUTE.replace('\n', " ");
    let put_c = format!("{{\"version\":4,\"cursor\":\"h.4\",\"changes\":[{{\"put\":{c_route}}}]}}\n");
    let (first, rest) = put_c.split_at(40);
    svc.event(id, StreamEvent::Data(first.as_bytes()));
    assert_eq!(routed(&sl, &host, C), None, "half a line changes nothing");
    svc.event(id, StreamEvent::Data(rest.as_bytes()));
    assert_eq!(routed(&sl, &host, C).as_deref(), Some("customer-c"), "applied as it arrived");
    // A line with no change (nothing for `wait`), then a delete, in one piece.
    let two = format!("{{\"version\":4,\"cursor\":\"h.4\",\"changes\":[]}}\n{{\"version\":5,\"cursor\":\"h.5\",\"changes\":[{DELETE_B}]}}\n");
    svc.event(id, StreamEvent::Data(two.as_bytes()));
    assert_eq!(routed(&sl, &host, POLLED), None, "deleted in place");
    assert_eq!(host.metric("edgewise.serverless.table.version"), 5);
    assert_eq!(host.metric("edgewise.serverless.management_fetch.ok"), 3, "the load and two lines of changes");
    assert_eq!(host.metric("edgewise.serverless.management_fetch.not_modified"), 1, "the line with none");
    assert_eq!(svc.bg.calls.len() as u64, id, "the one stream all along");

    // Heard from at 20 s; silent past `wait_seconds` + `timeout_ms` after that, it is ended and
    // watched again from the last line's cursor.
    svc.bg.host.now_ms.set(20_000);
    svc.event(id, StreamEvent::Data(b"{\"version\":5,\"cursor\":\"h.5\",\"changes\":[]}\n"));
    svc.tick_at(49_000);
    assert!(svc.bg.reset.is_empty(), "heard from 29 s ago");
    svc.tick_at(51_000);
    assert_eq!(svc.bg.reset, [id], "silent for 31 s: ended");
    assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 1);
    assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.5&wait=25&stream=1"));
    let again = svc.bg.calls.len() as u64;
    svc.event(id, StreamEvent::End(false));
    assert_eq!(svc.bg.calls.len() as u64, again, "the end of the stream ended before is no news");

    // The service ends the stream (a replica's longest stream): watched again at once.
    svc.event(again, StreamEvent::Head(&lines()));
    svc.bg.host.now_ms.set(351_000);
    svc.event(again, StreamEvent::End(true));
    assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.5&wait=25&stream=1"));
    assert_eq!(svc.bg.calls.len() as u64, again + 1);
    // One that ends its streams at once is not asked in a loop: a second later.
    svc.event(again + 1, StreamEvent::Head(&lines()));
    svc.event(again + 1, StreamEvent::End(true));
    assert_eq!(svc.bg.calls.len() as u64, again + 1);
    svc.tick_at(351_500);
    assert_eq!(svc.bg.calls.len() as u64, again + 1);
    svc.tick_at(352_000);
    assert_eq!(svc.bg.calls.len() as u64, again + 2);
    assert_eq!(routed(&sl, &host, C).as_deref(), Some("customer-c"), "the table all along");
}

#[test]
fn a_service_that_does_not_stream_is_read_as_a_plain_watch() {
    let host = FakeHost::default();
    let sl = configure(&host, true);
    let mut svc = Service::new(&sl, &host);
    // Its answer to the stream is a plain watch's: the cursor in the head, the body whole.
    let head = answer(200, &[("content-type", "application/json"), ("x-edgewise-cursor", "h.4")], "");
    let id = svc.streaming(&head);
    let body = format!(r#"{{"version":4,"changes":[{{"put":{C_ROUTE}}}]}}"#);
    let (first, rest) = body.split_at(30);
    svc.event(id, StreamEvent::Data(first.as_bytes()));
    svc.event(id, StreamEvent::Data(rest.as_bytes()));
    assert_eq!(routed(&sl, &host, C), None, "applied once whole");
    svc.event(id, StreamEvent::End(true));
    assert_eq!(routed(&sl, &host, C).as_deref(), Some("customer-c"));
    assert_eq!(svc.asked(), Some("/v1/serverless/routes?since=h.4&wait=25&stream=1"), "and watched again");
    // A 410: the whole table.
    let id = svc.bg.calls.len() as u64;
    svc.event(id, StreamEvent::Head(&answer(410, &[("content-type", "application/json")], "")));
    svc.event(id, StreamEvent::Data(br#"{"error":"gone"}"#));
    svc.event(id, StreamEvent::End(true));
    assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"));
    assert_eq!(host.metric("edgewise.serverless.management_fetch.gone"), 1);
}

#[test]
fn hostile_stream_lines_change_nothing_end_the_stream_and_lead_to_a_full_load() {
    // A line is one line: the route without its newlines.
    let put_c = format!(r#"{{"put":{}}}"#, C_ROUTE.replace('\n', " "));
    let line = |cursor: &str, version: u64, changes: &str| {
        format!(r#"{{"version":{version},"cursor":{cursor},"changes":[{changes}]}}"#) + "\n"
    };
    let unknown = r#"{"delete":{"match":{"project":"99999999","environment":"99999999","function":"9999999999"}}}"#;
    let huge = vec![b'x'; 2 << 20];
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"\x00\xffgarbage\n".to_vec(), false),
        ("no cursor", format!("{{\"version\":4,\"changes\":[{put_c}]}}\n").into_bytes(), false),
        ("a cursor not fit for a URL", line("\"h 4\\r\\n\"", 4, &put_c).into_bytes(), false),
        ("a cursor not a string", line("4", 4, &put_c).into_bytes(), false),
        ("backwards", line("\"h.2\"", 2, &put_c).into_bytes(), false),
        ("unknown delete", line("\"h.4\"", 4, &format!("{put_c},{unknown}")).into_bytes(), false),
        ("more than max_answer_bytes without a newline", huge, false),
        ("a line cut short by the end", line("\"h.4\"", 4, &put_c).trim_end().as_bytes().to_vec(), true),
    ];
    for (what, data, then_end) in &cases {
        let host = FakeHost::default();
        let sl = configure(&host, true);
        let mut svc = Service::new(&sl, &host);
        let id = svc.streaming(&lines());
        svc.event(id, StreamEvent::Data(data));
        if *then_end {
            assert!(svc.bg.reset.is_empty(), "{what}: not yet");
            svc.event(id, StreamEvent::End(true));
            assert!(svc.bg.reset.is_empty(), "{what}: ended by the service, not reset");
        } else {
            assert_eq!(svc.bg.reset, [id], "{what}: the stream is ended");
        }
        assert_eq!(host.metric("edgewise.serverless.management_fetch.rejected"), 1, "{what}");
        assert_eq!(routed(&sl, &host, POLLED).as_deref(), Some("customer-b"), "{what}: the table stays");
        assert_eq!(routed(&sl, &host, C), None, "{what}: nothing of it applied");
        assert_eq!(host.metric("edgewise.serverless.table.version"), 3, "{what}");
        let calls = svc.bg.calls.len();
        svc.event(id, StreamEvent::Data(line("\"h.5\"", 5, &put_c).as_bytes()));
        assert_eq!(routed(&sl, &host, C), None, "{what}: nothing read after it");
        svc.tick_at(100);
        assert_eq!(svc.bg.calls.len(), calls, "{what}: not before the back-off");
        svc.tick_at(600);
        assert_eq!(svc.asked(), Some("/v1/serverless/routes?limit=10000"), "{what}: then the whole table");
    }
}

#[test]
fn a_service_that_fails_is_asked_again_later_and_later() {
    let host = FakeHost::default();
    let sl = configure(&host, false);
    let mut svc = Service::new(&sl, &host);
    let mut retries = Vec::new();
    let mut now = 0;
    svc.tick_at(now);
    for _ in 0..8 {
        let calls = svc.bg.calls.len();
        svc.answer(answer(503, &[], "unavailable"));
        while svc.bg.calls.len() == calls {
            now += 250;
            svc.tick_at(now);
        }
        retries.push(now);
    }
    let gaps: Vec<u64> = retries.windows(2).map(|w| w[1] - w[0]).collect();
    // Doubling up to max_backoff_ms, each wait between half of it and all of it (at random), seen
    // at the next tick (every 250 ms here).
    for (gap, most) in gaps.iter().zip([1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]) {
        assert!((most / 2..most + 250).contains(gap), "{gaps:?}");
    }
    assert_eq!(host.metric("edgewise.serverless.management_fetch.failed"), 8);
    assert_eq!(get(&sl, &host, POLLED.as_bytes()).1.replied.map(|r| r.status), Some(503), "still no table");
}

/// A load from a service that sends its pages in bucket order (as edgewise-control does) writes
/// each bucket once: on proxy-wasm, one shared-data write a bucket, two where a page ends inside
/// one; natively the same (`table::Batch`, unit-tested in core).
#[test]
fn a_table_sent_in_bucket_order_is_loaded_writing_each_bucket_once() {
    use edgewise_core::serverless::{table, HostDecoder, DEFAULT_PATTERN};
    let decoder = HostDecoder::new("serverless.example", DEFAULT_PATTERN).unwrap();
    let mut routes: Vec<(u64, String, String)> = (0..20_000u32)
        .map(|i| {
            let (p, e, f) = (format!("{:08x}", i * 7), format!("{:08x}", i), format!("{:010x}", i * 13));
            let matches = [("project", &p), ("environment", &e), ("function", &f)];
            let key = decoder.key_of(&matches.iter().map(|(g, v)| (g.to_string(), v.to_string())).collect()).unwrap();
            let json = format!(
                r#"{{"match":{{"project":"{p}","environment":"{e}","function":"{f}"}},"cluster":"c{}","host":"f{i}.example"}}"#,
                i % 10
            );
            (table::key_hash(&key), json, format!("{p}-{e}-{f}.serverless.example"))
        })
        .collect();
    routes.sort_by_key(|r| r.0);
    let pages: Vec<&[(u64, String, String)]> = routes.chunks(7_000).collect();
    for shared_by_workers in [false, true] {
        let host = FakeHost::default();
        let sl = configure(&host, shared_by_workers);
        let mut svc = Service::new(&sl, &host);
        svc.tick_at(0);
        for load in 1..=2u32 {
            for (i, page) in pages.iter().enumerate() {
                let body: Vec<&str> = page.iter().map(|r| r.1.as_str()).collect();
                let next = if i + 1 < pages.len() { format!(r#","next":"p{i}""#) } else { String::new() };
                let doc = format!(r#"{{"version":{load},"routes":[{}]{next}}}"#, body.join(","));
                svc.answer(answer(200, &[("x-edgewise-cursor", &format!("h.{load}"))], &doc));
            }
            assert_eq!(host.metric("edgewise.serverless.table.routes"), 20_000);
            for r in routes.iter().step_by(997) {
                assert!(routed(&sl, &host, &r.2).is_some(), "{} after load {load}", r.2);
            }
            if !shared_by_workers {
                // The set this load filled: load 1 the set in force (1), load 2 the other (0).
                let set = load % 2;
                let writes: Vec<u32> = (0..1usize << table::MANAGED_BITS)
                    .filter_map(|b| host.shared_get(&format!("edgewise.serverless.{}.b{set}.{b:x}", instance(&host))).1)
                    .collect();
                let twice = writes.iter().filter(|&&w| w > 1).count();
                assert!(writes.len() > 15_000, "{} buckets written", writes.len());
                assert!(writes.iter().all(|&w| w <= 2) && twice < pages.len(), "load {load}: {twice} written twice");
            }
            // A 410 and, once the last load's leftover has settled, the next full load.
            svc.answer(answer(410, &[], ""));
            svc.tick_at(u64::from(load) * 5_000);
        }
    }
}

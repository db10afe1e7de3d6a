//! End-to-end: envoy/serverless.yaml on real Envoy with the freshly built serverless.wasm, two
//! customer clusters (mTLS gateway stand-ins with different CAs), a management service stand-in
//! and a plain "www" site on the same listener.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewise::certs::{Ca, Leaf, LeafSpec};
use edgewise::client::{raw_get, raw_statuses, Client, Request};
use edgewise::envoy::{Config, Envoy};
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use edgewise::server::{Answer, DocMode, Document, Handler, Listen, Server};

const B_HOST: &str = "1111111a-2222222b-333333333c.serverless.gitlab.io";
const B_KNATIVE: &str = "fn-b.ns-7.knative.customer-b.example";

struct Setup {
    _run: tempfile::TempDir,
    pki: Pki,
    a: Server,
    b: Server,
    www: Server,
    mgmt: Option<Server>,
    doc: Document,
    envoy: Envoy,
    front: SocketAddr,
}

/// Makes the (customer-a, customer-b) gateway certificates from the scenario's CAs.
type GatewayLeaves = fn(&Pki) -> (Leaf, Leaf);

struct Options {
    /// Gateway certificates (customer-a, customer-b); default: each issued by its own CA.
    gateways: Option<GatewayLeaves>,
    table: String,
    /// The management service; default: the document `table` (a service that does not watch).
    mgmt: Option<Handler>,
    tweak: fn(Config) -> Config,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateways: None,
            table: sl::table(1, &[(B_HOST.split('.').next().unwrap_or_default(), "customer-b", B_KNATIVE)]),
            mgmt: None,
            tweak: |c| c,
        }
    }
}

async fn setup(opts: Options) -> Setup {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let (leaf_a, leaf_b) = match opts.gateways {
        Some(make) => make(&pki),
        None => (
            sl::gateway_leaf(&pki.customer_a_ca, "customer-a").unwrap(),
            sl::gateway_leaf(&pki.customer_b_ca, "customer-b").unwrap(),
        ),
    };
    let a = sl::gateway("customer-a", 0, &leaf_a, &pki.platform_ca).await.unwrap();
    let b = sl::gateway("customer-b", 0, &leaf_b, &pki.platform_ca).await.unwrap();
    let www = Server::echo("www", Listen::default()).await.unwrap();
    let doc = Document::new(opts.table);
    let handler = opts.mgmt.unwrap_or_else(|| doc.handler());
    let mgmt = Server::start("management", Listen::default(), handler).await.unwrap();
    let config = Config::shipped("serverless")
        .run_dir(run.path())
        .port(ports::FRONT, 0)
        .port(ports::CUSTOMER_A, a.port())
        .port(ports::CUSTOMER_B, b.port())
        .port(ports::WWW, www.port())
        .port(ports::MANAGEMENT, mgmt.port())
        .replace("\"poll_interval_ms\": 2000", "\"poll_interval_ms\": 200");
    let envoy = Envoy::start(&(opts.tweak)(config)).await.unwrap();
    let front = envoy.listener("serverless_https").await.unwrap();
    Setup { _run: run, pki, a, b, www, mgmt: Some(mgmt), doc, envoy, front }
}

impl Setup {
    /// A request over the public HTTPS listener. The TLS server name stays one the wildcard
    /// certificate covers, whatever the Host (some malformed hosts have extra labels).
    async fn get(&self, host: &str) -> edgewise::client::Response {
        let client = self.pki.front_client(false).unwrap().sni(sl::INLINE_HOST);
        client.get(self.front, host, "/some/path?q=1").await.unwrap()
    }

    /// Waits until a table version is in force: the gauge moves when the fetching worker installs
    /// it; the other workers install it at their next tick (100 ms here), so wait a few more.
    async fn wait_table_version(&self, version: u64) {
        self.envoy
            .wait_stat(&format!("table version {version}"), Duration::from_secs(20), |s| {
                s.get(&edgewise::envoy::stat("edgewise.serverless.table.version")) == Some(&version)
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

#[tokio::test]
async fn functions_reach_their_own_cluster_over_mtls_with_the_knative_host() {
    let s = setup(Options::default()).await;
    s.wait_table_version(1).await;

    // Inline route -> customer-a, with a forged cluster header and X-Forwarded-Host that must not steer.
    let client = s.pki.front_client(false).unwrap();
    let req = Request::get(sl::INLINE_HOST, "/hello?x=1")
        .header("x-edgewise-cluster", "customer-b")
        .header("x-forwarded-host", B_HOST);
    let r = client.send(s.front, req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["server"], "customer-a");
    assert_eq!(seen["host"], sl::INLINE_KNATIVE_HOST);
    assert_eq!(seen["path"], "/hello?x=1");
    assert_eq!(seen["tls"]["sni"], sl::INLINE_KNATIVE_HOST);
    assert_eq!(seen["tls"]["peer_sans"], serde_json::json!([format!("URI:{}", sl::PLATFORM_CLIENT_ID)]));
    let a_seen = s.a.seen();
    assert_eq!(a_seen.len(), 1);
    assert_eq!(a_seen[0].header("x-forwarded-host"), Some(sl::INLINE_HOST));
    assert_eq!(a_seen[0].header("x-edgewise-cluster"), None, "the routing header must not leave Envoy");

    // Polled route -> customer-b only, case and trailing dot and port tolerated, over HTTP/2 on the front.
    let h2 = s.pki.front_client(true).unwrap();
    let upper = format!("{}.:443", B_HOST.to_uppercase());
    let r = h2.get(s.front, &upper, "/").await.unwrap();
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "customer-b");
    assert_eq!(r.json()["host"], B_KNATIVE);
    assert_eq!(r.json()["tls"]["peer_sans"][0], format!("URI:{}", sl::PLATFORM_CLIENT_ID));
    assert_eq!(s.a.count(), 1, "customer-a must see only its own function");
    assert_eq!(s.b.count(), 1, "customer-b must see only its own function");

    // Other sites on the listener are left alone.
    let r = s.get("www.example.com").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["server"], "www");
    assert_eq!(r.json()["host"], "www.example.com");
    assert_eq!(s.www.count(), 1);

    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.serverless.requests.routed")), Some(&2));
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.serverless.table.routes")), Some(&1));
    let prom = s.envoy.admin_get("/stats/prometheus").await.unwrap();
    let routed = edgewise::envoy::prometheus("edgewise_serverless_requests{outcome=\"routed\"} 2");
    assert!(prom.lines().any(|l| l == routed), "{prom}");
}

#[tokio::test]
async fn unknown_and_malformed_hosts_get_404_and_no_upstream_is_contacted() {
    let s = setup(Options::default()).await;
    s.wait_table_version(1).await;
    let cases = [
        ("0000000a-0000000b-000000000d.serverless.gitlab.io", "unknown_function"),
        ("0000000a-0000000b-00000000c.serverless.gitlab.io", "malformed_host"),
        ("0000000a-0000000b-000000000g.serverless.gitlab.io", "malformed_host"),
        ("x.0000000a-0000000b-000000000c.serverless.gitlab.io", "malformed_host"),
        ("0000000a-0000000b.serverless.gitlab.io", "malformed_host"),
    ];
    for (host, error) in cases {
        let r = s.get(host).await;
        assert_eq!(r.status, 404, "{host}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(body["error"], error, "{host}");
        assert!(body["detail"].as_str().unwrap().contains(host), "the body names the host: {body}");
    }
    assert_eq!(s.a.count() + s.b.count() + s.www.count(), 0, "no upstream may be contacted");
    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.serverless.requests.unknown_function")), Some(&1));
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.serverless.requests.malformed_host")), Some(&4));
}

/// The host layout GitLab shipped (`<function>-<cluster: 14 hex><environment: hex>-<slug>`), a
/// custom `pattern` matched in the module by `core::pattern`: inline and polled routes name its
/// groups; other hosts under the domain, the default layout's included, are malformed.
#[tokio::test]
async fn a_custom_host_pattern_routes_by_its_named_groups() {
    let table = r#"{"version": 3, "routes": [{"match": {"function": "my-func", "cluster": "0123456789abcd", "environment": "7"},
                                      "cluster": "customer-b", "host": "my-func.env-7.knative.customer-b.example"}]}"#;
    let s = setup(Options {
        table: table.into(),
        tweak: |c| {
            c.replace(
                "\"domain\": \"serverless.gitlab.io\",",
                r#""domain": "serverless.gitlab.io", "pattern": "(?P<function>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<cluster>[0-9a-f]{14})(?P<environment>[0-9a-f]+)-(?:[a-z0-9-]+)","#,
            )
            .replace(
                r#"{ "project": "0000000a", "environment": "0000000b", "function": "000000000c" }"#,
                r#"{ "function": "hello", "cluster": "a1b2c3d4e5f607", "environment": "2a" }"#,
            )
        },
        ..Options::default()
    })
    .await;
    s.wait_table_version(3).await;

    let r = s.get("hello-a1b2c3d4e5f6072a-production.serverless.gitlab.io").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "customer-a");
    assert_eq!(r.json()["host"], sl::INLINE_KNATIVE_HOST);
    // Case-insensitive; the function's own dashes are its name, the last one starts the slug.
    let r = s.get("My-Func-0123456789ABCD7-review-fix-42.serverless.gitlab.io").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "customer-b");
    assert_eq!(r.json()["host"], "my-func.env-7.knative.customer-b.example");

    let long = format!("{}-0123456789abcd7-x.serverless.gitlab.io", "a".repeat(250));
    let cases = [
        ("my-func-0123456789abcd8-production.serverless.gitlab.io", "unknown_function"),
        ("my-func-0123456789abcd7.serverless.gitlab.io", "malformed_host"),
        ("my-func-0123456789abc-production.serverless.gitlab.io", "malformed_host"),
        (sl::INLINE_HOST, "malformed_host"),
        (&long, "malformed_host"),
    ];
    for (host, error) in cases {
        let r = s.get(host).await;
        assert_eq!(r.status, 404, "{host}: {}", r.text());
        assert_eq!(r.json()["error"], error, "{host}");
    }
    assert_eq!((s.a.count(), s.b.count(), s.www.count()), (1, 1, 0));
}

#[tokio::test]
async fn a_gateway_with_the_wrong_ca_or_san_fails_closed() {
    let s = setup(Options {
        gateways: Some(|pki: &Pki| {
            (
                // customer-a's gateway shows a certificate for the right name from the wrong CA ...
                pki.customer_b_ca.issue(&LeafSpec::server(&["ingress.customer-a.example"])).unwrap(),
                // ... customer-b's, one from the right CA for the wrong name.
                pki.customer_b_ca.issue(&LeafSpec::server(&["ingress.someone-else.example"])).unwrap(),
            )
        }),
        ..Default::default()
    })
    .await;
    s.wait_table_version(1).await;
    for host in [sl::INLINE_HOST, B_HOST] {
        let r = s.get(host).await;
        assert_eq!(r.status, 503, "{host}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], "upstream_unavailable");
        assert!(body["detail"].as_str().unwrap().contains("CERTIFICATE_VERIFY_FAILED"), "{body}");
    }
    assert_eq!(s.a.count() + s.b.count(), 0, "no request may reach a gateway that failed verification");
    let stats = s.envoy.stats().await.unwrap();
    assert!(stats.get("cluster.customer-a.ssl.fail_verify_error").copied().unwrap_or(0) > 0, "customer-a: CA mismatch");
    assert!(stats.get("cluster.customer-b.ssl.fail_verify_san").copied().unwrap_or(0) > 0, "customer-b: SAN mismatch");
}

#[tokio::test]
async fn the_route_table_updates_without_restart_and_survives_management_outages() {
    let mut s = setup(Options::default()).await;
    s.wait_table_version(1).await;
    const NEW: &str = "4444444a-5555555b-666666666c.serverless.gitlab.io";
    assert_eq!(s.get(NEW).await.status, 404);

    // A new version: the new function is served without a restart.
    s.doc.set(sl::table(
        2,
        &[
            ("1111111a-2222222b-333333333c", "customer-b", B_KNATIVE),
            ("4444444a-5555555b-666666666c", "customer-a", "new.knative.customer-a.example"),
        ],
    ));
    s.wait_table_version(2).await;
    let r = s.get(NEW).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "customer-a");
    assert_eq!(r.json()["host"], "new.knative.customer-a.example");
    let not_modified = &edgewise::envoy::stat("edgewise.serverless.management_fetch.not_modified");
    s.envoy
        .wait_stat("a 304 from the management service", Duration::from_secs(10), |st| {
            st.get(not_modified).copied().unwrap_or(0) > 0
        })
        .await
        .unwrap();

    // One fetch per interval for all of Envoy's VMs (two workers and the main thread all tick).
    let mgmt = s.mgmt.as_ref().unwrap();
    let before = mgmt.count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fetches = mgmt.count() - before;
    // About 15 expected; the bound that matters is the upper one (three VMs fetching would make ~45).
    assert!((3..=17).contains(&fetches), "{fetches} fetches in 3 s at a 200 ms interval");

    // Garbage (refused) and errors (failed) keep the last good table in force.
    let failed = &edgewise::envoy::stat("edgewise.serverless.management_fetch.failed");
    let rejected = &edgewise::envoy::stat("edgewise.serverless.management_fetch.rejected");
    for (mode, counter) in [(DocMode::Garbage, rejected), (DocMode::Fail(500), failed)] {
        let before = s.envoy.stat(counter).await.unwrap();
        s.doc.mode(mode);
        s.envoy
            .wait_stat("a failed fetch", Duration::from_secs(10), |st| st.get(counter).copied().unwrap_or(0) > before)
            .await
            .unwrap();
        assert_eq!(s.get(NEW).await.status, 200, "{mode:?}");
        assert_eq!(s.envoy.stat(&edgewise::envoy::stat("edgewise.serverless.table.version")).await.unwrap(), 2);
    }

    // The management service goes away entirely.
    let before = s.envoy.stat(failed).await.unwrap();
    s.mgmt.take();
    s.envoy
        .wait_stat("fetches failing", Duration::from_secs(10), |st| st.get(failed).copied().unwrap_or(0) >= before + 2)
        .await
        .unwrap();
    for host in [NEW, B_HOST, sl::INLINE_HOST] {
        let r = s.get(host).await;
        assert_eq!(r.status, 200, "{host} with the management service down: {}", r.text());
    }
    let age = s.envoy.stat(&edgewise::envoy::stat("edgewise.serverless.table.age_seconds")).await.unwrap();
    assert!(age < 60, "age {age}");
}

/// A management service that watches, scripted: every page is the table at version 1 (cursor
/// `t.1`); every watch gets the next answer of the script, then 304.
fn scripted(script: Vec<Answer>, pages: Arc<AtomicUsize>) -> Handler {
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let with_cursor = |mut a: Answer, cursor: &str| {
        a.headers.push(("x-edgewise-cursor".into(), cursor.into()));
        a
    };
    let table = sl::table(1, &[(B_HOST.split('.').next().unwrap_or_default(), "customer-b", B_KNATIVE)]);
    Arc::new(move |seen| {
        if !seen.path.contains("since=") {
            pages.fetch_add(1, Ordering::SeqCst);
            return with_cursor(Answer::json(200, table.clone()), "t.1");
        }
        let next = script.lock().ok().and_then(|mut s| s.pop_front());
        next.unwrap_or_else(|| with_cursor(Answer::json(304, ""), "t.1"))
    })
}

/// Waits until the scripted service's `count` hostile answers (or lines) have each been refused,
/// checking after each that the table of version 1 is still in force, and its good one applied
/// (version 2): each refusal led to one full load.
async fn refused_then_applied(s: &Setup, count: u64, pages: &AtomicUsize, what: &str) {
    let rejected = &edgewise::envoy::stat("edgewise.serverless.management_fetch.rejected");
    let version = &edgewise::envoy::stat("edgewise.serverless.table.version");
    let (mut last, start) = (0, Instant::now());
    loop {
        let stats = s.envoy.stats().await.unwrap();
        let now = stats.get(rejected).copied().unwrap_or(0);
        if now > last {
            // Each refused answer changed nothing: the table of version 1 is in force.
            assert_eq!(s.get(B_HOST).await.status, 200, "after {now} refused {what}s");
            assert_eq!(stats.get(version), Some(&1), "after {now} refused {what}s");
            last = now;
        }
        if stats.get(version) == Some(&2) {
            break;
        }
        assert!(now <= count, "{now} {what}s refused");
        assert!(start.elapsed() < Duration::from_secs(60), "{now} {what}s refused after a minute");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(stats.get(rejected), Some(&count), "every hostile {what} refused and counted");
    let full_loads = stats.get(&edgewise::envoy::stat("edgewise.serverless.table.full_loads")).copied();
    assert_eq!(full_loads, Some(count + 1), "after each refusal, one full load");
    assert_eq!(pages.load(Ordering::SeqCst) as u64, count + 1);
}

#[tokio::test]
async fn hostile_watch_answers_change_nothing_are_counted_and_the_table_is_loaded_again() {
    const NEW: &str = "4444444a-5555555b-666666666c.serverless.gitlab.io";
    let put_new = r#"{"put":{"match":{"project":"4444444a","environment":"5555555b","function":"666666666c"},
        "cluster":"customer-a","host":"new.knative.customer-a.example"}}"#;
    let answer = |cursor: Option<&str>, body: String| {
        let mut a = Answer::json(200, body);
        a.headers.extend(cursor.map(|c| ("x-edgewise-cursor".to_string(), c.to_string())));
        a
    };
    let unknown = r#"{"delete":{"match":{"project":"99999999","environment":"99999999","function":"9999999999"}}}"#;
    let hostile = vec![
        answer(Some("t.2"), "\u{0}garbage".into()),
        answer(Some("t.2"), format!(r#"{{"version":2,"changes":[{put_new}"#)),
        answer(Some("t.2"), format!(r#"{{"version":2,"changes":[{put_new},{unknown}]}}"#)),
        answer(Some("t.0"), format!(r#"{{"version":0,"changes":[{put_new}]}}"#)),
        answer(None, format!(r#"{{"version":2,"changes":[{put_new}]}}"#)),
        answer(Some("t.2"), format!(r#"{{"version":2,"changes":[{}]}}"#, vec![put_new; 1000].join(","))),
    ];
    let count = hostile.len() as u64;
    let mut script = hostile;
    script.push(answer(Some("t.2"), format!(r#"{{"version":2,"changes":[{put_new}]}}"#)));
    let pages = Arc::new(AtomicUsize::new(0));
    let s = setup(Options {
        mgmt: Some(scripted(script, pages.clone())),
        tweak: |c| c.replace("\"poll_interval_ms\": 200,", "\"poll_interval_ms\": 200, \"max_answer_bytes\": 65536,"),
        ..Options::default()
    })
    .await;
    refused_then_applied(&s, count, &pages, "answer").await;
    let r = s.get(NEW).await;
    assert_eq!((r.status, r.json()["host"].as_str()), (200, Some("new.knative.customer-a.example")));
}

/// Natively the watch is one streamed answer. A scripted service that streams sends hostile
/// lines, each as the one line of a stream: each is refused and counted, changes nothing, ends
/// its stream, and the table is loaded again; then a good line applies. proxy-wasm never asks
/// for a stream (its callouts take whole answers), and watches as before.
#[tokio::test]
async fn hostile_stream_lines_change_nothing_are_counted_and_the_table_is_loaded_again() {
    const NEW: &str = "4444444a-5555555b-666666666c.serverless.gitlab.io";
    let put_new = r#"{"put":{"match":{"project":"4444444a","environment":"5555555b","function":"666666666c"},"cluster":"customer-a","host":"new.knative.customer-a.example"}}"#;
    let unknown = r#"{"delete":{"match":{"project":"99999999","environment":"99999999","function":"9999999999"}}}"#;
    let line = |cursor: &str, version: u64, changes: &str| {
        format!(r#"{{"version":{version},"cursor":"{cursor}","changes":[{changes}]}}"#) + "\n"
    };
    let hostile = vec![
        "\u{0}garbage\n".to_string(),
        line("t.2", 2, put_new).trim_end().to_string(),
        line("t.2", 2, &format!("{put_new},{unknown}")),
        line("t.0", 0, put_new),
        format!("{{\"version\":2,\"changes\":[{put_new}]}}\n"),
        line("t 2", 2, put_new),
        line("t.2", 2, &vec![put_new; 1000].join(",")),
    ];
    let count = hostile.len() as u64;
    let script = Arc::new(Mutex::new(VecDeque::from(hostile)));
    script.lock().unwrap().push_back(line("t.1", 1, "") + &line("t.2", 2, put_new));
    let (pages, streams) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let table = sl::table(1, &[(B_HOST.split('.').next().unwrap_or_default(), "customer-b", B_KNATIVE)]);
    let handler: Handler = {
        let (pages, streams) = (pages.clone(), streams.clone());
        Arc::new(move |seen| {
            let mut a = if !seen.path.contains("since=") {
                pages.fetch_add(1, Ordering::SeqCst);
                Answer::json(200, table.clone())
            } else if seen.path.contains("&stream=1") {
                streams.fetch_add(1, Ordering::SeqCst);
                // Each scripted stream ends after its lines; once the script is done, a line
                // with no change.
                let lines = script.lock().ok().and_then(|mut s| s.pop_front()).unwrap_or_else(|| line("t.2", 2, ""));
                let mut a = Answer::json(200, lines);
                a.headers = vec![("content-type".into(), "application/x-ndjson".into())];
                a
            } else {
                Answer::json(304, "")
            };
            a.headers.push(("x-edgewise-cursor".into(), "t.1".into()));
            a
        })
    };
    let s = setup(Options {
        mgmt: Some(handler),
        tweak: |c| c.replace("\"poll_interval_ms\": 200,", "\"poll_interval_ms\": 200, \"max_answer_bytes\": 65536,"),
        ..Options::default()
    })
    .await;
    if edgewise::envoy::Build::current() == edgewise::envoy::Build::Wasm {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(pages.load(Ordering::SeqCst) >= 1, "the table was loaded");
        assert_eq!(streams.load(Ordering::SeqCst), 0, "proxy-wasm asks for no stream");
        return;
    }
    refused_then_applied(&s, count, &pages, "line").await;
    assert!(streams.load(Ordering::SeqCst) as u64 > count, "a stream for each line");
    let r = s.get(NEW).await;
    assert_eq!((r.status, r.json()["host"].as_str()), (200, Some("new.knative.customer-a.example")));
}

#[tokio::test]
async fn certificates_rotate_on_disk_with_no_restart_and_no_failed_request() {
    let s = Arc::new(setup(Options::default()).await);
    s.wait_table_version(1).await;
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Continuous load: clients trusting both the old and the new front CA.
    let new_front_ca = Ca::new("edgewise front CA 2").unwrap();
    let both =
        Client::tls(edgewise::tls::client(&[&s.pki.front_ca.pem, &new_front_ca.pem], None, &["http/1.1"]).unwrap());
    let mut load = Vec::new();
    for _ in 0..4 {
        let (s, ok, failed, stop, client) = (s.clone(), ok.clone(), failed.clone(), stop.clone(), both.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(s.front, sl::INLINE_HOST, "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("failed during rotation: {} {}", r.status, r.text());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("failed during rotation: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Rotate the platform's client certificate (new identity, so the gateway can tell) and the
    // public certificate (from a new CA), and the customer CA with an overlapping bundle.
    let rotated_id = "spiffe://platform.example/serverless-proxy-rotated";
    s.pki.rotate_platform_client(&s.pki.platform_client(rotated_id).unwrap()).unwrap();
    s.pki.rotate_front(&new_front_ca.issue(&LeafSpec::server(&[&format!("*.{}", sl::DOMAIN)])).unwrap()).unwrap();
    let new_a_ca = Ca::new("customer-a cluster CA 2").unwrap();
    s.pki.set_customer_bundle("customer-a", &[&s.pki.customer_a_ca, &new_a_ca]).unwrap();

    let rotated_at = Instant::now();
    let deadline = rotated_at + Duration::from_secs(15);
    let only_new = Client::tls(edgewise::tls::client(&[&new_front_ca.pem], None, &["http/1.1"]).unwrap());
    loop {
        let seen = s.a.seen();
        let rotated = seen.last().is_some_and(|l| l.peer_sans() == [format!("URI:{rotated_id}")]);
        let front_new = only_new.get(s.front, sl::INLINE_HOST, "/").await.is_ok_and(|r| r.status == 200);
        if rotated && front_new {
            eprintln!("rotation picked up {:?} after the files were replaced", rotated_at.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotation not picked up: client rotated={rotated}, front rotated={front_new}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation under load: {ok} requests succeeded, {failed} failed");
    assert!(ok > 50, "too little load to prove anything: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed during rotation", ok + failed);
}

#[tokio::test]
async fn a_table_of_100000_functions_loads_and_serves() {
    let routes: Vec<(String, &str, String)> = (0..100_000u64)
        .map(|i| {
            (
                format!("{:08x}-{:08x}-{:010x}", i % 1000, i / 1000, i),
                "customer-b",
                format!("f{i}.knative.customer-b.example"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str, &str)> = routes.iter().map(|(l, c, h)| (l.as_str(), *c, h.as_str())).collect();
    let s = setup(Options { table: sl::table(100, &refs), ..Default::default() }).await;
    s.envoy
        .wait_stat("100000 routes", Duration::from_secs(60), |st| {
            st.get(&edgewise::envoy::stat("edgewise.serverless.table.routes")) == Some(&100_000)
        })
        .await
        .unwrap();
    for i in [0u64, 54_321, 99_999] {
        let host = format!("{:08x}-{:08x}-{:010x}.serverless.gitlab.io", i % 1000, i / 1000, i);
        let r = s.get(&host).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(r.json()["host"], format!("f{i}.knative.customer-b.example"));
    }
}

/// Bytes that are not UTF-8 (obs-text, legal in HTTP/1.1) on a raw socket: a Host the filter
/// cannot read is refused (by Envoy or with the filter's 400) and reaches no upstream; another
/// header passes to the customer byte for byte; the valid requests after them are all served.
#[tokio::test]
async fn header_values_that_are_not_utf8_are_refused_or_pass_untouched_and_break_nothing() {
    let s = setup(Options::default()).await;
    s.wait_table_version(1).await;
    let client = s.pki.front_client(false).unwrap().sni(sl::INLINE_HOST);
    let raw = |host: &[u8], headers: &[(&str, &[u8])]| {
        let bytes = raw_get(host, "/", headers);
        let client = client.clone();
        async move { client.raw(s.front, sl::INLINE_HOST, &bytes).await.unwrap() }
    };
    for host in [&b"0000000a-0000000b-000000000c.serverless.gitlab.i\xe9"[..], b"caf\xe9.serverless.gitlab.io"] {
        let out = raw(host, &[]).await;
        assert_eq!(raw_statuses(&out), [400], "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(s.a.count() + s.b.count() + s.www.count(), 0, "a refused request reached an upstream");
    let out = raw(sl::INLINE_HOST.as_bytes(), &[("x-anything", b"caf\xe9\x80")]).await;
    assert_eq!(raw_statuses(&out), [200], "{}", String::from_utf8_lossy(&out));
    assert_eq!(s.a.seen().pop().unwrap().header_bytes("x-anything"), Some(&b"caf\xe9\x80"[..]));
    for _ in 0..10 {
        assert_eq!(s.get(sl::INLINE_HOST).await.status, 200);
    }
}

/// The hostile class (edgewise::hostile): each gets a clear status, nothing reaches a customer
/// it may not, and the valid requests after them are served.
#[tokio::test]
async fn hostile_requests_get_clear_statuses_and_break_nothing() {
    let s = setup(Options::default()).await;
    s.wait_table_version(1).await;
    let client = s.pki.front_client(false).unwrap().sni(sl::INLINE_HOST);
    let report = edgewise::hostile::run(&client, s.front, sl::INLINE_HOST, "/", &[]).await;
    report.unwrap().check(&[
        ("obs-text in a header value", &[200]),
        ("control bytes in a header value", &[400]),
        ("a non-ASCII authority", &[400]),
        ("a 60 KiB header value", &[431]),
        ("200 headers", &[431]),
        ("a second Authorization", &[200]),
        // Two Hosts reach the filter joined ("another.example,<host>"): malformed, 404.
        ("a second Host", &[404]),
        ("two pipelined requests", &[200, 200]),
        ("a body on GET", &[200]),
        ("a POST with Content-Length", &[200]),
        ("a chunked POST with trailers", &[200]),
        ("a POST with Expect: 100-continue, its body at once", &[100, 200]),
    ]);
    assert_eq!((s.a.count(), s.b.count(), s.www.count()), (9, 0, 0));
    for _ in 0..10 {
        assert_eq!(s.get(sl::INLINE_HOST).await.status, 200);
    }
}

//! End-to-end: envoy/serverless-xds.yaml on real Envoy, its customer clusters and certificates
//! from a real `edgewise-control` (SQLite file, delta xDS, route table), customers' gateways as
//! mTLS stand-ins. Customers and functions come and go through the REST API while other
//! customers' traffic flows.

use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::certs::Ca;
use edgewise::client::{Client, Load};
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy};
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use serde_json::json;

const A_HOST: &str = "0000000a-0000000b-000000000c.serverless.gitlab.io";
const A_KNATIVE: &str = "hello.ns-42.knative.customer-a.example";
const B_HOST: &str = "1111111a-2222222b-333333333c.serverless.gitlab.io";
const B_KNATIVE: &str = "fn-b.ns-7.knative.customer-b.example";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgewise-control"))
}

fn label(host: &str) -> &str {
    host.split('.').next().unwrap_or_default()
}

struct Setup {
    run: tempfile::TempDir,
    pki: Pki,
    control: ControlService,
    envoy: Envoy,
    front: std::net::SocketAddr,
    client: Client,
}

async fn setup() -> Setup {
    setup_with("serverless-xds").await
}

/// The control service and an Envoy running `yaml` (envoy/<yaml>.yaml of the build under test).
async fn setup_with(yaml: &str) -> Setup {
    setup_tweaked(yaml, |c| c).await
}

async fn setup_tweaked(yaml: &str, tweak: fn(Config) -> Config) -> Setup {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let db = run.path().join("control.db");
    let control =
        ControlService::start(binary(), run.path(), &db, (0, 0, 0), &["--removal-delay-ms", "1500"]).await.unwrap();
    let config = Config::shipped(yaml)
        .run_dir(run.path())
        .port(ports::FRONT, 0)
        .port(control::GRPC_PORT, control.grpc)
        .port(control::ROUTES_PORT, control.routes_port());
    let envoy = Envoy::start(&tweak(config)).await.unwrap();
    let front = envoy.listener("serverless_https").await.unwrap();
    let client = pki.front_client(false).unwrap().sni(sl::INLINE_HOST);
    Setup { run, pki, control, envoy, front, client }
}

impl Setup {
    /// A customer cluster's gateway with a certificate of `ca` for `customer`.
    async fn gateway(&self, customer: &str, ca: &Ca) -> edgewise::server::Server {
        sl::gateway(customer, 0, &sl::gateway_leaf(ca, customer).unwrap(), &self.pki.platform_ca).await.unwrap()
    }

    async fn get(&self, host: &str) -> edgewise::client::Response {
        self.client.get(self.front, host, "/").await.unwrap()
    }

    /// Adds customer `c` ("customer-a" or "customer-b": its gateway, CA and SAN) and its test
    /// function, and waits until the function answers from that gateway; how long it took.
    async fn add(&self, c: &str, gateway: &edgewise::server::Server) -> Duration {
        let (ca, host, name, knative) = match c {
            "customer-a" => (&self.pki.customer_a_ca, A_HOST, "hello", A_KNATIVE),
            _ => (&self.pki.customer_b_ca, B_HOST, "fn-b", B_KNATIVE),
        };
        let start = Instant::now();
        self.control.put_customer(c, gateway.port(), &[ca], &format!("ingress.{c}.example")).await.unwrap();
        self.control.put_function(name, label(host), c, knative).await.unwrap();
        let gateway = gateway.name().to_string();
        self.until(host, &format!("{c}'s function"), |r| server_of(r) == gateway).await;
        start.elapsed()
    }

    /// Polls `host` until `done` holds for a response; how long it took. The bound covers the
    /// slowest legitimate path: after a control restart the filter's watch retries at most
    /// `max_backoff_ms` (10 s) apart, and a new customer's routes wait for the Envoys' ACK (at
    /// most 5 s), on a 2-core machine running the file's tests at once.
    async fn until(&self, host: &str, what: &str, done: impl Fn(&edgewise::client::Response) -> bool) -> Duration {
        const BOUND: Duration = Duration::from_secs(35);
        let start = Instant::now();
        loop {
            let r = self.get(host).await;
            if done(&r) {
                return start.elapsed();
            }
            if start.elapsed() > BOUND {
                let stats = self.envoy.stats().await.unwrap_or_default();
                let filter: Vec<_> = stats.iter().filter(|(k, _)| k.contains("edgewise.serverless")).collect();
                panic!("{what}: still {} {} after {BOUND:?}; the filter's stats: {filter:?}", r.status, r.text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The filter's other workers install a new table at their next tick (a quarter of the poll
    /// interval: 250 ms in the shipped YAML), after the one that fetched it.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    async fn sds_updates(&self, secret: &str) -> u64 {
        self.envoy.stats().await.unwrap().get(&format!("sds.{secret}.update_success")).copied().unwrap_or(0)
    }

    async fn wait_sds_update(&self, secret: &str, after: u64) {
        self.envoy
            .wait_stat(&format!("an update of {secret}"), Duration::from_secs(10), |s| {
                s.get(&format!("sds.{secret}.update_success")).is_some_and(|n| *n > after)
            })
            .await
            .unwrap();
    }

    async fn has_cluster(&self, name: &str) -> bool {
        let clusters = self.envoy.admin_get("/clusters").await.unwrap();
        clusters.lines().any(|l| l.starts_with(&format!("{name}::")))
    }
}

fn server_of(r: &edgewise::client::Response) -> String {
    if r.status == 200 {
        r.json()["server"].as_str().unwrap_or_default().to_string()
    } else {
        String::new()
    }
}

#[tokio::test]
async fn customers_and_functions_come_and_go_through_the_api_with_no_restart_and_no_failed_request() {
    let s = setup().await;
    let a = s.gateway("customer-a", &s.pki.customer_a_ca).await;
    let b1 = s.gateway("customer-b", &s.pki.customer_b_ca).await;

    // Nothing is known yet: the filter says so once it has the (empty) table.
    s.until(A_HOST, "the first route table", |r| r.status == 404).await;
    assert_eq!(s.get(A_HOST).await.json()["error"], "unknown_function");

    // Add customer-a and its function: it answers over mTLS within seconds.
    eprintln!("customer-a: REST change to traffic in {:?}", s.add("customer-a", &a).await);
    s.settle().await;
    let r = s.get(A_HOST).await;
    let seen = r.json();
    assert_eq!(seen["server"], "customer-a");
    assert_eq!(seen["host"], A_KNATIVE);
    assert_eq!(seen["tls"]["sni"], A_KNATIVE);
    assert_eq!(seen["tls"]["peer_sans"], json!([format!("URI:{}", sl::PLATFORM_CLIENT_ID)]));

    // From now on customer-a's function is under load: nothing below may fail one request.
    let load_a = Load::start(&s.client, s.front, A_HOST, 4, 200);

    // Add customer-b.
    let added = s.add("customer-b", &b1).await;
    eprintln!("customer-b: REST change to traffic in {added:?}");
    assert!(added < Duration::from_secs(5), "customer-b took {added:?}");
    s.settle().await;
    let r = s.get(B_HOST).await;
    assert_eq!((server_of(&r), r.json()["host"].clone()), ("customer-b".into(), json!(B_KNATIVE)));
    assert!(s.has_cluster("customer-b").await);

    // Rotate customer-b's CA under load on both customers: trust old and new, move the gateway
    // to a certificate of the new CA, then trust only the new one (a second between steps).
    let load_b = Load::start(&s.client, s.front, B_HOST, 2, 200);
    let new_ca = Ca::new("customer-b cluster CA 2").unwrap();
    let b2 = sl::gateway("customer-b2", 0, &sl::gateway_leaf(&new_ca, "customer-b").unwrap(), &s.pki.platform_ca)
        .await
        .unwrap();
    let updates = s.sds_updates("customer-b-ca").await;
    s.control
        .put_customer("customer-b", b1.port(), &[&s.pki.customer_b_ca, &new_ca], "ingress.customer-b.example")
        .await
        .unwrap();
    s.wait_sds_update("customer-b-ca", updates).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.control
        .put_customer("customer-b", b2.port(), &[&s.pki.customer_b_ca, &new_ca], "ingress.customer-b.example")
        .await
        .unwrap();
    s.until(B_HOST, "customer-b on its new gateway", |r| server_of(r) == "customer-b2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let updates = s.sds_updates("customer-b-ca").await;
    s.control.put_customer("customer-b", b2.port(), &[&new_ca], "ingress.customer-b.example").await.unwrap();
    s.wait_sds_update("customer-b-ca", updates).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b_ok, b_failed) = load_b.stop().await;
    eprintln!("customer-b during its CA rotation: {b_ok} requests succeeded, {b_failed} failed");
    assert_eq!(b_failed, 0);
    assert!(b_ok > 20, "too little load to prove anything: {b_ok}");
    // The old CA is no longer trusted: the old gateway fails verification, closed.
    s.control.put_customer("customer-b", b1.port(), &[&new_ca], "ingress.customer-b.example").await.unwrap();
    s.until(B_HOST, "the old gateway refused", |r| r.status == 503).await;
    let r = s.get(B_HOST).await;
    assert_eq!(r.json()["error"], "upstream_unavailable", "{}", r.text());
    assert!(r.text().contains("CERTIFICATE_VERIFY_FAILED"), "{}", r.text());

    // Remove customer-b: its function is unknown at once, its cluster leaves Envoy after the
    // removal delay.
    let deleted = s.control.delete_customer("customer-b").await.unwrap();
    assert_eq!(deleted["functions_deleted"], 1);
    s.until(B_HOST, "customer-b's function gone", |r| r.status == 404).await;
    assert_eq!(s.get(B_HOST).await.json()["error"], "unknown_function");
    let start = Instant::now();
    while s.has_cluster("customer-b").await {
        assert!(start.elapsed() < Duration::from_secs(10), "customer-b's cluster is still in Envoy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.has_cluster("customer-a").await);

    let (a_ok, a_failed) = load_a.stop().await;
    eprintln!("customer-a meanwhile: {a_ok} requests succeeded, {a_failed} failed");
    assert_eq!(a_failed, 0);
    assert!(a_ok > 50, "too little load to prove anything: {a_ok}");

    // What Envoy acknowledged is counted; nothing was rejected.
    let acks = s.control.metric("edgewise_control_xds_total{type=\"cluster\",event=\"ack\"}").await.unwrap();
    assert!(acks >= 5.0, "cluster ACKs: {acks}");
    assert_eq!(s.control.metric("edgewise_control_xds_total{type=\"cluster\",event=\"nack\"}").await.unwrap(), 0.0);
    assert_eq!(s.control.metric("edgewise_control_xds_total{type=\"secret\",event=\"nack\"}").await.unwrap(), 0.0);
    assert_eq!(s.control.metric("edgewise_control_customers").await.unwrap(), 1.0);
}

#[tokio::test]
async fn envoy_keeps_serving_while_the_control_service_is_down_and_nothing_is_lost_by_its_restart() {
    let mut s = setup().await;
    let a = s.gateway("customer-a", &s.pki.customer_a_ca).await;
    s.add("customer-a", &a).await;
    s.settle().await;

    let load = Load::start(&s.client, s.front, A_HOST, 4, 200);
    let status = s.control.stop().await.unwrap();
    assert!(status.success(), "edgewise-control exited with {status} on SIGTERM");
    // Down for several poll intervals and reconnection attempts: Envoy serves what it has.
    let (ok_before, _) = load.counts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok_during, failed_during) = load.counts();
    assert!(ok_during > ok_before + 20, "requests while the control service was down: {}", ok_during - ok_before);
    assert_eq!(failed_during, 0);
    assert!(
        s.envoy.stat("control_plane.connected_state").await.unwrap() == 0,
        "Envoy should see the control plane gone"
    );

    s.control.start_again().await.unwrap();
    s.control.ready(Duration::from_secs(10)).await.unwrap();
    // Its health check passes again within a second; the ADS stream retries at most 5 s apart
    // (jittered): the bound is generous for a loaded 2-core machine running the file's tests at once.
    s.envoy
        .wait_stat("ADS reconnected", Duration::from_secs(30), |st| st.get("control_plane.connected_state") == Some(&1))
        .await
        .unwrap();
    // Nothing lost: the customer and the function are still there...
    let (status, customers) = s.control.call("GET", "/v1/customers", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(customers["customers"][0]["name"], "customer-a");
    assert_eq!(customers["customers"][0]["published"], true);
    let (_, functions) = s.control.call("GET", "/v1/functions/hello", None).await.unwrap();
    assert_eq!(functions["customer"], "customer-a");
    // ... and a change made after the restart reaches Envoy.
    let b = s.gateway("customer-b", &s.pki.customer_b_ca).await;
    s.add("customer-b", &b).await;

    let (ok, failed) = load.stop().await;
    eprintln!("customer-a across the control service's outage and restart: {ok} succeeded, {failed} failed");
    assert_eq!(failed, 0);
    assert!(s.run.path().join("control.db").exists());
}

/// The filter loads the table once and then watches it: a change reaches traffic with no poll
/// (the poll interval here is ten minutes), a restart of the service resumes the watch from its
/// cursor with no full load, and a service on another store (a cursor it cannot serve: 410) leads
/// to exactly one full load.
#[tokio::test]
async fn route_changes_reach_traffic_through_the_watch_and_a_restart_resumes_it_without_a_full_load() {
    let mut s =
        setup_tweaked("serverless-xds", |c| c.replace("\"poll_interval_ms\": 1000", "\"poll_interval_ms\": 600000"))
            .await;
    let stat = |name: &str| edgewise::envoy::stat(&format!("edgewise.serverless.{name}"));
    let (full_loads, gone) = (stat("table.full_loads"), stat("management_fetch.gone"));
    // One route watch and one table for the whole Envoy on both builds, though its listener has
    // the filter in two filter chains (the platform's names, custom domains): on proxy-wasm the
    // VMs share the table, natively the two configurations share the watcher.
    let watches: u64 = 1;
    let a = s.gateway("customer-a", &s.pki.customer_a_ca).await;
    s.add("customer-a", &a).await;
    s.settle().await;

    // A function of a published customer: from the REST call to traffic.
    let functions = ["00000001-0000000b-000000000c", "00000002-0000000b-000000000c", "00000003-0000000b-000000000c"];
    async fn deploy(s: &Setup, label: &str) -> Instant {
        let start = Instant::now();
        s.control.put_function(&format!("f-{label}"), label, "customer-a", A_KNATIVE).await.unwrap();
        start
    }
    let host = |label: &str| format!("{label}.serverless.gitlab.io");
    let start = deploy(&s, functions[0]).await;
    s.until(&host(functions[0]), "a new function", |r| r.status == 200).await;
    let took = start.elapsed();
    eprintln!("a new function reached traffic {took:?} after its REST call returned");
    assert!(took < Duration::from_secs(10), "{took:?}: the watch, not the 600 s poll, brought it");
    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(stats.get(&full_loads), Some(&watches), "one full load, then changes");
    // Natively the watch is one streamed answer the service writes each change to; proxy-wasm
    // asks once per change.
    let streams = s.control.metric("edgewise_control_route_streams_total").await.unwrap();
    let lines = s.control.metric("edgewise_control_route_stream_lines_total").await.unwrap();
    let answered = s.control.metric("edgewise_control_route_watches_total{result=\"changes\"}").await.unwrap();
    match edgewise::envoy::Build::current() {
        edgewise::envoy::Build::Native => {
            assert_eq!((streams, answered), (1.0, 0.0), "one stream, no plain watch answered");
            assert!(lines >= 1.0, "the change came as a line");
        }
        edgewise::envoy::Build::Wasm => assert_eq!((streams, lines), (0.0, 0.0)),
    }

    // The service restarts on its store: the watch resumes from its cursor.
    assert!(s.control.stop().await.unwrap().success());
    s.control.start_again().await.unwrap();
    s.control.ready(Duration::from_secs(10)).await.unwrap();
    deploy(&s, functions[1]).await;
    s.until(&host(functions[1]), "a function deployed after the restart", |r| r.status == 200).await;
    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(
        (stats.get(&full_loads), stats.get(&gone)),
        (Some(&watches), Some(&0)),
        "no full load across the restart"
    );

    // A service on another store: its history is not the cursor's. One 410, one full load.
    let (grpc, http, routes) = (s.control.grpc, s.control.http, s.control.routes_port());
    assert!(s.control.stop().await.unwrap().success());
    let other = s.run.path().join("other.db");
    s.control = ControlService::start(binary(), s.run.path(), &other, (grpc, http, routes), &[]).await.unwrap();
    s.control
        .put_customer("customer-a", a.port(), &[&s.pki.customer_a_ca], "ingress.customer-a.example")
        .await
        .unwrap();
    deploy(&s, functions[2]).await;
    s.until(&host(functions[2]), "a function of the other store", |r| r.status == 200).await;
    s.until(&host(functions[0]), "a function only the first store had", |r| r.status == 404).await;
    let once_more = (Some(2 * watches), Some(watches));
    let start = Instant::now();
    let counts = loop {
        let stats = s.envoy.stats().await.unwrap();
        let counts = (stats.get(&full_loads).copied(), stats.get(&gone).copied());
        if counts == once_more || start.elapsed() > Duration::from_secs(5) {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = s.envoy.stats().await.unwrap();
    let settled = (stats.get(&full_loads).copied(), stats.get(&gone).copied());
    assert_eq!((counts, settled), (once_more, once_more), "one 410, one full load (each watch)");
}

/// envoy/serverless-odcds.yaml, Envoys that fetch clusters on demand (on-demand CDS): Envoy holds
/// a customer's cluster only once a request needs it, a customer published needs no ACK, and a
/// removed customer's cluster leaves.
#[tokio::test]
async fn envoys_with_on_demand_cds_get_a_cluster_when_a_request_needs_it() {
    let s = setup_with("serverless-odcds").await;
    let (a, b) =
        (s.gateway("customer-a", &s.pki.customer_a_ca).await, s.gateway("customer-b", &s.pki.customer_b_ca).await);
    s.control
        .put_customer("customer-a", a.port(), &[&s.pki.customer_a_ca], "ingress.customer-a.example")
        .await
        .unwrap();
    s.control
        .put_customer("customer-b", b.port(), &[&s.pki.customer_b_ca], "ingress.customer-b.example")
        .await
        .unwrap();
    s.control.put_function("hello", label(A_HOST), "customer-a", A_KNATIVE).await.unwrap();
    s.control.put_function("fn-b", label(B_HOST), "customer-b", B_KNATIVE).await.unwrap();
    s.until(A_HOST, "customer-a's function", |r| r.status == 200).await;
    assert_eq!(server_of(&s.get(A_HOST).await), "customer-a");
    assert!(s.has_cluster("customer-a").await);
    assert!(!s.has_cluster("customer-b").await, "no request needed customer-b's cluster yet");
    s.settle().await;
    let r = s.get(B_HOST).await;
    assert_eq!((server_of(&r), r.json()["tls"]["sni"].clone()), ("customer-b".into(), json!(B_KNATIVE)));
    assert!(s.has_cluster("customer-b").await);

    s.control.delete_customer("customer-b").await.unwrap();
    s.until(B_HOST, "customer-b's function gone", |r| r.status == 404).await;
    let start = Instant::now();
    while s.has_cluster("customer-b").await {
        assert!(start.elapsed() < Duration::from_secs(10), "customer-b's cluster is still in Envoy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server_of(&s.get(A_HOST).await), "customer-a");
}

/// envoy/serverless-odcds.yaml is envoy/serverless-xds.yaml with clusters on demand and nothing
/// else: no cluster subscription, and Envoy's on_demand filter right before the router.
#[test]
fn the_on_demand_file_is_serverless_xds_with_clusters_on_demand() {
    for build in edgewise::envoy::Build::ALL {
        let parse =
            |name: &str| -> serde_yaml::Value { serde_yaml::from_str(&Config::shipped_as(name, build).yaml).unwrap() };
        let (mut xds, mut odcds) = (parse("serverless-xds"), parse("serverless-odcds"));
        let cds = xds["dynamic_resources"].as_mapping_mut().unwrap().remove("cds_config");
        assert!(cds.is_some(), "serverless-xds subscribes to every cluster");
        let filters = |v: &mut serde_yaml::Value| -> Vec<serde_yaml::Value> {
            let hcm = &mut v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
            hcm["typed_config"]["http_filters"].as_sequence().unwrap().clone()
        };
        let (with, without) = (filters(&mut odcds), filters(&mut xds));
        let names: Vec<&str> = with.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), without.len() + 1, "{build:?}: {names:?}");
        assert_eq!(names[names.len() - 2..], ["envoy.filters.http.on_demand", "envoy.filters.http.router"]);
        let on_demand = &with[with.len() - 2]["typed_config"]["odcds"];
        assert_eq!(on_demand["source"]["ads"], serde_yaml::Value::Mapping(Default::default()));
        assert_eq!(on_demand["timeout"], "5s");
        // Both filter chains (the platform's names, custom domains) share the HTTP filters.
        for chain in 0..2 {
            let hcm =
                &mut odcds["static_resources"]["listeners"][0]["filter_chains"][chain]["filters"][0]["typed_config"];
            hcm["http_filters"].as_sequence_mut().unwrap().remove(with.len() - 2);
        }
        assert!(odcds == xds, "{build:?}: serverless-odcds differs from serverless-xds beyond on-demand CDS");
    }
}

/// The REST API on its own: the admin token, and clear JSON errors naming the field.
#[tokio::test]
async fn the_rest_api_requires_the_token_and_refuses_bad_input_with_the_field() {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let control = ControlService::start(binary(), run.path(), &run.path().join("c.db"), (0, 0, 0), &[]).await.unwrap();

    let (status, body) = control.request("GET", "/v1/customers", &[], "").await.unwrap();
    assert_eq!(status, 401, "{body}");
    let wrong = control.request("GET", "/v1/customers", &[("authorization", "Bearer nope")], "").await.unwrap();
    assert_eq!(wrong.0, 401);
    assert!(wrong.1.contains("\"error\":\"unauthorized\""), "{}", wrong.1);

    let ca = pki.customer_a_ca.pem.clone();
    let customer = |address: &str, ca: &str, san: &str| json!({ "address": address, "ca": ca, "san": san });
    let cases = [
        ("/v1/customers/customer-a", customer("127.0.0.1", &ca, "a.example"), 400, "address"),
        ("/v1/customers/customer-a", customer("127.0.0.1:1", "not pem", "a.example"), 400, "ca"),
        (
            "/v1/customers/customer-a",
            customer("127.0.0.1:1", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "a.example"),
            400,
            "ca",
        ),
        ("/v1/customers/customer-a", customer("127.0.0.1:1", &ca, "a b"), 400, "san"),
        ("/v1/customers/Customer_A", customer("127.0.0.1:1", &ca, "a.example"), 400, "name"),
        (
            "/v1/functions/f",
            json!({ "match": control::function_match(label(A_HOST)).unwrap(), "customer": "nobody", "host": A_KNATIVE }),
            400,
            "customer",
        ),
        (
            "/v1/functions/f",
            json!({ "match": { "project": "0000000a" }, "customer": "customer-a", "host": A_KNATIVE }),
            400,
            "match",
        ),
    ];
    for (path, body, status, field) in cases {
        let (got, answer) = control.call("PUT", path, Some(&body)).await.unwrap();
        assert_eq!(
            (got, answer["error"].as_str(), answer["field"].as_str()),
            (status, Some("invalid"), Some(field)),
            "{path} {body}: {answer}"
        );
    }
    let (status, answer) =
        control.call("PUT", "/v1/customers/customer-a", Some(&json!({ "adress": "x" }))).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_json")));
    assert!(answer["detail"].as_str().unwrap().contains("adress"), "{answer}");

    // A good customer and function; the same match under another name conflicts.
    control.put_customer("customer-a", 1, &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    control.put_function("hello", label(A_HOST), "customer-a", A_KNATIVE).await.unwrap();
    let again = json!({ "match": control::function_match(&label(A_HOST).to_uppercase()).unwrap(), "customer": "customer-a", "host": A_KNATIVE });
    let (status, answer) = control.call("PUT", "/v1/functions/other", Some(&again)).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (409, Some("conflict")), "{answer}");
    let (status, _) = control.call("PUT", "/v1/functions/hello", Some(&again)).await.unwrap();
    assert_eq!(status, 200, "the same function may be replaced");
    let (status, answer) = control.call("DELETE", "/v1/functions/nothing", None).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));
    let big = "x".repeat(300 * 1024);
    let (status, answer) = control.call("PUT", "/v1/customers/big", Some(&json!({ "ca": big }))).await.unwrap();
    assert_eq!((status, answer["error"].as_str()), (413, Some("too_large")));

    // Hostile bytes: a token or a body that is not UTF-8, a name that is not a label, a path
    // with more segments; each refused with its status, and the service answers on.
    let port = control.http;
    let raw = |bytes: Vec<u8>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let request = |head: &str, token: &[u8], body: &[u8]| {
        let mut r = format!(
            "{head} HTTP/1.1\r\nhost: c\r\nconnection: close\r\ncontent-length: {}\r\nauthorization: ",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(token);
        r.extend_from_slice(b"\r\n\r\n");
        r.extend_from_slice(body);
        r
    };
    let token = format!("Bearer {}", control::DEMO_TOKEN).into_bytes();
    let cases: [(&str, &[u8], &[u8], &str); 5] = [
        ("GET /v1/customers", b"Bearer \xff\xfe", b"", "401"),
        ("PUT /v1/customers/customer-x", &token, b"{\"address\": \"\xff\xfe:1\"}", "400"),
        ("PUT /v1/customers/%C3%A4", &token, b"{}", "400"),
        ("DELETE /v1/customers/../functions/hello", &token, b"", "404"),
        ("POST /v1/customers/customer-a", &token, b"{}", "405"),
    ];
    for (head, token, body, status) in cases {
        let answer = raw(request(head, token, body)).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{head}: {answer}");
        assert!(answer.contains("\"error\":"), "{head}: {answer}");
    }
    assert_eq!(control.get("/healthz").await.unwrap().0, 200);
    assert_eq!(control.call("GET", "/v1/functions/hello", None).await.unwrap().0, 200, "nothing was deleted");

    // The xDS port (it carries the platform's private key) takes only clients with a certificate
    // of the control plane's CA.
    let grpc = control.grpc;
    let h2 = |leaf: Option<edgewise::certs::Leaf>| {
        let config = edgewise::tls::client(&[&pki.control_ca.pem], leaf.as_ref(), &["h2"]).unwrap();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", grpc)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from(sl::CONTROL_NAME).unwrap();
            let Ok(mut tls) = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await else { return false };
            // The HTTP/2 preface: a server that accepted the client answers with its SETTINGS.
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await;
            let mut first = [0u8; 9];
            tls.read_exact(&mut first).await.is_ok()
        }
    };
    let client_of = |ca: &Ca| Some(ca.issue(&edgewise::certs::LeafSpec::client("envoy", &[])).unwrap());
    assert!(h2(client_of(&pki.control_ca)).await, "a client of the control plane's CA is served");
    assert!(!h2(None).await, "a client without a certificate is refused");
    assert!(!h2(client_of(&pki.platform_ca)).await, "a client of another CA is refused");

    // The route port (the table names every customer and host) likewise; the admin port does
    // not serve the table.
    let port = control.routes_port();
    let https = |leaf: Option<edgewise::certs::Leaf>, head: String| {
        let config = edgewise::tls::client(&[&pki.control_ca.pem], leaf.as_ref(), &["http/1.1"]).unwrap();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from(sl::CONTROL_NAME).unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.ok()?;
            let request = format!("GET {head} HTTP/1.1\r\nhost: control\r\nconnection: close\r\n\r\n");
            tls.write_all(request.as_bytes()).await.ok()?;
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await.ok()?;
            Some(String::from_utf8_lossy(&answer).into_owned())
        }
    };
    let routes = edgewise_control::ROUTES_PATH;
    let table = https(client_of(&pki.control_ca), routes.to_string()).await.expect("served over mutual TLS");
    assert!(table.starts_with("HTTP/1.1 200 "), "{table}");
    let (head, body) = table.split_once("\r\n\r\n").unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(body).unwrap()["routes"][0]["cluster"], "customer-a");
    let version = serde_json::from_str::<serde_json::Value>(body).unwrap()["version"].clone();
    assert!(head.to_ascii_lowercase().contains(edgewise_control::CURSOR), "{head}");
    let page = https(client_of(&pki.control_ca), format!("{routes}?limit=1")).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200 ") && page.contains("\"routes\":[{"), "{page}");
    assert!(https(None, routes.to_string()).await.is_none_or(|a| a.is_empty()), "a client without a certificate");
    let other = https(client_of(&pki.platform_ca), routes.to_string()).await;
    assert!(other.as_ref().is_none_or(|a| a.is_empty()), "a client of another CA: {other:?}");
    let (status, on_admin) = control.get(routes).await.unwrap();
    assert_eq!(status, 404, "{on_admin}");
    assert!(on_admin.contains("route port"), "{on_admin}");
    let elsewhere = https(client_of(&pki.control_ca), "/v1/customers".to_string()).await.unwrap();
    assert!(elsewhere.starts_with("HTTP/1.1 404 "), "the route port serves the table only: {elsewhere}");
    let _ = version;
    assert!(control.metric("edgewise_control_api_requests_total{status=\"4xx\"}").await.unwrap() >= 17.0);
}

/// Without a usable admin token or client certificate it does not start, and says why.
#[tokio::test]
async fn a_bad_start_is_refused_with_the_reason() {
    let run = tempfile::tempdir().unwrap();
    Pki::install(run.path()).unwrap();
    let out = std::process::Command::new(binary())
        .args(["--db", "x.db", "--client-cert", "c", "--client-key", "k"])
        .env_remove(edgewise_control::TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("EDGEWISE_CONTROL_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key_as_cert = run.path().join("serverless/certs/platform-client/tls.key");
    let out = std::process::Command::new(binary())
        .arg("--db")
        .arg(run.path().join("x.db"))
        .arg("--client-cert")
        .arg(&key_as_cert)
        .arg("--client-key")
        .arg(&key_as_cert)
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env(edgewise_control::TOKEN_ENV, control::DEMO_TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--client-cert") && stderr.contains("only CERTIFICATE"), "{stderr}");
}

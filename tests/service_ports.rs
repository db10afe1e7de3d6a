//! The services hold their ports against hostile clients. Each runs as a cramped deployment
//! would, at an open-file limit of 1024 it cannot raise, while an attacker on the platform
//! network (its own loopback addresses) sends half requests, idles, trickles bodies, opens gRPC
//! streams it never reads and churns connections; during each, a well-behaved client (from
//! 127.0.0.1: a gateway) is answered within a second by the REST API, the route table, xDS
//! (a real Envoy receiving a new customer's cluster) and RLS; memory stays bounded, and
//! afterwards everything is as before. Refusals and closes are counted in `/metrics`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewise::certs::LeafSpec;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy};
use edgewise::flood::{self, source, Grpc};
use edgewise::ratelimit::{self as rl, RateLimitService, Redis};
use edgewise::scenarios::serverless::{ports, Pki, CONTROL_NAME};
use edgewise::service::Service;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::{rate_limit_response::Code, RateLimitRequest, RateLimitResponse};
use prost::Message;

const FILES: u32 = 1024;
/// A port's share of 1024 open files: (1024 - 128 reserved) / the service's ports.
fn port_limit(ports: usize) -> usize {
    (FILES as usize - 128) / ports
}
const PER_CLIENT: usize = 64;
const ATTACK: usize = 1100;
/// Customers whose clusters the ADS streams that never read are owed.
const CUSTOMERS: usize = 1000;
const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const RLS: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Resident memory the service may add under any of the connection attacks.
const RSS_BOUND: u64 = 32 << 20;

fn bin(name: &str) -> &'static Path {
    match name {
        "control" => Path::new(env!("CARGO_BIN_EXE_edgewise-control")),
        _ => Path::new(env!("CARGO_BIN_EXE_edgewise-ratelimit")),
    }
}

/// What the well-behaved client checks, each answered within a second.
trait Probe {
    fn service(&self) -> &Service;
    /// Its ports (edgewise-control: HTTP, gRPC and routes; edgewise-ratelimit: HTTP and gRPC).
    fn ports(&self) -> usize {
        if self.service().routes.is_some() {
            3
        } else {
            2
        }
    }
    async fn probe(&mut self, during: &str);
}

/// A probe's answer, which must come within two seconds whatever the attack (on two cores the
/// attack's own clients share the CPU with the service and the probe).
async fn within_two_seconds<T>(what: &str, during: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(2), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within two seconds during {during}"),
    }
}

struct ControlSetup {
    run: tempfile::TempDir,
    pki: Pki,
    control: ControlService,
    envoy: Envoy,
    probes: u32,
}

impl Probe for ControlSetup {
    fn service(&self) -> &Service {
        &self.control
    }

    async fn probe(&mut self, during: &str) {
        self.probes += 1;
        let (status, _) =
            within_two_seconds("GET /v1/customers", during, self.control.call("GET", "/v1/customers", None))
                .await
                .unwrap();
        assert_eq!(status, 200, "REST API during {during}");
        let (status, body) = within_two_seconds(
            "the route table",
            during,
            self.control.routes_get(&self.pki.control_ca, edgewise_control::ROUTES_PATH),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "route table during {during}: {body}");
        // xDS: a new customer's cluster reaches the Envoy.
        let name = format!("probe-{}", self.probes);
        let start = Instant::now();
        within_two_seconds("PUT a customer", during, async {
            self.control.put_customer(&name, 9, &[&self.pki.customer_a_ca], "ingress.probe.example").await.unwrap();
            while !self.envoy.admin_get("/clusters").await.unwrap().lines().any(|l| l.starts_with(&format!("{name}::")))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        eprintln!("{during}: {name}'s cluster in Envoy after {:?}", start.elapsed());
    }
}

async fn control_setup() -> ControlSetup {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let binary = flood::with_open_files(run.path(), bin("control"), FILES).unwrap();
    let db = run.path().join("control.db");
    let control = ControlService::start(&binary, run.path(), &db, (0, 0, 0), &[]).await.unwrap();
    let config = Config::shipped("serverless-xds")
        .run_dir(run.path())
        .port(ports::FRONT, 0)
        .port(control::GRPC_PORT, control.grpc)
        .port(control::ROUTES_PORT, control.routes_port());
    let envoy = Envoy::start(&config).await.unwrap();
    ControlSetup { run, pki, control, envoy, probes: 0 }
}

struct RlsSetup {
    _redis: Redis,
    rls: RateLimitService,
}

impl Probe for RlsSetup {
    fn service(&self) -> &Service {
        &self.rls
    }

    async fn probe(&mut self, during: &str) {
        let (status, body) = within_two_seconds("/readyz", during, self.rls.get("/readyz")).await.unwrap();
        assert_eq!(status, 200, "readiness during {during}: {body}");
        let request = RateLimitRequest {
            domain: "cloud-connector".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry { key: edgewise_ratelimit::FEATURE.into(), value: "duo_chat".into() },
                    Entry { key: edgewise_ratelimit::ORGANIZATION.into(), value: "probe".into() },
                ],
                ..Default::default()
            }],
            hits_addend: 1,
        };
        let answer = within_two_seconds("ShouldRateLimit", during, async {
            let mut grpc = Grpc::connect(source(1), self.rls.grpc, None).await.unwrap();
            grpc.call(RLS, &request.encode_to_vec()).await.unwrap()
        })
        .await;
        let answer = RateLimitResponse::decode(answer.as_slice()).unwrap();
        assert_eq!(answer.overall_code, Code::Ok as i32, "RLS during {during}: {answer:?}");
    }
}

async fn rls_setup(dir: &Path) -> RlsSetup {
    let redis = Redis::start_any(dir).await.unwrap();
    let binary = flood::with_open_files(dir, bin("ratelimit"), FILES).unwrap();
    let rls = RateLimitService::start(&binary, &rl::shipped_limits(), &redis.url(), 0, 0, &dir.join("rls.log"))
        .await
        .unwrap();
    rls.ready(Duration::from_secs(10)).await.unwrap();
    RlsSetup { _redis: redis, rls }
}

fn rss(s: &Service) -> u64 {
    flood::rss(s.pid().unwrap()).unwrap()
}

fn assert_bounded(s: &Service, baseline: u64, during: &str) {
    let now = rss(s);
    eprintln!("{during}: RSS {} MiB (baseline {} MiB)", now >> 20, baseline >> 20);
    assert!(now < baseline + RSS_BOUND, "RSS grew from {baseline} to {now} during {during}");
}

/// Three probes a second apart.
async fn probes(p: &mut impl Probe, during: &str) {
    for _ in 0..3 {
        p.probe(during).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// Waits until `series` reads `want` (a connection gauge settles as closes are seen).
async fn until_metric(s: &Service, series: &str, want: f64) {
    until(s, series, want, |v| v == want).await
}

/// Waits until the HTTP port holds no more connections than at the start: the request reading
/// the gauge, and the route table poller of the Envoy there is one.
async fn until_http_as_before(s: &Service, prefix: &str) {
    let most = if prefix == "edgewise_control" { 2.0 } else { 1.0 };
    until(s, &format!("{prefix}_connections{{port=\"http\"}}"), most, |v| (1.0..=most).contains(&v)).await
}

async fn until(s: &Service, series: &str, want: f64, done: impl Fn(f64) -> bool) {
    let start = Instant::now();
    loop {
        let v = s.metric(series).await.unwrap();
        if done(v) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{series} is {v}, not {want}; log: {}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 1,100 connections from one address that send `sent` and wait: the address gets its 64, the
/// others are refused with 429 at once; the held ones are closed at the header timeout.
async fn one_address_holds(p: &mut impl Probe, prefix: &str, from: u8, sent: &[u8], during: &str) {
    let port = p.service().http;
    let baseline = rss(p.service());
    let refused_before = p.service().metric(&refused(prefix, "http", "client_limit")).await.unwrap();
    let mut held = flood::hold(source(from), port, ATTACK, sent, Duration::from_millis(300)).await.unwrap();
    assert_eq!(held.open.len(), PER_CLIENT, "{during}: connections the address keeps");
    assert_eq!(held.refused.len(), ATTACK - PER_CLIENT);
    for answer in &held.refused {
        assert!(
            answer.starts_with("HTTP/1.1 429") && answer.contains("too_many_connections"),
            "{during}: refusal {answer:?}"
        );
    }
    probes(p, during).await;
    assert_bounded(p.service(), baseline, during);
    let refused_now = p.service().metric(&refused(prefix, "http", "client_limit")).await.unwrap();
    assert_eq!(refused_now - refused_before, (ATTACK - PER_CLIENT) as f64, "{during}: refusals counted");
    // The header timeout (10 s) closes them.
    let start = Instant::now();
    while held.closed_by_peer().await < held.open.len() {
        assert!(start.elapsed() < Duration::from_secs(15), "{during}: held connections still open after 15 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{during}: the service closed the held connections {:?} after the last probe", start.elapsed());
    until_http_as_before(p.service(), prefix).await;
}

fn refused(prefix: &str, port: &str, reason: &str) -> String {
    format!("{prefix}_connections_refused_total{{port=\"{port}\",reason=\"{reason}\"}}")
}

/// Connections opened and closed as fast as they go for 10 s, probed every second.
async fn churn(p: &mut impl Probe, prefix: &str, from: u8) {
    let baseline = rss(p.service());
    let stop = Arc::new(AtomicBool::new(false));
    let churning = [
        flood::churn(source(from), p.service().http, stop.clone()),
        flood::churn(source(from), p.service().grpc, stop.clone()),
    ];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        p.probe("connection churn").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut opened = 0;
    for c in churning {
        opened += c.await.unwrap();
    }
    eprintln!("connection churn: {opened} connections opened and closed in 10 s");
    assert!(opened > 1000, "the churn opened only {opened} connections");
    assert_bounded(p.service(), baseline, "connection churn");
    until_http_as_before(p.service(), prefix).await;
}

/// Many addresses together fill the HTTP port: past its limit a connection is refused with 503,
/// `/readyz` says so while it lasts, and the service is ready again once they go.
async fn many_addresses_fill_the_port(p: &mut impl Probe, prefix: &str) {
    let port = p.service().http;
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for from in 10..=21 {
        let h = flood::hold(source(from), port, 40, b"", Duration::from_millis(50)).await.unwrap();
        held.extend(h.open);
        answers.extend(h.refused);
    }
    // The port's limit, less an Envoy's route table poller when it holds a connection.
    let limit = port_limit(p.ports());
    assert!((limit - 1..=limit).contains(&held.len()), "connections the port holds: {}, its limit {limit}", held.len());
    assert_eq!(answers.len(), 12 * 40 - held.len());
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 503") && a.contains("overloaded"), "refusal at the limit: {a:?}");
    }
    // Room for the probe's connection: readiness still says the port refuses.
    held.truncate(held.len() - 10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = p.service().get("/readyz").await.unwrap();
    assert_eq!(status, 503, "readiness right after refusals: {body}");
    assert!(body.contains("the http port refuses connections"), "{body}");
    assert!(p.service().metric(&refused(prefix, "http", "limit")).await.unwrap() >= answers.len() as f64);
    drop(held);
    let start = Instant::now();
    while p.service().get("/readyz").await.unwrap().0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "not ready again 10 s after the connections left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.probe("after the port was full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgewise_control_holds_its_ports_against_hostile_clients() {
    let mut s = control_setup().await;
    let prefix = "edgewise_control";
    s.probe("the start").await;
    assert!(s.control.log().contains("open-file limit 1024 (the hard limit)"), "{}", s.control.log());
    let baseline = rss(&s.control);

    one_address_holds(&mut s, prefix, 2, b"GET /v1/customers HT", "1,100 half-sent requests").await;
    // Beside them, a connection to the xDS port that never starts its TLS handshake.
    let mut silent = flood::hold(source(7), s.control.grpc, 1, b"", Duration::ZERO).await.unwrap();
    one_address_holds(&mut s, prefix, 3, b"", "1,100 idle connections").await;
    assert_eq!(silent.closed_by_peer().await, 1, "a TLS handshake never begun is cut off (10 s)");
    let closed = format!("{prefix}_connections_closed_total{{port=\"http\",reason=\"header_timeout\"}}");
    assert_eq!(s.control.metric(&closed).await.unwrap(), (2 * PER_CLIENT) as f64, "header timeouts counted");

    // Bodies trickled a byte a second, with the admin token: cut off at the body timeout.
    let head = format!(
        "PUT /v1/functions/slow HTTP/1.1\r\nhost: control\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n",
        control::DEMO_TOKEN
    );
    let started = Instant::now();
    let trickling = flood::trickle(source(4), s.control.http, 20, head);
    probes(&mut s, "20 bodies trickled a byte a second").await;
    assert_bounded(&s.control, baseline, "slow bodies");
    for answer in trickling.await.unwrap() {
        assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"), "slow body: {answer:?}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(14), "slow bodies cut off after {took:?}");

    // 200 ADS streams (a client certificate of the control CA: broken Envoys, from four
    // addresses) on connections that read nothing at all, each owed the initial push of 1,000
    // customers' clusters.
    let many = Instant::now();
    for i in 0..CUSTOMERS {
        s.control.put_customer(&format!("bulk-{i}"), 9, &[&s.pki.customer_a_ca], "ingress.bulk.example").await.unwrap();
    }
    eprintln!("{CUSTOMERS} customers added in {:?}", many.elapsed());
    let baseline = rss(&s.control);
    let leaf = s.pki.control_ca.issue(&LeafSpec::client("stuck", &[])).unwrap();
    let tls = edgewise::tls::client(&[&s.pki.control_ca.pem], Some(&leaf), &["h2"]).unwrap();
    let mut connections = Vec::new();
    for c in 0..4 {
        let request = DeltaDiscoveryRequest {
            node: Some(Node { id: format!("stuck-{c}"), ..Default::default() }),
            type_url: CLUSTER.into(),
            ..Default::default()
        };
        let tls = Some((tls.clone(), CONTROL_NAME));
        connections.push(
            flood::never_reading(source(20 + c), s.control.grpc, tls, ADS, &request.encode_to_vec(), 50).await.unwrap(),
        );
    }
    until_metric(&s.control, "edgewise_control_xds_streams", 201.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = rss(&s.control);
    let per_stream = (held.saturating_sub(baseline)) / 200;
    eprintln!("200 ADS streams that never read: {} KiB each (one piece in flight, what it was sent)", per_stream >> 10);
    assert!(per_stream < 1 << 20, "an ADS stream that never reads holds {per_stream} bytes");
    probes(&mut s, "200 ADS streams that never read").await;
    // More changes they are owed and cannot take: nothing piles up.
    for i in 0..200 {
        s.control.put_customer(&format!("more-{i}"), 9, &[&s.pki.customer_a_ca], "ingress.bulk.example").await.unwrap();
    }
    // Their acknowledgements never come: publication goes on without them.
    let host = "0000000a-0000000b-00000000d1.serverless.gitlab.io";
    let published = Instant::now();
    s.control
        .put_function("stuck-probe", host.split('.').next().unwrap(), "probe-1", "fn.probe.example")
        .await
        .unwrap();
    loop {
        let (_, table) = s.control.routes_get(&s.pki.control_ca, edgewise_control::ROUTES_PATH).await.unwrap();
        if table.contains("fn.probe.example") {
            break;
        }
        assert!(published.elapsed() < Duration::from_secs(8), "a function not published while streams lag");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("a function published {:?} after its PUT, 200 streams lagging", published.elapsed());
    until_metric(&s.control, "edgewise_control_xds_lagging_streams", 200.0).await;
    let after = rss(&s.control);
    eprintln!("200 ADS streams that never read, 200 changes later: RSS {} MiB (was {} MiB)", after >> 20, held >> 20);
    assert!(after < held + (16 << 20), "RSS grew from {held} to {after} with changes streams cannot take");
    drop(connections);
    until_metric(&s.control, "edgewise_control_xds_streams", 1.0).await;
    // One address holds at most 64 ADS streams: the next is refused, and says why.
    let mut grpc = Grpc::connect(source(24), s.control.grpc, Some((tls.clone(), CONTROL_NAME))).await.unwrap();
    let request = DeltaDiscoveryRequest { type_url: CLUSTER.into(), ..Default::default() }.encode_to_vec();
    let mut held = Vec::new();
    for _ in 0..PER_CLIENT {
        held.push(grpc.stuck(ADS, &request).await.unwrap());
    }
    until_metric(&s.control, "edgewise_control_xds_streams", 1.0 + PER_CLIENT as f64).await;
    let refused = grpc.call(ADS, &request).await.unwrap_err().to_string();
    assert!(refused.contains("grpc-status Some(\"8\")"), "the 65th stream of an address: {refused}");
    drop((held, grpc));
    until_metric(&s.control, "edgewise_control_xds_streams", 1.0).await;
    until_metric(&s.control, "edgewise_control_xds_lagging_streams", 0.0).await;

    churn(&mut s, prefix, 6).await;
    many_addresses_fill_the_port(&mut s, prefix).await;

    // As before: the Envoy's stream and the API, nothing else held.
    until_metric(&s.control, "edgewise_control_connections{port=\"grpc\"}", 1.0).await;
    until_metric(&s.control, "edgewise_control_xds_streams", 1.0).await;
    s.probe("the end").await;
    assert!(s.run.path().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgewise_ratelimit_holds_its_ports_against_hostile_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = rls_setup(dir.path()).await;
    let prefix = "edgewise_ratelimit";
    s.probe("the start").await;
    assert!(s.rls.log().contains("open-file limit 1024 (the hard limit)"), "{}", s.rls.log());
    let baseline = rss(&s.rls);

    one_address_holds(&mut s, prefix, 2, b"GET /readyz HT", "1,100 half-sent requests").await;
    one_address_holds(&mut s, prefix, 3, b"", "1,100 idle connections").await;

    // A trickled body: /healthz does not read it, so it is answered at once.
    let trickling = flood::trickle(
        source(4),
        s.rls.http,
        20,
        "POST /healthz HTTP/1.1\r\nhost: rls\r\ncontent-length: 100000\r\n\r\n".into(),
    );
    probes(&mut s, "20 bodies trickled a byte a second").await;
    for answer in trickling.await.unwrap() {
        assert!(answer.starts_with("HTTP/1.1 200"), "slow body: {answer:?}");
    }

    // 200 RLS calls whose answers are never read, and 200 streams that never end their side.
    let request = RateLimitRequest { domain: "cloud-connector".into(), hits_addend: 1, ..Default::default() };
    let (mut stuck, mut connections) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let mut grpc = Grpc::connect(source(5), s.rls.grpc, None).await.unwrap();
        for _ in 0..50 {
            stuck.push(grpc.stuck(RLS, &request.encode_to_vec()).await.unwrap());
        }
        connections.push(grpc);
    }
    probes(&mut s, "200 RLS streams that never read").await;
    assert_bounded(&s.rls, baseline, "200 RLS streams that never read");
    drop((stuck, connections));
    until_metric(&s.rls, "edgewise_ratelimit_connections{port=\"grpc\"}", 0.0).await;

    churn(&mut s, prefix, 6).await;
    many_addresses_fill_the_port(&mut s, prefix).await;
    s.probe("the end").await;
}

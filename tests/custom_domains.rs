//! End-to-end: custom domains on envoy/serverless-xds.yaml with real Envoy, a real
//! `edgewise-control` (SQLite) and a real ACME CA (Pebble, with its DNS answering 127.0.0.1 for
//! every name). A domain is added through the REST API; Pebble validates HTTP-01 through the
//! ingress's port 80 listener; the certificate is served by SNI and verified by the client
//! against Pebble's root; traffic reaches the function over mTLS; renewal swaps the certificate
//! under load; removal stops serving it. Hostile input changes nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::client::{Client, Load};
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy};
use edgewise::pebble::Pebble;
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use serde_json::{json, Value};

const A_HOST: &str = "0000000a-0000000b-000000000c.serverless.gitlab.io";
const A_KNATIVE: &str = "hello.ns-42.knative.customer-a.example";
const B_HOST: &str = "1111111a-2222222b-333333333c.serverless.gitlab.io";
const B_KNATIVE: &str = "fn-b.ns-7.knative.customer-b.example";
const DOMAIN: &str = "app.customer-a.example";
/// Pebble's certificates live this long: renewal (at two thirds) comes within the test.
const VALIDITY: Duration = Duration::from_secs(24);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgewise-control"))
}

struct Setup {
    _run: tempfile::TempDir,
    pki: Pki,
    pebble: Pebble,
    control: ControlService,
    envoy: Envoy,
    front: SocketAddr,
    http: SocketAddr,
    /// Trusts Pebble's root only.
    client: Client,
    _gateways: Vec<edgewise::server::Server>,
}

async fn setup() -> Setup {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let http_port = edgewise::free_port().unwrap();
    let pebble = Pebble::start(&run.path().join("pebble"), http_port, VALIDITY).await.unwrap();
    let (directory, api_ca) = (pebble.directory(), pebble.api_ca_file());
    let acme = [
        "--removal-delay-ms",
        "1500",
        "--acme-directory",
        &directory,
        "--acme-ca",
        api_ca.to_str().unwrap(),
        "--acme-retry-ms",
        "500",
        "--max-domains",
        "1000",
    ];
    let control =
        ControlService::start(binary(), run.path(), &run.path().join("control.db"), (0, 0, 0), &acme).await.unwrap();
    let config = Config::shipped("serverless-xds")
        .run_dir(run.path())
        .port(ports::FRONT, 0)
        .port(10080, http_port)
        .port(control::GRPC_PORT, control.grpc)
        .port(control::ROUTES_PORT, control.routes_port());
    let envoy = Envoy::start(&config).await.unwrap();
    let front = envoy.listener("serverless_https").await.unwrap();
    let http = envoy.listener("serverless_http").await.unwrap();
    let roots = pebble.roots().await.unwrap();
    let client = Client::tls(edgewise::tls::client(&[&roots], None, &["http/1.1"]).unwrap());

    let a =
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a").unwrap(), &pki.platform_ca)
            .await
            .unwrap();
    let b =
        sl::gateway("customer-b", 0, &sl::gateway_leaf(&pki.customer_b_ca, "customer-b").unwrap(), &pki.platform_ca)
            .await
            .unwrap();
    control.put_customer("customer-a", a.port(), &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    control.put_customer("customer-b", b.port(), &[&pki.customer_b_ca], "ingress.customer-b.example").await.unwrap();
    control.put_function("hello", A_HOST.split('.').next().unwrap(), "customer-a", A_KNATIVE).await.unwrap();
    control.put_function("fn-b", B_HOST.split('.').next().unwrap(), "customer-b", B_KNATIVE).await.unwrap();
    let s = Setup { _run: run, pki, pebble, control, envoy, front, http, client, _gateways: vec![a, b] };
    let platform = s.pki.front_client(false).unwrap();
    let start = Instant::now();
    while platform.get(s.front, A_HOST, "/").await.map(|r| r.status).unwrap_or(0) != 200 {
        assert!(start.elapsed() < Duration::from_secs(20), "customer-a's function never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}

impl Setup {
    async fn domain(&self, name: &str) -> (u16, Value) {
        self.control.call("GET", &format!("/v1/domains/{name}"), None).await.unwrap()
    }

    /// Polls the domain's status until `done` holds; its view then.
    async fn until_status(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (_, view) = self.domain(name).await;
            if done(&view) {
                return view;
            }
            assert!(start.elapsed() < Duration::from_secs(40), "{name}: {what}: still {view}\n{}", self.pebble.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The certificate the front listener presents for `sni` (DER), verified against Pebble's
    /// root; or the handshake's error.
    async fn certificate(&self, sni: &str) -> Result<Vec<u8>, String> {
        let roots = self.pebble.roots().await.unwrap();
        let config = edgewise::tls::client(&[&roots], None, &["http/1.1"]).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.front).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
        Ok(tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default())
    }
}

fn leaf_validity(der: &[u8]) -> (i64, i64) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp())
}

async fn status(r: &ControlService) -> Value {
    r.call("GET", &format!("/v1/domains/{DOMAIN}"), None).await.map(|(_, v)| v).unwrap_or_default()
}

async fn put_domain(control: &ControlService, name: String, function: &str) -> (u16, Value) {
    control.call("PUT", &format!("/v1/domains/{name}"), Some(&json!({ "function": function }))).await.unwrap()
}

fn server_of(r: &edgewise::client::Response) -> String {
    if r.status == 200 {
        r.json()["server"].as_str().unwrap_or_default().to_string()
    } else {
        format!("{} {}", r.status, r.text())
    }
}

#[tokio::test]
async fn a_custom_domain_is_validated_through_envoy_issued_served_by_sni_renewed_under_load_and_removed() {
    let s = setup().await;

    // Before: the name is unknown, its handshake fails (no certificate of anyone else).
    let unknown = s.certificate(DOMAIN).await;
    assert!(unknown.is_err(), "an unknown domain got a certificate");

    // Add it: pending, then issued through HTTP-01 over Envoy's port 80 listener.
    let added = Instant::now();
    let (status, view) =
        s.control.call("PUT", &format!("/v1/domains/{DOMAIN}"), Some(&json!({"function": "hello"}))).await.unwrap();
    assert_eq!((status, view["status"].as_str()), (201, Some("pending")), "{view}");
    let issued = s.until_status(DOMAIN, "issued", |v| v["status"] == "issued").await;
    let (not_before, not_after) =
        (issued["certificate"]["not_before"].as_i64().unwrap(), issued["certificate"]["not_after"].as_i64().unwrap());
    assert!(not_after - not_before <= VALIDITY.as_secs() as i64 + 1, "{issued}");
    assert!(issued["error"].is_null() && issued.get("key").is_none(), "{issued}");
    assert_eq!(issued["routed"], true, "{issued}");
    assert!(!s.control.log().contains("PRIVATE KEY"), "a private key in the log");
    assert!(!issued.to_string().contains("PRIVATE KEY"), "a private key in the API");
    assert!(
        s.pebble.log().contains("Attempting to validate w/ HTTP: http://app.customer-a.example:"),
        "Pebble validated by HTTP-01: {}",
        s.pebble.log()
    );
    assert!(s.control.log().contains(&format!("certificate for {DOMAIN}")), "{}", s.control.log());
    let challenges = s.envoy.stats().await.unwrap();
    let answered = challenges.get("http.serverless_http.downstream_rq_2xx").copied().unwrap_or(0);
    assert!(answered >= 1, "the challenge went through Envoy's HTTP listener: {answered}");

    // Served by SNI, verified against Pebble's root, routed to the function over mTLS.
    let r = s.client.get(s.front, DOMAIN, "/").await.unwrap();
    eprintln!("PUT to traffic over the custom domain in {:?}", added.elapsed());
    assert_eq!(server_of(&r), "customer-a");
    assert_eq!(r.json()["host"], A_KNATIVE);
    assert_eq!(r.json()["tls"]["sni"], A_KNATIVE);
    let served = s.certificate(DOMAIN).await.unwrap();
    assert_eq!(leaf_validity(&served), (not_before, not_after), "the certificate in the status is the one served");
    // A Host in any case, with a trailing dot or a port: the same route (the SNI, which picks
    // the certificate, is the name as the client sends it: lowercase). Platform names are
    // unaffected.
    let by_sni = s.client.clone().sni(DOMAIN);
    for host in ["APP.customer-a.example", "app.customer-a.example.", "app.customer-a.example:443"] {
        assert_eq!(server_of(&by_sni.get(s.front, host, "/").await.unwrap()), "customer-a", "{host}");
    }
    let platform = s.pki.front_client(false).unwrap();
    assert_eq!(server_of(&platform.get(s.front, B_HOST, "/").await.unwrap()), "customer-b");
    // A Host no domain has, over the domain's connection: a clear 404, no upstream.
    let r = by_sni.get(s.front, "unknown.customer-a.example", "/").await.unwrap();
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("no_route")), "{}", r.text());

    // The HTTP listener: only challenges go to edgewise-control (an unknown token is 404 from
    // it); everything else is redirected to HTTPS.
    let plain = Client::plain();
    let r = plain.get(s.http, DOMAIN, "/.well-known/acme-challenge/not-a-token").await.unwrap();
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("not_found")), "{}", r.text());
    let r = plain.get(s.http, DOMAIN, "/v1/serverless/routes").await.unwrap();
    assert_eq!((r.status, r.header("location")), (301, Some("https://app.customer-a.example/v1/serverless/routes")));

    // Renewal under load: the last third of the lifetime starts a new order; the new
    // certificate replaces the old one for new handshakes, and no request fails.
    let load = Load::start(&s.client, s.front, DOMAIN, 4, 200);
    let renewed = s
        .until_status(DOMAIN, "renewed", |v| v["certificate"]["not_after"].as_i64().is_some_and(|n| n > not_after))
        .await;
    let start = Instant::now();
    loop {
        let now = s.certificate(DOMAIN).await.unwrap();
        if leaf_validity(&now).1 == renewed["certificate"]["not_after"].as_i64().unwrap() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "Envoy still serves the old certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("custom domain during its renewal: {ok} requests succeeded, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 20, "too little load to prove anything: {ok}");
    let updates = s.envoy.stats().await.unwrap();
    assert!(updates.iter().any(|(k, v)| k.contains("on_demand_secret.cert_updated") && *v >= 2), "{updates:?}");

    // Removal: the route and the certificate go; the name's handshake fails again.
    let (status, _) = s.control.call("DELETE", &format!("/v1/domains/{DOMAIN}"), None).await.unwrap();
    assert_eq!(status, 200);
    let start = Instant::now();
    while s.certificate(DOMAIN).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "the removed domain is still served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.domain(DOMAIN).await.0, 404);
    assert_eq!(server_of(&platform.get(s.front, A_HOST, "/").await.unwrap()), "customer-a");
}

#[tokio::test]
async fn hostile_domains_and_a_failing_ca_get_clear_errors_and_change_nothing_else() {
    let mut s = setup().await;
    let put = |name: String, function: &'static str| {
        let control = &s.control;
        async move {
            control.call("PUT", &format!("/v1/domains/{name}"), Some(&json!({"function": function}))).await.unwrap()
        }
    };
    let (status, _) = put("www.customer-b.example".into(), "fn-b").await;
    assert_eq!(status, 201);
    for (name, function, want, field) in [
        ("*.customer-a.example", "hello", 400, "domain"),
        ("127.0.0.1", "hello", 400, "domain"),
        ("[::1]", "hello", 400, "domain"),
        ("x.serverless.gitlab.io", "hello", 400, "domain"),
        ("localhost", "hello", 400, "domain"),
        ("xn--bcher-kva.example", "nope", 400, "function"),
        // Another customer's domain: refused, and it stays theirs.
        ("www.customer-b.example", "hello", 409, ""),
    ] {
        let (status, body) = put(name.into(), function).await;
        assert_eq!(status, want, "{name}: {body}");
        if !field.is_empty() {
            assert_eq!(body["field"], field, "{name}: {body}");
        }
    }
    let auth = format!("Bearer {}", control::DEMO_TOKEN);
    let (status, body) =
        s.control.request("PUT", "/v1/domains/a.example", &[("authorization", &auth)], "{\"function\":").await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = s
        .control
        .request("PUT", "/v1/domains/a.example", &[("authorization", &auth)], "{\"function\":\"hello\",\"x\":1}")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, _) = s.control.request("PUT", "/v1/domains/a.example", &[], "{\"function\":\"hello\"}").await.unwrap();
    assert_eq!(status, 401);
    let (_, b) = s.domain("www.customer-b.example").await;
    assert_eq!(b["function"], "fn-b");

    s.until_status("www.customer-b.example", "issued", |v| v["status"] == "issued").await;

    // 1,000 at once: up to --max-domains (1000) taken, the rest refused clearly; traffic and the
    // other customer's domain are unaffected.
    let names: Vec<String> = (0..1000).map(|i| format!("bulk-{i}.customer-a.example")).collect();
    let mut statuses = Vec::new();
    for chunk in names.chunks(50) {
        let calls = chunk.iter().map(|n| put(n.clone(), "hello"));
        statuses.extend(futures_util::future::join_all(calls).await.into_iter().map(|(status, body)| {
            let refused = status == 409 && body["detail"].as_str().unwrap().contains("at most 1000");
            assert!(status == 201 || refused, "{status} {body}");
            status
        }));
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 999, "1000 with customer-b's");
    let platform = s.pki.front_client(false).unwrap();
    assert_eq!(server_of(&platform.get(s.front, A_HOST, "/").await.unwrap()), "customer-a");
    assert_eq!(server_of(&s.client.get(s.front, "www.customer-b.example", "/").await.unwrap()), "customer-b");
    let mut deleted = 0;
    for name in &names {
        let (status, body) = s.control.call("DELETE", &format!("/v1/domains/{name}"), None).await.unwrap();
        assert!(status == 200 || status == 404, "{status} {body}");
        deleted += usize::from(status == 200);
    }
    assert_eq!(deleted, 999);
    let (_, all) = s.control.call("GET", "/v1/domains", None).await.unwrap();
    assert_eq!(all["domains"].as_array().unwrap().len(), 1, "{all}");

    // The CA down: a new domain fails with the error shown and retries; the issued domain is
    // still served. The CA back (with a new state: the account is made again): issued.
    s.pebble.kill().await.unwrap();
    let (status, _) = put_domain(&s.control, "down.customer-a.example".into(), "hello").await;
    assert_eq!(status, 201);
    let failed = s.until_status("down.customer-a.example", "failed", |v| v["status"] == "failed").await;
    eprintln!("with the CA down: {failed}");
    assert!(failed["error"].as_str().unwrap().contains("Connection refused"), "{failed}");
    assert_eq!(server_of(&s.client.get(s.front, "www.customer-b.example", "/").await.unwrap()), "customer-b");
    s.pebble.start_again().await.unwrap();
    let issued =
        s.until_status("down.customer-a.example", "issued after the CA came back", |v| v["status"] == "issued").await;
    assert!(issued["error"].is_null(), "{issued}");
    let client = Client::tls(edgewise::tls::client(&[&s.pebble.roots().await.unwrap()], None, &["http/1.1"]).unwrap());
    assert_eq!(server_of(&client.get(s.front, "down.customer-a.example", "/").await.unwrap()), "customer-a");

    // Its function deleted, a domain routes nowhere (404 from the route configuration); its
    // entry stays, saying so, until it is deleted or pointed at another function.
    assert_eq!(s.control.call("DELETE", "/v1/functions/hello", None).await.unwrap().0, 200);
    let start = Instant::now();
    while client.get(s.front, "down.customer-a.example", "/").await.unwrap().status != 404 {
        assert!(start.elapsed() < Duration::from_secs(10), "still routed to a deleted function");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, view) = s.control.call("GET", "/v1/domains/down.customer-a.example", None).await.unwrap();
    assert_eq!((view["routed"].as_bool(), view["function"].as_str()), (Some(false), Some("hello")), "{view}");
}

/// A CA that answers garbage (an HTTPS server whose every answer is JSON of another shape): the
/// domain fails with the error shown, nothing else changes, and what was stored survives a
/// restart of the service.
#[tokio::test]
async fn a_ca_answering_garbage_fails_the_domain_clearly_and_the_state_survives_a_restart() {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let ca = edgewise::certs::Ca::new("garbage CA").unwrap();
    let mut spec = edgewise::certs::LeafSpec::server(&["localhost"]);
    spec.ips.push(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = edgewise::tls::server(&ca.issue(&spec).unwrap(), &[], &["http/1.1"]).unwrap();
    let listen = edgewise::server::Listen { tls: Some(tls), ..Default::default() };
    let garbage = edgewise::server::Server::echo("not-acme", listen).await.unwrap();
    let ca_file = edgewise::certs::write_pem(run.path(), "garbage-ca.pem", &ca.pem).unwrap();
    let directory = format!("https://127.0.0.1:{}/dir", garbage.port());
    let db = run.path().join("control.db");
    let args = ["--acme-directory", &directory, "--acme-ca", ca_file.to_str().unwrap(), "--acme-retry-ms", "200"];
    let mut control = ControlService::start(binary(), run.path(), &db, (0, 0, 0), &args).await.unwrap();
    let ca_pem = edgewise::certs::Ca::new("customer CA").unwrap();
    control.put_customer("customer-a", 1, &[&ca_pem], "ingress.customer-a.example").await.unwrap();
    control.put_function("hello", A_HOST.split('.').next().unwrap(), "customer-a", A_KNATIVE).await.unwrap();
    assert_eq!(put_domain(&control, DOMAIN.into(), "hello").await.0, 201);
    let start = Instant::now();
    let failed = loop {
        let (_, view) = control.call("GET", &format!("/v1/domains/{DOMAIN}"), None).await.unwrap();
        if view["status"] == "failed" && view["failures"].as_u64() >= Some(2) {
            break view;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("with a CA answering garbage: {failed}");
    assert!(failed["error"].as_str().unwrap().contains("JSON"), "{failed}");
    assert!(failed["next_attempt_ms"].as_u64().is_some(), "{failed}");
    // The service is whole: the API answers, the store took the state.
    let (status, functions) = control.call("GET", "/v1/functions/hello", None).await.unwrap();
    assert_eq!((status, functions["customer"].as_str()), (200, Some("customer-a")));
    let metrics = control.get("/metrics").await.unwrap().1;
    assert!(metrics.contains("edgewise_control_domains 1"), "{metrics}");
    assert!(!metrics.contains("edgewise_control_acme_orders_total{result=\"failed\"} 0"), "{metrics}");
    // The store is private to the service: it holds the account and the domains' keys.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);

    control.stop().await.unwrap();
    let control = ControlService::start(binary(), run.path(), &db, (0, 0, 0), &[]).await.unwrap();
    let (_, view) = control.call("GET", &format!("/v1/domains/{DOMAIN}"), None).await.unwrap();
    assert_eq!((view["function"].as_str(), view["status"].as_str()), (Some("hello"), Some("failed")), "{view}");
    assert_eq!(view["error"], failed["error"]);
    let (_, table) = control.routes_get(&pki.control_ca, edgewise_control::ROUTES_PATH).await.unwrap();
    assert!(table.contains(&format!("\"domain\":\"{DOMAIN}\"")), "the domain's route is in the table: {table}");
}

/// Custom domains on the shared store: three replicas on etcd, the Envoy's xds and control
/// clusters on all three. Whichever replica Pebble's challenge reaches answers it (the answer is
/// in etcd); one replica runs the orders (the lead, under its lease). Kill -9 that replica: another
/// takes the lead and renews the certificate, which every replica serves; no request fails.
#[tokio::test]
async fn on_etcd_any_replica_answers_challenges_and_another_renews_when_the_leader_dies() {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let http_port = edgewise::free_port().unwrap();
    let pebble = Pebble::start(&run.path().join("pebble"), http_port, VALIDITY).await.unwrap();
    let etcd = edgewise::etcd::EtcdCluster::start(&run.path().join("etcd"), 1).await.unwrap();
    let (directory, api_ca) = (pebble.directory(), pebble.api_ca_file());
    let mut replicas = Vec::new();
    for name in ["r0", "r1", "r2"] {
        let mut args = control::xds_tls(run.path());
        args.extend(
            ["--removal-delay-ms", "1500", "--acme-directory", &directory, "--acme-retry-ms", "500", "--acme-ca"]
                .map(String::from),
        );
        args.push(api_ca.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let endpoints = etcd.endpoints();
        let replica = ControlService::start_replica(binary(), run.path(), &endpoints, name, (0, 0, 0), &args);
        replicas.push(Some(replica.await.unwrap()));
    }
    let mut config = Config::shipped("serverless-xds").run_dir(run.path()).port(ports::FRONT, 0).port(10080, http_port);
    for (k, r) in replicas.iter().flatten().enumerate() {
        let k = k as u16;
        config = config.port(control::GRPC_PORT + k, r.grpc).port(control::ROUTES_PORT + k, r.routes_port());
    }
    let envoy = Envoy::start(&config).await.unwrap();
    let front = envoy.listener("serverless_https").await.unwrap();
    let gateway =
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a").unwrap(), &pki.platform_ca)
            .await
            .unwrap();
    let r0 = replicas[0].as_ref().unwrap();
    r0.put_customer("customer-a", gateway.port(), &[&pki.customer_a_ca], "ingress.customer-a.example").await.unwrap();
    r0.put_function("hello", A_HOST.split('.').next().unwrap(), "customer-a", A_KNATIVE).await.unwrap();
    // Added through one replica, seen by all; issued, and served by SNI.
    let r1 = replicas[1].as_ref().unwrap();
    assert_eq!(put_domain(r1, DOMAIN.into(), "hello").await.0, 201);
    let start = Instant::now();
    let issued = loop {
        let views = [status(r0).await, status(r1).await, status(replicas[2].as_ref().unwrap()).await];
        if views.iter().all(|v| v["status"] == "issued") {
            break views[0].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(40), "{views:?}\n{}", pebble.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client = Client::tls(edgewise::tls::client(&[&pebble.roots().await.unwrap()], None, &["http/1.1"]).unwrap());
    let start = Instant::now();
    while server_of(&client.get(front, DOMAIN, "/").await.unwrap()) != "customer-a" {
        assert!(start.elapsed() < Duration::from_secs(10), "the custom domain is not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the replica that leads the orders; another renews.
    let leader = replicas
        .iter()
        .position(|r| r.as_ref().is_some_and(|r| r.log().contains(&format!("certificate for {DOMAIN} until"))))
        .expect("one replica ran the order");
    let load = Load::start(&client, front, DOMAIN, 2, 200);
    let mut dead = replicas[leader].take().unwrap();
    dead.kill().await.unwrap();
    let survivor = replicas.iter().flatten().next().unwrap();
    let not_after = issued["certificate"]["not_after"].as_i64().unwrap();
    let start = Instant::now();
    loop {
        let v = status(survivor).await;
        if v["certificate"]["not_after"].as_i64().is_some_and(|n| n > not_after) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "not renewed after the leader died: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewer = replicas.iter().flatten().position(|r| r.log().contains(&format!("certificate for {DOMAIN} until")));
    assert!(renewer.is_some(), "a surviving replica renewed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("custom domain while its leader died and another renewed: {ok} succeeded, {failed} failed");

    assert_eq!(failed, 0);
    assert!(ok > 20, "too little load: {ok}");
}

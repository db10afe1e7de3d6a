//! End-to-end: envoy/egress.yaml on real Envoy with the freshly built egress.wasm, a DNS stand-in
//! that resolves destinations for Envoy only, and HTTPS stand-ins with certificates from a test CA.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use edgewise::certs::Ca;
use edgewise::client::{raw_get, raw_statuses, Client, Request};
use edgewise::dns::Dns;
use edgewise::envoy::{Config, Envoy};
use edgewise::scenarios::egress::{self as eg, ports};
use edgewise::server::Server;

struct Setup {
    _run: tempfile::TempDir,
    dns: Dns,
    github: Server,
    www: Server,
    net: Server,
    badcert: Server,
    untrusted: Server,
    envoy: Envoy,
    front: SocketAddr,
}

async fn setup() -> Setup {
    let run = tempfile::tempdir().unwrap();
    let ca = eg::install(run.path()).unwrap();
    let ips: Vec<Ipv4Addr> = (0..5).map(|_| eg::next_loopback()).collect();
    let github = eg::destination("api.github.com", ips[0], 443, &ca, &["api.github.com"]).await.unwrap();
    let www = eg::destination("www.example.com", ips[1], 443, &ca, &["www.example.com"]).await.unwrap();
    let net = eg::destination("example.net", ips[2], 8443, &ca, &["example.net"]).await.unwrap();
    // A certificate from the trusted CA, but for another name ...
    let badcert = eg::destination("badcert", ips[3], 443, &ca, &["someone-else.example"]).await.unwrap();
    // ... and one for the right name from a CA nobody trusts.
    let untrusted =
        eg::destination("untrusted", ips[4], 443, &Ca::new("rogue CA").unwrap(), &["untrusted.example.com"])
            .await
            .unwrap();
    let dns = Dns::start(
        0,
        &[
            ("api.github.com", ips[0]),
            ("www.example.com", ips[1]),
            ("example.net", ips[2]),
            ("badcert.example.com", ips[3]),
            ("untrusted.example.com", ips[4]),
            ("sneaky.example.org", Ipv4Addr::new(10, 11, 12, 13)),
        ],
    )
    .await
    .unwrap();
    let config = Config::shipped("egress").run_dir(run.path()).port(ports::EGRESS, 0).port(ports::DNS, dns.addr.port());
    let envoy = Envoy::start(&config).await.unwrap();
    let front = envoy.listener("egress_http").await.unwrap();
    Setup { _run: run, dns, github, www, net, badcert, untrusted, envoy, front }
}

impl Setup {
    async fn get(&self, authority: &str) -> edgewise::client::Response {
        Client::plain().get(self.front, authority, "/repos/x?page=2").await.unwrap()
    }

    fn upstream_requests(&self) -> usize {
        [&self.github, &self.www, &self.net, &self.badcert, &self.untrusted].iter().map(|s| s.count()).sum()
    }
}

#[tokio::test]
async fn allowlisted_destinations_are_reached_over_verified_tls_with_sni() {
    let s = setup().await;

    // Default port 443, the markers a client might forge are dropped, nothing internal leaks.
    let req = Request::get("API.GitHub.com.egress.local.", "/repos/x?page=2")
        .header("x-edgewise-egress-destination", "private:forged");
    let r = Client::plain().send(s.front, req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["server"], "api.github.com");
    assert_eq!(seen["host"], "api.github.com");
    assert_eq!(seen["path"], "/repos/x?page=2");
    assert_eq!(seen["tls"]["sni"], "api.github.com", "the upstream must see TLS with SNI = the destination");
    let leaked: Vec<_> =
        s.github.seen()[0].headers.iter().filter(|(k, _)| k.starts_with("x-edgewise")).cloned().collect();
    assert!(leaked.is_empty(), "internal headers reached the destination: {leaked:?}");

    // A wildcard entry, and a destination with its own port (kept).
    let r = s.get("www.example.com.egress.local").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tls"]["sni"], "www.example.com");
    let r = s.get("example.net.egress.local:8443").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "example.net");
    assert_eq!(r.json()["host"], "example.net:8443");
    assert_eq!(r.json()["tls"]["sni"], "example.net");
    assert_eq!((s.github.count(), s.www.count(), s.net.count()), (1, 1, 1));

    // Outbound behaviour per destination: api.github.com has its own virtual host (5 s per try).
    assert_eq!(s.github.seen()[0].header("x-envoy-expected-rq-timeout-ms"), Some("5000"));
    assert_eq!(s.www.seen()[0].header("x-envoy-expected-rq-timeout-ms"), Some("30000"));
}

#[tokio::test]
async fn the_allowlist_and_the_ssrf_guard_refuse_before_and_after_dns() {
    let s = setup().await;
    // Refused by the filter, before DNS: (authority, error, what the detail names).
    let before_dns = [
        ("api.github.com", "not_egress_host", "api.github.com"),
        ("[::1]", "not_egress_host", "[::1]"),
        ("[::1]:80", "not_egress_host", "[::1]"),
        ("gist.github.com.egress.local", "destination_not_allowed", "gist.github.com"),
        ("api.github.com.egress.local:8443", "destination_not_allowed", "api.github.com:8443"),
        ("example.net.egress.local", "destination_not_allowed", "example.net"),
        ("127.0.0.1.egress.local", "destination_not_allowed", "127.0.0.1"),
        ("169.254.169.254.egress.local", "destination_not_allowed", "169.254.169.254"),
        ("2130706433.egress.local", "destination_not_allowed", "2130706433"),
        ("localhost.egress.local", "destination_not_allowed", "localhost"),
    ];
    for (authority, error, named) in before_dns {
        let r = s.get(authority).await;
        assert_eq!(r.status, 403, "{authority}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], error, "{authority}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(named), "{authority}: {body}");
    }
    for name in ["gist.github.com", "localhost", "127.0.0.1", "169.254.169.254"] {
        assert_eq!(s.dns.queries(name), 0, "{name} must be refused before any DNS query");
    }

    // Allowed by name, but it resolves to a private address: refused after DNS, even with the
    // client claiming the destination may be private.
    let req = Request::get("sneaky.example.org.egress.local", "/")
        .header("x-edgewise-egress-destination", "private:sneaky_example_org");
    let r = Client::plain().send(s.front, req).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "destination_not_allowed");
    assert!(body["detail"].as_str().unwrap().contains("sneaky.example.org"), "{body}");
    assert!(s.dns.queries("sneaky.example.org") > 0, "the after-DNS check needs the name resolved");
    assert_eq!(s.upstream_requests(), 0, "no destination may be contacted");

    let stats = s.envoy.stats().await.unwrap();
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.egress.denied.not_egress_host")), Some(&3));
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.egress.denied.not_allowed")), Some(&3));
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.egress.denied.ip_literal")), Some(&3));
    assert_eq!(stats.get(&edgewise::envoy::stat("edgewise.egress.denied.loopback_name")), Some(&1));
    assert_eq!(stats.get("http.egress.rbac.denied"), Some(&1));
}

#[tokio::test]
async fn a_certificate_not_valid_for_the_destination_fails_closed() {
    let s = setup().await;
    for authority in ["badcert.example.com.egress.local", "untrusted.example.com.egress.local"] {
        let r = s.get(authority).await;
        assert_eq!(r.status, 503, "{authority}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], "upstream_unavailable", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("CERTIFICATE_VERIFY_FAILED"), "{authority}: {body}");
    }
    assert_eq!(
        s.badcert.count() + s.untrusted.count(),
        0,
        "no request may be sent over a connection that failed verification"
    );
    let stats = s.envoy.stats().await.unwrap();
    assert!(stats.get("cluster.egress.ssl.fail_verify_san").copied().unwrap_or(0) > 0, "SAN mismatch");
    assert!(stats.get("cluster.egress.ssl.fail_verify_error").copied().unwrap_or(0) > 0, "untrusted CA");
}

#[tokio::test]
async fn metrics_are_per_allowlisted_destination_only() {
    let s = setup().await;
    for _ in 0..3 {
        assert_eq!(s.get("api.github.com.egress.local").await.status, 200);
    }
    assert_eq!(s.get("badcert.example.com.egress.local").await.status, 503);
    for host in ["gist.github.com.egress.local", "nope-1.example.org.egress.local", "nope-2.example.org.egress.local"] {
        assert_eq!(s.get(host).await.status, 403);
    }
    s.envoy
        .wait_stat("histogram flush", Duration::from_secs(10), |st| {
            st.contains_key(&edgewise::envoy::stat("edgewise.egress.dest.api_github_com.requests"))
        })
        .await
        .unwrap();
    let prom = s.envoy.admin_get("/stats/prometheus").await.unwrap();
    for line in [
        "edgewise_egress_dest_requests{destination=\"api_github_com\"} 3",
        "edgewise_egress_dest_responses{destination=\"api_github_com\",response_class=\"2xx\"} 3",
        "edgewise_egress_dest_requests{destination=\"wildcard_example_com\"} 1",
        "edgewise_egress_dest_responses{destination=\"wildcard_example_com\",response_class=\"5xx\"} 1",
        "edgewise_egress_denied{reason=\"not_allowed\"} 3",
    ] {
        let line = edgewise::envoy::prometheus(line);
        assert!(
            prom.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            prom.lines().filter(|l| l.contains("edgewise")).collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        prom.contains("edgewise_egress_dest_upstream_ms_bucket{destination=\"api_github_com\""),
        "latency histogram"
    );
    let named: Vec<&str> = prom.lines().filter(|l| l.contains("gist") || l.contains("nope")).collect();
    assert!(named.is_empty(), "no metric may be named after a host that is not on the allowlist: {named:?}");
}

/// Bytes that are not UTF-8 (obs-text, legal in HTTP/1.1) on a raw socket: a Host the filter
/// cannot read is refused (by Envoy or with the filter's 400) and reaches no destination; another
/// header passes to the destination byte for byte; the valid requests after them are all served.
#[tokio::test]
async fn header_values_that_are_not_utf8_are_refused_or_pass_untouched_and_break_nothing() {
    let s = setup().await;
    let raw = |host: &[u8], headers: &[(&str, &[u8])]| {
        let bytes = raw_get(host, "/", headers);
        async move { Client::plain().raw(s.front, "egress", &bytes).await.unwrap() }
    };
    for host in [&b"api.github.com\xe9.egress.local"[..], b"caf\xe9.egress.local"] {
        let out = raw(host, &[]).await;
        assert_eq!(raw_statuses(&out), [400], "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(s.upstream_requests(), 0, "a refused request reached a destination");
    let out = raw(b"api.github.com.egress.local", &[("x-anything", b"caf\xe9\x80")]).await;
    assert_eq!(raw_statuses(&out), [200], "{}", String::from_utf8_lossy(&out));
    assert_eq!(s.github.seen().pop().unwrap().header_bytes("x-anything"), Some(&b"caf\xe9\x80"[..]));
    for _ in 0..10 {
        assert_eq!(s.get("api.github.com.egress.local").await.status, 200);
    }
}

/// The hostile class (edgewise::hostile): each gets a clear status, nothing reaches a destination
/// it may not, and the valid requests after them are served.
#[tokio::test]
async fn hostile_requests_get_clear_statuses_and_break_nothing() {
    let s = setup().await;
    let report = edgewise::hostile::run(&Client::plain(), s.front, "api.github.com.egress.local", "/", &[]).await;
    report.unwrap().check(&[
        ("obs-text in a header value", &[200]),
        ("control bytes in a header value", &[400]),
        // Envoy's codec refuses a Host that is not ASCII before any filter runs.
        ("a non-ASCII authority", &[400]),
        ("a 60 KiB header value", &[431]),
        ("200 headers", &[431]),
        ("a second Authorization", &[200]),
        // Two Hosts reach the filter joined ("another.example,<host>"): not a valid name, 403.
        ("a second Host", &[403]),
        ("two pipelined requests", &[200, 200]),
        ("a body on GET", &[200]),
        ("a POST with Content-Length", &[200]),
        ("a chunked POST with trailers", &[200]),
        ("a POST with Expect: 100-continue, its body at once", &[100, 200]),
    ]);
    assert_eq!(s.upstream_requests(), 9, "only the accepted requests reached the destination");
    for _ in 0..10 {
        assert_eq!(s.get("api.github.com.egress.local").await.status, 200);
    }
}

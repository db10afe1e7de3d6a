//! `make soak`: every scenario under a bounded load of valid, invalid and hostile requests while
//! certificates rotate (serverless, mesh) and the token issuer (cloud-connector, tunnel) and the
//! management service (serverless) flap. Every answer is classified against the answers its
//! request's class allows (and what each allowed answer adds to the filters' counters and to the
//! stand-ins' request counts); Envoy's RSS is sampled; afterwards the counters are compared with
//! what was sent, and VM failures (wasm: `wasm.<plugin>.vm_reload_*`; native:
//! `edgewise.<filter>.panics`) are read. Results go to bench/soak.md; the exit status is non-zero
//! if anything was unexpected.
//!
//! This file holds the scenarios as tables: each one's set-up, its classes (name, weight, request,
//! allowed answers and the counters they move), what Envoy lets through to its upstream for the
//! hostile cases, and its chaos. The machinery is `edgewise::soak`.
//!
//! Each build runs in a child process of its own (EDGEWISE_BUILD set for it), all five scenarios
//! at once, everything on 127.0.0.1.
//!
//! Environment: SOAK_SECONDS (the whole run, set-up included, split between the builds; default
//! 600), EDGEWISE_BUILD (wasm or native; default both), SOAK_RPS (requests per second per
//! scenario, default 20), SOAK_TASKS (concurrent tasks per scenario, default 8: an HTTP/2 refusal
//! holds one for a second, Envoy's delayed close), SOAK_PROBE=1
//! (send each class once on a quiet Envoy and print its answer and counter deltas, then stop:
//! for updating the expectations when the hostile cases change).

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgewise::certs::{Ca, LeafSpec};
use edgewise::client::{raw_get, Client, Request};
use edgewise::dns::Dns;
use edgewise::envoy::{self, Config, Envoy, Options};
use edgewise::hostile;
use edgewise::idp::{self, Idp};
use edgewise::scenarios::cloud_connector::{self as cc, Issuers, CUSTOMERS, GITLAB};
use edgewise::scenarios::egress as eg;
use edgewise::scenarios::mesh;
use edgewise::scenarios::serverless as sl;
use edgewise::scenarios::tunnel as tn;
use edgewise::server::{DocMode, Document, Listen, Server};
use edgewise::soak::{
    answer, body, counters, invalid, issuer_chaos, key, nap, ok, secs, seen_header, tls_updates, valid, Bound, Chaos,
    Effect, Get, Got, Hostile, Make, Req, Scenario, Target, Upstream, Watched, REQUEST_TIMEOUT,
};
use edgewise::tls;
use serde_json::{json, Value};

/// The HMAC secret of the cloud-connector scenario (the backends' signature is checked with it).
const CC_SECRET: &str = "edgewise-soak-secret-of-more-than-32-bytes";

fn main() {
    edgewise::soak::main(|run, long_exp| async move { setup(&run, long_exp).await });
}

/// The five scenarios; `long_exp`: an expiry for tokens that must outlive the run.
async fn setup(run: &Path, long_exp: u64) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    eprintln!("soak: setting up serverless");
    out.push(serverless(run).await.context("serverless")?);
    eprintln!("soak: setting up egress");
    out.push(egress(run).await.context("egress")?);
    eprintln!("soak: setting up mesh");
    out.push(mesh_scenario(run, long_exp).await.context("mesh")?);
    eprintln!("soak: setting up cloud-connector");
    out.push(cloud_connector(run, long_exp).await.context("cloud-connector")?);
    eprintln!("soak: setting up tunnel");
    out.push(tunnel(run, long_exp).await.context("tunnel")?);
    Ok(out)
}

/// Polls `ready` every `every` until it says yes; fails saying `what` at `deadline`.
async fn until<F, Fut>(what: &str, deadline: Instant, every: Duration, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while !ready().await {
        if Instant::now() > deadline {
            bail!("{what}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// A plain GET of `path` at `authority`.
fn get(authority: &str, path: &str) -> Get {
    Get::new(authority, path)
}

/// The tokens every JWT-checking filter must refuse: expired, signed by another key under the
/// same kid, by a key of a kid the issuer never published, unsigned (alg none), HS256 keyed with
/// the public key, for another audience, and garbage. `valid` and `expired` are claims.
struct Forged<'a> {
    key: &'a Idp,
    issuer: &'a str,
    kid: &'a str,
    unknown_kid: &'a str,
    other_audience: &'a str,
    garbage: &'a str,
}

impl Forged<'_> {
    fn tokens(&self, valid: Value, expired: Value) -> Result<Arc<Vec<String>>> {
        let mut wrong_aud = valid.clone();
        wrong_aud["aud"] = self.other_audience.into();
        let mut with_iss = valid.clone();
        with_iss["iss"] = self.issuer.into();
        Ok(Arc::new(vec![
            self.key.token(expired),
            Idp::new(self.issuer, self.kid)?.token(valid.clone()),
            Idp::new(self.issuer, self.unknown_kid)?.token(valid),
            idp::unsigned(self.kid, &with_iss),
            self.key.hs256_with_public_key(&with_iss),
            self.key.token(wrong_aud),
            self.garbage.into(),
        ]))
    }
}

// --- serverless --------------------------------------------------------------------------------

const B_LABEL: &str = "1111111a-2222222b-333333333c";
const B_KNATIVE: &str = "fn-b.ns-7.knative.customer-b.example";

async fn serverless(run: &Path) -> Result<Scenario> {
    let role = "serverless";
    let routed = key(role, "edgewise.serverless.requests.routed");
    let unknown = key(role, "edgewise.serverless.requests.unknown_function");
    let malformed = key(role, "edgewise.serverless.requests.malformed_host");
    let (a_key, b_key, www_key) = ("stand-in: customer-a", "stand-in: customer-b", "stand-in: www");

    let pki = Arc::new(sl::Pki::install(run)?);
    let a = Arc::new(
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a")?, &pki.platform_ca).await?,
    );
    let b = Arc::new(
        sl::gateway("customer-b", 0, &sl::gateway_leaf(&pki.customer_b_ca, "customer-b")?, &pki.platform_ca).await?,
    );
    let www = Arc::new(Server::echo("www", Listen::default()).await?);
    let b_host = format!("{B_LABEL}.{}", sl::DOMAIN);
    let doc = Document::new(sl::table(1, &[(B_LABEL, "customer-b", B_KNATIVE)]));
    let mgmt = Server::start("management", Listen::default(), doc.handler()).await?;
    let config = Config::shipped("serverless")
        .run_dir(run)
        .port(sl::ports::FRONT, 0)
        .port(sl::ports::CUSTOMER_A, a.port())
        .port(sl::ports::CUSTOMER_B, b.port())
        .port(sl::ports::WWW, www.port())
        .port(sl::ports::MANAGEMENT, mgmt.port())
        .replace("\"poll_interval_ms\": 2000", "\"poll_interval_ms\": 500");
    let envoy = Arc::new(Envoy::start(&config).await?);
    let front = envoy.listener("serverless_https").await?;
    let version = envoy::stat("edgewise.serverless.table.version");
    envoy.wait_stat("the first route table", secs(20), |s| s.get(&version) == Some(&1)).await?;
    // The other worker installs it at its next tick.
    tokio::time::sleep(secs(1)).await;

    let front_ca2 = Arc::new(Ca::new("edgewise front CA 2")?);
    let trust = [pki.front_ca.pem.as_str(), front_ca2.pem.as_str()];
    let client = |alpn: &str| -> Result<Target> {
        let client = Client::tls(tls::client(&trust, None, &[alpn])?).sni(sl::INLINE_HOST).timeout(REQUEST_TIMEOUT);
        Ok(Target::new(&client, front))
    };
    let (h1, h2) = (client("http/1.1")?, client("h2")?);

    let reached = |expected_host: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["host"] != expected_host {
                return Err(format!("the gateway saw Host {}", seen["host"]));
            }
            if seen_header(seen, "x-edgewise-cluster").is_some() {
                return Err("x-edgewise-cluster left Envoy".into());
            }
            let client_id = format!("URI:{}", sl::PLATFORM_CLIENT_ID);
            if seen["tls"]["peer_sans"][0] != client_id.as_str() {
                return Err(format!("Envoy presented {} to the gateway", seen["tls"]["peer_sans"]));
            }
            Ok(())
        }
    };
    const CHECK_A: &str = "Host is the function's Knative host, Envoy presented the platform identity, x-edgewise-cluster did not leave Envoy";
    let to_a = [(routed.as_str(), 1), (a_key, 1)];
    let inline_fn = || ok("200 customer-a", &to_a).check(CHECK_A, reached(sl::INLINE_KNATIVE_HOST));
    let www_site = || ok("200 www", &[(www_key, 1)]);
    let classes = vec![
        valid(
            "inline function -> customer-a (HTTP/1.1)",
            10,
            h1.get(get(sl::INLINE_HOST, "/hello?x=1")),
            [inline_fn()],
        ),
        valid(
            "polled function -> customer-b (HTTP/2)",
            8,
            h2.get(get(&b_host, "/")),
            [ok("200 customer-b", &[(routed.as_str(), 1), (b_key, 1)]).check(CHECK_A, reached(B_KNATIVE))],
        ),
        valid("another site on the listener (www.example.com)", 2, h1.get(get("www.example.com", "/")), [www_site()]),
        invalid(
            "a function with a forged x-edgewise-cluster and x-forwarded-host",
            2,
            h1.get(
                get(sl::INLINE_HOST, "/")
                    .header("x-edgewise-cluster", "customer-b")
                    .header("x-forwarded-host", &b_host),
            ),
            [inline_fn()],
        ),
        invalid(
            "another site with a forged x-edgewise-cluster",
            1,
            h1.get(get("www.example.com", "/").header("x-edgewise-cluster", "customer-a")),
            [www_site()],
        ),
        invalid(
            "unknown function host",
            5,
            h1.each(|n| get(&format!("f000{:04x}-{:08x}-{:010x}.{}", n & 0xffff, n % 997, n, sl::DOMAIN), "/")),
            [ok("404 unknown_function", &[(unknown.as_str(), 1)])],
        ),
        invalid(
            "malformed function host (lengths, non-hex, extra labels)",
            4,
            h1.each(|n| {
                let bad = [
                    "0000000a-0000000b-00000000c",
                    "0000000a-0000000b-000000000g",
                    "x.0000000a-0000000b-000000000c",
                    "0000000a-0000000b",
                ];
                get(&format!("{}.{}", bad[(n % 4) as usize], sl::DOMAIN), "/")
            }),
            [ok("404 malformed_host", &[(malformed.as_str(), 1)])],
        ),
        invalid("a host no site is served at", 1, h1.get(get("nothing.example.org", "/")), [ok("404 no_route", &[])]),
    ];
    let hostile = Hostile {
        target: &h1,
        authority: sl::INLINE_HOST,
        path: "/",
        valid: &[],
        upstream: Upstream::new(&["customer-a"], counters(&to_a)),
        // The two Host values reach the filter joined ("another.example,<host>"): not a function
        // host.
        except: vec![("a second Host", vec![ok("404 malformed_host", &[(malformed.as_str(), 1)])])],
    };
    let classes = [classes, hostile.classes()].into_iter().flatten().collect();

    let chaos = {
        let (pki, front_ca2, doc) = (pki.clone(), front_ca2.clone(), doc.clone());
        move |chaos, deadline| serverless_chaos(chaos, deadline, pki, front_ca2, doc, mgmt)
    };
    let about = "envoy/serverless.yaml: the public HTTPS listener (HTTP/1.1 and HTTP/2), customer-a and \
                 customer-b gateways over mutual TLS (a connection per request), a plain www site, the \
                 management service polled every 500 ms (the shipped 2 s, shortened so that flaps are seen)";
    let watched = Watched::filter(role, envoy, &["edgewise.serverless.requests."], "serverless", "serverless");
    Ok(Scenario::new("serverless", about, classes, vec![watched])
        .stand_in("customer-a", move || a.count() as u64)
        .stand_in("customer-b", move || b.count() as u64)
        .stand_in("www", move || www.count() as u64)
        .chaos(
            "every 12 s one rotation, in turn: the public certificate (a new leaf, alternately from \
             the first and a second front CA, both trusted by the clients), the platform's client \
             certificate (a new leaf), customer-a's CA bundle (old + new CA, then old only); every \
             ~12 s the management service fails for 5 s, in turn answering 503, serving a document \
             that does not parse, and not listening at all, then serves a new table version (the \
             same functions and one churning extra route)",
            chaos,
        )
        .effects(vec![
            Effect::tls_rebuilt("TLS contexts rebuilt from SDS", role),
            Effect::stat(
                "management fetches failed",
                role,
                "edgewise.serverless.management_fetch.failed",
                "management flaps",
            ),
            Effect::stat("management fetches ok", role, "edgewise.serverless.management_fetch.ok", "management flaps"),
            Effect::stat("route table version", role, "edgewise.serverless.table.version", "management flaps"),
        ])
        .keep(pki)
        .keep(front_ca2)
        .keep(doc))
}

async fn serverless_chaos(
    chaos: Arc<Chaos>,
    deadline: Instant,
    pki: Arc<sl::Pki>,
    front_ca2: Arc<Ca>,
    doc: Document,
    mgmt: Server,
) {
    let mgmt_port = mgmt.port();
    let rotate = async {
        let a2 = match Ca::new("customer-a cluster CA 2") {
            Ok(ca) => ca,
            Err(e) => return chaos.problem(format!("making a CA: {e:#}")),
        };
        let mut i = 0u64;
        while nap(secs(if i == 0 { 4 } else { 12 }), deadline).await {
            let second = (i / 3) % 2 == 0;
            let done: Result<String> = match i % 3 {
                0 => {
                    let ca = if second { &*front_ca2 } else { &pki.front_ca };
                    let names = [format!("*.{}", sl::DOMAIN), "www.example.com".to_string()];
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    ca.issue(&LeafSpec::server(&names)).and_then(|leaf| pki.rotate_front(&leaf)).map(|()| {
                        format!(
                            "public certificate: a new leaf from the {} front CA",
                            if second { "second" } else { "first" }
                        )
                    })
                }
                1 => pki
                    .platform_client(sl::PLATFORM_CLIENT_ID)
                    .and_then(|leaf| pki.rotate_platform_client(&leaf))
                    .map(|()| "platform client certificate: a new leaf".to_string()),
                _ => {
                    let cas: Vec<&Ca> = if second { vec![&pki.customer_a_ca, &a2] } else { vec![&pki.customer_a_ca] };
                    pki.set_customer_bundle("customer-a", &cas).map(|()| {
                        format!("customer-a CA bundle: {}", if second { "old + new CA" } else { "old CA only" })
                    })
                }
            };
            match done {
                Ok(what) => chaos.event("rotations", what),
                Err(e) => chaos.problem(format!("rotation failed: {e:#}")),
            }
            i += 1;
        }
    };
    let flap = async {
        let mut server = Some(mgmt);
        let mut version = 1u64;
        let mut i = 0u64;
        while nap(secs(if i == 0 { 3 } else { 7 }), deadline).await {
            let condition = match i % 3 {
                0 => {
                    doc.mode(DocMode::Fail(503));
                    "management service answers 503"
                }
                1 => {
                    doc.mode(DocMode::Garbage);
                    "management service serves a document that does not parse"
                }
                _ => {
                    drop(server.take());
                    "management service down (connection refused)"
                }
            };
            chaos.set(condition, true);
            chaos.event("management flaps", condition);
            nap(secs(5), deadline).await;
            version += 1;
            if let Err(e) = serve_table(&doc, &mut server, mgmt_port, version).await {
                chaos.problem(format!("restarting the management service: {e:#}"));
            }
            chaos.set(condition, false);
            chaos.event("management restores", format!("management service serves table version {version}"));
            i += 1;
        }
    };
    tokio::join!(rotate, flap);
}

/// Serves table `version` (the functions of the scenario and one churning extra route),
/// restarting the management service on its port if it is down.
async fn serve_table(doc: &Document, server: &mut Option<Server>, port: u16, version: u64) -> Result<()> {
    let churn = format!("eeeeeeee-0000000b-{version:010x}");
    let churn_host = format!("churn-{version}.knative.customer-a.example");
    doc.set(sl::table(version, &[(B_LABEL, "customer-b", B_KNATIVE), (&churn, "customer-a", &churn_host)]));
    doc.mode(DocMode::Serve);
    if server.is_none() {
        let start = Instant::now();
        loop {
            match Server::start("management", Listen { port, ..Listen::default() }, doc.handler()).await {
                Ok(s) => {
                    *server = Some(s);
                    break;
                }
                // The old listener goes away when its task is dropped, at the runtime's leisure.
                Err(e) if start.elapsed() < secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

// --- egress ------------------------------------------------------------------------------------

async fn egress(run: &Path) -> Result<Scenario> {
    let role = "egress";
    let dest = |label: &str, what: &str| key(role, &format!("edgewise.egress.dest.{label}.{what}"));
    let denied = |reason: &str| key(role, &format!("edgewise.egress.denied.{reason}"));
    let rbac = key(role, "http.egress.rbac.denied");

    let ca = eg::install(run)?;
    let ips: Vec<Ipv4Addr> = (0..5).map(|_| eg::next_loopback()).collect();
    let github = Arc::new(eg::destination("api.github.com", ips[0], 443, &ca, &["api.github.com"]).await?);
    let www = Arc::new(eg::destination("www.example.com", ips[1], 443, &ca, &["www.example.com"]).await?);
    let net = Arc::new(eg::destination("example.net", ips[2], 8443, &ca, &["example.net"]).await?);
    let badcert = Arc::new(eg::destination("badcert", ips[3], 443, &ca, &["someone-else.example"]).await?);
    let rogue = Ca::new("rogue CA")?;
    let untrusted = Arc::new(eg::destination("untrusted", ips[4], 443, &rogue, &["untrusted.example.com"]).await?);
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
    .await?;
    let config =
        Config::shipped("egress").run_dir(run).port(eg::ports::EGRESS, 0).port(eg::ports::DNS, dns.addr.port());
    let envoy = Arc::new(Envoy::start(&config).await?);
    let front = envoy.listener("egress_http").await?;
    let plain = Target::new(&Client::plain().timeout(REQUEST_TIMEOUT), front);

    let sni = |name: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["tls"]["sni"] != name || seen["host"].as_str().map(|h| h.split(':').next()) != Some(Some(name)) {
                return Err(format!("the destination saw SNI {} and Host {}", seen["tls"]["sni"], seen["host"]));
            }
            if seen_header(seen, "x-edgewise-egress-destination").is_some() {
                return Err("the filter's marker reached the destination".into());
            }
            Ok(())
        }
    };
    const CHECK_SNI: &str = "TLS with SNI = the destination, Host = the destination, no marker header";
    // A destination's counters when it answers 2xx, and its stand-in's.
    let answered = |entry: &str, name: &str| {
        [(dest(entry, "requests"), 1), (dest(entry, "responses.2xx"), 1), (format!("stand-in: {name}"), 1)]
    };
    let reached = |entry: &str, name: &'static str| {
        answer(&format!("200 {name}"), answered(entry, name).to_vec()).check(CHECK_SNI, sni(name))
    };
    let repo = |authority: &str| get(authority, "/repos/x?page=2");
    let cycle = |authorities: &'static [&'static str]| -> Make {
        plain.each(move |n| get(authorities[(n as usize) % authorities.len()], "/"))
    };
    let forbidden = |reason: &str| ok("403 destination_not_allowed", &[(&denied(reason), 1)]);
    let classes = vec![
        valid(
            "api.github.com (default port 443)",
            8,
            plain.get(repo("api.github.com.egress.local")),
            [reached("api_github_com", "api.github.com")],
        ),
        valid(
            "www.example.com (a wildcard entry)",
            4,
            plain.get(repo("www.example.com.egress.local")),
            [reached("wildcard_example_com", "www.example.com")],
        ),
        valid(
            "example.net:8443 (an entry with its own port)",
            3,
            plain.get(repo("example.net.egress.local:8443")),
            [reached("example_net_8443", "example.net")],
        ),
        valid(
            "api.github.com with a forged x-edgewise-egress-destination",
            1,
            plain.get(repo("API.GitHub.com.egress.local.").header("x-edgewise-egress-destination", "private:forged")),
            [reached("api_github_com", "api.github.com")],
        ),
        invalid(
            "a destination not on the allowlist (or not for that port)",
            5,
            plain.each(|n| {
                let hosts = [
                    "gist.github.com.egress.local".to_string(),
                    "api.github.com.egress.local:8443".to_string(),
                    "example.net.egress.local".to_string(),
                    format!("nope-{n}.example.org.egress.local"),
                ];
                get(&hosts[(n % 4) as usize], "/")
            }),
            [forbidden("not_allowed")],
        ),
        invalid(
            "not an egress host (the proxy is not an open proxy)",
            2,
            cycle(&["api.github.com", "[::1]", "[::1]:80", "example.org:443"]),
            [ok("403 not_egress_host", &[(&denied("not_egress_host"), 1)])],
        ),
        invalid(
            "IP literals (loopback, cloud metadata, decimal, hex)",
            3,
            cycle(&[
                "127.0.0.1.egress.local",
                "169.254.169.254.egress.local",
                "2130706433.egress.local",
                "0x7f.0.0.1.egress.local",
            ]),
            [forbidden("ip_literal")],
        ),
        invalid(
            "loopback names",
            1,
            cycle(&["localhost.egress.local", "db.localhost.egress.local"]),
            [forbidden("loopback_name")],
        ),
        invalid(
            "an allowed name that resolves to a private address (after DNS, forged marker)",
            2,
            plain.get(
                repo("sneaky.example.org.egress.local")
                    .header("x-edgewise-egress-destination", "private:sneaky_example_org"),
            ),
            [ok(
                "403 destination_not_allowed",
                &[
                    (&dest("sneaky_example_org", "requests"), 1),
                    (&dest("sneaky_example_org", "responses.4xx"), 1),
                    (&rbac, 1),
                ],
            )],
        ),
        invalid(
            "a destination whose certificate does not verify (wrong name, untrusted CA)",
            2,
            cycle(&["badcert.example.com.egress.local", "untrusted.example.com.egress.local"]),
            [ok(
                "503 upstream_unavailable",
                &[(&dest("wildcard_example_com", "requests"), 1), (&dest("wildcard_example_com", "responses.5xx"), 1)],
            )
            .check("the detail names CERTIFICATE_VERIFY_FAILED", |got| {
                let detail = body(got)?["detail"].as_str().unwrap_or_default();
                if detail.contains("CERTIFICATE_VERIFY_FAILED") {
                    Ok(())
                } else {
                    Err(format!("detail {detail:?}"))
                }
            })],
        ),
    ];
    let hostile = Hostile {
        target: &plain,
        authority: "api.github.com.egress.local",
        path: "/",
        valid: &[],
        upstream: Upstream::new(&["api.github.com"], answered("api_github_com", "api.github.com").to_vec()),
        // The two Host values reach the filter joined ("another.example,<host>"): not a DNS name.
        except: vec![(
            "a second Host",
            vec![ok("403 destination_not_allowed", &[(&denied("invalid_destination"), 1)])],
        )],
    };
    let classes = [classes, hostile.classes()].into_iter().flatten().collect();

    let about = "envoy/egress.yaml: the plain-HTTP egress listener, a DNS stand-in for Envoy only, HTTPS \
                 destinations on port 443 (and 8443) of loopback addresses with certificates from a test CA, \
                 one destination with a certificate for another name and one from an untrusted CA";
    let prefixes = ["edgewise.egress.dest.", "edgewise.egress.denied.", "http.egress.rbac.denied"];
    Ok(Scenario::new("egress", about, classes, vec![Watched::filter(role, envoy, &prefixes, "egress", "egress")])
        .stand_in("api.github.com", move || github.count() as u64)
        .stand_in("www.example.com", move || www.count() as u64)
        .stand_in("example.net", move || net.count() as u64)
        .stand_in("badcert", move || badcert.count() as u64)
        .stand_in("untrusted", move || untrusted.count() as u64)
        .no_chaos(
            "none: the scenario has no certificates of its own to rotate and no service to flap \
             (destinations and DNS answers are fixed)",
        )
        .keep(dns))
}

// --- mesh --------------------------------------------------------------------------------------

async fn mesh_scenario(run: &Path, long_exp: u64) -> Result<Scenario> {
    let gw = |x: &str| key("mesh-gateway", &format!("edgewise.mesh_identity.gateway.{x}"));
    let sc = |x: &str| key("mesh-sidecar", &format!("edgewise.mesh_identity.sidecar.{x}"));
    let workloads = "stand-in: catalog + legacy";
    let peer_catalog = "peers: answered by catalog";

    let pki = Arc::new(mesh::Pki::install(run)?);
    let workload = Arc::new(Server::echo("catalog", Listen::default()).await?);
    let non_meshed = Arc::new(Server::echo("legacy", Listen::default()).await?);
    let sidecar_config = Config::shipped("mesh-sidecar")
        .run_dir(run)
        .port(mesh::ports::SIDECAR, 0)
        .port(mesh::ports::WORKLOAD, workload.port());
    let sidecar = Arc::new(Envoy::start(&sidecar_config).await?);
    let sidecar_addr = sidecar.listener("sidecar_inbound").await?;
    let gateway_config = Config::shipped("mesh-gateway")
        .run_dir(run)
        .port(mesh::ports::GATEWAY, 0)
        .port(mesh::ports::SIDECAR, sidecar_addr.port())
        .port(mesh::ports::NON_MESHED, non_meshed.port());
    let gateway = Arc::new(Envoy::start(&pki.gateway_config(gateway_config)).await?);
    let gateway_addr = gateway.listener("gateway_http").await?;
    let plain = Target::new(&Client::plain().timeout(REQUEST_TIMEOUT), gateway_addr);

    let now = idp::now();
    let claims = |sub: &str, exp: u64| json!({ "sub": sub, "aud": mesh::AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": exp });
    let alice = pki.idp.token(claims("alice", long_exp));
    let forged = Forged {
        key: &pki.idp,
        issuer: mesh::ISSUER,
        kid: "idp-key-1",
        unknown_kid: "idp-key-unknown",
        other_audience: "another-service",
        garbage: "a.b.c",
    };
    let attacks = forged.tokens(claims("alice", long_exp), claims("alice", now - 3600))?;

    let items = || get("shop.example", "/catalog/items");
    let identity = |got: &Got| -> Result<(), String> {
        let seen = body(got)?;
        if seen_header(seen, "x-edgewise-user") != Some("alice") {
            return Err(format!("the workload saw x-edgewise-user {:?}", seen_header(seen, "x-edgewise-user")));
        }
        if seen_header(seen, "authorization").is_some() {
            return Err("the user's token left the gateway".into());
        }
        if seen["server"] == "catalog" {
            let xfcc = seen_header(seen, "x-forwarded-client-cert").unwrap_or_default();
            if !xfcc.contains(&format!("URI={}", mesh::GATEWAY_ID)) {
                return Err(format!("the sidecar saw the peer {xfcc:?}"));
            }
        }
        Ok(())
    };
    const CHECK_ID: &str = "the workload sees x-edgewise-user = the token's sub, no Authorization, and (behind the sidecar) the gateway's SPIFFE ID";
    let served = vec![(gw("authenticated"), 1), (workloads.to_string(), 1)];
    let authenticated = || ["200 catalog", "200 legacy"].map(|l| answer(l, served.clone()).check(CHECK_ID, identity));

    let peer = |leaf: Option<&edgewise::certs::Leaf>, alpn: &str| -> Result<Target> {
        let client = Client::tls(tls::client(&[&pki.mesh_ca.pem], leaf, &[alpn])?)
            .sni(mesh::SIDECAR_DNS)
            .timeout(REQUEST_TIMEOUT);
        Ok(Target::new(&client, sidecar_addr))
    };
    let mesh_alpn = "istio-http/1.1";
    let cart = pki.mesh_leaf("spiffe://cluster.local/ns/shop/sa/cart")?;
    let cart_peer = peer(Some(&cart), mesh_alpn)?;
    let intruder = peer(Some(&pki.mesh_leaf("spiffe://cluster.local/ns/other/sa/intruder")?), mesh_alpn)?;
    let no_cert = peer(None, mesh_alpn)?;
    let wrong_alpn = peer(Some(&cart), "http/1.1")?;
    let wrong_ca = peer(Some(&pki.gateway_leaf(&pki.mesh_ca, mesh::GATEWAY_ID)?), mesh_alpn)?;
    let claiming_alice = |peer: &Target| peer.get(get("catalog", "/catalog/items").header("x-edgewise-user", "alice"));
    let refused = || [ok("refused", &[])];

    let classes = vec![
        valid("gateway: a user's token (cached after the first)", 10, plain.get(items().bearer(&alice)), authenticated()),
        valid(
            "gateway: a new token every request",
            5,
            {
                let pki = pki.clone();
                plain.each(move |n| {
                    let now = idp::now();
                    let t = pki.idp.token(json!({ "sub": "alice", "aud": mesh::AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": now + 600, "jti": n }));
                    items().bearer(&t)
                })
            },
            authenticated(),
        ),
        invalid(
            "gateway: a valid token with a forged x-edgewise-user",
            2,
            plain.get(items().headers(&[("x-edgewise-user", "mallory"), ("x-edgewise-user-groups", "admins")]).bearer(&alice)),
            authenticated(),
        ),
        invalid("gateway: no token", 3, plain.get(items()), [ok("401 unauthenticated", &[(&gw("unauthenticated"), 1)])]),
        invalid(
            "gateway: expired, forged (other key, unknown kid, alg none, HS256 with the public key), wrong audience, garbage",
            6,
            plain.each(move |n| items().bearer(&attacks[(n as usize) % attacks.len()])),
            [ok("401 invalid_token", &[(&gw("invalid_token"), 1)])],
        ),
        invalid(
            "gateway: an Authorization that is not UTF-8",
            1,
            plain.raw("shop.example", raw_get(b"shop.example", "/catalog/items", &[("authorization", b"Bearer caf\xe9")])),
            [ok("400 invalid_header", &[(&gw("bad_request"), 1)])],
        ),
        invalid(
            "sidecar: a mesh workload (cart) claiming a user",
            3,
            claiming_alice(&cart_peer),
            [ok("200 catalog", &[(&sc("untrusted_peer"), 1), (workloads, 1), (peer_catalog, 1)]).check(
                "the claimed x-edgewise-user is removed",
                |got| match seen_header(body(got)?, "x-edgewise-user") {
                    None => Ok(()),
                    Some(u) => Err(format!("x-edgewise-user {u:?} reached the workload from a non-gateway peer")),
                },
            )],
        ),
        invalid(
            "sidecar: a workload of another namespace, and cart on /admin (RBAC)",
            2,
            {
                let cart = cart_peer.clone();
                Box::new(move |n| {
                    if n % 2 == 0 {
                        intruder.http(get("catalog", "/catalog/items"))
                    } else {
                        cart.http(get("catalog", "/admin/reindex"))
                    }
                })
            },
            [ok("403", &[(&sc("untrusted_peer"), 1)])],
        ),
        invalid("sidecar: no client certificate", 1, claiming_alice(&no_cert), refused()),
        invalid("sidecar: no mesh ALPN", 1, claiming_alice(&wrong_alpn), refused()),
        invalid(
            "sidecar: the gateway's ID from the mesh CA (wrong CA for the trust domain)",
            1,
            claiming_alice(&wrong_ca),
            refused(),
        ),
    ];
    let bearer = format!("Bearer {alice}");
    let hostile = Hostile {
        target: &plain,
        authority: "shop.example",
        path: "/catalog/items",
        valid: &[("authorization", bearer.as_bytes())],
        upstream: Upstream::new(&["catalog", "legacy"], served),
        // Two Authorization values read as one ("a, b"): not a bearer token.
        except: vec![("a second Authorization", vec![ok("401 invalid_token", &[(&gw("invalid_token"), 1)])])],
    };
    let classes = [classes, hostile.classes()].into_iter().flatten().collect();

    let chaos = {
        let (pki, gateway, sidecar) = (pki.clone(), gateway.clone(), sidecar.clone());
        move |chaos, deadline| mesh_chaos(chaos, deadline, pki, gateway, sidecar)
    };
    let (w1, n1, w2) = (workload.clone(), non_meshed.clone(), workload.clone());
    let trusted = sc("trusted_peer");
    let about = "envoy/mesh-gateway.yaml in front of envoy/mesh-sidecar.yaml (a meshed workload over mTLS with \
                 ALPN istio-http/1.1) and a non-meshed workload (plaintext), two CAs, SPIFFE IDs, an ES256 user \
                 key in the gateway's inline JWKS; peers also call the sidecar directly";
    let prefixes = |role: &str| format!("edgewise.mesh_identity.{role}.");
    let watched = vec![
        Watched::filter("mesh-gateway", gateway, &[&prefixes("gateway")], "mesh-identity", "mesh_identity"),
        Watched::filter("mesh-sidecar", sidecar, &[&prefixes("sidecar")], "mesh-identity", "mesh_identity"),
    ];
    Ok(Scenario::new("mesh", about, classes, watched)
        .stand_in("catalog + legacy", move || (w1.count() + n1.count()) as u64)
        .stand_in("catalog", move || w2.count() as u64)
        .chaos(
            "every 10 s one rotation, in turn: a new gateway leaf from its CA; a CA rotation (the \
             sidecar trusts old + new gateway CA, the gateway moves to a leaf from the new CA, the \
             sidecar drops the old CA; each step waits until Envoy rebuilt the TLS context); a new \
             sidecar leaf from the mesh CA",
            chaos,
        )
        .effects(vec![
            Effect::tls_rebuilt("gateway TLS contexts rebuilt from SDS", "mesh-gateway"),
            Effect::tls_rebuilt("sidecar TLS contexts rebuilt from SDS", "mesh-sidecar"),
        ])
        .relation(
            "sidecar trusted_peer = requests the catalog workload got through the gateway (all it got, less the \
             peers' answered by catalog)",
            &[&trusted.clone(), "stand-in: catalog", peer_catalog],
            move |actual, expected| {
                let catalog = actual.get("stand-in: catalog").copied().unwrap_or(0);
                let peers = expected.get(peer_catalog).copied().unwrap_or(0);
                (actual.get(&trusted).copied().unwrap_or(0), catalog.saturating_sub(peers))
            },
        )
        .keep(pki)
        .keep(workload)
        .keep(non_meshed))
}

async fn mesh_chaos(
    chaos: Arc<Chaos>,
    deadline: Instant,
    pki: Arc<mesh::Pki>,
    gateway: Arc<Envoy>,
    sidecar: Arc<Envoy>,
) {
    // Waits until `envoy` rebuilt a TLS context since `seen`.
    async fn picked_up(chaos: &Chaos, envoy: &Envoy, seen: u64, what: &str) {
        let start = Instant::now();
        while tls_updates(envoy).await <= seen {
            if start.elapsed() > secs(15) {
                return chaos.problem(format!("{what}: no TLS context update after 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut current: Option<Ca> = None;
    let mut i = 0u64;
    while nap(secs(if i == 0 { 4 } else { 10 }), deadline).await {
        let result: Result<()> = async {
            let ca = current.as_ref().unwrap_or(&pki.gateway_ca);
            match i % 3 {
                0 => {
                    let n = tls_updates(&gateway).await;
                    pki.set_gateway_cert(&pki.gateway_leaf(ca, mesh::GATEWAY_ID)?)?;
                    picked_up(&chaos, &gateway, n, "a new gateway leaf").await;
                    chaos.event("rotations", "gateway: a new leaf from its CA");
                }
                1 => {
                    chaos.set("gateway CA rotation", true);
                    let new = Ca::new(&format!("gateway.example CA {}", i + 2))?;
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_trust(&[ca, &new], &[&pki.mesh_ca])?;
                    picked_up(&chaos, &sidecar, n, "old + new CA in the sidecar's bundle").await;
                    let n = tls_updates(&gateway).await;
                    pki.set_gateway_cert(&pki.gateway_leaf(&new, mesh::GATEWAY_ID)?)?;
                    picked_up(&chaos, &gateway, n, "a gateway leaf from the new CA").await;
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_trust(&[&new], &[&pki.mesh_ca])?;
                    picked_up(&chaos, &sidecar, n, "only the new CA in the sidecar's bundle").await;
                    current = Some(new);
                    chaos.set("gateway CA rotation", false);
                    chaos.event("rotations", "gateway CA rotated (old + new trusted, new leaf, old dropped)");
                }
                _ => {
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_cert(&pki.mesh_leaf(mesh::WORKLOAD_ID)?)?;
                    picked_up(&chaos, &sidecar, n, "a new sidecar leaf").await;
                    chaos.event("rotations", "sidecar: a new leaf from the mesh CA");
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            chaos.problem(format!("rotation failed: {e:#}"));
        }
        i += 1;
    }
}

// --- cloud-connector ---------------------------------------------------------------------------

/// The shipped JWKS timing, and the soak's: refreshes every 5 s (so that a flapping issuer is
/// asked while it is down), a retry after 1 s, one refetch per 5 s for unknown kids.
const CC_JWKS_SHIPPED: &str = r#""refresh_seconds": 3600, "min_refresh_seconds": 60, "max_refresh_seconds": 86400,
                        "retry_seconds": 10, "kid_miss_cooldown_seconds": 60, "wait_ms": 3000"#;
const SOAK_JWKS: &str = r#""refresh_seconds": 5, "min_refresh_seconds": 1, "max_refresh_seconds": 5, "retry_seconds": 1, "kid_miss_cooldown_seconds": 5, "wait_ms": 3000"#;

async fn cloud_connector(run: &Path, long_exp: u64) -> Result<Scenario> {
    let role = "cloud-connector";
    let m = |feature: &str, outcome: &str| key(role, &format!("edgewise.cloud_connector.requests.{feature}.{outcome}"));
    let (ai, obs) = ("stand-in: ai-gateway", "stand-in: observability");

    let gitlab = Arc::new(Idp::rs256(GITLAB, "gitlab-1")?);
    let customers = Arc::new(Idp::new(CUSTOMERS, "customers-1")?);
    let p384 = Idp::p384(GITLAB, "gitlab-p384")?;
    let pki = cc::Pki::install(run)?;
    let (issuers, issuer_server) = Issuers::start(&pki.issuer_ca).await?;
    issuers.publish(GITLAB, vec![gitlab.jwk(), p384.jwk()]);
    issuers.publish(CUSTOMERS, vec![customers.jwk()]);
    let ai_server = Arc::new(Server::echo("ai-gateway", Listen::default()).await?);
    let obs_server = Arc::new(Server::echo("observability", Listen::default()).await?);
    let admin = edgewise::free_port()?;
    let config = pki
        .config(run, issuer_server.port(), ai_server.port(), obs_server.port(), admin)
        .replace(CC_JWKS_SHIPPED, SOAK_JWKS);
    let options = Options { env: vec![(cc::SECRET_ENV.into(), CC_SECRET.into())], ..Options::default() };
    let work = run.join("cloud-connector-envoy");
    std::fs::create_dir_all(&work)?;
    let envoy = Arc::new(Envoy::start_in(&config, &work, options).await?);
    let front = envoy.listener("cloud_connector_https").await?;
    let h1 = Target::new(&pki.front_client(false)?.timeout(REQUEST_TIMEOUT), front);
    let h2 = Target::new(&pki.front_client(true)?.timeout(REQUEST_TIMEOUT), front);

    let now = idp::now();
    let claims = |instance: &str, scopes: &[&str], exp: u64| {
        json!({ "aud": cc::AUDIENCE, "sub": instance, "gitlab_realm": "self-managed", "scopes": scopes,
                "iat": now, "nbf": now, "exp": exp, "jti": format!("{instance}-{now}") })
    };
    let orgs: Arc<Vec<String>> = Arc::new(
        (0..8).map(|i| gitlab.token(claims(&format!("valid-org-{i}"), &["code_suggestions"], long_exp))).collect(),
    );
    let observability = customers.token(claims("observability-org", &["observability"], long_exp));
    let over_limit = gitlab.token(claims("over-limit-org", &["duo_chat"], long_exp));
    let hostile_token = gitlab.token(claims("hostile-org", &["code_suggestions"], long_exp));
    let api = |path: &str| get("cloud.gitlab.com", path);
    // Wait for both issuers' keys.
    let deadline = Instant::now() + secs(20);
    for (token, path) in [(&orgs[0], "/ai/v2/code/completions"), (&observability, "/observability/v1/traces")] {
        let what = format!("cloud-connector never accepted a token of {path}");
        until(&what, deadline, Duration::from_millis(100), || async {
            let auth = format!("Bearer {token}");
            let req = Request::get("cloud.gitlab.com", path).header("authorization", &auth);
            h1.client.send(front, req).await.is_ok_and(|r| r.status == 200)
        })
        .await?;
    }

    let mut expired = claims("valid-org-0", &["code_suggestions"], now - 3600);
    expired["iat"] = (now - 7200).into();
    expired["nbf"] = (now - 7200).into();
    let mut wrong_aud = claims("valid-org-0", &["code_suggestions"], long_exp);
    wrong_aud["aud"] = "another-service".into();
    let mut future = claims("valid-org-0", &["code_suggestions"], long_exp);
    future["nbf"] = (now + 3600).into();
    let mut with_iss = claims("valid-org-0", &["code_suggestions"], long_exp);
    with_iss["iss"] = GITLAB.into();
    let stranger = Idp::new("https://gitlab.example", "gitlab-1")?;
    let impostor = Idp::new(GITLAB, "gitlab-1")?;
    let attacks: Arc<Vec<String>> = Arc::new(vec![
        gitlab.token(expired),
        gitlab.token(wrong_aud),
        gitlab.token(future),
        stranger.token(claims("valid-org-0", &["code_suggestions"], long_exp)),
        impostor.sign_as(json!({"alg": "RS256", "kid": "gitlab-1"}), &with_iss),
        idp::unsigned("gitlab-1", &with_iss),
        gitlab.hs256_with_public_key(&with_iss),
        p384.token(claims("valid-org-0", &["code_suggestions"], long_exp)),
        p384.sign_as(json!({"alg": "ES256", "kid": "gitlab-p384"}), &with_iss),
        gitlab.sign_as(json!({"alg": "RS256", "kid": "gitlab-p384"}), &with_iss),
        "not.a.jwt".into(),
    ]);

    let forwarded = |path: &'static str, issuer: &'static str, scopes: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["path"] != path {
                return Err(format!("the backend saw {}", seen["path"]));
            }
            let instance = seen_header(seen, "x-gitlab-instance-id").unwrap_or_default();
            if seen_header(seen, "x-gitlab-token-issuer") != Some(issuer)
                || seen_header(seen, "x-gitlab-scopes") != Some(scopes)
            {
                return Err(format!(
                    "the backend saw issuer {:?} and scopes {:?}",
                    seen_header(seen, "x-gitlab-token-issuer"),
                    seen_header(seen, "x-gitlab-scopes")
                ));
            }
            let sig = seen_header(seen, "x-edgewise-signature").unwrap_or_default();
            if !cc::signature_valid(CC_SECRET.as_bytes(), sig, "GET", path, instance) {
                return Err(format!("x-edgewise-signature {sig:?} does not verify for {path} and {instance}"));
            }
            if seen_header(seen, "x-edgewise-backend").is_some()
                || seen_header(seen, "x-edgewise-ratelimit-key").is_some()
            {
                return Err("a routing header reached the backend".into());
            }
            Ok(())
        }
    };
    const CHECK_FW: &str = "the backend sees the rewritten path, the verified issuer and scopes, a valid x-edgewise-signature and no routing header";
    let code_counters = vec![(m("code_suggestions", "allowed"), 1), (ai.to_string(), 1)];
    let code_ok = || {
        answer("200 ai-gateway", code_counters.clone())
            .check(CHECK_FW, forwarded("/v2/code/completions?lang=rust", GITLAB, "code_suggestions"))
    };
    let code = move |token: &str| api("/ai/v2/code/completions?lang=rust").bearer(token);
    let completions = move || api("/ai/v2/code/completions");
    let unauthenticated = |label: &str| [ok(label, &[(&m("code_suggestions", "unauthenticated"), 1)])];
    // A token of the issuer's key naming a kid it never published (a new one every request: at
    // most one refetch per cooldown).
    let unknown_kid = {
        let gitlab = gitlab.clone();
        move |kid: String| {
            let now = idp::now();
            let claims = json!({ "iss": GITLAB, "aud": cc::AUDIENCE, "sub": "valid-org-0", "scopes": ["code_suggestions"], "iat": now, "exp": now + 600 });
            gitlab.sign_as(json!({"alg": "RS256", "kid": kid}), &claims)
        }
    };
    let chat = move || api("/ai/v1/chat/agent");
    let duo_chat_ok = || ok("200 ai-gateway", &[(&m("duo_chat", "allowed"), 1), (ai, 1)]);

    let classes = vec![
        valid(
            "code_suggestions, RS256, a cached token (8 organizations)",
            10,
            {
                let orgs = orgs.clone();
                h1.each(move |n| code(&orgs[(n % 8) as usize]))
            },
            [code_ok()],
        ),
        valid(
            "code_suggestions, RS256, a new token every request (signature verified)",
            6,
            {
                let gitlab = gitlab.clone();
                h1.each(move |n| {
                    let now = idp::now();
                    let org = format!("valid-org-{}", n % 8);
                    code(&gitlab.token(json!({ "aud": cc::AUDIENCE, "sub": org, "gitlab_realm": "self-managed",
                        "scopes": ["code_suggestions"], "iat": now, "nbf": now, "exp": now + 600, "jti": format!("{n}") })))
                })
            },
            [code_ok()],
        ),
        valid(
            "observability, ES256 from the other issuer, HTTP/2",
            4,
            h2.get(api("/observability/v1/traces").bearer(&observability)),
            [ok("200 observability", &[(&m("observability", "allowed"), 1), (obs, 1)])
                .check(CHECK_FW, forwarded("/v1/traces", CUSTOMERS, "observability"))],
        ),
        valid(
            "duo_chat, a new organization every request (rate-limit slots reused)",
            3,
            {
                let gitlab = gitlab.clone();
                h1.each(move |n| {
                    let now = idp::now();
                    chat().bearer(&gitlab.token(json!({ "aud": cc::AUDIENCE, "sub": format!("chat-org-{n}"), "gitlab_realm": "saas",
                        "scopes": ["duo_chat"], "iat": now, "nbf": now, "exp": now + 600 })))
                })
            },
            [duo_chat_ok()],
        ),
        invalid(
            "a valid token with forged gateway-owned headers",
            2,
            h1.get(code(&orgs[1]).headers(&[
                ("x-gitlab-scopes", "admin_everything"),
                ("x-gitlab-token-issuer", "https://evil.example"),
                ("x-edgewise-signature", "t=1,v1=00"),
                ("x-edgewise-backend", "observability"),
                ("x-edgewise-ratelimit-key", "someone-else"),
            ])),
            [code_ok()],
        ),
        valid("/-/health", 1, h1.get(api("/-/health")), [ok("200 ok", &[])]),
        valid("/-/metrics", 1, h1.get(api("/-/metrics")), [ok("200", &[])]),
        invalid("no token", 3, h1.get(completions()), unauthenticated("401 unauthenticated")),
        invalid(
            "Basic credentials",
            1,
            h1.get(completions().header("authorization", "Basic YTpi")),
            unauthenticated("401 unauthenticated"),
        ),
        invalid(
            "attack tokens: expired, wrong audience, not yet valid, unknown issuer, another key, alg none, HS256 with the public key, ES384, P-384 under ES256, RS256 on an EC key, garbage",
            6,
            h1.each(move |n| completions().bearer(&attacks[(n as usize) % attacks.len()])),
            unauthenticated("401 invalid_token"),
        ),
        invalid(
            "an unknown kid (a new one every request: at most one refetch per cooldown)",
            3,
            {
                let unknown_kid = unknown_kid.clone();
                h1.each(move |n| completions().bearer(&unknown_kid(format!("forged-{n}"))))
            },
            unauthenticated("401 invalid_token"),
        ),
        invalid(
            "an unknown kid with a body, each way a body comes (paused for a refetch when the cooldown allows, and held whole)",
            2,
            {
                let client = h1.client.clone();
                Box::new(move |n| {
                    let bearer = format!("Bearer {}", unknown_kid(format!("forged-body-{n}")));
                    let mut cases =
                        hostile::body_cases("cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", bearer.as_bytes())]);
                    let case = cases.swap_remove((n as usize) % cases.len());
                    Req::Body { client: client.clone(), addr: front, server_name: "cloud.gitlab.com".into(), case }
                })
            },
            unauthenticated("401"),
        ),
        invalid(
            "X-Gitlab-Instance-Id or X-Gitlab-Realm not the token's",
            2,
            {
                let t = orgs[2].clone();
                h1.each(move |n| {
                    let (name, value) = if n % 2 == 0 { ("x-gitlab-instance-id", "someone-else") } else { ("x-gitlab-realm", "saas") };
                    completions().bearer(&t).header(name, value)
                })
            },
            unauthenticated("401 invalid_token"),
        ),
        invalid(
            "a scope the token lacks (duo_chat with a code_suggestions token)",
            2,
            h1.get(chat().bearer(&orgs[3])),
            [ok("403 insufficient_scope", &[(&m("duo_chat", "forbidden"), 1)])],
        ),
        invalid(
            "a path no feature serves",
            2,
            h1.get(api("/admin/users").bearer(&orgs[4])),
            [ok("404 not_found", &[(&m("none", "not_found"), 1)])],
        ),
        invalid(
            "an over-limit organization (duo_chat: 60 per minute, burst 20)",
            10,
            h1.get(chat().bearer(&over_limit)),
            [duo_chat_ok(), ok("429 rate_limited", &[(&m("duo_chat", "rate_limited"), 1)])],
        )
        .bound(Bound { allowed: "200 ai-gateway", limited: "429 rate_limited", burst: 20.0, per_second: 1.0 }),
        invalid(
            "an Authorization that is not UTF-8",
            1,
            h1.raw(
                "cloud.gitlab.com",
                raw_get(b"cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", b"Bearer caf\xe9")]),
            ),
            [ok("400 invalid_header", &[(&m("code_suggestions", "bad_request"), 1)])],
        ),
    ];
    let hostile_bearer = format!("Bearer {hostile_token}");
    let hostile = Hostile {
        target: &h1,
        authority: "cloud.gitlab.com",
        path: "/ai/v2/code/completions",
        valid: &[("authorization", hostile_bearer.as_bytes())],
        upstream: Upstream::new(&["ai-gateway"], code_counters),
        // Two Authorization values read as one ("a, b"): not a bearer token.
        except: vec![(
            "a second Authorization",
            vec![ok("401 invalid_token", &[(&m("code_suggestions", "unauthenticated"), 1)])],
        )],
    };
    let classes = [classes, hostile.classes()].into_iter().flatten().collect();

    let chaos = {
        let issuers = issuers.clone();
        move |chaos, deadline| async move { issuer_chaos(chaos, deadline, issuers, &[GITLAB, CUSTOMERS]).await }
    };
    let (a, o) = (ai_server.clone(), obs_server.clone());
    let about = "envoy/cloud-connector.yaml: the public HTTPS listener, a TLS stand-in for both issuers \
                 (gitlab.com: RS256 and a P-384 key; customers.gitlab.com: ES256; OIDC discovery and JWKS), \
                 echo backends; JWKS timing shortened to refresh every 5 s, retry after 1 s, one refetch per \
                 5 s for unknown kids (the shipped 3600/10/60 s would not ask a flapping issuer at all)";
    let watched =
        Watched::filter(role, envoy, &["edgewise.cloud_connector.requests."], "cloud-connector", "cloud_connector");
    let jwks = |issuer: &str, outcome: &str| format!("edgewise.cloud_connector.jwks.{issuer}.fetch.{outcome}");
    Ok(Scenario::new("cloud-connector", about, classes, vec![watched])
        .stand_in("ai-gateway", move || a.count() as u64)
        .stand_in("observability", move || o.count() as u64)
        .chaos(
            "the issuers flap: every ~15 s one goes down (answers 503 to discovery and JWKS) for 8 s, \
             in turn gitlab.com, customers.gitlab.com, both",
            chaos,
        )
        .effects(vec![
            Effect::stat(
                "JWKS fetches failed (gitlab.com)",
                role,
                &jwks("gitlab_com", "failed"),
                "outages of gitlab.com",
            ),
            Effect::stat(
                "JWKS fetches failed (customers.gitlab.com)",
                role,
                &jwks("customers_gitlab_com", "failed"),
                "outages of customers.gitlab.com",
            ),
            Effect::stat("JWKS fetches ok (gitlab.com)", role, &jwks("gitlab_com", "ok"), "issuer flaps"),
        ])
        .keep(issuer_server)
        .keep(ai_server)
        .keep(obs_server))
}

// --- tunnel ------------------------------------------------------------------------------------

async fn tunnel(run: &Path, long_exp: u64) -> Result<Scenario> {
    let role = "tunnel-hub";
    let ta = |outcome: &str| key(role, &format!("edgewise.tunnel_auth.requests.{outcome}"));
    let kp = "stand-in: kubectl-proxy";

    let pki = tn::Pki::install(run)?;
    let (issuers, issuer_server) = Issuers::start(&pki.issuer_ca).await?;
    let user_key = Arc::new(Idp::new(GITLAB, "users-1")?);
    issuers.publish(GITLAB, vec![user_key.jwk()]);
    let kubectl = tn::KubectlProxy::start(1).await?;
    let hub_config = pki.hub_config(run, issuer_server.port()).replace(
        r#""audiences": ["edgewise-tunnel-hub"],"#,
        &format!(r#""audiences": ["edgewise-tunnel-hub"], "jwks": {{ {SOAK_JWKS} }},"#),
    );
    let hub_config = hub_config.port(tn::ports::USERS, 0).port(tn::ports::HANDSHAKE, 0).any_admin_port();
    let work = run.join("tunnel-hub-envoy");
    std::fs::create_dir_all(&work)?;
    let hub = Arc::new(Envoy::start_in(&hub_config, &work, Options::default()).await?);
    let users = hub.listener("tunnel_users").await?;
    let handshake = hub.listener("tunnel_handshake").await?.port();
    let agent = Arc::new(
        Envoy::start_with(
            &pki.agent_config(run, handshake, kubectl.port),
            Options { concurrency: 1, ..Options::default() },
        )
        .await?,
    );
    let what = "no tunnels of cluster-a on both hub workers after 20 s";
    until(what, Instant::now() + secs(20), Duration::from_millis(50), || async {
        let stats = hub.stats().await.unwrap_or_default();
        (0..2).all(|w| stats.get(&format!("tunnel_hub.worker_{w}.node.cluster-a")).is_some_and(|n| *n >= 1))
    })
    .await?;
    let plain = Target::new(&Client::plain().timeout(REQUEST_TIMEOUT), users);
    let now = idp::now();
    let claims = |user: &str, clusters: &[&str], exp: u64| json!({"sub": user, "aud": tn::AUDIENCE, "clusters": clusters, "exp": exp, "iat": now});
    let alice = user_key.token(claims("alice", &["cluster-a"], long_exp));
    let (client, auth) = (&plain.client, format!("Bearer {alice}"));
    let what = "the hub never carried a request of alice's through the tunnel";
    until(what, Instant::now() + secs(20), Duration::from_millis(100), || async {
        let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &auth);
        client.send(users, req).await.is_ok_and(|r| r.status == 200)
    })
    .await?;
    let bob = user_key.token(claims("bob", &["cluster-b"], long_exp));
    let carol = user_key.token(claims("carol", &["cluster-c"], long_exp));
    let forged = Forged {
        key: &user_key,
        issuer: GITLAB,
        kid: "users-1",
        unknown_kid: "users-unknown",
        other_audience: "another-hub",
        garbage: "not.a.token",
    };
    let attacks =
        forged.tokens(claims("alice", &["cluster-a"], long_exp), claims("alice", &["cluster-a"], now - 3600))?;

    let through = |got: &Got| -> Result<(), String> {
        let seen = body(got)?;
        if seen["path"] != "/api/v1/namespaces?limit=1" {
            return Err(format!("the cluster saw {}", seen["path"]));
        }
        if seen["headers"]["host"] != "kubernetes.default.svc" {
            return Err(format!("the cluster saw Host {}", seen["headers"]["host"]));
        }
        for h in ["authorization", "x-edgewise-tunnel-cluster"] {
            if seen["headers"].get(h).is_some() {
                return Err(format!("{h} reached the cluster"));
            }
        }
        Ok(())
    };
    const CHECK_T: &str = "the cluster sees the path without the prefix, Host rewritten, no token, no tunnel header";
    let carried = vec![(ta("allowed"), 1), (kp.to_string(), 1)];
    let allowed = || [answer("200", carried.clone()).check(CHECK_T, through)];
    let hub_get = |path: &str| get("hub.example", path);
    let cluster_a = move || hub_get("/clusters/cluster-a/api/v1/namespaces?limit=1");
    let classes = vec![
        valid("alice to cluster-a (cached token)", 10, plain.get(cluster_a().bearer(&alice)), allowed()),
        valid(
            "alice to cluster-a, a new token every request",
            5,
            {
                let key = user_key.clone();
                plain.each(move |n| {
                    let now = idp::now();
                    cluster_a().bearer(&key.token(json!({"sub": "alice", "aud": tn::AUDIENCE, "clusters": ["cluster-a"], "exp": now + 600, "iat": now, "jti": n})))
                })
            },
            allowed(),
        ),
        invalid(
            "alice to cluster-a with a forged x-edgewise-tunnel-cluster",
            2,
            plain.get(cluster_a().header("x-edgewise-tunnel-cluster", "cluster-b").bearer(&alice)),
            allowed(),
        ),
        invalid("no token", 3, plain.get(cluster_a()), [ok("401 unauthenticated", &[(&ta("unauthenticated"), 1)])]),
        invalid(
            "attack tokens: expired, another key, unknown kid, alg none, HS256 with the public key, wrong audience, garbage",
            6,
            plain.each(move |n| cluster_a().bearer(&attacks[(n as usize) % attacks.len()])),
            [ok("401 invalid_token", &[(&ta("unauthenticated"), 1)])],
        ),
        invalid(
            "bob (cluster-b only) to cluster-a",
            3,
            plain.get(cluster_a().bearer(&bob)),
            [ok("403 forbidden", &[(&ta("forbidden"), 1)])],
        ),
        invalid(
            "a path outside /clusters/<id>/",
            2,
            plain.get(hub_get("/api/v1/namespaces").header("x-edgewise-tunnel-cluster", "cluster-a").bearer(&alice)),
            [ok("404 not_found", &[(&ta("not_found"), 1)])],
        ),
        invalid(
            "a cluster with no agent (carol to cluster-c)",
            2,
            plain.get(hub_get("/clusters/cluster-c/api").bearer(&carol)),
            [ok("503 tunnel_unavailable", &[(&ta("allowed"), 1)])],
        ),
        invalid(
            "an Authorization that is not UTF-8",
            1,
            plain.raw(
                "hub.example",
                raw_get(b"hub.example", "/clusters/cluster-a/version", &[("authorization", b"Bearer caf\xe9")]),
            ),
            [ok("400 invalid_header", &[(&ta("bad_request"), 1)])],
        ),
    ];
    let hostile = Hostile {
        target: &plain,
        authority: "hub.example",
        path: "/clusters/cluster-a/version",
        valid: &[("authorization", auth.as_bytes())],
        upstream: Upstream::new(&[], carried),
        except: vec![
            // Allowed by the filter, then Envoy's HTTP/2 hop into the tunnel resets the stream
            // (obs-text is not a valid HTTP/2 header value).
            ("obs-text in a header value", vec![ok("503", &[(&ta("allowed"), 1)])]),
            ("a second Authorization", vec![ok("401 invalid_token", &[(&ta("unauthenticated"), 1)])]),
        ],
    };
    let classes = [classes, hostile.classes()].into_iter().flatten().collect();

    let chaos = {
        let issuers = issuers.clone();
        move |chaos, deadline| async move { issuer_chaos(chaos, deadline, issuers, &[GITLAB]).await }
    };
    let seen = kubectl.seen.clone();
    let about = "envoy/tunnel-hub.yaml (two workers) and envoy/tunnel-agent.yaml: the agent dials the hub's \
                 handshake listener with its cluster-a certificate, users call the hub's plain-HTTP listener, \
                 requests go through the tunnel to a kubectl-proxy stand-in; ES256 user tokens from an issuer \
                 stand-in; JWKS timing shortened as for cloud-connector";
    let watched = vec![
        Watched::filter(role, hub, &["edgewise.tunnel_auth.requests."], "tunnel-auth", "tunnel_auth"),
        Watched::plain("tunnel-agent", agent),
    ];
    let jwks = |outcome: &str| format!("edgewise.tunnel_auth.jwks.gitlab_com.fetch.{outcome}");
    Ok(Scenario::new("tunnel", about, classes, watched)
        .stand_in("kubectl-proxy", move || seen.lock().map(|s| s.len() as u64).unwrap_or(0))
        .chaos("the issuer flaps: every ~15 s gitlab.com answers 503 to discovery and JWKS for 8 s", chaos)
        .effects(vec![
            Effect::stat("JWKS fetches failed", role, &jwks("failed"), "outages of gitlab.com"),
            Effect::stat("JWKS fetches ok", role, &jwks("ok"), "issuer flaps"),
        ])
        .keep(issuer_server)
        .keep(kubectl))
}

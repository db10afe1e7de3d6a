//! `make bench`, custom domains at DOMAINS (10,000) names, with a real ACME CA (Pebble) and
//! envoy/serverless-xds.yaml (wasm build, one worker):
//! - the API taking DOMAINS domains, and the orders that issue them through HTTP-01 over Envoy:
//!   orders a second, and edgewise-control's CPU per order (a renewal is the same order: the
//!   renewal load of the control plane);
//! - from a PUT to the first answer over HTTPS at the new name (DOMAINS_SAMPLE (20) names, added
//!   one at a time once the others are issued);
//! - Envoy's memory per domain: its RSS before and after one handshake at every name (the
//!   on-demand selector holds the certificates of the names it is asked for);
//! - against a filter chain per name (what an LDS-based design serves): Envoy's RSS and start with
//!   DOMAINS chains and certificates, and the size of the listener every change resends.
//!
//! Environment: the above, and BENCH_OUT_DOMAINS (default bench/results-domains.md).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgewise::certs::{Ca, LeafSpec};
use edgewise::client::Client;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy, Options};
use edgewise::pebble::Pebble;
use edgewise::scale::{cpu_ticks, env_usize, median, quantile, rss_mib};
use edgewise::scenarios::serverless::{self as sl, ports, Pki};
use edgewise::service::Service;

const HOST: &str = "0000000a-0000000b-000000000c.serverless.gitlab.io";
const KNATIVE: &str = "hello.ns-42.knative.customer-a.example";

fn binary() -> Result<std::path::PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("edgewise-control"))
}

fn name(i: usize) -> String {
    format!("d{i}.customer-a.example")
}

async fn put(control: &ControlService, domain: &str) -> Result<u16> {
    let auth = format!("Bearer {}", control::DEMO_TOKEN);
    let body = serde_json::json!({ "function": "hello" }).to_string();
    let path = format!("/v1/domains/{domain}");
    Ok(Service::exchange_on(control.http, "PUT", &path, &[("authorization", &auth)], &body).await?.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    edgewise::init_crypto();
    let domains = env_usize("DOMAINS", 10_000);
    let sample = env_usize("DOMAINS_SAMPLE", 20);
    let renewals = env_usize("DOMAINS_RENEWALS", 100);
    let out = std::env::var("BENCH_OUT_DOMAINS").unwrap_or_else(|_| "bench/results-domains.md".into());
    let work = edgewise::repo_root().join("target/domains");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut report = String::new();
    writeln!(report, "# Custom domains at {domains} names\n")?;
    writeln!(
        report,
        "`make bench` (`edgewise-domains`), one run on this machine (2 cores): edgewise-control (SQLite), \
         Pebble (Let's Encrypt's test CA) validating HTTP-01 through Envoy, envoy/serverless-xds.yaml \
         (wasm build, one worker). The {domains} domains are added through the API; their certificates \
         are then written to the store by the bench (Pebble 2.4 cannot issue that many: its in-memory \
         store deadlocks under concurrent orders, and one at a time takes hours), all but \
         {renewals}, whose certificates are written due for renewal: edgewise-control renews those \
         through Pebble, one order at a time, with the {domains} domains in place.\n"
    )?;
    let pki = Pki::install(&work)?;
    let db = work.join("control.db");

    // The API: every domain added, no CA configured yet.
    let control = ControlService::start(&binary()?, &work, &db, (0, 0, 0), &[]).await?;
    let gateway =
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a")?, &pki.platform_ca).await?;
    control.put_customer("customer-a", gateway.port(), &[&pki.customer_a_ca], "ingress.customer-a.example").await?;
    control.put_function("hello", HOST.split('.').next().unwrap_or_default(), "customer-a", KNATIVE).await?;
    let control_pid = control.pid().context("control pid")?;
    let started = Instant::now();
    let ticks = cpu_ticks(control_pid)?;
    for chunk in (0..domains).collect::<Vec<_>>().chunks(32) {
        let calls = chunk.iter().map(|&i| {
            let control = &control;
            async move { put(control, &name(i)).await }
        });
        for status in futures_util::future::join_all(calls).await {
            if status? != 201 {
                bail!("a PUT was refused");
            }
        }
    }
    let api = started.elapsed().as_secs_f64();
    let api_ticks = cpu_ticks(control_pid)? - ticks;
    let mut control = control;
    control.stop().await?;
    eprintln!("{domains} domains taken in {api:.1} s");

    // Their certificates, as an order would have stored them (from a CA of the bench's own).
    let bench_ca = Ca::new("domains bench CA")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    {
        let mut store = edgewise_control::store::Store::open(&db).map_err(anyhow::Error::msg)?;
        for (domain_name, mut domain) in store.domains().map_err(anyhow::Error::msg)? {
            let i: usize = domain_name.trim_start_matches('d').split('.').next().unwrap_or_default().parse()?;
            let leaf = bench_ca.issue(&LeafSpec::server(&[&domain_name]))?;
            // Valid for 90 days; the first `renewals` in their last third, due now.
            let not_before = if i < renewals { now - 70 * 86_400 } else { now - 60 };
            domain.certificate = Some(edgewise_control::domains::Certificate {
                chain: leaf.cert_pem,
                key: leaf.key_pem,
                not_before,
                not_after: not_before + 90 * 86_400,
            });
            store.put_domain(&domain_name, &domain).map_err(anyhow::Error::msg)?;
        }
    }

    // The service again, now with Pebble; an Envoy.
    let http_port = edgewise::free_port()?;
    let pebble = Pebble::start(&work.join("pebble"), http_port, Duration::from_secs(90 * 86_400)).await?;
    let api_ca = pebble.api_ca_file();
    let args = [
        "--acme-directory",
        &pebble.directory(),
        "--acme-ca",
        api_ca.to_str().context("path")?,
        // One order at a time (see above).
        "--acme-concurrency",
        "1",
        "--acme-retry-ms",
        "1000",
    ];
    let loading = Instant::now();
    let control = ControlService::start(&binary()?, &work, &db, (0, 0, 0), &args).await?;
    let load_s = loading.elapsed().as_secs_f64();
    let control_pid = control.pid().context("control pid")?;
    let ticks = cpu_ticks(control_pid)?;
    let renewing = Instant::now();
    let config = Config::shipped("serverless-xds")
        .run_dir(&work)
        .port(ports::FRONT, 0)
        .port(10080, http_port)
        .port(control::GRPC_PORT, control.grpc)
        .port(control::ROUTES_PORT, control.routes_port());
    let options =
        Options { concurrency: 1, log_level: "warning", ready_within: Duration::from_secs(60), ..Options::default() };
    let envoy = Envoy::start_with(&config, options).await?;
    let front = envoy.listener("serverless_https").await?;
    loop {
        let (renewed, failed) = renewed(&control, renewals).await?;
        if renewed == renewals {
            break;
        }
        if renewing.elapsed() > Duration::from_secs(1800) {
            bail!("{renewed} of {renewals} renewed after 30 minutes ({failed} failed)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renew_s = renewing.elapsed().as_secs_f64();
    let order_ticks = cpu_ticks(control_pid)? - ticks;
    let control_rss = rss_mib(control_pid);
    eprintln!("{renewals} renewed in {renew_s:.0} s");

    // PUT to the first HTTPS answer, one new name at a time.
    let roots = [bench_ca.pem.clone(), pebble.roots().await?];
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    let client = Client::tls(edgewise::tls::client(&roots, None, &["http/1.1"])?);
    let mut latencies = Vec::new();
    for i in domains..domains + sample {
        let domain = name(i);
        let start = Instant::now();
        if put(&control, &domain).await? != 201 {
            bail!("PUT {domain} refused");
        }
        loop {
            if client.get(front, &domain, "/").await.is_ok_and(|r| r.status == 200) {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{domain} not served within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(start.elapsed().as_secs_f64() * 1000.0);
    }

    // Envoy's memory: one handshake at every name.
    let envoy_pid = envoy.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_mib(envoy_pid);
    let handshakes = Instant::now();
    for chunk in (0..domains).collect::<Vec<_>>().chunks(16) {
        let calls = chunk.iter().map(|&i| {
            let client = &client;
            async move { client.get(front, &name(i), "/").await.map(|r| r.status) }
        });
        for status in futures_util::future::join_all(calls).await {
            if status? != 200 {
                bail!("a domain did not answer");
            }
        }
    }
    let first_handshakes = handshakes.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(envoy_pid);
    let again = Instant::now();
    let warm_count = domains.min(2000);
    for i in 0..warm_count {
        client.get(front, &name(i), "/").await?;
    }
    let warm = again.elapsed().as_secs_f64() / warm_count as f64;
    let first = first_handshakes / domains as f64 * 16.0;
    let per_domain_kib = (after - before) * 1024.0 / domains as f64;
    drop(envoy);
    drop(control);
    drop(pebble);

    let tick = 0.01;
    let cpu_per_order = order_ticks as f64 * tick * 1000.0 / renewals as f64;
    writeln!(report, "## On demand by SNI (the shipped design)\n")?;
    writeln!(report, "| | measured |\n|---|---|")?;
    writeln!(
        report,
        "| {domains} PUTs (32 at a time) | {api:.1} s, {:.0} a second, control CPU {:.2} ms each |",
        domains as f64 / api,
        api_ticks as f64 * tick * 1000.0 / domains as f64
    )?;
    writeln!(report, "| edgewise-control start with {domains} domains and their certificates | {load_s:.1} s |")?;
    writeln!(
        report,
        "| {renewals} renewals (ACME orders one at a time, HTTP-01 through Envoy) | {renew_s:.0} s, {:.2} s an order |",
        renew_s / renewals as f64
    )?;
    writeln!(report, "| edgewise-control CPU per renewal | {cpu_per_order:.1} ms |")?;
    writeln!(report, "| edgewise-control RSS with {domains} domains and their keys | {control_rss:.0} MiB |")?;
    writeln!(report, "| PUT to the first HTTPS answer at the new name ({sample} names, {domains} others in place) | p50 {:.0} ms, p99 {:.0} ms |", median(latencies.clone()), quantile(latencies, 0.99))?;
    writeln!(report, "| Envoy RSS before any custom-domain handshake | {before:.0} MiB |")?;
    writeln!(report, "| Envoy RSS after one handshake at each of the {domains} names | {after:.0} MiB ({per_domain_kib:.1} KiB a domain) |")?;
    writeln!(
        report,
        "| a request with the first handshake at a name (certificate fetched, 16 in parallel) | {:.1} ms |",
        first * 1000.0
    )?;
    writeln!(report, "| a request with a handshake at a name already held | {:.1} ms |\n", warm * 1000.0)?;
    writeln!(
        report,
        "Renewal load: each certificate is renewed once per two thirds of its lifetime; at {domains} \
         domains with 90-day certificates that is {:.0} orders a day, {:.1} s of control CPU a day.\n",
        domains as f64 / 60.0,
        domains as f64 / 60.0 * cpu_per_order / 1000.0
    )?;
    std::fs::write(&out, &report)?;

    // The alternative: a filter chain per name, each with its certificate, in one listener.
    let (base, _, _) = chain_per_name(&work, 1).await?;
    let (rss, start_s, listener_bytes) = chain_per_name(&work, domains).await?;
    writeln!(report, "## Against a filter chain per name (LDS)\n")?;
    writeln!(report, "| | measured |\n|---|---|")?;
    writeln!(report, "| Envoy RSS with {domains} chains and certificates | {rss:.0} MiB ({:.1} KiB a domain over one chain's {base:.0} MiB, every domain on every Envoy) |", (rss - base) * 1024.0 / domains as f64)?;
    writeln!(report, "| Envoy start until the listener serves | {start_s:.1} s |")?;
    writeln!(report, "| the listener (JSON, certificates by SDS name) | {:.1} MiB, resent to every Envoy at each domain added, moved or removed |\n", listener_bytes as f64 / (1 << 20) as f64)?;
    writeln!(
        report,
        "On demand, a change is one secret to the Envoys that hold the name, and an Envoy holds only \
         the names it is asked for; with a chain per name, a change resends the whole listener to every \
         Envoy and each holds every certificate."
    )?;
    std::fs::write(&out, &report)?;
    print!("{report}");
    Ok(())
}

/// How many of the first `n` domains have a certificate of Pebble's (renewed), and how many failed.
async fn renewed(control: &ControlService, n: usize) -> Result<(usize, usize)> {
    let (mut done, mut failed) = (0, 0);
    for i in 0..n {
        let (_, view) = control.call("GET", &format!("/v1/domains/{}", name(i)), None).await?;
        done += usize::from(view["status"] == "issued");
        failed += usize::from(view["error"].is_string());
    }
    Ok((done, failed))
}

/// Envoy with one listener of `n` filter chains (one per name, each its own certificate, inline
/// SDS secrets): its RSS, how long it took to serve, and the listener's size as JSON.
async fn chain_per_name(work: &std::path::Path, n: usize) -> Result<(f64, f64, usize)> {
    let ca = Ca::new("chains CA")?;
    let mut secrets = Vec::with_capacity(n);
    let mut chains = Vec::with_capacity(n);
    for i in 0..n {
        let leaf = ca.issue(&LeafSpec::server(&[&name(i)]))?;
        secrets.push(serde_json::json!({ "name": name(i), "tls_certificate": {
            "certificate_chain": { "inline_string": leaf.cert_pem },
            "private_key": { "inline_string": leaf.key_pem } } }));
        chains.push(serde_json::json!({
            "filter_chain_match": { "server_names": [name(i)] },
            "transport_socket": { "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": { "tls_certificate_sds_secret_configs": [{ "name": name(i) }] } } },
            "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "chains",
                "http_filters": [{ "name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }],
                "route_config": { "virtual_hosts": [{ "name": "all", "domains": ["*"], "routes": [
                    { "match": { "prefix": "/" }, "direct_response": { "status": 200 } }] }] } } }]
        }));
    }
    let listener = serde_json::json!({ "name": "chains",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "listener_filters": [{ "name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" } }],
        "filter_chains": chains });
    let listener_bytes = listener.to_string().len();
    // YAML, whose flow style is JSON, for the harness's admin port.
    let resources = serde_json::json!({ "listeners": [listener], "secrets": secrets });
    let yaml = format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: 9901 }}\nstatic_resources: {resources}\n"
    );
    let dir = work.join("chains");
    std::fs::create_dir_all(&dir)?;
    let config = Config { name: "chains".into(), yaml };
    let options =
        Options { concurrency: 1, log_level: "warning", ready_within: Duration::from_secs(600), ..Options::default() };
    let started = Instant::now();
    let envoy = Envoy::start_with(&config, options).await?;
    envoy.listener("chains").await?;
    let start_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((rss_mib(envoy.pid()), start_s, listener_bytes))
}

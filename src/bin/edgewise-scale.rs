//! `make bench`, serverless at platform scale: envoy/serverless-xds.yaml fed by edgewise-control
//! with 10,000 customer clusters (each its own CA) and 100,000 functions, against the same with
//! 10 customers and 100 functions, side by side on one machine:
//! - Envoy's RSS and start (all clusters warm), and edgewise-control's RSS;
//! - the time from a REST change (a new customer and function; a new function of an existing
//!   customer) to the first request the function answers;
//! - Envoy's CPU per request to a function, in 1-second wrk bursts that alternate between the two.
//!
//! Environment: SCALE_CUSTOMERS (default 10000), SCALE_FUNCTIONS (default 100000),
//! SCALE_ROTATIONS (default 8), BENCH_OUT_SCALE (default bench/results-scale.md).

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgewise::client::Client;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy, Options};
use edgewise::scale::{burst, env_usize, function, label, median, rss_mib, seeded_plane, taskset, DOMAIN, HOT_SAN};
use edgewise::scenarios::serverless::{ports, Pki};
use edgewise::server::Server;

/// The shipped YAML's deferred creation of cluster stats, taken out for the comparison.
const DEFERRED_STATS: &str = "deferred_stat_options:\n  enable_deferred_creation_stats: true\n";

/// One installation: its PKI, edgewise-control on a seeded store, Envoy on the shipped YAML.
struct Install {
    name: String,
    pki: Pki,
    control: ControlService,
    envoy: Envoy,
    front: std::net::SocketAddr,
    ready_s: f64,
    gateway: u16,
    customers: usize,
    functions: usize,
}

impl Install {
    /// `on_demand`: clusters by on-demand CDS (the on_demand filter) instead of all of them;
    /// `stats_at_start`: without the shipped deferred creation of cluster stats.
    async fn start(
        name: &str,
        work: &Path,
        customers: usize,
        functions: usize,
        on_demand: bool,
        stats_at_start: bool,
    ) -> Result<(Install, Server)> {
        let (dir, pki, gateway, db) = seeded_plane(work, name, customers, functions).await?;
        let binary = std::env::current_exe()?.with_file_name("edgewise-control");
        let control = ControlService::start(&binary, &dir, &db, (0, 0, 0), &[]).await?;
        taskset(control.pid(), 1)?;
        let config = Config::shipped(if on_demand { "serverless-odcds" } else { "serverless-xds" })
            .run_dir(&dir)
            .port(ports::FRONT, 0)
            .port(control::GRPC_PORT, control.grpc)
            .port(control::ROUTES_PORT, control.routes_port());
        let config = if stats_at_start { config.replace(DEFERRED_STATS, "") } else { config };
        let started = Instant::now();
        let options = Options { concurrency: 1, log_level: "warning", cpu: Some(0), ..Options::default() };
        let envoy = Envoy::start_with(&config, options).await?;
        let front = envoy.listener("serverless_https").await?;
        let install = Install {
            name: name.into(),
            pki,
            control,
            envoy,
            front,
            ready_s: 0.0,
            gateway: gateway.port(),
            customers,
            functions,
        };
        // Ready: every cluster warm, and the route table in force (a function of the last ones,
        // of a reachable customer).
        let wanted = if on_demand { 2 } else { customers as u64 + 2 };
        install
            .envoy
            .wait_stat("every cluster warm", Duration::from_secs(600), |s| {
                s.get("cluster_manager.active_clusters").is_some_and(|n| *n >= wanted)
                    && s.get("cluster_manager.warming_clusters") == Some(&0)
            })
            .await?;
        install.until_ok(&format!("{}.{DOMAIN}", label(functions - customers)), Duration::from_secs(300)).await?;
        Ok((Install { ready_s: started.elapsed().as_secs_f64(), ..install }, gateway))
    }

    fn client(&self) -> Result<Client> {
        Ok(self.pki.front_client(false)?.sni(&format!("x.{DOMAIN}")))
    }

    async fn until_ok(&self, host: &str, limit: Duration) -> Result<Duration> {
        let client = self.client()?;
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(self.front, host, "/").await {
                if r.status == 200 {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > limit {
                bail!("{}: {host} did not answer within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The time from the API calls to the first answer, for a new customer and its function
    /// (`with_customer`) or a new function of a customer Envoy has.
    async fn change_to_traffic(&self, k: usize, with_customer: bool) -> Result<f64> {
        let i = self.functions + k;
        let customer = if with_customer { format!("new{k}") } else { "c00000".to_string() };
        let f = function(i, &customer);
        let start = Instant::now();
        if with_customer {
            self.control.put_customer(&customer, self.gateway, &[&self.pki.customer_a_ca], HOT_SAN).await?;
        }
        self.control.put_function(&format!("f{i}"), &label(i), &customer, &f.host).await?;
        self.until_ok(&format!("{}.{DOMAIN}", label(i)), Duration::from_secs(120)).await?;
        Ok(start.elapsed().as_secs_f64())
    }
}

/// The clusters Envoy has (static ones included).
async fn clusters_of(install: &Install) -> usize {
    let text = install.envoy.admin_get("/clusters").await.unwrap_or_default();
    text.lines().filter(|l| l.contains("::cx_active::")).count()
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers = env_usize("SCALE_CUSTOMERS", 10_000);
    let functions = env_usize("SCALE_FUNCTIONS", 100_000);
    let rotations = env_usize("SCALE_ROTATIONS", 8);
    let work = edgewise::repo_root().join("target/scale");
    taskset(Some(std::process::id()), 1)?;

    let mut installs = Vec::new();
    let mut gateways = Vec::new();
    for (name, c, f, on_demand, stats_at_start) in [
        ("10 clusters", 10, 100, false, false),
        ("all clusters", customers, functions, false, false),
        ("on-demand CDS", customers, functions, true, false),
        ("all clusters (stats created at start)", customers, functions, false, true),
    ] {
        let (install, gateway) = Install::start(name, &work, c, f, on_demand, stats_at_start).await?;
        eprintln!("{name}: ready in {:.1} s", install.ready_s);
        installs.push(install);
        gateways.push(gateway);
    }
    let rss = |i: &Install| (rss_mib(i.envoy.pid()), i.control.pid().map_or(0.0, rss_mib));
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |label: &str, cells: Vec<String>| rows.push([vec![label.to_string()], cells].concat());
    let mut clusters = Vec::new();
    for i in &installs {
        clusters.push(clusters_of(i).await);
    }
    row(
        "customers / functions (clusters in Envoy)",
        installs.iter().zip(&clusters).map(|(i, c)| format!("{} / {} ({c})", i.customers, i.functions)).collect(),
    );
    row(
        "Envoy start to serving (clusters warm, table in force)",
        installs.iter().map(|i| format!("{:.1} s", i.ready_s)).collect(),
    );
    let ready_rss: Vec<(f64, f64)> = installs.iter().map(rss).collect();
    row("Envoy RSS when serving", ready_rss.iter().map(|r| format!("{:.0} MiB", r.0)).collect());
    row("edgewise-control RSS", ready_rss.iter().map(|r| format!("{:.0} MiB", r.1)).collect());

    // The first request to each hot customer: with on-demand CDS, the one that fetches its cluster.
    let mut first = Vec::new();
    for i in &installs {
        let mut times = Vec::new();
        for c in 1..10.min(i.customers) {
            let host = format!("{}.{DOMAIN}", label(c));
            times.push(i.until_ok(&host, Duration::from_secs(30)).await?.as_secs_f64() * 1000.0);
        }
        first.push(format!("{:.1} ms (max {:.1})", median(times.clone()), times.iter().copied().fold(0.0, f64::max)));
    }
    row("first request to a customer (median of 9)", first);
    row("Envoy RSS after 10 customers served", installs.iter().map(|i| format!("{:.0} MiB", rss(i).0)).collect());

    // CPU per request, 1-second bursts rotating between the installations.
    let host = format!("{}.{DOMAIN}", label(0));
    let mut us: Vec<Vec<f64>> = vec![Vec::new(); installs.len()];
    for _ in 0..rotations {
        for (i, install) in installs.iter().enumerate() {
            let tls = install.client()?.tls_config().context("the front's TLS")?;
            us[i].push(burst(install.envoy.pid(), install.front, tls, &format!("x.{DOMAIN}"), &host).await?);
        }
    }
    let base = us[0].clone();
    row(
        &format!("Envoy CPU per request (median of {rotations} rotating 1-s bursts; over 10 clusters)"),
        us.iter()
            .map(|u| {
                let ratios: Vec<f64> = u.iter().zip(&base).map(|(x, b)| x / b).collect();
                format!("{:.1} µs ({:.2})", median(u.clone()), median(ratios))
            })
            .collect(),
    );

    // REST change to traffic, 5 of each kind.
    for with_customer in [true, false] {
        let mut cells = Vec::new();
        for install in &installs {
            let mut times = Vec::new();
            for k in 0..5 {
                times.push(install.change_to_traffic(k + if with_customer { 0 } else { 100 }, with_customer).await?);
            }
            eprintln!("{} {}: {times:?}", install.name, if with_customer { "customer+function" } else { "function" });
            cells.push(format!(
                "{:.2} s (max {:.2})",
                median(times.clone()),
                times.iter().copied().fold(0.0, f64::max)
            ));
        }
        let what = if with_customer { "a new customer and its function" } else { "a new function of a customer" };
        row(&format!("REST change to traffic: {what} (median of 5)"), cells);
    }
    row("Envoy RSS at the end", installs.iter().map(|i| format!("{:.0} MiB", rss(i).0)).collect());
    let mut fetches = Vec::new();
    for i in &installs {
        let stats = i.envoy.stats().await?;
        let stat = |r: &str| {
            stats
                .get(&edgewise::envoy::stat(&format!("edgewise.serverless.management_fetch.{r}")))
                .copied()
                .unwrap_or(0)
        };
        fetches.push(format!("{} / {} / {}", stat("ok"), stat("not_modified"), stat("failed")));
    }
    row("the filter's route table calls: pages and changes / not modified / failed", fetches);

    // The same tables in both: the difference is the clusters.
    let per_cluster_kib =
        (ready_rss[1].0 - ready_rss[2].0) * 1024.0 / clusters[1].saturating_sub(clusters[2]).max(1) as f64;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Serverless at platform scale\n\n\
         Produced by `make bench` (`edgewise-scale`): envoy/serverless-xds.yaml (wasm build, `--concurrency 1` on CPU 0) fed by \
         edgewise-control (delta xDS; the filter loads the route table in pages and watches it), each customer its own CA. \
         \"on-demand CDS\" is envoy/serverless-odcds.yaml: the same without the wildcard cluster subscription and with Envoy's on_demand filter, \
         which fetches a customer's cluster when a request first needs it; \"stats created at start\" is serverless-xds.yaml \
         without its deferred creation of cluster stats. The customers' gateway (an HTTP/2 mTLS echo), wrk and \
         edgewise-control run on CPU 1; the installations run side by side.\n"
    );
    let _ = writeln!(report, "| | {} |", installs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(report, "|---|{}", "---:|".repeat(installs.len()));
    for r in &rows {
        let _ = writeln!(report, "| {} |", r.join(" | "));
    }
    let _ = writeln!(report, "\nEnvoy memory per customer cluster (its CA and TLS context included; all clusters against on-demand CDS when serving): {per_cluster_kib:.0} KiB.");
    let deferred_kib = (ready_rss[3].0 - ready_rss[1].0) * 1024.0 / clusters[1].max(1) as f64;
    let _ = writeln!(
        report,
        "Deferred creation of cluster stats (shipped: `deferred_stat_options`) saves {deferred_kib:.0} KiB per cluster \
         and {:.1} s of start at {} clusters (\"all clusters\" against \"stats created at start\").",
        installs[3].ready_s - installs[1].ready_s,
        clusters[1]
    );
    let out = std::env::var("BENCH_OUT_SCALE").unwrap_or_else(|_| "bench/results-scale.md".into());
    std::fs::write(edgewise::repo_root().join(out), &report)?;
    println!("{report}");
    Ok(())
}

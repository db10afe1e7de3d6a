//! `make bench`, serverless for fleets: edgewise-control with 100,000 customers and 1,000,000
//! functions, Envoys on envoy/serverless-odcds.yaml (clusters on demand) of both builds, 100
//! simulated watchers of the route table (plain HTTPS clients, not Envoys) and a steady stream of
//! changes. Measured against the targets of the fleet issue:
//! - change to traffic on both Envoys (p50, p99), and the bytes each watcher receives per change;
//! - Envoy RSS added by the 1,000,000-route table (against the same Envoy fed 10 routes) per
//!   build and `--concurrency`;
//! - Envoy CPU per request with 1,000,000 routes against 10, in rotating wrk bursts;
//! - edgewise-control's RSS and CPU per change, with the watchers asking once per change (as
//!   proxy-wasm Envoys do) and then streaming (as native ones do), and beside them the kernel's
//!   floors for the same fan-out (the same writes to as many loopback connections, nothing
//!   above) and for a durable write;
//! - Envoy start to serving (listener up; table in force; first request routed).
//!
//! Environment: FLEET_CUSTOMERS (100000), FLEET_FUNCTIONS (1000000), FLEET_WATCHERS (100),
//! FLEET_CHANGES (200), FLEET_ROTATIONS (6), BENCH_OUT_FLEET (bench/results-fleet.md);
//! FLEET_PRELOAD: a library the big plane's Envoys preload (bench/heap-history/).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgewise::client::Client;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Build, Config, Envoy, Options};
use edgewise::scale::DOMAIN;
use edgewise::scale::{burst, cpu_ticks, env_usize, function, label, median, quantile, rss_mib};
use edgewise::scale::{seeded_plane, sync_floor, taskset, Kept};
use edgewise::scenarios::serverless::{ports, Pki};
use edgewise::server::Server;
use edgewise::watchers::{send_floor, Received, Watchers, Watching};
use edgewise_control::ROUTES_PATH;

/// One control plane: its PKI, the customers' gateway, edgewise-control on a seeded store.
struct Plane {
    dir: PathBuf,
    pki: Pki,
    _gateway: Server,
    control: ControlService,
    functions: usize,
    /// The host of the first route of the table's first page: the first load brings it first.
    first_page_host: String,
    /// A library its Envoys preload (`FLEET_PRELOAD`, for the big plane: bench/heap-history/).
    preload: Option<String>,
}

impl Plane {
    async fn start(work: &Path, name: &str, customers: usize, functions: usize) -> Result<Plane> {
        let (dir, pki, gateway, db) = seeded_plane(work, name, customers, functions).await?;
        let binary = std::env::current_exe()?.with_file_name("edgewise-control");
        let started = Instant::now();
        let control = ControlService::start(&binary, &dir, &db, (0, 0, 0), &[]).await?;
        eprintln!("{name}: edgewise-control ready in {:.1} s", started.elapsed().as_secs_f64());
        taskset(control.pid(), 1)?;
        let (status, page) = control.routes_get(&pki.control_ca, &format!("{ROUTES_PATH}?limit=1")).await?;
        let page: serde_json::Value = serde_json::from_str(&page).with_context(|| format!("{status}: {page}"))?;
        let m = &page["routes"][0]["match"];
        let label = ["project", "environment", "function"].map(|g| m[g].as_str().unwrap_or_default().to_string());
        let first_page_host = format!("{}.{DOMAIN}", label.join("-"));
        Ok(Plane { dir, pki, _gateway: gateway, control, functions, first_page_host, preload: None })
    }

    fn client(&self) -> Result<Client> {
        Ok(self.pki.front_client(false)?.sni(&format!("x.{DOMAIN}")))
    }
}

/// An Envoy of one build on a plane, and how long it took to serve.
struct Gateway {
    envoy: Envoy,
    front: SocketAddr,
    client: Client,
    build: Build,
    listener_s: f64,
    table_s: f64,
    routed_s: f64,
}

impl Gateway {
    async fn start(plane: &Plane, build: Build, concurrency: u32) -> Result<Gateway> {
        let config = Config::shipped_as("serverless-odcds", build)
            .run_dir(&plane.dir)
            .port(ports::FRONT, 0)
            .port(control::GRPC_PORT, plane.control.grpc)
            .port(control::ROUTES_PORT, plane.control.routes_port());
        let started = Instant::now();
        let options = Options {
            concurrency,
            log_level: "warning",
            cpu: Some(0),
            ready_within: Duration::from_secs(120),
            env: plane.preload.iter().map(|p| ("LD_PRELOAD".to_string(), p.clone())).collect(),
            ..Options::default()
        };
        let envoy = Envoy::start_with(&config, options).await?;
        let front = envoy.listener("serverless_https").await?;
        let listener_s = started.elapsed().as_secs_f64();
        let client = plane.client()?;
        let g = Gateway { envoy, front, client, build, listener_s, table_s: 0.0, routed_s: 0.0 };
        g.until_found(&plane.first_page_host, Duration::from_secs(60)).await?;
        let routed_s = started.elapsed().as_secs_f64();
        let routes = build.stat("edgewise.serverless.table.routes");
        let want = plane.functions as u64;
        g.envoy
            .wait_stat("the route table in force", Duration::from_secs(600), |s| s.get(&routes) >= Some(&want))
            .await?;
        Ok(Gateway { routed_s, table_s: started.elapsed().as_secs_f64(), ..g })
    }

    /// A kept-alive connection to the front, with an SNI of the platform's names.
    fn kept(&self) -> Result<Kept> {
        Kept::new(self.front, self.client.tls_config().context("the front's TLS")?, &format!("x.{DOMAIN}"))
    }

    /// Envoy's CPU per request in a 1-second burst at `host`, in µs.
    async fn burst(&self, host: &str) -> Result<f64> {
        let tls = self.client.tls_config().context("the front's TLS")?;
        burst(self.envoy.pid(), self.front, tls, &format!("x.{DOMAIN}"), host).await
    }

    /// Until `host` is found in the route table: any answer but 404 or 503
    /// `route_table_unavailable` (its customer's gateway may not answer: only ten do).
    async fn until_found(&self, host: &str, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.client.get(self.front, host, "/").await {
                let loading = r.status == 503 && String::from_utf8_lossy(&r.body).contains("route_table_unavailable");
                if r.status != 404 && !loading {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > limit {
                bail!("{:?}: {host} did not answer within {limit:?}", self.build);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn rss(&self) -> f64 {
        rss_mib(self.envoy.pid())
    }
}

fn host(i: usize) -> String {
    format!("{}.{DOMAIN}", label(i))
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers = env_usize("FLEET_CUSTOMERS", 100_000);
    let functions = env_usize("FLEET_FUNCTIONS", 1_000_000);
    let watchers = env_usize("FLEET_WATCHERS", 100);
    let changes = env_usize("FLEET_CHANGES", 200);
    let rotations = env_usize("FLEET_ROTATIONS", 6);
    let work = edgewise::repo_root().join("target/fleet");
    taskset(Some(std::process::id()), 1)?;
    let mut report = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        let _ = writeln!(report, "{s}");
    };

    let big = Plane {
        preload: std::env::var("FLEET_PRELOAD").ok(),
        ..Plane::start(&work, "big", customers, functions).await?
    };
    let small = Plane::start(&work, "small", 10, 10).await?;
    let control_pid = big.control.pid().context("edgewise-control's pid")?;
    line(format!(
        "| edgewise-control RSS, {customers} customers and {functions} functions, started | {:.0} MiB |",
        rss_mib(control_pid)
    ));

    // The route table's memory, per build and --concurrency: the same Envoy fed 1,000,000
    // routes and 10, one after the other.
    let mut kept = Vec::new();
    for (build, concurrency) in
        [(Build::Native, 1), (Build::Native, 8), (Build::Wasm, 1), (Build::Wasm, 2), (Build::Wasm, 4), (Build::Wasm, 8)]
    {
        let fed = Gateway::start(&big, build, concurrency).await?;
        let bare = Gateway::start(&small, build, concurrency).await?;
        let (with, without) = (fed.rss(), bare.rss());
        line(format!(
            "| {build:?}, --concurrency {concurrency}: Envoy RSS added by the {functions}-route table | {:.0} MiB ({:.0} against {:.0}; {:.0} bytes a route) |",
            with - without,
            with,
            without,
            (with - without) * 1048576.0 / functions as f64
        ));
        line(format!(
            "| {build:?}, --concurrency {concurrency}: Envoy start to listener / first function routed (first page) / whole table in force | {:.2} s / {:.2} s / {:.2} s |",
            fed.listener_s, fed.routed_s, fed.table_s
        ));
        if concurrency == 1 {
            kept.push((fed, bare));
        }
    }
    line(format!("| edgewise-control RSS after {} full loads | {:.0} MiB |", 6, rss_mib(control_pid)));

    // CPU per request: 1,000,000 routes against 10, rotating 1-second bursts.
    for (fed, bare) in &kept {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rotations {
            a.push(fed.burst(&host(0)).await?);
            b.push(bare.burst(&host(0)).await?);
        }
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x / y).collect();
        line(format!(
            "| {:?}: Envoy CPU per request, {functions} routes against 10 (median of {rotations} rotating 1-s bursts) | {:.1} µs against {:.1} µs (ratio {:.2}, from {:.2} to {:.2}) |",
            fed.build,
            median(a),
            median(b),
            median(ratios.clone()),
            ratios.iter().copied().fold(f64::MAX, f64::min),
            ratios.iter().copied().fold(0.0, f64::max)
        ));
    }
    let gateways: Vec<&Gateway> = kept.iter().map(|(fed, _)| fed).collect();

    // A steady stream of changes (a new function of a customer every 100 ms), first with the two
    // Envoys alone, then with the watchers beside: the difference is what serving them costs.
    let quiet = (changes / 2).max(1);
    let alone = stream_changes(&big, &gateways, functions, quiet, None).await?;
    line(format!(
        "| edgewise-control CPU per change, the 2 Envoys alone (REST, store, 2 watches; {quiet} changes) | {:.2} ms |",
        alone.cpu_ms
    ));
    // The watchers as proxy-wasm Envoys watch (a call per change), then as native ones do (one
    // streamed answer each).
    let mut first = functions + quiet;
    let mut streamed = (0.0, 0.0);
    for watching in [Watching::Calls, Watching::Stream] {
        let watching_now = Watchers::spawn(|_| big.control.routes_port(), &big.pki.control_ca, watchers, watching)?;
        let (got, epoch) = (&watching_now.got, watching_now.epoch());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (bytes0, changes0) = (got.bytes.load(Relaxed), got.changes.load(Relaxed));
        let Changes { latencies, in_force, rest, to_watchers, cpu_ms } =
            stream_changes(&big, &gateways, first, changes, Some((got, epoch))).await?;
        first += changes;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (bytes, received) = (got.bytes.load(Relaxed) - bytes0, got.changes.load(Relaxed) - changes0);
        let line_bytes = bytes as f64 / received.max(1) as f64;
        let how = match watching {
            Watching::Calls => format!("{watchers} watchers asking once per change (as proxy-wasm Envoys)"),
            Watching::Stream => format!("{watchers} watchers streaming (as native Envoys)"),
        };
        for ((g, l), f) in gateways.iter().zip(&latencies).zip(&in_force) {
            line(format!(
                "| {:?}: change to traffic, from the REST call to the first 200 (p50 / p99 / max of {changes}; {how}) | {:.1} / {:.1} / {:.1} ms |",
                g.build,
                quantile(l.clone(), 0.5),
                quantile(l.clone(), 0.99),
                l.iter().copied().fold(0.0, f64::max)
            ));
            line(format!(
                "| {:?}: change to the route in force (the request that found it, when sent; its answer waits for a new upstream connection, the function's own SNI) (p50 / p99; {how}) | {:.1} / {:.1} ms |",
                g.build,
                quantile(f.clone(), 0.5),
                quantile(f.clone(), 0.99),
            ));
        }
        line(format!(
            "| change to the last of the {how}, from the REST call (p50 / p99) | {:.1} / {:.1} ms |",
            quantile(to_watchers.clone(), 0.5),
            quantile(to_watchers, 0.99)
        ));
        line(format!(
            "| the REST call itself ({how}) (p50 / p99) | {:.1} / {:.1} ms |",
            quantile(rest.clone(), 0.5),
            quantile(rest, 0.99)
        ));
        line(format!(
            "| bytes a watcher received per change ({how}) | {line_bytes:.0} bytes ({received} changes received by {watchers} watchers, {} errors) |",
            got.errors.load(Relaxed)
        ));
        let per_watcher = (cpu_ms - alone.cpu_ms) * 1000.0 / watchers.max(1) as f64;
        line(format!(
            "| edgewise-control CPU per change (REST, store, 2 Envoys and the {how}) | {cpu_ms:.2} ms ({per_watcher:.1} µs a watcher over the Envoys alone) |"
        ));
        if watching == Watching::Stream {
            streamed = (line_bytes, per_watcher);
        }
        drop(watching_now);
    }
    // What the kernel alone charges for a streamed change's fan-out here, in the same run: the
    // same writes with nothing above them (no TLS, no HTTP, no service).
    let (line_bytes, per_watcher) = (streamed.0.round() as usize, streamed.1);
    let floor_us = send_floor(watchers, line_bytes, changes, Duration::from_millis(100)).await?;
    line(format!(
        "| the floor: one thread on edgewise-control's CPU writing {line_bytes} bytes to each of {watchers} loopback TCP connections (plain TCP, read by tasks of the watchers' process), every 100 ms (median of {changes}) | {:.2} ms a change ({:.1} µs a connection; the streaming watchers cost the service {:.1} µs each) |",
        floor_us / 1000.0,
        floor_us / watchers.max(1) as f64,
        per_watcher
    ));
    let sync_us = sync_floor(&big.dir, changes)?;
    line(format!(
        "| the floor of a durable change: one thread writing a 4 KiB page to a file beside the store and syncing it (median of {changes}) | {sync_us:.0} µs |"
    ));
    line(format!("| edgewise-control RSS at the end | {:.0} MiB |", rss_mib(control_pid)));
    drop(small);

    let out = std::env::var("BENCH_OUT_FLEET").unwrap_or_else(|_| "bench/results-fleet.md".into());
    let text = format!(
        "# Serverless for fleets\n\nProduced by `make bench` (`edgewise-fleet`): edgewise-control (SQLite) with {customers} \
         customers and {functions} functions; Envoys on envoy/serverless-odcds.yaml (on CPU 0), edgewise-control, wrk \
         and the watchers on CPU 1.\n\n| | |\n|---|---|\n{report}"
    );
    std::fs::write(edgewise::repo_root().join(out), text)?;
    Ok(())
}

/// What a stream of changes measured: per gateway, change to traffic (ms); the REST calls (ms);
/// change to the last watcher (ms); edgewise-control's CPU per change (ms).
struct Changes {
    latencies: Vec<Vec<f64>>,
    /// Per gateway, change to the sending of the first request that found the route (ms).
    in_force: Vec<Vec<f64>>,
    rest: Vec<f64>,
    to_watchers: Vec<f64>,
    cpu_ms: f64,
}

/// `count` new functions, from function `first` on, one every 100 ms, each followed until every
/// gateway routes it.
async fn stream_changes(
    plane: &Plane,
    gateways: &[&Gateway],
    first: usize,
    count: usize,
    watchers: Option<(&Received, Instant)>,
) -> Result<Changes> {
    let control_pid = plane.control.pid().context("edgewise-control's pid")?;
    let cpu0 = cpu_ticks(control_pid)?;
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); gateways.len()];
    let mut in_force: Vec<Vec<f64>> = vec![Vec::new(); gateways.len()];
    let (mut rest, mut to_watchers) = (Vec::new(), Vec::new());
    let mut probes = gateways.iter().map(|g| g.kept()).collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    for k in 0..count {
        let due = started + Duration::from_millis(100 * k as u64);
        tokio::time::sleep_until(due.into()).await;
        let i = first + k;
        let f = function(i, "c00000");
        let t0 = Instant::now();
        plane.control.put_function(&format!("f{i}"), &label(i), "c00000", &f.host).await?;
        rest.push(t0.elapsed().as_secs_f64() * 1000.0);
        let seen = until_routed(&mut probes, &host(i)).await?;
        if let Some((got, epoch)) = watchers {
            let last = Duration::from_micros(got.last_change_us.load(Relaxed));
            to_watchers.push((last.saturating_sub(t0 - epoch)).as_secs_f64() * 1000.0);
        }
        for ((l, f), (sent, answered)) in latencies.iter_mut().zip(&mut in_force).zip(seen) {
            l.push((t0.elapsed() - answered).as_secs_f64() * 1000.0);
            f.push((t0.elapsed().saturating_sub(sent)).as_secs_f64() * 1000.0);
        }
    }
    let cpu_ms = (cpu_ticks(control_pid)? - cpu0) as f64 * 10.0 / count as f64;
    Ok(Changes { latencies, in_force, rest, to_watchers, cpu_ms })
}

/// Requests `host` through every probe until each answers 200; for each, how long ago (from
/// now) that request was sent and was answered.
async fn until_routed(probes: &mut Vec<Kept>, host: &str) -> Result<Vec<(Duration, Duration)>> {
    let mut waits = Vec::new();
    for mut probe in probes.drain(..) {
        let host = host.to_string();
        waits.push(tokio::spawn(async move {
            let start = Instant::now();
            loop {
                let sent = Instant::now();
                if probe.status(&host).await == 200 {
                    return Ok((probe, (sent, Instant::now())));
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("{host} not routed within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let mut ago = Vec::new();
    for w in waits {
        let (probe, (sent, at)): (Kept, (Instant, Instant)) = w.await??;
        probes.push(probe);
        ago.push((sent.elapsed(), at.elapsed()));
    }
    Ok(ago)
}

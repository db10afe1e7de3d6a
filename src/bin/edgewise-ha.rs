//! `make bench`, edgewise-control highly available: three replicas on a three-member etcd cluster
//! against one replica on SQLite, both holding HA_CUSTOMERS (10,000) customers and HA_FUNCTIONS
//! (1,000,000) functions, each with an Envoy on envoy/serverless-odcds.yaml (wasm build) holding
//! the whole route table:
//! - change throughput: HA_WRITERS (16) REST clients adding functions for HA_SECONDS (10) s
//!   (on etcd, spread over the replicas);
//! - change to traffic: a new function, from its REST call to its first answer through Envoy
//!   (HA_CHANGES (30) in turn; p50, p99);
//! - failover: kill -9 a replica, a change through another one at once, and the time from the
//!   kill to that change answering through Envoy (each replica in turn);
//! - a replica's start (loading the million) and its RSS;
//! - CPU per change with HA_WATCHERS (100) watchers streaming the route table (as native Envoys
//!   do), spread over the replicas, and a change every 100 ms (HA_CPU_CHANGES, 200), through the
//!   first replica: each replica's CPU and, on etcd, each member's.
//!
//! Environment: the above, and BENCH_OUT_HA (default bench/results-ha.md).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use edgewise::client::Client;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Config, Envoy, Options};
use edgewise::etcd::EtcdCluster;
use edgewise::scale::{cpu_ticks, env_usize, function, label, median, plane, quantile, rss_mib, seeded_plane, DOMAIN};
use edgewise::scenarios::serverless::{ports, Pki};
use edgewise::server::Server;
use edgewise::service::Service;
use edgewise::watchers::{Watchers, Watching};

/// A process's CPU per change, and in as long with no change (ms).
struct Cpu {
    replica: bool,
    change: f64,
    idle: f64,
}

/// One control plane and the Envoy it feeds.
struct Plane {
    name: &'static str,
    pki: Pki,
    _gateway: Server,
    replicas: Vec<ControlService>,
    /// How long each replica took to be ready (the store loaded).
    starts: Vec<f64>,
    etcd: Option<EtcdCluster>,
    envoy: Envoy,
    front: SocketAddr,
    client: Client,
    functions: usize,
}

fn binary() -> Result<std::path::PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("edgewise-control"))
}

impl Plane {
    async fn sqlite(work: &Path, customers: usize, functions: usize) -> Result<Plane> {
        let (dir, pki, gateway, db) = seeded_plane(work, "sqlite", customers, functions).await?;
        let started = Instant::now();
        let control = ControlService::start(&binary()?, &dir, &db, (0, 0, 0), &[]).await?;
        let starts = vec![started.elapsed().as_secs_f64()];
        Plane::with_envoy("SQLite, one replica", &dir, pki, gateway, vec![control], starts, None, functions).await
    }

    async fn etcd(work: &Path, customers: usize, functions: usize) -> Result<Plane> {
        let (dir, pki, gateway) = plane(work, "etcd").await?;
        let etcd = EtcdCluster::start(&dir.join("etcd"), 3).await?;
        let started = Instant::now();
        let (all, fns) = edgewise::scale::seed_data(&pki.customer_a_ca, gateway.port(), customers, functions)?;
        let options = edgewise_control::etcd::EtcdOptions {
            endpoints: etcd.endpoints().split(',').map(String::from).collect(),
            prefix: "/edgewise/".into(),
            ca: None,
            identity: None,
            stale_after: edgewise_control::etcd::STALE_AFTER,
        };
        let seeder = edgewise_control::etcd::Shared::connect_only(&options).await.map_err(anyhow::Error::msg)?;
        seeder.seed(all, fns).await.map_err(anyhow::Error::msg)?;
        eprintln!(
            "etcd: seeded {customers} customers, {functions} functions in {:.1} s; database {:.0} MiB",
            started.elapsed().as_secs_f64(),
            etcd.db_bytes(0) as f64 / (1 << 20) as f64
        );
        let (mut replicas, mut starts) = (Vec::new(), Vec::new());
        for name in ["r0", "r1", "r2"] {
            let started = Instant::now();
            let args = control::xds_tls(&dir);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            replicas.push(
                ControlService::start_replica(&binary()?, &dir, &etcd.endpoints(), name, (0, 0, 0), &args).await?,
            );
            starts.push(started.elapsed().as_secs_f64());
        }
        Plane::with_envoy("etcd, three replicas", &dir, pki, gateway, replicas, starts, Some(etcd), functions).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn with_envoy(
        name: &'static str,
        dir: &Path,
        pki: Pki,
        gateway: Server,
        replicas: Vec<ControlService>,
        starts: Vec<f64>,
        etcd: Option<EtcdCluster>,
        functions: usize,
    ) -> Result<Plane> {
        let mut config = Config::shipped("serverless-odcds").run_dir(dir).port(ports::FRONT, 0);
        for (k, r) in replicas.iter().enumerate() {
            let k = k as u16;
            config = config.port(control::GRPC_PORT + k, r.grpc).port(control::ROUTES_PORT + k, r.routes_port());
        }
        let options = Options {
            concurrency: 1,
            log_level: "warning",
            ready_within: Duration::from_secs(120),
            ..Options::default()
        };
        let envoy = Envoy::start_with(&config, options).await?;
        let front = envoy.listener("serverless_https").await?;
        let routes = edgewise::envoy::stat("edgewise.serverless.table.routes");
        let want = functions as u64;
        envoy
            .wait_stat("the route table in force", Duration::from_secs(900), |s| s.get(&routes) >= Some(&want))
            .await?;
        let client = pki.front_client(false)?.sni(&format!("x.{DOMAIN}"));
        Ok(Plane { name, pki, _gateway: gateway, replicas, starts, etcd, envoy, front, client, functions })
    }

    /// Adds function `i` of the hot customer through replica `k`: the HTTP status.
    async fn put(&self, k: usize, i: usize) -> u16 {
        let f = function(i, "c00000");
        let body = serde_json::json!({ "match": f.matches, "customer": f.customer, "host": f.host }).to_string();
        let auth = format!("Bearer {}", control::DEMO_TOKEN);
        let port = self.replicas[k % self.replicas.len()].http;
        let path = format!("/v1/functions/f{i}");
        let answer = Service::exchange_on(port, "PUT", &path, &[("authorization", &auth)], &body).await;
        answer.map_or(0, |(status, _, _)| status)
    }

    /// Until function `i` answers through Envoy.
    async fn until_served(&self, i: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let host = format!("{}.{DOMAIN}", label(i));
        loop {
            if self.client.get(self.front, &host, "/").await.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("{}: f{i} not served within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// CPU per change (ms) of each replica and each etcd member, with `watchers` streaming the
    /// route table from the replicas in turn and `changes` new functions through the first one,
    /// one every 100 ms; and what each spends in 100 ms with no change (the same watchers, for
    /// as long).
    async fn cpu_per_change(&self, watchers: usize, changes: usize, base: usize) -> Result<Vec<Cpu>> {
        let ports: Vec<u16> = self.replicas.iter().map(|r| r.routes_port()).collect();
        let watching = Watchers::spawn(|n| ports[n % ports.len()], &self.pki.control_ca, watchers, Watching::Stream)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut pids: Vec<(bool, u32)> = self.replicas.iter().filter_map(|r| r.pid()).map(|p| (true, p)).collect();
        pids.extend(self.etcd.iter().flat_map(EtcdCluster::pids).map(|p| (false, p)));
        let ticks = || pids.iter().map(|&(_, p)| cpu_ticks(p)).collect::<Result<Vec<_>>>();
        let period = Duration::from_millis(100);
        let quiet = ticks()?;
        tokio::time::sleep(period * changes as u32).await;
        let before = ticks()?;
        let started = Instant::now();
        for c in 0..changes {
            tokio::time::sleep_until((started + period * c as u32).into()).await;
            let status = self.put(0, base + c).await;
            if status != 201 {
                bail!("{}: f{}: {status}", self.name, base + c);
            }
        }
        tokio::time::sleep(period).await;
        let after = ticks()?;
        let received = watching.got.changes.load(std::sync::atomic::Ordering::Relaxed);
        let errors = watching.got.errors.load(std::sync::atomic::Ordering::Relaxed);
        if errors > 0 || received < (watchers * changes) as u64 {
            bail!("{}: the watchers received {received} of {} changes, {errors} errors", self.name, watchers * changes);
        }
        let ms = |from: u64, to: u64| (to - from) as f64 * 10.0 / changes as f64;
        Ok((0..pids.len())
            .map(|k| Cpu { replica: pids[k].0, change: ms(before[k], after[k]), idle: ms(quiet[k], before[k]) })
            .collect())
    }

    /// `writers` clients adding functions for `seconds`: (acknowledged, refused).
    async fn throughput(&self, writers: usize, seconds: u64, base: usize) -> (usize, usize) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks = (0..writers).map(|w| async move {
            let (mut ok, mut refused, mut n) = (0, 0, 0);
            while Instant::now() < deadline {
                if self.put(w, base + w * 100_000 + n).await == 201 {
                    ok += 1;
                } else {
                    refused += 1;
                }
                n += 1;
            }
            (ok, refused)
        });
        futures_util::future::join_all(tasks).await.into_iter().fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers = env_usize("HA_CUSTOMERS", 10_000);
    let functions = env_usize("HA_FUNCTIONS", 1_000_000);
    let writers = env_usize("HA_WRITERS", 16);
    let seconds = env_usize("HA_SECONDS", 10) as u64;
    let changes = env_usize("HA_CHANGES", 30);
    let watchers = env_usize("HA_WATCHERS", 100);
    let cpu_changes = env_usize("HA_CPU_CHANGES", 200);
    let work = edgewise::repo_root().join("target/ha");
    let mut out = String::new();
    let mut rows = Vec::new();
    let mut failovers = Vec::new();
    let mut db_mib = 0.0;
    let mut cpus = Vec::new();

    for which in ["sqlite", "etcd"] {
        let mut plane = if which == "sqlite" {
            Plane::sqlite(&work, customers, functions).await?
        } else {
            Plane::etcd(&work, customers, functions).await?
        };
        eprintln!("{}: ready, replicas in {:?} s", plane.name, plane.starts);
        let rss: Vec<f64> = plane.replicas.iter().filter_map(|r| r.pid()).map(rss_mib).collect();
        let started = Instant::now();
        let (ok, refused) = plane.throughput(writers, seconds, 10_000_000).await;
        let per_s = ok as f64 / started.elapsed().as_secs_f64();
        eprintln!("{}: {ok} changes acknowledged ({refused} refused) in {seconds} s: {per_s:.0}/s", plane.name);
        let mut to_traffic = Vec::new();
        for c in 0..changes {
            let i = 20_000_000 + c;
            let start = Instant::now();
            let status = plane.put(c, i).await;
            if status != 201 {
                bail!("{}: f{i}: {status}", plane.name);
            }
            plane.until_served(i, Duration::from_secs(60)).await?;
            to_traffic.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let (p50, p99) = (median(to_traffic.clone()), quantile(to_traffic, 0.99));
        eprintln!("{}: change to traffic p50 {p50:.0} ms, p99 {p99:.0} ms", plane.name);
        let cpu = plane.cpu_per_change(watchers, cpu_changes, 25_000_000).await?;
        for c in &cpu {
            let what = if c.replica { "replica" } else { "etcd member" };
            eprintln!("{}: {what}: CPU per change {:.2} ms, {:.2} ms idle", plane.name, c.change, c.idle);
        }
        cpus.push((plane.name, cpu));
        if plane.etcd.is_some() {
            for victim in 0..plane.replicas.len() {
                let i = 30_000_000 + victim;
                plane.replicas[victim].kill().await?;
                let killed = Instant::now();
                let mut status = 0;
                for _ in 0..100 {
                    status = plane.put(victim + 1, i).await;
                    if status == 201 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if status != 201 {
                    bail!("etcd: f{i} refused ({status}) after the kill of replica {victim}");
                }
                plane.until_served(i, Duration::from_secs(60)).await?;
                let took = killed.elapsed().as_secs_f64() * 1000.0;
                let restarted = Instant::now();
                plane.replicas[victim].start_again().await?;
                plane.replicas[victim].ready(Duration::from_secs(600)).await?;
                let again = restarted.elapsed().as_secs_f64();
                eprintln!("etcd: replica {victim} killed: a change served in {took:.0} ms; back in {again:.1} s");
                failovers.push((victim, took, again));
            }
        }
        if let Some(etcd) = &plane.etcd {
            db_mib = etcd.db_bytes(0) as f64 / (1 << 20) as f64;
        }
        rows.push((plane.name, plane.functions, plane.starts.clone(), rss, ok, refused, per_s, p50, p99));
        drop(plane.envoy);
        if let Some(etcd) = plane.etcd.as_mut() {
            etcd.stop().await;
        }
    }

    writeln!(
        out,
        "# edgewise-control highly available: etcd against SQLite\n\n\
         Produced by `make bench` (`edgewise-ha`): {customers} customers and {functions} functions in each store; \
         a three-member etcd cluster (Debian's etcd 3.4, three processes on this machine, one disk) and three \
         edgewise-control replicas, against one replica on SQLite; an Envoy (envoy/serverless-odcds.yaml, wasm \
         build, `--concurrency 1`) on each, holding the whole table. Throughput: {writers} REST clients adding \
         functions for {seconds} s (on etcd, spread over the replicas). Change to traffic: {changes} new functions \
         one after another, from the REST call to the first answer through Envoy. This VM's speed swings: compare \
         the two columns of one run.\n"
    )?;
    writeln!(out, "| store | functions | replica ready (s) | replica RSS (MiB) | changes/s | refused | change to traffic p50 / p99 (ms) |")?;
    writeln!(out, "|---|---:|---|---|---:|---:|---|")?;
    for (name, functions, starts, rss, _ok, refused, per_s, p50, p99) in &rows {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
        writeln!(
            out,
            "| {name} | {functions} | {} | {} | {per_s:.0} | {refused} | {p50:.0} / {p99:.0} |",
            list(starts),
            list(rss)
        )?;
    }
    writeln!(out, "\netcd's database file at the end of the run: {db_mib:.0} MiB per member (no compaction).")?;
    writeln!(
        out,
        "\nFailover: kill -9 one replica, then at once a new function through another one; the time from the \
         kill to its first answer through Envoy, and the killed replica's time back to ready (loading the \
         store again).\n"
    )?;
    writeln!(out, "| replica killed | kill to change served (ms) | back to ready (s) |")?;
    writeln!(out, "|---:|---:|---:|")?;
    for (victim, took, again) in &failovers {
        writeln!(out, "| r{victim} | {took:.0} | {again:.1} |")?;
    }
    writeln!(
        out,
        "\nCPU per change: {watchers} watchers streaming the route table (as native Envoys do), spread over the \
         replicas, and a new function every 100 ms through the first replica ({cpu_changes} changes); beside \
         them the plane's Envoy (wasm, asking once per change). Each process's CPU over the changes, per change, \
         and in brackets what it spent per 100 ms in as long before them with the same watchers and no change \
         (etcd's heartbeats and the replicas' leases, mostly); nothing pinned: the watchers, the REST client, the \
         Envoy and the services share both CPUs.\n"
    )?;
    writeln!(out, "| store | each replica (ms) | all replicas (ms) | each etcd member (ms) | all (ms) |")?;
    writeln!(out, "|---|---|---:|---|---:|")?;
    for (name, cpu) in &cpus {
        let (replicas, members): (Vec<&Cpu>, Vec<&Cpu>) = cpu.iter().partition(|c| c.replica);
        let list = |v: &[&Cpu]| {
            let each: Vec<String> = v.iter().map(|c| format!("{:.2} ({:.2})", c.change, c.idle)).collect();
            if each.is_empty() {
                "–".to_string()
            } else {
                each.join(", ")
            }
        };
        let sum = |v: &[&Cpu]| -> (f64, f64) { v.iter().fold((0.0, 0.0), |(a, b), c| (a + c.change, b + c.idle)) };
        let (r, m) = (sum(&replicas), sum(&members));
        writeln!(
            out,
            "| {name} | {} | {:.2} ({:.2}) | {} | {:.2} ({:.2}) |",
            list(&replicas),
            r.0,
            r.1,
            list(&members),
            r.0 + m.0,
            r.1 + m.1
        )?;
    }
    let path = std::env::var("BENCH_OUT_HA").unwrap_or_else(|_| "bench/results-ha.md".into());
    std::fs::write(edgewise::repo_root().join(&path), &out)?;
    println!("{out}");
    Ok(())
}

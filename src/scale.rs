//! What the scale benchmarks share (`edgewise-scale`, `edgewise-fleet`): a seeded
//! edgewise-control store, function hosts, and measurements of a process (RSS, CPU) and of
//! Envoy's CPU per request under wrk.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgewise_control::model::{Customer, Function, FunctionRules};
use edgewise_control::store::Store;

use crate::certs::Ca;

pub const HOT_SAN: &str = "ingress.customer-hot.example";
pub const DOMAIN: &str = "serverless.gitlab.io";

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The host label of function `i`.
pub fn label(i: usize) -> String {
    format!("{i:08x}-0000000b-{i:010x}")
}

pub fn function(i: usize, customer: &str) -> Function {
    let l = label(i);
    let parts: Vec<&str> = l.split('-').collect();
    let matches = ["project", "environment", "function"].iter().zip(parts).map(|(k, v)| (k.to_string(), v.to_string()));
    Function { matches: matches.collect(), customer: customer.into(), host: format!("f{i}.knative.{customer}.example") }
}

/// A seeded store's contents: customers, and functions with their route keys.
pub type Seed = (Vec<(String, Customer)>, Vec<(String, String, Function)>);

/// `customers` customers (the first 10 reachable at `gateway`, with the hot CA; the others with a
/// CA each, at an address nothing listens on) and `functions` functions spread over them.
pub fn seed_data(hot_ca: &Ca, gateway: u16, customers: usize, functions: usize) -> Result<Seed> {
    let rules = FunctionRules::new(DOMAIN, edgewise_control::model::DEFAULT_PATTERN).map_err(anyhow::Error::msg)?;
    let mut all: Vec<(String, Customer)> = Vec::with_capacity(customers);
    for c in 0..customers {
        let hot = c < 10;
        let (ca, address) = if hot {
            (hot_ca.pem.clone(), format!("127.0.0.1:{gateway}"))
        } else {
            (Ca::new(&format!("customer {c} CA"))?.pem, "127.0.0.1:9".to_string())
        };
        let san = if hot { HOT_SAN.to_string() } else { format!("ingress.c{c}.example") };
        all.push((format!("c{c:05}"), Customer { address, ca, san }));
    }
    let fns: Vec<(String, String, Function)> = (0..functions)
        .map(|i| {
            let f = function(i, &all[i % customers].0);
            rules.key(&f).map(|key| (format!("f{i}"), key, f)).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<_>>()?;
    Ok((all, fns))
}

/// Seeds the SQLite store `db` with `seed_data`.
pub fn seed(db: &Path, hot_ca: &Ca, gateway: u16, customers: usize, functions: usize) -> Result<()> {
    let started = Instant::now();
    let (all, fns) = seed_data(hot_ca, gateway, customers, functions)?;
    let mut store = Store::open(db).map_err(anyhow::Error::msg)?;
    store
        .seed(all.iter().map(|(n, c)| (n.as_str(), c)), fns.iter().map(|(n, k, f)| (n.as_str(), k.as_str(), f)))
        .map_err(anyhow::Error::msg)?;
    eprintln!("seeded {customers} customers, {functions} functions in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A benchmark's control plane before its service starts: `work/name` made afresh, the
/// serverless PKI in it, the customers' gateway (an HTTP/2 mTLS echo that keeps connections, so
/// that bursts measure routing, not upstream handshakes) and a store seeded with `customers` and
/// `functions` (`seed`). Returns the folder, the PKI, the gateway and the store's path.
pub async fn seeded_plane(
    work: &Path,
    name: &str,
    customers: usize,
    functions: usize,
) -> Result<(std::path::PathBuf, crate::scenarios::serverless::Pki, crate::server::Server, std::path::PathBuf)> {
    let (dir, pki, gateway) = plane(work, name).await?;
    let db = dir.join("control.db");
    seed(&db, &pki.customer_a_ca, gateway.port(), customers, functions)?;
    Ok((dir, pki, gateway, db))
}

/// A benchmark's control plane before its store is seeded: `work/name` made afresh, the
/// serverless PKI in it, and the customers' gateway (`seeded_plane`).
pub async fn plane(
    work: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, crate::scenarios::serverless::Pki, crate::server::Server)> {
    use crate::server::{Listen, Server};
    let dir = work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = crate::scenarios::serverless::Pki::install(&dir)?;
    let leaf = pki.customer_a_ca.issue(&crate::certs::LeafSpec::server(&[HOT_SAN]))?;
    let tls = crate::tls::server(&leaf, &[&pki.platform_ca.pem], &["h2", "http/1.1"])?;
    let gateway = Server::echo("gateway", Listen { tls: Some(tls), close_each: false, ..Listen::default() }).await?;
    Ok((dir, pki, gateway))
}

pub fn taskset(pid: Option<u32>, cpu: u32) -> Result<()> {
    if let Some(pid) = pid {
        Command::new("taskset").args(["-pc", &cpu.to_string(), &pid.to_string()]).output()?;
    }
    Ok(())
}

pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(str::to_owned)))
        .and_then(|v| v.split_whitespace().next().and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User and system CPU of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).context("parsing /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?)
}

/// One 1-second wrk burst (32 connections, HTTPS, on CPU 1) at `host` through `front`: the CPU
/// per request of process `pid` (Envoy), in µs.
pub fn burst(pid: u32, front: SocketAddr, host: &str) -> Result<f64> {
    let before = cpu_ticks(pid)?;
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "-c32", "-d1s", "-H", &format!("Host: {host}")])
        .arg(format!("https://{front}/"))
        .output()
        .context("running wrk")?;
    let ticks = cpu_ticks(pid)? - before;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw errors: {text}");
    }
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
        .with_context(|| format!("wrk: {text} {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(ticks as f64 * 10_000.0 / requests.max(1.0))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The value at fraction `q` (0.99: p99) of `v`.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).saturating_sub(1);
    v.get(i.min(v.len().saturating_sub(1))).copied().unwrap_or(0.0)
}

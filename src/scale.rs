//! What the scale benchmarks share (`edgewise-scale`, `edgewise-fleet`): a seeded
//! edgewise-control store, function hosts, and measurements of a process (RSS, CPU) and of
//! Envoy's CPU per request under load.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgewise_control::model::{Customer, Function, FunctionRules};
use edgewise_control::store::Store;
use edgewise_control::CURSOR;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

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
        Command::new("taskset").args(["-apc", &cpu.to_string(), &pid.to_string()]).output()?;
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

/// The calling thread's CPU time so far (ns).
pub fn thread_cpu_ns() -> Result<u64> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        bail!("clock_gettime: {}", std::io::Error::last_os_error());
    }
    Ok(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// The kernel's floor under a durable change on the disk of `dir`: the CPU one thread spends
/// writing a 4 KiB page and syncing the file (as SQLite's commit does, with nothing above it).
/// µs, the median of `rounds`.
pub fn sync_floor(dir: &Path, rounds: usize) -> Result<f64> {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("sync-floor");
    let mut file = std::fs::File::create(&path)?;
    let page = [7u8; 4096];
    let mut took = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let before = thread_cpu_ns()?;
        file.seek(SeekFrom::Start((round % 256) as u64 * 4096))?;
        file.write_all(&page)?;
        file.sync_all()?;
        took.push((thread_cpu_ns()? - before) as f64 / 1000.0);
    }
    std::fs::remove_file(&path)?;
    Ok(median(took))
}

/// A kept-alive HTTPS connection to a gateway's front, with the SNI of the platform's names (the
/// listener's other filter chain is for custom domains): a request costs a request, not a TLS
/// handshake on the CPUs being measured.
pub struct Kept {
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    sni: rustls::pki_types::ServerName<'static>,
    conn: Option<BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
}

impl Kept {
    pub fn new(front: SocketAddr, tls: Arc<rustls::ClientConfig>, sni: &str) -> Result<Kept> {
        let sni = rustls::pki_types::ServerName::try_from(sni.to_string())?;
        Ok(Kept { front, tls, sni, conn: None })
    }

    /// The status `host` answers with (0 when the connection failed; the next call reconnects).
    pub async fn status(&mut self, host: &str) -> u16 {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let connect = async {
                    let tcp = tokio::net::TcpStream::connect(self.front).await?;
                    tcp.set_nodelay(true)?;
                    let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(self.sni.clone(), tcp).await?;
                    Ok::<_, anyhow::Error>(BufReader::new(tls))
                };
                match connect.await {
                    Ok(conn) => conn,
                    Err(_) => return 0,
                }
            }
        };
        match request(&mut conn, host, "/").await {
            Ok((status, ..)) => {
                self.conn = Some(conn);
                status
            }
            Err(_) => 0,
        }
    }
}

/// A GET on a kept-alive HTTP/1.1 connection: (status, cursor, body, bytes received).
pub async fn request<S>(conn: &mut BufReader<S>, host: &str, path: &str) -> Result<(u16, String, Vec<u8>, usize)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    conn.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes()).await?;
    let (mut status, mut cursor, mut length, mut bytes, mut chunked) = (0, String::new(), 0, 0, false);
    loop {
        let mut line = String::new();
        bytes += conn.read_line(&mut line).await?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
            status = rest.get(..3).unwrap_or_default().parse()?;
        } else if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse()?,
                "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
                k if k == CURSOR => cursor = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await.context("body")?;
    while chunked {
        let mut size = String::new();
        bytes += conn.read_line(&mut size).await?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or_default(), 16)?;
        let mut chunk = vec![0; size + 2];
        conn.read_exact(&mut chunk).await.context("chunk")?;
        bytes += chunk.len();
        body.extend_from_slice(chunk.get(..size).unwrap_or_default());
        chunked = size > 0;
    }
    Ok((status, cursor, body, bytes + length))
}

/// Connections of a burst, as wrk's `-c32` had them.
const BURST_CONNECTIONS: usize = 32;

/// One 1-second burst at `host` through `front` (32 kept-alive HTTPS connections, SNI `sni`):
/// the CPU per request of process `pid` (Envoy), in µs. Every answer must be 200.
pub async fn burst(pid: u32, front: SocketAddr, tls: Arc<rustls::ClientConfig>, sni: &str, host: &str) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..BURST_CONNECTIONS {
        let mut kept = Kept::new(front, tls.clone(), sni)?;
        let status = kept.status(host).await;
        if status != 200 {
            bail!("{host} through {front}: {status} before the burst");
        }
        conns.push(kept);
    }
    let before = cpu_ticks(pid)?;
    let deadline = Instant::now() + std::time::Duration::from_secs(1);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut kept| {
            let host = host.to_string();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match kept.status(&host).await {
                        200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let (o, f) = task.await?;
        (ok, failed) = (ok + o, failed + f);
    }
    let ticks = cpu_ticks(pid)? - before;
    if failed > 0 || ok == 0 {
        bail!("burst at {host} through {front}: {ok} answered 200, {failed} not");
    }
    Ok(ticks as f64 * 10_000.0 / ok as f64)
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

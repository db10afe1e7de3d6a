//! Simulated watchers of edgewise-control's route table for the fleet benchmarks: plain HTTPS
//! clients of the route port (mutual TLS, eight to a source address, as gateways would be), not
//! Envoys, that watch as proxy-wasm Envoys do (a call per change) or as native ones do (one
//! streamed answer), and count what they receive.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgewise_control::ROUTES_PATH;
use tokio::io::BufReader;

use crate::certs::{Ca, LeafSpec};
use crate::scale::request;
use crate::scenarios::serverless::CONTROL_NAME;

/// `count` watchers, watcher `n` on the route port `port(n)`, until dropped.
pub struct Watchers {
    pub got: Arc<Received>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watchers {
    pub fn spawn(port: impl Fn(usize) -> u16, ca: &Ca, count: usize, watching: Watching) -> Result<Watchers> {
        let got = Arc::new(Received { epoch: Some(Instant::now()), ..Received::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for n in 0..count {
            let credentials = (ca.pem.clone(), ca.issue(&LeafSpec::client("watcher", &[]))?);
            let shared = (got.clone(), stop.clone());
            tasks.push(tokio::spawn(watcher(port(n), credentials, n, shared, watching)));
        }
        Ok(Watchers { got, stop, tasks })
    }

    /// When the watchers began.
    pub fn epoch(&self) -> Instant {
        self.got.epoch.unwrap_or_else(Instant::now)
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the simulated watchers received, in all.
#[derive(Default)]
pub struct Received {
    pub bytes: AtomicU64,
    pub changes: AtomicU64,
    pub answers: AtomicU64,
    pub errors: AtomicU64,
    /// When an answer with changes last came, in µs after `epoch`.
    pub last_change_us: AtomicU64,
    pub epoch: Option<Instant>,
}

/// How the simulated watchers watch: as proxy-wasm Envoys (a call per change), or as native ones
/// (one streamed answer).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Watching {
    Calls,
    Stream,
}

/// A watcher: a client of the route port (mutual TLS, its own source address) that takes the
/// cursor of a one-route page and then watches, counting what it receives.
async fn watcher(
    plane_port: u16,
    (ca, leaf): (String, crate::certs::Leaf),
    n: usize,
    (got, stop): (Arc<Received>, Arc<AtomicBool>),
    watching: Watching,
) {
    let run = async {
        let config = crate::tls::client(&[&ca], Some(&leaf), &["http/1.1"])?;
        // Eight watches per address at most: a source address for every eight watchers.
        let from = crate::flood::source(50 + (n / 8) as u8);
        let tcp = crate::flood::connect_from(from, plane_port).await?;
        let name = rustls::pki_types::ServerName::try_from(CONTROL_NAME)?;
        let mut tls = BufReader::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?);
        let (_, mut cursor, _) = exchange(&mut tls, &format!("{ROUTES_PATH}?limit=1")).await?;
        if watching == Watching::Stream {
            return stream(&mut tls, cursor, &got, &stop).await;
        }
        while !stop.load(Relaxed) {
            let (status, next, size) = exchange(&mut tls, &format!("{ROUTES_PATH}?since={cursor}&wait=25")).await?;
            got.answers.fetch_add(1, Relaxed);
            got.bytes.fetch_add(size.0 as u64, Relaxed);
            got.changes.fetch_add(size.1 as u64, Relaxed);
            if let (Some(epoch), true) = (got.epoch, size.1 > 0) {
                got.last_change_us.fetch_max(epoch.elapsed().as_micros() as u64, Relaxed);
            }
            if status != 200 && status != 304 {
                bail!("watch answered {status}");
            }
            cursor = next;
        }
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = run.await {
        eprintln!("watcher {n}: {e:#}");
        got.errors.fetch_add(1, Relaxed);
    }
}

/// A streamed watch from `cursor`, asked again whenever the service ends it, until `stop`.
async fn stream<S>(conn: &mut BufReader<S>, mut cursor: String, got: &Received, stop: &AtomicBool) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    while !stop.load(Relaxed) {
        let path = format!("{ROUTES_PATH}?since={cursor}&wait=25&stream=1");
        conn.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nhost: control\r\n\r\n").as_bytes()).await?;
        let mut head = String::new();
        while conn.read_line(&mut head).await? > 2 {
            head.clear();
        }
        loop {
            let mut size = String::new();
            conn.read_line(&mut size).await?;
            let length = usize::from_str_radix(size.trim(), 16).context("a chunk's size")?;
            let mut chunk = vec![0; length + 2];
            conn.read_exact(&mut chunk).await?;
            if length == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&chunk);
            let changes = line.matches("{\"put\":").count() + line.matches("{\"delete\":").count();
            got.answers.fetch_add(1, Relaxed);
            got.bytes.fetch_add((size.len() + chunk.len()) as u64, Relaxed);
            got.changes.fetch_add(changes as u64, Relaxed);
            if let (Some(epoch), true) = (got.epoch, changes > 0) {
                got.last_change_us.fetch_max(epoch.elapsed().as_micros() as u64, Relaxed);
            }
            if let Some(c) = line.split("\"cursor\":\"").nth(1).and_then(|rest| rest.split('"').next()) {
                cursor = c.to_string();
            }
        }
    }
    Ok(())
}

/// One request on a kept-alive connection: (status, cursor, (bytes received, changes in it)).
async fn exchange<S>(conn: &mut BufReader<S>, path: &str) -> Result<(u16, String, (usize, usize))>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (status, cursor, body, bytes) = request(conn, "control", path).await?;
    let body = String::from_utf8_lossy(&body);
    let changes = body.matches("{\"put\":").count() + body.matches("{\"delete\":").count();
    Ok((status, cursor, (bytes, changes)))
}

/// The kernel's floor under a change's fan-out on this machine: the CPU one thread spends
/// writing `bytes` to each of `count` loopback TCP connections (plain TCP, no TLS, no HTTP),
/// a round every `every`, read by tasks of this process as the watchers are. On loopback the
/// writer also pays for the readers' TCP receive and wake-up, as edgewise-control does. µs of
/// the writer's CPU per round, the median of `rounds`.
pub async fn send_floor(count: usize, bytes: usize, rounds: usize, every: std::time::Duration) -> Result<f64> {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let received = Arc::new(AtomicU64::new(0));
    let (mut writers, mut readers) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let mut reader = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (writer, _) = listener.accept()?;
        writer.set_nodelay(true)?;
        writers.push(writer);
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = reader.read(&mut buf).await {
                received.fetch_add(n as u64, Relaxed);
            }
        }));
    }
    let line = vec![b'x'; bytes];
    let per_round = tokio::task::spawn_blocking(move || -> Result<Vec<u64>> {
        let mut took = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            std::thread::sleep(every);
            let before = crate::scale::thread_cpu_ns()?;
            for w in &mut writers {
                w.write_all(&line)?;
            }
            took.push(crate::scale::thread_cpu_ns()? - before);
        }
        Ok(took)
    })
    .await??;
    let want = (count * bytes * rounds) as u64;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while received.load(Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    readers.iter().for_each(|r| r.abort());
    if received.load(Relaxed) != want {
        bail!("the floor's readers received {} of {want} bytes", received.load(Relaxed));
    }
    Ok(crate::scale::median(per_round.into_iter().map(|ns| ns as f64 / 1000.0).collect()))
}

//! A small HTTP client for tests: HTTP/1.1 or HTTP/2 (by ALPN over TLS), any authority, any
//! address, one connection per request so every request stands on its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Clone, Default)]
pub struct Client {
    tls: Option<Arc<ClientConfig>>,
    timeout: Option<Duration>,
    sni: Option<String>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub version: hyper::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request. `authority` becomes `Host` (HTTP/1.1) or `:authority` (HTTP/2) and the TLS SNI.
pub struct Request<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: Bytes,
}

impl<'a> Request<'a> {
    pub fn get(authority: &'a str, path: &'a str) -> Self {
        Request { method: "GET", authority, path, headers: vec![], body: Bytes::new() }
    }

    pub fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl Client {
    pub fn plain() -> Self {
        Client::default()
    }

    /// TLS with the given config; its ALPN list decides HTTP/2 (`h2`) or HTTP/1.1.
    pub fn tls(config: Arc<ClientConfig>) -> Self {
        Client { tls: Some(config), ..Client::default() }
    }

    /// Its TLS configuration, if it has one.
    pub fn tls_config(&self) -> Option<Arc<ClientConfig>> {
        self.tls.clone()
    }

    /// Uses this TLS server name instead of the request's authority.
    pub fn sni(mut self, name: &str) -> Self {
        self.sni = Some(name.to_string());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub async fn get(&self, addr: SocketAddr, authority: &str, path: &str) -> Result<Response> {
        self.send(addr, Request::get(authority, path)).await
    }

    pub async fn send(&self, addr: SocketAddr, req: Request<'_>) -> Result<Response> {
        let fut = self.send_inner(addr, req);
        match self.timeout {
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| anyhow!("request timed out after {t:?}"))?,
            None => {
                tokio::time::timeout(Duration::from_secs(30), fut).await.map_err(|_| anyhow!("request timed out"))?
            }
        }
    }

    async fn send_inner(&self, addr: SocketAddr, req: Request<'_>) -> Result<Response> {
        let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        // As a browser or curl: a request's TLS records are not held back behind a delayed ACK.
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => exchange(tcp, false, "http", req).await,
            Some(config) => {
                let host = match &self.sni {
                    Some(sni) => sni.as_str(),
                    None => req.authority.rsplit_once(':').map_or(req.authority, |(h, p)| {
                        if p.chars().all(|c| c.is_ascii_digit()) {
                            h
                        } else {
                            req.authority
                        }
                    }),
                };
                let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())?;
                let tls = TlsConnector::from(config.clone()).connect(name, tcp).await.context("TLS handshake")?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                exchange(tls, h2, "https", req).await
            }
        }
    }
}

impl Client {
    /// Writes `bytes` as they are on one HTTP/1.1 connection (over TLS when this client has it)
    /// and reads until the server closes it: for requests no well-behaved client library sends
    /// (bytes that are not UTF-8, pipelining). End the last request with `connection: close`.
    pub async fn raw(&self, addr: SocketAddr, server_name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        self.raw_continued(addr, server_name, bytes, None).await
    }

    /// The same, as a client that sent `Expect: 100-continue` does: `head`, then `body` once the
    /// server answered `100 Continue` (not at all if it answered otherwise). Reading goes on
    /// while writing: a server may answer, and stop reading, before the body is all sent.
    pub async fn raw_continued(
        &self,
        addr: SocketAddr,
        server_name: &str,
        head: &[u8],
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let exchange = async {
            let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            match &self.tls {
                None => write_and_read(tcp, head, body).await,
                Some(config) => {
                    let mut config = (**config).clone();
                    config.alpn_protocols = vec![b"http/1.1".to_vec()];
                    let name = ServerName::try_from(self.sni.as_deref().unwrap_or(server_name).to_string())?;
                    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.context("TLS handshake")?;
                    write_and_read(tls, head, body).await
                }
            }
        };
        let limit = self.timeout.unwrap_or(Duration::from_secs(30));
        tokio::time::timeout(limit, exchange).await.map_err(|_| anyhow!("raw exchange timed out after {limit:?}"))?
    }
}

/// Writes `head` (then `after_100` once a `100 Continue` came) while reading until the server
/// closes. A write the server cut short is no error: what it answered is.
async fn write_and_read<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    head: &[u8],
    after_100: Option<&[u8]>,
) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut body = None;
    match after_100 {
        None => body = Some(head),
        Some(rest) => {
            wr.write_all(head).await?;
            wr.flush().await?;
            // The first response head decides: a 100 asks for the body, anything else is the answer.
            while !out.windows(4).any(|w| w == b"\r\n\r\n") {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return Ok(out),
                    Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
            }
            if out.starts_with(b"HTTP/1.1 100") {
                body = Some(rest);
            }
        }
    }
    let write = async {
        if let Some(bytes) = body {
            let _ = wr.write_all(bytes).await;
            let _ = wr.flush().await;
        }
    };
    let read = async {
        // A TLS peer may close without close_notify: what was read until then is the answer.
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    };
    tokio::join!(write, read);
    Ok(out)
}

/// A GET as bytes for [`Client::raw`], closing the connection after its response.
pub fn raw_get(host: &[u8], path: &str, headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = format!("GET {path} HTTP/1.1\r\nhost: ").into_bytes();
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// The status codes of the HTTP/1.1 responses in a raw exchange, in order (each response read
/// whole, its body by Content-Length or chunked encoding, so pipelined answers are told apart).
pub fn raw_statuses(raw: &[u8]) -> Vec<u16> {
    let mut statuses = Vec::new();
    let mut rest = raw;
    while let Some((status, after)) = one_response(rest) {
        statuses.push(status);
        rest = after;
    }
    statuses
}

/// Splits off one response: its status and what follows it.
fn one_response(raw: &[u8]) -> Option<(u16, &[u8])> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(raw.get(..head_end)?).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
    };
    let mut body = raw.get(head_end..)?;
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Some((status, body));
    }
    if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        return Some((status, body.get(length..).unwrap_or_default()));
    }
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n")?;
            let size = usize::from_str_radix(std::str::from_utf8(body.get(..line_end)?).ok()?.trim(), 16).ok()?;
            body = body.get(line_end + 2 + size + 2..).unwrap_or_default();
            if size == 0 {
                return Some((status, body));
            }
        }
    }
    // No length: the body runs to the end of the connection.
    Some((status, &[]))
}

async fn exchange<S>(io: S, h2: bool, scheme: &str, req: Request<'_>) -> Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let mut builder = hyper::Request::builder().method(req.method);
    builder = if h2 {
        builder.uri(format!("{scheme}://{}{}", req.authority, req.path)).version(hyper::Version::HTTP_2)
    } else {
        builder.uri(req.path).header("host", req.authority)
    };
    for (k, v) in &req.headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(req.body))?;
    let response = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(request).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(request).await?
    };
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => bail!("reading response body: {e}"),
    };
    Ok(Response { status: parts.status.as_u16(), version: parts.version, headers: parts.headers, body })
}

/// Continuous load on one host until stopped: `tasks` clients in a loop, each response either
/// the expected status or a failure (printed, the first few).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicUsize>,
    failed: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(client: &Client, addr: SocketAddr, host: &str, tasks: usize, expect: u16) -> Load {
        use std::sync::atomic::Ordering::Relaxed;
        let load = Load { stop: Arc::default(), ok: Arc::default(), failed: Arc::default(), tasks: Vec::new() };
        let tasks = (0..tasks)
            .map(|_| {
                let (client, host) = (client.clone(), host.to_string());
                let (stop, ok, failed) = (load.stop.clone(), load.ok.clone(), load.failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Relaxed) {
                        match client.get(addr, &host, "/").await {
                            Ok(r) if r.status == expect => {
                                ok.fetch_add(1, Relaxed);
                            }
                            outcome => {
                                if failed.fetch_add(1, Relaxed) < 5 {
                                    let what = outcome
                                        .map_or_else(|e| format!("{e:#}"), |r| format!("{} {}", r.status, r.text()));
                                    eprintln!("load on {host}: {what}");
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// (succeeded, failed) so far.
    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }

    /// Stops the clients; (succeeded, failed).
    pub async fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.counts()
    }
}

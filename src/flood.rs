//! Clients that hold a service's ports the way an attacker would: connections opened from an
//! address of their own (anything in 127.0.0.0/8 is loopback) that send half a request or
//! nothing and wait, bodies trickled a byte a second, connections opened and closed as fast as
//! they go; and a minimal gRPC client (over HTTP/2, TLS optional) for well-behaved calls and for
//! streams that never read.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// An attacker's own loopback address, `127.0.0.<n>`.
pub fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A TCP connection to `port` on 127.0.0.1 from `from`.
pub async fn connect_from(from: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    socket_from(from)?.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// A socket bound to `from`, its port chosen at connect: as a plain connect's, it is reused for
/// other destinations (a port chosen at bind is held from every connect until its TIME_WAIT
/// ends, and thousands of connections would exhaust the range for the whole machine).
fn socket_from(from: IpAddr) -> std::io::Result<TcpSocket> {
    use std::os::fd::AsRawFd;
    let socket = TcpSocket::new_v4()?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `on` (its size given) on a socket this function owns.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket)
}

/// Connections held open after sending `sent` (half a request, or nothing).
pub struct Held {
    pub open: Vec<TcpStream>,
    /// Connections answered at once: (status line, body) of each refusal.
    pub refused: Vec<String>,
}

/// Opens `n` connections from `from` to `port`, each sending `sent` and then waiting. A
/// connection the service answers within `settle` counts as refused (its answer kept); the
/// others stay open.
pub async fn hold(from: IpAddr, port: u16, n: usize, sent: &[u8], settle: Duration) -> Result<Held> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(from, port).await.context("connecting")?;
        if !sent.is_empty() {
            // A refused connection may already be closed: what it answered is read below.
            let _ = s.write_all(sent).await;
        }
        streams.push(s);
    }
    tokio::time::sleep(settle).await;
    let mut held = Held { open: Vec::new(), refused: Vec::new() };
    for mut s in streams {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Err(_) => held.open.push(s),
            Ok(Ok(n)) => held.refused.push(String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned()),
            Ok(Err(e)) => held.refused.push(format!("error: {e}")),
        }
    }
    Ok(held)
}

impl Held {
    /// How many of the held connections the service has closed (EOF or reset) by now.
    pub async fn closed_by_peer(&mut self) -> usize {
        let mut closed = 0;
        for s in &mut self.open {
            let mut buf = [0u8; 256];
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                closed += 1;
            }
        }
        closed
    }
}

/// `n` connections from `from` that send `head` (announcing a body) and then one byte of body
/// a second until the service answers; each one's answer (status line first) when it comes.
pub fn trickle(from: IpAddr, port: u16, n: usize, head: String) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let tasks = (0..n).map(|_| {
            let head = head.clone();
            tokio::spawn(async move {
                let Ok(mut s) = connect_from(from, port).await else { return "connect failed".to_string() };
                if s.write_all(head.as_bytes()).await.is_err() {
                    return "write failed".to_string();
                }
                let mut buf = vec![0u8; 2048];
                loop {
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                        Ok(Ok(n)) => return String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned(),
                        Ok(Err(e)) => return format!("error: {e}"),
                        Err(_) => {
                            if s.write_all(b"x").await.is_err() {
                                return "closed while sending".to_string();
                            }
                        }
                    }
                }
            })
        });
        let mut answers = Vec::new();
        for t in tasks.collect::<Vec<_>>() {
            answers.push(t.await.unwrap_or_else(|e| format!("task: {e}")));
        }
        answers
    })
}

/// Opens and closes connections from `from` to `port` as fast as it can until `stop`; how
/// many it opened.
pub fn churn(from: IpAddr, port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let opened = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (stop, opened) = (stop.clone(), opened.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        // Closed with a reset, as a flood does: no TIME_WAIT left behind.
                        let Ok(socket) = socket_from(from) else { continue };
                        if socket.set_zero_linger().is_ok()
                            && socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.is_ok()
                        {
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
        opened.load(Ordering::Relaxed)
    })
}

/// A process's resident memory, in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// An executable script under `dir` that runs `binary` with the open-file limit at `files`
/// (soft and hard: the service cannot raise it), for starting a service as a cramped
/// deployment would.
pub fn with_open_files(dir: &std::path::Path, binary: &std::path::Path, files: u32) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let name = binary.file_name().context("binary name")?;
    let script = dir.join(name);
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec prlimit --nofile={files}:{files} -- {} \"$@\"\n", binary.display()),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// A connection that opens `n` gRPC streams to `path`, each sending `message` (and not ending its
/// side), and then reads nothing at all, not even the server's SETTINGS: the server's answers pile
/// up against HTTP/2's flow control and TCP's. Dropping the returned stream closes it.
pub async fn never_reading(
    from: IpAddr,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, &str)>,
    path: &str,
    message: &[u8],
    n: u32,
) -> Result<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> {
    use crate::h2raw::{frame as h2frame, DATA, HEADERS, SETTINGS};
    let tcp = connect_from(from, port).await?;
    let authority = tls.as_ref().map_or_else(|| format!("127.0.0.1:{port}"), |(_, name)| name.to_string());
    let mut encoder = fluke_hpack::Encoder::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2frame(SETTINGS, 0, 0, &[]));
    let data = frame(message);
    for i in 0..n {
        let fields: [(&[u8], &[u8]); 6] = [
            (b":method", b"POST"),
            (b":scheme", if tls.is_some() { b"https" } else { b"http" }),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let block = encoder.encode(fields);
        let id = 2 * i + 1;
        out.extend(h2frame(HEADERS, 0x4, id, &block));
        out.extend(h2frame(DATA, 0, id, &data));
    }
    let mut io: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match tls {
        Some((config, name)) => {
            let server = rustls::pki_types::ServerName::try_from(name.to_string())?;
            Box::new(tokio_rustls::TlsConnector::from(config).connect(server, tcp).await?)
        }
        None => Box::new(tcp),
    };
    io.write_all(&out).await?;
    Ok(io)
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One HTTP/2 connection for gRPC calls.
pub struct Grpc {
    send: hyper::client::conn::http2::SendRequest<GrpcBody>,
    authority: String,
}

/// A message framed for gRPC (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

impl Grpc {
    /// Connects to `port` from `from`; over TLS with `tls` (SNI `server_name`), else plaintext.
    pub async fn connect(from: IpAddr, port: u16, tls: Option<(Arc<rustls::ClientConfig>, &str)>) -> Result<Grpc> {
        let tcp = connect_from(from, port).await?;
        let executor = hyper_util::rt::TokioExecutor::new();
        let (send, authority) = match tls {
            Some((config, name)) => {
                let server = rustls::pki_types::ServerName::try_from(name.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(config).connect(server, tcp).await?;
                let (send, conn) =
                    hyper::client::conn::http2::handshake(executor, hyper_util::rt::TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                (send, name.to_string())
            }
            None => {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(executor, hyper_util::rt::TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                (send, format!("127.0.0.1:{port}"))
            }
        };
        Ok(Grpc { send, authority })
    }

    fn request(&self, path: &str, body: GrpcBody) -> Result<hyper::Request<GrpcBody>> {
        Ok(hyper::Request::post(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)?)
    }

    /// A call that sends `message` and ends its side: the first message of the answer.
    pub async fn call(&mut self, path: &str, message: &[u8]) -> Result<Vec<u8>> {
        self.send.ready().await?;
        let request = self.request(path, Full::new(frame(message)).boxed())?;
        let response = self.send.send_request(request).await?;
        let status = response.headers().get("grpc-status").map(|v| v.as_bytes().to_vec());
        let body = response.into_body().collect().await?;
        let trailers = body.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
        let bytes = body.to_bytes();
        match status.or(trailers) {
            Some(s) if s == b"0" => {}
            s => bail!("{path}: grpc-status {:?}", s.map(|s| String::from_utf8_lossy(&s).into_owned())),
        }
        Ok(bytes.get(5..).context("no message in the answer")?.to_vec())
    }

    /// A stream that sends `message`, stays open and never reads the answer's body, until the
    /// returned guard is dropped.
    pub async fn stuck(&mut self, path: &str, message: &[u8]) -> Result<Stuck> {
        self.send.ready().await?;
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tx.send(frame(message)).await?;
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
        });
        let request = self.request(path, BodyExt::boxed(StreamBody::new(frames)))?;
        let answer = self.send.send_request(request);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // The answer's head is taken and its body held, unread, until the guard goes.
            let held = answer.await;
            let _ = stopped.await;
            drop(held);
        });
        Ok(Stuck { _body: tx, _stop: stop })
    }
}

/// A stream of [`Grpc::stuck`]: it ends when this is dropped.
pub struct Stuck {
    _body: mpsc::Sender<Bytes>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

//! What the edgewise services (`edgewise-ratelimit`, `edgewise-control`) share as processes:
//! their ports held against hostile clients (connection limits, per client too, a header-read
//! and an idle timeout, refusals counted), an HTTP/1.1 port, a gRPC port's settings, and
//! stopping on SIGTERM or SIGINT.

mod conn;
mod gate;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

pub use conn::Conn;
pub use gate::{readiness, render as render_connections, Gate, Limits, Refusal};

pub type Reply = Response<Full<Bytes>>;

/// The client's address, in every request's extensions on a port of `serve_http`.
#[derive(Clone, Copy, Debug)]
pub struct Client(pub std::net::IpAddr);

/// A TLS handshake on a gRPC port must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open files kept for everything but the two ports' connections (the store, Redis, logs).
const RESERVED_FILES: usize = 128;

/// Raises the soft open-file limit to the hard one, logs both, and gives each of the service's
/// two ports its share of what is left after the reserve: the gates for `http` and `grpc`.
pub fn gates<const N: usize>(name: &str, limits: Limits, ports: [&'static str; N]) -> [Arc<Gate>; N] {
    let files = raise_open_files(name);
    let share = files.saturating_sub(RESERVED_FILES) / N.max(1);
    let limits = limits.within(share);
    if limits.max_connections < share.min(Limits::default().max_connections) || files < 4096 {
        eprintln!(
            "{name}: at most {} connections per port, {} per client address (open-file limit {files})",
            limits.max_connections, limits.max_per_client
        );
    }
    ports.map(|port| Gate::new(port, limits))
}

/// The soft `RLIMIT_NOFILE` raised to the hard limit; the soft limit in force after.
fn raise_open_files(name: &str) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        eprintln!("{name}: open-file limit unknown: {}", std::io::Error::last_os_error());
        return 1024;
    }
    let soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            eprintln!("{name}: open-file limit raised from {soft} to {} (the hard limit)", limit.rlim_max);
            return usize::try_from(limit.rlim_max).unwrap_or(usize::MAX);
        }
        eprintln!("{name}: open-file limit {soft} not raised: {}", std::io::Error::last_os_error());
    } else {
        eprintln!("{name}: open-file limit {soft} (the hard limit)");
    }
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// What `next` on a port gives: a connection let in, or one refused and why.
enum Accepted {
    In(Conn),
    Refused(TcpStream, Refusal),
}

/// The next connection on `listener` through `gate`, or `None` once `stop` is set. Out of file
/// descriptors, it waits a moment rather than spin.
async fn next(listener: &TcpListener, gate: &Arc<Gate>, stop: &mut watch::Receiver<bool>) -> Option<Accepted> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return None,
        };
        let (stream, peer): (TcpStream, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                    eprintln!("{} port: accept: {e}; pausing 100 ms", gate.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        // Answers are small and latency counts (a watch's answer is the change reaching Envoy):
        // no Nagle delay behind a peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        return Some(match gate.admit(peer.ip()) {
            Ok(permit) => Accepted::In(Conn::new(stream, permit, gate.clone())),
            Err(refusal) => Accepted::Refused(stream, refusal),
        });
    }
}

/// Serves HTTP/1.1 on `listener` with `handle` until `stop` turns true, within `gate`'s limits:
/// a refused connection is answered 503 (the port is full) or 429 (its address holds its
/// share), a request head must arrive within the header timeout, a connection idle for the
/// idle timeout is closed.
pub async fn serve_http<H, F, B>(
    listener: TcpListener,
    gate: Arc<Gate>,
    tls: Option<TlsAcceptor>,
    handle: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handle = Arc::new(handle);
    let limits = gate.limits;
    while let Some(accepted) = next(&listener, &gate, &mut stop).await {
        match accepted {
            Accepted::In(conn) => {
                let (handle, gate, tls) = (handle.clone(), gate.clone(), tls.clone());
                let client = conn.peer().map(|a| Client(a.ip()));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        if let Some(client) = client {
                            req.extensions_mut().insert(client);
                        }
                        let reply = handle(req);
                        async move { Ok::<_, std::convert::Infallible>(reply.await) }
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout);
                    let served = match tls {
                        None => http.serve_connection(hyper_util::rt::TokioIo::new(conn), service).await,
                        Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(conn)).await {
                            Ok(Ok(conn)) => http.serve_connection(hyper_util::rt::TokioIo::new(conn), service).await,
                            // A failed or slow handshake: nothing to answer, the connection closes.
                            _ => return,
                        },
                    };
                    if served.is_err_and(|e| e.is_timeout()) {
                        gate.closed(gate::Closed::HeaderTimeout);
                    }
                });
            }
            Accepted::Refused(stream, refusal) => refuse(stream, refusal, limits),
        }
    }
}

pub use tokio_rustls::TlsAcceptor;

/// Gives the memory freed after loading a large store back to the system (glibc keeps freed heap
/// pages otherwise: a start's transient peak would stay in the RSS).
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// HTTPS that requires a client certificate of `client_ca` (PEM files).
pub fn mutual_tls(cert: &Path, key: &Path, client_ca: &Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let shown = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let chain: Vec<CertificateDer> =
        CertificateDer::pem_file_iter(cert).and_then(Iterator::collect).map_err(|e| shown(cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| shown(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca).map_err(|e| shown(client_ca, &e))? {
        roots.add(ca.map_err(|e| shown(client_ca, &e))?).map_err(|e| shown(client_ca, &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| shown(client_ca, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| shown(cert, &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Answers a refused HTTP connection and closes it, without waiting on the client: the answer
/// fits an empty socket buffer, and what the client already sent is read first so that the close
/// is a FIN, not a reset that could discard the answer.
fn refuse(stream: TcpStream, refusal: Refusal, limits: Limits) {
    let (status, code, detail) = match refusal {
        Refusal::Full => (
            "503 Service Unavailable",
            "overloaded",
            format!("the service holds its limit of {} connections; retry shortly", limits.max_connections),
        ),
        Refusal::Client => (
            "429 Too Many Requests",
            "too_many_connections",
            format!("at most {} connections from one address", limits.max_per_client),
        ),
    };
    let body = format!("{{\"error\":\"{code}\",\"detail\":\"{detail}\"}}\n");
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
    if let Ok(stream) = stream.into_std() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// The connections of a gRPC port for `tonic`'s `serve_with_incoming_shutdown`, within `gate`'s
/// limits (a refused connection is closed: the client's channel backs off and retries).
pub fn grpc_incoming(
    listener: TcpListener,
    gate: Arc<Gate>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(accepted) = next(&listener, &gate, &mut stop).await {
            if let Accepted::In(conn) = accepted {
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A gRPC server with the bounds every port of the services keeps: streams per connection,
/// header size, keepalive pings that close a connection whose peer stopped answering.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(100)
        .http2_max_header_list_size(16 * 1024)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Waits for SIGTERM or SIGINT, then sets `stop` (the servers stop accepting and finish what
/// they have in flight).
pub async fn until_signal(name: &str, stop: watch::Sender<bool>) -> Result<(), String> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("{name}: stopping");
    let _ = stop.send(true);
    Ok(())
}

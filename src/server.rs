//! Stand-in servers: HTTP/1.1 and HTTP/2, plaintext, TLS or mutual TLS. Every request is recorded
//! (method, path, Host, headers, SNI, ALPN and the client certificate's SANs), so a test can prove
//! what reached an upstream, over which kind of connection, and that nothing reached it at all.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// What a stand-in saw of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    pub server: String,
    pub method: String,
    pub path: String,
    /// `:authority` for HTTP/2, `Host` for HTTP/1.1.
    pub host: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// The same headers as they came, byte for byte (`headers` shows bytes that are not UTF-8 as
    /// U+FFFD).
    #[serde(skip)]
    pub raw_headers: Vec<(String, Vec<u8>)>,
    pub body: String,
    pub tls: Option<TlsSeen>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsSeen {
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// SANs of the client certificate (`URI:spiffe://...`, `DNS:...`); empty without one.
    pub peer_sans: Vec<String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.raw_headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    pub fn peer_sans(&self) -> Vec<String> {
        self.tls.as_ref().map(|t| t.peer_sans.clone()).unwrap_or_default()
    }
}

/// A response from a handler.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Sent after the body (gRPC's `grpc-status`).
    pub trailers: Vec<(String, String)>,
}

impl Answer {
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Answer {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            trailers: vec![],
        }
    }
}

pub type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// A running stand-in. Dropping it closes the listener and every connection.
pub struct Server {
    pub addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

/// How a stand-in listens.
#[derive(Clone, Default)]
pub struct Listen {
    /// Loopback address to bind (default 127.0.0.1); any 127.x.y.z works without set-up.
    pub ip: Option<std::net::Ipv4Addr>,
    /// 0 picks a free port.
    pub port: u16,
    pub tls: Option<Arc<ServerConfig>>,
    /// Close HTTP/1.1 connections after each response, so that every request is a new handshake.
    pub close_each: bool,
}

impl Server {
    pub async fn start(name: &str, listen: Listen, handler: Handler) -> Result<Server> {
        let ip = listen.ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        anyhow::ensure!(ip.is_loopback(), "stand-ins bind loopback addresses only, not {ip}");
        let listener = TcpListener::bind((ip, listen.port)).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ctx = Arc::new(Conn { name: name.to_string(), seen: seen.clone(), handler, close_each: listen.close_each });
        let acceptor = listen.tls.map(TlsAcceptor::from);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    match acceptor {
                        None => ctx.serve(TokioIo::new(stream), None).await,
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else { return };
                            let (_, session) = tls.get_ref();
                            let info = TlsSeen {
                                sni: session.server_name().map(str::to_owned),
                                alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
                                peer_sans: session
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| crate::tls::sans(c))
                                    .unwrap_or_default(),
                            };
                            ctx.serve(TokioIo::new(tls), Some(info)).await
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Server { addr, name: name.to_string(), seen, task })
    }

    /// An echo server: answers 200 with the JSON of what it saw.
    pub async fn echo(name: &str, listen: Listen) -> Result<Server> {
        Self::start(
            name,
            listen,
            Arc::new(|seen: &Seen| Answer::json(200, serde_json::to_vec(seen).unwrap_or_default())),
        )
        .await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Conn {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    handler: Handler,
    close_each: bool,
}

impl Conn {
    async fn serve<I>(self: Arc<Self>, io: TokioIo<I>, tls: Option<TlsSeen>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = self.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let ctx = ctx.clone();
            let tls = tls.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let host = parts
                    .uri
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| parts.headers.get("host").and_then(|h| h.to_str().ok()).map(str::to_owned))
                    .unwrap_or_default();
                let seen = Seen {
                    server: ctx.name.clone(),
                    method: parts.method.to_string(),
                    path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                    host,
                    version: format!("{:?}", parts.version),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                        .collect(),
                    raw_headers: parts.headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                    tls,
                };
                let answer = (ctx.handler)(&seen);
                if let Ok(mut all) = ctx.seen.lock() {
                    all.push(seen);
                }
                let mut resp = hyper::Response::builder().status(answer.status);
                for (k, v) in &answer.headers {
                    resp = resp.header(k, v);
                }
                if ctx.close_each {
                    resp = resp.header("connection", "close");
                }
                let trailers: hyper::HeaderMap = answer
                    .trailers
                    .iter()
                    .filter_map(|(k, v)| Some((k.parse::<hyper::header::HeaderName>().ok()?, v.parse().ok()?)))
                    .collect();
                let body = Full::new(answer.body);
                let body: http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> = if trailers.is_empty()
                {
                    body.boxed()
                } else {
                    body.with_trailers(std::future::ready(Some(Ok(trailers)))).boxed()
                };
                resp.body(body)
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().keep_alive(!self.close_each);
        let _ = builder.serve_connection(io, service).await;
    }
}

/// A JSON document served with an ETag, for the management-service stand-ins: honours
/// If-None-Match (304), and can be switched to failing or to serving garbage.
#[derive(Clone, Default)]
pub struct Document {
    state: Arc<Mutex<DocState>>,
}

#[derive(Default)]
struct DocState {
    body: Bytes,
    etag: u64,
    mode: DocMode,
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub enum DocMode {
    #[default]
    Serve,
    /// Answer with this status and no document.
    Fail(u16),
    /// Answer 200 with a body that is not a valid document.
    Garbage,
}

impl Document {
    pub fn new(body: impl Into<Bytes>) -> Self {
        let doc = Document::default();
        doc.set(body);
        doc
    }

    /// Replaces the document (and its ETag).
    pub fn set(&self, body: impl Into<Bytes>) {
        if let Ok(mut s) = self.state.lock() {
            s.body = body.into();
            s.etag += 1;
        }
    }

    pub fn mode(&self, mode: DocMode) {
        if let Ok(mut s) = self.state.lock() {
            s.mode = mode;
        }
    }

    pub fn handler(&self) -> Handler {
        let state = self.state.clone();
        Arc::new(move |seen: &Seen| {
            let Ok(s) = state.lock() else { return Answer::json(500, "{}") };
            let etag = format!("\"{}\"", s.etag);
            match s.mode {
                DocMode::Fail(status) => Answer::json(status, r#"{"error":"failing on purpose"}"#),
                DocMode::Garbage => Answer::json(200, "{\"version\": 99, \"routes\": [garbage"),
                DocMode::Serve if seen.header("if-none-match") == Some(etag.as_str()) => {
                    Answer { status: 304, headers: vec![("etag".into(), etag)], body: Bytes::new(), trailers: vec![] }
                }
                DocMode::Serve => {
                    let mut a = Answer::json(200, s.body.clone());
                    a.headers.push(("etag".into(), etag));
                    a
                }
            }
        })
    }
}

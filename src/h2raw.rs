//! One HTTP/2 request with exactly the header fields given (pseudo-headers included, in any
//! order, any bytes), written as frames: the requests an HTTP/2 library refuses to send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How the server answered the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Response headers with this `:status`.
    Status(u16),
    /// The stream was reset (RST_STREAM) with this error code.
    Reset(u32),
    /// The connection was closed (GOAWAY) with this error code, and no response came.
    GoAway(u32),
    /// The connection was closed with neither.
    Closed,
}

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A request body: DATA (at most 16 KiB, one frame within the initial window) and trailers.
pub struct Body<'a> {
    pub data: &'a [u8],
    pub trailers: &'a [(&'a [u8], &'a [u8])],
}

/// Sends the request (TLS with ALPN h2 when `tls` is given, else cleartext with prior knowledge).
pub async fn request(
    tls: Option<Arc<ClientConfig>>,
    addr: SocketAddr,
    server_name: &str,
    fields: &[(&[u8], &[u8])],
) -> Result<Answer> {
    request_with_body(tls, addr, server_name, fields, None).await
}

/// The same with a body: HEADERS, then DATA, then the trailers ending the stream.
pub async fn request_with_body(
    tls: Option<Arc<ClientConfig>>,
    addr: SocketAddr,
    server_name: &str,
    fields: &[(&[u8], &[u8])],
    body: Option<Body<'_>>,
) -> Result<Answer> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let exchange = async {
        match tls {
            None => exchange(tcp, fields, body).await,
            Some(config) => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"h2".to_vec()];
                let name = ServerName::try_from(server_name.to_string())?;
                let stream = TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
                exchange(stream, fields, body).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| anyhow!("no answer in 10 s"))?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    fields: &[(&[u8], &[u8])],
    body: Option<Body<'_>>,
) -> Result<Answer> {
    let mut encoder = fluke_hpack::Encoder::new();
    let block = encoder.encode(fields.iter().copied());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    match body {
        None => out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)),
        Some(body) => {
            anyhow::ensure!(body.data.len() <= 16 * 1024, "one DATA frame of at most 16 KiB");
            out.extend(frame(HEADERS, END_HEADERS, 1, &block));
            out.extend(frame(DATA, 0, 1, body.data));
            let trailers = encoder.encode(body.trailers.iter().copied());
            out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &trailers));
        }
    }
    io.write_all(&out).await?;
    let mut decoder = fluke_hpack::Decoder::new();
    let mut goaway = None;
    loop {
        let mut head = [0u8; 9];
        if io.read_exact(&mut head).await.is_err() {
            return Ok(goaway.unwrap_or(Answer::Closed));
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & 1 == 0 => io.write_all(&frame(SETTINGS, 1, 0, &[])).await?,
            HEADERS if stream == 1 => {
                let fields = decoder.decode(&payload).map_err(|e| anyhow!("response headers: {e:?}"))?;
                let status = fields.iter().find(|(k, _)| k == b":status").context("no :status")?;
                let status = std::str::from_utf8(&status.1)?.parse()?;
                return Ok(Answer::Status(status));
            }
            RST_STREAM if stream == 1 => {
                let code = payload.get(..4).context("short RST_STREAM")?;
                return Ok(Answer::Reset(u32::from_be_bytes([code[0], code[1], code[2], code[3]])));
            }
            GOAWAY => {
                let code = payload.get(4..8).context("short GOAWAY")?;
                goaway = Some(Answer::GoAway(u32::from_be_bytes([code[0], code[1], code[2], code[3]])));
            }
            _ => {}
        }
        if goaway.is_some() && kind == GOAWAY {
            // A response may still follow for a stream below the last one processed; if the
            // server closes, the GOAWAY is the answer.
            continue;
        }
    }
}

/// Requests with odd pseudo-headers for `authority` and `path`; `valid` are the other fields that
/// make a request acceptable (a bearer token). (name, fields)
pub fn odd_requests(
    authority: &str,
    path: &str,
    valid: &[(&str, &[u8])],
) -> Vec<(&'static str, Vec<(Vec<u8>, Vec<u8>)>)> {
    let a = authority.as_bytes();
    let p = path.as_bytes();
    let base = |extra: &[(&[u8], &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut f: Vec<(Vec<u8>, Vec<u8>)> = extra.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        f.extend(valid.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())));
        f
    };
    fn fields<'x>(authority: &'x [u8], path: &'x [u8]) -> Vec<(&'x [u8], &'x [u8])> {
        vec![(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", path)]
    }
    let std = |path: &'static [u8]| fields(a, path);
    let std_p = || fields(a, p);
    vec![
        ("a path without a slash", base(&std(b"hello"))),
        ("two :path", base(&[std_p(), vec![(b":path", b"/other")]].concat())),
        ("an unknown pseudo-header", base(&[std_p(), vec![(b":tenant", b"x")]].concat())),
        ("no :method", base(std_p().get(1..).unwrap_or_default())),
        ("a pseudo-header after a header", {
            let mut f = base(&std_p());
            f.push((b":protocol".to_vec(), b"websocket".to_vec()));
            f
        }),
        ("an upper-case name", base(&[std_p(), vec![(b"X-Upper", b"1")]].concat())),
        ("a connection header", base(&[std_p(), vec![(b"connection", b"keep-alive")]].concat())),
        (
            "an :authority that is not UTF-8",
            base(&[(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"caf\xe9.example"), (b":path", p)]),
        ),
    ]
}

/// Checks an answer is a refusal: a 4xx status, or the stream or connection closed with an
/// error. (Envoy treats a malformed HTTP/2 request as a connection error: it closes the
/// connection, and its GOAWAY may be lost to the reset of unread bytes, hence `Closed`.)
pub fn refused(answer: &Answer) -> Result<()> {
    match answer {
        Answer::Status(s) if (400..500).contains(s) => Ok(()),
        Answer::Reset(code) | Answer::GoAway(code) if *code != 0 => Ok(()),
        Answer::Closed => Ok(()),
        other => bail!("not a refusal: {other:?}"),
    }
}

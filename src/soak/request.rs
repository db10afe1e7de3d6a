//! The requests a soak sends, and how their answers are read and named.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::Value;

use super::REQUEST_TIMEOUT;
use crate::client::{raw_statuses, Client, Request};
use crate::h2raw::{self, Answer};
use crate::hostile;

/// One request, as a class makes it.
pub enum Req {
    /// Through the harness client (HTTP/1.1, or HTTP/2 when its TLS ALPN says so).
    Http { client: Client, addr: SocketAddr, get: Get },
    /// Bytes on a raw HTTP/1.1 connection (a hostile case), over the client's TLS if it has one.
    Raw { client: Client, addr: SocketAddr, server_name: String, bytes: Vec<u8> },
    /// A request with a body, sent as its case says (`edgewise::hostile::body_cases`).
    Body { client: Client, addr: SocketAddr, server_name: String, case: hostile::BodyCase },
    /// One HTTP/2 request with exactly these header fields, written as frames.
    H2 {
        tls: Option<Arc<rustls::ClientConfig>>,
        addr: SocketAddr,
        server_name: String,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

/// A GET: its authority, path and extra headers.
#[derive(Clone)]
pub struct Get {
    pub authority: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Get {
    pub fn new(authority: &str, path: &str) -> Get {
        Get { authority: authority.to_string(), path: path.to_string(), headers: Vec::new() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Get {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn headers(self, headers: &[(&str, &str)]) -> Get {
        headers.iter().fold(self, |g, (k, v)| g.header(k, v))
    }

    pub fn bearer(self, token: &str) -> Get {
        self.header("authorization", &format!("Bearer {token}"))
    }
}

/// What came back.
pub enum Got {
    Http {
        status: u16,
        json: Option<Value>,
        text: String,
    },
    /// The responses on a raw connection: each one's status and what its JSON body names (the
    /// echoing stand-in's `"server"`, or `"error"`).
    Raw {
        responses: Vec<(u16, Option<String>)>,
        text: String,
    },
    H2(Answer),
    /// The final status of a request with a body (or how its HTTP/2 stream ended, or the error).
    Body(String),
    Error(String),
}

impl Got {
    /// The answer as the expectations name it: the status, followed by the echoing stand-in
    /// (`"server"`) or the JSON error (`"error"`, or `"status"` for the health endpoint);
    /// `200+200` for pipelined responses; `RST_STREAM 1`, `GOAWAY 1`, `closed` for HTTP/2
    /// frames; `refused` for a connection that failed, `timeout` for one that did not answer.
    pub fn label(&self) -> String {
        let named = |status: &u16, what: Option<&str>| match what {
            Some(w) => format!("{status} {w}"),
            None => status.to_string(),
        };
        match self {
            Got::Http { status, json, .. } => {
                named(status, json.as_ref().and_then(|j| names(j, &["server", "error", "status"])))
            }
            Got::Raw { responses, .. } if responses.is_empty() => "no response".into(),
            Got::Raw { responses, .. } => {
                responses.iter().map(|(s, what)| named(s, what.as_deref())).collect::<Vec<_>>().join("+")
            }
            Got::H2(Answer::Status(s)) => s.to_string(),
            Got::H2(Answer::Reset(code)) => format!("RST_STREAM {code}"),
            Got::H2(Answer::GoAway(code)) => format!("GOAWAY {code}"),
            Got::H2(Answer::Closed) => "closed".into(),
            Got::Body(answer) => answer.clone(),
            Got::Error(e) if e.contains("timed out") => "timeout".into(),
            Got::Error(_) => "refused".into(),
        }
    }

    /// The start of what came back, on one line, for the report's examples.
    pub fn detail(&self) -> String {
        let text = match self {
            Got::Http { text, .. } | Got::Raw { text, .. } | Got::Body(text) => text.clone(),
            Got::H2(a) => format!("{a:?}"),
            Got::Error(e) => e.clone(),
        };
        let text: String = text.chars().take(300).collect();
        text.replace('\n', " ").replace('\r', "")
    }

    pub fn json(&self) -> Option<&Value> {
        match self {
            Got::Http { json, .. } => json.as_ref(),
            _ => None,
        }
    }
}

/// The first of `keys` that is a string in `json`.
fn names<'a>(json: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| json.get(*k).and_then(Value::as_str))
}

pub async fn send(req: Req) -> Got {
    let failed = |e: anyhow::Error| Got::Error(format!("{e:#}"));
    match req {
        Req::Http { client, addr, get } => {
            let r = get.headers.iter().fold(Request::get(&get.authority, &get.path), |r, (k, v)| r.header(k, v));
            match client.send(addr, r).await {
                Ok(resp) => {
                    let json = serde_json::from_slice(&resp.body).ok();
                    Got::Http { status: resp.status, json, text: resp.text() }
                }
                Err(e) => failed(e),
            }
        }
        Req::Raw { client, addr, server_name, bytes } => {
            match raw_exchange(&client, addr, &server_name, &bytes).await {
                Ok(out) => Got::Raw { responses: raw_answers(&out), text: String::from_utf8_lossy(&out).into_owned() },
                Err(e) => failed(e),
            }
        }
        Req::Body { client, addr, server_name, case } => Got::Body(case.send(&client, addr, &server_name).await),
        Req::H2 { tls, addr, server_name, fields } => {
            let borrowed: Vec<(&[u8], &[u8])> = fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            match h2raw::request(tls, addr, &server_name, &borrowed).await {
                Ok(answer) => Got::H2(answer),
                Err(e) => failed(e),
            }
        }
    }
}

/// Each response's status and what its JSON body names. The library's reading of the statuses
/// is the reference; the bodies name what answered only when this reading agrees with it.
fn raw_answers(out: &[u8]) -> Vec<(u16, Option<String>)> {
    let statuses = raw_statuses(out);
    let bodies = parse_responses(out).0;
    let agree = bodies.len() == statuses.len() && bodies.iter().zip(&statuses).all(|(r, s)| r.status == *s);
    statuses
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let what = agree
                .then(|| bodies.get(i))
                .flatten()
                .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                .and_then(|j| names(&j, &["server", "error"]).map(str::to_owned));
            (*s, what)
        })
        .collect()
}

/// Writes `bytes` on a new HTTP/1.1 connection (over the client's TLS, if it has one, with
/// `server_name` as SNI) and reads the responses until the last complete one says
/// `connection: close`, or the server closes. (`Client::raw` reads until the server closes, and
/// Envoy keeps a connection it closes open for its delayed-close timeout, 1 s, waiting for the
/// client to close first, as a real client does.)
async fn raw_exchange(client: &Client, addr: SocketAddr, server_name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, bytes: &[u8]) -> Result<Vec<u8>> {
        io.write_all(bytes).await?;
        io.flush().await?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // A TLS peer may close without close_notify: what was read until then is the answer.
            let n = match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            out.extend_from_slice(buf.get(..n).unwrap_or_default());
            let (responses, complete) = parse_responses(&out);
            if complete && responses.last().is_some_and(|r| r.close) {
                break;
            }
        }
        Ok(out)
    }
    let run = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        match client.tls_config() {
            None => exchange(tcp, bytes).await,
            Some(config) => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                exchange(tls, bytes).await
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, run).await.map_err(|_| anyhow::anyhow!("raw exchange timed out"))?
}

/// One response of a raw HTTP/1.1 exchange.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// It said `connection: close`.
    pub close: bool,
}

/// The responses in `raw`, each body read by its Content-Length or chunked encoding, else to the
/// end; and whether the bytes end exactly after a complete response.
pub fn parse_responses(raw: &[u8]) -> (Vec<Response>, bool) {
    let mut out = Vec::new();
    let mut rest = raw;
    let mut complete = false;
    while let Some(head_end) = rest.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
        complete = false;
        let Some(head) = rest.get(..head_end).and_then(|h| std::str::from_utf8(h).ok()) else { break };
        let Some(status) = head.strip_prefix("HTTP/1.1 ").and_then(|h| h.get(..3)?.parse().ok()) else { break };
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
        };
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body_rest = rest.get(head_end..).unwrap_or_default();
        let (body, after) = if (100..200).contains(&status) || status == 204 || status == 304 {
            // No body, whatever the headers say (a 100 Continue before the final response).
            (Vec::new(), Some(body_rest))
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            match body_rest.get(..len) {
                Some(body) => (body.to_vec(), body_rest.get(len..)),
                None => (body_rest.to_vec(), None),
            }
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            dechunk(body_rest)
        } else {
            // No length: the body runs to the end of the connection.
            (body_rest.to_vec(), None)
        };
        out.push(Response { status, body, close });
        let Some(after) = after else { break };
        rest = after;
        complete = rest.is_empty();
    }
    (out, complete)
}

/// A chunked body, and what follows it (None: it does not end in these bytes).
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, Option<&[u8]>) {
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(rest.get(..line_end).unwrap_or_default())
            .ok()
            .and_then(|v| usize::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        let Some(chunk) = rest.get(line_end + 2..line_end + 2 + size) else { break };
        body.extend_from_slice(chunk);
        let Some(after) = rest.get(line_end + 2 + size + 2..) else { break };
        rest = after;
        if size == 0 {
            return (body, Some(rest));
        }
    }
    (body, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(raw: &str) -> (Vec<(u16, String, bool)>, bool) {
        let (responses, complete) = parse_responses(raw.as_bytes());
        let out = responses.into_iter().map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned(), r.close));
        (out.collect(), complete)
    }

    #[test]
    fn reads_length_chunked_and_bodiless_responses() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\n\
                   HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi\
                   HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (responses, complete) = statuses(raw);
        assert_eq!(responses, vec![(100, String::new(), false), (200, "hi".into(), false), (200, "abc".into(), true)]);
        assert!(complete);
    }

    #[test]
    fn an_incomplete_response_is_not_complete() {
        let (responses, complete) = statuses("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi");
        assert_eq!(responses, vec![(200, "hi".into(), false)]);
        assert!(!complete);
        let (responses, complete) = statuses("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n");
        assert_eq!(responses, vec![(200, "abc".into(), false)]);
        assert!(!complete);
        // Without a length the body runs to the end, which these bytes cannot tell.
        assert!(!statuses("HTTP/1.1 400 Bad Request\r\n\r\nno").1);
    }

    #[test]
    fn labels_name_the_status_and_what_answered() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\n{\"server\":\"a\"}\
                   HTTP/1.1 404 Not Found\r\ncontent-length: 11\r\n\r\n{\"error\":1}";
        let got = Got::Raw { responses: raw_answers(raw.as_bytes()), text: String::new() };
        assert_eq!(got.label(), "200 a+404");
        let json = serde_json::json!({ "error": "no_route", "server": "www" });
        assert_eq!(Got::Http { status: 404, json: Some(json), text: String::new() }.label(), "404 www");
        assert_eq!(Got::Error("raw exchange timed out".into()).label(), "timeout");
        assert_eq!(Got::Error("connection refused".into()).label(), "refused");
        assert_eq!(Got::H2(Answer::Reset(1)).label(), "RST_STREAM 1");
    }
}

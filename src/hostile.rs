//! Requests no well-behaved client sends, written as bytes on a raw HTTP/1.1 connection: what
//! every filter must answer with a clear status, without breaking the requests after them. And
//! requests with a body, every way one comes ([`body_cases`]): what a filter that pauses must
//! hold whole until it decides.

use std::net::SocketAddr;

use anyhow::Result;

use crate::client::{raw_get, raw_statuses, Client};
use crate::h2raw::Answer;

/// One hostile request: its name and its bytes (a whole exchange, closing the connection).
pub struct Case {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

/// The hostile requests for `host` and `path`; `valid` are the headers that make the request
/// acceptable to the filter (a bearer token), sent with each case unless the case replaces them.
pub fn cases(host: &str, path: &str, valid: &[(&str, &[u8])]) -> Vec<Case> {
    let host_b = host.as_bytes();
    let with = |extra: &[(&str, &[u8])]| raw_get(host_b, path, &[valid, extra].concat());
    let big = vec![b'a'; 60 * 1024];
    let many: Vec<(String, Vec<u8>)> = (0..200).map(|i| (format!("x-h-{i}"), b"v".to_vec())).collect();
    let many: Vec<(&str, &[u8])> = many.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let mut pipelined = raw_get(host_b, path, valid);
    // The first request of the pair keeps the connection open.
    if let Some(at) = pipelined.windows(19).position(|w| w == b"connection: close\r\n") {
        pipelined.drain(at..at + 19);
    }
    pipelined.extend_from_slice(&with(&[]));
    let mut body_on_get = with(&[("content-length", b"5")]);
    body_on_get.extend_from_slice(b"hello");
    let duplicated_host = {
        let mut r = with(&[]);
        let line = format!("host: {host}\r\n");
        if let Some(at) = r.windows(line.len()).position(|w| w == line.as_bytes()) {
            r.splice(at..at, b"host: another.example\r\n".iter().copied());
        }
        r
    };
    vec![
        Case { name: "obs-text in a header value", bytes: with(&[("x-anything", b"caf\xe9 \x80\xff")]) },
        Case { name: "control bytes in a header value", bytes: with(&[("x-control", b"a\x01b\x7fc")]) },
        Case { name: "a non-ASCII authority", bytes: raw_get("café.example".as_bytes(), path, valid) },
        Case { name: "a 60 KiB header value", bytes: with(&[("x-big", &big)]) },
        Case { name: "200 headers", bytes: with(&many) },
        Case { name: "a second Authorization", bytes: with(&[("authorization", b"Bearer forged.token.value")]) },
        Case { name: "a second Host", bytes: duplicated_host },
        Case { name: "two pipelined requests", bytes: pipelined },
        Case { name: "a body on GET", bytes: body_on_get },
        Case { name: "a POST with Content-Length", bytes: post(host_b, path, valid, Framing::Length, BODY) },
        Case { name: "a chunked POST with trailers", bytes: post(host_b, path, valid, Framing::Chunked, BODY) },
        Case {
            name: "a POST with Expect: 100-continue, its body at once",
            bytes: [post(host_b, path, valid, Framing::Expect, BODY), BODY.to_vec()].concat(),
        },
    ]
}

/// The body of every request that carries one, recognisable in what a backend saw.
pub const BODY: &[u8] = b"edgewise body 0123456789";

/// How a POST sends its body.
#[derive(Clone, Copy)]
enum Framing {
    Length,
    /// Chunked, with a trailer.
    Chunked,
    /// `Expect: 100-continue` and Content-Length: only the head (the caller sends the body).
    Expect,
}

/// A POST of `body` as bytes for [`Client::raw`], closing the connection after its response.
fn post(host: &[u8], path: &str, headers: &[(&str, &[u8])], framing: Framing, body: &[u8]) -> Vec<u8> {
    let mut out = raw_get(host, path, headers);
    out.splice(..3, b"POST".iter().copied());
    let at = out.len() - 2;
    let (extra, body) = match framing {
        Framing::Length => (format!("content-length: {}\r\n", body.len()), body.to_vec()),
        Framing::Chunked => {
            let size = format!("{:x}\r\n", body.len());
            let chunk = [size.as_bytes(), body, b"\r\n0\r\nx-edgewise-trailer: 1\r\n\r\n"].concat();
            ("transfer-encoding: chunked\r\n".to_string(), chunk)
        }
        Framing::Expect => (format!("expect: 100-continue\r\ncontent-length: {}\r\n", body.len()), Vec::new()),
    };
    out.splice(at..at, extra.into_bytes());
    out.extend_from_slice(&body);
    out
}

/// A request with a body, as [`body_cases`] makes it.
pub struct BodyCase {
    pub name: &'static str,
    delivery: Delivery,
}

enum Delivery {
    /// HTTP/1.1 bytes, and the body to send after a `100 Continue`.
    Raw(Vec<u8>, Option<&'static [u8]>),
    /// HTTP/2 header fields; DATA ([`BODY`]) and a trailer follow.
    H2(Vec<(Vec<u8>, Vec<u8>)>),
}

/// Requests with a body, every way one comes: over HTTP/1.1 with Content-Length, chunked with a
/// trailer, with `Expect: 100-continue` (the body only after the `100`), larger than Envoy's
/// buffer limit (2 MiB), and over HTTP/2 (DATA, then trailers).
///
/// A filter that pauses a request must hold it whole until it decides: sent while it is paused,
/// each must get the answer the same request without a body gets, and the upstream must see
/// nothing of any that is refused.
pub fn body_cases(host: &str, path: &str, headers: &[(&str, &[u8])]) -> Vec<BodyCase> {
    let h = host.as_bytes();
    let big = post(h, path, headers, Framing::Length, &vec![b'x'; 2 * 1024 * 1024]);
    let fields = [(":method", "POST".as_bytes()), (":scheme", b"https"), (":authority", h), (":path", path.as_bytes())]
        .into_iter()
        .chain(headers.iter().copied())
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect();
    vec![
        BodyCase {
            name: "a POST with Content-Length",
            delivery: Delivery::Raw(post(h, path, headers, Framing::Length, BODY), None),
        },
        BodyCase {
            name: "a chunked POST with trailers",
            delivery: Delivery::Raw(post(h, path, headers, Framing::Chunked, BODY), None),
        },
        BodyCase {
            name: "a POST with Expect: 100-continue",
            delivery: Delivery::Raw(post(h, path, headers, Framing::Expect, BODY), Some(BODY)),
        },
        BodyCase { name: "a 2 MiB POST, over Envoy's buffer limit", delivery: Delivery::Raw(big, None) },
        BodyCase { name: "HTTP/2: a POST with DATA and trailers", delivery: Delivery::H2(fields) },
    ]
}

impl BodyCase {
    /// Sends it on a connection of its own (over TLS when the client has it; HTTP/2 by ALPN):
    /// its final status (informational ones left out, `200+200` for two), or how an HTTP/2
    /// stream ended, or the error.
    pub async fn send(&self, client: &Client, addr: SocketAddr, server_name: &str) -> String {
        match &self.delivery {
            Delivery::Raw(head, after_100) => match client.raw_continued(addr, server_name, head, *after_100).await {
                Ok(out) => {
                    let statuses: Vec<String> =
                        raw_statuses(&out).into_iter().filter(|s| *s >= 200).map(|s| s.to_string()).collect();
                    statuses.join("+")
                }
                Err(e) => format!("{e:#}"),
            },
            Delivery::H2(fields) => {
                let fields: Vec<(&[u8], &[u8])> = fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
                let body = crate::h2raw::Body { data: BODY, trailers: &[(b"x-edgewise-trailer", b"1")] };
                match crate::h2raw::request_with_body(client.tls_config(), addr, server_name, &fields, Some(body)).await
                {
                    Ok(Answer::Status(s)) => s.to_string(),
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("{e:#}"),
                }
            }
        }
    }
}

/// Every case of [`body_cases`] at once: (name, answer).
pub async fn with_bodies(
    client: &Client,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &[u8])],
) -> Vec<(&'static str, String)> {
    let cases = body_cases(host, path, headers);
    let sends = cases.iter().map(|case| async move { (case.name, case.send(client, addr, host).await) });
    futures_util::future::join_all(sends).await
}
/// What a filter answered to the whole class.
#[derive(Debug)]
pub struct Report {
    /// Each HTTP/1.1 case and the statuses of its responses.
    pub http1: Vec<(&'static str, Vec<u16>)>,
    /// A valid HTTP/2 request (proof that the raw HTTP/2 client is understood).
    pub h2_valid: Answer,
    /// Each request of [`crate::h2raw::odd_requests`] and its answer.
    pub h2_odd: Vec<(&'static str, Answer)>,
}

impl Report {
    /// Asserts the HTTP/1.1 statuses, a 200 for the valid HTTP/2 request, and a refusal of every
    /// odd one.
    pub fn check(&self, expected: &[(&str, &[u16])]) {
        let got: Vec<(&str, &[u16])> = self.http1.iter().map(|(n, s)| (*n, s.as_slice())).collect();
        assert_eq!(got, expected, "HTTP/1.1");
        assert_eq!(self.h2_valid, Answer::Status(200), "a valid HTTP/2 request");
        for (name, answer) in &self.h2_odd {
            assert!(crate::h2raw::refused(answer).is_ok(), "HTTP/2 {name}: {answer:?}");
        }
    }
}

/// Sends the class to `addr` for `host` and `path` (over TLS when the client has it), each
/// request on a connection of its own.
pub async fn run(client: &Client, addr: SocketAddr, host: &str, path: &str, valid: &[(&str, &[u8])]) -> Result<Report> {
    let cases = cases(host, path, valid);
    let http1 = send(client, addr, host, &cases).await?;
    let (h2_valid, h2_odd) = send_h2(client.tls_config(), addr, host, path, valid).await?;
    Ok(Report { http1: cases.iter().map(|c| c.name).zip(http1).collect(), h2_valid, h2_odd })
}

/// Sends each case on its own connection; the statuses of the responses to each.
async fn send(client: &Client, addr: SocketAddr, server_name: &str, cases: &[Case]) -> Result<Vec<Vec<u16>>> {
    let mut statuses = Vec::with_capacity(cases.len());
    for case in cases {
        let out = client.raw(addr, server_name, &case.bytes).await?;
        statuses.push(raw_statuses(&out));
    }
    Ok(statuses)
}

/// Sends a valid HTTP/2 request, then each request of [`crate::h2raw::odd_requests`], on
/// connections of their own: the valid one's status, and each odd one's name and answer.
async fn send_h2(
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    addr: SocketAddr,
    server_name: &str,
    path: &str,
    valid: &[(&str, &[u8])],
) -> Result<(Answer, Vec<(&'static str, Answer)>)> {
    use crate::h2raw::{odd_requests, request};
    let mut good: Vec<(Vec<u8>, Vec<u8>)> = [
        (":method", "GET".as_bytes()),
        (":scheme", b"https"),
        (":authority", server_name.as_bytes()),
        (":path", path.as_bytes()),
    ]
    .iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
    .collect();
    good.extend(valid.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())));
    fn borrow(f: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
        f.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect()
    }
    let valid_answer = request(tls.clone(), addr, server_name, &borrow(&good)).await?;
    let mut answers = Vec::new();
    for (name, fields) in odd_requests(server_name, path, valid) {
        answers.push((name, request(tls.clone(), addr, server_name, &borrow(&fields)).await?));
    }
    Ok((valid_answer, answers))
}

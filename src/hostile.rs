//! Requests no well-behaved client sends, written as bytes on a raw HTTP/1.1 connection: what
//! every filter must answer with a clear status, without breaking the requests after them.

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
    ]
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

//! `make soak`: every scenario under a bounded load of valid, invalid and hostile requests while
//! certificates rotate (serverless, mesh) and the token issuer (cloud-connector, tunnel) and the
//! management service (serverless) flap. Every answer is classified against the answers its
//! request's class allows (and what each allowed answer adds to the filters' counters and to the
//! stand-ins' request counts); Envoy's RSS is sampled; afterwards the counters are compared with
//! what was sent, and VM failures (wasm: `wasm.<plugin>.vm_reload_*`; native:
//! `edgewise.<filter>.panics`) are read. Results go to bench/soak.md; the exit status is non-zero
//! if anything was unexpected.
//!
//! Each build runs in a child process of its own (EDGEWISE_BUILD set for it), all five scenarios
//! at once, everything on 127.0.0.1.
//!
//! Environment: SOAK_SECONDS (the whole run, set-up included, split between the builds; default
//! 600), EDGEWISE_BUILD (wasm or native; default both), SOAK_RPS (requests per second per
//! scenario, default 20), SOAK_TASKS (concurrent tasks per scenario, default 8: an HTTP/2 refusal
//! holds one for a second, Envoy's delayed close), SOAK_PROBE=1
//! (send each class once on a quiet Envoy and print its answer and counter deltas, then stop:
//! for updating the expectations when the hostile cases change).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgewise::certs::{Ca, LeafSpec};
use edgewise::client::{raw_get, raw_statuses, Client, Request};
use edgewise::dns::Dns;
use edgewise::envoy::{self, Build, Config, Envoy, Options};
use edgewise::h2raw::{self, Answer};
use edgewise::hostile;
use edgewise::idp::{self, Idp};
use edgewise::scenarios::cloud_connector::{self as cc, Issuers, CUSTOMERS, GITLAB};
use edgewise::scenarios::egress as eg;
use edgewise::scenarios::mesh;
use edgewise::scenarios::serverless as sl;
use edgewise::scenarios::tunnel as tn;
use edgewise::server::{DocMode, Document, Listen, Server};
use edgewise::tls;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How long a request may take before it counts as a timeout (an unexpected answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// RSS sampling period.
const RSS_EVERY: Duration = Duration::from_secs(5);
/// Time kept at the end of a build's budget for reading the results and stopping everything.
const TEARDOWN: Duration = Duration::from_secs(4);
/// Examples of unexpected answers kept per class.
const EXAMPLES: usize = 5;
/// The HMAC secret of the cloud-connector scenario (the backends' signature is checked with it).
const CC_SECRET: &str = "edgewise-soak-secret-of-more-than-32-bytes";
/// The RSS growth that counts as a leak: over the second half of the load, both a slope above
/// this many MiB per minute and a growth above `RSS_GROWTH_MIB`.
const RSS_SLOPE_LIMIT: f64 = 1.0;
const RSS_GROWTH_MIB: f64 = 4.0;

// ---------------------------------------------------------------------------------------------
// Requests, answers and what a class allows.

/// The hostile cases with a body (`edgewise::hostile::cases`), by name.
const POST_LENGTH: &str = "a POST with Content-Length";
const POST_CHUNKED: &str = "a chunked POST with trailers";
const POST_EXPECT: &str = "a POST with Expect: 100-continue, its body at once";

/// One request, as a class makes it.
enum Req {
    /// Through the harness client (HTTP/1.1, or HTTP/2 when its TLS ALPN says so).
    Http { client: Client, addr: SocketAddr, authority: String, path: String, headers: Vec<(String, String)> },
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

fn http(client: &Client, addr: SocketAddr, authority: &str, path: &str, headers: &[(&str, &str)]) -> Req {
    Req::Http {
        client: client.clone(),
        addr,
        authority: authority.to_string(),
        path: path.to_string(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// What came back.
enum Got {
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
    fn label(&self) -> String {
        match self {
            Got::Http { status, json, .. } => {
                let what = json
                    .as_ref()
                    .and_then(|j| ["server", "error", "status"].iter().find_map(|k| j.get(*k).and_then(Value::as_str)));
                match what {
                    Some(w) => format!("{status} {w}"),
                    None => status.to_string(),
                }
            }
            Got::Raw { responses, .. } => {
                if responses.is_empty() {
                    return "no response".into();
                }
                responses
                    .iter()
                    .map(|(s, what)| match what {
                        Some(w) => format!("{s} {w}"),
                        None => s.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("+")
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

    fn detail(&self) -> String {
        let text = match self {
            Got::Http { text, .. } | Got::Raw { text, .. } | Got::Body(text) => text.clone(),
            Got::H2(a) => format!("{a:?}"),
            Got::Error(e) => e.clone(),
        };
        let text: String = text.chars().take(300).collect();
        text.replace('\n', " ").replace('\r', "")
    }

    fn json(&self) -> Option<&Value> {
        match self {
            Got::Http { json, .. } => json.as_ref(),
            _ => None,
        }
    }
}

async fn send(req: Req) -> Got {
    match req {
        Req::Http { client, addr, authority, path, headers } => {
            let mut r = Request::get(&authority, &path);
            for (k, v) in &headers {
                r = r.header(k, v);
            }
            match client.send(addr, r).await {
                Ok(resp) => {
                    let json = serde_json::from_slice(&resp.body).ok();
                    Got::Http { status: resp.status, json, text: resp.text() }
                }
                Err(e) => Got::Error(format!("{e:#}")),
            }
        }
        Req::Raw { client, addr, server_name, bytes } => {
            match raw_exchange(&client, addr, &server_name, &bytes).await {
                Ok(out) => {
                    let statuses = raw_statuses(&out);
                    let bodies = split_responses(&out);
                    // The library's reading of the statuses is the reference; the bodies name what
                    // answered when this reading agrees with it.
                    let agree =
                        bodies.len() == statuses.len() && bodies.iter().zip(&statuses).all(|((s, _), t)| s == t);
                    let responses = statuses
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let what = agree
                                .then(|| bodies.get(i))
                                .flatten()
                                .and_then(|(_, b)| serde_json::from_slice::<Value>(b).ok())
                                .and_then(|j| {
                                    ["server", "error"].iter().find_map(|k| j.get(*k)?.as_str().map(str::to_owned))
                                });
                            (*s, what)
                        })
                        .collect();
                    Got::Raw { responses, text: String::from_utf8_lossy(&out).into_owned() }
                }
                Err(e) => Got::Error(format!("{e:#}")),
            }
        }
        Req::Body { client, addr, server_name, case } => Got::Body(case.send(&client, addr, &server_name).await),
        Req::H2 { tls, addr, server_name, fields } => {
            let borrowed: Vec<(&[u8], &[u8])> = fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            match h2raw::request(tls, addr, &server_name, &borrowed).await {
                Ok(answer) => Got::H2(answer),
                Err(e) => Got::Error(format!("{e:#}")),
            }
        }
    }
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
            if complete && responses.last().is_some_and(|r| r.2) {
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

/// The responses of a raw HTTP/1.1 exchange: (status, body), each body read by its
/// Content-Length or chunked encoding, else to the end.
fn split_responses(raw: &[u8]) -> Vec<(u16, Vec<u8>)> {
    parse_responses(raw).0.into_iter().map(|(s, b, _)| (s, b)).collect()
}

/// (status, body, `connection: close`) of each response, and whether the bytes end exactly
/// after a complete response.
fn parse_responses(raw: &[u8]) -> (Vec<(u16, Vec<u8>, bool)>, bool) {
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
        let mut body_rest = rest.get(head_end..).unwrap_or_default();
        if (100..200).contains(&status) || status == 204 || status == 304 {
            // No body, whatever the headers say (a 100 Continue before the final response).
            out.push((status, Vec::new(), close));
            rest = body_rest;
            complete = rest.is_empty();
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let Some(body) = body_rest.get(..len) else {
                out.push((status, body_rest.to_vec(), close));
                break;
            };
            out.push((status, body.to_vec(), close));
            rest = body_rest.get(len..).unwrap_or_default();
            complete = rest.is_empty();
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            let mut ended = false;
            while let Some(line_end) = body_rest.windows(2).position(|w| w == b"\r\n") {
                let size = std::str::from_utf8(body_rest.get(..line_end).unwrap_or_default())
                    .ok()
                    .and_then(|v| usize::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or(0);
                let Some(chunk) = body_rest.get(line_end + 2..line_end + 2 + size) else { break };
                body.extend_from_slice(chunk);
                let Some(after) = body_rest.get(line_end + 2 + size + 2..) else { break };
                body_rest = after;
                if size == 0 {
                    ended = true;
                    break;
                }
            }
            out.push((status, body, close));
            if !ended {
                break;
            }
            rest = body_rest;
            complete = rest.is_empty();
        } else {
            // No length: the body runs to the end of the connection.
            out.push((status, body_rest.to_vec(), close));
            break;
        }
    }
    (out, complete)
}

/// Which answers an allowed entry covers.
enum Want {
    /// Exactly this label.
    Label(String),
    /// An HTTP/2 refusal as `h2raw::refused` defines it: a 4xx, RST_STREAM or GOAWAY with an
    /// error code, or the connection closed.
    H2Refused,
    /// Any clear answer (no 5xx, no failed connection): for hostile cases with no listed
    /// expectation.
    AnyClear,
}

impl Want {
    fn matches(&self, got: &Got, label: &str) -> bool {
        match self {
            Want::Label(l) => l == label,
            Want::H2Refused => matches!(got, Got::H2(a) if h2raw::refused(a).is_ok()),
            Want::AnyClear => match got {
                Got::Http { status, .. } => *status < 500,
                Got::Raw { responses, .. } => !responses.is_empty() && responses.iter().all(|(s, _)| *s < 500),
                Got::H2(Answer::Status(s)) => *s < 500,
                Got::H2(a) => h2raw::refused(a).is_ok(),
                Got::Body(answer) => answer.parse::<u16>().is_ok_and(|s| s < 500),
                Got::Error(_) => false,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Want::Label(l) => format!("`{l}`"),
            Want::H2Refused => "an HTTP/2 refusal (4xx, RST_STREAM/GOAWAY with an error code, or closed)".into(),
            Want::AnyClear => "any answer without a 5xx (no expectation listed for this case)".into(),
        }
    }
}

type Check = Box<dyn Fn(&Got) -> Result<(), String> + Send + Sync>;

/// An answer a class allows, and what it adds to the counters (`None`: not known, for cases
/// with no listed expectation; the counter checks then allow for it).
struct Allowed {
    want: Want,
    counters: Option<Vec<(String, u64)>>,
    check: Option<Check>,
    /// What the check verifies, for the report.
    checks: &'static str,
}

fn ok(label: &str, counters: &[(&str, u64)]) -> Allowed {
    Allowed {
        want: Want::Label(label.to_string()),
        counters: Some(counters.iter().map(|(k, n)| (k.to_string(), *n)).collect()),
        check: None,
        checks: "",
    }
}

impl Allowed {
    fn check(mut self, what: &'static str, f: impl Fn(&Got) -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.check = Some(Box::new(f));
        self.checks = what;
        self
    }

    fn h2_refused(counters: &[(&str, u64)]) -> Self {
        Allowed { want: Want::H2Refused, ..ok("", counters) }
    }

    fn any_clear() -> Self {
        Allowed { want: Want::AnyClear, counters: None, check: None, checks: "" }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Valid,
    Invalid,
    HostileH1,
    HostileH2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::Invalid => "invalid",
            Kind::HostileH1 => "hostile HTTP/1.1",
            Kind::HostileH2 => "hostile HTTP/2",
        }
    }
}

type Make = Box<dyn Fn(u64) -> Req + Send + Sync>;

/// A kind of request, how often it is sent (its weight in the mix) and what it may get.
struct Class {
    kind: Kind,
    name: String,
    weight: u32,
    make: Make,
    allowed: Vec<Allowed>,
    /// A rate limit the class runs into: how many `allowed` answers at most.
    bound: Option<Bound>,
}

struct Bound {
    allowed: &'static str,
    limited: &'static str,
    burst: f64,
    per_second: f64,
}

fn class(kind: Kind, name: impl Into<String>, weight: u32, make: Make, allowed: Vec<Allowed>) -> Class {
    Class { kind, name: name.into(), weight, make, allowed, bound: None }
}

fn fixed(req: impl Fn() -> Req + Send + Sync + 'static) -> Make {
    Box::new(move |_| req())
}

/// The hostile HTTP/1.1 cases of `edgewise::hostile`, with the answers `table` lists for each
/// (a case it does not list may get any clear answer, with unknown counters).
fn hostile_classes(
    cases: Vec<hostile::Case>,
    client: &Client,
    addr: SocketAddr,
    server_name: &str,
    table: impl Fn(&str) -> Option<Vec<Allowed>>,
) -> Vec<Class> {
    cases
        .into_iter()
        .map(|case| {
            let (allowed, note) = match table(case.name) {
                Some(a) => (a, ""),
                None => (vec![Allowed::any_clear()], " (no expectation listed)"),
            };
            let (client, server_name, bytes) = (client.clone(), server_name.to_string(), case.bytes);
            let make = fixed(move || Req::Raw {
                client: client.clone(),
                addr,
                server_name: server_name.clone(),
                bytes: bytes.clone(),
            });
            class(Kind::HostileH1, format!("{}{note}", case.name), 1, make, allowed)
        })
        .collect()
}

/// A valid HTTP/2 request written as frames, and each request of `h2raw::odd_requests`.
#[allow(clippy::too_many_arguments)]
fn h2_classes(
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: SocketAddr,
    server_name: &str,
    path: &str,
    valid: &[(&str, &[u8])],
    valid_allowed: Vec<Allowed>,
    table: impl Fn(&str) -> Option<Vec<Allowed>>,
) -> Vec<Class> {
    let mut good: Vec<(Vec<u8>, Vec<u8>)> =
        [(":method", "GET"), (":scheme", "https"), (":authority", server_name), (":path", path)]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
    good.extend(valid.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())));
    let mut requests = vec![("a valid request, as frames".to_string(), good, valid_allowed, Kind::Valid)];
    for (name, fields) in h2raw::odd_requests(server_name, path, valid) {
        let (allowed, note) = match table(name) {
            Some(a) => (a, ""),
            None => (vec![Allowed { counters: None, ..Allowed::h2_refused(&[]) }], " (no expectation listed)"),
        };
        requests.push((format!("{name}{note}"), fields, allowed, Kind::HostileH2));
    }
    requests
        .into_iter()
        .map(|(name, fields, allowed, kind)| {
            let (tls, server_name) = (tls.clone(), server_name.to_string());
            let make = fixed(move || Req::H2 {
                tls: tls.clone(),
                addr,
                server_name: server_name.clone(),
                fields: fields.clone(),
            });
            let kind = if kind == Kind::Valid { Kind::HostileH2 } else { kind };
            class(kind, format!("HTTP/2: {name}"), 1, make, allowed)
        })
        .collect()
}

/// The JSON an echoing stand-in returned: one of its request headers.
fn seen_header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    seen["headers"].as_array()?.iter().find_map(|h| {
        let pair = h.as_array()?;
        (pair.first()?.as_str()? == name).then(|| pair.get(1)?.as_str()).flatten()
    })
}

fn body(got: &Got) -> Result<&Value, String> {
    got.json().ok_or_else(|| "no JSON body".to_string())
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// An Envoy whose RSS is sampled and whose counters are read.
struct Watched {
    role: &'static str,
    envoy: Arc<Envoy>,
    /// Counters compared with what was sent (by their name without `wasmcustom.`).
    prefixes: Vec<String>,
    /// The wasm plugin name and the native filter name (None: the Envoy runs no filter).
    plugin: Option<(&'static str, &'static str)>,
}

type StandIn = Box<dyn Fn() -> u64 + Send + Sync>;
type ChaosFn = Box<dyn FnOnce(Arc<Chaos>, Instant) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A change the chaos should cause, read from an Envoy's stats.
struct Effect {
    what: &'static str,
    role: &'static str,
    stat: Sel,
    /// The chaos event kind that must have moved it (when such events happened).
    requires: Option<&'static str>,
}

enum Sel {
    Exact(String),
    Suffix(&'static str),
}

/// A counter checked against others instead of against what was sent: (what, left, right)
/// from the counters' deltas and the expected counts.
type Relation = (String, Box<dyn Fn(&BTreeMap<String, u64>, &BTreeMap<String, u64>) -> (u64, u64) + Send + Sync>);

struct Scenario {
    name: &'static str,
    about: String,
    classes: Vec<Class>,
    watched: Vec<Watched>,
    stand_ins: Vec<(String, StandIn)>,
    chaos_fn: Mutex<Option<ChaosFn>>,
    chaos: Arc<Chaos>,
    chaos_about: String,
    effects: Vec<Effect>,
    relations: Vec<Relation>,
    /// Counter keys left out of the exact comparison (checked by a relation).
    relational: Vec<String>,
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

/// What the chaos of a scenario did, and what is going on right now.
#[derive(Default)]
struct Chaos {
    t0: Mutex<Option<Instant>>,
    events: Mutex<Vec<String>>,
    active: Mutex<BTreeSet<String>>,
    problems: Mutex<Vec<String>>,
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Chaos {
    fn t(&self) -> f64 {
        self.t0.lock().ok().and_then(|t| t.map(|t| t.elapsed().as_secs_f64())).unwrap_or(0.0)
    }

    fn event(&self, kind: &str, what: impl Into<String>) {
        let line = format!("t={:.1} s: {}", self.t(), what.into());
        if let Ok(mut e) = self.events.lock() {
            e.push(line);
        }
        self.tally(kind);
    }

    /// Counts an event of this kind without logging it.
    fn tally(&self, kind: &str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(kind.to_string()).or_default() += 1;
        }
    }

    fn set(&self, condition: &str, on: bool) {
        if let Ok(mut a) = self.active.lock() {
            if on {
                a.insert(condition.to_string());
            } else {
                a.remove(condition);
            }
        }
    }

    fn active(&self) -> String {
        let a = self.active.lock().map(|a| a.iter().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default();
        if a.is_empty() {
            "steady".into()
        } else {
            a
        }
    }

    fn problem(&self, what: impl Into<String>) {
        let line = format!("t={:.1} s: {}", self.t(), what.into());
        eprintln!("soak: chaos problem: {line}");
        if let Ok(mut p) = self.problems.lock() {
            p.push(line);
        }
    }

    fn count(&self, kind: &str) -> u64 {
        self.counts.lock().map(|c| c.get(kind).copied().unwrap_or(0)).unwrap_or(0)
    }
}

/// Sleeps `d` or until the deadline; true if there is time left after it.
async fn nap(d: Duration, deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    tokio::time::sleep_until((now + d).min(deadline).into()).await;
    Instant::now() < deadline
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn key(role: &str, metric: &str) -> String {
    format!("{role}: {metric}")
}

fn stand_in(name: &str, count: impl Fn() -> u64 + Send + Sync + 'static) -> (String, StandIn) {
    (name.to_string(), Box::new(count))
}

/// The sum of `*.ssl_context_update_by_sds`: how often Envoy rebuilt a TLS context from SDS.
async fn tls_updates(envoy: &Envoy) -> u64 {
    envoy
        .stats()
        .await
        .map(|s| s.iter().filter(|(k, _)| k.ends_with(".ssl_context_update_by_sds")).map(|(_, v)| v).sum())
        .unwrap_or(0)
}

// --- serverless --------------------------------------------------------------------------------

const B_LABEL: &str = "1111111a-2222222b-333333333c";
const B_KNATIVE: &str = "fn-b.ns-7.knative.customer-b.example";

async fn serverless(run: &Path, _long_exp: u64) -> Result<Scenario> {
    let role = "serverless";
    let routed = key(role, "edgewise.serverless.requests.routed");
    let unknown = key(role, "edgewise.serverless.requests.unknown_function");
    let malformed = key(role, "edgewise.serverless.requests.malformed_host");
    let (a_key, b_key, www_key) = ("stand-in: customer-a", "stand-in: customer-b", "stand-in: www");

    let pki = Arc::new(sl::Pki::install(run)?);
    let a = Arc::new(
        sl::gateway("customer-a", 0, &sl::gateway_leaf(&pki.customer_a_ca, "customer-a")?, &pki.platform_ca).await?,
    );
    let b = Arc::new(
        sl::gateway("customer-b", 0, &sl::gateway_leaf(&pki.customer_b_ca, "customer-b")?, &pki.platform_ca).await?,
    );
    let www = Arc::new(Server::echo("www", Listen::default()).await?);
    let b_host = format!("{B_LABEL}.{}", sl::DOMAIN);
    let doc = Document::new(sl::table(1, &[(B_LABEL, "customer-b", B_KNATIVE)]));
    let mgmt = Server::start("management", Listen::default(), doc.handler()).await?;
    let config = Config::shipped("serverless")
        .run_dir(run)
        .port(sl::ports::FRONT, 0)
        .port(sl::ports::CUSTOMER_A, a.port())
        .port(sl::ports::CUSTOMER_B, b.port())
        .port(sl::ports::WWW, www.port())
        .port(sl::ports::MANAGEMENT, mgmt.port())
        .replace("\"poll_interval_ms\": 2000", "\"poll_interval_ms\": 500");
    let envoy = Arc::new(Envoy::start(&config).await?);
    let front = envoy.listener("serverless_https").await?;
    let version = envoy::stat("edgewise.serverless.table.version");
    envoy.wait_stat("the first route table", secs(20), |s| s.get(&version) == Some(&1)).await?;
    // The other worker installs it at its next tick.
    tokio::time::sleep(secs(1)).await;

    let front_ca2 = Arc::new(Ca::new("edgewise front CA 2")?);
    let trust = [pki.front_ca.pem.as_str(), front_ca2.pem.as_str()];
    let h1 = Client::tls(tls::client(&trust, None, &["http/1.1"])?).sni(sl::INLINE_HOST).timeout(REQUEST_TIMEOUT);
    let h2 = Client::tls(tls::client(&trust, None, &["h2"])?).sni(sl::INLINE_HOST).timeout(REQUEST_TIMEOUT);

    let reached = |expected_host: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["host"] != expected_host {
                return Err(format!("the gateway saw Host {}", seen["host"]));
            }
            if seen_header(seen, "x-edgewise-cluster").is_some() {
                return Err("x-edgewise-cluster left Envoy".into());
            }
            let client_id = format!("URI:{}", sl::PLATFORM_CLIENT_ID);
            if seen["tls"]["peer_sans"][0] != client_id.as_str() {
                return Err(format!("Envoy presented {} to the gateway", seen["tls"]["peer_sans"]));
            }
            Ok(())
        }
    };
    let to_a = |n: u64| [(routed.as_str(), n), (a_key, n)];
    let via_a = |label: &str| ok(label, &to_a(1));
    const CHECK_A: &str = "Host is the function's Knative host, Envoy presented the platform identity, x-edgewise-cluster did not leave Envoy";

    let (c1, c2, c3) = (h1.clone(), h1.clone(), h1.clone());
    let mut classes = vec![
        class(
            Kind::Valid,
            "inline function -> customer-a (HTTP/1.1)",
            10,
            fixed(move || http(&c1, front, sl::INLINE_HOST, "/hello?x=1", &[])),
            vec![via_a("200 customer-a").check(CHECK_A, reached(sl::INLINE_KNATIVE_HOST))],
        ),
        class(
            Kind::Valid,
            "polled function -> customer-b (HTTP/2)",
            8,
            {
                let (h2, b_host) = (h2.clone(), b_host.clone());
                fixed(move || http(&h2, front, &b_host, "/", &[]))
            },
            vec![ok("200 customer-b", &[(routed.as_str(), 1), (b_key, 1)]).check(CHECK_A, reached(B_KNATIVE))],
        ),
        class(
            Kind::Valid,
            "another site on the listener (www.example.com)",
            2,
            fixed(move || http(&c2, front, "www.example.com", "/", &[])),
            vec![ok("200 www", &[(www_key, 1)])],
        ),
        class(
            Kind::Invalid,
            "a function with a forged x-edgewise-cluster and x-forwarded-host",
            2,
            {
                let b_host = b_host.clone();
                fixed(move || {
                    http(
                        &c3,
                        front,
                        sl::INLINE_HOST,
                        "/",
                        &[("x-edgewise-cluster", "customer-b"), ("x-forwarded-host", &b_host)],
                    )
                })
            },
            vec![via_a("200 customer-a").check(CHECK_A, reached(sl::INLINE_KNATIVE_HOST))],
        ),
        class(
            Kind::Invalid,
            "another site with a forged x-edgewise-cluster",
            1,
            {
                let h1 = h1.clone();
                fixed(move || http(&h1, front, "www.example.com", "/", &[("x-edgewise-cluster", "customer-a")]))
            },
            vec![ok("200 www", &[(www_key, 1)])],
        ),
        class(
            Kind::Invalid,
            "unknown function host",
            5,
            {
                let h1 = h1.clone();
                Box::new(move |n| {
                    let host = format!("f000{:04x}-{:08x}-{:010x}.{}", n & 0xffff, n % 997, n, sl::DOMAIN);
                    http(&h1, front, &host, "/", &[])
                })
            },
            vec![ok("404 unknown_function", &[(unknown.as_str(), 1)])],
        ),
        class(
            Kind::Invalid,
            "malformed function host (lengths, non-hex, extra labels)",
            4,
            {
                let h1 = h1.clone();
                Box::new(move |n| {
                    let bad = [
                        "0000000a-0000000b-00000000c",
                        "0000000a-0000000b-000000000g",
                        "x.0000000a-0000000b-000000000c",
                        "0000000a-0000000b",
                    ];
                    let host = format!("{}.{}", bad[(n % 4) as usize], sl::DOMAIN);
                    http(&h1, front, &host, "/", &[])
                })
            },
            vec![ok("404 malformed_host", &[(malformed.as_str(), 1)])],
        ),
        class(
            Kind::Invalid,
            "a host no site is served at",
            1,
            {
                let h1 = h1.clone();
                fixed(move || http(&h1, front, "nothing.example.org", "/", &[]))
            },
            vec![ok("404 no_route", &[])],
        ),
    ];
    let table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "obs-text in a header value" | "a second Authorization" | "a body on GET" | POST_LENGTH | POST_CHUNKED => {
                vec![via_a("200 customer-a")]
            }
            POST_EXPECT => vec![via_a("100+200 customer-a")],
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            // The two Host values reach the filter joined ("another.example,<host>"): not a
            // function host.
            "a second Host" => vec![ok("404 malformed_host", &[(malformed.as_str(), 1)])],
            "two pipelined requests" => vec![ok("200 customer-a+200 customer-a", &to_a(2))],
            _ => return None,
        })
    };
    classes.extend(hostile_classes(hostile::cases(sl::INLINE_HOST, "/", &[]), &h1, front, sl::INLINE_HOST, table));
    let h2_table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "a path without a slash"
            | "two :path"
            | "an unknown pseudo-header"
            | "no :method"
            | "a pseudo-header after a header"
            | "an upper-case name"
            | "a connection header"
            | "an :authority that is not UTF-8" => vec![Allowed::h2_refused(&[])],
            _ => return None,
        })
    };
    classes.extend(h2_classes(h1.tls_config(), front, sl::INLINE_HOST, "/", &[], vec![ok("200", &to_a(1))], h2_table));

    let chaos = Arc::new(Chaos::default());
    let chaos_fn: ChaosFn = {
        let (pki, front_ca2, doc) = (pki.clone(), front_ca2.clone(), doc.clone());
        Box::new(move |chaos, deadline| Box::pin(serverless_chaos(chaos, deadline, pki, front_ca2, doc, mgmt)))
    };
    let stand_ins = vec![
        stand_in("customer-a", move || a.count() as u64),
        stand_in("customer-b", move || b.count() as u64),
        stand_in("www", move || www.count() as u64),
    ];
    Ok(Scenario {
        name: "serverless",
        about: "envoy/serverless.yaml: the public HTTPS listener (HTTP/1.1 and HTTP/2), customer-a and \
                customer-b gateways over mutual TLS (a connection per request), a plain www site, the \
                management service polled every 500 ms (the shipped 2 s, shortened so that flaps are seen)"
            .into(),
        classes,
        watched: vec![Watched {
            role,
            envoy,
            prefixes: vec!["edgewise.serverless.requests.".into()],
            plugin: Some(("serverless", "serverless")),
        }],
        stand_ins,
        chaos_fn: Mutex::new(Some(chaos_fn)),
        chaos,
        chaos_about: "every 12 s one rotation, in turn: the public certificate (a new leaf, alternately from \
                      the first and a second front CA, both trusted by the clients), the platform's client \
                      certificate (a new leaf), customer-a's CA bundle (old + new CA, then old only); every \
                      ~12 s the management service fails for 5 s, in turn answering 503, serving a document \
                      that does not parse, and not listening at all, then serves a new table version (the \
                      same functions and one churning extra route)"
            .into(),
        effects: vec![
            Effect {
                what: "TLS contexts rebuilt from SDS",
                role,
                stat: Sel::Suffix(".ssl_context_update_by_sds"),
                requires: Some("rotations"),
            },
            Effect {
                what: "management fetches failed",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.serverless.management_fetch.failed")),
                requires: Some("management flaps"),
            },
            Effect {
                what: "management fetches ok",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.serverless.management_fetch.ok")),
                requires: Some("management flaps"),
            },
            Effect {
                what: "route table version",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.serverless.table.version")),
                requires: Some("management flaps"),
            },
        ],
        relations: vec![],
        relational: vec![],
        _keep: vec![Box::new(pki), Box::new(front_ca2), Box::new(doc)],
    })
}

async fn serverless_chaos(
    chaos: Arc<Chaos>,
    deadline: Instant,
    pki: Arc<sl::Pki>,
    front_ca2: Arc<Ca>,
    doc: Document,
    mgmt: Server,
) {
    let mgmt_port = mgmt.port();
    let rotate = async {
        let a2 = match Ca::new("customer-a cluster CA 2") {
            Ok(ca) => ca,
            Err(e) => return chaos.problem(format!("making a CA: {e:#}")),
        };
        let mut i = 0u64;
        while nap(secs(if i == 0 { 4 } else { 12 }), deadline).await {
            let second = (i / 3) % 2 == 0;
            let done: Result<String> = match i % 3 {
                0 => {
                    let ca = if second { &*front_ca2 } else { &pki.front_ca };
                    let names = [format!("*.{}", sl::DOMAIN), "www.example.com".to_string()];
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    ca.issue(&LeafSpec::server(&names)).and_then(|leaf| pki.rotate_front(&leaf)).map(|()| {
                        format!(
                            "public certificate: a new leaf from the {} front CA",
                            if second { "second" } else { "first" }
                        )
                    })
                }
                1 => pki
                    .platform_client(sl::PLATFORM_CLIENT_ID)
                    .and_then(|leaf| pki.rotate_platform_client(&leaf))
                    .map(|()| "platform client certificate: a new leaf".to_string()),
                _ => {
                    let cas: Vec<&Ca> = if second { vec![&pki.customer_a_ca, &a2] } else { vec![&pki.customer_a_ca] };
                    pki.set_customer_bundle("customer-a", &cas).map(|()| {
                        format!("customer-a CA bundle: {}", if second { "old + new CA" } else { "old CA only" })
                    })
                }
            };
            match done {
                Ok(what) => chaos.event("rotations", what),
                Err(e) => chaos.problem(format!("rotation failed: {e:#}")),
            }
            i += 1;
        }
    };
    let flap = async {
        let mut server = Some(mgmt);
        let mut version = 1u64;
        let mut i = 0u64;
        while nap(secs(if i == 0 { 3 } else { 7 }), deadline).await {
            let condition = match i % 3 {
                0 => {
                    doc.mode(DocMode::Fail(503));
                    "management service answers 503"
                }
                1 => {
                    doc.mode(DocMode::Garbage);
                    "management service serves a document that does not parse"
                }
                _ => {
                    drop(server.take());
                    "management service down (connection refused)"
                }
            };
            chaos.set(condition, true);
            chaos.event("management flaps", condition);
            nap(secs(5), deadline).await;
            version += 1;
            if let Err(e) = serve_table(&doc, &mut server, mgmt_port, version).await {
                chaos.problem(format!("restarting the management service: {e:#}"));
            }
            chaos.set(condition, false);
            chaos.event("management restores", format!("management service serves table version {version}"));
            i += 1;
        }
    };
    tokio::join!(rotate, flap);
}

/// Serves table `version` (the functions of the scenario and one churning extra route),
/// restarting the management service on its port if it is down.
async fn serve_table(doc: &Document, server: &mut Option<Server>, port: u16, version: u64) -> Result<()> {
    let churn = format!("eeeeeeee-0000000b-{version:010x}");
    let churn_host = format!("churn-{version}.knative.customer-a.example");
    doc.set(sl::table(version, &[(B_LABEL, "customer-b", B_KNATIVE), (&churn, "customer-a", &churn_host)]));
    doc.mode(DocMode::Serve);
    if server.is_none() {
        let start = Instant::now();
        loop {
            match Server::start("management", Listen { port, ..Listen::default() }, doc.handler()).await {
                Ok(s) => {
                    *server = Some(s);
                    break;
                }
                // The old listener goes away when its task is dropped, at the runtime's leisure.
                Err(e) if start.elapsed() < secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

// --- egress ------------------------------------------------------------------------------------

async fn egress(run: &Path, _long_exp: u64) -> Result<Scenario> {
    let role = "egress";
    let dest = |label: &str, what: &str| key(role, &format!("edgewise.egress.dest.{label}.{what}"));
    let denied = |reason: &str| key(role, &format!("edgewise.egress.denied.{reason}"));
    let rbac = key(role, "http.egress.rbac.denied");

    let ca = eg::install(run)?;
    let ips: Vec<Ipv4Addr> = (0..5).map(|_| eg::next_loopback()).collect();
    let github = Arc::new(eg::destination("api.github.com", ips[0], 443, &ca, &["api.github.com"]).await?);
    let www = Arc::new(eg::destination("www.example.com", ips[1], 443, &ca, &["www.example.com"]).await?);
    let net = Arc::new(eg::destination("example.net", ips[2], 8443, &ca, &["example.net"]).await?);
    let badcert = Arc::new(eg::destination("badcert", ips[3], 443, &ca, &["someone-else.example"]).await?);
    let rogue = Ca::new("rogue CA")?;
    let untrusted = Arc::new(eg::destination("untrusted", ips[4], 443, &rogue, &["untrusted.example.com"]).await?);
    let dns = Dns::start(
        0,
        &[
            ("api.github.com", ips[0]),
            ("www.example.com", ips[1]),
            ("example.net", ips[2]),
            ("badcert.example.com", ips[3]),
            ("untrusted.example.com", ips[4]),
            ("sneaky.example.org", Ipv4Addr::new(10, 11, 12, 13)),
        ],
    )
    .await?;
    let config =
        Config::shipped("egress").run_dir(run).port(eg::ports::EGRESS, 0).port(eg::ports::DNS, dns.addr.port());
    let envoy = Arc::new(Envoy::start(&config).await?);
    let front = envoy.listener("egress_http").await?;
    let plain = Client::plain().timeout(REQUEST_TIMEOUT);

    let sni = |name: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["tls"]["sni"] != name || seen["host"].as_str().map(|h| h.split(':').next()) != Some(Some(name)) {
                return Err(format!("the destination saw SNI {} and Host {}", seen["tls"]["sni"], seen["host"]));
            }
            if seen_header(seen, "x-edgewise-egress-destination").is_some() {
                return Err("the filter's marker reached the destination".into());
            }
            Ok(())
        }
    };
    const CHECK_SNI: &str = "TLS with SNI = the destination, Host = the destination, no marker header";
    let github_ok = || {
        ok(
            "200 api.github.com",
            &[
                (&dest("api_github_com", "requests"), 1),
                (&dest("api_github_com", "responses.2xx"), 1),
                ("stand-in: api.github.com", 1),
            ],
        )
    };
    let get = |authority: &str, headers: &[(&str, &str)]| {
        let (client, authority) = (plain.clone(), authority.to_string());
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        fixed(move || Req::Http {
            client: client.clone(),
            addr: front,
            authority: authority.clone(),
            path: "/repos/x?page=2".into(),
            headers: headers.clone(),
        })
    };
    let cycle = |authorities: &'static [&'static str]| {
        let client = plain.clone();
        Box::new(move |n: u64| http(&client, front, authorities[(n as usize) % authorities.len()], "/", &[])) as Make
    };
    let forbidden = |reason: &str| ok("403 destination_not_allowed", &[(&denied(reason), 1)]);
    let mut classes = vec![
        class(
            Kind::Valid,
            "api.github.com (default port 443)",
            8,
            get("api.github.com.egress.local", &[]),
            vec![github_ok().check(CHECK_SNI, sni("api.github.com"))],
        ),
        class(
            Kind::Valid,
            "www.example.com (a wildcard entry)",
            4,
            get("www.example.com.egress.local", &[]),
            vec![ok(
                "200 www.example.com",
                &[
                    (&dest("wildcard_example_com", "requests"), 1),
                    (&dest("wildcard_example_com", "responses.2xx"), 1),
                    ("stand-in: www.example.com", 1),
                ],
            )
            .check(CHECK_SNI, sni("www.example.com"))],
        ),
        class(
            Kind::Valid,
            "example.net:8443 (an entry with its own port)",
            3,
            get("example.net.egress.local:8443", &[]),
            vec![ok(
                "200 example.net",
                &[
                    (&dest("example_net_8443", "requests"), 1),
                    (&dest("example_net_8443", "responses.2xx"), 1),
                    ("stand-in: example.net", 1),
                ],
            )
            .check(CHECK_SNI, sni("example.net"))],
        ),
        class(
            Kind::Valid,
            "api.github.com with a forged x-edgewise-egress-destination",
            1,
            get("API.GitHub.com.egress.local.", &[("x-edgewise-egress-destination", "private:forged")]),
            vec![github_ok().check(CHECK_SNI, sni("api.github.com"))],
        ),
        class(
            Kind::Invalid,
            "a destination not on the allowlist (or not for that port)",
            5,
            Box::new({
                let client = plain.clone();
                move |n: u64| {
                    let hosts = [
                        "gist.github.com.egress.local".to_string(),
                        "api.github.com.egress.local:8443".to_string(),
                        "example.net.egress.local".to_string(),
                        format!("nope-{n}.example.org.egress.local"),
                    ];
                    http(&client, front, &hosts[(n % 4) as usize], "/", &[])
                }
            }),
            vec![forbidden("not_allowed")],
        ),
        class(
            Kind::Invalid,
            "not an egress host (the proxy is not an open proxy)",
            2,
            cycle(&["api.github.com", "[::1]", "[::1]:80", "example.org:443"]),
            vec![ok("403 not_egress_host", &[(&denied("not_egress_host"), 1)])],
        ),
        class(
            Kind::Invalid,
            "IP literals (loopback, cloud metadata, decimal, hex)",
            3,
            cycle(&[
                "127.0.0.1.egress.local",
                "169.254.169.254.egress.local",
                "2130706433.egress.local",
                "0x7f.0.0.1.egress.local",
            ]),
            vec![forbidden("ip_literal")],
        ),
        class(
            Kind::Invalid,
            "loopback names",
            1,
            cycle(&["localhost.egress.local", "db.localhost.egress.local"]),
            vec![forbidden("loopback_name")],
        ),
        class(
            Kind::Invalid,
            "an allowed name that resolves to a private address (after DNS, forged marker)",
            2,
            get("sneaky.example.org.egress.local", &[("x-edgewise-egress-destination", "private:sneaky_example_org")]),
            vec![ok(
                "403 destination_not_allowed",
                &[
                    (&dest("sneaky_example_org", "requests"), 1),
                    (&dest("sneaky_example_org", "responses.4xx"), 1),
                    (&rbac, 1),
                ],
            )],
        ),
        class(
            Kind::Invalid,
            "a destination whose certificate does not verify (wrong name, untrusted CA)",
            2,
            cycle(&["badcert.example.com.egress.local", "untrusted.example.com.egress.local"]),
            vec![ok(
                "503 upstream_unavailable",
                &[(&dest("wildcard_example_com", "requests"), 1), (&dest("wildcard_example_com", "responses.5xx"), 1)],
            )
            .check("the detail names CERTIFICATE_VERIFY_FAILED", |got| {
                let detail = body(got)?["detail"].as_str().unwrap_or_default();
                if detail.contains("CERTIFICATE_VERIFY_FAILED") {
                    Ok(())
                } else {
                    Err(format!("detail {detail:?}"))
                }
            })],
        ),
    ];
    let gh = |n: u64| {
        [
            (dest("api_github_com", "requests"), n),
            (dest("api_github_com", "responses.2xx"), n),
            ("stand-in: api.github.com".to_string(), n),
        ]
    };
    let via_gh = |label: &str, n: u64| {
        let counters = gh(n);
        let counters: Vec<(&str, u64)> = counters.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        ok(label, &counters)
    };
    let table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "obs-text in a header value" | "a second Authorization" | "a body on GET" | POST_LENGTH | POST_CHUNKED => {
                vec![via_gh("200 api.github.com", 1)]
            }
            POST_EXPECT => vec![via_gh("100+200 api.github.com", 1)],
            // Envoy's codec refuses these before any filter runs.
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            // The two Host values reach the filter joined ("another.example,<host>"): not a DNS
            // name.
            "a second Host" => vec![ok("403 destination_not_allowed", &[(&denied("invalid_destination"), 1)])],
            "two pipelined requests" => vec![via_gh("200 api.github.com+200 api.github.com", 2)],
            _ => return None,
        })
    };
    let authority = "api.github.com.egress.local";
    classes.extend(hostile_classes(hostile::cases(authority, "/", &[]), &plain, front, "egress", table));
    let h2_table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "a path without a slash"
            | "two :path"
            | "an unknown pseudo-header"
            | "no :method"
            | "a pseudo-header after a header"
            | "an upper-case name"
            | "a connection header"
            | "an :authority that is not UTF-8" => vec![Allowed::h2_refused(&[])],
            _ => return None,
        })
    };
    classes.extend(h2_classes(None, front, authority, "/", &[], vec![via_gh("200", 1)], h2_table));

    let stand_ins = vec![
        stand_in("api.github.com", move || github.count() as u64),
        stand_in("www.example.com", move || www.count() as u64),
        stand_in("example.net", move || net.count() as u64),
        stand_in("badcert", move || badcert.count() as u64),
        stand_in("untrusted", move || untrusted.count() as u64),
    ];
    Ok(Scenario {
        name: "egress",
        about: "envoy/egress.yaml: the plain-HTTP egress listener, a DNS stand-in for Envoy only, HTTPS \
                destinations on port 443 (and 8443) of loopback addresses with certificates from a test CA, \
                one destination with a certificate for another name and one from an untrusted CA"
            .into(),
        classes,
        watched: vec![Watched {
            role,
            envoy,
            prefixes: vec![
                "edgewise.egress.dest.".into(),
                "edgewise.egress.denied.".into(),
                "http.egress.rbac.denied".into(),
            ],
            plugin: Some(("egress", "egress")),
        }],
        stand_ins,
        chaos_fn: Mutex::new(None),
        chaos: Arc::new(Chaos::default()),
        chaos_about: "none: the scenario has no certificates of its own to rotate and no service to flap \
                      (destinations and DNS answers are fixed)"
            .into(),
        effects: vec![],
        relations: vec![],
        relational: vec![],
        _keep: vec![Box::new(dns)],
    })
}

// --- mesh --------------------------------------------------------------------------------------

async fn mesh_scenario(run: &Path, long_exp: u64) -> Result<Scenario> {
    let gw = |x: &str| key("mesh-gateway", &format!("edgewise.mesh_identity.gateway.{x}"));
    let sc = |x: &str| key("mesh-sidecar", &format!("edgewise.mesh_identity.sidecar.{x}"));
    let workloads = "stand-in: catalog + legacy";
    let peer_catalog = "peers: answered by catalog";

    let pki = Arc::new(mesh::Pki::install(run)?);
    let workload = Arc::new(Server::echo("catalog", Listen::default()).await?);
    let non_meshed = Arc::new(Server::echo("legacy", Listen::default()).await?);
    let sidecar_config = Config::shipped("mesh-sidecar")
        .run_dir(run)
        .port(mesh::ports::SIDECAR, 0)
        .port(mesh::ports::WORKLOAD, workload.port());
    let sidecar = Arc::new(Envoy::start(&sidecar_config).await?);
    let sidecar_addr = sidecar.listener("sidecar_inbound").await?;
    let gateway_config = Config::shipped("mesh-gateway")
        .run_dir(run)
        .port(mesh::ports::GATEWAY, 0)
        .port(mesh::ports::SIDECAR, sidecar_addr.port())
        .port(mesh::ports::NON_MESHED, non_meshed.port());
    let gateway = Arc::new(Envoy::start(&pki.gateway_config(gateway_config)).await?);
    let gateway_addr = gateway.listener("gateway_http").await?;
    let plain = Client::plain().timeout(REQUEST_TIMEOUT);

    let now = idp::now();
    let claims = |sub: &str, exp: u64| json!({ "sub": sub, "aud": mesh::AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": exp });
    let alice = pki.idp.token(claims("alice", long_exp));
    let other_key = Idp::new(mesh::ISSUER, "idp-key-1")?;
    let unknown_kid = Idp::new(mesh::ISSUER, "idp-key-unknown")?;
    let mut wrong_aud = claims("alice", long_exp);
    wrong_aud["aud"] = "another-service".into();
    let mut with_iss = claims("alice", long_exp);
    with_iss["iss"] = mesh::ISSUER.into();
    let attacks: Arc<Vec<String>> = Arc::new(vec![
        pki.idp.token(claims("alice", now - 3600)),
        other_key.token(claims("alice", long_exp)),
        unknown_kid.token(claims("alice", long_exp)),
        idp::unsigned("idp-key-1", &with_iss),
        pki.idp.hs256_with_public_key(&with_iss),
        pki.idp.token(wrong_aud),
        "a.b.c".into(),
    ]);

    let via_gateway = |token: Option<String>, extra: &[(&str, &str)]| {
        let (client, extra) =
            (plain.clone(), extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>());
        fixed(move || {
            let mut headers = extra.clone();
            if let Some(t) = &token {
                headers.push(("authorization".into(), format!("Bearer {t}")));
            }
            Req::Http {
                client: client.clone(),
                addr: gateway_addr,
                authority: "shop.example".into(),
                path: "/catalog/items".into(),
                headers,
            }
        })
    };
    let identity = |got: &Got| -> Result<(), String> {
        let seen = body(got)?;
        if seen_header(seen, "x-edgewise-user") != Some("alice") {
            return Err(format!("the workload saw x-edgewise-user {:?}", seen_header(seen, "x-edgewise-user")));
        }
        if seen_header(seen, "authorization").is_some() {
            return Err("the user's token left the gateway".into());
        }
        if seen["server"] == "catalog" {
            let xfcc = seen_header(seen, "x-forwarded-client-cert").unwrap_or_default();
            if !xfcc.contains(&format!("URI={}", mesh::GATEWAY_ID)) {
                return Err(format!("the sidecar saw the peer {xfcc:?}"));
            }
        }
        Ok(())
    };
    const CHECK_ID: &str = "the workload sees x-edgewise-user = the token's sub, no Authorization, and (behind the sidecar) the gateway's SPIFFE ID";
    let authenticated = || {
        ["200 catalog", "200 legacy"]
            .into_iter()
            .map(|l| ok(l, &[(&gw("authenticated"), 1), (workloads, 1)]).check(CHECK_ID, identity))
            .collect::<Vec<_>>()
    };
    let invalid = || vec![ok("401 invalid_token", &[(&gw("invalid_token"), 1)])];

    let peer = |leaf: Option<&edgewise::certs::Leaf>, alpn: &str| -> Result<Client> {
        Ok(Client::tls(tls::client(&[&pki.mesh_ca.pem], leaf, &[alpn])?)
            .sni(mesh::SIDECAR_DNS)
            .timeout(REQUEST_TIMEOUT))
    };
    let mesh_alpn = "istio-http/1.1";
    let cart = pki.mesh_leaf("spiffe://cluster.local/ns/shop/sa/cart")?;
    let cart_peer = peer(Some(&cart), mesh_alpn)?;
    let intruder = peer(Some(&pki.mesh_leaf("spiffe://cluster.local/ns/other/sa/intruder")?), mesh_alpn)?;
    let no_cert = peer(None, mesh_alpn)?;
    let wrong_alpn = peer(Some(&cart), "http/1.1")?;
    let wrong_ca = peer(Some(&pki.gateway_leaf(&pki.mesh_ca, mesh::GATEWAY_ID)?), mesh_alpn)?;
    let at_sidecar = |client: &Client, path: &'static str| {
        let client = client.clone();
        fixed(move || http(&client, sidecar_addr, "catalog", path, &[("x-edgewise-user", "alice")]))
    };
    let refused = || vec![ok("refused", &[])];

    let mut classes = vec![
        class(Kind::Valid, "gateway: a user's token (cached after the first)", 10, via_gateway(Some(alice.clone()), &[]), authenticated()),
        class(
            Kind::Valid,
            "gateway: a new token every request",
            5,
            {
                let (client, pki) = (plain.clone(), pki.clone());
                Box::new(move |n| {
                    let now = idp::now();
                    let t = pki.idp.token(json!({ "sub": "alice", "aud": mesh::AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": now + 600, "jti": n }));
                    http(&client, gateway_addr, "shop.example", "/catalog/items", &[("authorization", &format!("Bearer {t}"))])
                })
            },
            authenticated(),
        ),
        class(
            Kind::Invalid,
            "gateway: a valid token with a forged x-edgewise-user",
            2,
            via_gateway(Some(alice.clone()), &[("x-edgewise-user", "mallory"), ("x-edgewise-user-groups", "admins")]),
            authenticated(),
        ),
        class(Kind::Invalid, "gateway: no token", 3, via_gateway(None, &[]), vec![ok("401 unauthenticated", &[(&gw("unauthenticated"), 1)])]),
        class(
            Kind::Invalid,
            "gateway: expired, forged (other key, unknown kid, alg none, HS256 with the public key), wrong audience, garbage",
            6,
            {
                let (client, attacks) = (plain.clone(), attacks.clone());
                Box::new(move |n| {
                    let t = &attacks[(n as usize) % attacks.len()];
                    http(&client, gateway_addr, "shop.example", "/catalog/items", &[("authorization", &format!("Bearer {t}"))])
                })
            },
            invalid(),
        ),
        class(
            Kind::Invalid,
            "gateway: an Authorization that is not UTF-8",
            1,
            {
                let client = plain.clone();
                fixed(move || Req::Raw {
                    client: client.clone(),
                    addr: gateway_addr,
                    server_name: "shop.example".into(),
                    bytes: raw_get(b"shop.example", "/catalog/items", &[("authorization", b"Bearer caf\xe9")]),
                })
            },
            vec![ok("400 invalid_header", &[(&gw("bad_request"), 1)])],
        ),
        class(
            Kind::Invalid,
            "sidecar: a mesh workload (cart) claiming a user",
            3,
            at_sidecar(&cart_peer, "/catalog/items"),
            vec![ok("200 catalog", &[(&sc("untrusted_peer"), 1), (workloads, 1), (peer_catalog, 1)]).check(
                "the claimed x-edgewise-user is removed",
                |got| match seen_header(body(got)?, "x-edgewise-user") {
                    None => Ok(()),
                    Some(u) => Err(format!("x-edgewise-user {u:?} reached the workload from a non-gateway peer")),
                },
            )],
        ),
        class(
            Kind::Invalid,
            "sidecar: a workload of another namespace, and cart on /admin (RBAC)",
            2,
            {
                let (intruder, cart) = (intruder.clone(), cart_peer.clone());
                Box::new(move |n| {
                    if n % 2 == 0 {
                        http(&intruder, sidecar_addr, "catalog", "/catalog/items", &[])
                    } else {
                        http(&cart, sidecar_addr, "catalog", "/admin/reindex", &[])
                    }
                })
            },
            vec![ok("403", &[(&sc("untrusted_peer"), 1)])],
        ),
        class(Kind::Invalid, "sidecar: no client certificate", 1, at_sidecar(&no_cert, "/catalog/items"), refused()),
        class(Kind::Invalid, "sidecar: no mesh ALPN", 1, at_sidecar(&wrong_alpn, "/catalog/items"), refused()),
        class(
            Kind::Invalid,
            "sidecar: the gateway's ID from the mesh CA (wrong CA for the trust domain)",
            1,
            at_sidecar(&wrong_ca, "/catalog/items"),
            refused(),
        ),
    ];
    let served = |n: u64| [(gw("authenticated"), n), (workloads.to_string(), n)];
    let via = |labels: &[&str], n: u64| {
        let counters = served(n);
        let counters: Vec<(&str, u64)> = counters.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        labels.iter().map(|l| ok(l, &counters)).collect::<Vec<_>>()
    };
    let one = ["200 catalog", "200 legacy"];
    let two = ["200 catalog+200 catalog", "200 catalog+200 legacy", "200 legacy+200 catalog", "200 legacy+200 legacy"];
    let table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "obs-text in a header value" | "a second Host" | "a body on GET" | POST_LENGTH | POST_CHUNKED => {
                via(&one, 1)
            }
            POST_EXPECT => via(&["100+200 catalog", "100+200 legacy"], 1),
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            // Two Authorization values read as one ("a, b"): not a bearer token.
            "a second Authorization" => vec![ok("401 invalid_token", &[(&gw("invalid_token"), 1)])],
            "two pipelined requests" => via(&two, 2),
            _ => return None,
        })
    };
    let bearer = format!("Bearer {alice}");
    let valid: [(&str, &[u8]); 1] = [("authorization", bearer.as_bytes())];
    classes.extend(hostile_classes(
        hostile::cases("shop.example", "/catalog/items", &valid),
        &plain,
        gateway_addr,
        "shop.example",
        table,
    ));
    let h2_table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "a path without a slash"
            | "two :path"
            | "an unknown pseudo-header"
            | "no :method"
            | "a pseudo-header after a header"
            | "an upper-case name"
            | "a connection header"
            | "an :authority that is not UTF-8" => vec![Allowed::h2_refused(&[])],
            _ => return None,
        })
    };
    classes.extend(h2_classes(
        None,
        gateway_addr,
        "shop.example",
        "/catalog/items",
        &valid,
        via(&["200"], 1),
        h2_table,
    ));

    let chaos = Arc::new(Chaos::default());
    let chaos_fn: ChaosFn = {
        let (pki, gateway, sidecar) = (pki.clone(), gateway.clone(), sidecar.clone());
        Box::new(move |chaos, deadline| Box::pin(mesh_chaos(chaos, deadline, pki, gateway, sidecar)))
    };
    let (w1, n1, w2) = (workload.clone(), non_meshed.clone(), workload.clone());
    let trusted = sc("trusted_peer");
    let relation: Relation = (
        "sidecar trusted_peer = requests the catalog workload got through the gateway (all it got, less the \
         peers' answered by catalog)"
            .into(),
        {
            let trusted = trusted.clone();
            Box::new(move |actual, expected| {
                let catalog = actual.get("stand-in: catalog").copied().unwrap_or(0);
                let peers = expected.get(peer_catalog).copied().unwrap_or(0);
                (actual.get(&trusted).copied().unwrap_or(0), catalog.saturating_sub(peers))
            })
        },
    );
    Ok(Scenario {
        name: "mesh",
        about: "envoy/mesh-gateway.yaml in front of envoy/mesh-sidecar.yaml (a meshed workload over mTLS with \
                ALPN istio-http/1.1) and a non-meshed workload (plaintext), two CAs, SPIFFE IDs, an ES256 user \
                key in the gateway's inline JWKS; peers also call the sidecar directly"
            .into(),
        classes,
        watched: vec![
            Watched {
                role: "mesh-gateway",
                envoy: gateway,
                prefixes: vec!["edgewise.mesh_identity.gateway.".into()],
                plugin: Some(("mesh-identity", "mesh_identity")),
            },
            Watched {
                role: "mesh-sidecar",
                envoy: sidecar,
                prefixes: vec!["edgewise.mesh_identity.sidecar.".into()],
                plugin: Some(("mesh-identity", "mesh_identity")),
            },
        ],
        stand_ins: vec![
            stand_in("catalog + legacy", move || (w1.count() + n1.count()) as u64),
            stand_in("catalog", move || w2.count() as u64),
        ],
        chaos_fn: Mutex::new(Some(chaos_fn)),
        chaos,
        chaos_about: "every 10 s one rotation, in turn: a new gateway leaf from its CA; a CA rotation (the \
                      sidecar trusts old + new gateway CA, the gateway moves to a leaf from the new CA, the \
                      sidecar drops the old CA; each step waits until Envoy rebuilt the TLS context); a new \
                      sidecar leaf from the mesh CA"
            .into(),
        effects: vec![
            Effect {
                what: "gateway TLS contexts rebuilt from SDS",
                role: "mesh-gateway",
                stat: Sel::Suffix(".ssl_context_update_by_sds"),
                requires: Some("rotations"),
            },
            Effect {
                what: "sidecar TLS contexts rebuilt from SDS",
                role: "mesh-sidecar",
                stat: Sel::Suffix(".ssl_context_update_by_sds"),
                requires: Some("rotations"),
            },
        ],
        relations: vec![relation],
        relational: vec![trusted, "stand-in: catalog".into(), peer_catalog.into()],
        _keep: vec![Box::new(pki), Box::new(workload), Box::new(non_meshed)],
    })
}

async fn mesh_chaos(
    chaos: Arc<Chaos>,
    deadline: Instant,
    pki: Arc<mesh::Pki>,
    gateway: Arc<Envoy>,
    sidecar: Arc<Envoy>,
) {
    // Waits until `envoy` rebuilt a TLS context since `seen`.
    async fn picked_up(chaos: &Chaos, envoy: &Envoy, seen: u64, what: &str) {
        let start = Instant::now();
        while tls_updates(envoy).await <= seen {
            if start.elapsed() > secs(15) {
                return chaos.problem(format!("{what}: no TLS context update after 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut current: Option<Ca> = None;
    let mut i = 0u64;
    while nap(secs(if i == 0 { 4 } else { 10 }), deadline).await {
        let result: Result<()> = async {
            let ca = current.as_ref().unwrap_or(&pki.gateway_ca);
            match i % 3 {
                0 => {
                    let n = tls_updates(&gateway).await;
                    pki.set_gateway_cert(&pki.gateway_leaf(ca, mesh::GATEWAY_ID)?)?;
                    picked_up(&chaos, &gateway, n, "a new gateway leaf").await;
                    chaos.event("rotations", "gateway: a new leaf from its CA");
                }
                1 => {
                    chaos.set("gateway CA rotation", true);
                    let new = Ca::new(&format!("gateway.example CA {}", i + 2))?;
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_trust(&[ca, &new], &[&pki.mesh_ca])?;
                    picked_up(&chaos, &sidecar, n, "old + new CA in the sidecar's bundle").await;
                    let n = tls_updates(&gateway).await;
                    pki.set_gateway_cert(&pki.gateway_leaf(&new, mesh::GATEWAY_ID)?)?;
                    picked_up(&chaos, &gateway, n, "a gateway leaf from the new CA").await;
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_trust(&[&new], &[&pki.mesh_ca])?;
                    picked_up(&chaos, &sidecar, n, "only the new CA in the sidecar's bundle").await;
                    current = Some(new);
                    chaos.set("gateway CA rotation", false);
                    chaos.event("rotations", "gateway CA rotated (old + new trusted, new leaf, old dropped)");
                }
                _ => {
                    let n = tls_updates(&sidecar).await;
                    pki.set_sidecar_cert(&pki.mesh_leaf(mesh::WORKLOAD_ID)?)?;
                    picked_up(&chaos, &sidecar, n, "a new sidecar leaf").await;
                    chaos.event("rotations", "sidecar: a new leaf from the mesh CA");
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            chaos.problem(format!("rotation failed: {e:#}"));
        }
        i += 1;
    }
}

// --- cloud-connector ---------------------------------------------------------------------------

/// The shipped JWKS timing, and the soak's: refreshes every 5 s (so that a flapping issuer is
/// asked while it is down), a retry after 1 s, one refetch per 5 s for unknown kids.
const CC_JWKS_SHIPPED: &str = r#""refresh_seconds": 3600, "min_refresh_seconds": 60, "max_refresh_seconds": 86400,
                        "retry_seconds": 10, "kid_miss_cooldown_seconds": 60, "wait_ms": 3000"#;
const SOAK_JWKS: &str = r#""refresh_seconds": 5, "min_refresh_seconds": 1, "max_refresh_seconds": 5, "retry_seconds": 1, "kid_miss_cooldown_seconds": 5, "wait_ms": 3000"#;

async fn cloud_connector(run: &Path, long_exp: u64) -> Result<Scenario> {
    let role = "cloud-connector";
    let m = |feature: &str, outcome: &str| key(role, &format!("edgewise.cloud_connector.requests.{feature}.{outcome}"));
    let (ai, obs) = ("stand-in: ai-gateway", "stand-in: observability");

    let gitlab = Arc::new(Idp::rs256(GITLAB, "gitlab-1")?);
    let customers = Arc::new(Idp::new(CUSTOMERS, "customers-1")?);
    let p384 = Idp::p384(GITLAB, "gitlab-p384")?;
    let pki = cc::Pki::install(run)?;
    let (issuers, issuer_server) = Issuers::start(&pki.issuer_ca).await?;
    issuers.publish(GITLAB, vec![gitlab.jwk(), p384.jwk()]);
    issuers.publish(CUSTOMERS, vec![customers.jwk()]);
    let ai_server = Arc::new(Server::echo("ai-gateway", Listen::default()).await?);
    let obs_server = Arc::new(Server::echo("observability", Listen::default()).await?);
    let admin = edgewise::free_port()?;
    let config = pki
        .config(run, issuer_server.port(), ai_server.port(), obs_server.port(), admin)
        .replace(CC_JWKS_SHIPPED, SOAK_JWKS);
    let options = Options { env: vec![(cc::SECRET_ENV.into(), CC_SECRET.into())], ..Options::default() };
    let work = run.join("cloud-connector-envoy");
    std::fs::create_dir_all(&work)?;
    let envoy = Arc::new(Envoy::start_in(&config, &work, options).await?);
    let front = envoy.listener("cloud_connector_https").await?;
    let h1 = pki.front_client(false)?.timeout(REQUEST_TIMEOUT);
    let h2 = pki.front_client(true)?.timeout(REQUEST_TIMEOUT);

    let now = idp::now();
    let claims = |instance: &str, scopes: &[&str], exp: u64| {
        json!({ "aud": cc::AUDIENCE, "sub": instance, "gitlab_realm": "self-managed", "scopes": scopes,
                "iat": now, "nbf": now, "exp": exp, "jti": format!("{instance}-{now}") })
    };
    let orgs: Arc<Vec<(String, String)>> = Arc::new(
        (0..8)
            .map(|i| {
                let org = format!("valid-org-{i}");
                let t = gitlab.token(claims(&org, &["code_suggestions"], long_exp));
                (org, t)
            })
            .collect(),
    );
    let observability = customers.token(claims("observability-org", &["observability"], long_exp));
    let over_limit = gitlab.token(claims("over-limit-org", &["duo_chat"], long_exp));
    let hostile_token = gitlab.token(claims("hostile-org", &["code_suggestions"], long_exp));
    // Wait for both issuers' keys.
    let start = Instant::now();
    for token in [&orgs[0].1, &observability] {
        let path = if token == &observability { "/observability/v1/traces" } else { "/ai/v2/code/completions" };
        loop {
            let auth = format!("Bearer {token}");
            let req = Request::get("cloud.gitlab.com", path).header("authorization", &auth);
            if h1.send(front, req).await.is_ok_and(|r| r.status == 200) {
                break;
            }
            if start.elapsed() > secs(20) {
                bail!("cloud-connector never accepted a token of {path}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut expired = claims("valid-org-0", &["code_suggestions"], now - 3600);
    expired["iat"] = (now - 7200).into();
    expired["nbf"] = (now - 7200).into();
    let mut wrong_aud = claims("valid-org-0", &["code_suggestions"], long_exp);
    wrong_aud["aud"] = "another-service".into();
    let mut future = claims("valid-org-0", &["code_suggestions"], long_exp);
    future["nbf"] = (now + 3600).into();
    let mut with_iss = claims("valid-org-0", &["code_suggestions"], long_exp);
    with_iss["iss"] = GITLAB.into();
    let stranger = Idp::new("https://gitlab.example", "gitlab-1")?;
    let impostor = Idp::new(GITLAB, "gitlab-1")?;
    let attacks: Arc<Vec<String>> = Arc::new(vec![
        gitlab.token(expired),
        gitlab.token(wrong_aud),
        gitlab.token(future),
        stranger.token(claims("valid-org-0", &["code_suggestions"], long_exp)),
        impostor.sign_as(json!({"alg": "RS256", "kid": "gitlab-1"}), &with_iss),
        idp::unsigned("gitlab-1", &with_iss),
        gitlab.hs256_with_public_key(&with_iss),
        p384.token(claims("valid-org-0", &["code_suggestions"], long_exp)),
        p384.sign_as(json!({"alg": "ES256", "kid": "gitlab-p384"}), &with_iss),
        gitlab.sign_as(json!({"alg": "RS256", "kid": "gitlab-p384"}), &with_iss),
        "not.a.jwt".into(),
    ]);

    let forwarded = |path: &'static str, issuer: &'static str, scopes: &'static str| {
        move |got: &Got| -> Result<(), String> {
            let seen = body(got)?;
            if seen["path"] != path {
                return Err(format!("the backend saw {}", seen["path"]));
            }
            let instance = seen_header(seen, "x-gitlab-instance-id").unwrap_or_default();
            if seen_header(seen, "x-gitlab-token-issuer") != Some(issuer)
                || seen_header(seen, "x-gitlab-scopes") != Some(scopes)
            {
                return Err(format!(
                    "the backend saw issuer {:?} and scopes {:?}",
                    seen_header(seen, "x-gitlab-token-issuer"),
                    seen_header(seen, "x-gitlab-scopes")
                ));
            }
            let sig = seen_header(seen, "x-edgewise-signature").unwrap_or_default();
            if !cc::signature_valid(CC_SECRET.as_bytes(), sig, "GET", path, instance) {
                return Err(format!("x-edgewise-signature {sig:?} does not verify for {path} and {instance}"));
            }
            if seen_header(seen, "x-edgewise-backend").is_some()
                || seen_header(seen, "x-edgewise-ratelimit-key").is_some()
            {
                return Err("a routing header reached the backend".into());
            }
            Ok(())
        }
    };
    const CHECK_FW: &str = "the backend sees the rewritten path, the verified issuer and scopes, a valid x-edgewise-signature and no routing header";
    let code_ok = || {
        ok("200 ai-gateway", &[(&m("code_suggestions", "allowed"), 1), (ai, 1)])
            .check(CHECK_FW, forwarded("/v2/code/completions?lang=rust", GITLAB, "code_suggestions"))
    };
    let bearer = |t: &str| format!("Bearer {t}");
    let code = |client: &Client, token: String, extra: &'static [(&'static str, &'static str)]| {
        let client = client.clone();
        fixed(move || {
            let auth = bearer(&token);
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend_from_slice(extra);
            http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions?lang=rust", &headers)
        })
    };
    let unauthenticated = |label: &str| vec![ok(label, &[(&m("code_suggestions", "unauthenticated"), 1)])];
    // A token of the issuer's key naming a kid it never published (a new one every request: at
    // most one refetch per cooldown).
    let unknown_kid = {
        let gitlab = gitlab.clone();
        move |kid: String| {
            let now = idp::now();
            let claims = json!({ "iss": GITLAB, "aud": cc::AUDIENCE, "sub": "valid-org-0", "scopes": ["code_suggestions"], "iat": now, "exp": now + 600 });
            gitlab.sign_as(json!({"alg": "RS256", "kid": kid}), &claims)
        }
    };

    let mut classes = vec![
        class(
            Kind::Valid,
            "code_suggestions, RS256, a cached token (8 organizations)",
            10,
            {
                let (client, orgs) = (h1.clone(), orgs.clone());
                Box::new(move |n| {
                    let auth = bearer(&orgs[(n % 8) as usize].1);
                    http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions?lang=rust", &[("authorization", &auth)])
                })
            },
            vec![code_ok()],
        ),
        class(
            Kind::Valid,
            "code_suggestions, RS256, a new token every request (signature verified)",
            6,
            {
                let (client, gitlab) = (h1.clone(), gitlab.clone());
                Box::new(move |n| {
                    let now = idp::now();
                    let org = format!("valid-org-{}", n % 8);
                    let t = gitlab.token(json!({ "aud": cc::AUDIENCE, "sub": org, "gitlab_realm": "self-managed",
                        "scopes": ["code_suggestions"], "iat": now, "nbf": now, "exp": now + 600, "jti": format!("{n}") }));
                    http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions?lang=rust", &[("authorization", &bearer(&t))])
                })
            },
            vec![code_ok()],
        ),
        class(
            Kind::Valid,
            "observability, ES256 from the other issuer, HTTP/2",
            4,
            {
                let (client, t) = (h2.clone(), observability.clone());
                fixed(move || http(&client, front, "cloud.gitlab.com", "/observability/v1/traces", &[("authorization", &bearer(&t))]))
            },
            vec![ok("200 observability", &[(&m("observability", "allowed"), 1), (obs, 1)])
                .check(CHECK_FW, forwarded("/v1/traces", CUSTOMERS, "observability"))],
        ),
        class(
            Kind::Valid,
            "duo_chat, a new organization every request (rate-limit slots reused)",
            3,
            {
                let (client, gitlab) = (h1.clone(), gitlab.clone());
                Box::new(move |n| {
                    let now = idp::now();
                    let t = gitlab.token(json!({ "aud": cc::AUDIENCE, "sub": format!("chat-org-{n}"), "gitlab_realm": "saas",
                        "scopes": ["duo_chat"], "iat": now, "nbf": now, "exp": now + 600 }));
                    http(&client, front, "cloud.gitlab.com", "/ai/v1/chat/agent", &[("authorization", &bearer(&t))])
                })
            },
            vec![ok("200 ai-gateway", &[(&m("duo_chat", "allowed"), 1), (ai, 1)])],
        ),
        class(
            Kind::Invalid,
            "a valid token with forged gateway-owned headers",
            2,
            code(
                &h1,
                orgs[1].1.clone(),
                &[
                    ("x-gitlab-scopes", "admin_everything"),
                    ("x-gitlab-token-issuer", "https://evil.example"),
                    ("x-edgewise-signature", "t=1,v1=00"),
                    ("x-edgewise-backend", "observability"),
                    ("x-edgewise-ratelimit-key", "someone-else"),
                ],
            ),
            vec![code_ok()],
        ),
        class(
            Kind::Valid,
            "/-/health",
            1,
            {
                let client = h1.clone();
                fixed(move || http(&client, front, "cloud.gitlab.com", "/-/health", &[]))
            },
            vec![ok("200 ok", &[])],
        ),
        class(
            Kind::Valid,
            "/-/metrics",
            1,
            {
                let client = h1.clone();
                fixed(move || http(&client, front, "cloud.gitlab.com", "/-/metrics", &[]))
            },
            vec![ok("200", &[])],
        ),
        class(
            Kind::Invalid,
            "no token",
            3,
            {
                let client = h1.clone();
                fixed(move || http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions", &[]))
            },
            unauthenticated("401 unauthenticated"),
        ),
        class(
            Kind::Invalid,
            "Basic credentials",
            1,
            {
                let client = h1.clone();
                fixed(move || http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", "Basic YTpi")]))
            },
            unauthenticated("401 unauthenticated"),
        ),
        class(
            Kind::Invalid,
            "attack tokens: expired, wrong audience, not yet valid, unknown issuer, another key, alg none, HS256 with the public key, ES384, P-384 under ES256, RS256 on an EC key, garbage",
            6,
            {
                let (client, attacks) = (h1.clone(), attacks.clone());
                Box::new(move |n| {
                    let t = &attacks[(n as usize) % attacks.len()];
                    http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", &bearer(t))])
                })
            },
            unauthenticated("401 invalid_token"),
        ),
        class(
            Kind::Invalid,
            "an unknown kid (a new one every request: at most one refetch per cooldown)",
            3,
            {
                let (client, unknown_kid) = (h1.clone(), unknown_kid.clone());
                Box::new(move |n| {
                    let t = unknown_kid(format!("forged-{n}"));
                    http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", &bearer(&t))])
                })
            },
            unauthenticated("401 invalid_token"),
        ),
        class(
            Kind::Invalid,
            "an unknown kid with a body, each way a body comes (paused for a refetch when the cooldown allows, and held whole)",
            2,
            {
                let (client, unknown_kid) = (h1.clone(), unknown_kid.clone());
                Box::new(move |n| {
                    let bearer = bearer(&unknown_kid(format!("forged-body-{n}")));
                    let mut cases =
                        hostile::body_cases("cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", bearer.as_bytes())]);
                    let case = cases.swap_remove((n as usize) % cases.len());
                    Req::Body { client: client.clone(), addr: front, server_name: "cloud.gitlab.com".into(), case }
                })
            },
            unauthenticated("401"),
        ),
        class(
            Kind::Invalid,
            "X-Gitlab-Instance-Id or X-Gitlab-Realm not the token's",
            2,
            {
                let (client, t) = (h1.clone(), orgs[2].1.clone());
                Box::new(move |n| {
                    let header = if n % 2 == 0 { ("x-gitlab-instance-id", "someone-else") } else { ("x-gitlab-realm", "saas") };
                    http(&client, front, "cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", &bearer(&t)), header])
                })
            },
            unauthenticated("401 invalid_token"),
        ),
        class(
            Kind::Invalid,
            "a scope the token lacks (duo_chat with a code_suggestions token)",
            2,
            {
                let (client, t) = (h1.clone(), orgs[3].1.clone());
                fixed(move || http(&client, front, "cloud.gitlab.com", "/ai/v1/chat/agent", &[("authorization", &bearer(&t))]))
            },
            vec![ok("403 insufficient_scope", &[(&m("duo_chat", "forbidden"), 1)])],
        ),
        class(
            Kind::Invalid,
            "a path no feature serves",
            2,
            {
                let (client, t) = (h1.clone(), orgs[4].1.clone());
                fixed(move || http(&client, front, "cloud.gitlab.com", "/admin/users", &[("authorization", &bearer(&t))]))
            },
            vec![ok("404 not_found", &[(&m("none", "not_found"), 1)])],
        ),
        Class {
            bound: Some(Bound { allowed: "200 ai-gateway", limited: "429 rate_limited", burst: 20.0, per_second: 1.0 }),
            ..class(
                Kind::Invalid,
                "an over-limit organization (duo_chat: 60 per minute, burst 20)",
                10,
                {
                    let (client, t) = (h1.clone(), over_limit.clone());
                    fixed(move || http(&client, front, "cloud.gitlab.com", "/ai/v1/chat/agent", &[("authorization", &bearer(&t))]))
                },
                vec![
                    ok("200 ai-gateway", &[(&m("duo_chat", "allowed"), 1), (ai, 1)]),
                    ok("429 rate_limited", &[(&m("duo_chat", "rate_limited"), 1)]),
                ],
            )
        },
        class(
            Kind::Invalid,
            "an Authorization that is not UTF-8",
            1,
            {
                let client = h1.clone();
                fixed(move || Req::Raw {
                    client: client.clone(),
                    addr: front,
                    server_name: "cloud.gitlab.com".into(),
                    bytes: raw_get(b"cloud.gitlab.com", "/ai/v2/code/completions", &[("authorization", b"Bearer caf\xe9")]),
                })
            },
            vec![ok("400 invalid_header", &[(&m("code_suggestions", "bad_request"), 1)])],
        ),
    ];
    let allowed_n = |n: u64| [(m("code_suggestions", "allowed"), n), (ai.to_string(), n)];
    let via_ai = |label: &str, n: u64| {
        let counters = allowed_n(n);
        let counters: Vec<(&str, u64)> = counters.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        ok(label, &counters)
    };
    let table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "obs-text in a header value" | "a second Host" | "a body on GET" | POST_LENGTH | POST_CHUNKED => {
                vec![via_ai("200 ai-gateway", 1)]
            }
            POST_EXPECT => vec![via_ai("100+200 ai-gateway", 1)],
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            // Two Authorization values read as one ("a, b"): not a bearer token.
            "a second Authorization" => {
                vec![ok("401 invalid_token", &[(&m("code_suggestions", "unauthenticated"), 1)])]
            }
            "two pipelined requests" => vec![via_ai("200 ai-gateway+200 ai-gateway", 2)],
            _ => return None,
        })
    };
    let hostile_bearer = bearer(&hostile_token);
    let valid: [(&str, &[u8]); 1] = [("authorization", hostile_bearer.as_bytes())];
    let path = "/ai/v2/code/completions";
    classes.extend(hostile_classes(
        hostile::cases("cloud.gitlab.com", path, &valid),
        &h1,
        front,
        "cloud.gitlab.com",
        table,
    ));
    let h2_table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "a path without a slash"
            | "two :path"
            | "an unknown pseudo-header"
            | "no :method"
            | "a pseudo-header after a header"
            | "an upper-case name"
            | "a connection header"
            | "an :authority that is not UTF-8" => vec![Allowed::h2_refused(&[])],
            _ => return None,
        })
    };
    classes.extend(h2_classes(
        h1.tls_config(),
        front,
        "cloud.gitlab.com",
        path,
        &valid,
        vec![via_ai("200", 1)],
        h2_table,
    ));

    let chaos = Arc::new(Chaos::default());
    let chaos_fn: ChaosFn = {
        let issuers = issuers.clone();
        Box::new(move |chaos, deadline| Box::pin(issuer_chaos(chaos, deadline, issuers, &[GITLAB, CUSTOMERS])))
    };
    let (a, o) = (ai_server.clone(), obs_server.clone());
    Ok(Scenario {
        name: "cloud-connector",
        about: "envoy/cloud-connector.yaml: the public HTTPS listener, a TLS stand-in for both issuers \
                (gitlab.com: RS256 and a P-384 key; customers.gitlab.com: ES256; OIDC discovery and JWKS), \
                echo backends; JWKS timing shortened to refresh every 5 s, retry after 1 s, one refetch per \
                5 s for unknown kids (the shipped 3600/10/60 s would not ask a flapping issuer at all)"
            .into(),
        classes,
        watched: vec![Watched {
            role,
            envoy,
            prefixes: vec!["edgewise.cloud_connector.requests.".into()],
            plugin: Some(("cloud-connector", "cloud_connector")),
        }],
        stand_ins: vec![
            stand_in("ai-gateway", move || a.count() as u64),
            stand_in("observability", move || o.count() as u64),
        ],
        chaos_fn: Mutex::new(Some(chaos_fn)),
        chaos,
        chaos_about: "the issuers flap: every ~15 s one goes down (answers 503 to discovery and JWKS) for 8 s, \
                      in turn gitlab.com, customers.gitlab.com, both"
            .into(),
        effects: vec![
            Effect {
                what: "JWKS fetches failed (gitlab.com)",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.cloud_connector.jwks.gitlab_com.fetch.failed")),
                requires: Some("outages of gitlab.com"),
            },
            Effect {
                what: "JWKS fetches failed (customers.gitlab.com)",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.cloud_connector.jwks.customers_gitlab_com.fetch.failed")),
                requires: Some("outages of customers.gitlab.com"),
            },
            Effect {
                what: "JWKS fetches ok (gitlab.com)",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.cloud_connector.jwks.gitlab_com.fetch.ok")),
                requires: Some("issuer flaps"),
            },
        ],
        relations: vec![],
        relational: vec![],
        _keep: vec![Box::new(issuer_server), Box::new(ai_server), Box::new(obs_server)],
    })
}

/// Takes the issuers down in turn: each of `hosts`, then all of them, 8 s each, ~7 s apart.
async fn issuer_chaos(chaos: Arc<Chaos>, deadline: Instant, issuers: Issuers, hosts: &'static [&'static str]) {
    let mut i = 0usize;
    while nap(secs(if i == 0 { 3 } else { 7 }), deadline).await {
        let down: Vec<&str> = match hosts.get(i % (hosts.len() + 1)) {
            Some(h) if hosts.len() > 1 => vec![*h],
            _ => hosts.to_vec(),
        };
        let condition = format!(
            "issuer {} down",
            down.iter().map(|h| h.trim_start_matches("https://")).collect::<Vec<_>>().join(" and ")
        );
        for h in &down {
            issuers.set_down(h, true);
            chaos.tally(&format!("outages of {}", h.trim_start_matches("https://")));
        }
        chaos.set(&condition, true);
        chaos.event("issuer flaps", condition.clone());
        nap(secs(8), deadline).await;
        for h in &down {
            issuers.set_down(h, false);
        }
        chaos.set(&condition, false);
        chaos.event("issuer restores", condition.replace(" down", " up again"));
        i += 1;
    }
}

// --- tunnel ------------------------------------------------------------------------------------

async fn tunnel(run: &Path, long_exp: u64) -> Result<Scenario> {
    let role = "tunnel-hub";
    let ta = |outcome: &str| key(role, &format!("edgewise.tunnel_auth.requests.{outcome}"));
    let kp = "stand-in: kubectl-proxy";

    let pki = tn::Pki::install(run)?;
    let (issuers, issuer_server) = Issuers::start(&pki.issuer_ca).await?;
    let user_key = Arc::new(Idp::new(GITLAB, "users-1")?);
    issuers.publish(GITLAB, vec![user_key.jwk()]);
    let kubectl = tn::KubectlProxy::start(1).await?;
    let hub_config = pki.hub_config(run, issuer_server.port()).replace(
        r#""audiences": ["edgewise-tunnel-hub"],"#,
        &format!(r#""audiences": ["edgewise-tunnel-hub"], "jwks": {{ {SOAK_JWKS} }},"#),
    );
    let hub_config = hub_config.port(tn::ports::USERS, 0).port(tn::ports::HANDSHAKE, 0).any_admin_port();
    let work = run.join("tunnel-hub-envoy");
    std::fs::create_dir_all(&work)?;
    let hub = Arc::new(Envoy::start_in(&hub_config, &work, Options::default()).await?);
    let users = hub.listener("tunnel_users").await?;
    let handshake = hub.listener("tunnel_handshake").await?.port();
    let agent = Arc::new(
        Envoy::start_with(
            &pki.agent_config(run, handshake, kubectl.port),
            Options { concurrency: 1, ..Options::default() },
        )
        .await?,
    );
    let start = Instant::now();
    loop {
        let stats = hub.stats().await.unwrap_or_default();
        if (0..2).all(|w| stats.get(&format!("tunnel_hub.worker_{w}.node.cluster-a")).is_some_and(|n| *n >= 1)) {
            break;
        }
        if start.elapsed() > secs(20) {
            bail!("no tunnels of cluster-a on both hub workers after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plain = Client::plain().timeout(REQUEST_TIMEOUT);
    let now = idp::now();
    let claims = |user: &str, clusters: &[&str], exp: u64| json!({"sub": user, "aud": tn::AUDIENCE, "clusters": clusters, "exp": exp, "iat": now});
    let alice = user_key.token(claims("alice", &["cluster-a"], long_exp));
    let start = Instant::now();
    loop {
        let auth = format!("Bearer {alice}");
        let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &auth);
        if plain.send(users, req).await.is_ok_and(|r| r.status == 200) {
            break;
        }
        if start.elapsed() > secs(20) {
            bail!("the hub never carried a request of alice's through the tunnel");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bob = user_key.token(claims("bob", &["cluster-b"], long_exp));
    let carol = user_key.token(claims("carol", &["cluster-c"], long_exp));
    let other_key = Idp::new(GITLAB, "users-1")?;
    let unknown_kid = Idp::new(GITLAB, "users-unknown")?;
    let mut wrong_aud = claims("alice", &["cluster-a"], long_exp);
    wrong_aud["aud"] = "another-hub".into();
    let mut with_iss = claims("alice", &["cluster-a"], long_exp);
    with_iss["iss"] = GITLAB.into();
    let attacks: Arc<Vec<String>> = Arc::new(vec![
        user_key.token(claims("alice", &["cluster-a"], now - 3600)),
        other_key.token(claims("alice", &["cluster-a"], long_exp)),
        unknown_kid.token(claims("alice", &["cluster-a"], long_exp)),
        idp::unsigned("users-1", &with_iss),
        user_key.hs256_with_public_key(&with_iss),
        user_key.token(wrong_aud),
        "not.a.token".into(),
    ]);

    let through = |got: &Got| -> Result<(), String> {
        let seen = body(got)?;
        if seen["path"] != "/api/v1/namespaces?limit=1" {
            return Err(format!("the cluster saw {}", seen["path"]));
        }
        if seen["headers"]["host"] != "kubernetes.default.svc" {
            return Err(format!("the cluster saw Host {}", seen["headers"]["host"]));
        }
        for h in ["authorization", "x-edgewise-tunnel-cluster"] {
            if seen["headers"].get(h).is_some() {
                return Err(format!("{h} reached the cluster"));
            }
        }
        Ok(())
    };
    const CHECK_T: &str = "the cluster sees the path without the prefix, Host rewritten, no token, no tunnel header";
    let allowed = || vec![ok("200", &[(&ta("allowed"), 1), (kp, 1)]).check(CHECK_T, through)];
    let bearer = |t: &str| format!("Bearer {t}");
    let get = |token: Option<String>, path: &'static str, extra: &'static [(&'static str, &'static str)]| {
        let client = plain.clone();
        fixed(move || {
            let auth = token.as_deref().map(bearer);
            let mut headers: Vec<(&str, &str)> = extra.to_vec();
            if let Some(a) = &auth {
                headers.push(("authorization", a));
            }
            http(&client, users, "hub.example", path, &headers)
        })
    };
    let cluster_a = "/clusters/cluster-a/api/v1/namespaces?limit=1";
    let mut classes = vec![
        class(Kind::Valid, "alice to cluster-a (cached token)", 10, get(Some(alice.clone()), cluster_a, &[]), allowed()),
        class(
            Kind::Valid,
            "alice to cluster-a, a new token every request",
            5,
            {
                let (client, key) = (plain.clone(), user_key.clone());
                Box::new(move |n| {
                    let now = idp::now();
                    let t = key.token(json!({"sub": "alice", "aud": tn::AUDIENCE, "clusters": ["cluster-a"], "exp": now + 600, "iat": now, "jti": n}));
                    http(&client, users, "hub.example", cluster_a, &[("authorization", &bearer(&t))])
                })
            },
            allowed(),
        ),
        class(
            Kind::Invalid,
            "alice to cluster-a with a forged x-edgewise-tunnel-cluster",
            2,
            get(Some(alice.clone()), cluster_a, &[("x-edgewise-tunnel-cluster", "cluster-b")]),
            allowed(),
        ),
        class(Kind::Invalid, "no token", 3, get(None, cluster_a, &[]), vec![ok("401 unauthenticated", &[(&ta("unauthenticated"), 1)])]),
        class(
            Kind::Invalid,
            "attack tokens: expired, another key, unknown kid, alg none, HS256 with the public key, wrong audience, garbage",
            6,
            {
                let (client, attacks) = (plain.clone(), attacks.clone());
                Box::new(move |n| {
                    let t = &attacks[(n as usize) % attacks.len()];
                    http(&client, users, "hub.example", cluster_a, &[("authorization", &bearer(t))])
                })
            },
            vec![ok("401 invalid_token", &[(&ta("unauthenticated"), 1)])],
        ),
        class(
            Kind::Invalid,
            "bob (cluster-b only) to cluster-a",
            3,
            get(Some(bob), cluster_a, &[]),
            vec![ok("403 forbidden", &[(&ta("forbidden"), 1)])],
        ),
        class(
            Kind::Invalid,
            "a path outside /clusters/<id>/",
            2,
            get(Some(alice.clone()), "/api/v1/namespaces", &[("x-edgewise-tunnel-cluster", "cluster-a")]),
            vec![ok("404 not_found", &[(&ta("not_found"), 1)])],
        ),
        class(
            Kind::Invalid,
            "a cluster with no agent (carol to cluster-c)",
            2,
            get(Some(carol), "/clusters/cluster-c/api", &[]),
            vec![ok("503 tunnel_unavailable", &[(&ta("allowed"), 1)])],
        ),
        class(
            Kind::Invalid,
            "an Authorization that is not UTF-8",
            1,
            {
                let client = plain.clone();
                fixed(move || Req::Raw {
                    client: client.clone(),
                    addr: users,
                    server_name: "hub.example".into(),
                    bytes: raw_get(b"hub.example", "/clusters/cluster-a/version", &[("authorization", b"Bearer caf\xe9")]),
                })
            },
            vec![ok("400 invalid_header", &[(&ta("bad_request"), 1)])],
        ),
    ];
    let through_n = |n: u64| [(ta("allowed"), n), (kp.to_string(), n)];
    let via = |label: &str, n: u64| {
        let counters = through_n(n);
        let counters: Vec<(&str, u64)> = counters.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        ok(label, &counters)
    };
    let table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            // Allowed by the filter, then Envoy's HTTP/2 hop into the tunnel resets the stream
            // (obs-text is not a valid HTTP/2 header value).
            "obs-text in a header value" => vec![ok("503", &[(&ta("allowed"), 1)])],
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            "a second Authorization" => vec![ok("401 invalid_token", &[(&ta("unauthenticated"), 1)])],
            "a second Host" | "a body on GET" | POST_LENGTH | POST_CHUNKED => vec![via("200", 1)],
            POST_EXPECT => vec![via("100+200", 1)],
            "two pipelined requests" => vec![via("200+200", 2)],
            _ => return None,
        })
    };
    let alice_bearer = bearer(&alice);
    let valid: [(&str, &[u8]); 1] = [("authorization", alice_bearer.as_bytes())];
    let path = "/clusters/cluster-a/version";
    classes.extend(hostile_classes(hostile::cases("hub.example", path, &valid), &plain, users, "hub.example", table));
    let h2_table = |name: &str| -> Option<Vec<Allowed>> {
        Some(match name {
            "a path without a slash"
            | "two :path"
            | "an unknown pseudo-header"
            | "no :method"
            | "a pseudo-header after a header"
            | "an upper-case name"
            | "a connection header"
            | "an :authority that is not UTF-8" => vec![Allowed::h2_refused(&[])],
            _ => return None,
        })
    };
    classes.extend(h2_classes(None, users, "hub.example", path, &valid, vec![via("200", 1)], h2_table));

    let chaos = Arc::new(Chaos::default());
    let chaos_fn: ChaosFn = {
        let issuers = issuers.clone();
        Box::new(move |chaos, deadline| Box::pin(issuer_chaos(chaos, deadline, issuers, &[GITLAB])))
    };
    let seen = kubectl.seen.clone();
    Ok(Scenario {
        name: "tunnel",
        about: "envoy/tunnel-hub.yaml (two workers) and envoy/tunnel-agent.yaml: the agent dials the hub's \
                handshake listener with its cluster-a certificate, users call the hub's plain-HTTP listener, \
                requests go through the tunnel to a kubectl-proxy stand-in; ES256 user tokens from an issuer \
                stand-in; JWKS timing shortened as for cloud-connector"
            .into(),
        classes,
        watched: vec![
            Watched {
                role,
                envoy: hub,
                prefixes: vec!["edgewise.tunnel_auth.requests.".into()],
                plugin: Some(("tunnel-auth", "tunnel_auth")),
            },
            Watched { role: "tunnel-agent", envoy: agent, prefixes: vec![], plugin: None },
        ],
        stand_ins: vec![stand_in("kubectl-proxy", move || seen.lock().map(|s| s.len() as u64).unwrap_or(0))],
        chaos_fn: Mutex::new(Some(chaos_fn)),
        chaos,
        chaos_about: "the issuer flaps: every ~15 s gitlab.com answers 503 to discovery and JWKS for 8 s".into(),
        effects: vec![
            Effect {
                what: "JWKS fetches failed",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.tunnel_auth.jwks.gitlab_com.fetch.failed")),
                requires: Some("outages of gitlab.com"),
            },
            Effect {
                what: "JWKS fetches ok",
                role,
                stat: Sel::Exact(envoy::stat("edgewise.tunnel_auth.jwks.gitlab_com.fetch.ok")),
                requires: Some("issuer flaps"),
            },
        ],
        relations: vec![],
        relational: vec![],
        _keep: vec![Box::new(issuer_server), Box::new(kubectl)],
    })
}

// ---------------------------------------------------------------------------------------------
// Driving the load and checking the results.

#[derive(Default)]
struct Tally {
    sent: u64,
    labels: BTreeMap<String, u64>,
    unexpected: u64,
    examples: Vec<String>,
    /// Answers whose counters are not known (hostile cases with no listed expectation).
    unknown_counters: u64,
    first: Option<f64>,
    /// When the last answer came (seconds since the start of the load).
    last: f64,
    latencies_ms: Vec<f32>,
}

struct Run {
    tallies: Vec<Mutex<Tally>>,
    expected: Mutex<BTreeMap<String, u64>>,
    latencies_ms: Mutex<Vec<f32>>,
    max_lag: Mutex<f64>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn pick(sc: &Scenario, n: u64) -> usize {
    let total: u64 = sc.classes.iter().map(|c| u64::from(c.weight)).sum();
    let mut r = splitmix(n) % total.max(1);
    for (i, c) in sc.classes.iter().enumerate() {
        if r < u64::from(c.weight) {
            return i;
        }
        r -= u64::from(c.weight);
    }
    0
}

/// Classifies one answer; the counters it adds when expected.
fn classify(class: &Class, got: &Got, label: &str) -> Result<Option<Vec<(String, u64)>>, String> {
    for a in &class.allowed {
        if a.want.matches(got, label) {
            if let Some(check) = &a.check {
                check(got)?;
            }
            return Ok(a.counters.clone());
        }
    }
    Err("not among the answers this class allows".into())
}

async fn worker(
    sc: Arc<Scenario>,
    run: Arc<Run>,
    next: Arc<AtomicU64>,
    start: Instant,
    deadline: Instant,
    interval: f64,
) {
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let due = start + Duration::from_secs_f64(interval * n as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let lag = Instant::now().saturating_duration_since(due).as_secs_f64();
        let index = pick(&sc, n);
        let class = &sc.classes[index];
        let during = sc.chaos.active();
        let sent_at = start.elapsed().as_secs_f64();
        let t = Instant::now();
        let got = send((class.make)(n)).await;
        let latency = t.elapsed();
        let label = got.label();
        let verdict = classify(class, &got, &label);
        if let Ok(mut l) = run.latencies_ms.lock() {
            l.push(latency.as_secs_f32() * 1000.0);
        }
        if let Ok(mut m) = run.max_lag.lock() {
            *m = m.max(lag);
        }
        let Ok(mut tally) = run.tallies[index].lock() else { continue };
        tally.sent += 1;
        *tally.labels.entry(label.clone()).or_default() += 1;
        tally.first.get_or_insert(sent_at);
        tally.last = tally.last.max(sent_at + latency.as_secs_f64());
        tally.latencies_ms.push(latency.as_secs_f32() * 1000.0);
        match verdict {
            Ok(Some(counters)) => {
                drop(tally);
                if let Ok(mut e) = run.expected.lock() {
                    for (k, v) in counters {
                        *e.entry(k).or_default() += v;
                    }
                }
            }
            Ok(None) => tally.unknown_counters += 1,
            Err(why) => {
                tally.unexpected += 1;
                if tally.examples.len() < EXAMPLES {
                    let after = sc.chaos.active();
                    tally.examples.push(format!(
                        "t={sent_at:.1} s, {:.0} ms, during: {during}{}: `{label}`: {why}; {}",
                        latency.as_secs_f64() * 1000.0,
                        if after == during { String::new() } else { format!(" (at the answer: {after})") },
                        got.detail()
                    ));
                }
                eprintln!("soak: {} / {}: unexpected `{label}` at t={sent_at:.1} s: {why}", sc.name, class.name);
            }
        }
    }
}

struct Snapshot {
    stats: Vec<BTreeMap<String, u64>>,
    stand_ins: Vec<u64>,
}

async fn snapshot(sc: &Scenario) -> Snapshot {
    let mut stats = Vec::new();
    for w in &sc.watched {
        stats.push(w.envoy.stats().await.unwrap_or_default());
    }
    Snapshot { stats, stand_ins: sc.stand_ins.iter().map(|(_, f)| f()).collect() }
}

/// The counters compared with what was sent, by key.
fn tracked(sc: &Scenario, snap: &Snapshot) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (w, stats) in sc.watched.iter().zip(&snap.stats) {
        for (k, v) in stats {
            let name = k.strip_prefix("wasmcustom.").unwrap_or(k);
            if w.prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                out.insert(key(w.role, name), *v);
            }
        }
    }
    for ((name, _), v) in sc.stand_ins.iter().zip(&snap.stand_ins) {
        out.insert(format!("stand-in: {name}"), *v);
    }
    out
}

fn deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0)))).collect()
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead"))) {
        return None;
    }
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// user + system CPU ticks of a process.
fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// (busy, total) CPU ticks of the machine.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Least-squares slope of (minutes, MiB).
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 3 {
        return 0.0;
    }
    let (sx, sy) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) =
        samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx) * (x - mx)));
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

struct RssSeries {
    role: &'static str,
    /// (minutes since the start of the load, MiB)
    samples: Vec<(f64, f64)>,
    gone_at: Option<f64>,
}

impl RssSeries {
    fn summary(&self) -> (f64, f64, f64, f64) {
        let first = self.samples.first().map_or(0.0, |s| s.1);
        let last = self.samples.last().map_or(0.0, |s| s.1);
        let half = self.samples.last().map_or(0.0, |s| s.0) / 2.0;
        let second: Vec<(f64, f64)> = self.samples.iter().copied().filter(|s| s.0 >= half).collect();
        (first, last, slope(&self.samples), slope(&second))
    }

    /// Grows over the second half of the load: a slope above the limit and a growth above the
    /// limit in that half.
    fn leaking(&self) -> bool {
        let half = self.samples.last().map_or(0.0, |s| s.0) / 2.0;
        let second: Vec<(f64, f64)> = self.samples.iter().copied().filter(|s| s.0 >= half).collect();
        let growth = second.last().map_or(0.0, |s| s.1) - second.first().map_or(0.0, |s| s.1);
        slope(&second) > RSS_SLOPE_LIMIT && growth > RSS_GROWTH_MIB
    }
}

async fn sample_rss(envoys: Vec<(&'static str, u32)>, start: Instant, deadline: Instant) -> Vec<RssSeries> {
    let mut series: Vec<RssSeries> =
        envoys.iter().map(|(role, _)| RssSeries { role, samples: Vec::new(), gone_at: None }).collect();
    loop {
        let t = start.elapsed().as_secs_f64() / 60.0;
        for (s, (_, pid)) in series.iter_mut().zip(&envoys) {
            if s.gone_at.is_some() {
                continue;
            }
            match rss_mib(*pid) {
                Some(mib) => s.samples.push((t, mib)),
                None => s.gone_at = Some(t * 60.0),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return series;
        }
        tokio::time::sleep_until((now + RSS_EVERY).min(deadline).into()).await;
    }
}

#[derive(Serialize, Deserialize, Clone, Default)]
struct Row {
    scenario: String,
    requests: u64,
    unexpected: u64,
    vm_failures: u64,
    rss: String,
    metrics: String,
    ok: bool,
}

struct Outcome {
    row: Row,
    markdown: String,
    problems: Vec<String>,
}

/// Runs one scenario's load and chaos from `start` to `deadline`, then checks everything.
async fn soak(sc: Arc<Scenario>, workers: usize, rps: f64, start: Instant, deadline: Instant, build: Build) -> Outcome {
    let run = Arc::new(Run {
        tallies: sc.classes.iter().map(|_| Mutex::new(Tally::default())).collect(),
        expected: Mutex::new(BTreeMap::new()),
        latencies_ms: Mutex::new(Vec::new()),
        max_lag: Mutex::new(0.0),
    });
    let baseline = snapshot(&sc).await;
    tokio::time::sleep_until(start.into()).await;
    if let Ok(mut t0) = sc.chaos.t0.lock() {
        *t0 = Some(start);
    }
    let chaos = sc.chaos_fn.lock().ok().and_then(|mut f| f.take()).map(|f| tokio::spawn(f(sc.chaos.clone(), deadline)));
    let pids: Vec<(&'static str, u32)> = sc.watched.iter().map(|w| (w.role, w.envoy.pid())).collect();
    let rss = tokio::spawn(sample_rss(pids, start, deadline));
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(worker(sc.clone(), run.clone(), next.clone(), start, deadline, 1.0 / rps)))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            sc.chaos.problem(format!("a load task failed: {e}"));
        }
    }
    if let Some(chaos) = chaos {
        if tokio::time::timeout(secs(40), chaos).await.is_err() {
            sc.chaos.problem("the chaos task did not finish 40 s after the deadline");
        }
    }
    let rss = rss.await.unwrap_or_default();
    let last = snapshot(&sc).await;
    check(&sc, &run, &baseline, &last, &rss, build, start)
}

fn short(counter: &str) -> String {
    let (role, name) = counter.split_once(": ").unwrap_or(("", counter));
    let name = [
        "edgewise.serverless.",
        "edgewise.egress.",
        "edgewise.mesh_identity.",
        "edgewise.cloud_connector.",
        "edgewise.tunnel_auth.",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))
    .unwrap_or(name);
    if role == "stand-in" || role == "peers" {
        format!("{role} {name}")
    } else {
        name.to_string()
    }
}

fn check(
    sc: &Scenario,
    run: &Run,
    baseline: &Snapshot,
    last: &Snapshot,
    rss: &[RssSeries],
    build: Build,
    start: Instant,
) -> Outcome {
    let mut problems: Vec<String> = sc.chaos.problems.lock().map(|p| p.clone()).unwrap_or_default();
    let mut md = String::new();
    let tallies: Vec<Tally> =
        run.tallies.iter().map(|t| t.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default()).collect();
    let requests: u64 = tallies.iter().map(|t| t.sent).sum();
    let unexpected: u64 = tallies.iter().map(|t| t.unexpected).sum();
    let unknown: u64 = tallies.iter().map(|t| t.unknown_counters).sum();
    if unexpected > 0 {
        problems.push(format!("{unexpected} unexpected answers"));
    }
    let _ = writeln!(md, "### {}\n\n{}.\n", sc.name, sc.about);

    // Chaos.
    let counts = sc.chaos.counts.lock().map(|c| c.clone()).unwrap_or_default();
    let counts_text: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(
        md,
        "**Chaos**: {}. Done: {}.",
        sc.chaos_about,
        if counts_text.is_empty() { "nothing".into() } else { counts_text.join(", ") }
    );
    let base_stats = |role: &str| sc.watched.iter().position(|w| w.role == role);
    let mut effect_lines = Vec::new();
    for e in &sc.effects {
        let Some(i) = base_stats(e.role) else { continue };
        let read = |stats: &BTreeMap<String, u64>| -> u64 {
            match &e.stat {
                Sel::Exact(name) => stats.get(name).copied().unwrap_or(0),
                Sel::Suffix(s) => stats.iter().filter(|(k, _)| k.ends_with(s)).map(|(_, v)| v).sum(),
            }
        };
        let (before, after) = (read(&baseline.stats[i]), read(&last.stats[i]));
        let delta = after as i64 - before as i64;
        effect_lines.push(format!("{} {delta:+} (now {after})", e.what));
        if let Some(kind) = e.requires {
            if sc.chaos.count(kind) > 0 && delta == 0 {
                problems.push(format!(
                    "the chaos had no visible effect: {} did not move after {} {kind}",
                    e.what,
                    sc.chaos.count(kind)
                ));
            }
        }
    }
    if !effect_lines.is_empty() {
        let _ = writeln!(md, "Seen by Envoy: {}.", effect_lines.join("; "));
    }
    let events = sc.chaos.events.lock().map(|e| e.clone()).unwrap_or_default();
    if !events.is_empty() {
        let _ = writeln!(
            md,
            "\n<details><summary>{} chaos events</summary>\n\n{}\n\n</details>",
            events.len(),
            events.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n")
        );
    }

    // Classes.
    let _ = writeln!(
        md,
        "\n| kind | class | requests | answers | allowed answers (-> counters they add) | unexpected | latency p50 / max |\n|---|---|---:|---|---|---:|---:|"
    );
    for (c, t) in sc.classes.iter().zip(&tallies) {
        let answers: Vec<String> = t.labels.iter().map(|(l, n)| format!("`{l}` {n}")).collect();
        let allowed: Vec<String> = c
            .allowed
            .iter()
            .map(|a| {
                let counters = match &a.counters {
                    None => " -> counters not known".to_string(),
                    Some(v) if v.is_empty() => String::new(),
                    Some(v) => format!(
                        " -> {}",
                        v.iter()
                            .map(|(k, n)| if *n == 1 { short(k) } else { format!("{} x{n}", short(k)) })
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let checks = if a.checks.is_empty() { String::new() } else { format!("; checked: {}", a.checks) };
                format!("{}{counters}{checks}", a.want.describe())
            })
            .collect();
        let mut lat = t.latencies_ms.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let (p50, max) = (lat.get(lat.len() / 2).copied().unwrap_or(0.0), lat.last().copied().unwrap_or(0.0));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {p50:.0} / {max:.0} ms |",
            c.kind.name(),
            c.name,
            t.sent,
            answers.join(", "),
            allowed.join("<br>"),
            if t.unexpected == 0 { "0".into() } else { format!("**{}**", t.unexpected) }
        );
    }
    let examples: Vec<String> = sc
        .classes
        .iter()
        .zip(&tallies)
        .filter(|(_, t)| !t.examples.is_empty())
        .flat_map(|(c, t)| t.examples.iter().map(move |e| format!("- {}: {e}", c.name)))
        .collect();
    let _ = writeln!(
        md,
        "\n**Unexpected answers**: {}",
        if examples.is_empty() {
            "none.".to_string()
        } else {
            format!("{unexpected}; examples:\n\n{}", examples.join("\n"))
        }
    );

    // Rate-limit bounds.
    for (c, t) in sc.classes.iter().zip(&tallies) {
        let Some(b) = &c.bound else { continue };
        let allowed = t.labels.get(b.allowed).copied().unwrap_or(0);
        let limited = t.labels.get(b.limited).copied().unwrap_or(0);
        let span = t.last - t.first.unwrap_or(t.last);
        let most = b.burst + b.per_second * span + 1.0;
        let held = (allowed as f64) <= most;
        let engaged = limited > 0 || (t.sent as f64) <= most;
        let _ = writeln!(
            md,
            "\n**Rate limit** ({}): {allowed} allowed and {limited} limited over {span:.0} s; at most {most:.0} may be allowed (burst {} + {}/s): {}.",
            c.name,
            b.burst,
            b.per_second,
            if held && engaged { "held" } else { "NOT held" }
        );
        if !held || !engaged {
            problems.push(format!(
                "the rate limit of {} did not hold: {allowed} allowed (at most {most:.0}), {limited} limited",
                c.name
            ));
        }
    }

    // RSS.
    let _ = writeln!(md, "\n| Envoy | RSS at the start | at the end | slope | slope, second half | samples |\n|---|---:|---:|---:|---:|---:|");
    let mut rss_cells = Vec::new();
    for s in rss {
        let (first, end, whole, second) = s.summary();
        let _ = writeln!(
            md,
            "| {} | {first:.1} MiB | {end:.1} MiB | {whole:+.2} MiB/min | {second:+.2} MiB/min | {} |",
            s.role,
            s.samples.len()
        );
        rss_cells.push(format!("{}: {first:.0} -> {end:.0} MiB, {whole:+.2} MiB/min ({second:+.2})", s.role));
        if let Some(at) = s.gone_at {
            problems.push(format!("Envoy {} exited or became a zombie at t={at:.0} s", s.role));
        }
        if s.leaking() {
            problems
                .push(format!("Envoy {}'s RSS grows: {second:+.2} MiB/min over the second half of the load", s.role));
        }
    }

    // VM failures.
    let mut vm_failures = 0u64;
    let mut vm_lines = Vec::new();
    for (w, stats) in sc.watched.iter().zip(&last.stats) {
        let Some((plugin, filter)) = w.plugin else { continue };
        let names: Vec<String> = match build {
            Build::Wasm => ["vm_reload_success", "vm_reload_failure", "vm_reload_backoff"]
                .iter()
                .map(|s| format!("wasm.{plugin}.{s}"))
                .collect(),
            Build::Native => vec![format!("edgewise.{filter}.panics")],
        };
        for name in names {
            let v = stats.get(&name).copied().unwrap_or(0);
            vm_failures += v;
            vm_lines.push(format!("{}: `{name}` {v}", w.role));
        }
        let log = w.envoy.log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["panicked", "Function: proxy_on", "Wasm VM failed", "failed: Uncaught", "wasm trap"]
                    .iter()
                    .any(|p| l.contains(p))
            })
            .collect();
        vm_failures += bad.len() as u64;
        vm_lines.push(format!("{}: {} log lines of a trap or panic", w.role, bad.len()));
        for l in bad.iter().take(3) {
            vm_lines.push(format!("{}: `{}`", w.role, l.chars().take(200).collect::<String>()));
        }
        if let Some(mem) = stats.iter().find(|(k, _)| k.as_str() == format!("wasm.{plugin}.vm_memory_size")) {
            vm_lines.push(format!("{}: wasm linear memory {} KiB at the end", w.role, mem.1 / 1024));
        }
    }
    if vm_failures > 0 {
        problems.push(format!("{vm_failures} VM failures or panics"));
    }
    let _ = writeln!(md, "\n**VM failures**: {vm_failures} ({}).", vm_lines.join("; "));

    // Counters.
    let expected = run.expected.lock().map(|e| e.clone()).unwrap_or_default();
    let actual = deltas(&tracked(sc, baseline), &tracked(sc, last));
    let keys: BTreeSet<&String> =
        expected.keys().chain(actual.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k)).collect();
    let _ = writeln!(md, "\n| counter | expected (from the answers) | counted | |\n|---|---:|---:|---|");
    let (mut equal, mut total) = (0, 0);
    for k in keys {
        if sc.relational.contains(k) {
            continue;
        }
        let (e, a) = (expected.get(k).copied().unwrap_or(0), actual.get(k).copied().unwrap_or(0));
        total += 1;
        let verdict = if e == a {
            equal += 1;
            "equal".to_string()
        } else if a.abs_diff(e) <= 2 * unknown {
            equal += 1;
            format!("within the {unknown} answers whose counters are not known")
        } else {
            problems.push(format!("counter {k}: expected {e}, counted {a}"));
            "**differs**".to_string()
        };
        let _ = writeln!(md, "| {k} | {e} | {a} | {verdict} |");
    }
    for (what, f) in &sc.relations {
        let (left, right) = f(&actual, &expected);
        total += 1;
        let verdict = if left == right {
            equal += 1;
            "equal".to_string()
        } else {
            problems.push(format!("{what}: {left} against {right}"));
            "**differs**".to_string()
        };
        let _ = writeln!(md, "| {what} | {right} | {left} | {verdict} |");
    }
    let (lat, lag) = {
        let mut l = run.latencies_ms.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| l.get(((l.len() as f64 - 1.0) * p).round().max(0.0) as usize).copied().unwrap_or(0.0);
        ((q(0.5), q(0.99), l.last().copied().unwrap_or(0.0)), run.max_lag.lock().map(|m| *m).unwrap_or(0.0))
    };
    let _ = writeln!(
        md,
        "\nLatency: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms; the latest a request started after its slot: {lag:.2} s; load from t=0 to t={:.0} s.",
        lat.0,
        lat.1,
        lat.2,
        start.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        let _ = writeln!(md, "\n**Problems**: none.\n");
    } else {
        let _ = writeln!(
            md,
            "\n**Problems**:\n\n{}\n",
            problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n")
        );
    }
    Outcome {
        row: Row {
            scenario: sc.name.into(),
            requests,
            unexpected,
            vm_failures,
            rss: rss_cells.join("<br>"),
            metrics: format!("{equal}/{total} equal"),
            ok: problems.is_empty(),
        },
        markdown: md,
        problems: problems.iter().map(|p| format!("{}: {p}", sc.name)).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// One build (a child process), and the whole run.

#[derive(Serialize, Deserialize, Default)]
struct Part {
    build: String,
    ok: bool,
    setup_seconds: f64,
    load_seconds: f64,
    rows: Vec<Row>,
    problems: Vec<String>,
    markdown: String,
}

fn settings() -> (f64, usize) {
    let rps = std::env::var("SOAK_RPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20.0f64);
    let tasks = std::env::var("SOAK_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize);
    (rps.max(0.1), tasks.max(1))
}

async fn setup_all(run: &Path, long_exp: u64) -> Result<Vec<Arc<Scenario>>> {
    let mut out = Vec::new();
    eprintln!("soak: setting up serverless");
    out.push(Arc::new(serverless(run, long_exp).await.context("serverless")?));
    eprintln!("soak: setting up egress");
    out.push(Arc::new(egress(run, long_exp).await.context("egress")?));
    eprintln!("soak: setting up mesh");
    out.push(Arc::new(mesh_scenario(run, long_exp).await.context("mesh")?));
    eprintln!("soak: setting up cloud-connector");
    out.push(Arc::new(cloud_connector(run, long_exp).await.context("cloud-connector")?));
    eprintln!("soak: setting up tunnel");
    out.push(Arc::new(tunnel(run, long_exp).await.context("tunnel")?));
    Ok(out)
}

/// SOAK_PROBE=1: each class once, on a quiet Envoy: its answer and the counters it moved.
async fn probe(scenarios: &[Arc<Scenario>]) {
    for sc in scenarios {
        println!("== {}", sc.name);
        for (n, c) in sc.classes.iter().enumerate() {
            let before = tracked(sc, &snapshot(sc).await);
            let sent = Instant::now();
            let got = send((c.make)(n as u64)).await;
            let took = sent.elapsed();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = tracked(sc, &snapshot(sc).await);
            let label = got.label();
            let listed = |counters: Vec<(String, u64)>| -> BTreeSet<String> {
                counters
                    .into_iter()
                    .filter(|(k, v)| *v > 0 && !sc.relational.contains(k))
                    .map(|(k, v)| format!("{} +{v}", short(&k)))
                    .collect()
            };
            let moved = listed(deltas(&before, &after).into_iter().collect());
            let verdict = match classify(c, &got, &label) {
                Ok(Some(counters)) => {
                    let want = listed(counters);
                    if want == moved {
                        "ok".to_string()
                    } else {
                        format!("COUNTERS expected [{}]", want.into_iter().collect::<Vec<_>>().join(", "))
                    }
                }
                Ok(None) => "ok (counters not known)".into(),
                Err(e) => format!("UNEXPECTED ({e}): {}", got.detail()),
            };
            let moved: Vec<String> = moved.into_iter().collect();
            println!(
                "{:<18} {:<70} {:>5} ms `{label}` [{}] {verdict}",
                c.kind.name(),
                c.name,
                took.as_millis(),
                moved.join(", ")
            );
        }
    }
}

async fn one_build(out: &Path) -> Result<bool> {
    edgewise::init_crypto();
    let build = Build::current();
    let budget = secs(std::env::var("SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300));
    let (rps, workers) = settings();
    let t0 = Instant::now();
    let long_exp = idp::now() + budget.as_secs() + 3600;
    let run = tempfile::Builder::new().prefix("edgewise-soak-").tempdir()?;
    let mut part = Part { build: format!("{build:?}").to_lowercase(), ..Part::default() };
    let scenarios = match setup_all(run.path(), long_exp).await {
        Ok(s) => s,
        Err(e) => {
            part.problems.push(format!("set-up failed: {e:#}"));
            part.markdown = format!("## {} build\n\n**Set-up failed**: {e:#}\n", part.build);
            std::fs::write(out, serde_json::to_string(&part)?)?;
            eprintln!("soak: set-up failed: {e:#}");
            return Ok(false);
        }
    };
    if std::env::var("SOAK_PROBE").is_ok_and(|v| v == "1") {
        probe(&scenarios).await;
        std::fs::write(out, serde_json::to_string(&Part { ok: true, ..part })?)?;
        return Ok(true);
    }
    part.setup_seconds = t0.elapsed().as_secs_f64();
    let load = budget.saturating_sub(t0.elapsed()).saturating_sub(TEARDOWN).max(secs(10));
    let start = Instant::now() + Duration::from_millis(500);
    let deadline = start + load;
    eprintln!(
        "soak: {} build: load for {:.0} s, {rps} requests/s per scenario from {workers} tasks",
        part.build,
        load.as_secs_f64()
    );
    let pids: Vec<String> =
        scenarios.iter().flat_map(|s| s.watched.iter().map(|w| w.envoy.pid().to_string())).collect();
    let ours = |pids: &[String]| cpu_ticks("self") + pids.iter().map(|p| cpu_ticks(p)).sum::<u64>();
    let (cpu0, m0) = (ours(&pids), machine_ticks());
    let handles: Vec<_> =
        scenarios.iter().map(|sc| tokio::spawn(soak(sc.clone(), workers, rps, start, deadline, build))).collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await?);
    }
    let (cpu1, m1) = (ours(&pids), machine_ticks());
    part.load_seconds = load.as_secs_f64();
    let elapsed_ticks = (m1.1 - m0.1).max(1) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = (m1.0 - m0.0) as f64 / elapsed_ticks * cores;
    let mine = (cpu1 - cpu0) as f64 / elapsed_ticks * cores;
    let others = (busy - mine).max(0.0);
    let requests: u64 = outcomes.iter().map(|o| o.row.requests).sum();
    part.problems = outcomes.iter().flat_map(|o| o.problems.clone()).collect();
    part.ok = part.problems.is_empty();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## {} build ({})\n\nSet-up {:.0} s, then {:.0} s of load: {rps} requests/s per scenario from {workers} tasks each, all five scenarios at once, {requests} requests in all. CPU over the load (of {cores:.0} cores): this soak (client, stand-ins and its {} Envoys) {mine:.2} cores on average, other processes {others:.2}.{}\n",
        part.build,
        if build == Build::Wasm { "`envoy/*.yaml`, the .wasm modules" } else { "`envoy/native/*.yaml`, libedgewise.so" },
        part.setup_seconds,
        part.load_seconds,
        pids.len(),
        if others > 0.3 { " **Other processes took a noticeable share of the machine during the load: latencies and start lags below are affected.**" } else { "" }
    );
    md.push('\n');
    for o in &outcomes {
        md.push_str(&o.markdown);
    }
    part.markdown = md;
    part.rows = outcomes.into_iter().map(|o| o.row).collect();
    std::fs::write(out, serde_json::to_string(&part)?)?;
    drop(scenarios);
    Ok(part.ok)
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn parent() -> Result<bool> {
    let total: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse())
        .transpose()
        .context("SOAK_SECONDS")?
        .unwrap_or(600);
    let builds: Vec<&str> = match std::env::var("EDGEWISE_BUILD").as_deref() {
        Err(_) | Ok("") => vec!["wasm", "native"],
        Ok("wasm") => vec!["wasm"],
        Ok("native") => vec!["native"],
        Ok(other) => bail!("EDGEWISE_BUILD={other}: use wasm or native"),
    };
    let per_build = total / builds.len() as u64;
    let (rps, workers) = settings();
    let exe = std::env::current_exe()?;
    let dir = edgewise::repo_root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = Vec::new();
    for build in &builds {
        let out = dir.join(format!("{build}.json"));
        let _ = std::fs::remove_file(&out);
        eprintln!("soak: the {build} build, {per_build} s");
        let status = Command::new(&exe)
            .env("EDGEWISE_BUILD", build)
            .env("SOAK_SECONDS", per_build.to_string())
            .env("SOAK_PART", &out)
            .status()
            .context("running the soak of one build")?;
        let part: Part = match std::fs::read_to_string(&out).ok().and_then(|t| serde_json::from_str(&t).ok()) {
            Some(p) => p,
            None => Part {
                build: build.to_string(),
                problems: vec![format!("the {build} build's soak ended ({status}) without results")],
                markdown: format!("## {build} build\n\n**No results**: the soak process ended with {status}.\n"),
                ..Part::default()
            },
        };
        parts.push(part);
    }
    if std::env::var("SOAK_PROBE").is_ok_and(|v| v == "1") {
        return Ok(parts.iter().all(|p| p.ok));
    }
    let ok = parts.iter().all(|p| p.ok && p.problems.is_empty());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let envoy_version = command_output(&edgewise::envoy::binary().display().to_string(), &["--version"]);
    let envoy_version = envoy_version.split_once("version: ").map_or(envoy_version.clone(), |(_, v)| v.to_string());
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Soak: every scenario under mixed load while certificates rotate and services flap\n\n\
         `make soak` (`src/bin/edgewise-soak.rs`). Last run: {date}, {:.0} s in all.\n\n\
         - Machine: {cores} cores, {cpu}, {mem:.1} GiB; load average {} before, {} after\n\
         - Envoy: {envoy_version}\n\
         - Settings: SOAK_SECONDS={total} ({} build{}, {per_build} s each, set-up included), SOAK_RPS={rps} per scenario, SOAK_TASKS={workers}\n\
         - Verdict: **{}**\n",
        started.elapsed().as_secs_f64(),
        loadavg(&load_before),
        loadavg(&load_after),
        builds.len(),
        if builds.len() == 1 { "" } else { "s" },
        if ok { "pass: no unexpected answer, no VM failure, RSS flat, every counter as sent" } else { "FAIL (problems listed below)" }
    );
    md.push_str(ABOUT);
    let _ = writeln!(md, "\n## Summary\n\n| build | scenario | requests | unexpected | VM failures / panics | Envoy RSS start -> end, slope (second half) | metric checks |\n|---|---|---:|---:|---:|---|---|");
    for p in &parts {
        for r in &p.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.build, r.scenario, r.requests, r.unexpected, r.vm_failures, r.rss, r.metrics
            );
        }
    }
    let problems: Vec<String> =
        parts.iter().flat_map(|p| p.problems.iter().map(move |x| format!("{}: {x}", p.build))).collect();
    let _ = writeln!(
        md,
        "\n{}\n",
        if problems.is_empty() {
            "No problems.".to_string()
        } else {
            format!("Problems:\n\n{}", problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n"))
        }
    );
    for p in &parts {
        md.push_str(&p.markdown);
        md.push('\n');
    }
    let path = edgewise::repo_root().join("bench/soak.md");
    std::fs::write(&path, md)?;
    eprintln!("soak: wrote {}; {}", path.display(), if ok { "pass" } else { "FAIL" });
    for p in &problems {
        eprintln!("soak: {p}");
    }
    Ok(ok)
}

const ABOUT: &str = "
## What it does

Each build runs in a process of its own: the five scenarios are set up from the library's
`edgewise::scenarios` (the shipped YAML, certificates made at run time, stand-ins on 127.0.0.1),
then all five run at once for the rest of the build's time. Per scenario a few tokio tasks send a
fixed number of requests per second, each request's class picked by a fixed pseudo-random
sequence weighted by the class's weight: valid requests, invalid ones (no token, expired and
forged tokens, unknown kids, unknown function hosts, destinations egress refuses, an
over-limit organization) and the hostile classes, every case of `edgewise::hostile::cases`
(raw HTTP/1.1) and of `edgewise::h2raw::odd_requests` (HTTP/2 frames). Meanwhile each
scenario's chaos runs on a schedule: certificate rotation (serverless, mesh), the token issuer
flapping (cloud-connector, tunnel), the management service flapping (serverless).

**Answers.** An answer is named by its status and, for JSON bodies, the stand-in that echoed it
(`\"server\"`) or the error (`\"error\"`; `\"status\"` for the health endpoint): `200 customer-a`,
`404 unknown_function`; pipelined answers as `200+200`; HTTP/2 frames as the status,
`RST_STREAM <code>`, `GOAWAY <code>` or `closed`; `refused` when the connection failed and
`timeout` when nothing came within 15 s. Each class lists the answers it allows; everything else
is unexpected, and so is an allowed answer whose body check fails (the checks are named in the
tables). The allowed sets hold during the chaos too, and are single answers almost everywhere,
because none of the chaos may change an answer:

- a valid request while certificates rotate: the same answer (the new certificates are in place
  before the old ones go: clients trust both front CAs, CA bundles overlap, each mesh step waits
  for Envoy to rebuild its TLS context);
- a valid request while the issuer is down: `200` from the keys in force (they were fetched at
  start; a failed refresh keeps them). `503 keys_unavailable` only happens to an issuer whose keys
  were never fetched, which the set-up rules out, so it is unexpected;
- an unknown kid while the issuer is down: `401 invalid_token`, the refetch it asks for fails and
  the keys in force do not have it (at most `wait_ms` later);
- a function while the management service fails, serves garbage or is gone: the last good table
  stays in force, so `200` (polled function) and `404 unknown_function` as before;
  `503 route_table_unavailable` only happens before the first table, which the set-up waits for;
- the over-limit organization: `200` or `429 rate_limited`, and the number of `200`s must stay
  within the token bucket (burst + rate x the time it was sent for), with at least one `429`.

A hostile case the tables do not list yet (a new case in `edgewise::hostile`) may get any answer
without a 5xx, with unknown counters; the report names it \"(no expectation listed)\".

**Counters.** Each allowed answer says what it adds to the filter's outcome counters (wasm:
`wasmcustom.edgewise.*`, native: `edgewise.*`) and to the stand-ins' request counts (how many
requests reached each upstream). After the load their deltas must equal the sums over the answers
received; Envoy's own `http.egress.rbac.denied` for egress. In the mesh scenario an HTTP/2 frame
answer does not say which workload served it, so the sidecar's `trusted_peer` is checked against
the requests the meshed workload got, less those of peers calling it directly.

**VM failures.** wasm: `wasm.<plugin>.vm_reload_success`, `vm_reload_failure` and
`vm_reload_backoff` (a trapped VM is rebuilt on the next request, `failure_policy: FAIL_RELOAD`);
native: `edgewise.<filter>.panics`; both: lines of a trap or panic in Envoy's log. All must be 0.

**RSS.** `VmRSS` of every Envoy every 5 s; the least-squares slope over the whole load and over its
second half (after the warm-up: token caches, rate-limit slots, V8's heap). A slope above 1 MiB/min
with more than 4 MiB of growth in the second half counts as a leak.
";

fn main() {
    let result = match std::env::var_os("SOAK_PART") {
        Some(out) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(one_build(&PathBuf::from(out)))),
        None => parent(),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: {e:#}");
            std::process::exit(2);
        }
    }
}

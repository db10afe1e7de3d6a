//! Classes of requests: how each is made, how often it is sent, and which answers it allows
//! (with what each allowed answer adds to the counters).

use std::net::SocketAddr;

use serde_json::Value;

use super::request::{Get, Got, Req};
use crate::client::Client;
use crate::h2raw::{self, Answer};
use crate::hostile;

/// Which answers an allowed entry covers.
pub enum Want {
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
    pub fn matches(&self, got: &Got, label: &str) -> bool {
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

    pub fn describe(&self) -> String {
        match self {
            Want::Label(l) => format!("`{l}`"),
            Want::H2Refused => "an HTTP/2 refusal (4xx, RST_STREAM/GOAWAY with an error code, or closed)".into(),
            Want::AnyClear => "any answer without a 5xx (no expectation listed for this case)".into(),
        }
    }
}

/// Counter keys (`<role>: <stat>` or `stand-in: <name>`) and how much an answer adds to each.
pub type Counters = Vec<(String, u64)>;

pub fn counters(list: &[(&str, u64)]) -> Counters {
    list.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

pub type Check = Box<dyn Fn(&Got) -> Result<(), String> + Send + Sync>;

/// An answer a class allows, and what it adds to the counters (`None`: not known, for cases
/// with no listed expectation; the counter checks then allow for it).
pub struct Allowed {
    pub want: Want,
    pub counters: Option<Counters>,
    pub check: Option<Check>,
    /// What the check verifies, for the report.
    pub checks: &'static str,
}

/// The answer labelled `label`, adding `counters`.
pub fn ok(label: &str, counters: &[(&str, u64)]) -> Allowed {
    answer(label, self::counters(counters))
}

/// As [`ok`], with counter keys made at run time.
pub fn answer(label: &str, counters: Counters) -> Allowed {
    Allowed { want: Want::Label(label.to_string()), counters: Some(counters), check: None, checks: "" }
}

impl Allowed {
    /// Also requires `f` to accept the answer; `what` says what it verifies.
    pub fn check(mut self, what: &'static str, f: impl Fn(&Got) -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.check = Some(Box::new(f));
        self.checks = what;
        self
    }

    pub fn h2_refused(counters: Option<Counters>) -> Self {
        Allowed { want: Want::H2Refused, counters, check: None, checks: "" }
    }

    pub fn any_clear() -> Self {
        Allowed { want: Want::AnyClear, counters: None, check: None, checks: "" }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    Valid,
    Invalid,
    HostileH1,
    HostileH2,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::Invalid => "invalid",
            Kind::HostileH1 => "hostile HTTP/1.1",
            Kind::HostileH2 => "hostile HTTP/2",
        }
    }
}

/// Makes the request numbered `n` (the load's sequence number).
pub type Make = Box<dyn Fn(u64) -> Req + Send + Sync>;

/// A kind of request, how often it is sent (its weight in the mix) and what it may get.
pub struct Class {
    pub kind: Kind,
    pub name: String,
    pub weight: u32,
    pub make: Make,
    pub allowed: Vec<Allowed>,
    /// A rate limit the class runs into: how many `allowed` answers at most.
    pub bound: Option<Bound>,
}

/// A token bucket: at most `burst + per_second x the time sent` answers labelled `allowed`, and
/// at least one labelled `limited` when more than that were sent.
pub struct Bound {
    pub allowed: &'static str,
    pub limited: &'static str,
    pub burst: f64,
    pub per_second: f64,
}

impl Class {
    pub fn new(
        kind: Kind,
        name: impl Into<String>,
        weight: u32,
        make: Make,
        allowed: impl Into<Vec<Allowed>>,
    ) -> Class {
        Class { kind, name: name.into(), weight, make, allowed: allowed.into(), bound: None }
    }

    pub fn bound(self, bound: Bound) -> Class {
        Class { bound: Some(bound), ..self }
    }
}

pub fn valid(name: &str, weight: u32, make: Make, allowed: impl Into<Vec<Allowed>>) -> Class {
    Class::new(Kind::Valid, name, weight, make, allowed)
}

pub fn invalid(name: &str, weight: u32, make: Make, allowed: impl Into<Vec<Allowed>>) -> Class {
    Class::new(Kind::Invalid, name, weight, make, allowed)
}

/// The first allowed answer `got` matches, checked: the counters it adds.
pub fn classify(class: &Class, got: &Got, label: &str) -> Result<Option<Counters>, String> {
    let Some(a) = class.allowed.iter().find(|a| a.want.matches(got, label)) else {
        return Err("not among the answers this class allows".into());
    };
    if let Some(check) = &a.check {
        check(got)?;
    }
    Ok(a.counters.clone())
}

/// Where requests go: a client (its TLS and ALPN, if any) and an address.
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub addr: SocketAddr,
}

impl Target {
    pub fn new(client: &Client, addr: SocketAddr) -> Target {
        Target { client: client.clone(), addr }
    }

    pub fn http(&self, get: Get) -> Req {
        Req::Http { client: self.client.clone(), addr: self.addr, get }
    }

    /// The same GET every time.
    pub fn get(&self, get: Get) -> Make {
        let target = self.clone();
        Box::new(move |_| target.http(get.clone()))
    }

    /// A GET made from each request's number.
    pub fn each(&self, get: impl Fn(u64) -> Get + Send + Sync + 'static) -> Make {
        let target = self.clone();
        Box::new(move |n| target.http(get(n)))
    }

    /// The same bytes on a raw HTTP/1.1 connection every time.
    pub fn raw(&self, server_name: &str, bytes: Vec<u8>) -> Make {
        let (target, server_name) = (self.clone(), server_name.to_string());
        Box::new(move |_| Req::Raw {
            client: target.client.clone(),
            addr: target.addr,
            server_name: server_name.clone(),
            bytes: bytes.clone(),
        })
    }
}

/// The answer of the upstream a scenario forwards to: the stand-ins that may echo a request
/// (none: the status alone), and the counters one forwarded request adds.
pub struct Upstream {
    pub servers: Vec<&'static str>,
    pub counters: Counters,
}

impl Upstream {
    pub fn new(servers: &[&'static str], counters: Counters) -> Upstream {
        Upstream { servers: servers.to_vec(), counters }
    }

    fn times(&self, n: u64) -> Counters {
        self.counters.iter().map(|(k, v)| (k.clone(), v * n)).collect()
    }

    /// `200 <server>` for each server, after `prefix` (a `100+` before it).
    fn one(&self, prefix: &str) -> Vec<Allowed> {
        self.labels().iter().map(|l| answer(&format!("{prefix}{l}"), self.times(1))).collect()
    }

    /// Two forwarded requests on one connection: each may reach either server.
    fn two(&self) -> Vec<Allowed> {
        let labels = self.labels();
        let pairs = labels.iter().flat_map(|a| labels.iter().map(move |b| format!("{a}+{b}")));
        pairs.map(|l| answer(&l, self.times(2))).collect()
    }

    fn labels(&self) -> Vec<String> {
        match self.servers.as_slice() {
            [] => vec!["200".into()],
            servers => servers.iter().map(|s| format!("200 {s}")).collect(),
        }
    }
}

/// The hostile cases with a body (`edgewise::hostile::cases`), by name.
pub const POST_LENGTH: &str = "a POST with Content-Length";
pub const POST_CHUNKED: &str = "a chunked POST with trailers";
pub const POST_EXPECT: &str = "a POST with Expect: 100-continue, its body at once";

/// The hostile cases at one listener: every case of `edgewise::hostile::cases` and of
/// `h2raw::odd_requests`, made acceptable to the filter by `valid` (a bearer token).
pub struct Hostile<'a> {
    /// Raw HTTP/1.1 goes through this client's TLS, if any, and so do the HTTP/2 frames.
    pub target: &'a Target,
    pub authority: &'a str,
    pub path: &'a str,
    pub valid: &'a [(&'a str, &'a [u8])],
    /// What answers the requests Envoy and the filter let through.
    pub upstream: Upstream,
    /// The cases whose answers differ from the common ones below.
    pub except: Vec<(&'static str, Vec<Allowed>)>,
}

impl Hostile<'_> {
    /// The answers a case gets unless `except` says otherwise.
    fn common(&self, case: &str) -> Option<Vec<Allowed>> {
        Some(match case {
            "obs-text in a header value"
            | "a second Authorization"
            | "a second Host"
            | "a body on GET"
            | POST_LENGTH
            | POST_CHUNKED => self.upstream.one(""),
            POST_EXPECT => self.upstream.one("100+"),
            // Envoy's codec refuses these before any filter runs.
            "control bytes in a header value" | "a non-ASCII authority" => vec![ok("400", &[])],
            "a 60 KiB header value" | "200 headers" => vec![ok("431", &[])],
            "two pipelined requests" => self.upstream.two(),
            _ => return None,
        })
    }

    /// Every HTTP/2 case is refused, before any filter runs.
    fn common_h2(case: &str) -> bool {
        matches!(
            case,
            "a path without a slash"
                | "two :path"
                | "an unknown pseudo-header"
                | "no :method"
                | "a pseudo-header after a header"
                | "an upper-case name"
                | "a connection header"
                | "an :authority that is not UTF-8"
        )
    }

    /// The HTTP/1.1 classes, then a valid HTTP/2 request as frames and the odd ones. A case
    /// with no listed answers may get any clear answer (HTTP/2: any refusal), with unknown
    /// counters, and says so in its name.
    pub fn classes(mut self) -> Vec<Class> {
        const UNLISTED: &str = " (no expectation listed)";
        let mut classes = Vec::new();
        for case in hostile::cases(self.authority, self.path, self.valid) {
            let listed = match self.except.iter().position(|(name, _)| *name == case.name) {
                Some(i) => Some(self.except.swap_remove(i).1),
                None => self.common(case.name),
            };
            let (allowed, note) = match listed {
                Some(a) => (a, ""),
                None => (vec![Allowed::any_clear()], UNLISTED),
            };
            let make = self.target.raw(self.authority, case.bytes);
            classes.push(Class::new(Kind::HostileH1, format!("{}{note}", case.name), 1, make, allowed));
        }
        let h2 = |name: &str, fields: Vec<(Vec<u8>, Vec<u8>)>, allowed: Vec<Allowed>| {
            let (tls, addr, server_name) =
                (self.target.client.tls_config(), self.target.addr, self.authority.to_string());
            let make: Make = Box::new(move |_| Req::H2 {
                tls: tls.clone(),
                addr,
                server_name: server_name.clone(),
                fields: fields.clone(),
            });
            Class::new(Kind::HostileH2, format!("HTTP/2: {name}"), 1, make, allowed)
        };
        let mut good: Vec<(Vec<u8>, Vec<u8>)> =
            [(":method", "GET"), (":scheme", "https"), (":authority", self.authority), (":path", self.path)]
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
        good.extend(self.valid.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())));
        classes.push(h2("a valid request, as frames", good, vec![answer("200", self.upstream.times(1))]));
        for (name, fields) in h2raw::odd_requests(self.authority, self.path, self.valid) {
            let class = if Self::common_h2(name) {
                h2(name, fields, vec![Allowed::h2_refused(Some(Vec::new()))])
            } else {
                h2(&format!("{name}{UNLISTED}"), fields, vec![Allowed::h2_refused(None)])
            };
            classes.push(class);
        }
        classes
    }
}

/// One of the request headers an echoing stand-in reports having seen.
pub fn seen_header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    seen["headers"].as_array()?.iter().find_map(|h| {
        let pair = h.as_array()?;
        (pair.first()?.as_str()? == name).then(|| pair.get(1)?.as_str()).flatten()
    })
}

/// The JSON body of an answer, for checks.
pub fn body(got: &Got) -> Result<&Value, String> {
    got.json().ok_or_else(|| "no JSON body".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(allowed: &[Allowed]) -> Vec<String> {
        allowed.iter().map(|a| a.want.describe()).collect()
    }

    #[test]
    fn upstream_answers_name_every_server_and_pair() {
        let up = Upstream::new(&["a", "b"], counters(&[("x", 1)]));
        assert_eq!(labels(&up.one("100+")), ["`100+200 a`", "`100+200 b`"]);
        let two = up.two();
        assert_eq!(labels(&two), ["`200 a+200 a`", "`200 a+200 b`", "`200 b+200 a`", "`200 b+200 b`"]);
        assert_eq!(two[0].counters, Some(vec![("x".to_string(), 2)]));
        assert_eq!(labels(&Upstream::new(&[], Vec::new()).two()), ["`200+200`"]);
    }

    #[test]
    fn classify_takes_the_first_matching_answer_and_runs_its_check() {
        let got = Got::Http { status: 200, json: Some(serde_json::json!({ "server": "a" })), text: String::new() };
        let make: Make = Box::new(|_| Req::Body {
            client: Client::plain(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            server_name: String::new(),
            case: hostile::body_cases("h", "/", &[]).remove(0),
        });
        let class = valid("c", 1, make, [ok("200 a", &[("k", 1)]), ok("404", &[])]);
        assert_eq!(classify(&class, &got, &got.label()), Ok(Some(vec![("k".to_string(), 1)])));
        let class = Class { allowed: vec![ok("200 a", &[]).check("never", |_| Err("no".into()))], ..class };
        assert_eq!(classify(&class, &got, &got.label()), Err("no".into()));
        let class = Class { allowed: vec![ok("404", &[])], ..class };
        assert!(classify(&class, &got, &got.label()).is_err());
        assert!(Want::AnyClear.matches(&got, ""));
        assert!(!Want::AnyClear.matches(&Got::Error("refused".into()), "refused"));
    }
}

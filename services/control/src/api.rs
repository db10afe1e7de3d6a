//! The HTTP port: the REST API (bearer token), the route table the filters poll, health and
//! metrics. Every error is JSON: `{"error": "<code>", "detail": "<why>"}`.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use edgewise_core::serverless::query::{read_number, Cursor, Query};
use edgewise_service::Client;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::control::Control;
use crate::domains::DomainRequest;
use crate::metrics::Watch;
use crate::model::ApiError;
use crate::model::{Customer, Function};
use crate::routes::{changes_json, Since};

/// Largest request body (a customer with a CA bundle).
const MAX_BODY: usize = 256 * 1024;
/// A request body must arrive whole within this (a body trickled a byte at a time is cut off).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const ROUTES_PATH: &str = "/v1/serverless/routes";
/// Where an ACME CA fetches HTTP-01 challenges (RFC 8555, 8.3).
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

pub struct Api {
    pub control: Arc<Control>,
    /// SHA-256 of the admin token: compared digest to digest.
    pub token: [u8; 32],
    /// The service's ports, for `/readyz` and `/metrics`.
    pub gates: Vec<Arc<edgewise_service::Gate>>,
    pub watchers: Arc<Watchers>,
}

/// An answer: whole, or a streamed watch's lines.
type Reply = Response<Either<Full<Bytes>, Lines>>;

fn whole(body: impl Into<Bytes>) -> Either<Full<Bytes>, Lines> {
    Either::Left(Full::new(body.into()))
}

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut r = Response::new(whole(body.to_string() + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Reply {
    reply(status, json!({ "error": code, "detail": detail.into() }))
}

fn text(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(whole(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        match e {
            ApiError::Invalid(i) => {
                reply(StatusCode::BAD_REQUEST, json!({ "error": "invalid", "field": i.field, "detail": i.to_string() }))
            }
            ApiError::NotFound(d) => error(StatusCode::NOT_FOUND, "not_found", d),
            ApiError::Conflict(d) => error(StatusCode::CONFLICT, "conflict", d),
            ApiError::Internal(d) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", d),
            ApiError::Unavailable(d) => error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", d),
        }
    }
}

impl Api {
    pub fn token_digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The admin port: the REST API, health, readiness and metrics.
    pub async fn handle(&self, request: Request<Incoming>) -> Reply {
        let reply = self.route(request).await;
        self.control.metrics.api(reply.status().as_u16());
        reply
    }

    /// The route port: the route table, its pages and its watch, and its readiness (the
    /// Envoys' health check: a replica cut off from the shared store fails it).
    pub async fn handle_routes(&self, request: Request<Incoming>) -> Reply {
        match (request.method(), request.uri().path()) {
            (&Method::GET, ROUTES_PATH) => self.routes(&request).await,
            (&Method::GET, path) if path.starts_with(CHALLENGE_PATH) => {
                // HTTP-01: the ingress routes this path of a custom domain here, nothing else.
                let token = path.trim_start_matches(CHALLENGE_PATH);
                let host = request.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
                match self.control.challenge(token, host) {
                    Some(key_authorization) => {
                        let mut r = Response::new(whole(key_authorization));
                        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                        r
                    }
                    None => error(StatusCode::NOT_FOUND, "not_found", "no such challenge for this host"),
                }
            }
            (&Method::GET, "/readyz") => match self.control.stale() {
                Some(since) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("etcd unreachable for {} s: what this replica holds may be stale\n", since.as_secs()),
                ),
                None => text(StatusCode::OK, "ready\n".into()),
            },
            (_, path) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("the route port serves {ROUTES_PATH} only, not {path}"),
            ),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, "/readyz") => {
                if let Some(since) = self.control.stale() {
                    let why =
                        format!("etcd unreachable for {} s: what this replica holds may be stale\n", since.as_secs());
                    return text(StatusCode::SERVICE_UNAVAILABLE, why);
                }
                return match edgewise_service::readiness(&self.gates) {
                    Ok(()) => text(StatusCode::OK, "ready\n".into()),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
                };
            }
            (&Method::GET, "/metrics") => {
                self.control.metrics.route_watchers.store(self.watchers.held() as u64, Relaxed);
                let mut out = self.control.metrics.render();
                edgewise_service::render_connections("edgewise_control", &self.gates, &mut out);
                return text(StatusCode::OK, out);
            }
            (_, ROUTES_PATH) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the route table is served on the route port (--routes), over mutual TLS",
                )
            }
            _ => {}
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (collection, name) = match segments.as_slice() {
            ["v1", c @ ("customers" | "functions" | "domains")] => (*c, None),
            ["v1", c @ ("customers" | "functions" | "domains"), name] => (*c, Some(name.to_string())),
            _ => return error(StatusCode::NOT_FOUND, "not_found", format!("no such resource: {path}")),
        };
        if !self.authorized(&request) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an `Authorization: Bearer <admin token>` is required",
            );
        }
        let body = match read_body(request).await {
            Ok(body) => body,
            Err(refused) => return refused.into(),
        };
        let control = &self.control;
        match (method, collection, name) {
            (Method::GET, "customers", name) => {
                let customers = match control.customers(name.as_deref()) {
                    Ok(customers) => customers,
                    Err(e) => return e.into(),
                };
                let list: Vec<Value> = customers
                    .into_iter()
                    .map(|(n, c, published)| {
                        json!({ "name": n, "address": c.address, "san": c.san, "ca": c.ca, "published": published })
                    })
                    .collect();
                listed(list, name.as_deref(), "customers", "customer")
            }
            (Method::GET, "functions", name) => {
                let list: Vec<Value> = control
                    .functions(name.as_deref())
                    .into_iter()
                    .map(|(n, f)| json!({ "name": n, "match": f.matches, "customer": f.customer, "host": f.host }))
                    .collect();
                listed(list, name.as_deref(), "functions", "function")
            }
            (Method::PUT, "customers", Some(name)) => match parse::<Customer>(&body) {
                Ok(customer) => created(control.put_customer(&name, customer).await, &name),
                Err(refused) => refused.into(),
            },
            (Method::PUT, "functions", Some(name)) => match parse::<Function>(&body) {
                Ok(function) => created(control.put_function(&name, function).await, &name),
                Err(refused) => refused.into(),
            },
            (Method::GET, "domains", name) => {
                let list = control.domains(name.as_deref());
                listed(list, name.as_deref(), "domains", "custom domain")
            }
            (Method::PUT, "domains", Some(name)) => match parse::<DomainRequest>(&body) {
                Ok(request) => match control.put_domain(&name, request).await {
                    // The status so far: pending until the certificate is issued.
                    Ok(created) => {
                        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                        let view = control.domains(Some(&name)).into_iter().next().unwrap_or_default();
                        reply(status, view)
                    }
                    Err(e) => e.into(),
                },
                Err(refused) => refused.into(),
            },
            (Method::DELETE, "domains", Some(name)) => match control.delete_domain(&name).await {
                Ok(()) => reply(StatusCode::OK, json!({ "deleted": name })),
                Err(e) => e.into(),
            },
            (Method::DELETE, "customers", Some(name)) => match control.delete_customer(&name).await {
                Ok(functions) => reply(StatusCode::OK, json!({ "deleted": name, "functions_deleted": functions })),
                Err(e) => e.into(),
            },
            (Method::DELETE, "functions", Some(name)) => match control.delete_function(&name).await {
                Ok(()) => reply(StatusCode::OK, json!({ "deleted": name })),
                Err(e) => e.into(),
            },
            (method, _, _) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            ),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let token = request.headers().get(AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        token.is_some_and(|t| <[u8; 32]>::from(Sha256::digest(t)) == self.token)
    }

    /// `GET /v1/serverless/routes`: the whole table (304 when `If-None-Match` names its
    /// version); with `since=<cursor>`, the changes after it, held until there is one or `wait`
    /// seconds (at most 30) pass (304), or 410 when the cursor cannot be served from.
    async fn routes(&self, request: &Request<Incoming>) -> Reply {
        let metrics = &self.control.metrics;
        if let Some(since) = self.control.stale() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unreachable",
                format!("etcd unreachable for {} s: this replica's routes may be stale; ask another", since.as_secs()),
            );
        }
        let query = Query::read(request.uri().query().unwrap_or_default());
        if let Some(limit) = &query.limit {
            let Some(limit) = read_number(limit).and_then(|l| usize::try_from(l).ok()) else {
                return error(StatusCode::BAD_REQUEST, "invalid", "`limit` is a number of routes");
            };
            let (cursor, body) = match self.control.routes_page(query.after, limit) {
                Ok(page) => page,
                Err(why) => return error(StatusCode::BAD_REQUEST, "invalid", why),
            };
            metrics.route_pages.fetch_add(1, Relaxed);
            let mut r = with_cursor(Response::new(whole(body)), StatusCode::OK, &cursor);
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return r;
        }
        let Some(since) = query.since else {
            let table = match self.control.routes(request.headers().get(IF_NONE_MATCH).map(HeaderValue::as_bytes)) {
                Ok(table) => table,
                Err(cursor) => {
                    metrics.route_not_modified.fetch_add(1, Relaxed);
                    return with_cursor(Response::new(whole(Bytes::new())), StatusCode::NOT_MODIFIED, &cursor);
                }
            };
            metrics.route_fetches.fetch_add(1, Relaxed);
            let mut r = with_cursor(Response::new(whole(table.body.clone())), StatusCode::OK, &table.cursor);
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Ok(etag) = HeaderValue::from_str(&table.etag) {
                r.headers_mut().insert(ETAG, etag);
            }
            return r;
        };
        let streamed = match query.stream {
            None => false,
            Some("1") => true,
            Some(_) => return error(StatusCode::BAD_REQUEST, "invalid", "`stream` is 1 (a streamed watch) or absent"),
        };
        let wait = match query.wait.map(read_number) {
            None => Duration::ZERO,
            Some(Some(s)) => Duration::from_secs(s.min(MAX_WAIT.as_secs())),
            Some(None) => return error(StatusCode::BAD_REQUEST, "invalid", "`wait` is a number of seconds"),
        };
        let client = request.extensions().get::<Client>().map(|c| c.0);
        let Some(watcher) = self.watchers.enter(client) else {
            metrics.watch(Watch::Refused);
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_watches",
                format!(
                    "at most {WATCHES_PER_CLIENT} watches from one address and {} in all are held",
                    self.watchers.total_limit
                ),
            );
        };
        if streamed {
            if let Since::Gone(why) = self.control.routes_since(since) {
                metrics.watch(Watch::Gone);
                return error(StatusCode::GONE, "gone", format!("{why}: fetch the whole table"));
            }
            return self.stream(since, wait, watcher);
        }
        let mut version = self.control.route_version();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            version.borrow_and_update();
            match self.control.routes_since(since) {
                Since::Gone(why) => {
                    metrics.watch(Watch::Gone);
                    return error(StatusCode::GONE, "gone", format!("{why}: fetch the whole table"));
                }
                Since::Changes { cursor, version, changes } => {
                    metrics.watch(Watch::Changes);
                    let body = changes_json(version, None, &changes);
                    let mut r = with_cursor(Response::new(whole(body)), StatusCode::OK, &cursor);
                    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    return r;
                }
                Since::Current => {
                    if tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                        metrics.watch(Watch::Timeout);
                        return with_cursor(Response::new(whole(Bytes::new())), StatusCode::NOT_MODIFIED, since);
                    }
                }
            }
        }
    }

    /// A streamed watch (`&stream=1`): 200 at once, then a line per version as the changes are
    /// made, and one with no change after `wait` with nothing to send.
    fn stream(&self, since: &str, wait: Duration, watcher: Watcher) -> Reply {
        self.control.metrics.route_streams.fetch_add(1, Relaxed);
        let wait = if wait.is_zero() { MAX_WAIT } else { wait };
        let until = tokio::time::Instant::now() + MAX_STREAM;
        let version = self.control.route_version();
        let state = Streaming {
            control: self.control.clone(),
            version,
            cursor: since.to_string(),
            at: Cursor::read(since).map_or(0, |c| c.version),
            wait,
            until,
            _watcher: watcher,
        };
        let mut r = with_cursor(Response::new(Either::Right(Lines::new(state))), StatusCode::OK, since);
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(LINES));
        r
    }
}

/// The media type of a streamed watch: one JSON document per line.
const LINES: &str = "application/x-ndjson";

/// Longest a streamed watch lasts: then the watcher asks again, maybe of another replica.
const MAX_STREAM: Duration = Duration::from_secs(300);

/// A streamed watch between two lines.
struct Streaming {
    control: Arc<Control>,
    /// The table's version, changing with it.
    version: tokio::sync::watch::Receiver<u64>,
    cursor: String,
    /// The version `cursor` names: while the table's is the same, there is nothing to send.
    at: u64,
    wait: Duration,
    until: tokio::time::Instant,
    /// Counts the stream among the watches held, until it ends.
    _watcher: Watcher,
}

impl Streaming {
    /// The next line and the state after it, or `None` once the stream ends: the cursor can no
    /// longer be served from (asked again, it is a 410), the replica cannot vouch for its
    /// routes, or `MAX_STREAM` has passed.
    async fn next(mut self) -> Option<(Bytes, Streaming)> {
        loop {
            if self.control.stale().is_some() {
                return None;
            }
            let current = *self.version.borrow_and_update() == self.at;
            let next = if current { Ok(None) } else { self.control.line_since(&self.cursor) };
            match next {
                Err(_) => return None,
                Ok(Some(line)) => {
                    self.control.metrics.route_stream_lines.fetch_add(1, Relaxed);
                    (self.cursor, self.at) = (line.cursor, line.version);
                    return Some((line.bytes, self));
                }
                Ok(None) => {
                    let beat = (tokio::time::Instant::now() + self.wait).min(self.until);
                    match tokio::time::timeout_at(beat, self.version.changed()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None,
                        Err(_) if tokio::time::Instant::now() >= self.until => return None,
                        Err(_) => return Some((changes_json(self.at, Some(&self.cursor), &[]), self)),
                    }
                }
            }
        }
    }
}

type NextLine = Pin<Box<dyn Future<Output = Option<(Bytes, Streaming)>> + Send>>;

/// A streamed watch's body. A line is made when hyper asks for it: a watcher that does not read
/// holds none queued, and at worst falls behind the history kept (its next watch is a 410).
pub struct Lines(Option<NextLine>);

impl Lines {
    fn new(state: Streaming) -> Lines {
        Lines(Some(Box::pin(state.next())))
    }
}

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let Some(next) = self.0.as_mut() else { return Poll::Ready(None) };
        match std::task::ready!(next.as_mut().poll(cx)) {
            Some((line, state)) => {
                self.0 = Some(Box::pin(state.next()));
                Poll::Ready(Some(Ok(hyper::body::Frame::data(line))))
            }
            None => {
                self.0 = None;
                Poll::Ready(None)
            }
        }
    }
}

/// The route table's cursor header on an answer of the routes endpoint.
pub const CURSOR: &str = "x-edgewise-cursor";

fn with_cursor(mut r: Reply, status: StatusCode, cursor: &str) -> Reply {
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(cursor) {
        r.headers_mut().insert(CURSOR, v);
    }
    r
}

/// Longest a watch is held: below the connections' idle timeout (60 s).
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Watches one address holds at once (a gateway holds one).
const WATCHES_PER_CLIENT: usize = 8;

/// The watches held: bounded per client address and in all.
pub struct Watchers {
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
    pub total_limit: usize,
}

/// One watch held, counted until dropped.
struct Watcher {
    watchers: Arc<Watchers>,
    client: Option<IpAddr>,
}

impl Watchers {
    pub fn new(total_limit: usize) -> Watchers {
        Watchers { held: Mutex::default(), total_limit }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(self: &Arc<Self>, client: Option<IpAddr>) -> Option<Watcher> {
        let mut held = self.lock();
        let of_client = client.and_then(|c| held.1.get(&c).copied()).unwrap_or(0);
        if held.0 >= self.total_limit || of_client >= WATCHES_PER_CLIENT {
            return None;
        }
        held.0 += 1;
        if let Some(c) = client {
            *held.1.entry(c).or_default() += 1;
        }
        Some(Watcher { watchers: self.clone(), client })
    }

    pub fn held(&self) -> usize {
        self.lock().0
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut held = self.watchers.lock();
        held.0 = held.0.saturating_sub(1);
        if let Some(c) = self.client {
            if let Some(n) = held.1.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    held.1.remove(&c);
                }
            }
        }
    }
}

/// A GET of a collection: the one named (404 if there is none), or all of them.
fn listed(list: Vec<Value>, name: Option<&str>, collection: &str, what: &str) -> Reply {
    match name {
        Some(n) => list.into_iter().next().map_or_else(
            || error(StatusCode::NOT_FOUND, "not_found", format!("no {what} {n:?}")),
            |one| reply(StatusCode::OK, one),
        ),
        None => reply(StatusCode::OK, json!({ collection: list })),
    }
}

fn created(result: Result<bool, ApiError>, name: &str) -> Reply {
    match result {
        Ok(true) => reply(StatusCode::CREATED, json!({ "created": name })),
        Ok(false) => reply(StatusCode::OK, json!({ "updated": name })),
        Err(e) => e.into(),
    }
}

/// A request refused before it reaches the control service: status, code, detail.
struct Refused(StatusCode, &'static str, String);

impl From<Refused> for Reply {
    fn from(Refused(status, code, detail): Refused) -> Reply {
        error(status, code, detail)
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Refused> {
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect());
    let Ok(read) = read.await else {
        return Err(Refused(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        ));
    };
    match read {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the body is over {MAX_BODY} bytes")))
        }
        Err(e) => Err(Refused(StatusCode::BAD_REQUEST, "bad_body", e.to_string())),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| Refused(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))
}

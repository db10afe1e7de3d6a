//! The HTTP port: the REST API (bearer token), the route table the filters poll, health and
//! metrics. Every error is JSON: `{"error": "<code>", "detail": "<why>"}`.

use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::control::{ApiError, Control};
use crate::model::{Customer, Function};

/// Largest request body (a customer with a CA bundle).
const MAX_BODY: usize = 256 * 1024;
/// A request body must arrive whole within this (a body trickled a byte at a time is cut off).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const ROUTES_PATH: &str = "/v1/serverless/routes";

pub struct Api {
    pub control: Arc<Control>,
    /// SHA-256 of the admin token: compared digest to digest.
    pub token: [u8; 32],
    /// The service's ports, for `/readyz` and `/metrics`.
    pub gates: Vec<Arc<edgewise_service::Gate>>,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Reply {
    reply(status, json!({ "error": code, "detail": detail.into() }))
}

fn text(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
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
        }
    }
}

impl Api {
    pub fn token_digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Reply {
        let reply = self.route(request).await;
        self.control.metrics.api(reply.status().as_u16());
        reply
    }

    async fn route(&self, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, "/readyz") => {
                return match edgewise_service::readiness(&self.gates) {
                    Ok(()) => text(StatusCode::OK, "ready\n".into()),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
                }
            }
            (&Method::GET, "/metrics") => {
                let mut out = self.control.metrics.render();
                edgewise_service::render_connections("edgewise_control", &self.gates, &mut out);
                return text(StatusCode::OK, out);
            }
            (&Method::GET, ROUTES_PATH) => return self.routes(&request),
            _ => {}
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (collection, name) = match segments.as_slice() {
            ["v1", c @ ("customers" | "functions")] => (*c, None),
            ["v1", c @ ("customers" | "functions"), name] => (*c, Some(name.to_string())),
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
                let list: Vec<Value> = control
                    .customers(name.as_deref())
                    .into_iter()
                    .map(|(n, c, published)| {
                        json!({ "name": n, "address": c.address, "san": c.san, "ca": c.ca, "published": published })
                    })
                    .collect();
                match name {
                    Some(n) => list.into_iter().next().map_or_else(
                        || error(StatusCode::NOT_FOUND, "not_found", format!("no customer {n:?}")),
                        |c| reply(StatusCode::OK, c),
                    ),
                    None => reply(StatusCode::OK, json!({ "customers": list })),
                }
            }
            (Method::GET, "functions", name) => {
                let list: Vec<Value> = control
                    .functions(name.as_deref())
                    .into_iter()
                    .map(|(n, f)| json!({ "name": n, "match": f.matches, "customer": f.customer, "host": f.host }))
                    .collect();
                match name {
                    Some(n) => list.into_iter().next().map_or_else(
                        || error(StatusCode::NOT_FOUND, "not_found", format!("no function {n:?}")),
                        |f| reply(StatusCode::OK, f),
                    ),
                    None => reply(StatusCode::OK, json!({ "functions": list })),
                }
            }
            (Method::PUT, "customers", Some(name)) => match parse::<Customer>(&body) {
                Ok(customer) => created(control.put_customer(&name, customer), &name),
                Err(refused) => refused.into(),
            },
            (Method::PUT, "functions", Some(name)) => match parse::<Function>(&body) {
                Ok(function) => created(control.put_function(&name, function), &name),
                Err(refused) => refused.into(),
            },
            (Method::DELETE, "customers", Some(name)) => match control.delete_customer(&name) {
                Ok(functions) => reply(StatusCode::OK, json!({ "deleted": name, "functions_deleted": functions })),
                Err(e) => e.into(),
            },
            (Method::DELETE, "functions", Some(name)) => match control.delete_function(&name) {
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

    /// The route table, or 304 when the poller has this version.
    fn routes(&self, request: &Request<Incoming>) -> Reply {
        let table = self.control.routes();
        let metrics = &self.control.metrics;
        if request.headers().get(IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == table.etag.as_bytes()) {
            metrics.route_not_modified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            return r;
        }
        metrics.route_fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = Response::new(Full::new(table.body.clone()));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(etag) = HeaderValue::from_str(&table.etag) {
            r.headers_mut().insert(ETAG, etag);
        }
        r
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

//! `edgewise-ratelimit`: Envoy's `RateLimitService` (gRPC) for a fleet of Cloud Connector
//! gateways, counting with Kuadrant's limitador on Redis, so that every replica shares one limit
//! per organization and feature. Beside it an HTTP port answers `/healthz` (the process serves),
//! `/readyz` (Redis answers) and `/metrics` (Prometheus).
//!
//! It starts without Redis (answering UNAVAILABLE, which the gateways' `failure_mode_deny`
//! decides about) and connects as soon as Redis answers; SIGTERM or SIGINT stops accepting, lets
//! the calls in flight finish and exits.

pub mod config;
mod metrics;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use service::{Limiter, FEATURE, ORGANIZATION};

pub struct Options {
    pub config: Config,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub redis: String,
    /// Connections each port holds, in all and per client address.
    pub limits: edgewise_service::Limits,
}

const USAGE: &str =
    "usage: edgewise-ratelimit --config <limits.json> [--grpc 127.0.0.1:18081] [--http 127.0.0.1:18082] \
                     [--redis redis://127.0.0.1:6379] [--max-connections 4096] [--max-connections-per-client 64]";

impl Options {
    /// From the command line; `REDIS_URL` is the default of `--redis`.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut args = args.into_iter();
        let (mut config, mut grpc, mut http) = (None, "127.0.0.1:18081".to_string(), "127.0.0.1:18082".to_string());
        let mut redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut limits = edgewise_service::Limits::default();
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"));
            match flag.as_str() {
                "--config" => config = Some(value()?),
                "--grpc" => grpc = value()?,
                "--http" => http = value()?,
                "--redis" => redis = value()?,
                other => {
                    if !limits.take_flag(other, value)? {
                        return Err(format!("unknown argument {flag:?}; {USAGE}"));
                    }
                }
            }
        }
        let path = config.ok_or_else(|| format!("--config is required; {USAGE}"))?;
        let doc = std::fs::read(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let config = Config::parse(&doc).map_err(|e| format!("{path}: {e}"))?;
        let addr = |flag: &str, v: &str| v.parse().map_err(|e| format!("{flag} {v:?}: {e}"));
        Ok(Options { config, grpc: addr("--grpc", &grpc)?, http: addr("--http", &http)?, redis, limits })
    }
}

/// Serves until SIGTERM or SIGINT. Prints `listening grpc=<addr> http=<addr>` once both ports
/// are bound (port 0 picks one).
pub async fn run(options: Options) -> Result<(), String> {
    let limiter = Arc::new(Limiter::new(&options.config).map_err(|e| e.to_string())?);
    let [http_gate, grpc_gate] = edgewise_service::gates("edgewise-ratelimit", options.limits, ["http", "grpc"]);
    let grpc = TcpListener::bind(options.grpc).await.map_err(|e| format!("binding {}: {e}", options.grpc))?;
    let http = TcpListener::bind(options.http).await.map_err(|e| format!("binding {}: {e}", options.http))?;
    let (grpc_addr, http_addr) =
        (grpc.local_addr().map_err(|e| e.to_string())?, http.local_addr().map_err(|e| e.to_string())?);
    println!("listening grpc={grpc_addr} http={http_addr}");
    eprintln!(
        "edgewise-ratelimit: domain {:?}, {} limits, Redis {}",
        options.config.domain,
        options.config.limits.len(),
        redact(&options.redis)
    );

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(connect(limiter.clone(), options.redis));
    tokio::spawn(watch_redis(limiter.clone()));
    let http_limiter = limiter.clone();
    let gates = Arc::new([http_gate.clone(), grpc_gate.clone()]);
    tokio::spawn(edgewise_service::serve_http(
        http,
        http_gate,
        None,
        move |request| std::future::ready(answer(&http_limiter, &gates[..], request.uri().path())),
        stop.clone(),
    ));

    let mut grpc_stop = stop.clone();
    let server = edgewise_service::grpc_server()
        .add_service(
            RateLimitServiceServer::from_arc(Arc::new(service::Rls(limiter)))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(edgewise_service::grpc_incoming(grpc, grpc_gate, stop.clone()), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
    let signals = edgewise_service::until_signal("edgewise-ratelimit", stop_tx);
    let (served, signalled) = tokio::join!(server, signals);
    signalled?;
    served.map_err(|e| format!("gRPC server: {e}"))
}

/// Largest RLS request or response: a handful of descriptors, far below this.
const MAX_MESSAGE: usize = 64 * 1024;

/// The URL without a password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Connects to Redis, retrying every second until it answers, then installs the limits.
async fn connect(limiter: Arc<Limiter>, redis: String) {
    loop {
        match storage(&redis).await {
            Ok((storage, connection)) => {
                limiter.connect(storage, connection).await;
                eprintln!("edgewise-ratelimit: Redis reached");
                return;
            }
            Err(e) => {
                limiter.metrics.set_storage_up(false);
                eprintln!("edgewise-ratelimit: Redis not reached ({e}); retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// limitador's storage, and a handle on its connection (which reconnects by itself).
async fn storage(
    url: &str,
) -> Result<(limitador::storage::redis::AsyncRedisStorage, redis::aio::ConnectionManager), redis::RedisError> {
    let connection = redis::aio::ConnectionManager::new(redis::Client::open(url)?).await?;
    let storage = limitador::storage::redis::AsyncRedisStorage::new_with_conn_manager(connection.clone()).await?;
    Ok((storage, connection))
}

/// PINGs Redis every second on the storage's own connection, so that readiness and
/// `storage_up` say whether the counting connection works (a failed PING also makes it
/// reconnect), even when no request comes.
async fn watch_redis(limiter: Arc<Limiter>) {
    loop {
        let up = match limiter.connection().await {
            Some(mut c) => {
                let ping = redis::cmd("PING");
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), ping.query_async::<String>(&mut c)).await,
                    Ok(Ok(_))
                )
            }
            None => false,
        };
        limiter.metrics.set_storage_up(up);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn answer(limiter: &Limiter, gates: &[Arc<edgewise_service::Gate>], path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => match (limiter.metrics.storage_up(), edgewise_service::readiness(gates)) {
            (true, Ok(())) => (StatusCode::OK, "ready\n".to_string()),
            (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "Redis does not answer\n".to_string()),
            (true, Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
        },
        "/metrics" => {
            let mut out = limiter.metrics.render();
            edgewise_service::render_connections("edgewise_ratelimit", gates, &mut out);
            (StatusCode::OK, out)
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

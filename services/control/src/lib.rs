//! `edgewise-control`: the serverless ingress's management service. Customers (their clusters:
//! gateway address, CA, SAN) and functions are added and removed through a REST API and kept in
//! SQLite; Envoy receives the customer clusters and their certificates through delta xDS (ADS
//! over gRPC) and the serverless filter polls the route table, ordered so that a route never
//! names a cluster Envoy does not have (see `control`).
//!
//! Three ports: xDS (gRPC) and the route table (HTTP) for Envoys, both over mutual TLS since they
//! name every customer and carry the platform's key; the admin port (HTTP) for the REST API
//! (admin token), `/healthz`, `/readyz` and `/metrics`. SIGTERM or SIGINT stops it; everything
//! acknowledged is on disk.

mod acme;
mod api;
mod control;
pub mod domains;
pub mod etcd;
mod functions;
mod metrics;
pub mod model;
pub mod resources;
pub mod routes;
pub mod store;
mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use api::{CURSOR, ROUTES_PATH};
pub use control::Control;

/// The environment variable that holds the admin token.
pub const TOKEN_ENV: &str = "EDGEWISE_CONTROL_TOKEN";
const MIN_TOKEN: usize = 16;

pub struct Options {
    /// The local store (one replica), or the shared one (etcd, any number of replicas).
    pub store: StoreOption,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub routes: SocketAddr,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub domain: String,
    pub pattern: String,
    pub removal_delay: Duration,
    pub token: String,
    /// The certificate, key and the CA of the Envoys' client certificates of the xDS and route
    /// ports: mutual TLS when given.
    pub tls: Option<[PathBuf; 3]>,
    /// Connections each port holds, in all and per client address.
    pub limits: edgewise_service::Limits,
    /// Certificates for custom domains from this ACME CA; none without it.
    pub acme: Option<acme::AcmeOptions>,
    pub max_domains: usize,
}

pub enum StoreOption {
    Sqlite(PathBuf),
    Etcd(etcd::EtcdOptions),
}

const USAGE: &str = "usage: edgewise-control (--db <file.db> | --etcd <url>,... [--etcd-prefix /edgewise/] \
     [--etcd-ca <pem>] [--etcd-cert <pem> --etcd-key <pem>] [--etcd-stale-ms 10000]) --client-cert <pem> --client-key <pem> \
     [--grpc 127.0.0.1:18000] [--routes 127.0.0.1:19200] [--http 127.0.0.1:19100] [--domain serverless.gitlab.io] [--pattern <regex>] \
     [--removal-delay-ms 5000] [--tls-cert <pem> --tls-key <pem> --tls-client-ca <pem>] \
     [--max-connections 4096] [--max-connections-per-client 64] \
     [--acme-directory <url> [--acme-ca <pem>] [--acme-contact mailto:...] [--acme-retry-ms 60000] [--acme-concurrency 4]] \
     [--max-domains 100000]; the admin token in $EDGEWISE_CONTROL_TOKEN";

impl Options {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut args = args.into_iter();
        let (mut db, mut cert, mut key) = (None, None, None);
        let (mut etcd, mut etcd_prefix, mut etcd_ca, mut etcd_cert, mut etcd_key) =
            (None, "/edgewise/".to_string(), None, None, None);
        let mut stale_ms = etcd::STALE_AFTER.as_millis().to_string();
        let (mut tls_cert, mut tls_key, mut tls_ca) = (None, None, None);
        let (mut grpc, mut http) = ("127.0.0.1:18000".to_string(), "127.0.0.1:19100".to_string());
        let mut routes = "127.0.0.1:19200".to_string();
        let mut domain = edgewise_core::serverless::DEFAULT_DOMAIN.to_string();
        let mut pattern = edgewise_core::serverless::DEFAULT_PATTERN.to_string();
        let mut removal_delay_ms = "5000".to_string();
        let mut limits = edgewise_service::Limits::default();
        let (mut acme_directory, mut acme_ca, mut acme_contact) = (None, None, Vec::new());
        let (mut acme_retry_ms, mut acme_concurrency) = ("60000".to_string(), "4".to_string());
        let mut max_domains = control::MAX_DOMAINS.to_string();
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"));
            match flag.as_str() {
                "--db" => db = Some(value()?),
                "--etcd" => etcd = Some(value()?),
                "--etcd-prefix" => etcd_prefix = value()?,
                "--etcd-ca" => etcd_ca = Some(value()?),
                "--etcd-cert" => etcd_cert = Some(value()?),
                "--etcd-key" => etcd_key = Some(value()?),
                "--etcd-stale-ms" => stale_ms = value()?,
                "--client-cert" => cert = Some(value()?),
                "--client-key" => key = Some(value()?),
                "--grpc" => grpc = value()?,
                "--http" => http = value()?,
                "--routes" => routes = value()?,
                "--domain" => domain = value()?,
                "--pattern" => pattern = value()?,
                "--removal-delay-ms" => removal_delay_ms = value()?,
                "--tls-cert" => tls_cert = Some(value()?),
                "--tls-key" => tls_key = Some(value()?),
                "--tls-client-ca" => tls_ca = Some(value()?),
                "--acme-directory" => acme_directory = Some(value()?),
                "--acme-ca" => acme_ca = Some(value()?),
                "--acme-contact" => acme_contact.push(value()?),
                "--acme-retry-ms" => acme_retry_ms = value()?,
                "--acme-concurrency" => acme_concurrency = value()?,
                "--max-domains" => max_domains = value()?,
                other => {
                    if !limits.take_flag(other, value)? {
                        return Err(format!("unknown argument {flag:?}; {USAGE}"));
                    }
                }
            }
        }
        let required = |v: Option<String>, flag: &str| v.ok_or_else(|| format!("{flag} is required; {USAGE}"));
        let token = std::env::var(TOKEN_ENV).unwrap_or_default();
        if token.len() < MIN_TOKEN {
            return Err(format!("{TOKEN_ENV} must hold the admin token, at least {MIN_TOKEN} characters"));
        }
        let addr = |flag: &str, v: &str| v.parse().map_err(|e| format!("{flag} {v:?}: {e}"));
        let removal_delay_ms: u64 =
            removal_delay_ms.parse().map_err(|e| format!("--removal-delay-ms {removal_delay_ms:?}: {e}"))?;
        let tls = match (tls_cert, tls_key, tls_ca) {
            (Some(c), Some(k), Some(a)) => Some([c.into(), k.into(), a.into()]),
            (None, None, None) => None,
            _ => return Err(format!("--tls-cert, --tls-key and --tls-client-ca go together; {USAGE}")),
        };
        let number = |flag: &str, v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        let acme = match acme_directory {
            Some(directory) => {
                if !directory.starts_with("https://") {
                    return Err(format!("--acme-directory {directory:?}: must be an https:// URL"));
                }
                let retry = Duration::from_millis(number("--acme-retry-ms", &acme_retry_ms)?.max(1));
                let concurrency = number("--acme-concurrency", &acme_concurrency)?.clamp(1, 64) as usize;
                Some(acme::AcmeOptions {
                    directory,
                    ca: acme_ca.map(PathBuf::from),
                    contact: acme_contact,
                    retry,
                    max_retry: Duration::from_secs(3600).max(retry),
                    concurrency,
                })
            }
            None if acme_ca.is_some() || !acme_contact.is_empty() => {
                return Err(format!("--acme-ca and --acme-contact need --acme-directory; {USAGE}"))
            }
            None => None,
        };
        let max_domains = number("--max-domains", &max_domains)? as usize;
        let store = match (db, etcd) {
            (Some(db), None) => StoreOption::Sqlite(db.into()),
            (None, Some(urls)) => {
                let endpoints: Vec<String> =
                    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
                if endpoints.is_empty() {
                    return Err(format!("--etcd {urls:?}: names no endpoint; {USAGE}"));
                }
                if !etcd_prefix.starts_with('/') || !etcd_prefix.ends_with('/') {
                    return Err(format!("--etcd-prefix {etcd_prefix:?}: must begin and end with '/'"));
                }
                let identity = match (etcd_cert, etcd_key) {
                    (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                    (None, None) => None,
                    _ => return Err(format!("--etcd-cert and --etcd-key go together; {USAGE}")),
                };
                let stale_ms: u64 = stale_ms.parse().map_err(|e| format!("--etcd-stale-ms {stale_ms:?}: {e}"))?;
                StoreOption::Etcd(etcd::EtcdOptions {
                    stale_after: Duration::from_millis(stale_ms.max(1000)),
                    endpoints,
                    prefix: etcd_prefix,
                    ca: etcd_ca.map(PathBuf::from),
                    identity,
                })
            }
            (Some(_), Some(_)) => return Err(format!("--db and --etcd are exclusive: one store; {USAGE}")),
            (None, None) => return Err(format!("--db or --etcd is required; {USAGE}")),
        };
        Ok(Options {
            tls,
            limits,
            store,
            grpc: addr("--grpc", &grpc)?,
            http: addr("--http", &http)?,
            routes: addr("--routes", &routes)?,
            client_cert: required(cert, "--client-cert")?.into(),
            client_key: required(key, "--client-key")?.into(),
            domain,
            pattern,
            removal_delay: Duration::from_millis(removal_delay_ms),
            token,
            acme,
            max_domains,
        })
    }
}

/// Serves until SIGTERM or SIGINT. Prints `listening grpc=<addr> http=<addr> routes=<addr>` once
/// the ports are bound (port 0 picks one).
pub async fn run(options: Options) -> Result<(), String> {
    let rules = model::FunctionRules::new(&options.domain, &options.pattern).map_err(|e| format!("--pattern: {e}"))?;
    let (control, store_name) = match &options.store {
        StoreOption::Sqlite(db) => {
            let store = store::Store::open(db)?;
            (Control::open(store, rules, options.removal_delay)?, db.display().to_string())
        }
        StoreOption::Etcd(etcd) => {
            let shared = etcd::Shared::connect(etcd).await?;
            let name = format!("etcd {} (replica {})", etcd.endpoints.join(","), shared.replica);
            (Control::open_shared(shared, rules, options.removal_delay).await?, name)
        }
    };
    edgewise_service::release_freed_memory();
    control.max_domains.store(options.max_domains, std::sync::atomic::Ordering::Relaxed);
    if let Some(acme) = &options.acme {
        tokio::spawn(acme::run(control.clone(), acme.clone()));
    }
    let (chain, key) = read_client_certificate(&options)?;
    control.set_platform_client(&chain, &key);

    let [http_gate, grpc_gate, routes_gate] =
        edgewise_service::gates("edgewise-control", options.limits, ["http", "grpc", "routes"]);
    let bind =
        |addr: SocketAddr| async move { TcpListener::bind(addr).await.map_err(|e| format!("binding {addr}: {e}")) };
    let (grpc, http, routes) = (bind(options.grpc).await?, bind(options.http).await?, bind(options.routes).await?);
    let local = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
    println!("listening grpc={} http={} routes={}", local(&grpc)?, local(&http)?, local(&routes)?);
    let routes_tls = match &options.tls {
        Some([cert, key, ca]) => {
            Some(edgewise_service::mutual_tls(cert, key, ca).map_err(|e| format!("--tls-cert: {e}"))?)
        }
        None => None,
    };
    let (customers, functions) = control.counts();
    eprintln!("edgewise-control: {customers} customers, {functions} functions, {store_name}");

    let (stop_tx, stop) = watch::channel(false);
    let api = Arc::new(api::Api {
        control: control.clone(),
        token: api::Api::token_digest(&options.token),
        watchers: Arc::new(api::Watchers::new(routes_gate.limits.max_connections / 2)),
        gates: vec![http_gate.clone(), grpc_gate.clone(), routes_gate.clone()],
    });
    let admin = api.clone();
    tokio::spawn(edgewise_service::serve_http(
        http,
        http_gate,
        None,
        move |request| {
            let api = admin.clone();
            async move { api.handle(request).await }
        },
        stop.clone(),
    ));
    tokio::spawn(edgewise_service::serve_http(
        routes,
        routes_gate,
        routes_tls,
        move |request| {
            let api = api.clone();
            async move { api.handle_routes(request).await }
        },
        stop.clone(),
    ));
    tokio::spawn(watch_client_certificate(
        control.clone(),
        options.client_cert.clone(),
        options.client_key.clone(),
        chain,
        key,
    ));

    let mut grpc_stop = stop.clone();
    tokio::spawn(control::recheck_publication(control.clone()));
    let mut builder = edgewise_service::grpc_server();
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(xds_tls(tls)?).map_err(|e| format!("--tls-cert: {e}"))?;
    } else {
        eprintln!(
            "edgewise-control: xDS and the route table in plaintext (no --tls-cert): they carry the platform's \
             private key and name every customer"
        );
    }
    let server = builder
        .add_service(
            AggregatedDiscoveryServiceServer::new(xds::Ads {
                control,
                streams_per_client: options.limits.max_per_client,
                stop: stop.clone(),
            })
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20),
        )
        .serve_with_incoming_shutdown(edgewise_service::grpc_incoming(grpc, grpc_gate, stop.clone()), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
    let signals = edgewise_service::until_signal("edgewise-control", stop_tx);
    let (served, signalled) = tokio::join!(server, signals);
    signalled?;
    served.map_err(|e| format!("gRPC server: {e}"))
}

/// Mutual TLS for the xDS port: Envoys must present a certificate of the client CA.
fn xds_tls([cert, key, ca]: &[PathBuf; 3]) -> Result<tonic::transport::ServerTlsConfig, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    model::check_ca(&String::from_utf8_lossy(&read(cert)?)).map_err(|e| format!("--tls-cert: {}", e.reason))?;
    model::check_ca(&String::from_utf8_lossy(&read(ca)?)).map_err(|e| format!("--tls-client-ca: {}", e.reason))?;
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
        .timeout(edgewise_service::HANDSHAKE_TIMEOUT))
}

fn read_client_certificate(options: &Options) -> Result<(String, String), String> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (chain, key) = (read(&options.client_cert)?, read(&options.client_key)?);
    model::check_ca(&chain).map_err(|e| format!("--client-cert {}: {}", options.client_cert.display(), e.reason))?;
    if !key.contains("PRIVATE KEY-----") {
        return Err(format!("--client-key {}: holds no PEM private key", options.client_key.display()));
    }
    Ok((chain, key))
}

/// Re-reads the platform's client certificate every second: a replaced pair (cert-manager, a
/// Secret volume) reaches every Envoy through SDS, with no restart. A half-written or unreadable
/// pair is skipped until it reads whole.
async fn watch_client_certificate(
    control: Arc<Control>,
    cert: PathBuf,
    key: PathBuf,
    mut chain: String,
    mut pem: String,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (Ok(new_chain), Ok(new_key)) = (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) else {
            continue;
        };
        if (new_chain == chain && new_key == pem)
            || model::check_ca(&new_chain).is_err()
            || !new_key.contains("PRIVATE KEY-----")
        {
            continue;
        }
        eprintln!("edgewise-control: the platform client certificate changed; serving the new one");
        control.set_platform_client(&new_chain, &new_key);
        (chain, pem) = (new_chain, new_key);
    }
}
